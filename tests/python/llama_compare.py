"""Runs two GGUF models (each optionally with a runtime LoRA) in llama.cpp over fixed prompts
and compares next-token distributions at every position: top-1 agreement, mean KL(a||b), max
abs logit difference. Prints one JSON line.

usage: llama_compare.py A.gguf B.gguf [--lora-a X.gguf] [--lora-b Y.gguf]"""
import argparse
import json

import numpy as np
from llama_cpp import Llama

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis converts light energy into chemical energy. The main products are",
    "1, 2, 3, 5, 8, 13, 21,",
]

ap = argparse.ArgumentParser()
ap.add_argument("a")
ap.add_argument("b")
ap.add_argument("--lora-a")
ap.add_argument("--lora-b")
args = ap.parse_args()


def logits(path, lora):
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                lora_path=lora, n_batch=256)
    outs = []
    for p in PROMPTS:
        toks = llm.tokenize(p.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(toks)
        outs.append(np.array(llm.scores[: len(toks)], dtype=np.float64))
    del llm
    return outs


la = logits(args.a, args.lora_a)
lb = logits(args.b, args.lora_b)
agree = total = 0
kls = []
maxdiff = 0.0
for x, y in zip(la, lb):
    agree += int((x.argmax(-1) == y.argmax(-1)).sum())
    total += x.shape[0]
    px = np.exp(x - x.max(-1, keepdims=True)); px /= px.sum(-1, keepdims=True)
    lpx = np.log(px + 1e-30)
    py = np.exp(y - y.max(-1, keepdims=True)); py /= py.sum(-1, keepdims=True)
    lpy = np.log(py + 1e-30)
    kls.extend((px * (lpx - lpy)).sum(-1).tolist())
    maxdiff = max(maxdiff, float(np.abs(x - y).max()))
print(json.dumps({"positions": total, "top1": agree / total, "mean_kl": float(np.mean(kls)),
                  "max_kl": float(np.max(kls)), "max_abs_logit_diff": maxdiff}))
