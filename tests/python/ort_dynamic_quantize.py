"""Runs onnxruntime's own DynamicQuantizeLinear (a one-node graph, CPU) on float32 tensors and
writes what it returns: the uint8 codes, the scale and the zero point of each.

usage: ort_dynamic_quantize.py IN OUT ROWS COLS [ROWS COLS ...]
IN holds the tensors' float32 values one after another; OUT gets their uint8 codes the same
way. Prints one JSON line: [{"scale": s, "zero_point": z}, ...]."""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

src, dst, dims = sys.argv[1], sys.argv[2], [int(d) for d in sys.argv[3:]]
graph = helper.make_graph(
    [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])],
    "dql",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])],
    [
        helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", "k"]),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
        helper.make_tensor_value_info("zp", TensorProto.UINT8, []),
    ],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
values = np.fromfile(src, dtype=np.float32)
params, codes, at = [], [], 0
for rows, cols in zip(dims[0::2], dims[1::2]):
    x = values[at : at + rows * cols].reshape(rows, cols)
    at += rows * cols
    y, scale, zp = sess.run(None, {"x": x})
    codes.append(y.reshape(-1))
    params.append({"scale": float(scale), "zero_point": int(zp)})
np.concatenate(codes).astype(np.uint8).tofile(dst)
print(json.dumps(params))
