"""Times an ONNX decoder in onnxruntime (CPU, 2 threads): one prefill of PREFILL tokens, then
DECODE greedy steps through the KV cache. Prints one JSON line with tokens/s of each phase.

usage: onnx_speed.py MODEL_DIR PREFILL DECODE"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

model_dir, prefill, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
# Exact integer products on x86 without VNNI, as edgepack-runtime asks for too: there, the
# u8 x s8 kernel adds pairs of products in saturating 16-bit lanes, and full-range int8
# weights overflow them; this option has onnxruntime compute such weights as u8 x u8.
opts.add_session_config_entry("session.x64quantprecision", "1")
t0 = time.perf_counter()
sess = ort.InferenceSession(f"{model_dir}/model.onnx", opts, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t0
inputs = {i.name: i for i in sess.get_inputs()}
past_names = [n for n in inputs if n.startswith("past_key_values.")]
kv_type = np.float16 if inputs[past_names[0]].type == "tensor(float16)" else np.float32
kv_heads, head = inputs[past_names[0]].shape[1], inputs[past_names[0]].shape[3]
if not isinstance(head, int) or not isinstance(kv_heads, int):
    # Recent model builders name the last KV dim symbolically ("kv_cache_dim").
    with open(f"{model_dir}/genai_config.json") as f:
        dec = json.load(f)["model"]["decoder"]
    kv_heads, head = dec["num_key_value_heads"], dec["head_size"]
past = {n: np.zeros((1, kv_heads, 0, head), dtype=kv_type) for n in past_names}
out_names = [o.name for o in sess.get_outputs()]


def step(ids, done):
    feed = {"input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, done + len(ids)), dtype=np.int64)}
    if "position_ids" in inputs:
        feed["position_ids"] = np.arange(done, done + len(ids), dtype=np.int64)[None, :]
    feed.update(past)
    res = dict(zip(out_names, sess.run(out_names, feed)))
    for n in past_names:
        past[n] = res[n.replace("past_key_values.", "present.")]
    return int(res["logits"][0, -1].argmax())


ids = [(i * 7919 + 13) % 49152 for i in range(prefill)]
t0 = time.perf_counter()
nxt = step(ids, 0)
prefill_s = time.perf_counter() - t0
t0 = time.perf_counter()
for k in range(decode):
    nxt = step([nxt], prefill + k)
decode_s = time.perf_counter() - t0
print(json.dumps({"load_seconds": load_s, "prefill_tokens": prefill, "decode_tokens": decode,
                  "prefill_tokens_per_s": prefill / prefill_s,
                  "decode_tokens_per_s": decode / decode_s}))
