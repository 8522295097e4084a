"""The compiled ops' argument and value checks, in Python, with their messages.

Only the fallback uses them: when the compiled module is missing (a failed
build, or one that no longer loads after a torch upgrade), the ops run the
float64 references in :mod:`alphanet_ext.reference`, which would otherwise
sum NaN silently or fail inside torch's indexing with a message that names
none of our arguments.
"""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def type_name(dtype: torch.dtype) -> str:
    """The C++ name of a dtype, as the compiled ops write it ("Float" for torch.float32)."""
    return torch.empty(0, dtype=dtype).type()[len("torch."):-len("Tensor")]


def refuse(op: str, problem: str):
    raise RuntimeError(f"{op}: {problem}")


def float_matrix(op: str, name: str, t: Tensor) -> None:
    if t.dim() != 2:
        refuse(op, f"{name} must be 2-D, got shape {list(t.shape)}")
    if t.dtype not in FLOAT_TYPES:
        refuse(op, f"{name} must be float16, bfloat16, float32 or float64, got {type_name(t.dtype)}")


def same_device(op: str, **tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            refuse(op, f"{first_name} is on {first.device} but {name} is on {tensor.device}")


def indices_in_range(op: str, name: str, t: Tensor, limit: int, limit_name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        refuse(op, f"{name} must be an integer tensor, got {type_name(t.dtype)}")
    if t.numel() and (t.min() < 0 or t.max() >= limit):
        found = t.min() if t.min() < 0 else t.max()
        refuse(op, f"{name} must lie in [0, {limit}) ({limit_name}), found {int(found)}")


def finite(op: str, name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        refuse(op, f"{name} contains NaN or inf")


def class_means(x: Tensor, labels: Tensor, num_classes: int) -> None:
    op = "class_means"
    float_matrix(op, "x", x)
    if num_classes < 1:
        refuse(op, f"num_classes must be at least 1, got {num_classes}")
    same_device(op, x=x, labels=labels)
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        refuse(op, f"labels must be 1-D with one entry per row of x ({x.shape[0]}), got shape {list(labels.shape)}")
    indices_in_range(op, "labels", labels, num_classes, "num_classes")
    finite(op, "x", x)


def knn(queries: Tensor, keys: Tensor, k: int, metric: str) -> None:
    op = "knn"
    float_matrix(op, "queries", queries)
    float_matrix(op, "keys", keys)
    same_device(op, queries=queries, keys=keys)
    if queries.dtype != keys.dtype:
        refuse(op, f"queries are {type_name(queries.dtype)} but keys are {type_name(keys.dtype)}")
    if queries.shape[1] != keys.shape[1]:
        refuse(op, f"queries have {queries.shape[1]} features but keys have {keys.shape[1]}")
    if metric not in ("euclidean", "cosine"):
        refuse(op, f"metric must be 'euclidean' or 'cosine', got '{metric}'")
    if k < 1:
        refuse(op, f"k must be at least 1, got {k}")
    if k > keys.shape[0]:
        refuse(op, f"k ({k}) is larger than the number of keys ({keys.shape[0]})")
    finite(op, "queries", queries)
    finite(op, "keys", keys)


def alpha_combine(source: Tensor, targets: Tensor, neighbors: Tensor, alphas: Tensor, dim: int) -> None:
    op = "alpha_combine"
    float_matrix(op, "source", source)
    same_device(op, source=source, targets=targets, neighbors=neighbors, alphas=alphas)
    if dim not in (0, 1, -1, -2):
        refuse(op, f"dim must be 0 (rows) or 1 (columns), got {dim}")
    if targets.dim() != 1:
        refuse(op, f"targets must be 1-D, got shape {list(targets.shape)}")
    if neighbors.dim() != 2 or neighbors.shape[0] != targets.shape[0]:
        refuse(op, f"neighbors must be [len(targets), k] = [{targets.shape[0]}, k], got shape {list(neighbors.shape)}")
    if neighbors.shape[1] < 1:
        refuse(op, "need at least one neighbour per target (k >= 1)")
    if alphas.shape != neighbors.shape:
        refuse(op, f"alphas must have the shape of neighbors {list(neighbors.shape)}, got {list(alphas.shape)}")
    if not alphas.dtype.is_floating_point:
        refuse(op, f"alphas must be floating point, got {type_name(alphas.dtype)}")
    rows = dim in (0, -2)
    lines = "rows of source" if rows else "columns of source"
    num_lines = source.shape[0 if rows else 1]
    indices_in_range(op, "targets", targets, num_lines, lines)
    indices_in_range(op, "neighbors", neighbors, num_lines, lines)
    finite(op, "alphas", alphas)
    if (alphas == 0).all(dim=1).any():
        refuse(op, "a row of alphas is all zeros, so its L1 normalisation is undefined")
