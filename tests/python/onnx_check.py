"""Checks an exported ONNX folder with onnx itself: `onnx.checker.check_model(path,
full_check=True)` (run only when asked: contrib graphs use ops onnx does not know), then
describes the file: IR version, opsets, operator types and domains, and where each
initializer's bytes live. Prints one JSON line.

usage: onnx_check.py MODEL_DIR full|describe"""
import json
import os
import sys

import onnx

model_dir, mode = sys.argv[1], sys.argv[2]
path = os.path.join(model_dir, "model.onnx")
if mode == "full":
    onnx.checker.check_model(path, full_check=True)
m = onnx.load(path, load_external_data=False)
inits = m.graph.initializer
external = [t for t in inits if t.data_location == onnx.TensorProto.EXTERNAL]
locations = sorted({e.value for t in external for e in t.external_data if e.key == "location"})
print(json.dumps({
    "checked": mode == "full",
    "ir_version": m.ir_version,
    "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
    "op_types": sorted({f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in m.graph.node}),
    "initializers": len(inits),
    "external": len(external),
    "locations": locations,
    "model_bytes": os.path.getsize(path),
    "inputs": [i.name for i in m.graph.input],
    "outputs": [o.name for o in m.graph.output],
}))
