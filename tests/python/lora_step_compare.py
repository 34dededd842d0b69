"""Compares edgepack's first training step (a checkpoint-1 folder: adapter weights after the
step, AdamW moments) with peft_step.py's output. The gradient is recovered from the first
moment (after one step m = (1 - beta1) g).

usage: lora_step_compare.py CHECKPOINT PEFT_STEP.safetensors INIT_ADAPTER

Prints JSON: the worst relative L2 error over tensors of the gradients, of the weights after
the step, and of the update (weights after minus before), and how many tensors were compared."""
import json
import sys

import torch
from safetensors.torch import load_file

ckpt, peft_out, init = sys.argv[1:4]
ours_w = load_file(f"{ckpt}/adapter_model.safetensors")
ours_m = load_file(f"{ckpt}/optimizer.safetensors")
ref = load_file(peft_out)
before = load_file(f"{init}/adapter_model.safetensors")


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


worst = {"grad": 0.0, "weight": 0.0, "update": 0.0}
n = 0
for name, t in ref.items():
    if name.endswith(".grad"):
        continue
    ours_name = name.replace(".default.", ".")
    module = ours_name.removeprefix("base_model.model.").removesuffix(".weight")
    g_ours = ours_m[module + ".exp_avg"] / 0.1
    worst["grad"] = max(worst["grad"], rel(g_ours, ref[name + ".grad"]))
    worst["weight"] = max(worst["weight"], rel(ours_w[ours_name], t))
    b = before[ours_name]
    worst["update"] = max(worst["update"], rel(ours_w[ours_name] - b, t - b))
    n += 1
print(json.dumps({**worst, "tensors": n, "ours": len(ours_w)}))
