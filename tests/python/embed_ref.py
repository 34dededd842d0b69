"""Sentence embeddings of a sentence-transformers BERT folder computed with transformers: the
token embeddings of the last layer, mean-pooled and L2-normalized (sentence-transformers'
Pooling + Normalize modules), float32. Prints one JSON line {"embeddings": [[...], ...]}.

usage: embed_ref.py MODEL_DIR SENTENCES_JSON"""
import json
import sys

import torch
from transformers import AutoModel, AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModel.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
model.eval()
out = []
for s in json.loads(sys.argv[2]):
    enc = tok(s, return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad():
        h = model(**enc).last_hidden_state[0]
    v = h.mean(dim=0)
    v = v / v.norm()
    out.append(v.tolist())
print(json.dumps({"embeddings": out}))
