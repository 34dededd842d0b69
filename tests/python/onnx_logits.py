"""Runs an exported ONNX decoder with onnxruntime: a prefill of the first PREFILL ids, then the
remaining ids one at a time through the KV cache (present -> past). Writes every position's
logits as float32 [len(ids), vocab] to OUT and prints one JSON line with the shape, the graph's
input names and whether position_ids was fed.

usage: onnx_logits.py MODEL_DIR IDS_JSON PREFILL OUT"""
import json
import sys

import numpy as np
import onnxruntime as ort

model_dir, ids, prefill, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
# Exact integer products on x86 without VNNI, as edgepack-runtime asks for too: there, the
# u8 x s8 kernel adds pairs of products in saturating 16-bit lanes, and full-range int8
# weights overflow them; this option has onnxruntime compute such weights as u8 x u8.
opts.add_session_config_entry("session.x64quantprecision", "1")
sess = ort.InferenceSession(f"{model_dir}/model.onnx", opts, providers=["CPUExecutionProvider"])
inputs = {i.name: i for i in sess.get_inputs()}
past_names = [n for n in inputs if n.startswith("past_key_values.")]
kv_type = np.float16 if inputs[past_names[0]].type == "tensor(float16)" else np.float32
kv_heads, head = inputs[past_names[0]].shape[1], inputs[past_names[0]].shape[3]
past = {n: np.zeros((1, kv_heads, 0, head), dtype=kv_type) for n in past_names}
out_names = [o.name for o in sess.get_outputs()]

rows = []
steps = [ids[:prefill]] + [[t] for t in ids[prefill:]]
done = 0
for step in steps:
    feed = {
        "input_ids": np.array([step], dtype=np.int64),
        "attention_mask": np.ones((1, done + len(step)), dtype=np.int64),
    }
    if "position_ids" in inputs:
        feed["position_ids"] = np.arange(done, done + len(step), dtype=np.int64)[None, :]
    feed.update(past)
    res = dict(zip(out_names, sess.run(out_names, feed)))
    rows.append(res["logits"][0].astype(np.float32))
    for n in past_names:
        past[n] = res[n.replace("past_key_values.", "present.")]
    done += len(step)

logits = np.concatenate(rows, axis=0)
logits.tofile(out)
print(json.dumps({"shape": list(logits.shape), "n_inputs": len(inputs),
                  "position_ids": "position_ids" in inputs}))
