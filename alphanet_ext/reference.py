"""Pure-torch float64 implementations of the ops (class means, kNN, the alpha combination) and of the training step.

They define what the kernels must compute: the tests compare every kernel with
them, and :mod:`alphanet_ext.ops` falls back to them when the compiled module is
missing. Results are float64 (indices int64) whatever the input dtype, except
the training step's gradients, which come back in their parameters' dtypes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_means", "pairwise_distances", "pair_distances", "knn", "alpha_combine", "coefficient_alphas",
           "coefficient_grads"]

LEAKY_SLOPE = 0.01  # the coefficient networks' activation (kLeakySlope in csrc/coefficient_grads.cpp)


def class_means(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of the rows of ``x``; classes without rows get a zero mean."""
    labels = labels.long()
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.double())
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.clamp_min(1).unsqueeze(1).double(), counts


def pairwise_distances(queries: Tensor, keys: Tensor, metric: str = "euclidean") -> Tensor:
    """Exact float64 distance matrix ``[q, m]`` (euclidean, or cosine = 1 - cos)."""
    q, k = queries.double(), keys.double()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 1.0 - q @ k.T
    if metric != "euclidean":
        raise ValueError(f"knn: metric must be 'euclidean' or 'cosine', got {metric!r}")
    return torch.cdist(q, k, compute_mode="donot_use_mm_for_euclid_dist")


def pair_distances(queries: Tensor, neighbors: Tensor, metric: str = "euclidean") -> Tensor:
    """Distances ``[q, k]`` from each query ``[q, d]`` to its own rows of ``neighbors [q, k, d]``
    (the formulas of :func:`pairwise_distances`; differentiable, zero gradient at zero distance)."""
    q, n = queries.double().unsqueeze(1), neighbors.double()
    if metric == "cosine":
        q = q / q.norm(dim=2, keepdim=True).clamp_min(1e-12)
        n = n / n.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return 1.0 - (q * n).sum(dim=2)
    return torch.linalg.vector_norm(q - n, dim=2)


def knn(queries: Tensor, keys: Tensor, k: int, metric: str = "euclidean",
        chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest keys of every query: ascending distances, ties to the lower index."""
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"knn: k must be in [1, number of keys = {keys.shape[0]}], got {k}")
    distances, indices = [], []
    for begin in range(0, queries.shape[0], chunk):
        d = pairwise_distances(queries[begin:begin + chunk], keys, metric)
        # Stable sort over index-ordered columns: equal distances keep the lower index first.
        sorted_d, order = torch.sort(d, dim=1, stable=True)
        distances.append(sorted_d[:, :k])
        indices.append(order[:, :k])
    if not distances:
        return (torch.empty(0, k, dtype=torch.float64, device=queries.device),
                torch.empty(0, k, dtype=torch.long, device=queries.device))
    return torch.cat(distances), torch.cat(indices)


def alpha_combine(source: Tensor, targets: Tensor, neighbors: Tensor, alphas: Tensor,
                  dim: int = 0) -> Tensor:
    """``out[c] = source[targets[c]] + sum_i alphas[c, i] / ||alphas[c]||_1 * source[neighbors[c, i]]``
    along rows (``dim=0``, result ``[n, cols]``) or columns (``dim=1``, result ``[rows, n]``)."""
    lines = source.double() if dim in (0, -2) else source.double().T
    weights = alphas.double() / alphas.double().abs().sum(dim=1, keepdim=True)
    out = lines[targets.long()] + torch.einsum("ck,ckd->cd", weights, lines[neighbors.long()])
    return out if dim in (0, -2) else out.T


def coefficient_alphas(first_layer: Tensor, rest: Sequence[Tensor], biases: Sequence[Tensor], trials: int) -> Tensor:
    """The stacked coefficient networks after their first matmul: ``first_layer [C_f, T*H]``
    (the shared input times every trial's first layer) -> ``alphas [T, C_f, k]``."""
    h = first_layer.reshape(first_layer.shape[0], trials, -1).transpose(0, 1) + biases[0][:, None, :]
    for w, b in zip(rest, biases[1:]):
        h = torch.baddbmm(b[:, None, :], F.leaky_relu(h, LEAKY_SLOPE), w.transpose(1, 2))
    return h


def coefficient_grads(inputs_t: Tensor, first: Tensor, rest: Sequence[Tensor], biases: Sequence[Tensor],
                      few_bias: Tensor, raw: Tensor, targets: Tensor, neighbors: Tensor, base_lse: Tensor,
                      target_few: Tensor, target_base: Tensor, pred_scale: float,
                      input_ids: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """One training step of the coefficient networks, as ``torch.ops.alphanet._coefficient_grads``
    (arguments as there, ``inputs_t [D, C_f]`` unpacked, or a table of rows with ``input_ids``):
    the per-trial mean cross-entropy ``[T]`` over the base classes (through ``base_lse``) and the
    corrected few classes, and its gradients with respect to ``first``, ``rest``, ``biases`` and
    ``few_bias``, by autograd in float64."""
    if input_ids is not None:
        inputs_t = inputs_t[input_ids].reshape(input_ids.shape[0], -1).T
    parameters = [first, *rest, *biases, few_bias]
    leaves = [p.detach().double().requires_grad_() for p in parameters]
    first64, rest64 = leaves[0], leaves[1:1 + len(rest)]
    biases64, few_bias64 = leaves[1 + len(rest):-1], leaves[-1]
    trials, num_few = few_bias.shape
    with torch.enable_grad():
        alphas = coefficient_alphas(inputs_t.double().T @ first64, rest64, biases64, trials)
        rows = raw.shape[0]
        combined = alpha_combine(raw, targets, neighbors, alphas.reshape(trials * num_few, -1), dim=1)
        scores = pred_scale * (combined.view(rows, trials, num_few) + few_bias64)
        log_total = torch.logaddexp(base_lse.double(), scores.logsumexp(dim=2))
        target_score = torch.where(target_few >= 0, scores.gather(2, target_few.clamp_min(0)[..., None]).squeeze(2),
                                   target_base.double())
        losses = (log_total - target_score).mean(dim=0)
        grads = torch.autograd.grad(losses.sum(), leaves)
    return losses.detach(), [g.to(p.dtype) for g, p in zip(grads, parameters)]
