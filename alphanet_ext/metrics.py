"""Splits by training frequency, and top-1 / top-5 accuracy per split."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .data import ArrayLike, check_classifier, check_features, check_labels, inputs_device, logits, resolve_device

SPLIT_NAMES = ("many", "medium", "few")
EVALUATION_ROWS = 4096  # samples scored at once by evaluate()


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population standard deviation (over trials)."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    return {"mean": float(tensor.mean()), "std": float(tensor.std(unbiased=False)) if tensor.numel() > 1 else 0.0}


def make_splits(counts: ArrayLike, few_threshold: int = 20, many_threshold: int = 100) -> dict[str, Tensor]:
    """Class ids per split from per-class train counts ``[C]`` (a tensor, array or
    list; e.g. ``torch.bincount(train_y)``): few ``n < few_threshold``, many
    ``n > many_threshold``, medium in between (inclusive)."""
    if not 0 < few_threshold <= many_threshold + 1:
        raise ValueError(f"need 0 < few_threshold <= many_threshold + 1, got {few_threshold}, {many_threshold}")
    counts = torch.as_tensor(counts).cpu()
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D, one per class, got shape {tuple(counts.shape)}")
    if counts.is_floating_point() and not bool(torch.isfinite(counts).all()):
        raise ValueError("counts contains NaN or inf")
    if bool((counts < 0).any()):
        raise ValueError(f"counts must be >= 0, got {counts.min().item()} (class {int(counts.argmin())})")
    return {
        "many": torch.nonzero(counts > many_threshold).flatten(),
        "medium": torch.nonzero((counts >= few_threshold) & (counts <= many_threshold)).flatten(),
        "few": torch.nonzero(counts < few_threshold).flatten(),
    }


def split_of_classes(splits: Mapping[str, Tensor], num_classes: int) -> Tensor:
    """Split index (0 many, 1 medium, 2 few, -1 none) of every class."""
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"splits: unknown split {unknown[0]!r} (the splits are {', '.join(SPLIT_NAMES)})")
    which = torch.full((num_classes,), -1, dtype=torch.long)
    for index, name in enumerate(SPLIT_NAMES):
        ids = torch.as_tensor(splits.get(name, []), dtype=torch.long).cpu().flatten()
        outside = ids[(ids < 0) | (ids >= num_classes)]
        if outside.numel():
            raise ValueError(f"splits[{name!r}] has class {int(outside[0])}, outside the classifier's "
                             f"{num_classes} classes")
        taken = which[ids]
        if bool((taken >= 0).any()):
            other = SPLIT_NAMES[int(taken[taken >= 0][0])]
            raise ValueError(f"splits: class {int(ids[taken >= 0][0])} is in both {other!r} and {name!r}")
        which[ids] = index
    return which


def accuracy_by_split(correct: Tensor, labels: Tensor, splits: Mapping[str, Tensor], num_classes: int) -> dict[str, float]:
    """Percent of correct samples per split (by true class) and overall."""
    which = split_of_classes(splits, num_classes).to(labels.device)[labels]
    result = {}
    for index, name in enumerate(SPLIT_NAMES):
        mask = which == index
        result[name] = float(correct[mask].float().mean() * 100) if bool(mask.any()) else float("nan")
    result["overall"] = float(correct.float().mean() * 100) if correct.numel() else float("nan")
    return result


def checked_scoring_inputs(weight: ArrayLike, bias: ArrayLike | None, x: ArrayLike, y: ArrayLike,
                           device: torch.device | str | None, names: tuple[str, str] = ("x", "y")
                           ) -> tuple[Tensor, Tensor, Tensor, torch.device]:
    """``(weight, bias, labels, device)`` for scoring ``x`` with the classifier, all
    checked; ``device`` defaults to the GPU ``weight`` or ``x`` is on, else the CPU."""
    if device is None:
        device = inputs_device(weight, x) or "cpu"
    device = resolve_device(device)
    w, b = check_classifier(weight, bias, device)
    check_features(x, names[0], w.shape[1])
    return w, b, check_labels(y, names[1], x.shape[0], w.shape[0], device), device


def evaluate(weight: ArrayLike, bias: ArrayLike | None, x: ArrayLike, y: ArrayLike,
             splits: Mapping[str, ArrayLike] | None = None, device: torch.device | str | None = None) -> dict:
    """Top-1 and top-5 accuracy (percent) of the linear classifier on ``(x, y)``.

    Returns ``{"top1": {many, medium, few, overall}, "top5": {...},
    "per_class_top1": Tensor [C] (NaN for classes without samples), "samples": N,
    "predictions": Tensor [N] (top-1 class of every sample, on the CPU)}``.
    ``splits`` is a mapping with ``many`` / ``medium`` / ``few`` class ids
    (for instance ``FitResult.splits`` or ``make_splits(counts)``); a split
    it leaves out, or all three with ``splits=None``, scores NaN. ``device``
    defaults to the GPU ``weight`` or ``x`` is on (``cuda:1`` stays ``cuda:1``), else the CPU.
    """
    splits = {} if splits is None else splits
    w, b, labels, device = checked_scoring_inputs(weight, bias, x, y, device)
    top = torch.empty(labels.numel(), min(5, w.shape[0]), dtype=torch.long, device=device)
    for begin in range(0, labels.numel(), EVALUATION_ROWS):  # all scores at once ([N, C]) may not fit in memory
        scores = logits(x, w, "x", device, begin, begin + EVALUATION_ROWS).add_(b)
        top[begin:begin + scores.shape[0]] = scores.topk(top.shape[1], dim=1).indices
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(dim=1)
    per_class_total = torch.bincount(labels, minlength=w.shape[0]).float()
    per_class_hits = torch.bincount(labels, weights=correct1.float(), minlength=w.shape[0])
    return {
        "top1": accuracy_by_split(correct1, labels, splits, w.shape[0]),
        "top5": accuracy_by_split(correct5, labels, splits, w.shape[0]),
        "per_class_top1": (per_class_hits / per_class_total * 100).cpu(),
        "samples": int(labels.numel()),
        "predictions": top[:, 0].cpu(),
    }
