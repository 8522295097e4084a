"""Logits of the rows a fit reads again and again, within a memory budget.

Few-split rows are in every epoch and val rows are scored after every epoch:
their logits ``x W^T`` are computed once and kept where memory allows.
Drawn base rows change every epoch; their logits are computed per chunk of
the epoch, into buffers reused by every chunk.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from ..data import ArrayLike, cache_budget, gather_rows, logits
from . import progress
from .step import base_logsumexp_


class Batch(NamedTuple):
    """One training step's inputs: ``rows`` is the batch's size in the whole epoch
    (a sharded fit's rank holds only some of them); logits ``raw [n, T, C]``, the base
    classes' log-sum-exp ``[n, T]``, the few position of each target ``[n, T]`` (-1 for
    a base class) and a base target's score ``[n, T]``."""
    rows: int
    raw: Tensor
    base_lse: Tensor
    target_few: Tensor
    target_base: Tensor


@dataclass(frozen=True)
class CacheSizes:
    """The sizes that bound a fit's temporaries, and where its rows come from.

    ``row_block``: rows of the few-split and val logits handled at once.
    ``chunk_values``: logits per training chunk (samples * trials * classes).
    ``budget``: bytes the kept logits may take; None asks the device
    (half of what is available).
    ``gather``: reads rows of the features onto a device (``data.gather_rows``).
    ``overlap``: a class-sharded fit begins a chunk's exchanges before the previous
    chunk's steps and waits for them after, holding a second chunk's columns meanwhile;
    None does so when the ranks span hosts (a network to wait on), not when they share
    one (loopback exchanges cost less than the memory; benchmarks/RESULTS.md).
    """
    row_block: int = 4096
    chunk_values: int = 1 << 25
    budget: float | None = None
    gather: Callable[[ArrayLike, Tensor, str, torch.device], Tensor] = field(default=gather_rows)
    overlap: bool | None = None


def kept_logits(budget: float, device: torch.device, num_classes: int, few_samples: int,
                val_samples: int) -> tuple[bool, bool]:
    """Whether the few-split and the val logits (``[rows, C]`` float32 each) are
    kept for the whole fit. Keeping them saves computing those rows' logits
    again every epoch; each is kept while the kept ones take at most ``budget``
    (half of the memory available), so a fit beyond iNaturalist scale slows down
    instead of running out of memory."""
    available = 2 * budget
    kept = []
    for name, rows in (("few-split", few_samples), ("val", val_samples)):
        size = rows * num_classes * 4
        kept.append(size <= budget)
        if kept[-1]:
            budget -= size
        else:
            warnings.warn(f"the {name} samples' logits ({size / 2**30:.1f} GiB) would take more than half of the "
                          f"{available / 2**30:.1f} GiB available on {device}: computing them every epoch instead "
                          "of keeping them (slower, same result up to rounding)", stacklevel=4)
    return kept[0], kept[1]


