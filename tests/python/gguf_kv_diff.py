"""Compares the metadata and tensors of two GGUF files: every key with its type and value
(arrays compared element-wise), and tensor names, types, shapes and bytes. Prints one JSON line.

usage: gguf_kv_diff.py OURS THEIRS [--ignore KEY ...]"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)

ours, theirs = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ignore = set(sys.argv[4:]) if len(sys.argv) > 3 and sys.argv[3] == "--ignore" else set()


def kvs(r):
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ignore:
            continue
        types = [t.name for t in f.types]
        if f.types[0] == GGUFValueType.ARRAY:
            val = f.contents()
        else:
            val = f.contents()
        out[k] = (types, val)
    return out


ka, kb = kvs(ours), kvs(theirs)
diff = []
for k in sorted(set(ka) | set(kb)):
    if k not in ka:
        diff.append(f"missing key {k}")
    elif k not in kb:
        diff.append(f"extra key {k}")
    elif ka[k][0] != kb[k][0]:
        diff.append(f"{k}: type {ka[k][0]} vs {kb[k][0]}")
    elif ka[k][1] != kb[k][1]:
        va, vb = ka[k][1], kb[k][1]
        if isinstance(va, list):
            n = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
            diff.append(f"{k}: differs at element {n} of {len(va)}/{len(vb)}")
        else:
            diff.append(f"{k}: {va!r} vs {vb!r}")
ta = {t.name: t for t in ours.tensors}
tb = {t.name: t for t in theirs.tensors}
tdiff = []
for n in sorted(set(ta) | set(tb)):
    if n not in ta or n not in tb:
        tdiff.append(f"{n}: only in {'theirs' if n not in ta else 'ours'}")
        continue
    a, b = ta[n], tb[n]
    if a.tensor_type != b.tensor_type or list(a.shape) != list(b.shape):
        tdiff.append(f"{n}: {a.tensor_type.name}{list(a.shape)} vs {b.tensor_type.name}{list(b.shape)}")
    elif not np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)):
        tdiff.append(f"{n}: bytes differ")
order_same = [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
print(json.dumps({"kv_diff": diff, "tensor_diff": tdiff, "tensors": len(ta), "same_order": order_same}))
