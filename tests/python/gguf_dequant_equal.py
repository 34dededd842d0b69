"""Checks that every tensor of an F32 GGUF equals gguf-py's dequantization of the same tensor
in a source GGUF (any type). Prints one JSON line with the worst absolute difference.

usage: gguf_dequant_equal.py SOURCE.gguf F32.gguf"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)

src = {t.name: t for t in GGUFReader(sys.argv[1]).tensors}
out = {t.name: t for t in GGUFReader(sys.argv[2]).tensors}
worst, types, missing = 0.0, set(), sorted(set(src) ^ set(out))
for name, t in src.items():
    if name not in out:
        continue
    a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    b = np.asarray(out[name].data, dtype=np.float32).reshape(-1)
    types.add(t.tensor_type.name)
    worst = max(worst, float(np.abs(a - b).max()))
print(json.dumps({"max_abs_diff": worst, "types": sorted(types), "missing": missing}))
