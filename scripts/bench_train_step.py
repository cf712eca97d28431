"""Plain-PyTorch reference for `cargo xtask bench train-step`.

Trains the LLaMA 60M configuration (d_model 512, 8 layers, 8 heads, SwiGLU ffn 1376, vocab 32000,
RMSNorm eps 1e-6, rotate-half RoPE theta 10000, no biases, untied lm_head, causal
scaled_dot_product_attention) in f32 on the CPU with AdamW and gradient clipping, on random token
batches, and measures seconds per step, tokens/s and resident memory.

Run with the venv python that `cargo xtask setup` provides (`$FRUGAL_PYTHON`):

    $FRUGAL_PYTHON scripts/bench_train_step.py --steps 8 --warmup 2 --batch 4 --seq 256

It prints exactly one line of JSON on stdout (everything else goes to stderr):

    {"impl":"pytorch","params":..,"step_s":..,"tokens_per_s":..,"baseline_rss_bytes":..,
     "peak_rss_bytes":..,"torch_threads":..}
"""

import argparse
import json
import math
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*[Nn]um[Pp]y.*")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The LLaMA 60M configuration.
VOCAB = 32000
D_MODEL = 512
N_LAYERS = 8
N_HEADS = 8
FFN = 1376
NORM_EPS = 1e-6
ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq, head_dim, theta):
    """cos and sin tables of shape (seq, head_dim) for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(seq, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_heads = N_HEADS
        self.head_dim = D_MODEL // N_HEADS
        self.q_proj = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.k_proj = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.v_proj = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.o_proj = nn.Linear(D_MODEL, D_MODEL, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, D_MODEL))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D_MODEL, FFN, bias=False)
        self.up_proj = nn.Linear(D_MODEL, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, D_MODEL, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm = RMSNorm(D_MODEL, NORM_EPS)
        self.attn = Attention()
        self.mlp_norm = RMSNorm(D_MODEL, NORM_EPS)
        self.mlp = SwiGLU()

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, max_seq):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.layers = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.norm = RMSNorm(D_MODEL, NORM_EPS)
        self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False)
        cos, sin = rope_tables(max_seq, D_MODEL // N_HEADS, ROPE_THETA)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens):
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.seq < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --seq >= 1")

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    total = a.warmup + a.steps
    # One (batch, seq + 1) batch per step: inputs are the first seq tokens, targets the last seq.
    data = torch.randint(0, VOCAB, (total, a.batch, a.seq + 1), generator=gen)
    baseline = rss_bytes("VmRSS")

    model = Llama(a.seq)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    )
    model.train()

    times = []
    loss_value = float("nan")
    for i in range(total):
        batch = data[i]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
        print(
            f"pytorch step {i + 1}/{total}{' (warmup)' if i < a.warmup else ''}: "
            f"loss {loss_value:.4f}, {dt:.3f} s",
            file=sys.stderr,
        )

    step_s = sum(times) / len(times)
    # ru_maxrss is in KiB on Linux; VmHWM is the same high-water mark.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes("VmHWM"))
    out = {
        "impl": "pytorch",
        "params": params,
        "step_s": step_s,
        "tokens_per_s": a.batch * a.seq / step_s,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "torch_threads": torch.get_num_threads(),
        "steps": a.steps,
        "warmup": a.warmup,
        "batch": a.batch,
        "seq": a.seq,
        "final_loss": loss_value if math.isfinite(loss_value) else None,
        "torch_version": torch.__version__,
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
