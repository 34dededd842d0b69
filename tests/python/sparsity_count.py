"""Counts zeros in every 2-D tensor of an HF folder's safetensors with numpy, and checks N:M
structure when asked: in every group of M consecutive values along each row, at least M-N
zeros. Prints one JSON line {"tensors": {name: {"zeros": z, "numel": n, "nm_ok": bool}}}.

usage: sparsity_count.py HF_DIR [N:M]"""
import glob
import json
import sys

import numpy as np
from safetensors.numpy import load_file

nm = None
if len(sys.argv) > 2:
    n, m = (int(x) for x in sys.argv[2].split(":"))
    nm = (n, m)
out = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    for name, t in load_file(f).items():
        if t.ndim != 2:
            continue
        t = t.astype(np.float32)
        entry = {"zeros": int((t == 0).sum()), "numel": int(t.size)}
        if nm is not None and t.shape[1] % nm[1] == 0:
            groups = (t.reshape(t.shape[0], -1, nm[1]) == 0).sum(axis=2)
            entry["nm_ok"] = bool((groups >= nm[1] - nm[0]).all())
        out[name] = entry
print(json.dumps({"tensors": out}))