class LogitCache:
    """The logits a fit needs: few-split rows (kept or recomputed), val rows
    (kept or recomputed, with each row's best base class, which no correction
    changes), and each training chunk's rows."""

    def __init__(self, train_x: ArrayLike, labels: Tensor, w: Tensor, b: Tensor, few: Tensor, few_rows: Tensor,
                 val_x: ArrayLike | None, pred_scale: float, trials: int, batch_size: int, epoch_size: int,
                 sizes: CacheSizes = CacheSizes(), show_progress: bool = False):
        self.train_x, self.labels, self.w, self.b, self.few, self.few_rows = train_x, labels, w, b, few, few_rows
        self.val_x, self.pred_scale, self.trials, self.sizes = val_x, pred_scale, trials, sizes
        self.device = device = w.device
        self.num_classes = num_classes = w.shape[0]
        budget = cache_budget(device) if sizes.budget is None else sizes.budget
        self.keep_few, self.keep_val = kept_logits(budget, device, num_classes, few_rows.numel(),
                                                   0 if val_x is None else val_x.shape[0])
        self.few_logits = self.few_base_lse = self.val_logits = None
        self.timings: dict[str, float] = {}
        tic = time.perf_counter()
        if self.keep_few:
            self._keep_few_logits(show_progress)
        self.timings["few_logits"] = time.perf_counter() - tic
        self.chunk_samples = max(batch_size, (sizes.chunk_values // (trials * num_classes)) // batch_size * batch_size)
        # Buffers reused by every chunk: allocating them per chunk costs page faults on every step.
        self.chunk_buffer = torch.empty(min(self.chunk_samples, epoch_size) * trials, num_classes, device=device)
        self.base_buffer = torch.empty_like(self.chunk_buffer)
        if val_x is not None:
            tic = time.perf_counter()
            self._val_base_best()
            self.timings["val_logits"] = time.perf_counter() - tic

    def _keep_few_logits(self, show_progress: bool) -> None:
        rows_total, block_rows = self.few_rows.numel(), self.sizes.row_block
        self.few_logits = torch.empty(rows_total, self.num_classes, device=self.device)
        self.few_base_lse = torch.empty(rows_total, device=self.device)
        bar = progress.bar(show_progress, total=rows_total, desc="few-split logits", unit="row", leave=False)
        for begin in range(0, rows_total, block_rows):
            rows = self.few_rows[begin:begin + block_rows]
            bar.update(rows.numel())
            block = self.few_logits[begin:begin + rows.numel()]
            torch.mm(self.sizes.gather(self.train_x, rows, "train_x", self.device).float(), self.w.T, out=block)
            self.few_base_lse[begin:begin + rows.numel()] = base_logsumexp_(block.clone(), self.b, self.few,
                                                                            self.pred_scale)[0]
        bar.close()

    def _val_base_best(self) -> None:
        num_val = self.val_x.shape[0]
        if self.keep_val:
            self.val_logits = logits(self.val_x, self.w, "val_x", self.device)
        self.val_base_best = torch.empty(num_val, device=self.device)
        self.val_base_class = torch.empty(num_val, dtype=torch.long, device=self.device)
        for begin, end in self.val_blocks():
            scores = self.val_block(begin, end).add(self.b).mul_(self.pred_scale).index_fill_(1, self.few, -math.inf)
            torch.max(scores, dim=1, out=(self.val_base_best[begin:end], self.val_base_class[begin:end]))

    def val_blocks(self) -> list[tuple[int, int]]:
        num_val = self.val_x.shape[0]
        return [(begin, min(begin + self.sizes.row_block, num_val)) for begin in range(0, num_val, self.sizes.row_block)]

    def val_block(self, begin: int, end: int) -> Tensor:
        """Raw logits (no bias) of val rows ``begin:end``."""
        return self.val_logits[begin:end] if self.keep_val else logits(self.val_x, self.w, "val_x", self.device,
                                                                        begin, end)

    def chunk(self, entries: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For a chunk of epoch entries ``[T, S]``: logits without bias ``[S, T, C]``, train
        labels ``[S, T]``, the log-sum-exp of the base-class scores ``[S, T]`` and the
        score of the true class ``[S, T]`` (read for base classes only; 0 or stale for few ones)."""
        out, chunk_labels, base_lse, target_score = self.entry_logits(entries.T.reshape(-1))  # sample-major
        shape = (entries.shape[1], self.trials)
        return (out.view(*shape, self.num_classes), chunk_labels.view(shape), base_lse.view(shape),
                target_score.view(shape))

    def batches(self, entries: Tensor, batch_size: int, few_position: Tensor) -> Iterator[Batch]:
        """The training batches of a chunk of epoch entries ``[T, S]`` (``S`` a multiple of
        ``batch_size`` but for the epoch's last chunk)."""
        raw, chunk_labels, base_lse, target_base = self.chunk(entries)
        target_few = few_position[chunk_labels]  # [S, T], -1 for base targets
        for begin in range(0, raw.shape[0], batch_size):
            end = begin + batch_size
            yield Batch(raw[begin:end].shape[0], raw[begin:end], base_lse[begin:end], target_few[begin:end],
                        target_base[begin:end])

    def epoch(self, entries: Tensor, batch_size: int, few_position: Tensor) -> Iterator[Batch]:
        """Every training batch of an epoch's entries ``[T, S]``, a chunk of logits at a time."""
        for begin in range(0, entries.shape[1], self.chunk_samples):
            yield from self.batches(entries[:, begin:begin + self.chunk_samples], batch_size, few_position)

    def entry_logits(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`chunk` for a flat list of entries (train row ids, few rows as
        ``-(position + 1)`` in ``few_rows``): ``[n, C]`` logits and ``[n]`` labels,
        base log-sum-exp and target scores."""
        device = self.device
        out = self.chunk_buffer[:flat.numel()]
        base_lse = torch.empty(flat.numel(), device=device)
        target_score = torch.zeros(flat.numel(), device=device)
        is_few = flat < 0
        # a rank of a row-sharded fit may hold no few row at all; then no entry is few either
        few_rows = self.few_rows if self.few_rows.numel() else self.few_rows.new_zeros(1)
        rows = torch.where(is_few, few_rows[(-flat - 1).clamp_min(0)], flat.clamp_min(0))
        chunk_labels = self.labels[rows]
        if self.keep_few:  # few rows from the kept logits, base rows computed
            few_at, computed_at = torch.nonzero(is_few).flatten(), torch.nonzero(~is_few).flatten()
            few_index = -flat[few_at] - 1
            few_part = self.base_buffer[:few_at.numel()]  # free until the base rows are computed
            out.index_copy_(0, few_at, torch.index_select(self.few_logits, 0, few_index, out=few_part))
            base_lse[few_at] = self.few_base_lse[few_index]
        else:
            computed_at = torch.arange(flat.numel(), device=device)
        if computed_at.numel():
            computed = self.base_buffer[:computed_at.numel()]
            torch.mm(self.sizes.gather(self.train_x, rows[computed_at], "train_x", device).float(), self.w.T,
                     out=computed)
            out.index_copy_(0, computed_at, computed)
            base_lse[computed_at], target_score[computed_at] = base_logsumexp_(computed, self.b, self.few,
                                                                               self.pred_scale, chunk_labels[computed_at])
        return out, chunk_labels, base_lse, target_score
