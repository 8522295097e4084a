"""Post-hoc peers of AlphaNet on the same features and classifier.

Each returns a ``(weight, bias)`` pair that :func:`alphanet_ext.evaluate`
accepts, so every method is scored the same way.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .data import (ArrayLike, as_tensor, cache_budget, check_features, check_labels, gather_rows, logits, num_rows,
                   streamed_class_means)
from .metrics import EVALUATION_ROWS, checked_scoring_inputs, split_of_classes

__all__ = ["ncm", "tau_normalize", "choose_tau", "logit_adjust", "choose_logit_adjustment", "lws"]

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, ..., 2.0


def ncm(train_x: ArrayLike, train_y: ArrayLike, num_classes: int, metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """Nearest class mean as a linear classifier. ``cosine``: unit-norm means, no
    bias (ranks like cosine similarity); ``euclidean``: ``2 mu_c`` and ``-||mu_c||^2``
    (ranks like ``-||x - mu_c||^2``)."""
    check_features(train_x, "train_x")
    head = as_tensor(train_x[:0], "train_x")  # where and what the features are (a GPU array stays there)
    labels = check_labels(train_y, "train_y", num_rows(train_x), num_classes, head.device)
    means, counts = streamed_class_means(train_x, labels, num_classes, "train_x", head.device, head.dtype)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten()
        raise ValueError(f"ncm: every class needs at least one training sample; class {int(empty[0])} has none "
                         f"({empty.numel()} such classes)")
    if metric == "cosine":
        return means / means.norm(dim=1, keepdim=True).clamp_min(1e-12), torch.zeros(num_classes)
    if metric == "euclidean":
        return 2 * means, -(means * means).sum(dim=1)
    raise ValueError(f"ncm: metric must be 'cosine' or 'euclidean', got {metric!r}")


def _check_tau(tau: float, method: str) -> None:
    if not math.isfinite(tau):
        raise ValueError(f"{method}: tau must be a finite number, got {tau}")


def tau_normalize(weight: ArrayLike, bias: ArrayLike | None, tau: float) -> tuple[Tensor, Tensor]:
    """``w_c / ||w_c||^tau`` (tau=0: unchanged, tau=1: unit-norm rows); the bias is kept."""
    _check_tau(tau, "tau_normalize")
    w = as_tensor(weight, "weight").float()
    b = torch.zeros(w.shape[0]) if bias is None else as_tensor(bias, "bias").float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau), b.clone()


def logit_adjust(weight: ArrayLike, bias: ArrayLike | None, counts: ArrayLike, tau: float) -> tuple[Tensor, Tensor]:
    """Subtracts ``tau * log prior_c`` (prior from train counts ``[C]``) from every class's score."""
    _check_tau(tau, "logit_adjust")
    w = as_tensor(weight, "weight").float()
    b = torch.zeros(w.shape[0]) if bias is None else as_tensor(bias, "bias").float()
    return w.clone(), (b.double() - tau * _log_prior(counts, w.shape[0])).float()


def _log_prior(counts: ArrayLike, num_classes: int) -> Tensor:
    """log(n_c / sum n), float64 on the CPU, from train counts ``[C]``."""
    counts = torch.as_tensor(counts).double().cpu()
    if counts.shape != (num_classes,):
        raise ValueError(f"logit_adjust: counts must have shape [{num_classes}], got {tuple(counts.shape)}")
    unusable = ~(torch.isfinite(counts) & (counts > 0))
    if bool(unusable.any()):
        first = int(unusable.nonzero()[0])
        raise ValueError(f"logit_adjust: every class needs a positive train count; class {first} has "
                         f"{counts[first].item():g} ({int(unusable.sum())} such classes)")
    return (counts / counts.sum()).log()


