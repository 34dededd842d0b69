"""Compares the initializers two ONNX models share by name (values and shapes), e.g. edgepack's
int4 export against onnxruntime's own MatMulNBits quantizer run on edgepack's fp32 export.
Prints one JSON line: how many were compared, which differ, and how many the peer has that we
lack (and the reverse).

usage: onnx_init_equal.py OURS_DIR THEIRS_DIR"""
import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper

ours_dir, theirs_dir = sys.argv[1], sys.argv[2]


def load(d):
    m = onnx.load(f"{d}/model.onnx", load_external_data=False)
    return {t.name: t for t in m.graph.initializer}


ours, theirs = load(ours_dir), load(theirs_dir)
differ = []
compared = 0
for name in sorted(set(ours) & set(theirs)):
    a = numpy_helper.to_array(ours[name], base_dir=ours_dir)
    b = numpy_helper.to_array(theirs[name], base_dir=theirs_dir)
    compared += 1
    if a.dtype != b.dtype or a.size != b.size or not np.array_equal(a.reshape(-1), b.reshape(-1)):
        differ.append({"name": name, "ours": [str(a.dtype), list(a.shape)],
                       "theirs": [str(b.dtype), list(b.shape)]})
print(json.dumps({"compared": compared, "differ": differ,
                  "only_theirs": sorted(set(theirs) - set(ours)),
                  "only_ours": sorted(set(ours) - set(theirs))}))
