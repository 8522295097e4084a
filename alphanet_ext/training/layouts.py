"""Where a fit's data lives: one process, rows split over the ranks of a
``torch.distributed`` group, or rows and classes split. Each layout makes the
fit's stages for its case (class statistics, neighbours, the training step, the
logit cache, the val scorer), so :func:`alphanet_ext.fit.fit_with_config` runs
one pipeline whatever the layout, and a new layout is one more class here."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import FitConfig
from ..data import ArrayLike, as_tensor, cache_budget, release_freed_host_memory
from . import sharded
from .cache import CacheSizes, LogitCache
from .checkpoint import digest
from .sampler import EpochSampler
from .selection import ValScorer
from .sharding import Shard
from .statistics import ClassStatistics, class_statistics, find_neighbors
from .step import TrainStep


def step_options(config: FitConfig) -> tuple:
    return config.hidden, config.trials, config.seed, config.lr, config.weight_decay, config.pred_scale


class OneProcess:
    """Every row and class in this process."""

    shard: Shard | None = None
    reads_all_classes = True

    def classes(self, num_classes: int) -> tuple[int, int] | None:
        """The slice of the classifier this process reads (None: all of it)."""
        return None

    def sizes(self, sizes: CacheSizes, device: torch.device) -> CacheSizes:
        return sizes

    def show_progress(self, wanted: bool) -> bool:
        return wanted

    def agree(self, facts: dict[str, Any], train_rows: int, val_rows: int | None) -> None:
        """Refuses inputs the processes disagree on (nothing to compare in one process)."""

    def full_bias(self, b: Tensor, bias: ArrayLike | None, num_classes: int, device: torch.device) -> Tensor:
        return b

    def statistics(self, train_x: ArrayLike, labels: Tensor, num_classes: int, config: FitConfig,
                   device: torch.device, resident: Tensor | None, show: bool) -> ClassStatistics:
        return class_statistics(train_x, labels, num_classes, config.few_threshold, config.many_threshold, config.k,
                                device, resident, show)

    def neighbors(self, stats: ClassStatistics, num_classes: int, config: FitConfig) -> None:
        find_neighbors(stats, config.k, config.metric, config.seed)

    def all_labels(self, labels: Tensor) -> Tensor:
        """Every process's train labels, in global row order (what the epoch sampler draws from)."""
        return labels

    def step(self, w: Tensor, full_bias: Tensor, stats: ClassStatistics, num_classes: int,
             config: FitConfig) -> TrainStep:
        return TrainStep(w, full_bias, stats.few, stats.neighbors, *step_options(config), config.cuda_graphs)

    def cache(self, train_rows: ArrayLike, labels: Tensor, all_labels: Tensor, w: Tensor, full_bias: Tensor,
              stats: ClassStatistics, sampler: EpochSampler, options: tuple) -> LogitCache:
        return LogitCache(train_rows, labels, w, full_bias, stats.few, sampler.few_rows, *options)

    def scorer(self, cache: LogitCache, val_labels: Tensor, stats: ClassStatistics, num_classes: int) -> ValScorer:
        return ValScorer(cache, val_labels, stats.few, stats.neighbors, stats.splits)

    def any_rank(self, stop: bool) -> bool:
        """True if any process asks to stop (a callback's answer)."""
        return stop

    def writes(self) -> bool:
        """Whether this process writes shared files (checkpoints)."""
        return True

    def describe(self) -> dict[str, Any]:
        return {}


