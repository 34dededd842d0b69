"""Runs llama.cpp's convert_hf_to_gguf.py on several (model, outtype, outfile) jobs in one
process, so torch and transformers are imported once rather than once per file. Each job is
exactly the command line `convert_hf_to_gguf.py MODEL --outtype TYPE --outfile OUT`.

usage: llama_convert_many.py CONVERT_HF_TO_GGUF.py JOBS.json
JOBS.json: [[MODEL, TYPE, OUT], ...]; prints one JSON line with the files written."""
import importlib.util
import json
import os
import sys

script, jobs_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)

written = []
for model, outtype, out in json.load(open(jobs_file)):
    sys.argv = [script, model, "--outtype", outtype, "--outfile", out]
    convert.main()
    if not os.path.isfile(out):
        sys.exit(f"convert_hf_to_gguf.py wrote no {out}")
    written.append(out)
print(json.dumps({"written": written}))
