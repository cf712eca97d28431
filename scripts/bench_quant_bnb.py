"""bitsandbytes' NF4 CPU kernel, timed for `cargo xtask bench quant`.

For each weight shape (out x in) and batch, a `bnb.nn.Linear4bit(in, out, bias=False,
quant_type="nf4")` is quantized on the CPU, switched to `.eval()` (its first forward under
torch.no_grad converts the weight to bitsandbytes' packed CPU layout when the CPU has
AVX512-BF16), and timed: median seconds per forward over --runs calls after --warmup calls, with
float32 and with bfloat16 activations. Prints one JSON line, {"bnb": {"OUTxIN bB f32|bf16":
seconds}, "version", "torch", "threads", "packed_cpu_layout"}; when bitsandbytes cannot be
imported or fails, prints {"bnb": null, "reason": ...} so that the benchmark still runs.
"""

import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help="OUTxIN,...")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    try:
        import torch
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        print(json.dumps({"bnb": None, "reason": f"import failed: {e!r}"}))
        return 0
    try:
        torch.manual_seed(0)
        out = {}
        for shape in args.shapes.split(","):
            o, i = (int(v) for v in shape.split("x"))
            layer = bnb.nn.Linear4bit(i, o, bias=False, quant_type="nf4")
            with torch.no_grad():
                layer.weight.data.normal_(0.0, 0.02)
            layer = layer.to("cpu").eval()
            for b in (int(v) for v in args.batches.split(",")):
                for dt_name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
                    x = torch.randn(b, i).to(dt)
                    layer.compute_type_is_set = False
                    times = []
                    with torch.no_grad():
                        for k in range(args.warmup + args.runs):
                            t0 = time.perf_counter()
                            layer(x)
                            t = time.perf_counter() - t0
                            if k >= args.warmup:
                                times.append(t)
                    out[f"{shape} b{b} {dt_name}"] = statistics.median(times)
            packed = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
        print(
            json.dumps(
                {
                    "bnb": out,
                    "version": bnb.__version__,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "packed_cpu_layout": packed,
                }
            )
        )
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"bnb": None, "reason": f"bitsandbytes failed: {e!r}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
