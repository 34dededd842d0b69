"""Quantizes an fp32 ONNX model with onnxruntime's own tools, as a peer for edgepack's
quantized exports. Copies the folder's other files. Prints one JSON line.

usage: onnx_ort_quantize.py SRC_DIR DST_DIR MODE
MODE: int8-dynamic (quantize_dynamic, int8 weights per channel, MatMul only) or
      int4-BLOCK-sym / int4-BLOCK-asym (MatMulNBitsQuantizer, round to nearest)."""
import json
import os
import shutil
import sys

import onnx

src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    if f.endswith(".json"):
        shutil.copy(os.path.join(src, f), dst)
if mode == "int8-dynamic":
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(f"{src}/model.onnx", f"{dst}/model.onnx", weight_type=QuantType.QInt8,
                     per_channel=True, use_external_data_format=True,
                     op_types_to_quantize=["MatMul"])
elif mode.startswith("int4-"):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    _, block, sym = mode.split("-")
    model = onnx.load(f"{src}/model.onnx")
    cfg = DefaultWeightOnlyQuantConfig(block_size=int(block), is_symmetric=(sym == "sym"),
                                       accuracy_level=4)
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(f"{dst}/model.onnx", use_external_data_format=True)
else:
    sys.exit(f"unknown mode {mode}")
print(json.dumps({"mode": mode, "files": sorted(os.listdir(dst))}))
