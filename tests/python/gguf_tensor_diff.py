"""Compares two GGUF files tensor by tensor: for tensors present in both with the same type,
counts byte-identical tensors and identical blocks; for all, the RMSE of each against a float
reference file (when given). Prints one JSON line.

usage: gguf_tensor_diff.py OURS.gguf THEIRS.gguf [REFERENCE_F32.gguf]"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGML_QUANT_SIZES
from gguf.quants import dequantize
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)

ours = {t.name: t for t in GGUFReader(sys.argv[1]).tensors}
theirs = {t.name: t for t in GGUFReader(sys.argv[2]).tensors}
ref = {t.name: t for t in GGUFReader(sys.argv[3]).tensors} if len(sys.argv) > 3 else {}
res = {"compared": 0, "identical_tensors": 0, "blocks": 0, "identical_blocks": 0,
       "type_mismatch": [], "by_type": {}, "missing": sorted(set(theirs) - set(ours))}
sq_ours = sq_theirs = 0.0
for name, a in ours.items():
    b = theirs.get(name)
    if b is None:
        continue
    if a.tensor_type != b.tensor_type:
        res["type_mismatch"].append([name, a.tensor_type.name, b.tensor_type.name])
        continue
    res["compared"] += 1
    ba = np.asarray(a.data).reshape(-1).view(np.uint8)
    bb = np.asarray(b.data).reshape(-1).view(np.uint8)
    _, tsize = GGML_QUANT_SIZES[a.tensor_type]
    blocks_a = ba.reshape(-1, tsize)
    blocks_b = bb.reshape(-1, tsize)
    same = int((blocks_a == blocks_b).all(axis=1).sum())
    t = res["by_type"].setdefault(a.tensor_type.name, {"tensors": 0, "identical_tensors": 0, "blocks": 0, "identical_blocks": 0, "rmse_ours": 0.0, "rmse_theirs": 0.0})
    t["tensors"] += 1
    t["blocks"] += blocks_a.shape[0]
    t["identical_blocks"] += same
    res["blocks"] += blocks_a.shape[0]
    res["identical_blocks"] += same
    if same == blocks_a.shape[0]:
        res["identical_tensors"] += 1
        t["identical_tensors"] += 1
    if name in ref:
        r = dequantize(ref[name].data, ref[name].tensor_type).astype(np.float64).reshape(-1)
        da = dequantize(a.data, a.tensor_type).astype(np.float64).reshape(-1)
        sq = float(((da - r) ** 2).sum())
        t["rmse_ours"] += sq
        if same == blocks_a.shape[0]:
            # Identical bytes dequantize identically: the same error.
            t["rmse_theirs"] += sq
        else:
            db = dequantize(b.data, b.tensor_type).astype(np.float64).reshape(-1)
            t["rmse_theirs"] += float(((db - r) ** 2).sum())
for t in res["by_type"].values():
    if t["rmse_theirs"] > 0:
        t["rmse_ratio"] = (t["rmse_ours"] / t["rmse_theirs"]) ** 0.5
print(json.dumps(res))
