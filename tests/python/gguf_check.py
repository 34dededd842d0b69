"""Reads a GGUF with the `gguf` package (gguf-py, llama.cpp's own Python reader) and checks the
rules llama.cpp's C loader applies that gguf-py does not: contiguous padded offsets in info
order, UINT32 hyperparameters, FLOAT32 eps/theta, F32 norms. Dequantizes every tensor.
Prints one JSON line."""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)

path = sys.argv[1]
r = GGUFReader(path)
out = {"kv": {}, "tensors": [], "problems": []}
arch = None
for name, f in r.fields.items():
    if name.startswith("GGUF."):
        continue
    t = f.types[0].name
    if f.types[0] == GGUFValueType.ARRAY:
        t = "ARRAY[" + f.types[-1].name + "]"
        val = len(f.data)
    else:
        val = f.contents()
    out["kv"][name] = {"type": t, "value": val}
    if name == "general.architecture":
        arch = val

align = r.alignment
expect = 0
for t in r.tensors:
    rel = t.data_offset - r.data_offset
    if rel != expect:
        out["problems"].append(f"{t.name}: offset {rel}, expected {expect}")
    expect = rel + ((t.n_bytes + align - 1) // align) * align
    vals = dequantize(t.data, t.tensor_type)
    finite = bool(np.isfinite(vals).all())
    if not finite:
        out["problems"].append(f"{t.name}: non-finite values")
    if (t.name.endswith("_norm.weight") or len(t.shape) == 1) and t.tensor_type.name != "F32":
        out["problems"].append(f"{t.name}: 1-D tensor stored as {t.tensor_type.name}")
    out["tensors"].append({"name": t.name, "type": t.tensor_type.name,
                           "shape": [int(x) for x in t.shape]})
import os
size = os.path.getsize(path)
if size != r.data_offset + expect:
    out["problems"].append(f"file is {size} bytes, expected {r.data_offset + expect} (last tensor padded)")

if arch is not None:
    for k, v in out["kv"].items():
        if not k.startswith(arch + "."):
            continue
        if k.endswith(("epsilon", "freq_base", "scaling.factor")) and v["type"] != "FLOAT32":
            out["problems"].append(f"{k} is {v['type']}, llama.cpp wants FLOAT32")
        if k.endswith(("_length", "count", "count_kv", "vocab_size", "dimension_count")) and v["type"] != "UINT32":
            out["problems"].append(f"{k} is {v['type']}, llama.cpp wants UINT32")
print(json.dumps(out, default=str))