def _best_on_val(weight: ArrayLike, bias: ArrayLike | None, val_x: ArrayLike, val_y: ArrayLike, splits: dict,
                 grid: Sequence[float], scores: Callable[[Tensor, Tensor, float], Tensor]) -> float:
    """The ``tau`` of ``grid`` with the best overall val top-1 (ties: the smaller).
    ``scores(logits, bias, tau)`` rescores a block of val logits for one ``tau``, so
    the val features are multiplied by the classifier once, not once per ``tau``."""
    for tau in grid:
        _check_tau(tau, "the tau grid")
    w, b, labels, device = checked_scoring_inputs(weight, bias, val_x, val_y, None, ("val_x", "val_y"))
    split_of_classes(splits, w.shape[0])  # checked as evaluate() would
    correct = torch.zeros(len(grid), dtype=torch.long)
    for begin in range(0, labels.numel(), EVALUATION_ROWS):
        block = logits(val_x, w, "val_x", device, begin, begin + EVALUATION_ROWS)
        truth = labels[begin:begin + block.shape[0]]
        for index, tau in enumerate(grid):
            correct[index] += int((scores(block, b, tau).argmax(dim=1) == truth).sum())
    best = max(range(len(grid)), key=lambda index: (int(correct[index]), -grid[index]))
    return grid[best]


def choose_tau(weight: ArrayLike, bias: ArrayLike | None, val_x: ArrayLike | None, val_y: ArrayLike | None,
               splits: dict, grid: Sequence[float] = DEFAULT_GRID) -> tuple[float, tuple[Tensor, Tensor]]:
    """tau-normalisation with tau chosen on val (overall top-1); tau=1 without a val set."""
    if val_x is None:
        return 1.0, tau_normalize(weight, bias, 1.0)
    norms = as_tensor(weight, "weight").float().norm(dim=1).clamp_min(1e-12)
    tau = _best_on_val(weight, bias, val_x, val_y, splits, grid,
                       lambda block, b, tau: block / norms.to(block.device).pow(tau) + b)
    return tau, tau_normalize(weight, bias, tau)


def choose_logit_adjustment(weight: ArrayLike, bias: ArrayLike | None, counts: ArrayLike, val_x: ArrayLike | None,
                            val_y: ArrayLike | None, splits: dict,
                            grid: Sequence[float] = DEFAULT_GRID) -> tuple[float, tuple[Tensor, Tensor]]:
    """Logit adjustment with tau chosen on val; tau=1 without a val set."""
    if val_x is None:
        return 1.0, logit_adjust(weight, bias, counts, 1.0)
    log_prior = _log_prior(counts, num_rows(weight))
    tau = _best_on_val(weight, bias, val_x, val_y, splits, grid,
                       lambda block, b, tau: block + (b.double() - tau * log_prior.to(b.device)).float())
    return tau, logit_adjust(weight, bias, counts, tau)


def lws(weight: ArrayLike, bias: ArrayLike | None, train_x: ArrayLike, train_y: ArrayLike, epochs: int = 10,
        batch_size: int = 512, lr: float = 0.01, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Learnable weight scaling: one scale per class (``s_c w_c``, ``s_c b_c``), the
    classifier itself fixed, trained with class-balanced sampling (each class
    equally likely, then a uniform member)."""
    device = as_tensor(train_x[:0], "train_x").device
    w = as_tensor(weight, "weight").float().to(device)
    b = torch.zeros(w.shape[0], device=device) if bias is None else as_tensor(bias, "bias").float().to(device)
    samples = num_rows(train_x)
    labels = check_labels(train_y, "train_y", samples, w.shape[0], device)
    # every sample's logits, computed once where they fit (11.5 GB at iNaturalist size); otherwise each batch's
    all_logits = logits(train_x, w, "train_x", device) if samples * w.shape[0] * 4 <= cache_budget(device) else None
    counts = torch.bincount(labels, minlength=w.shape[0])
    present = torch.nonzero(counts).flatten()
    order = torch.argsort(labels, stable=True)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    generator = torch.Generator().manual_seed(seed)
    scales = torch.ones(w.shape[0], device=device, requires_grad=True)
    optimizer = torch.optim.SGD([scales], lr=lr, momentum=0.9)
    for _ in range(epochs):
        for _ in range(max(1, samples // batch_size)):
            picked = present[torch.randint(present.numel(), (batch_size,), generator=generator).to(device)]
            within = torch.rand(batch_size, generator=generator).to(device) * counts[picked]
            rows = order[offsets[picked] + within.long()]
            batch = (all_logits[rows] if all_logits is not None
                     else gather_rows(train_x, rows, "train_x", device).float() @ w.T)
            loss = torch.nn.functional.cross_entropy(scales * (batch + b), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    scales = scales.detach()
    return w * scales[:, None], b * scales
