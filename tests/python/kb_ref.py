"""The reference for a knowledge base: its chunk texts (read from edgepack's kb.safetensors)
and the questions embedded with transformers as sentence-transformers does (last hidden
states mean-pooled over the attention mask, L2-normalised, float32), then exact search with
numpy. Prints JSON on its last line: the smallest cosine between edgepack's stored f32 vectors and these
embeddings, and per question the indices and scores of the best `K + 1` chunks.

usage: kb_ref.py MODEL_DIR KB_FILE QUESTIONS_JSON K"""
import json
import sys

import numpy as np

from rag_peer import encoder, read_kb, texts_of

model_dir, kb_file, questions_json, k = sys.argv[1:5]
k = int(k)
t, meta = read_kb(kb_file)
chunks = texts_of(t)
embed = encoder(model_dir, meta["embedder"]["max_seq"])
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
