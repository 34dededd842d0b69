"""Runs an HF folder with transformers in float32 (eager attention, the reference math) on
fixed token ids and writes the logits [n, vocab] as raw little-endian float32 to OUT.
Prints one JSON line with the shape.

With ADAPTER, the model runs with that PEFT LoRA adapter loaded by PEFT itself (unmerged).

usage: hf_logits.py HF_DIR IDS_JSON OUT [ADAPTER]"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], torch_dtype=torch.float32, attn_implementation="eager"
)
if len(sys.argv) > 4:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, sys.argv[4])
model.eval()
ids = torch.tensor([json.loads(sys.argv[2])], dtype=torch.long)
with torch.no_grad():
    logits = model(ids).logits[0].to(torch.float32).numpy()
np.ascontiguousarray(logits, dtype="<f4").tofile(sys.argv[3])
print(json.dumps({"shape": list(logits.shape)}))
