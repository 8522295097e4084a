"""Scoring on val after each epoch, and choosing each trial's epoch and the best trial."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .. import ops
from ..metrics import SPLIT_NAMES, accuracy_by_split, split_of_classes


class ValScorer:
    """Val top-1 per split of every trial, from the cached val logits:
    ``O(N_val * T * C_f * k)`` per epoch, never ``N_val * C * d``.

    ``few`` and ``neighbors`` index the columns of the cached logits; ``few_ids`` are
    the few classes' ids (the same unless the cache holds a compact set of columns).
    A sharded fit scores each rank's val rows and sums the per-split counts over
    ranks (``reduce_counts``)."""

    def __init__(self, cache, val_labels: Tensor, few: Tensor, neighbors: Tensor,
                 splits: dict[str, Tensor], few_ids: Tensor | None = None, num_classes: int | None = None,
                 reduce_counts: Callable[[Tensor], Tensor] | None = None):
        self.cache, self.val_labels, self.few, self.neighbors, self.splits = cache, val_labels, few, neighbors, splits
        self.few_ids = few if few_ids is None else few_ids
        self.num_classes = cache.num_classes if num_classes is None else num_classes
        self.reduce_counts = reduce_counts

    @torch.no_grad()
    def __call__(self, alphas: Tensor, few_bias: Tensor) -> list[dict[str, float]]:
        cache, few, trials = self.cache, self.few, alphas.shape[0]
        k = self.neighbors.shape[1]
        num_val = self.val_labels.numel()
        correct = torch.empty(trials, num_val, dtype=torch.bool, device=few.device)
        flat_alphas = alphas.reshape(-1, k)
        for begin, end in cache.val_blocks():
            few_scores = ops.combine_unchecked(cache.val_block(begin, end), few.repeat(trials),
                                               self.neighbors.repeat(trials, 1), flat_alphas, 1)
            few_scores = cache.pred_scale * (few_scores.view(-1, trials, few.numel()) + few_bias.detach())
            few_best, few_index = few_scores.max(dim=2)
            few_class = self.few_ids[few_index]
            base_best, base_class = cache.val_base_best[begin:end, None], cache.val_base_class[begin:end, None]
            # argmax over all classes, ties to the lower class id
            take_few = (few_best > base_best) | ((few_best == base_best) & (few_class < base_class))
            predicted = torch.where(take_few, few_class, base_class)
            correct[:, begin:end] = (predicted == self.val_labels[begin:end, None]).T
        if self.reduce_counts is None:
            return [accuracy_by_split(correct[t], self.val_labels, self.splits, self.num_classes)
                    for t in range(trials)]
        return self._from_counts(correct)

    def _from_counts(self, correct: Tensor) -> list[dict[str, float]]:
        """Top-1 per split from the correct and total counts of every rank's rows."""
        which = split_of_classes(self.splits, self.num_classes).to(self.val_labels.device)[self.val_labels]
        masks = torch.stack([which == index for index in range(len(SPLIT_NAMES))] +
                            [torch.ones_like(which, dtype=torch.bool)])  # [4, n]
        counts = torch.stack([(correct[:, None, :] & masks[None]).sum(dim=2),
                              masks.sum(dim=1)[None].expand(correct.shape[0], -1)], dim=2)  # [T, 4, 2]
        counts = self.reduce_counts(counts.to(torch.float64)).tolist()
        return [{name: (100.0 * right / total if total else float("nan"))
                 for name, (right, total) in zip(SPLIT_NAMES + ("overall",), trial)} for trial in counts]


class EpochSelector:
    """Keeps, per trial, the epoch with the best overall val top-1 among epochs
    ``>= min_epochs`` (the first such on ties), or the last epoch without val."""

    def __init__(self, trials: int, epochs: int, min_epochs: int, few_bias: Tensor, num_few: int, k: int):
        self.epochs, self.min_epochs = epochs, min_epochs
        self.best_score = [-math.inf] * trials
        self.best_epochs = [epochs] * trials
        self.best_alphas = torch.zeros(trials, num_few, k, device=few_bias.device)
        self.best_bias = few_bias.detach().clone()
        self.best_states: list[dict[str, Tensor]] = [{} for _ in range(trials)]

    def offer(self, record: dict[str, Any], alphas: Tensor, few_bias: Tensor, network_state,
              force: bool = False) -> None:
        """Sees an epoch's record (with ``val_top1`` where there is val) and its coefficients;
        ``force`` makes it eligible before ``min_epochs`` (a fit stopped early)."""
        epoch = record["epoch"]
        for t in range(len(self.best_score)):
            score = record["val_top1"][t]["overall"] if "val_top1" in record else float(epoch)
            if (epoch >= self.min_epochs or force) and score > self.best_score[t]:
                self.best_score[t], self.best_epochs[t] = score, epoch
                self.best_alphas[t] = alphas[t]
                self.best_bias[t] = few_bias[t]
                self.best_states[t] = network_state(t)

    def best_trial(self, history: list[dict]) -> tuple[int, list[dict]]:
        """``(best trial, val top-1 of every trial at its chosen epoch)``; marks the chosen epochs in ``history``."""
        for record in history:
            record["chosen"] = [record["epoch"] == e for e in self.best_epochs]
        if not history or "val_top1" not in history[0]:
            return 0, []
        trial_val = [history[e - 1]["val_top1"][t] for t, e in enumerate(self.best_epochs)]
        return max(range(len(trial_val)), key=lambda t: trial_val[t]["overall"]), trial_val

    def state(self) -> dict:
        return {"best_score": self.best_score, "best_epochs": self.best_epochs, "best_alphas": self.best_alphas,
                "best_bias": self.best_bias, "best_states": self.best_states}

    def load_state(self, state: dict) -> None:
        self.best_score, self.best_epochs = list(state["best_score"]), list(state["best_epochs"])
        self.best_alphas.copy_(state["best_alphas"])
        self.best_bias.copy_(state["best_bias"])
        self.best_states = [dict(s) for s in state["best_states"]]
