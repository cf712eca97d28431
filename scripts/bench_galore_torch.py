"""galore-torch reference for `cargo xtask bench galore`.

Trains a LLaMA preset of GaLore's paper (Lialin et al. configs: RMSNorm eps 1e-6, SwiGLU, RoPE,
no biases, untied head, vocabulary 32000) as a Hugging Face `transformers.LlamaForCausalLM` in
f32 on the CPU, on random token batches, with one of:

- `adamw`: `torch.optim.AdamW`, gradient clipping at 1.0;
- `galore_adamw`, `galore_adamw8bit`: galore-torch's optimizers, GaLore on the attention and MLP
  weights (the `nn.Linear` modules whose name holds "attn" or "mlp", as in their
  torchrun_main.py), the plain optimizer on the rest; clipping at 1.0;
- `galore_adamw8bit_per_layer`: their per-layer mode (torchrun_main.py `--optimizer
  galore_adamw8bit_per_layer`): one `GaLoreAdamW8bit` per GaLore weight (with
  `update_proj_gap * 2`, as they do) and one `bnb.optim.Adam8bit` per other parameter, each
  stepped and its gradient dropped in a `register_post_accumulate_grad_hook`; no clipping (the
  gradients are gone before it could run).

It measures seconds per step (the first `--warmup` steps untimed), the resident memory after
torch, transformers, bitsandbytes and galore-torch are imported and the data is ready (before the
model: the idle baseline), the peak resident memory (`resource.getrusage`), and the bytes of
weights, gradients and optimizer state (state tensors of every optimizer, their 8-bit maps and
the projection matrices), and the seconds its projectors spend computing bases (`svd_s`, all
steps). galore-torch calls `torch.cuda.synchronize()` inside its 8-bit step;
without CUDA that call is replaced by a no-op. `--svd lowrank` replaces the exact SVD of its
projector by `torch.svd_lowrank` (for the 1B preset, where one exact SVD takes about 20 s on two
CPU cores).

Run with the venv python that `cargo xtask setup` provides (`$FRUGAL_PYTHON`):

    $FRUGAL_PYTHON scripts/bench_galore_torch.py --size 60m --batch 1 --seq 256 \
        --steps 3 --warmup 1 --optimizer galore_adamw8bit_per_layer --rank 128

It prints exactly one line of JSON on stdout (everything else goes to stderr):

    {"impl":"galore-torch","optimizer":..,"params":..,"step_s":..,"tokens_per_s":..,
     "baseline_rss_bytes":..,"peak_rss_bytes":..,"weight_bytes":..,"gradient_bytes":..,
     "optimizer_state_bytes":..,"svd_s":..,"torch_threads":..,...}
"""

import argparse
import json
import math
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():
    # galore-torch's GaLoreAdamW8bit.step calls torch.cuda.synchronize() unconditionally.
    torch.cuda.synchronize = lambda *args, **kwargs: None

import bitsandbytes as bnb  # noqa: E402
import transformers  # noqa: E402
from galore_torch import GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402

VOCAB = 32000
# d_model, layers, heads, ffn (GaLore's / Lialin et al.'s LLaMA configs).
PRESETS = {
    "60m": (512, 8, 8, 1376),
    "130m": (768, 12, 12, 2048),
    "350m": (1024, 24, 16, 2736),
    "1b": (2048, 24, 32, 5461),
}
OPTIMIZERS = ["adamw", "galore_adamw", "galore_adamw8bit", "galore_adamw8bit_per_layer"]


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


def tensor_bytes(t):
    return t.numel() * t.element_size()


def build_model(size, seq):
    d, layers, heads, ffn = PRESETS[size]
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(1024, seq),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
    )
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config)


def galore_weights(model):
    """The weights GaLore projects: `nn.Linear` modules named with "attn" or "mlp"."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(k in name for k in ("attn", "mlp")):
            out.append(module.weight)
    return out


def use_lowrank_svd():
    """Makes galore-torch's projector take its basis from `torch.svd_lowrank`.

    Same slicing as `GaLoreProjector.get_orthogonal_matrix` (f32 weights): `right` keeps the
    first `rank` rows of Vh, `left` the first `rank` columns of U, `full` both.
    """
    from galore_torch.galore_projector import GaLoreProjector

    def get_orthogonal_matrix(self, weights, rank, type):
        matrix = weights.data.float()
        q = min(rank + 8, *matrix.shape)
        U, _, V = torch.svd_lowrank(matrix, q=q, niter=2)
        A, B = U[:, :rank], V[:, :rank].T
        dtype = weights.data.dtype
        if type == "right":
            return B.to(dtype)
        if type == "left":
            return A.to(dtype)
        if type == "full":
            return [A.to(dtype), B.to(dtype)]
        raise ValueError("type should be left, right or full")

    GaLoreProjector.get_orthogonal_matrix = get_orthogonal_matrix


SVD_SECONDS = [0.0]


def time_bases():
    """Adds the seconds galore-torch's projector spends computing bases to SVD_SECONDS."""
    from galore_torch.galore_projector import GaLoreProjector

    inner = GaLoreProjector.get_orthogonal_matrix

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            SVD_SECONDS[0] += time.perf_counter() - t0

    GaLoreProjector.get_orthogonal_matrix = timed


