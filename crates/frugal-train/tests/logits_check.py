"""Scores the ids of a `frugal eval --logits FILE` with transformers and prints the largest
absolute difference between transformers' logits and Frugal's.

Usage: logits_check.py MODEL_DIR LOGITS_FILE
MODEL_DIR is a Hugging Face model folder (config.json, model.safetensors); LOGITS_FILE holds
`input_ids` (N, T) and `logits` (N, T, vocabulary) in f32. Exits 1 with a message on stderr when
anything does not load or the shapes disagree. Checked with torch 2.11.0, transformers 5.25.0.
"""
import sys


def fail(msg):
    print(f"logits_check: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 3:
        fail("usage: logits_check.py MODEL_DIR LOGITS_FILE")
    model_dir, logits_file = sys.argv[1:]
    try:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
    except Exception as e:  # noqa: BLE001
        fail(f"cannot import torch/safetensors/transformers: {e!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got = load_file(logits_file)
    with torch.no_grad():
        want = model(input_ids=got["input_ids"]).logits.float()
    if want.shape != got["logits"].shape:
        fail(f"shapes differ: transformers {tuple(want.shape)}, frugal {tuple(got['logits'].shape)}")
    print((want - got["logits"]).abs().max().item())


if __name__ == "__main__":
    main()
