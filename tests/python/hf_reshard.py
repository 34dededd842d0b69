"""Saves an HF model again with transformers, sharded into pieces of at most SIZE
(model-0000x-of-0000y.safetensors + model.safetensors.index.json).

usage: hf_reshard.py SRC DST SIZE"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

src, dst, size = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
m.save_pretrained(dst, max_shard_size=size, safe_serialization=True)
for f in Path(src).glob("tokenizer*"):
    shutil.copy(f, dst)
shards = sorted(p.name for p in Path(dst).glob("model-*.safetensors"))
print(json.dumps({"shards": shards}))
