"""Makes gguf-py's GGUFReader parse a file mapped as a plain read-only numpy array instead of
an np.memmap; importing this module is all it takes.

The parser stays gguf-py's own. Only the array under it changes: np.memmap is an ndarray
subclass whose every slice runs Python-level bookkeeping (__array_finalize__), and GGUFReader
slices once per metadata string, so a file carrying SmolLM2's 49,152-token vocabulary and its
merges took about 3 s to open (12 s under cProfile, 9 of them in memmap's methods) and about
1 s this way. Every tiny test model carries that vocabulary, and the oracles open hundreds
of such files per test run."""
import mmap
import types

import numpy as np
import gguf.gguf_reader as _reader


def _mapped(path, mode="r", *args, **kwargs):
    if mode != "r" or args or kwargs:
        raise ValueError(f"gguf_mapped maps files read-only, asked for mode {mode!r}")
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(m, dtype=np.uint8)


class _Numpy(types.ModuleType):
    """numpy, as gguf_reader sees it, with memmap replaced."""

    def __getattr__(self, name):
        return getattr(np, name)


_shim = _Numpy("numpy")
_shim.memmap = _mapped
_reader.np = _shim
