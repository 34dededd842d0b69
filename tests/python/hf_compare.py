"""Loads two HF folders with transformers (both must load) and compares their parameters:
max relative error max|a-b| / max|b| per tensor, and logits on a fixed input. Prints one JSON line.

usage: hf_compare.py OURS REFERENCE [OURS REFERENCE ...]
With several pairs (one process, one import of torch), prints a JSON list, one object a pair."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def compare(ours, reference):
    a = AutoModelForCausalLM.from_pretrained(ours, torch_dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(reference, torch_dtype=torch.float32)
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
    return {"max_rel_err": worst, "worst": worst_name, "missing": missing,
            "logits_max_abs_diff": float((la - lb).abs().max())}


args = sys.argv[1:]
if len(args) < 2 or len(args) % 2:
    raise SystemExit(__doc__)
results = [compare(args[i], args[i + 1]) for i in range(0, len(args), 2)]
print(json.dumps(results[0] if len(results) == 1 else results))
