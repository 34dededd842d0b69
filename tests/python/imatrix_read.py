"""Reads an imatrix GGUF with gguf-py and prints what llama-quantize relies on: general.type,
the imatrix.* keys, every tensor's name, type and shape (ne0 first), and per weight the sum of
its in_sum2 values and its counts. Prints one JSON line.

usage: imatrix_read.py IMATRIX.gguf"""
import json
import sys

import numpy as np
from gguf import GGUFReader
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)


def value(field):
    return field.contents()


r = GGUFReader(sys.argv[1])
keys = {name: value(f) for name, f in r.fields.items() if not name.startswith("GGUF.")}
tensors = []
weights = {}
for t in r.tensors:
    tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape]})
    data = np.asarray(t.data, dtype=np.float64).reshape(-1)
    if t.name.endswith(".in_sum2"):
        weights.setdefault(t.name[: -len(".in_sum2")], {})["sum"] = float(data.sum())
    elif t.name.endswith(".counts"):
        weights.setdefault(t.name[: -len(".counts")], {})["counts"] = [float(x) for x in data]
print(json.dumps({"keys": keys, "tensors": tensors, "weights": weights}))