class RowSharded(OneProcess):
    """Each rank holds its rows of the train and val sets; class sums, the epoch's
    draw and the step's gradients are shared (``sharded.py``)."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def sizes(self, sizes: CacheSizes, device: torch.device) -> CacheSizes:
        if device.type == "cpu" and sizes.budget is None:  # the ranks likely share the host
            return dataclasses.replace(sizes, budget=cache_budget(device) / self.shard.world)
        return sizes

    def show_progress(self, wanted: bool) -> bool:
        return wanted and self.shard.rank == 0

    def agree(self, facts: dict[str, Any], train_rows: int, val_rows: int | None) -> None:
        self.shard.check_agreement(facts, {"train": train_rows, "val": val_rows or 0})
        if val_rows is not None and self.shard.offsets["val"][-1] == 0:
            raise ValueError("val_x has no samples on any rank; pass val_x=None to train without a validation set")

    def statistics(self, train_x, labels, num_classes, config, device, resident, show) -> ClassStatistics:
        return sharded.row_sharded_statistics(self.shard, train_x, labels, num_classes, config.few_threshold,
                                              config.many_threshold, config.k, device, resident)

    def neighbors(self, stats, num_classes, config) -> None:
        sharded.broadcast_neighbors(self.shard, stats, lambda s: find_neighbors(s, config.k, config.metric,
                                                                                config.seed))

    def all_labels(self, labels: Tensor) -> Tensor:
        return sharded.gathered_labels(self.shard, labels, "train")

    def step(self, w, full_bias, stats, num_classes, config) -> TrainStep:
        return sharded.RowShardedStep(self.shard, w, full_bias, stats.few, stats.neighbors, *step_options(config),
                                      config.cuda_graphs)

    def cache(self, train_rows, labels, all_labels, w, full_bias, stats, sampler, options) -> LogitCache:
        return sharded.RowShardedCache(self.shard, train_rows, labels, w, full_bias, stats.few, sampler.few_rows,
                                       *options)

    def _reduce_counts(self) -> Callable[[Tensor], Tensor]:
        return lambda counts: self.shard.all_reduce(counts, what="the val counts")

    def scorer(self, cache, val_labels, stats, num_classes) -> ValScorer:
        return ValScorer(cache, val_labels, stats.few, stats.neighbors, stats.splits,
                         reduce_counts=self._reduce_counts())

    def any_rank(self, stop: bool) -> bool:
        flag = torch.tensor([int(stop)])
        return bool(self.shard.all_reduce(flag, dist.ReduceOp.MAX, "the callbacks' stop")[0])

    def writes(self) -> bool:
        return self.shard.rank == 0

    def describe(self) -> dict[str, Any]:
        return self.shard.describe()


class ClassSharded(RowSharded):
    """Rows and classes split: each rank reads ``W[C/R]`` and holds its classes'
    means; the step runs in the compact space of the columns it reads (every few
    class and its neighbours), gathered once per chunk (``ClassShardedCache``), and
    over several ranks it is split by few class (``FewSplitStep``)."""

    reads_all_classes = False

    def classes(self, num_classes: int) -> tuple[int, int]:
        return self.shard.class_range(num_classes)

    def sizes(self, sizes: CacheSizes, device: torch.device) -> CacheSizes:
        sizes = super().sizes(sizes, device)
        if device.type == "cpu":  # ranks sharing a host: a chunk's logits per rank fall as 1/R too
            return dataclasses.replace(sizes, chunk_values=max(1, sizes.chunk_values // self.shard.world))
        return sizes

    def full_bias(self, b, bias, num_classes, device) -> Tensor:
        return (torch.zeros(num_classes, device=device) if bias is None
                else as_tensor(bias, "bias", device).float())

    # Each set-up stage ends by handing its freed temporaries back to the host (CPU ranks share it).
    def statistics(self, train_x, labels, num_classes, config, device, resident, show) -> ClassStatistics:
        stats = sharded.class_sharded_statistics(self.shard, train_x, labels, num_classes, config.few_threshold,
                                                 config.many_threshold, config.k, device, resident)
        release_freed_host_memory()
        return stats

    def neighbors(self, stats, num_classes, config) -> None:
        sharded.class_sharded_neighbors(self.shard, stats, num_classes, config.k, config.metric, config.seed)
        # nothing after the neighbours reads a rank's means (the report reads the file's once):
        # only their digest, for the checkpoint's fingerprint, is kept
        stats.means_digest, stats.means = digest(stats.means), None
        release_freed_host_memory()

    def _columns(self, stats: ClassStatistics) -> tuple[Tensor, Tensor, Tensor]:
        """The columns the step reads, and the few classes' and neighbours' places among them
        (worked out once per fit: the step, the cache and the scorer all read them)."""
        if getattr(self, "_columns_of", (None,))[0] is not stats:
            columns = torch.unique(torch.cat([stats.few, stats.neighbors.flatten()]))
            self._columns_of = (stats, (columns, torch.searchsorted(columns, stats.few),
                                        torch.searchsorted(columns, stats.neighbors)))
        return self._columns_of[1]

    def _wanted(self, stats: ClassStatistics) -> list[Tensor] | None:
        """Over several ranks: the places among the columns that each rank's block of few
        classes reads (its classes and their neighbours), sorted; a training batch's logits
        reach each rank in those columns only. None in one process."""
        if self.shard.world == 1:
            return None
        _, few_at, neighbors_at = self._columns(stats)
        blocks = [self.shard.class_range(few_at.numel(), rank) for rank in range(self.shard.world)]
        return [torch.unique(torch.cat([few_at[first:end], neighbors_at[first:end].flatten()]))
                for first, end in blocks]

    def step(self, w, full_bias, stats, num_classes, config) -> TrainStep:
        columns, few_at, neighbors_at = self._columns(stats)
        if self.shard.world > 1:  # each rank trains the networks on its block of the few classes
            step = sharded.FewSplitStep(self.shard, w, columns, full_bias[stats.few], few_at, neighbors_at,
                                        self._wanted(stats), num_classes, config.hidden,
                                        config.trials, config.seed, config.lr, config.weight_decay,
                                        config.pred_scale)
            release_freed_host_memory()
            return step
        return TrainStep(sharded.owned_rows(self.shard, num_classes, columns, w), full_bias[columns], few_at,
                         neighbors_at, *step_options(config), config.cuda_graphs)

    def cache(self, train_rows, labels, all_labels, w, full_bias, stats, sampler, options) -> LogitCache:
        columns = self._columns(stats)[0]
        return sharded.ClassShardedCache(self.shard, train_rows, all_labels, w, full_bias, stats.few, columns,
                                         sampler.few_rows, *options, wanted=self._wanted(stats))

    def scorer(self, cache, val_labels, stats, num_classes) -> ValScorer:
        _, few_at, neighbors_at = self._columns(stats)
        return ValScorer(cache, val_labels, few_at, neighbors_at, stats.splits, few_ids=stats.few,
                         num_classes=num_classes, reduce_counts=self._reduce_counts())


def layout_of(process_group: Any, shard_classes: bool) -> OneProcess:
    """The layout a fit's ``process_group`` and ``shard_classes`` ask for."""
    if process_group is None:
        if shard_classes:
            raise ValueError("shard_classes=True needs a process_group (a class-sharded fit runs over several ranks)")
        return OneProcess()
    shard = Shard.of(process_group, "classes" if shard_classes else "rows")
    return ClassSharded(shard) if shard_classes else RowSharded(shard)
