"""Reading pickled feature files without running their code.

A pickle can name any importable callable and have it called while loading,
so a crafted file runs code under plain ``pickle.load``. The authors'-layout
``.pkl`` files hold only numpy arrays, torch tensors and plain containers, so
:func:`load` rebuilds exactly those and refuses every other global, naming the
file and the global. Tensors inside such a pickle carry their storage as a
nested ``torch.save`` archive, which is read with torch's tensors-only loader
(rather than the full unpickler ``torch.storage._load_from_bytes`` would use).
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import torch

# (module, name) pairs a features pickle may use: how numpy and torch pickle their arrays.
_NUMPY = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
          for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}
_TORCH = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
          ("collections", "OrderedDict")}


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that names a global outside the allowed set."""


def _storage_from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY or (module, name) in _TORCH:
            return super().find_class(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        raise RefusedPickle(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("a persistent id (not a features pickle)")


def load(path: str, trust: bool = False) -> Any:
    """The object pickled in ``path``: numpy arrays and dtypes, torch tensors, lists,
    tuples, dicts, str, bytes, numbers, bool and None only, unless ``trust``."""
    with open(path, "rb") as stream:
        if trust:
            return pickle.load(stream)
        return _Restricted(stream).load()
