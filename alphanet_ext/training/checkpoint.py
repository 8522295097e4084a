"""A fit's state at the end of each epoch, so a killed fit resumes where it was.

The file holds tensors and plain containers only (read back with torch's
tensors-only loader) and is replaced atomically, so a kill during the write
leaves the previous epoch's state. With it comes a fingerprint of the inputs
and options: a resume with anything different is refused, naming what differs.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import ArrayLike, as_tensor

FORMAT = 1


def digest(tensor: Tensor) -> str:
    """A hash of a tensor's shape, dtype and values."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def sampled_digest(x: ArrayLike, name: str, samples: int = 64) -> str:
    """A hash of a feature matrix's shape, dtype and ``samples`` evenly spread rows
    (cheap for memory-mapped files; the train features are covered in full by their class means)."""
    rows = np.unique(np.linspace(0, x.shape[0] - 1, min(samples, x.shape[0])).astype(np.int64)) if x.shape[0] else []
    picked = as_tensor(x[rows] if len(rows) else x[:0], name)
    return digest(picked) + f"/{tuple(x.shape)}"


def fingerprint(config: dict[str, Any], device: torch.device, inputs: dict[str, str]) -> dict[str, str]:
    """What a checkpoint must agree on: every option, the device kind and every input's digest."""
    out = {f"option {name}": repr(value) for name, value in config.items() if name != "cuda_graphs"}
    out["device"] = device.type
    out.update({f"input {name}": value for name, value in inputs.items()})
    return out


def path_in(folder: str, name: str = "fit") -> str:
    return os.path.join(folder, f"{name}.ckpt.pt")


def save(path: str, state: dict[str, Any]) -> None:
    from ..io import save_torch, write_atomic  # io reads files; this module is imported by fit
    write_atomic(path, lambda temporary: save_torch({"format": FORMAT, **state}, temporary))


def load(path: str, expected: dict[str, str]) -> dict[str, Any] | None:
    """The saved state, or None when there is none; refuses one written for other inputs or options."""
    if not os.path.exists(path):
        return None
    from ..io import load_tensors_only
    state = load_tensors_only(path, "not a fit checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT or "fingerprint" not in state:
        raise ValueError(f"{path}: not a fit checkpoint of this version of alphanet_ext; remove it to start over")
    saved = state["fingerprint"]
    for key in sorted(set(saved) | set(expected)):
        if saved.get(key) != expected.get(key):
            what = key.split(" ", 1)
            shown = f"{what[0]} {what[1]!r}" if len(what) == 2 else key
            raise ValueError(f"{path}: the checkpoint was written for a different {shown} (checkpoint "
                             f"{saved.get(key)}, now {expected.get(key)}); use another checkpoint folder or remove "
                             "it to start over")
    return state
