"""Runs the same token ids through transformers (the HF folder, float32) and llama.cpp (a GGUF)
and compares the logits at every position. Prints one JSON line.

usage: hf_vs_llama.py HF_DIR MODEL.gguf"""
import json
import sys

import numpy as np
import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM

hf_dir, gguf = sys.argv[1], sys.argv[2]
seqs = [[1, 504, 3200, 17, 9, 42000, 311, 88, 1200, 5], [2, 7, 7, 7, 300, 301, 302, 30000, 12, 1]]
model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
# An F32 KV cache, so only weights and kernels differ (the default cache is F16).
llm = Llama(model_path=gguf, n_ctx=64, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
seqs = [[t % model.config.vocab_size for t in s] for s in seqs]
worst = 0.0
agree = total = 0
for s in seqs:
    with torch.no_grad():
        ref = model(torch.tensor([s])).logits[0].double().numpy()
    llm.reset()
    llm.eval(s)
    got = np.array(llm.scores[: len(s)], dtype=np.float64)
    worst = max(worst, float(np.abs(ref - got).max()))
    agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
    total += len(s)
print(json.dumps({"max_abs_logit_diff": worst, "top1": agree / total,
                  "logit_scale": float(np.abs(ref).max())}))
