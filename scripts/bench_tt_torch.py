"""PyTorch references for `cargo xtask bench tt`: one TT linear layer, forward + backward.

One configuration per process (`--impl`):

- `same-order`: plain PyTorch that contracts as `frugal_tt::TtLinear` does. Cores
  `G_k (r_{k-1}, n_k, r_k)` over the input modes then the output modes, CoMERA's initialisation
  and ranks (every inner rank `--rank` capped by the unfoldings), rank variables (ones) on every
  inner bond; each step builds `L` (in, r) from the input cores and `R` (r, out) from the output
  cores (the effective cores `G_k diag(d_k)` contracted left to right), then `Y = (X L) R + b`,
  all under autograd.
- `tltorch`: tensorly-torch's `FactorizedLinear` with its TT factorization. `FactorizedLinear`
  has no plain `'tt'` factorization (its registry holds dense, cp, tucker and blocktt); its TT
  layer is `factorization='blocktt'`, a TT-matrix (cores `(r, out_k, in_k, r)` pairing input and
  output modes) at `rank=--rank` (ranks `[1, r, .., r, 1]`), `implementation='factorized'`
  (the input contracted with the cores by one `tl.einsum`). `--einsum` picks how that einsum
  runs: `opt-einsum` (`tensorly.plugins.use_opt_einsum()`, opt_einsum's 'auto-hq' path, cached),
  `torch` (tensorly's default: `torch.einsum`, which uses opt_einsum's 'auto' path when it is
  installed) or `none` (`torch.einsum` with `torch.backends.opt_einsum.enabled = False`: left to
  right, as without opt_einsum).
- `dense`: `torch.nn.Linear`, for a check against tch's dense layer.

A step is `y = layer(x)`, `loss = mean(y**2)`, `loss.backward()` on a `(--tokens, in)` f32 input
that requires grad; gradients are set to None before each step, outside the timing. The idle
baseline is the resident memory after torch (and tltorch) are imported and one small product and
its backward have run, before the layer and the input exist; the peak is `VmHWM`.

    $FRUGAL_PYTHON scripts/bench_tt_torch.py --impl same-order --in-modes 12,8,8 \
        --out-modes 8,8,12 --rank 30 --tokens 4096 --steps 10 --warmup 2 --threads 2

It prints one JSON line on stdout: `{"impl", "einsum", "in", "out", "params", "dense_params",
"ranks", "forward_s", "step_s" (mean), "step_median_s", "step_times_s", "baseline_rss_bytes", "peak_rss_bytes",
"torch_threads", "loss", ...}` (`params`: the weight's parameters, bias excluded), or, when a
package is missing, `{"error": "..."}` and exit code 3.
"""

import argparse
import json
import math
import statistics
import sys
import time


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


def fail(message, code=3):
    print(json.dumps({"error": message}), flush=True)
    print(f"bench_tt_torch.py: {message}", file=sys.stderr)
    sys.exit(code)


def modes(text):
    return [int(m) for m in text.split(",") if m.strip()]


def capped_ranks(all_modes, rank):
    """`[1, r_1, .., 1]`: every inner rank `rank` capped by its unfoldings (frugal_tt's rule)."""
    d = len(all_modes)
    ranks = [1] * (d + 1)
    for k in range(1, d):
        left = math.prod(all_modes[:k])
        right = math.prod(all_modes[k:])
        ranks[k] = min(rank, left, right)
    return ranks


def contract_chain(torch, cores):
    """Cores `(r0, n, r1)` contracted left to right into `(prod n, r_last)`."""
    acc = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        r0, r1 = core.shape[0], core.shape[-1]
        acc = (acc @ core.reshape(r0, -1)).reshape(-1, r1)
    return acc


