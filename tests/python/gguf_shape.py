"""Reads what sizes a model in memory from a GGUF with the `gguf` package: the file size, the
bytes of tensor data, and the attention shape (layers, KV heads, head size) from the
hyperparameter keys. Prints one JSON line."""
import json
import os
import sys

from gguf import GGUFReader
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)

path = sys.argv[1]
r = GGUFReader(path)
arch = r.fields["general.architecture"].contents()


def key(name, default=None):
    f = r.fields.get(f"{arch}.{name}")
    return int(f.contents()) if f is not None else default


heads = key("attention.head_count")
head_dim = key("attention.key_length", key("embedding_length") // heads)
print(json.dumps({
    "file_bytes": os.path.getsize(path),
    "data_bytes": int(sum(int(t.n_bytes) for t in r.tensors)),
    "layers": key("block_count"),
    "heads": heads,
    "kv_heads": key("attention.head_count_kv", heads),
    "head_dim": head_dim,
    "context_length": key("context_length"),
}))
