"""Why a correction helps: prediction changes and the distance correlation."""
from __future__ import annotations

import torch
from torch import Tensor

from .data import ArrayLike, check_classifier, check_features, check_labels, logits

__all__ = ["prediction_changes", "pearson_with_interval"]


def _predictions(weight: ArrayLike, bias: ArrayLike | None, x: ArrayLike, y: ArrayLike) -> tuple[Tensor, Tensor]:
    w, b = check_classifier(weight, bias, torch.device("cpu"))
    check_features(x, "x", w.shape[1])
    labels = check_labels(y, "y", x.shape[0], w.shape[0], torch.device("cpu"))
    return (logits(x, w, "x", torch.device("cpu")) + b).argmax(dim=1), labels


def prediction_changes(before: tuple[ArrayLike, ArrayLike | None], after: tuple[ArrayLike, ArrayLike | None],
                       x: ArrayLike, y: ArrayLike, classes: Tensor, neighbors: Tensor) -> dict[str, dict[str, int]]:
    """For test samples of ``classes`` (e.g. the few split), how many are correct,
    misclassified as one of their class's neighbours (``neighbors[i]`` belongs to
    ``classes[i]``), or misclassified elsewhere — before and after (paper Fig. 5).
    Pass base classes with neighbours from the few split for the reverse view."""
    table = {}
    neighbor_of = {int(c): set(n.tolist()) for c, n in zip(classes, neighbors)}
    for name, (weight, bias) in (("before", before), ("after", after)):
        predicted, labels = _predictions(weight, bias, x, y)
        counts = {"correct": 0, "as_neighbor": 0, "elsewhere": 0}
        for truth, guess in zip(labels.tolist(), predicted.tolist()):
            if truth not in neighbor_of:
                continue
            if guess == truth:
                counts["correct"] += 1
            elif guess in neighbor_of[truth]:
                counts["as_neighbor"] += 1
            else:
                counts["elsewhere"] += 1
        table[name] = counts
    return table


def pearson_with_interval(x: Tensor, y: Tensor, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Pearson r and its bootstrap 95 % interval (percentile method)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() != y.numel() or x.numel() < 3:
        raise ValueError("pearson_with_interval: need two series of the same length, at least 3")

    def r(a: Tensor, b: Tensor) -> Tensor:
        a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(x.numel(), (resamples, x.numel()), generator=generator)
    samples = r(x[picks], y[picks])
    samples = samples[~torch.isnan(samples)]
    low, high = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"r": float(r(x, y)), "low": low, "high": high}
