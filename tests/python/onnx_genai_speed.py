"""Times onnxruntime-genai's own generate loop on an ONNX folder (CPU, THREADS threads): a
prompt of PROMPT fixed token ids, then DECODE greedy tokens. Prints one JSON line with the time
to first token, the decode tokens/s (tokens after the first over their time) and the process's
peak resident memory.

usage: onnx_genai_speed.py MODEL_DIR PROMPT DECODE THREADS"""
import json
import resource
import sys
import time

import onnxruntime_genai as og

model_dir, prompt, decode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = og.Config(model_dir)
config.overlay(json.dumps({"model": {"decoder": {"session_options": {
    "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
model = og.Model(config)
ids = [(i * 7919 + 13) % 40000 + 100 for i in range(prompt)]


def run():
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt + decode, min_length=prompt + decode,
                              do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    t1 = time.perf_counter()
    n = 1
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    return t1 - t0, (n - 1) / (t2 - t1)


run()  # warm-up
ttft, tps = run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"ttft_ms": ttft * 1e3, "decode_tokens_per_s": tps, "peak_rss_mb": peak}))
