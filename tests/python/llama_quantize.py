"""Quantizes a GGUF with llama.cpp's own llama_model_quantize (what llama-quantize runs).

usage: llama_quantize.py IN.gguf OUT.gguf FTYPE_ID [--pure]"""
import ctypes
import json
import sys

import llama_cpp

inp, out, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = 2
params.allow_requantize = True
if "--pure" in sys.argv:
    params.pure = True
rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(params))
print(json.dumps({"rc": int(rc)}))
sys.exit(0 if rc == 0 else 1)
