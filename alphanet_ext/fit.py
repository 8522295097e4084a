"""AlphaNet post-hoc correction, trained in logit space.

Scores are linear in the corrected classifier, so for a sample with base
logits ``L = x W^T`` a few class ``c`` scores
``L[c] + sum_i a_ci / ||a_c||_1 * L[n_ci] + b_c``: training and validation only
gather and combine columns of ``L`` (``alpha_combine(..., dim=1)``) and never
build the corrected matrix, which is materialised once at the end.

:func:`fit` runs the stages of :mod:`alphanet_ext.training` in order: class
statistics, the epoch sampler, the logit cache, the training step, epoch
selection, export.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .classifier import apply_correction, combine_experts
from .config import FitConfig
from .data import (ArrayLike, as_tensor, check_classifier, check_features, check_labels, inputs_device,
                   resolve_device)
from .result import FitResult, load
from .training import checkpoint as checkpoints
from .training import layouts
from .training import progress as bars
from .training.cache import CacheSizes, LogitCache
from .training.layouts import layout_of
from .training.sampler import EpochSampler
from .training.selection import EpochSelector, ValScorer
from .training.sharding import Shard
from .training.statistics import keeps_features_on
from .training.step import Diverged, TrainStep

__all__ = ["fit", "FitResult", "load", "combine_experts", "FitConfig", "Diverged"]

Callback = Callable[[dict], Any]


@dataclass
class _Inputs:
    """The checked inputs of a fit, on its device."""
    train_x: ArrayLike
    labels: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    val_x: ArrayLike | None
    val_labels: torch.Tensor | None


def _checked_inputs(train_x, train_y, weight, bias, val_x, val_y, device: torch.device,
                    classes: tuple[int, int] | None = None, sharded: bool = False) -> _Inputs:
    """The inputs, checked; with ``classes=(first, end)`` only that slice of the
    classifier is read (a class-sharded fit); a sharded rank may hold no val rows."""
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    num_classes = int(weight.shape[0]) if classes is not None else None
    if classes is not None:
        weight, bias = weight[classes[0]:classes[1]], None if bias is None else bias[classes[0]:classes[1]]
    w, b = check_classifier(weight, bias, device)
    num_classes, dim = num_classes or w.shape[0], w.shape[1]
    check_features(train_x, "train_x", dim)
    labels = check_labels(train_y, "train_y", train_x.shape[0], num_classes, device)
    val_labels = None
    if val_x is not None:
        check_features(val_x, "val_x", dim)
        if val_x.shape[0] == 0 and not sharded:
            raise ValueError("val_x has no samples; pass val_x=None to train without a validation set")
        val_labels = check_labels(val_y, "val_y", val_x.shape[0], num_classes, device)
    return _Inputs(train_x, labels, w, b, val_x, val_labels)


def fit(train_x: ArrayLike, train_y: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None,
        val_x: ArrayLike | None = None, val_y: ArrayLike | None = None, *,
        k: int = 5, rho: float = 1.0, metric: str = "euclidean",
        epochs: int | None = None, min_epochs: int | None = None, batch_size: int = 64, lr: float = 1e-3,
        weight_decay: float = 0.01, lr_step: int = 10, lr_gamma: float = 0.1,
        hidden: Sequence[int] = (32, 32, 32), few_threshold: int = 20, many_threshold: int = 100,
        pred_scale: float = 1.0, trials: int = 1, seed: int = 0, cuda_graphs: bool = True,
        device: torch.device | str | None = None, progress: bool = True,
        checkpoint: str | os.PathLike | None = None, callback: Callback | None = None,
        process_group: Any = None, shard_classes: bool = False) -> FitResult:
    """Corrects the few-split rows of a linear classifier with AlphaNet.

    Args:
        train_x, train_y: training features ``[N, d]`` and labels ``[N]`` (torch,
            numpy — memory-mapped arrays are read in chunks — or cupy arrays).
        weight, bias: the trained classifier ``[C, d]`` and ``[C]`` (bias may be None);
            a module's parameters (``model.fc.weight``) can be passed as they are.
        val_x, val_y: optional validation set; selects the epoch (best overall
            top-1 among epochs ``>= min_epochs``) and the best trial.
        k: neighbours per few class. rho: base samples drawn per few sample each epoch.
        metric: ``"euclidean"``, ``"cosine"`` or ``"random"`` (random base
            classes: the method's control).
        epochs: default 25 with a val set, 10 without (then the last epoch is kept).
        min_epochs: default 5, or ``epochs`` if fewer.
        hidden: widths of the coefficient network's hidden layers.
        few_threshold, many_threshold: split limits on per-class train counts.
        pred_scale: multiplies every score (softmax temperature 1/pred_scale).
        trials: independently seeded models trained together in one pass.
        seed: trial ``t`` uses seed ``seed + t``; results are deterministic per device.
        cuda_graphs: on a GPU, replay full training batches as a CUDA graph (same values).
        device: defaults to the GPU the inputs are on (CUDA tensors on ``cuda:1``
            run on ``cuda:1``), else CUDA when a GPU and the CUDA kernels are available.
            On a GPU, host features (even memory-mapped ones) are copied to the
            device once if they take at most a quarter of its free memory;
            otherwise each chunk's rows are read from the host.
        progress: show progress bars (tqdm) on a terminal or in a Jupyter notebook.
        checkpoint: a file path; the state is written there atomically after
            every epoch, and a fit given an existing checkpoint resumes from it
            (bit-identical to an uninterrupted fit on the same device). One written
            for other inputs or options is refused, naming what differs.
        callback: called after every epoch with its record (``epoch``, ``loss``
            per trial, ``lr``, ``val_top1`` per trial where there is val); returning
            ``False`` stops the fit after that epoch.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all processes) to fit over: every rank calls ``fit`` with its own rows of
            the train and val features (global row order is rank order) and the same
            classifier and options. Sums, neighbours, the epoch's draw and the step's
            gradients are shared, so every rank returns the same result, equal to a
            one-process fit on the concatenated rows within float rounding and
            bit-identical across reruns at the same world size. Inputs that differ
            across ranks are refused on every rank; a rank that dies or hangs makes the
            others raise :class:`~alphanet_ext.training.sharding.RankFailure` after the
            group's timeout. A checkpoint path must be visible to every rank (rank 0 writes it).
        shard_classes: also split the classifier and every logit matrix by class across
            the ranks (for label spaces too large for one device): each rank reads only
            its slice of ``weight``, and memory per rank for the classifier, the class
            means and the logits falls as ``1/world_size``.

    Every option is checked before any work (:class:`~alphanet_ext.config.FitConfig`);
    a value out of range raises a ``ValueError`` naming it.

    Returns:
        A :class:`FitResult` with the corrected classifier of the best trial.
    """
    config = FitConfig(k=k, rho=rho, metric=metric, epochs=epochs, min_epochs=min_epochs, batch_size=batch_size,
                       lr=lr, weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma, hidden=hidden,
                       few_threshold=few_threshold, many_threshold=many_threshold, pred_scale=pred_scale,
                       trials=trials, seed=seed, cuda_graphs=cuda_graphs)
    return fit_with_config(train_x, train_y, weight, bias, val_x, val_y, config, device=device, progress=progress,
                           checkpoint=checkpoint, callback=callback, process_group=process_group,
                           shard_classes=shard_classes)


def fit_with_config(train_x: ArrayLike, train_y: ArrayLike, weight: ArrayLike, bias: ArrayLike | None,
                    val_x: ArrayLike | None, val_y: ArrayLike | None, config: FitConfig, *,
                    device: torch.device | str | None = None, progress: bool = True,
                    checkpoint: str | os.PathLike | None = None, callback: Callback | None = None,
                    sizes: CacheSizes = CacheSizes(), keep_features: bool | None = None,
                    process_group: Any = None, shard_classes: bool = False) -> FitResult:
    """:func:`fit` with its options as a :class:`FitConfig`. ``sizes`` bound the
    fit's temporaries and ``keep_features`` forces (or forbids) a device copy of
    host features; both default to what the device allows."""
    started = time.perf_counter()
    device = resolve_device(device if device is not None else inputs_device(train_x, weight, val_x))
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}")
    layout = layout_of(process_group, shard_classes)
    inputs = _checked_inputs(train_x, train_y, weight, bias, val_x, val_y, device,
                             layout.classes(int(weight.shape[0])), layout.shard is not None)
    config = config.resolved(inputs.val_x is not None)
    layout.agree(_agreement_facts(config, weight, bias, inputs.val_x is not None, device), inputs.labels.numel(),
                 None if inputs.val_x is None else inputs.val_labels.numel())
    stages = _stages(layout, inputs, weight, bias, config, device, layout.sizes(sizes, device), keep_features,
                     layout.show_progress(bars.wanted(progress)))
    history, selector = _run_epochs(stages, config, checkpoint, callback)
    return _export(stages, weight, bias, config, history, selector, started)


@dataclass
class _Stages:
    """A fit's parts, made by its layout for its data: what the epochs run."""
    layout: layouts.OneProcess
    inputs: _Inputs
    device: torch.device
    stats: Any
    few_position: torch.Tensor
    sampler: EpochSampler
    step: TrainStep
    cache: LogitCache
    scorer: ValScorer | None
    show: bool
    timings: dict[str, float]


