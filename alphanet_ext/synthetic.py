"""Synthetic long-tailed problems with a known class hierarchy.

Classes come in groups (siblings share a group centre, so a rare class has
close frequent neighbours, like dog breeds); per-class train counts decay
exponentially from ``max_count`` to ``min_count`` and are dealt to classes at
random; val and test sets are balanced. The base classifier is fitted on the
imbalanced train set as an ordinary (instance-balanced) model would be, so its
rare classes are weak — the situation AlphaNet corrects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LongTailedProblem", "make_long_tailed", "long_tail_counts", "train_softmax_classifier",
           "gaussian_classifier", "PRESETS", "preset_counts", "make_preset"]


@dataclass(frozen=True)
class Preset:
    """Split sizes of a real long-tailed dataset (classes, train samples and count range per split)."""
    dim: int
    classes: tuple[int, int, int]          # many, medium, few
    samples: tuple[int, int, int]
    ranges: tuple[tuple[int, int], ...]    # (min, max) per-class count per split
    val_per_class: int
    test_per_class: int


PRESETS = {
    "cifar100-lt": Preset(64, (35, 35, 30), (8824, 1718, 305), ((102, 500), (20, 98), (5, 19)), 0, 100),
    "imagenet-lt": Preset(2048, (385, 479, 136), (88693, 25510, 1643), ((101, 1280), (20, 100), (5, 19)), 20, 50),
    "places-lt": Preset(2048, (131, 163, 71), (52762, 8934, 804), ((103, 4980), (20, 100), (5, 19)), 20, 100),
    "inat2018": Preset(2048, (698, 2929, 4515), (193858, 98598, 60781), ((101, 800), (20, 100), (1, 19)), 3, 3),
}


def _profile(classes: int, total: int, low: int, high: int) -> Tensor:
    """``classes`` counts in [low, high], decaying from high to low, summing to about ``total``."""
    if classes == 0:
        return torch.zeros(0, dtype=torch.long)
    position = torch.linspace(0, 1, classes, dtype=torch.float64)
    lo_exp, hi_exp = 1e-3, 1e3
    for _ in range(100):  # bisection on the decay exponent
        exponent = math.sqrt(lo_exp * hi_exp)
        counts = low + (high - low) * (1 - position) ** exponent
        if counts.sum() > total:
            lo_exp = exponent
        else:
            hi_exp = exponent
    return counts.round().long().clamp(low, high)


def preset_counts(name: str, scale: float = 1.0) -> Tensor:
    """Per-class train counts of a preset (``scale`` < 1 shrinks the number of classes)."""
    preset = PRESETS[name]
    parts = []
    for classes, samples, (low, high) in zip(preset.classes, preset.samples, preset.ranges):
        kept = max(1, round(classes * scale))
        parts.append(_profile(kept, round(samples * kept / classes), low, high))
    return torch.cat(parts)


def make_preset(name: str, scale: float = 1.0, seed: int = 0, dim: int | None = None) -> "LongTailedProblem":
    """A synthetic problem shaped like a real dataset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    preset = PRESETS[name]
    return make_long_tailed(counts=preset_counts(name, scale), dim=dim or preset.dim,
                            val_per_class=preset.val_per_class, test_per_class=preset.test_per_class, seed=seed)


@dataclass
class LongTailedProblem:
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    weight: Tensor        # [C, d] base classifier
    bias: Tensor          # [C]
    groups: Tensor        # [C] group (parent) id of every class
    class_centers: Tensor  # [C, d] true class means


def long_tail_counts(num_classes: int, max_count: int, min_count: int) -> Tensor:
    """Exponentially decaying per-class counts from ``max_count`` to ``min_count``."""
    if num_classes == 1:
        return torch.tensor([max_count])
    ratio = torch.arange(num_classes, dtype=torch.float64) / (num_classes - 1)
    return (max_count * (min_count / max_count) ** ratio).round().long().clamp_min(1)


