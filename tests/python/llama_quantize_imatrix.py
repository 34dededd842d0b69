"""Quantizes a GGUF with llama.cpp's own llama_model_quantize, passing an importance matrix
the way llama-quantize does: the imatrix GGUF is read with gguf-py, each weight's
`<name>.in_sum2` is divided by its `<name>.counts` in float32 (count 0 -> 1.0), and the
result goes in `params.imatrix` as a NULL-terminated array of llama_model_imatrix_data.

usage: llama_quantize_imatrix.py IN.gguf OUT.gguf FTYPE_ID IMATRIX.gguf"""
import ctypes
import json
import sys

import numpy as np
import llama_cpp
from gguf import GGUFReader
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)

inp, out, ftype, imatrix_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

r = GGUFReader(imatrix_path)
sums, counts = {}, {}
for t in r.tensors:
    if t.name.endswith(".in_sum2"):
        sums[t.name[: -len(".in_sum2")]] = t
    elif t.name.endswith(".counts"):
        counts[t.name[: -len(".counts")]] = t
assert sums and set(sums) == set(counts), "unpaired imatrix tensors"

keep = []  # the arrays must outlive the call
entries = (llama_cpp.llama_model_imatrix_data * (len(sums) + 1))()
for i, name in enumerate(sorted(sums)):
    s = np.asarray(sums[name].data, dtype=np.float32).reshape(-1)
    c = np.round(np.asarray(counts[name].data, dtype=np.float32).reshape(-1))
    ne0 = s.size // c.size
    w = np.empty_like(s)
    for m in range(c.size):
        row = s[m * ne0:(m + 1) * ne0]
        w[m * ne0:(m + 1) * ne0] = row / np.float32(c[m]) if c[m] > 0 else np.float32(1.0)
    w = np.ascontiguousarray(w, dtype=np.float32)
    nm = ctypes.create_string_buffer(name.encode())
    keep += [w, nm]
    entries[i].name = ctypes.cast(nm, ctypes.c_char_p)
    entries[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    entries[i].size = w.size
entries[len(sums)].name = None

params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = 2
params.allow_requantize = True
params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params))
print(json.dumps({"rc": int(rc), "entries": len(sums)}))
sys.exit(0 if rc == 0 else 1)
