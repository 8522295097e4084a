"""The compiled ops' argument and value checks, in Python, with their messages
(the same table, :mod:`alphanet_ext.messages`, as the compiled ops').

Only the fallback uses them: when the compiled module is missing (a failed
build, or one that no longer loads after a torch upgrade), the ops run the
float64 references in :mod:`alphanet_ext.reference`, which would otherwise
sum NaN silently or fail inside torch's indexing with a message that names
none of our arguments.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .messages import MESSAGES

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def type_name(dtype: torch.dtype) -> str:
    """The C++ name of a dtype, as the compiled ops write it ("Float" for torch.float32)."""
    return torch.empty(0, dtype=dtype).type()[len("torch."):-len("Tensor")]


def refuse(op: str, key: str, **fields) -> None:
    """Raises the compiled ops' message ``key`` (:data:`alphanet_ext.messages.MESSAGES`)."""
    raise RuntimeError(f"{op}: {MESSAGES[key].format(**fields)}")


def float_matrix(op: str, name: str, t: Tensor) -> None:
    if t.dim() != 2:
        refuse(op, "not_matrix", name=name, shape=list(t.shape))
    if t.dtype not in FLOAT_TYPES:
        refuse(op, "not_float", name=name, dtype=type_name(t.dtype))


def same_device(op: str, **tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            refuse(op, "other_device", a=first_name, device_a=first.device, b=name, device_b=tensor.device)


def indices_in_range(op: str, name: str, t: Tensor, limit: int, limit_name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        refuse(op, "not_integer", name=name, dtype=type_name(t.dtype))
    if t.numel() and (t.min() < 0 or t.max() >= limit):
        found = t.min() if t.min() < 0 else t.max()
        refuse(op, "index_range", name=name, limit=limit, limit_name=limit_name, found=int(found))


def finite(op: str, name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        refuse(op, "not_finite", name=name)


def class_means(x: Tensor, labels: Tensor, num_classes: int) -> None:
    op = "class_means"
    float_matrix(op, "x", x)
    if num_classes < 1:
        refuse(op, "num_classes", value=num_classes)
    same_device(op, x=x, labels=labels)
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        refuse(op, "labels_per_row", rows=x.shape[0], shape=list(labels.shape))
    indices_in_range(op, "labels", labels, num_classes, "num_classes")
    finite(op, "x", x)


def knn(queries: Tensor, keys: Tensor, k: int, metric: str, ranking: str) -> None:
    op = "knn"
    float_matrix(op, "queries", queries)
    float_matrix(op, "keys", keys)
    same_device(op, queries=queries, keys=keys)
    if queries.dtype != keys.dtype:
        refuse(op, "knn_dtypes", queries=type_name(queries.dtype), keys=type_name(keys.dtype))
    if queries.shape[1] != keys.shape[1]:
        refuse(op, "knn_dims", queries=queries.shape[1], keys=keys.shape[1])
    if metric not in ("euclidean", "cosine"):
        refuse(op, "knn_metric", value=metric)
    if k < 1:
        refuse(op, "knn_k_low", value=k)
    if k > keys.shape[0]:
        refuse(op, "knn_k_high", k=k, keys=keys.shape[0])
    finite(op, "queries", queries)
    finite(op, "keys", keys)
    if ranking not in ("auto", "screening", "int8", "matmul"):
        refuse(op, "knn_ranking", value=ranking)


def alpha_combine(source: Tensor, targets: Tensor, neighbors: Tensor, alphas: Tensor, dim: int) -> None:
    op = "alpha_combine"
    float_matrix(op, "source", source)
    same_device(op, source=source, targets=targets, neighbors=neighbors, alphas=alphas)
    if dim not in (0, 1, -1, -2):
        refuse(op, "combine_dim", value=dim)
    if targets.dim() != 1:
        refuse(op, "combine_targets", shape=list(targets.shape))
    if neighbors.dim() != 2 or neighbors.shape[0] != targets.shape[0]:
        refuse(op, "combine_neighbors", targets=targets.shape[0], shape=list(neighbors.shape))
    if neighbors.shape[1] < 1:
        refuse(op, "combine_k")
    if alphas.shape != neighbors.shape:
        refuse(op, "combine_alphas_shape", expected=list(neighbors.shape), shape=list(alphas.shape))
    if not alphas.dtype.is_floating_point:
        refuse(op, "combine_alphas_float", dtype=type_name(alphas.dtype))
    rows = dim in (0, -2)
    lines = "rows of source" if rows else "columns of source"
    num_lines = source.shape[0 if rows else 1]
    indices_in_range(op, "targets", targets, num_lines, lines)
    indices_in_range(op, "neighbors", neighbors, num_lines, lines)
    finite(op, "alphas", alphas)
    if (alphas == 0).all(dim=1).any():
        refuse(op, "combine_zero_row")
