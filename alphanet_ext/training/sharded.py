"""The stages of a fit sharded over ranks: other implementations of the class
statistics, the logit cache and the step of :mod:`alphanet_ext.fit`.

Row-sharded (``mode="rows"``): each rank holds some of the train and val rows
and the whole classifier. Class sums and counts are all-reduced; rank 0 finds
the neighbours and broadcasts them. Every rank draws the same epoch (the same
seed over the same global labels), computes the logits of the drawn rows it
holds, packed per trial and padded with neutral rows, and the step's
gradients are all-reduced, so every rank holds the same networks.

Class-sharded (``mode="classes"``): each rank also holds only a contiguous
slice of the classes, ``W[C/R]``. The step reads only the columns the
α-combination needs (``U``: every few class and its neighbours), the base
classes' log-sum-exp and the target's score, so a batch's logits are reduced
across ranks to exactly those: features of the batch's rows are gathered,
each rank computes its slice of the logits, the log-sum-exp is combined (max,
then sum) and the ``U`` columns are gathered. The step then runs on the same
compact batch on every rank.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..data import ArrayLike, cache_budget, release_freed_host_memory, streamed_class_sums
from . import progress
from .cache import Batch, CacheSizes, LogitCache
from .sharding import RankFailure, Shard
from .statistics import ClassStatistics, statistics_of
from .step import CoefficientNets, Diverged, FusedAdamW, GatheredInputs, TrainStep

# A padding row's base log-sum-exp and target score: its loss is log(exp(P) + sum exp(s)) - P = 0
# and its gradients exp(s - P) = 0 exactly in float32 for any finite score s far below P.
PAD_SCORE = 1e30


# --------------------------------------------------------------------------- class statistics

def row_sharded_statistics(shard: Shard, train_x: ArrayLike, labels: Tensor, num_classes: int, few_threshold: int,
                           many_threshold: int, k: int, device: torch.device,
                           resident: Tensor | None = None) -> ClassStatistics:
    """Class means from every rank's sums and counts (all-reduced), so every rank holds the same."""
    def each_chunk(begin: int, chunk: Tensor) -> None:
        if resident is not None:
            resident[begin:begin + chunk.shape[0]] = chunk
    acc = streamed_class_sums(train_x, labels, num_classes, "train_x", device, each_chunk=each_chunk)
    sums, counts = acc.sums, acc.counts
    shard.all_reduce(sums, what="the class sums")
    shard.all_reduce(counts, what="the class counts")
    means = (sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)).float()
    return statistics_of(means, counts, few_threshold, many_threshold, k, device)


def broadcast_neighbors(shard: Shard, stats: ClassStatistics, find) -> ClassStatistics:
    """Rank 0 finds the neighbours (``find(stats)``) and sends them to every rank."""
    num_few, k = stats.few.numel(), None
    if shard.rank == 0:
        find(stats)
        k = stats.neighbors.shape[1]
    size = shard.broadcast(torch.tensor([k or 0], dtype=torch.long), what="the neighbours")
    k = int(size[0])
    if shard.rank != 0:
        stats.neighbors = torch.empty(num_few, k, dtype=torch.long, device=stats.few.device)
        stats.neighbor_distances = torch.empty(num_few, k, dtype=torch.float32, device=stats.few.device)
    stats.neighbor_distances = stats.neighbor_distances.float()
    shard.broadcast(stats.neighbors, what="the neighbours")
    shard.broadcast(stats.neighbor_distances, what="the neighbours")
    return stats


def class_sharded_statistics(shard: Shard, train_x: ArrayLike, labels: Tensor, num_classes: int,
                             few_threshold: int, many_threshold: int, k: int, device: torch.device,
                             resident: Tensor | None = None) -> ClassStatistics:
    """Counts of every class (all-reduced) and the means of this rank's slice of the
    classes only: one pass over the local rows per slice, each slice's sums reduced
    onto the rank that owns it, so no rank ever holds ``[C, d]``. ``resident``, if
    given, receives a copy of this rank's rows during the first pass."""
    counts = torch.bincount(labels, minlength=num_classes)
    shard.all_reduce(counts, what="the class counts")
    mine = None
    for owner in range(shard.world):
        first, end = shard.class_range(num_classes, owner)

        def each_chunk(begin: int, chunk: Tensor) -> None:
            if resident is not None and owner == 0:
                resident[begin:begin + chunk.shape[0]] = chunk
        source = resident if resident is not None and owner > 0 else train_x  # later passes: the device copy
        acc = streamed_class_sums(source, labels, num_classes, "train_x", device, classes=(first, end),
                                  each_chunk=each_chunk)
        shard.reduce(acc.sums, owner, what="the class sums")
        if owner == shard.rank:
            mine = (acc.sums / counts[first:end].clamp_min(1).unsqueeze(1).to(acc.sums.dtype)).float()
    return statistics_of(mine, counts, few_threshold, many_threshold, k, device)


