"""Class statistics: per-class means and counts, the splits, and every few
class's neighbours among the base classes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..data import ArrayLike, as_tensor, streamed_class_means
from ..metrics import make_splits
from . import progress


@dataclass
class ClassStatistics:
    means: Tensor | None         # [C, d] float32; None once a class-sharded fit no longer needs them
    counts: Tensor               # [C]
    splits: dict[str, Tensor]    # many / medium / few class ids (CPU)
    few: Tensor                  # few class ids, on the fit's device
    base: Tensor                 # many and medium class ids, sorted, on the fit's device
    neighbors: Tensor | None = None           # [C_f, k]
    neighbor_distances: Tensor | None = None  # [C_f, k]
    means_digest: str | None = None           # of the means, kept where the means are dropped


def keeps_features_on(device: torch.device, train_x: ArrayLike) -> bool:
    """Whether to hold a copy of host features on ``device`` for the whole fit.

    Each epoch gathers scattered base rows; on a GPU, reading them from host
    memory (or a memory-mapped file) every chunk costs far more than one upload
    during the class-means pass, which reads every row anyway. The copy may take
    a quarter of the free device memory; the logit caches need the rest.
    """
    if device.type != "cuda" or as_tensor(train_x[:0], "train_x").is_cuda:  # already on a GPU
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return as_tensor(train_x[:0], "train_x").element_size() * math.prod(train_x.shape) <= free // 4


def class_statistics(train_x: ArrayLike, labels: Tensor, num_classes: int, few_threshold: int, many_threshold: int,
                     k: int, device: torch.device, resident: Tensor | None = None,
                     show_progress: bool = False) -> ClassStatistics:
    """Means, counts and splits from one streamed pass over ``train_x`` (a memory-mapped
    file is read once, in chunks); ``resident``, if given, receives a copy of every row.
    Refuses data AlphaNet cannot correct: an empty class, no few or no base class, k too large."""
    bar = progress.bar(show_progress, total=labels.numel(), desc="class means", unit="row", leave=False)

    def each_chunk(begin: int, chunk: Tensor) -> None:
        bar.update(chunk.shape[0])
        if resident is not None:
            resident[begin:begin + chunk.shape[0]] = chunk

    means, counts = streamed_class_means(train_x, labels, num_classes, "train_x", device, each_chunk=each_chunk)
    bar.close()
    return statistics_of(means, counts, few_threshold, many_threshold, k, device)


def statistics_of(means: Tensor, counts: Tensor, few_threshold: int, many_threshold: int, k: int,
                  device: torch.device) -> ClassStatistics:
    """The splits of classes with these ``counts``; refuses an empty class, no few or
    no base class, or k larger than the base split."""
    splits = make_splits(counts, few_threshold, many_threshold)
    few, base = splits["few"].to(device), torch.cat([splits["many"], splits["medium"]]).sort().values.to(device)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"{len(empty)} class(es) have no training samples ({shown}); AlphaNet needs at least one "
                         "sample per class for its class mean")
    if few.numel() == 0:
        raise ValueError(f"no few-split class (fewer than {few_threshold} training samples): nothing to correct")
    if base.numel() == 0:
        raise ValueError(f"no base class (many or medium split, at least {few_threshold} training samples): "
                         "few classes have no neighbours to borrow from")
    if k > base.numel():
        raise ValueError(f"k={k} is larger than the base split ({base.numel()} classes)")
    return ClassStatistics(means, counts, splits, few, base)


def find_neighbors(stats: ClassStatistics, k: int, metric: str, seed: int) -> ClassStatistics:
    """Fills in each few class's ``k`` neighbours: the nearest base classes by
    ``metric`` between class means (ties to the lower class id), or, for
    ``"random"`` (the method's control), ``k`` base classes drawn from ``seed``."""
    few, base, means = stats.few, stats.base, stats.means
    if metric == "random":
        control = torch.Generator().manual_seed(seed)
        picks = torch.stack([torch.randperm(base.numel(), generator=control)[:k] for _ in range(few.numel())])
        stats.neighbors = base[picks.to(base.device)]
        stats.neighbor_distances = (means[few][:, None, :] - means[stats.neighbors]).norm(dim=2)
    else:
        stats.neighbor_distances, nearest = ops.knn(means[few], means[base], k, metric)
        stats.neighbors = base[nearest]
    return stats