def _stages(layout: layouts.OneProcess, inputs: _Inputs, weight: ArrayLike, bias: ArrayLike | None,
            config: FitConfig, device: torch.device, sizes: CacheSizes, keep_features: bool | None,
            show: bool) -> _Stages:
    """1. class statistics (means, splits, neighbours) from one pass over the features;
    2. the epochs' sampler and the training step; 3. the logits read every epoch,
    kept where memory allows, and the val scorer."""
    timings: dict[str, float] = {}
    num_classes = int(weight.shape[0])
    tic = time.perf_counter()
    keep = keeps_features_on(device, inputs.train_x) if keep_features is None else keep_features
    resident = torch.empty(tuple(inputs.train_x.shape), dtype=as_tensor(inputs.train_x[:0], "train_x").dtype,
                           device=device) if keep else None
    stats = layout.statistics(inputs.train_x, inputs.labels, num_classes, config, device, resident, show)
    timings["class_means"] = time.perf_counter() - tic
    tic = time.perf_counter()
    layout.neighbors(stats, num_classes, config)
    timings["neighbors"] = time.perf_counter() - tic

    all_labels = layout.all_labels(inputs.labels)
    few_position = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    few_position[stats.few] = torch.arange(stats.few.numel(), device=device)
    sampler = EpochSampler(all_labels, stats.counts, few_position >= 0, stats.base, config.rho)
    full_bias = layout.full_bias(inputs.b, bias, num_classes, device)
    step = layout.step(inputs.w, full_bias, stats, num_classes, config)

    options = (inputs.val_x, config.pred_scale, config.trials, config.batch_size, sampler.epoch_size, sizes, show)
    train_rows = resident if resident is not None else inputs.train_x
    cache = layout.cache(train_rows, inputs.labels, all_labels, inputs.w, full_bias, stats, sampler, options)
    scorer = layout.scorer(cache, inputs.val_labels, stats, num_classes) if inputs.val_x is not None else None
    timings.update(cache.timings)
    return _Stages(layout, inputs, device, stats, few_position, sampler, step, cache, scorer, show, timings)