def optimizer_state_bytes(optimizers):
    """Bytes of every tensor in the optimizers' states, projection matrices included."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    total += tensor_bytes(value)
                elif hasattr(value, "ortho_matrix"):
                    m = value.ortho_matrix
                    for t in m if isinstance(m, (list, tuple)) else [m]:
                        if torch.is_tensor(t):
                            total += tensor_bytes(t)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(PRESETS), default="60m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="galore_adamw8bit_per_layer")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--update-proj-gap", type=int, default=200)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--proj-type", default="std")
    p.add_argument(
        "--svd",
        choices=["exact", "lowrank"],
        default="exact",
        help="exact: galore-torch's torch.linalg.svd; lowrank: torch.svd_lowrank (rank + 8 "
        "columns, 2 power iterations) patched into its projector, for sizes where the exact "
        "SVD takes too long on a CPU",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.seq < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --seq >= 1")

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.svd == "lowrank":
        use_lowrank_svd()
    time_bases()
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    total = a.warmup + a.steps
    # One (batch, seq + 1) batch per step: inputs are the first seq tokens, targets the last seq.
    data = torch.randint(0, VOCAB, (total, a.batch, a.seq + 1), generator=gen)
    baseline = rss_bytes("VmRSS")

    model = build_model(a.size, a.seq)
    if a.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    params = list(model.parameters())
    n_params = sum(t.numel() for t in params)
    weight_bytes = sum(tensor_bytes(t) for t in params)

    galore = galore_weights(model)
    galore_ids = {id(t) for t in galore}
    regular = [t for t in params if id(t) not in galore_ids]
    group = {"rank": a.rank, "update_proj_gap": a.update_proj_gap, "scale": a.scale,
             "proj_type": a.proj_type}
    betas = (0.9, 0.95)
    per_layer = a.optimizer == "galore_adamw8bit_per_layer"
    largest_grad = [0]
    if a.optimizer == "adamw":
        optimizers = [torch.optim.AdamW(params, lr=a.lr, betas=betas, eps=1e-8, weight_decay=0.0)]
    elif a.optimizer == "galore_adamw":
        groups = [{"params": regular}, {"params": galore, **group}]
        optimizers = [GaLoreAdamW(groups, lr=a.lr, betas=betas, weight_decay=0.0)]
    elif a.optimizer == "galore_adamw8bit":
        groups = [{"params": regular}, {"params": galore, **group}]
        optimizers = [GaLoreAdamW8bit(groups, lr=a.lr, betas=betas, weight_decay=0.0)]
    else:
        per_param = {}
        for t in params:
            if id(t) in galore_ids:
                g = dict(group, update_proj_gap=a.update_proj_gap * 2)
                per_param[t] = GaLoreAdamW8bit(
                    [{"params": [t], **g}], lr=a.lr, betas=betas, weight_decay=0.0
                )
            else:
                per_param[t] = bnb.optim.Adam8bit([t], lr=a.lr, betas=betas, weight_decay=0.0)

        def hook(t):
            if t.grad is None:
                return
            largest_grad[0] = max(largest_grad[0], tensor_bytes(t.grad))
            per_param[t].step()
            per_param[t].zero_grad(set_to_none=True)

        for t in params:
            t.register_post_accumulate_grad_hook(hook)
        optimizers = list(per_param.values())

    times = []
    loss_value = float("nan")
    grad_bytes = 0
    for i in range(total):
        batch = data[i]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        t0 = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))
        del logits
        loss.backward()
        if not per_layer:
            grad_bytes = max(grad_bytes, sum(tensor_bytes(t.grad) for t in params
                                             if t.grad is not None))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
        loss_value = loss.item()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
        print(
            f"galore-torch {a.optimizer} {a.size} step {i + 1}/{total}"
            f"{' (warmup)' if i < a.warmup else ''}: loss {loss_value:.4f}, {dt:.3f} s",
            file=sys.stderr,
        )
    if per_layer:
        # At most one parameter's gradient is alive at a time in this mode.
        grad_bytes = largest_grad[0]

    step_s = sum(times) / len(times)
    # ru_maxrss is in KiB on Linux; VmHWM is the same high-water mark.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes("VmHWM"))
    out = {
        "impl": "galore-torch",
        "optimizer": a.optimizer,
        "size": a.size,
        "params": n_params,
        "galore_params": sum(t.numel() for t in galore),
        "step_s": step_s,
        "tokens_per_s": a.batch * a.seq / step_s,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "weight_bytes": weight_bytes,
        "gradient_bytes": grad_bytes,
        "optimizer_state_bytes": optimizer_state_bytes(optimizers),
        "svd_s": SVD_SECONDS[0],
        "torch_threads": torch.get_num_threads(),
        "steps": a.steps,
        "warmup": a.warmup,
        "batch": a.batch,
        "seq": a.seq,
        "rank": a.rank,
        "svd": a.svd,
        "final_loss": loss_value if math.isfinite(loss_value) else None,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "bitsandbytes_version": bnb.__version__,
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
