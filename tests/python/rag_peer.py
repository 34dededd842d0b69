"""The peers of `cargo xtask bench rag`, on the same knowledge base file edgepack wrote.

usage:
  rag_peer.py embed MODEL_DIR KB_FILE
      embeds every chunk text of the kb with transformers as sentence-transformers does
      (batches of 32, mean pooling over the attention mask, L2 norm); prints chunks, seconds
  rag_peer.py synth KB_FILE N OUT_DIR
      writes OUT_DIR/kb.safetensors with N chunks: the kb's own chunks repeated, each vector
      moved by a little noise and renormalised, stored as int8 with a scale per vector the
      way edgepack stores them (so edgepack reads it as any kb)
  rag_peer.py search MODEL_DIR KB_FILE QUESTIONS_FILE K REPEATS
      embeds the questions, then times exact inner-product search for the best K over the
      kb's vectors (dequantised to float32) with numpy and, when installed, faiss-cpu's
      IndexFlatIP; prints per-question medians in milliseconds and the indices found

Prints JSON on its last line."""
import json
import statistics
import sys
import time

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def read_kb(path):
    t = load_file(path)
    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["edgepack_kb"])
    return t, meta


def texts_of(t):
    text = t["text"].tobytes()
    off = t["text_offsets"]
    return [text[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]


def vectors_of(t, meta):
    v = t["vectors"]
    if meta["precision"] == "int8":
        return v.astype(np.float32) * t["scales"][:, None]
    return v.astype(np.float32)


def encoder(model_dir, max_len):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()

    def embed(texts):
        out = []
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_len)
            with torch.no_grad():
                h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = (h * m).sum(1) / m.sum(1)
            out.append((v / v.norm(dim=1, keepdim=True)).numpy())
        return np.concatenate(out)

    return embed


def cmd_embed(model_dir, kb_file):
    t, meta = read_kb(kb_file)
    texts = texts_of(t)
    embed = encoder(model_dir, meta["embedder"]["max_seq"])
    embed(texts[:4])  # first-call setup outside the timing
    t0 = time.perf_counter()
    embed(texts)
    s = time.perf_counter() - t0
    return {"chunks": len(texts), "seconds": s, "chunks_per_second": len(texts) / s}


def cmd_synth(kb_file, n, out_dir):
    import os

    t, meta = read_kb(kb_file)
    texts = texts_of(t)
    base = vectors_of(t, meta)
    rng = np.random.default_rng(0)
    idx = np.arange(n) % len(texts)
    v = base[idx] + rng.normal(0.0, 0.05, size=(n, base.shape[1])).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    scales = np.abs(v).max(axis=1) / 127.0
    q = np.round(v / scales[:, None]).clip(-127, 127).astype(np.int8)
    data = b"".join(texts[i].encode("utf-8") for i in idx)
    lens = np.array([len(texts[i].encode("utf-8")) for i in idx], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    meta = dict(meta)
    meta["precision"] = "int8"
    meta["chunks"] = [meta["chunks"][i] for i in idx]
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {
            "vectors": q,
            "scales": scales.astype(np.float32),
            "text": np.frombuffer(data, dtype=np.uint8),
            "text_offsets": offsets,
        },
        os.path.join(out_dir, "kb.safetensors"),
        metadata={"edgepack_kb": json.dumps(meta)},
    )
    return {"chunks": n}


def cmd_search(model_dir, kb_file, questions_file, k, repeats):
    t, meta = read_kb(kb_file)
    vectors = np.ascontiguousarray(vectors_of(t, meta))
    questions = [l.strip() for l in open(questions_file) if l.strip()]
    q = encoder(model_dir, meta["embedder"]["max_seq"])(questions)

    def timed(search):
        per_q, found = [], []
        for x in q:
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                top = search(x)
                runs.append((time.perf_counter() - t0) * 1e3)
            per_q.append(statistics.median(runs))
            found.append([int(i) for i in top])
        return {"median_ms": statistics.median(per_q), "top": found}

    def numpy_search(x):
        s = vectors @ x
        part = np.argpartition(-s, k)[:k]
        return part[np.argsort(-s[part], kind="stable")]

    result = {"chunks": len(vectors), "numpy": timed(numpy_search)}
    try:
        import faiss

        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)

        def faiss_search(x):
            _, i = index.search(x[None, :], k)
            return i[0]

        result["faiss"] = timed(faiss_search)
        result["faiss_version"] = faiss.__version__
    except ImportError:
        result["faiss"] = None
    return result


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "embed":
        r = cmd_embed(*args)
    elif cmd == "synth":
        r = cmd_synth(args[0], int(args[1]), args[2])
    elif cmd == "search":
        r = cmd_search(args[0], args[1], args[2], int(args[3]), int(args[4]))
    else:
        raise SystemExit(__doc__)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
