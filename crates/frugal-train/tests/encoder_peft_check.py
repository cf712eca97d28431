"""Loads an encoder adapter that frugal saved in Hugging Face PEFT and writes its outputs, to
check that PEFT computes what frugal computes (crates/frugal-train/tests/encoder_adapters.rs).

Usage (with the venv that `cargo xtask setup` made, after `pip install peft transformers`):
    $FRUGAL_PYTHON crates/frugal-train/tests/encoder_peft_check.py BASE_DIR ADAPTER_DIR INPUTS_FILE OUT_FILE
BASE_DIR holds a BERT model folder as a frugal masked-LM run writes it (config.json,
model.safetensors), ADAPTER_DIR a PEFT adapter (adapter_config.json, adapter_model.safetensors).
The adapter's task_type chooses the model: SEQ_CLS a BertForSequenceClassification (its number
of labels from the adapter's saved classifier), otherwise (null) a BertForMaskedLM. INPUTS_FILE
is a safetensors file with int64 tensors: masked LM `ids` (batch, seq) and `labels` (-100:
ignored); classification `ids`, `token_types`, `attention_mask` (batch, seq) and `labels`
(batch,). It writes the PeftModel's eval-mode `logits` and `loss` (f32) into OUT_FILE.
It fails (exit 1, message on stderr) when anything does not load, or when the adapter file's
tensors are not exactly the ones PEFT holds after loading (a key PEFT ignored, or a tensor it
left at its initial value).
Checked with torch 2.11.0, transformers 5.25.0, peft 0.21.2.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")


def fail(msg):
    print(f"encoder_peft_check: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 5:
        fail("usage: encoder_peft_check.py BASE_DIR ADAPTER_DIR INPUTS_FILE OUT_FILE")
    base_dir, adapter_dir, inputs_file, out_file = sys.argv[1:]
    try:
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import BertForMaskedLM, BertForSequenceClassification
        from transformers.utils import logging as hf_logging
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except Exception as e:  # noqa: BLE001
        fail(f"cannot import torch/safetensors/transformers/peft: {e!r}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for p in (base_dir, adapter_dir):
        if not os.path.isdir(p):
            fail(f"not a directory: {p}")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            config = json.load(f)
        saved = load_file(weights)
    except Exception as e:  # noqa: BLE001
        fail(f"cannot read the adapter in {adapter_dir}: {e!r}")
    classifier = config.get("task_type") == "SEQ_CLS"
    try:
        if classifier:
            num_labels = saved["base_model.model.classifier.weight"].shape[0]
            model = BertForSequenceClassification.from_pretrained(
                base_dir, num_labels=num_labels, dtype=torch.float32
            )
        else:
            model = BertForMaskedLM.from_pretrained(base_dir, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        fail(f"cannot load the base model from {base_dir}: {e!r}")
    try:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    except Exception as e:  # noqa: BLE001
        fail(f"PEFT cannot load the adapter in {adapter_dir}: {e!r}")
    # PEFT only warns about keys it could not place; make that an error.
    held = get_peft_model_state_dict(model)
    missing = sorted(set(held) - set(saved))
    unexpected = sorted(set(saved) - set(held))
    if missing or unexpected:
        fail(f"adapter keys do not match PEFT's: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in saved.items():
        if tuple(v.shape) != tuple(held[k].shape):
            fail(f"{k}: shape {tuple(v.shape)} in the file, PEFT expects {tuple(held[k].shape)}")
        if not torch.equal(v.float(), held[k].detach().float().cpu()):
            fail(f"{k}: PEFT's value after loading differs from the file's")
    try:
        inputs = load_file(inputs_file)
        ids = inputs["ids"].long()
        labels = inputs["labels"].long()
        with torch.no_grad():
            if classifier:
                out = model(
                    input_ids=ids,
                    token_type_ids=inputs["token_types"].long(),
                    attention_mask=inputs["attention_mask"].long(),
                    labels=labels,
                )
            else:
                out = model(input_ids=ids, labels=labels)
        tensors = {
            "logits": out.logits.float().contiguous(),
            "loss": out.loss.float().reshape(1).contiguous(),
        }
        save_file(tensors, out_file, metadata={"format": "pt"})
    except Exception as e:  # noqa: BLE001
        fail(f"forward pass or writing {out_file} failed: {e!r}")
    print(f"encoder_peft_check: wrote logits {tuple(tensors['logits'].shape)} to {out_file}")


if __name__ == "__main__":
    main()