def owned_rows(shard: Shard, num_classes: int, ids: Tensor, local: Tensor) -> Tensor:
    """``rows[ids]`` of a class-sharded ``[C, ...]`` matrix whose ``local`` slice this rank holds,
    on every rank (each rank fills in the rows it owns; a sum over ranks gathers them)."""
    first, end = shard.class_range(num_classes)
    out = local.new_zeros((ids.numel(),) + tuple(local.shape[1:]))
    inside = (ids >= first) & (ids < end)
    out[inside] = local[ids[inside] - first]
    return shard.all_reduce(out, what="gathering class rows")


def owned_share(shard: Shard, num_classes: int, ids: Tensor, local: Tensor, begin: int, end: int,
                block: int) -> Tensor:
    """``rows[ids[begin:end]]`` of a class-sharded matrix on this rank, where every rank asks
    for its own share of ``ids``: gathered ``block`` ids at a time, each rank keeping its part."""
    out = local.new_empty((end - begin,) + tuple(local.shape[1:]))
    for start in range(0, ids.numel(), block):
        stop = min(start + block, ids.numel())
        rows = owned_rows(shard, num_classes, ids[start:stop], local)
        low, high = max(start, begin), min(stop, end)
        if low < high:
            out[low - begin:high - begin] = rows[low - start:high - start]
    return out


def class_sharded_neighbors(shard: Shard, stats: ClassStatistics, num_classes: int, k: int, metric: str,
                            seed: int, block: int = 16384) -> ClassStatistics:
    """Each few class's ``k`` nearest base classes over keys no rank holds in full: every
    rank's top-k among its own base classes, merged into the global top-k (ties to the
    lower class id, as one kNN over all keys). ``"random"`` draws as a one-process fit does.
    The few classes' means are gathered ``block`` queries at a time, so no rank holds
    all of them at once."""
    few, base = stats.few, stats.base
    num_few = few.numel()
    if metric == "random":
        control = torch.Generator().manual_seed(seed)
        picks = torch.stack([torch.randperm(base.numel(), generator=control)[:k] for _ in range(num_few)])
        stats.neighbors = base[picks.to(base.device)]
        stats.neighbor_distances = torch.empty(num_few, k, device=few.device)
        for begin in range(0, num_few, block):
            end = min(begin + block, num_few)
            few_means = owned_rows(shard, num_classes, few[begin:end], stats.means)
            neighbor_means = owned_rows(shard, num_classes, stats.neighbors[begin:end].flatten(), stats.means)
            stats.neighbor_distances[begin:end] = (few_means[:, None, :] - neighbor_means.view(end - begin, k, -1)
                                                   ).norm(dim=2)
        return stats
    # The keys are dealt out evenly by position among the base classes, not by which rank owns
    # their rows: the base classes are often the low class ids (a head sorted first), all on
    # rank 0, which would otherwise search every query against nearly every key alone.
    first_key, end_key = shard.class_range(base.numel())
    keys = base[first_key:end_key]
    key_means = owned_share(shard, num_classes, base, stats.means, first_key, end_key, block)
    distances = torch.full((num_few, k), math.inf, device=few.device)
    ids = torch.full((num_few, k), num_classes, dtype=torch.long, device=few.device)
    found = min(k, keys.numel())
    for begin in range(0, num_few, block):
        end = min(begin + block, num_few)
        queries = owned_rows(shard, num_classes, few[begin:end], stats.means)
        if found:
            d, nearest = ops.knn(queries, key_means, found, metric)
            distances[begin:end, :found], ids[begin:end, :found] = d.float(), keys[nearest]
    all_distances = shard.all_gather(distances, "the neighbours").permute(1, 0, 2).reshape(num_few, -1)
    all_ids = shard.all_gather(ids, "the neighbours").permute(1, 0, 2).reshape(num_few, -1)
    by_id = torch.argsort(all_ids, dim=1, stable=True)
    by_distance = torch.argsort(all_distances.gather(1, by_id), dim=1, stable=True)
    order = by_id.gather(1, by_distance)[:, :k]
    stats.neighbors, stats.neighbor_distances = all_ids.gather(1, order), all_distances.gather(1, order)
    return stats


# --------------------------------------------------------------------------- row-sharded cache and step

