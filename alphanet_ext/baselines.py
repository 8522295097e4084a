"""Post-hoc peers of AlphaNet on the same features and classifier.

Each returns a ``(weight, bias)`` pair that :func:`alphanet_ext.evaluate`
accepts, so every method is scored the same way.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .data import (ArrayLike, as_tensor, cache_budget, check_features, check_labels, gather_rows, inputs_device,
                   iter_row_chunks, logits, num_rows, resolve_device, streamed_class_means)
from .metrics import EVALUATION_ROWS, checked_scoring_inputs, split_of_classes

__all__ = ["ncm", "tau_normalize", "choose_tau", "logit_adjust", "choose_logit_adjustment", "lws", "crt"]

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


class ClassBalancedRows:
    """Batches of row indices drawn class-balanced: a class uniformly among those with
    samples, then one of its rows uniformly (the decoupling paper's sampler)."""

    def __init__(self, labels: Tensor, num_classes: int, seed: int):
        counts = torch.bincount(labels, minlength=num_classes)
        self.device = labels.device
        self.present = torch.nonzero(counts).flatten()
        self.counts = counts
        self.order = torch.argsort(labels, stable=True)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same rows on every device

    def draw(self, batch_size: int) -> Tensor:
        picked = self.present[torch.randint(self.present.numel(), (batch_size,), generator=self.generator)
                              .to(self.device)]
        within = torch.rand(batch_size, generator=self.generator).to(self.device) * self.counts[picked]
        return self.order[self.offsets[picked] + within.long()]


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
    sampler = ClassBalancedRows(labels, w.shape[0], seed)
    scales = torch.ones(w.shape[0], device=device, requires_grad=True)
    optimizer = torch.optim.SGD([scales], lr=lr, momentum=0.9)
    for _ in range(epochs):
        for _ in range(max(1, samples // batch_size)):
            rows = sampler.draw(batch_size)
            batch = (all_logits[rows] if all_logits is not None
                     else gather_rows(train_x, rows, "train_x", device).float() @ w.T)
            loss = torch.nn.functional.cross_entropy(scales * (batch + b), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    scales = scales.detach()
    return w * scales[:, None], b * scales


def crt(train_x: ArrayLike, train_y: ArrayLike, num_classes: int, epochs: int = 10, batch_size: int = 512,
        lr: float | None = None, momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
        min_steps: int = 500,
        init: tuple[ArrayLike, ArrayLike | None] | None = None,
        device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Classifier re-training (cRT): the last layer trained anew on the frozen features
    with class-balanced sampling, SGD with momentum and a cosine learning rate, from
    zeros (or from ``init = (weight, bias)``). An epoch draws as many rows as the train
    set has, and the whole takes at least ``min_steps`` steps: a small train set
    (a few batches an epoch) would otherwise stop far from converged. ``lr=None`` scales the weight's step to the features, ``2 / mean ||x||^2``,
    and the bias's to its input of 1, ``2`` (the softmax loss's curvature grows with the
    squared input norm, so one fixed rate diverges on some features and crawls on
    others; without weight decay, features scaled by s then give weights scaled by 1/s).

    The gradient is written out rather than taken by autograd: per step, one product
    for the batch's logits, an in-place softmax minus the one-hot targets, and one
    product for the weight's gradient, into buffers allocated once. Runs on ``device``,
    by default the GPU the features are on, else the CPU; returns float32 there."""
    check_features(train_x, "train_x")
    head = as_tensor(train_x[:0], "train_x")
    device = resolve_device(device) if device is not None else (inputs_device(train_x) or torch.device("cpu"))
    samples, dim = num_rows(train_x), train_x.shape[1]
    labels = check_labels(train_y, "train_y", samples, num_classes, device)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"crt: epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    resident = (as_tensor(train_x, "train_x").to(device) if samples * dim * head.element_size() <= cache_budget(device)
                else None)
    if lr is None:
        squared = sum(float(chunk.float().square().sum()) for _, chunk in iter_row_chunks(train_x, "train_x", device))
        lr, bias_lr = 2.0 / max(squared / samples, 1e-12), 2.0
    else:
        bias_lr = lr
    if init is None:
        w = torch.zeros(num_classes, dim, device=device)
        b = torch.zeros(num_classes, device=device)
    else:
        w = as_tensor(init[0], "init weight").float().to(device).clone()
        b = (torch.zeros(num_classes, device=device) if init[1] is None
             else as_tensor(init[1], "init bias").float().to(device).clone())
    sampler = ClassBalancedRows(labels, num_classes, seed)
    velocity_w, velocity_b = torch.zeros_like(w), torch.zeros_like(b)
    grad_w = torch.empty_like(w)
    scores = torch.empty(batch_size, num_classes, device=device)
    positions = torch.arange(batch_size, device=device)
    steps = max(epochs * max(1, samples // batch_size), min_steps)
    for step in range(steps):
        rows = sampler.draw(batch_size)
        x = (resident[rows] if resident is not None else gather_rows(train_x, rows, "train_x", device)).float()
        torch.addmm(b, x, w.T, out=scores)
        torch.softmax(scores, dim=1, out=scores)
        scores[positions, labels[rows]] -= 1.0  # d(mean cross-entropy)/d(logits), times the batch size
        torch.mm(scores.T, x, out=grad_w)
        grad_w.div_(batch_size).add_(w, alpha=weight_decay)
        velocity_w.mul_(momentum).add_(grad_w)
        velocity_b.mul_(momentum).add_(scores.sum(dim=0), alpha=1.0 / batch_size)
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / steps))
        w.sub_(velocity_w, alpha=lr * cosine)
        b.sub_(velocity_b, alpha=bias_lr * cosine)
    return w, b