def _run_epochs(stages: _Stages, config: FitConfig, checkpoint: str | os.PathLike | None,
                callback: Callback | None) -> tuple[list[dict], EpochSelector]:
    """4. The epochs, with selection on val, a checkpoint after each (resumed from it
    if one is there) and the callback."""
    layout, step, sampler, scorer = stages.layout, stages.step, stages.sampler, stages.scorer
    selector = EpochSelector(config.trials, config.epochs, config.min_epochs, step.few_bias, stages.stats.few.numel(),
                             config.k)
    history: list[dict] = []
    saved_path = os.fspath(checkpoint) if checkpoint is not None else None
    expected = None
    if saved_path is not None:
        expected, saved = _resume_state(stages, config, saved_path)
        if saved is not None:
            step.load_state(saved["step"])
            selector.load_state(saved["selector"])
            history = list(saved["history"])
    train_time = val_time = 0.0
    bar = bars.bar(stages.show, total=config.epochs * sampler.epoch_size, desc="alphanet fit", unit="sample",
                   initial=len(history) * sampler.epoch_size)
    stopped = bool(history) and history[-1].get("stopped", False)
    for epoch in range(len(history) + 1, config.epochs + 1):
        if stopped:
            break
        tic = time.perf_counter()
        step.optimizer.lr = config.lr * config.lr_gamma ** ((epoch - 1) // config.lr_step)  # StepLR
        try:
            _train_epoch(step, sampler, stages.cache, stages.few_position, config.batch_size, bar)
        except Diverged as error:
            raise Diverged(_diverged(epoch, str(error), step.optimizer.lr, config)) from None
        train_time += time.perf_counter() - tic
        record: dict[str, Any] = {"epoch": epoch, "loss": (step.loss_sum / sampler.epoch_size).tolist(),
                                  "lr": step.optimizer.lr}
        alphas = step.alphas()
        _check_finite(record, alphas, config)
        if scorer is not None:
            tic = time.perf_counter()
            record["val_top1"] = scorer(alphas, step.few_bias)
            val_time += time.perf_counter() - tic
        selector.offer(record, alphas, step.few_bias, step.nets.state)
        history.append(record)

        def save() -> None:
            if saved_path is not None and layout.writes():
                checkpoints.save(saved_path, {"fingerprint": expected, "step": step.state(),
                                              "selector": selector.state(), "history": history})
        save()  # before the callback, which may stop the process
        stop = layout.any_rank(callback is not None and callback(dict(record)) is False)
        if stop:  # stopped before min_epochs: the last epoch run is eligible
            record["stopped"] = True
            selector.offer(record, alphas, step.few_bias, step.nets.state, force=epoch < config.min_epochs)
            save()
        val_text = f", val top-1 {max(r['overall'] for r in record['val_top1']):.1f}" if scorer is not None else ""
        bar.set_postfix_str(f"epoch {epoch}/{config.epochs}, loss {min(record['loss']):.3f}{val_text}")
        stopped = stop
    bar.close()
    stages.timings.update(train=train_time, validation=val_time)
    return history, selector


def _resume_state(stages: _Stages, config: FitConfig, path: str) -> tuple[str, dict | None]:
    """The fingerprint a checkpoint of this fit carries, and the saved state if one is there."""
    layout = stages.layout
    digests = _input_digests(stages.inputs, stages.stats)
    if layout.shard is not None:
        digests = {**_sharded_digests(layout.shard, digests), **layout.describe()}
    expected = checkpoints.fingerprint(config.to_dict(), stages.device, digests)
    saved = checkpoints.load(path, expected)
    if layout.shard is not None:
        _check_same_resume(layout.shard, path, 0 if saved is None else len(saved["history"]))
    return expected, saved


def _export(stages: _Stages, weight: ArrayLike, bias: ArrayLike | None, config: FitConfig, history: list[dict],
            selector: EpochSelector, started: float) -> FitResult:
    """5. The chosen trial's corrected classifier, and everything the report reads."""
    stats, timings = stages.stats, stages.timings
    best_trial, trial_val = selector.best_trial(history)
    tic = time.perf_counter()
    chosen = selector.best_alphas[best_trial]
    normalized = chosen / chosen.abs().sum(dim=1, keepdim=True)
    out_weight, out_bias = apply_correction(weight, bias, stats.few, stats.neighbors, chosen,
                                            selector.best_bias[best_trial])
    timings["export"] = time.perf_counter() - tic
    timings["total"] = time.perf_counter() - started
    return FitResult(
        weight=out_weight, bias=out_bias, splits={name: ids.cpu() for name, ids in stats.splits.items()},
        neighbors=stats.neighbors.cpu(), alphas=normalized.detach().cpu(), history=history,
        best_epochs=list(selector.best_epochs), best_trial=best_trial, trial_val_top1=trial_val,
        config={**config.to_dict(), "device": str(stages.device), **stages.layout.describe()},
        timings=timings, neighbor_distances=stats.neighbor_distances.float().cpu(),
        trial_alphas=selector.best_alphas.detach().cpu(), trial_few_bias=selector.best_bias.detach().cpu(),
        class_means=stats.means.float().cpu() if stages.layout.reads_all_classes else None,
        mlp_state=selector.best_states[best_trial])


def _train_epoch(step: TrainStep, sampler: EpochSampler, cache: LogitCache, few_position: torch.Tensor,
                 batch_size: int, bar) -> None:
    """One epoch: every trial's draw, in chunks of logits, in batches of steps."""
    entries = torch.stack([sampler.draw(g) for g in step.generators])  # [T, epoch_size]
    step.loss_sum.zero_()
    for batch in cache.epoch(entries, batch_size, few_position):
        step(batch_size, batch)
        bar.update(batch.rows)


def _check_finite(record: dict, alphas: torch.Tensor, config: FitConfig) -> None:
    """Stops a fit whose loss or coefficients stopped being finite, naming the learning rate."""
    bad = [t for t, loss in enumerate(record["loss"]) if not math.isfinite(loss)]
    what = f"the loss of trial {bad[0]} is {record['loss'][bad[0]]}" if bad else None
    if what is None and not bool(torch.isfinite(alphas).all()):
        what = "the coefficients are no longer finite"
    if what:
        raise Diverged(_diverged(record["epoch"], what, record["lr"], config))


def _diverged(epoch: int, what: str, lr: float, config: FitConfig) -> str:
    return (f"training diverged at epoch {epoch}: {what} with lr={lr:g} (pred_scale {config.pred_scale:g}); lower "
            "lr or pred_scale, or check the classifier's scale")


def _agreement_facts(config: FitConfig, weight: ArrayLike, bias: ArrayLike | None, has_val: bool,
                     device: torch.device) -> dict[str, Any]:
    """What every rank of a sharded fit must agree on (compared by digest at the start)."""
    return {"options": config.to_dict(), "classifier shape": list(weight.shape),
            "classifier": checkpoints.sampled_digest(weight, "weight"),
            "bias": "none" if bias is None else checkpoints.sampled_digest(bias, "bias", samples=1 << 20),
            "val set (given or not)": has_val, "device kind": device.type}


def _sharded_digests(shard: Shard, digests: dict[str, str]) -> dict[str, str]:
    """One digest per input over every rank's part, the same on every rank."""
    out = {}
    for name in sorted(digests):
        mine = torch.tensor([int(digests[name][:14], 16)], dtype=torch.long)
        out[name] = ",".join(f"{v:x}" for v in shard.all_gather(mine, "the checkpoint's fingerprint").flatten().tolist())
    return out


def _check_same_resume(shard: Shard, path: str, epochs_done: int) -> None:
    seen = shard.all_gather(torch.tensor([epochs_done], dtype=torch.long), "the checkpoint check").flatten().tolist()
    if len(set(seen)) > 1:
        raise ValueError(f"{path}: the ranks see different checkpoints (epochs done per rank: {seen}); put the "
                         "checkpoint on a file system every rank reads")


def _input_digests(inputs: _Inputs, stats) -> dict[str, str]:
    out = {"classifier weight": checkpoints.digest(inputs.w), "classifier bias": checkpoints.digest(inputs.b),
           "train labels": checkpoints.digest(inputs.labels),
           "train features": stats.means_digest or checkpoints.digest(stats.means)}
    if inputs.val_x is not None:
        out["val labels"] = checkpoints.digest(inputs.val_labels)
        out["val features"] = checkpoints.sampled_digest(inputs.val_x, "val_x")
    return out