def train_softmax_classifier(x: Tensor, y: Tensor, num_classes: int, steps: int = 300, lr: float = 0.05,
                             weight_decay: float = 5e-4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression by full-batch Adam on the (imbalanced) data."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, x.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()


def gaussian_classifier(means: Tensor, counts: Tensor, noise: float) -> tuple[Tensor, Tensor]:
    """Closed-form classifier of isotropic Gaussians with the train prior
    (what instance-balanced training converges to, at a cost of O(C d))."""
    weight = means / noise**2
    bias = -(means * means).sum(dim=1) / (2 * noise**2) + torch.log(counts.double() / counts.sum()).float()
    return weight, bias


def make_long_tailed(num_classes: int = 100, dim: int = 64, max_count: int = 500, min_count: int = 5,
                     counts: Tensor | None = None, group_size: int = 5, val_per_class: int = 20, test_per_class: int = 50,
                     group_scale: float = 1.0, class_scale: float = 0.35, noise: float = 1.0,
                     intrinsic_dim: int = 64, classifier: str = "auto", seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> LongTailedProblem:
    """A synthetic long-tailed classification problem (see the module docstring).

    ``counts`` (per-class train counts) overrides the exponential profile of
    ``max_count``..``min_count``. Like real backbone features, the data lives
    near an ``intrinsic_dim``-dimensional subspace (a random orthonormal
    embedding plus small isotropic noise), so the difficulty does not grow with
    ``dim``. ``classifier``: ``"softmax"``
    (trained logistic regression), ``"gaussian"``
    (closed form, for presets too large to train here) or ``"auto"``
    (softmax when the train set times classes is small).
    """
    generator = torch.Generator().manual_seed(seed)
    if counts is None:
        counts = long_tail_counts(num_classes, max_count, min_count)
    counts = torch.as_tensor(counts, dtype=torch.long)
    num_classes = counts.numel()
    counts = counts[torch.randperm(num_classes, generator=generator)]
    num_groups = max(1, math.ceil(num_classes / group_size))
    groups = torch.randperm(num_classes, generator=generator) % num_groups
    latent = min(dim, intrinsic_dim)
    scale = 8.0 / math.sqrt(latent)
    group_centers = torch.randn(num_groups, latent, generator=generator) * group_scale * scale
    latent_centers = group_centers[groups] + torch.randn(num_classes, latent, generator=generator) * class_scale * scale
    embedding = None if latent == dim else torch.linalg.qr(torch.randn(dim, latent, generator=generator))[0].T
    ambient_noise = 0.05 if embedding is not None else 0.0
    centers = latent_centers if embedding is None else latent_centers @ embedding

    def sample(per_class: Tensor) -> tuple[Tensor, Tensor]:
        labels = torch.repeat_interleave(torch.arange(num_classes), per_class)
        labels = labels[torch.randperm(labels.numel(), generator=generator)]
        features = torch.empty(labels.numel(), dim, dtype=dtype)
        for begin in range(0, labels.numel(), 65536):  # bounded temporaries for large presets
            block = labels[begin:begin + 65536]
            points = latent_centers[block] + torch.randn(block.numel(), latent, generator=generator) * noise
            if embedding is not None:
                points = points @ embedding + torch.randn(block.numel(), dim, generator=generator) * ambient_noise
            features[begin:begin + block.numel()] = points.to(dtype)
        return features, labels

    train_x, train_y = sample(counts)
    val_x, val_y = sample(torch.full((num_classes,), val_per_class))
    test_x, test_y = sample(torch.full((num_classes,), test_per_class))
    if classifier == "auto":
        classifier = "softmax" if train_y.numel() * num_classes * dim <= 2e9 else "gaussian"
    if classifier == "softmax":
        weight, bias = train_softmax_classifier(train_x.float(), train_y, num_classes, seed=seed)
    elif classifier == "gaussian":
        from .ops import class_means
        means, _ = class_means(train_x, train_y, num_classes)
        weight, bias = gaussian_classifier(means, counts, noise)
    else:
        raise ValueError(f"classifier must be 'softmax', 'gaussian' or 'auto', got {classifier!r}")
    return LongTailedProblem(train_x, train_y, val_x, val_y, test_x, test_y, weight, bias, groups, centers)
