"""Loads two HF folders with transformers (both must load) and compares their parameters:
max relative error max|a-b| / max|b| per tensor, and logits on a fixed input. Prints one JSON line.

usage: hf_compare.py OURS REFERENCE"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

a = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
b = AutoModelForCausalLM.from_pretrained(sys.argv[2], torch_dtype=torch.float32)
sa, sb = a.state_dict(), b.state_dict()
worst, worst_name = 0.0, None
missing = sorted(set(sb) - set(sa))
for k, vb in sb.items():
    if k not in sa:
        continue
    va = sa[k]
    if va.shape != vb.shape:
        missing.append(f"{k}: shape {list(va.shape)} vs {list(vb.shape)}")
        continue
    rel = float((va - vb).abs().max() / vb.abs().max().clamp_min(1e-30))
    if rel > worst:
        worst, worst_name = rel, k
ids = torch.tensor([[1, 42, 314, 2718, 10, 7, 99, 1000]])
with torch.no_grad():
    la = a(ids).logits
    lb = b(ids).logits
print(json.dumps({"max_rel_err": worst, "worst": worst_name, "missing": missing,
                  "logits_max_abs_diff": float((la - lb).abs().max())}))
