"""PEFT LoRA reference for `cargo xtask bench adapters`.

Two uses, both with the venv python that `cargo xtask setup` provides (`$FRUGAL_PYTHON`):

1. Make the frozen base the benchmark fine-tunes: a transformers `LlamaForCausalLM` of the LLaMA
   130M configuration (hidden 768, intermediate 2048, 12 layers, 12 heads, vocabulary 32000, max
   positions 1024, RMSNorm eps 1e-6, RoPE theta 10000, no biases, untied lm_head), random weights
   from seed 0, saved as one `model.safetensors` and `config.json` (no tokenizer). Nothing is done
   when DIR/config.json (and DIR/model.safetensors) exist. It prints one line of JSON on stdout:
   `{"base": DIR, "made": true|false, "params": N}` (`params` only when made).

       $FRUGAL_PYTHON scripts/bench_adapters_peft.py --make-base target/bench/adapters/base

2. Fine-tune PEFT LoRA (r, alpha, on q/k/v/o/gate/up/down, no dropout) on that base with AdamW
   (lr 1e-4) over the adapter's parameters, on random token batches, loss
   `model(input_ids, labels=input_ids).loss`, and measure seconds per step and resident memory:

       $FRUGAL_PYTHON scripts/bench_adapters_peft.py --steps 3 --warmup 1 --batch 4 --seq 256 \
           --base target/bench/adapters/base --r 8 --alpha 16

   It prints exactly one line of JSON on stdout (everything else goes to stderr):

       {"impl":"peft-lora","params":..,"trainable_params":..,"step_s":..,"tokens_per_s":..,
        "baseline_rss_bytes":..,"peak_rss_bytes":..,"torch_threads":..}

3. The grouped-query comparison: `--make-base-gqa DIR` writes a Llama-3.2-1B-shaped base
   (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocabulary 128256, tied
   embeddings, rope_theta 5e5, Llama 3 RoPE scaling factor 32 / 1 / 4 over 8192, max positions
   131072), random weights from seed 0 (std 0.02), saved in bf16 as Meta ships it; `--layers N`
   makes a shallower one (a smoke test). `--qlora` then fine-tunes it as QLoRA with PEFT and
   bitsandbytes: the base loaded as NF4 with double quantization (`BitsAndBytesConfig`, bf16
   compute), `prepare_model_for_kbit_training` with activation checkpointing, LoRA on the seven
   projections, AdamW over the adapter:

       $FRUGAL_PYTHON scripts/bench_adapters_peft.py --qlora --steps 2 --warmup 1 --batch 1 \
           --seq 512 --base target/bench/adapters/gqa-base --r 16 --alpha 32

   Same JSON line, `"impl":"peft-qlora-bnb"`, with the bitsandbytes version.
"""

import argparse
import inspect
import json
import math
import os
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*[Nn]um[Pp]y.*")

import torch  # noqa: E402

# The LLaMA 130M configuration.
VOCAB = 32000
HIDDEN = 768
INTERMEDIATE = 2048
LAYERS = 12
HEADS = 12
MAX_POSITIONS = 1024
NORM_EPS = 1e-6
ROPE_THETA = 10000.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_bytes(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes, or 0 when unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def make_base(folder):
    """Writes the random 130M base to `folder`, unless its config.json (and weights) exist."""
    done = all(os.path.exists(os.path.join(folder, f)) for f in ("config.json", "model.safetensors"))
    if done:
        log(f"base: {folder}/config.json exists, kept")
        print(json.dumps({"base": folder, "made": False}), flush=True)
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=NORM_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    os.makedirs(folder, exist_ok=True)
    kwargs = {"max_shard_size": "2GB"}
    # transformers 5 always writes safetensors and has no such argument; older ones do.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(folder, **kwargs)
    log(f"base: wrote {params} parameters to {folder}")
    print(json.dumps({"base": folder, "made": True, "params": params}), flush=True)


# The Llama-3.2-1B shape of the grouped-query comparison.
GQA = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    hidden_act="silu",
)


def make_base_gqa(folder, layers):
    """Writes the random Llama-3.2-1B-shaped base to `folder` in bf16, unless it exists."""
    done = os.path.exists(os.path.join(folder, "config.json"))
    if done:
        log(f"base: {folder}/config.json exists, kept")
        print(json.dumps({"base": folder, "made": False}), flush=True)
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**GQA, "num_hidden_layers": layers}, initializer_range=0.02)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="2GB")
    log(f"base: wrote {params} parameters to {folder} (bf16)")
    print(json.dumps({"base": folder, "made": True, "params": params}), flush=True)


def train(a):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    total = a.warmup + a.steps
    vocab = AutoConfig.from_pretrained(a.base).vocab_size
    data = torch.randint(0, vocab, (total, a.batch, a.seq), generator=gen)
    baseline = rss_bytes("VmRSS")

    if a.qlora:
        import bitsandbytes
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = LlamaForCausalLM.from_pretrained(
            a.base, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu"
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = LlamaForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    lora = LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        target_modules=TARGETS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    log(f"peft: {params} parameters, {trainable_params} trainable")

    times = []
    loss_value = float("nan")
    for i in range(total):
        ids = data[i]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        loss_value = loss.item()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
        log(
            f"peft lora step {i + 1}/{total}{' (warmup)' if i < a.warmup else ''}: "
            f"loss {loss_value:.4f}, {dt:.3f} s"
        )

    step_s = sum(times) / len(times)
    # ru_maxrss is in KiB on Linux; VmHWM is the same high-water mark.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes("VmHWM"))
    import peft
    import transformers

    out = {
        "impl": "peft-qlora-bnb" if a.qlora else "peft-lora",
        "params": params,
        "trainable_params": trainable_params,
        "step_s": step_s,
        "tokens_per_s": a.batch * a.seq / step_s,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "torch_threads": torch.get_num_threads(),
        "steps": a.steps,
        "warmup": a.warmup,
        "batch": a.batch,
        "seq": a.seq,
        "r": a.r,
        "alpha": a.alpha,
        "final_loss": loss_value if math.isfinite(loss_value) else None,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
    }
    if a.qlora:
        import bitsandbytes

        out["bitsandbytes_version"] = bitsandbytes.__version__
    print(json.dumps(out, separators=(",", ":")), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make-base", metavar="DIR", help="write the 130M base to DIR and stop")
    p.add_argument(
        "--make-base-gqa", metavar="DIR", help="write the Llama-3.2-1B-shaped base and stop"
    )
    p.add_argument("--layers", type=int, default=16, help="--make-base-gqa's layers")
    p.add_argument("--qlora", action="store_true", help="QLoRA with bitsandbytes NF4")
    p.add_argument("--base", metavar="DIR", help="the base folder to fine-tune")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.make_base:
        make_base(a.make_base)
        return
    if a.make_base_gqa:
        make_base_gqa(a.make_base_gqa, a.layers)
        return
    if not a.base:
        p.error("need --make-base DIR or --base DIR")
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.seq < 1 or a.r < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --seq >= 1, --r >= 1")
    train(a)


if __name__ == "__main__":
    main()
