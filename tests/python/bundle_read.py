"""Reads a bundle folder as a stranger would: hashes every file listed in manifest.json with
hashlib, lists the files actually present, and opens the model with the `gguf` package
(gguf-py, llama.cpp's own reader). Prints one JSON line."""
import hashlib
import json
import os
import sys

from gguf import GGUFReader
import gguf_mapped  # noqa: F401  (opens GGUF files faster under gguf-py's own parser)

root = sys.argv[1]
with open(os.path.join(root, "manifest.json"), "rb") as f:
    manifest = json.loads(f.read())

listed = {}
for entry in manifest["files"]:
    h = hashlib.sha256()
    path = os.path.join(root, entry["path"])
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    listed[entry["path"]] = {
        "size": os.path.getsize(path),
        "sha256": h.hexdigest(),
        "matches": os.path.getsize(path) == entry["size"] and h.hexdigest() == entry["sha256"],
    }

present = []
for d, _, files in os.walk(root):
    for name in files:
        present.append(os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/"))

r = GGUFReader(os.path.join(root, manifest["model"]["file"]))
types = {}
for t in r.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
arch = r.fields["general.architecture"].contents()
print(json.dumps({
    "listed": listed,
    "present": sorted(present),
    "gguf": {
        "architecture": arch,
        "tensors": len(r.tensors),
        "types": types,
        "file_type": int(r.fields["general.file_type"].contents()),
        "n_params": int(sum(int(t.n_elements) for t in r.tensors)),
    },
}))
