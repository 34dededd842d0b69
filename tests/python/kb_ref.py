"""The reference for a knowledge base: its chunk texts (read from edgepack's kb.safetensors)
and the questions embedded with transformers as sentence-transformers does (last hidden
states mean-pooled over the attention mask, L2-normalised, float32), then exact search with
numpy. Prints JSON on its last line: the smallest cosine between edgepack's stored f32 vectors and these
embeddings, and per question the indices and scores of the best `K + 1` chunks.

usage: kb_ref.py MODEL_DIR KB_FILE QUESTIONS_JSON K"""
import json
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

model_dir, kb_file, questions_json, k = sys.argv[1:5]
k = int(k)
t = load_file(kb_file)
text = t["text"].tobytes()
offsets = t["text_offsets"]
chunks = [text[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
with safe_open(kb_file, "np") as f:
    meta = json.loads(f.metadata()["edgepack_kb"])

tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32)
model.eval()


def embed(texts):
    out = []
    for i in range(0, len(texts), 32):
        enc = tok(texts[i:i + 32], return_tensors="pt", padding=True, truncation=True,
                  max_length=meta["embedder"]["max_seq"])
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
        v = v / v.norm(dim=1, keepdim=True)
        out.append(v.numpy())
    return np.concatenate(out)


ref = embed(chunks)
result = {"chunks": len(chunks)}
if meta["precision"] == "f32":
    ours = t["vectors"].astype(np.float32)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    result["min_cosine"] = float(cos.min())
questions = json.load(open(questions_json))
q = embed(questions)
scores = q @ ref.T
top = []
for s in scores:
    idx = np.argsort(-s, kind="stable")[:k + 1]
    top.append({"indices": idx.tolist(), "scores": s[idx].tolist()})
result["top"] = top
print(json.dumps(result))
