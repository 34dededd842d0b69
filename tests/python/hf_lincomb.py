"""Checks that OURS = BASE + wa·(A - BASE) + wb·(B - BASE) parameter by parameter, where A and B
are PEFT's merges of two adapters alone. Prints one JSON line with the max relative error.

usage: hf_lincomb.py OURS BASE A B WA WB"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

load = lambda p: AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float64).state_dict()
ours, base, a, b = (load(p) for p in sys.argv[1:5])
wa, wb = float(sys.argv[5]), float(sys.argv[6])
worst = 0.0
for k, v in base.items():
    want = v + wa * (a[k] - v) + wb * (b[k] - v)
    rel = float((ours[k] - want).abs().max() / want.abs().max().clamp_min(1e-30))
    worst = max(worst, rel)
print(json.dumps({"max_rel_err": worst}))
