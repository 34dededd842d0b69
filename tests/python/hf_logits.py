"""Runs HF folders with transformers in float32 (eager attention, the reference math) on
fixed token ids and writes each one's logits [n, vocab] as raw little-endian float32.
Prints one JSON line with the shapes.

    hf_logits.py HF_DIR IDS_JSON OUT [ADAPTER]
        one folder; with ADAPTER, the model runs with that PEFT LoRA adapter loaded by PEFT
        itself (unmerged)
    hf_logits.py --many IDS_JSON HF_DIR OUT [HF_DIR OUT ...]
        several folders in one process (transformers is imported once)"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def logits(folder, ids, out, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, attn_implementation="eager"
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        x = model(torch.tensor([ids], dtype=torch.long)).logits[0].to(torch.float32).numpy()
    np.ascontiguousarray(x, dtype="<f4").tofile(out)
    return list(x.shape)


if sys.argv[1] == "--many":
    ids = json.loads(sys.argv[2])
    pairs = sys.argv[3:]
    if not pairs or len(pairs) % 2:
        sys.exit("usage: hf_logits.py --many IDS_JSON HF_DIR OUT [HF_DIR OUT ...]")
    shapes = [logits(pairs[i], ids, pairs[i + 1]) for i in range(0, len(pairs), 2)]
    print(json.dumps({"shapes": shapes}))
else:
    adapter = sys.argv[4] if len(sys.argv) > 4 else None
    shape = logits(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], adapter)
    print(json.dumps({"shape": shape}))