def same_order_layer(torch, in_modes, out_modes, rank):
    """CoMERA's TT linear layer, contracted as `(X L) R`; returns (module, params, ranks)."""
    nn = torch.nn
    all_modes = in_modes + out_modes
    ranks = capped_ranks(all_modes, rank)
    in_dim, out_dim = math.prod(in_modes), math.prod(out_modes)
    target = math.sqrt(1.0 / (in_dim + out_dim))
    scale = target ** (1.0 / len(all_modes))

    class SameOrderTt(nn.Module):
        def __init__(self):
            super().__init__()
            self.cores = nn.ParameterList(
                nn.Parameter(
                    torch.randn(ranks[k], n, ranks[k + 1]) * (scale / math.sqrt(ranks[k + 1]))
                )
                for k, n in enumerate(all_modes)
            )
            self.rank_vars = nn.ParameterList(
                nn.Parameter(torch.ones(r)) for r in ranks[1:-1]
            )
            self.bias = nn.Parameter(torch.zeros(out_dim))
            self.a = len(in_modes)

        def forward(self, x):
            eff = [
                core * self.rank_vars[k] if k < len(self.rank_vars) else core
                for k, core in enumerate(self.cores)
            ]
            left = contract_chain(torch, eff[: self.a])
            r_mid = left.shape[1]
            right = contract_chain(torch, eff[self.a:]).reshape(r_mid, out_dim)
            return (x.reshape(-1, in_dim) @ left) @ right + self.bias

    layer = SameOrderTt()
    params = sum(c.numel() for c in layer.cores)
    return layer, params, ranks


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["same-order", "tltorch", "dense"], required=True)
    p.add_argument("--einsum", choices=["opt-einsum", "torch", "none"], default="opt-einsum",
                   help="tltorch only: how its einsum runs")
    p.add_argument("--in-modes", type=modes, required=True)
    p.add_argument("--out-modes", type=modes, required=True)
    p.add_argument("--rank", type=int, default=30)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.tokens < 1 or a.rank < 1:
        p.error("need --steps >= 1, --warmup >= 0, --tokens >= 1, --rank >= 1")
    if len(a.in_modes) < 2 or len(a.out_modes) < 2:
        p.error("at least 2 input and 2 output modes")

    try:
        import torch
    except ImportError as e:
        fail(f"torch is not importable by {sys.executable} ({e}): run cargo xtask setup")
    versions = {"torch_version": torch.__version__}
    if a.impl == "tltorch":
        try:
            import tensorly
            import tltorch
            from tensorly import plugins
        except ImportError as e:
            fail(f"tltorch is not installed in {sys.executable} ({e}): run "
                 f"{sys.executable} -m pip install tensorly-torch opt_einsum")
        versions["tensorly_version"] = tensorly.__version__
        versions["tltorch_version"] = getattr(tltorch, "__version__", "unknown")
        if a.einsum != "none":
            try:
                import opt_einsum
            except ImportError:
                fail(f"opt_einsum is not installed in {sys.executable}: run "
                     f"{sys.executable} -m pip install opt_einsum")
            versions["opt_einsum_version"] = opt_einsum.__version__
        if a.einsum == "opt-einsum":
            plugins.use_opt_einsum()
        elif a.einsum == "none":
            torch.backends.opt_einsum.enabled = False

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # Start torch (allocator, thread pool, autograd engine) before the baseline.
    warm = torch.ones(64, 64, requires_grad=True)
    (warm @ warm).sum().backward()
    del warm
    baseline = rss_bytes("VmRSS")

    in_dim, out_dim = math.prod(a.in_modes), math.prod(a.out_modes)
    dense_params = in_dim * out_dim
    ranks = []
    if a.impl == "same-order":
        layer, params, ranks = same_order_layer(torch, a.in_modes, a.out_modes, a.rank)
    elif a.impl == "tltorch":
        layer = tltorch.FactorizedLinear(
            tuple(a.in_modes), tuple(a.out_modes), bias=True, factorization="blocktt",
            rank=a.rank, implementation="factorized",
        )
        params = sum(f.numel() for f in layer.weight.factors)
        ranks = [int(r) for r in layer.weight.rank]
    else:
        layer = torch.nn.Linear(in_dim, out_dim)
        params = dense_params
    layer.train()
    x = torch.randn(a.tokens, in_dim, requires_grad=True)

    forward, steps = [], []
    loss_value = float("nan")
    total = a.warmup + a.steps
    for i in range(total):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        y = layer(x)
        loss = (y * y).mean()
        t1 = time.perf_counter() - t0
        loss.backward()
        t2 = time.perf_counter() - t0
        loss_value = loss.item()
        del y, loss
        if i >= a.warmup:
            forward.append(t1)
            steps.append(t2)
        print(
            f"bench_tt_torch {a.impl} {in_dim}->{out_dim} step {i + 1}/{total}"
            f"{' (warmup)' if i < a.warmup else ''}: {t2 * 1e3:.1f} ms",
            file=sys.stderr,
        )

    peak = rss_bytes("VmHWM")
    try:
        import resource

        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    except ImportError:
        pass
    out = {
        "impl": a.impl,
        "einsum": a.einsum if a.impl == "tltorch" else None,
        "in": in_dim,
        "out": out_dim,
        "in_modes": a.in_modes,
        "out_modes": a.out_modes,
        "rank": a.rank,
        "tokens": a.tokens,
        "params": params,
        "dense_params": dense_params,
        "ranks": ranks,
        "forward_s": sum(forward) / len(forward),
        "step_s": sum(steps) / len(steps),
        "step_median_s": statistics.median(steps),
        "step_times_s": steps,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "torch_threads": torch.get_num_threads(),
        "steps": a.steps,
        "warmup": a.warmup,
        "loss": loss_value if math.isfinite(loss_value) else None,
        **versions,
    }
    print(json.dumps(out, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