class RowShardedCache(LogitCache):
    """A :class:`LogitCache` over this rank's rows. An epoch's batches keep the entries
    whose rows this rank holds, packed per trial and padded to the same length with
    rows whose loss and gradients are exactly zero (``PAD_SCORE``)."""

    def __init__(self, shard: Shard, train_x: ArrayLike, labels: Tensor, w: Tensor, b: Tensor, few: Tensor,
                 few_rows: Tensor, val_x: ArrayLike | None, pred_scale: float, trials: int, batch_size: int,
                 epoch_size: int, sizes: CacheSizes = CacheSizes(), show_progress: bool = False):
        self.first, self.end = shard.rows_of("train")
        self.holds_all = shard.world == 1
        held = (few_rows >= self.first) & (few_rows < self.end)
        self.global_few_rows = few_rows
        self.local_few = torch.full_like(few_rows, -1)
        self.local_few[held] = torch.arange(int(held.sum()), device=few_rows.device)
        super().__init__(train_x, labels, w, b, few, few_rows[held] - self.first, val_x, pred_scale, trials,
                         batch_size, epoch_size, sizes, show_progress)

    def batches(self, entries: Tensor, batch_size: int, few_position: Tensor) -> Iterator[Batch]:
        if self.holds_all:  # a one-rank group: every entry is this rank's, in place, no padding
            yield from super().batches(entries, batch_size, few_position)
            return
        trials, samples = entries.shape
        device = entries.device
        few_at = (-entries - 1).clamp_min(0)
        rows = torch.where(entries < 0, self.global_few_rows[few_at], entries)
        held = (rows >= self.first) & (rows < self.end)
        local = torch.where(entries < 0, -(self.local_few[few_at] + 1), entries - self.first)
        sample = torch.arange(samples, device=device)
        group = (sample // batch_size)[None, :] * trials + torch.arange(trials, device=device)[:, None]
        key = (group * samples + sample[None, :])[held]
        order = torch.argsort(key)
        groups = key[order] // samples  # (batch, trial) of every held entry, batch-major
        raw, labels, base_lse, target_base = self.entry_logits(local[held][order])
        target_few = few_position[labels]
        num_batches = -(-samples // batch_size)
        counts = torch.bincount(groups, minlength=num_batches * trials)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(groups.numel(), device=device) - starts[groups]
        # Every batch of the chunk padded to the chunk's largest (batch, trial) count, and laid out
        # in one go: per batch, the step gets views, not a dozen small copies and fills.
        held_per_batch = counts.view(num_batches, trials).amax(dim=1).tolist()
        n = max(held_per_batch, default=0)
        places = num_batches * n * trials
        at = ((groups // trials) * n + slot) * trials + groups % trials
        padded = self.base_buffer[:places] if places <= self.base_buffer.shape[0] else raw.new_empty(
            places, self.num_classes)  # the buffer is free once entry_logits has returned
        if at.numel() < places:  # padding rows: any finite logits do, zeros are the plain choice
            padded.zero_()
        padded.index_copy_(0, at, raw)
        lse = torch.full((places,), PAD_SCORE, device=device).index_copy_(0, at, base_lse)
        base_score = torch.full((places,), PAD_SCORE, device=device).index_copy_(0, at, target_base)
        few_target = torch.full((places,), -1, dtype=torch.long, device=device).index_copy_(0, at, target_few)
        shape = (num_batches, n, trials)
        padded, lse = padded.view(*shape, self.num_classes), lse.view(shape)
        base_score, few_target = base_score.view(shape), few_target.view(shape)
        for index in range(num_batches):
            held_rows = slice(0, held_per_batch[index])  # as many rows as this batch's largest trial
            yield Batch(min(batch_size, samples - index * batch_size), padded[index, held_rows], lse[index, held_rows],
                        few_target[index, held_rows], base_score[index, held_rows])


class RowShardedStep(TrainStep):
    """:class:`TrainStep` on this rank's part of each batch; the gradients of the
    whole batch's mean loss are the ranks' gradients, weighted by their rows and
    summed (one all-reduce per step), so AdamW sees the same values on every rank."""

    def __init__(self, shard: Shard, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard = shard
        if shard.world > 1:
            # a captured graph holds no gloo collective, and the ranks' batches change shape
            self.replayed = None

    def __call__(self, batch_size: int, batch: Batch) -> None:
        if self.shard.world == 1 and batch.raw.shape[0] == batch.rows:
            # nothing to reduce and no padding: the one-process step (replayed where wanted)
            super().__call__(batch_size, batch)
            return
        rows = batch.raw.shape[0]
        parameters = self.nets.parameters() + [self.few_bias]
        if rows:
            losses, grads = self._grads(batch.raw, batch.base_lse, batch.target_few, batch.target_base)
        else:
            losses, grads = torch.zeros_like(self.loss_sum), [torch.zeros_like(p) for p in parameters]
        flat = torch.cat([losses.reshape(-1)] + [g.reshape(-1) for g in grads]).mul_(rows / batch.rows)
        self.shard.all_reduce(flat, what="the step's gradients")
        pieces = flat.split([losses.numel()] + [p.numel() for p in parameters])
        self.optimizer.step([piece.view_as(p) for piece, p in zip(pieces[1:], parameters)])
        self.loss_sum.add_(pieces[0] * batch.rows)


# --------------------------------------------------------------------------- class-sharded cache

class ClassShardedCache:
    """The logits a class-sharded fit needs, reduced to the columns ``U`` the step reads.

    For a list of global rows, every rank contributes the features of the rows it holds,
    computes its slice of the logits, and the ranks combine: the base classes'
    log-sum-exp (max, then sum), the target's score and the ``U`` columns (the step's
    "raw" logits, in the compact class space of ``columns``). Few-split rows' compact
    logits are kept where memory allows; val rows' always (only this rank's rows).

    With ``wanted`` (each rank's sorted places among ``columns``: what its block of the
    few classes reads), a training row's columns reach each rank through one all-to-all,
    only those it reads: ``raw`` is in the space of ``wanted[rank]``, and each column
    crosses the network once per rank that reads it, not once per rank. Val rows, which
    the scorer reads for every few class, keep every column.
    """

    def __init__(self, shard: Shard, train_x: ArrayLike, labels: Tensor, w_slice: Tensor, b: Tensor, few: Tensor,
                 columns: Tensor, few_rows: Tensor, val_x: ArrayLike | None,
                 pred_scale: float, trials: int, batch_size: int, epoch_size: int, sizes: CacheSizes = CacheSizes(),
                 show_progress: bool = False, wanted: list[Tensor] | None = None):
        self.shard, self.train_x, self.labels, self.w, self.val_x = shard, train_x, labels, w_slice, val_x
        self.pred_scale, self.trials, self.sizes, self.few_rows = pred_scale, trials, sizes, few_rows
        self.device = device = w_slice.device
        self.num_classes = b.numel()
        self.first, self.end = shard.class_range(self.num_classes)
        self.b = b[self.first:self.end]
        self.few_local = few[(few >= self.first) & (few < self.end)] - self.first
        self.columns = columns
        self.num_columns = columns.numel()
        owned = (columns >= self.first) & (columns < self.end)
        self.owned_at, self.owned_local = torch.nonzero(owned).flatten(), columns[owned] - self.first
        self.exchange = None if wanted is None else self._exchange(columns, wanted)
        self.train_columns = self.num_columns if wanted is None else wanted[shard.rank].numel()
        self.overlap = not shard.one_host if sizes.overlap is None else sizes.overlap
        self.timings: dict[str, float] = {}
        # Whatever sets how many collectives a pass makes is agreed by every rank: a rank's
        # own column count, class count or free memory differ, and a rank that split its
        # rows otherwise would meet the others in a mismatched collective.
        budget = cache_budget(device) if sizes.budget is None else sizes.budget
        size = few_rows.numel() * self.train_columns * 4
        agreed = shard.all_reduce(torch.tensor([int(size <= budget)], device=device), dist.ReduceOp.MIN,
                                  what="the logits kept")
        self.keep_few = bool(agreed.item())
        if not self.keep_few and shard.rank == 0:  # agreed: said once
            warnings.warn(f"the few-split samples' compact logits ({size / 2**30:.1f} GiB) would take more than half "
                          f"of the memory available on {device} (on this rank or another): computing them every "
                          "epoch instead", stacklevel=4)
        widest_slice = -(-self.num_classes // shard.world)  # the largest rank's classes
        widest_columns = self.num_columns if wanted is None else max(part.numel() for part in wanted)
        self.per_call = max(batch_size, sizes.chunk_values // max(1, widest_slice + self.num_columns))
        self.chunk_samples = max(batch_size, (sizes.chunk_values // (trials * max(1, widest_columns)))
                                 // batch_size * batch_size)
        tic = time.perf_counter()
        self.few_logits = self.few_base_lse = None
        if self.keep_few:
            self.few_logits, self.few_base_lse, _, _ = self.compact(few_rows, "train", show_progress)
        self.timings["few_logits"] = time.perf_counter() - tic
        if val_x is not None:
            tic = time.perf_counter()
            first_val, end_val = shard.rows_of("val")
            total = shard.offsets["val"][-1]
            logits, best, _, best_class = self.compact(torch.arange(total, device=device), "val", show_progress)
            self.val_logits = logits[first_val:end_val]
            self.val_base_best, self.val_base_class = best[first_val:end_val], best_class[first_val:end_val]
            self.timings["val_logits"] = time.perf_counter() - tic

    def _exchange(self, columns: Tensor, wanted: list[Tensor]) -> tuple[Tensor, list[int], list[int]]:
        """What this rank sends in the all-to-all: its own classes' places (local column
        ids, rank after rank) and how many go to each rank; and how many it gets from each.
        The columns are sorted by class and every rank owns a contiguous range of classes,
        so each rank's share of a sorted ``wanted`` is a contiguous run of it, and the
        runs received in rank order are ``wanted[rank]`` in order."""
        bounds = [torch.searchsorted(columns, torch.tensor(self.shard.class_range(self.num_classes, rank),
                                                            device=columns.device)) for rank in range(self.shard.world)]

        def share(places: Tensor, owner: int) -> Tensor:
            low, high = torch.searchsorted(places, bounds[owner])
            return places[low:high]
        sends = [columns[share(places, self.shard.rank)] - self.first for places in wanted]
        gets = [share(wanted[self.shard.rank], owner).numel() for owner in range(self.shard.world)]
        return torch.cat(sends), [send.numel() for send in sends], gets

    def _features(self, rows: Tensor, split: str) -> Tensor:
        """The features of global ``rows`` of ``split`` on every rank."""
        first, end = self.shard.rows_of(split)
        source = self.train_x if split == "train" else self.val_x
        x = torch.zeros(rows.numel(), source.shape[1], device=self.device)
        mine = torch.nonzero((rows >= first) & (rows < end)).flatten()
        if mine.numel():
            x[mine] = self.sizes.gather(source, rows[mine] - first, f"{split}_x", self.device).float()
        return self.shard.all_reduce(x, what=f"the {split} rows' features")

    def compact(self, rows: Tensor, split: str, show_progress: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For global ``rows`` of ``split``: the ``U`` columns of their logits ``[n, |U|]`` (no
        bias), the base log-sum-exp ``[n]`` and the target score ``[n]`` (train rows), or for
        val rows the best base score and its class (ties to the lower id)."""
        return self._compact_started(rows, split, show_progress, defer=False)()

    def _compact_started(self, rows: Tensor, split: str, show_progress: bool = False,
                         defer: bool = True) -> Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`compact`, its exchanges issued and not waited for: the returned function
        waits for them and returns what ``compact`` returns. Until then this rank is free to
        compute (the next chunk's steps). With ``defer=False`` each block of rows is waited
        for before the next is begun, so at most one block's buffers are in flight."""
        n = rows.numel()
        exchange = self.exchange if split == "train" else None
        made: list[Tensor] = []

        def out() -> Tensor:  # made when first written: a chunk begun ahead holds no copy of it yet
            if not made:
                made.append(torch.empty(n, self.num_columns if exchange is None else self.train_columns,
                                        device=self.device))
            return made[0]
        first_value = torch.empty(n, device=self.device)
        second_value = torch.empty(n, device=self.device)
        best_class = torch.empty(n, dtype=torch.long, device=self.device) if split == "val" else None
        bar = progress.bar(show_progress, total=n, desc=f"{split} logits (sharded)", unit="row", leave=False)
        pending: list[Callable[[], None]] = []
        for begin in range(0, n, self.per_call):
            part = rows[begin:begin + self.per_call]
            bar.update(part.numel())
            logits = self._features(part, split) @ self.w.T  # [m, C_r]
            if exchange is None:
                columns = torch.zeros(part.numel(), self.num_columns, device=self.device)
                columns[:, self.owned_at] = logits[:, self.owned_local]
                out()[begin:begin + part.numel()] = self.shard.all_reduce(columns, what="the needed logit columns")
            else:  # column-major blocks: the all-to-all splits its tensors along their first dimension
                rows_out = functools.partial(lambda first, end: out()[first:end], begin, begin + part.numel())
                pending.append(self._columns_started(logits, rows_out))
            scores = logits.add_(self.b).mul_(self.pred_scale)
            if split == "train":
                label = self.labels[part] - self.first
                inside = (label >= 0) & (label < scores.shape[1])
                target = torch.where(inside, scores.gather(1, label.clamp(0, max(0, scores.shape[1] - 1))[:, None]
                                                           ).squeeze(1) if scores.shape[1] else 0.0, 0.0)
            scores.index_fill_(1, self.few_local, -math.inf)
            top = scores.amax(dim=1) if scores.shape[1] else torch.full((part.numel(),), -math.inf,
                                                                        device=self.device)
            if split == "val":
                local_top = top.clone()
                self.shard.all_reduce(top, dist.ReduceOp.MAX, what="the log-sum-exp")
                hit = (local_top == top) & torch.isfinite(top)
                owner_class = scores.argmax(dim=1) + self.first if scores.shape[1] else top.long()
                candidate = torch.where(hit, owner_class, torch.full_like(owner_class, self.num_classes))
                best_class[begin:begin + part.numel()] = self.shard.all_reduce(candidate, dist.ReduceOp.MIN,
                                                                                what="the best base class")
                first_value[begin:begin + part.numel()] = top
                continue
            # Each rank's own log-sum-exp (its maximum and the sum of exp below it) and target
            # score, gathered in one exchange and combined when waited for.
            shift = torch.where(torch.isfinite(top), top, 0.0)  # a rank with no base class sums nothing
            sums = scores.sub_(shift[:, None]).exp_().sum(dim=1)
            pending.append(self._log_sum_exp_started(torch.stack([top, sums, target]),
                                                     first_value[begin:begin + part.numel()],
                                                     second_value[begin:begin + part.numel()]))
            if not defer:
                for wait in pending:
                    wait()
                pending.clear()

        def finish() -> tuple[Tensor, Tensor, Tensor, Tensor]:
            for wait in pending:
                wait()
            bar.close()
            return out(), first_value, second_value, best_class
        return finish

    def _columns_started(self, logits: Tensor, out: Callable[[], Tensor]) -> Callable[[], None]:
        """Sends each rank the columns of ``logits [m, C_r]`` it reads; the returned function
        waits and writes this rank's into ``out() [m, |wanted|]``."""
        sent, send_counts, get_counts = self.exchange
        got = torch.empty(self.train_columns, logits.shape[0], device=self.device)
        wait = self.shard.all_to_all_started(got, logits.T.index_select(0, sent), get_counts, send_counts,
                                             what="the needed logit columns")

        def finish() -> None:
            wait()
            out().copy_(got.T)
        return finish

    def _log_sum_exp_started(self, local: Tensor, lse: Tensor, target: Tensor) -> Callable[[], None]:
        """Gathers every rank's ``[top, sum of exp(score - top), target score]`` per row; the
        returned function waits and writes the rows' base log-sum-exp and target score."""
        every, wait = self.shard.all_gather_started(local, what="the log-sum-exp")

        def finish() -> None:
            wait()
            tops, sums, targets = every.unbind(1)  # [R, m] each
            # finite even where no rank has a base class: exp(-inf - top) is then 0, not NaN
            top = tops.amax(dim=0).clamp_min(torch.finfo(tops.dtype).min)
            torch.log((sums * (tops - top).exp()).sum(dim=0), out=lse).add_(top)
            torch.sum(targets, dim=0, out=target)
        return finish

    # the interface ValScorer reads
    def val_blocks(self) -> list[tuple[int, int]]:
        num_val = self.val_logits.shape[0]
        return [(begin, min(begin + self.sizes.row_block, num_val)) for begin in range(0, num_val, self.sizes.row_block)]

    def val_block(self, begin: int, end: int) -> Tensor:
        return self.val_logits[begin:end]

    def batches(self, entries: Tensor, batch_size: int, few_position: Tensor) -> Iterator[Batch]:
        if self.device.type == "cpu":  # the last chunk's temporaries, and the epoch's draw, back to the host
            release_freed_host_memory()
        yield from self._chunk_started(entries, batch_size, few_position)()

    def epoch(self, entries: Tensor, batch_size: int, few_position: Tensor) -> Iterator[Batch]:
        """Every batch of an epoch's entries ``[T, S]``, chunk by chunk. With ``overlap``
        (``CacheSizes.overlap``; by default when the ranks span hosts), a chunk's exchanges
        (its logit columns and log-sum-exp) are begun before the previous chunk's steps run
        and waited for after them: the network carries them while this rank computes, at
        the cost of a second chunk's columns held meanwhile."""
        pending = None
        for begin in range(0, entries.shape[1], self.chunk_samples):
            if self.device.type == "cpu":  # the last chunk's temporaries, and the epoch's draw, back to the host
                release_freed_host_memory()
            started = self._chunk_started(entries[:, begin:begin + self.chunk_samples], batch_size, few_position)
            if pending is not None:
                yield from pending()
            pending = started
            if not self.overlap:  # waited for at once: one chunk in flight
                yield from pending()
                pending = None
        if pending is not None:
            yield from pending()

    def _chunk_started(self, entries: Tensor, batch_size: int, few_position: Tensor) -> Callable[[], list[Batch]]:
        """The batches of a chunk of entries ``[T, S]``, their logits begun: the returned
        function waits for them and lays the batches out."""
        flat = entries.T.reshape(-1)  # sample-major
        is_few = flat < 0
        rows = torch.where(is_few, self.few_rows[(-flat - 1).clamp_min(0)], flat)
        labels = self.labels[rows]
        if self.keep_few:
            few_at, computed_at = torch.nonzero(is_few).flatten(), torch.nonzero(~is_few).flatten()
            computed = self._compact_started(rows[computed_at], "train")
        else:
            computed = self._compact_started(rows, "train")

        def finish() -> list[Batch]:
            if self.keep_few:
                raw = torch.empty(flat.numel(), self.train_columns, device=self.device)
                base_lse = torch.empty(flat.numel(), device=self.device)
                target_base = torch.zeros(flat.numel(), device=self.device)
                raw[few_at] = self.few_logits[-flat[few_at] - 1]
                base_lse[few_at] = self.few_base_lse[-flat[few_at] - 1]
                raw[computed_at], base_lse[computed_at], target_base[computed_at], _ = computed()
            else:
                raw, base_lse, target_base, _ = computed()
            shape = (entries.shape[1], self.trials)
            raw, base_lse, target_base = raw.view(*shape, -1), base_lse.view(shape), target_base.view(shape)
            target_few = few_position[labels].view(shape)
            return [Batch(raw[begin:begin + batch_size].shape[0], raw[begin:begin + batch_size],
                          base_lse[begin:begin + batch_size], target_few[begin:begin + batch_size],
                          target_base[begin:begin + batch_size]) for begin in range(0, shape[0], batch_size)]
        return finish


def gathered_labels(shard: Shard, labels: Tensor, split: str) -> Tensor:
    """Every rank's labels of ``split``, in global row order."""
    return shard.gather_rows_of(labels, split, f"the {split} labels")


__all__ = ["PAD_SCORE", "Shard", "RankFailure", "row_sharded_statistics", "broadcast_neighbors", "class_sharded_statistics",
           "class_sharded_neighbors", "owned_rows", "RowShardedCache", "RowShardedStep", "ClassShardedCache",
           "gathered_labels", "FewSplitStep"]


# --------------------------------------------------------------------------- class-sharded step, split by few class

class FewSplitStep:
    """The training step of a class-sharded fit, split by few class across ranks.

    Rank ``r`` holds the coefficient networks' input of a contiguous block of the few
    classes only, and that as the distinct classifier rows the block reads with each
    class's places among them (``GatheredInputs``; not ``[C_f, (k+1)d]``, nor even
    ``[C_f/R, (k+1)d]``), and that block's few-class biases. Every rank sees the
    batch's rows, in the columns its block reads (``ClassShardedCache`` with ``wanted``). Per step:

    1. each rank scores its block's corrected few classes (the networks' forward pass),
       and the ranks exchange, per row and trial, the log-sum-exp of their block's scores
       and the target's score where the target is in their block (``2 R B T`` floats);
    2. each rank runs the training op on its block with the other blocks folded in as
       constants: their log-sum-exp into the row's base log-sum-exp, and a target in
       another block as a fixed target score. The loss is then the whole batch's, and
       the op's gradients are the loss's gradients through this block's classes;
    3. the networks' gradients (shared by every few class) are summed over ranks; each
       rank's few-class biases are its own.

    So every rank holds the same networks after every step, as in the one-process fit
    (the same values up to the order of floating-point sums). The networks' FLOPs per
    rank fall as 1/R, plus the forward pass of step 1 (about a third of them) again.
    """

    def __init__(self, shard: Shard, w_slice: Tensor, columns: Tensor, few_bias: Tensor, few_at: Tensor,
                 neighbors_at: Tensor, all_wanted: list[Tensor], num_classes: int, hidden, trials: int, seed: int,
                 lr: float, weight_decay: float, pred_scale: float):
        device, dim = w_slice.device, w_slice.shape[1]
        wanted = all_wanted[shard.rank]
        num_few, k = neighbors_at.shape
        self.shard, self.trials, self.k, self.pred_scale = shard, trials, k, pred_scale
        self.num_few, self.num_columns = num_few, wanted.numel()  # a batch's columns: the ones this block reads
        self.blocks = [shard.class_range(num_few, rank) for rank in range(shard.world)]
        self.first_few, self.end_few = self.blocks[shard.rank]
        mine = slice(self.first_few, self.end_few)
        self.generators = [torch.Generator().manual_seed(seed + t) for t in range(trials)]
        self.nets = CoefficientNets([(k + 1) * dim, *hidden, k], self.generators, device)
        # each few class of the block and its neighbours, as places among the block's columns
        # (those of a batch's logits, and the rows of the networks' input table)
        at = torch.searchsorted(wanted, torch.cat([few_at[mine, None], neighbors_at[mine]], dim=1))
        self.inputs = GatheredInputs(self._input_rows(shard, w_slice, columns, all_wanted, num_classes),
                                     at.contiguous())
        self.local_bias = few_bias[mine].repeat(trials, 1).contiguous()  # [T, C_f/R]: this rank's parameters
        self.optimizer = FusedAdamW(self.nets.parameters() + [self.local_bias], lr=lr, weight_decay=weight_decay)
        offsets = (torch.arange(trials, device=device) * self.num_columns)[:, None]
        self.trial_targets = (offsets + at[:, 0][None]).reshape(-1)
        self.trial_neighbors = (offsets[:, :, None] + at[:, 1:][None]).reshape(-1, k)
        self.loss_sum = torch.zeros(trials, device=device)
        # every rank's biases and their AdamW moments, whole, refreshed by alphas() after every epoch
        # (what the selection, the checkpoint and the export read, without a collective of their own)
        self.few_bias = few_bias.repeat(trials, 1)
        self.bias_moments = [torch.zeros_like(self.few_bias), torch.zeros_like(self.few_bias)]

    @staticmethod
    def _input_rows(shard: Shard, w_slice: Tensor, columns: Tensor, all_wanted: list[Tensor], num_classes: int,
                    block: int = 16384) -> Tensor:
        """The classifier rows of this rank's ``wanted`` columns (which other ranks own): the
        table its block's networks' input is gathered from, about a quarter of that
        ``[C_f/R, (k+1)d]`` input at 200,000 classes. Each owner sends each rank the rows
        it reads, by all-to-all, ``block`` of every rank's rows at a time: a row crosses the
        network once per rank that reads it. The columns are sorted by class and each rank
        owns a contiguous range of classes, so a rank's rows arrive, owner after owner, in
        its own order."""
        first, end = shard.class_range(num_classes)
        ranges = [shard.class_range(num_classes, rank) for rank in range(shard.world)]
        wanted = all_wanted[shard.rank]
        table = w_slice.new_empty(wanted.numel(), w_slice.shape[1])
        for begin in range(0, max(part.numel() for part in all_wanted), block):
            reads = [columns[part[begin:begin + block]] for part in all_wanted]  # each rank's classes, sorted
            sends = [ids[(ids >= first) & (ids < end)] - first for ids in reads]
            mine = reads[shard.rank]
            gets = [int(((mine >= low) & (mine < high)).sum()) for low, high in ranges]
            shard.all_to_all(table[begin:begin + mine.numel()], w_slice[torch.cat(sends)], gets,
                             [ids.numel() for ids in sends], "gathering class rows")
        return table

    @property
    def mine(self) -> int:
        return self.end_few - self.first_few

    def _scores(self, raw: Tensor) -> Tensor:
        """This block's corrected few scores ``[n, T, C_f/R]`` (the op's forward pass, no gradients)."""
        rows = raw.shape[0]
        with torch.no_grad():
            alphas = self.nets(self.inputs, self.mine).reshape(-1, self.k)
            combined = ops.combine_unchecked(raw.reshape(rows, -1), self.trial_targets, self.trial_neighbors, alphas, 1)
            return combined.view(rows, self.trials, self.mine).add_(self.local_bias).mul_(self.pred_scale)

    def __call__(self, batch_size: int, batch: Batch) -> None:
        raw, base_lse, target_few, target_base = batch.raw, batch.base_lse, batch.target_few, batch.target_base
        rows = raw.shape[0]
        inside = (target_few >= self.first_few) & (target_few < self.end_few)
        if self.mine:
            scores = self._scores(raw)
            block_target = torch.where(inside, scores.gather(2, (target_few - self.first_few).clamp(
                0, self.mine - 1)[..., None]).squeeze(2), 0.0)
            # in place, and let go before the op: a block's [n, T, C_f/R] temporaries are what a
            # rank's heap grows by during a step
            top = scores.amax(dim=2, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)
            block_lse = scores.sub_(top).exp_().sum(dim=2).log_().add_(top.squeeze(2))
            del scores
        else:
            block_lse = torch.full_like(base_lse, -math.inf)
            block_target = torch.zeros_like(base_lse)
        every = self.shard.all_gather(torch.stack([block_lse, block_target]), "the few blocks' scores")
        others = every[:, 0].clone()
        others[self.shard.rank] = -math.inf
        folded_lse = torch.logaddexp(base_lse, others.logsumexp(dim=0))
        other_block = (target_few >= 0) & ~inside
        fixed_target = torch.where(other_block, every[:, 1].sum(dim=0), target_base)
        local_target = torch.where(inside, target_few - self.first_few, -1)
        parameters = self.nets.parameters() + [self.local_bias]
        if self.mine:
            try:
                losses, grads = ops.coefficient_grads(
                    self.inputs.table, self.nets.first, self.nets.rest, self.nets.biases, self.local_bias,
                    raw.reshape(rows, -1), self.trial_targets, self.trial_neighbors, folded_lse, local_target,
                    fixed_target, self.pred_scale, self.inputs.ids)
            except RuntimeError as error:  # the op refuses coefficients that overflowed in an earlier step
                if "NaN or inf" in str(error):
                    raise Diverged("the coefficients are no longer finite") from None
                raise
        else:
            losses = (folded_lse - fixed_target).mean(dim=0)
            grads = [torch.zeros_like(p) for p in parameters]
        # the losses ride along: each rank's is the whole batch's, summed in its own order, and
        # their mean is the same value on every rank (as the history and checkpoints need)
        shared = torch.cat([losses.reshape(-1)] + [g.reshape(-1) for g in grads[:-1]])
        self.shard.all_reduce(shared, what="the step's gradients")
        pieces = list(shared.split([losses.numel()] + [p.numel() for p in parameters[:-1]]))
        self.optimizer.step([piece.view_as(p) for piece, p in zip(pieces[1:], parameters[:-1])] + [grads[-1]])
        self.loss_sum.add_(pieces[0] * (rows / self.shard.world))

    def _gather_blocks(self, local: Tensor, what: str) -> Tensor:
        """``[T, C_f, ...]`` from every rank's ``[T, C_f/R, ...]`` block (blocks differ by one at most)."""
        largest = max(end - first for first, end in self.blocks)
        padded = local.new_zeros((local.shape[0], largest) + tuple(local.shape[2:]))
        padded[:, :local.shape[1]] = local
        every = self.shard.all_gather(padded, what)
        return torch.cat([every[rank, :, :end - first] for rank, (first, end) in enumerate(self.blocks)], dim=1)

    @torch.no_grad()
    def alphas(self) -> Tensor:
        """``[T, C_f, k]`` raw coefficients of every trial and few class (gathered from every rank);
        also brings :attr:`few_bias` and its optimiser moments up to date."""
        self.few_bias = self._gather_blocks(self.local_bias, "the few-class biases")
        moments = self.optimizer.exp_avgs[-1], self.optimizer.exp_avg_sqs[-1]
        self.bias_moments = [self._gather_blocks(m, "the optimiser's state") for m in moments]
        local = (self.nets(self.inputs, self.mine) if self.mine else
                 self.local_bias.new_zeros(self.trials, 0, self.k))  # a block with no few class
        return self._gather_blocks(local, "the coefficients")

    def state(self) -> dict:
        """As :meth:`TrainStep.state`, whole (every rank's block), as of the last :meth:`alphas`."""
        optimizer = self.optimizer.state()
        return {"parameters": self.nets.parameters() + [self.few_bias],
                "optimizer": {"exp_avgs": optimizer["exp_avgs"][:-1] + [self.bias_moments[0]],
                              "exp_avg_sqs": optimizer["exp_avg_sqs"][:-1] + [self.bias_moments[1]],
                              "steps": optimizer["steps"]},
                "generators": [g.get_state() for g in self.generators]}

    def load_state(self, state: dict) -> None:
        mine = slice(self.first_few, self.end_few)
        *networks, bias = state["parameters"]
        for current, saved in zip(self.nets.parameters(), networks):
            current.copy_(saved)
        self.local_bias.copy_(bias[:, mine])
        self.few_bias = bias.to(self.local_bias.device).clone()
        saved = state["optimizer"]
        for name in ("exp_avgs", "exp_avg_sqs"):
            for current, value in zip(getattr(self.optimizer, name)[:-1], saved[name][:-1]):
                current.copy_(value)
            getattr(self.optimizer, name)[-1].copy_(saved[name][-1][:, mine])
        self.bias_moments = [saved["exp_avgs"][-1].clone(), saved["exp_avg_sqs"][-1].clone()]
        for current, value in zip(self.optimizer.steps, saved["steps"]):
            current.copy_(value)
        for generator, value in zip(self.generators, state["generators"]):
            generator.set_state(value)
