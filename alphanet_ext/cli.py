"""The ``alphanet`` command: fit, compare, eval, synth and demo.

Exit codes: 0 success, 1 failure (one-line error on stderr), 2 usage error
(a bad option value, before any file is read), 130 interrupted. A command that
fails leaves its previous outputs untouched: outputs are written under
temporary names and moved into place together at the very end.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import __version__
from .config import DEFAULTS, OPTIONS
from .data import RowShards, all_finite, iter_row_chunks, non_finite_error, resolve_device, streamed_class_means
from .fit import FitResult, fit
from .io import (Features, InputError, check_input_file, folder_features, load_author_splits, load_classifier,
                 load_features, check_writable, classifier_format, read_metadata, save_classifier, write_atomic)
from .outputs import StagedOutputs
from .training.sampler import check_rho
from .training.sharding import RankFailure
from .metrics import evaluate, make_splits, mean_std
from .analysis import Hierarchy, neighbor_views, pearson_with_interval, prediction_changes, semantic_accuracy
from .report import COLUMNS, base_label, pyplot, run_label, save_figure, write_page, write_report, write_text
from .synthetic import PRESETS, make_preset


def _say(args: argparse.Namespace, message: str) -> None:
    """A message for the person at the terminal: stderr, so stdout holds results only."""
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _results(args: argparse.Namespace, text: str, document: dict) -> None:
    """The command's results on stdout: ``text`` for a person, or with --json one JSON
    document (``document``) for a script."""
    if getattr(args, "json", False):
        import json
        print(json.dumps(_finite(document), indent=1, allow_nan=False, default=_plain))
    else:
        print(text, flush=True)


def _finite(value: object) -> object:
    """``value`` with NaN and infinities as null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _plain(value: object) -> object:
    """JSON for the tensors and numpy numbers in a result document."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _table(rows: list[tuple[str, dict]]) -> str:
    out = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, accuracy in rows:
        out.append(f"| {name} | " + " | ".join(f"{accuracy[c]:.1f}" for c in COLUMNS) + " |")
    return "\n".join(out)


def _splits_from_labels(labels: np.ndarray, num_classes: int, few: int, many: int) -> dict[str, torch.Tensor]:
    return make_splits(torch.bincount(torch.as_tensor(np.asarray(labels), dtype=torch.long), minlength=num_classes),
                       few, many)


def _metadata(result: FitResult, on: dict | None = None) -> dict:
    config = result.config
    return {**({"on": on} if on else {}), "alphanet_ext_version": __version__, "k": config["k"], "rho": config["rho"],
            "metric": config["metric"], "seed": config["seed"], "trials": config["trials"],
            "best_trial": result.best_trial, "best_epochs": result.best_epochs,
            "pred_scale": config["pred_scale"], "config": config,
            "few_classes": result.splits["few"].tolist(),
            "splits": {name: ids.tolist() for name, ids in result.splits.items()},
            "neighbors": result.neighbors.tolist(), "alphas": result.alphas.tolist()}


def _accuracy_summary(results: list[dict]) -> dict:
    return {top: {column: mean_std([r[top][column] for r in results]) for column in COLUMNS}
            for top in ("top1", "top5")}


@dataclass
class Run:
    """One fit of a sweep; its k, rho and neighbour metric are its result's config;
    ``on`` names the classifier it corrected when that is not the input (--on)."""
    result: FitResult
    on: str | None = None

    @property
    def k(self) -> int:
        return self.result.config["k"]

    @property
    def rho(self) -> float:
        return self.result.config["rho"]

    @property
    def metric(self) -> str:
        return self.result.config["metric"]

    def describe(self, show_k: bool) -> dict:
        return {"k": self.k, "rho": self.rho, "metric": self.metric, "show_k": show_k,
                **({"on": self.on} if self.on else {})}


def _fit_grid(args: argparse.Namespace, train: Features, weight: torch.Tensor, bias: torch.Tensor,
              val: Features | None, metrics: Sequence[str], on: str | None = None) -> list[Run]:
    """One fit per (metric, k, rho), in that order, of ``weight`` and ``bias`` (the
    classifier that ``--on`` names, a key of ``BASES``, when it is not the input)."""
    runs = []
    for metric in metrics:
        for k in args.k:
            for rho in args.rho:
                _say(args, f"fitting rho={rho} ({args.trials} trial(s), k={k}, metric={metric}"
                           + (f", on {BASES[on]}" if on else "") + ") ...")
                tic = time.perf_counter()
                checkpoint = (os.path.join(args.checkpoint, f"fit-{metric}-k{k}-rho{rho:g}"
                                           + (f"-on-{on}" if on else "") + ".ckpt.pt")
                              if getattr(args, "checkpoint", None) else None)
                result = fit(train.x, train.y, weight, bias, val.x if val else None, val.y if val else None,
                             k=k, rho=rho, metric=metric, epochs=args.epochs, min_epochs=args.min_epochs,
                             batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                             lr_step=args.lr_step, lr_gamma=args.lr_gamma, hidden=args.hidden,
                             trials=args.trials, seed=args.seed, device=args.device, pred_scale=args.pred_scale,
                             few_threshold=args.few_threshold, many_threshold=args.many_threshold,
                             progress=not args.quiet, checkpoint=checkpoint,
                             callback=lambda record: _stop_point(args, f"epoch{record['epoch']}"),
                             process_group=getattr(args, "group", None),
                             shard_classes=getattr(args, "shard_classes", False))
                _stop_point(args, "fitted")
                _say(args, f"  done in {time.perf_counter() - tic:.1f}s")
                runs.append(Run(result, BASES[on] if on else None))
    return runs


# --on: the classifier AlphaNet starts from, instead of the input
BASES = {"la": "logit adjustment", "tau": "tau-normalised", "crt": "cRT"}


def _base_classifier(args: argparse.Namespace, on: str, weight: torch.Tensor, bias: torch.Tensor,
                     train: Features, val: Features | None, splits: dict,
                     announce: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The input logit-adjusted or tau-normalised (tau chosen on val for overall top-1;
    1 without val), or a classifier re-trained by cRT; with what it is, for the
    metadata and the report. ``announce``: say so at the terminal (rank 0 of a torchrun fit only)."""
    from . import baselines
    val_x, val_y = (val.x, val.y) if val else (None, None)
    if on == "la":
        counts = torch.bincount(torch.as_tensor(np.asarray(train.y), dtype=torch.long), minlength=weight.shape[0])
        tau, (w, b) = baselines.choose_logit_adjustment(weight, bias, counts, val_x, val_y, splits)
        return w, b, {"method": BASES[on], "tau": tau}
    if on == "tau":
        tau, (w, b) = baselines.choose_tau(weight, bias, val_x, val_y, splits)
        return w, b, {"method": BASES[on], "tau": tau}
    if announce:
        _say(args, f"re-training the classifier (cRT, {args.crt_epochs} epochs, class-balanced) ...")
    w, b = baselines.crt(train.x, train.y, weight.shape[0], epochs=args.crt_epochs, seed=args.seed,
                         device=resolve_device(args.device))
    return w.cpu(), b.cpu(), {"method": BASES[on], "epochs": args.crt_epochs, "seed": args.seed}


def _per_trial(result: FitResult, trials: int, weight: torch.Tensor, bias: torch.Tensor, data: Features,
               splits: dict, device: str | None) -> list[dict]:
    return [evaluate(*result.trial_classifier(t, weight, bias), data.x, data.y, splits, device=device)
            for t in range(trials)]


AUTO_RHOS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _auto_index(candidates: list[Run], weight: torch.Tensor, bias: torch.Tensor, val: Features,
                args: argparse.Namespace) -> int:
    """The run with the best val few-split top-1 among those whose overall val top-1
    stays within --max-overall-drop points of the uncorrected classifier's."""
    baseline = evaluate(weight, bias, val.x, val.y, candidates[0].result.splits, device=args.device)["top1"]["overall"]
    summaries = [run.result.summary() for run in candidates]
    allowed = [i for i, summary in enumerate(summaries)
               if summary["overall"]["mean"] >= baseline - args.max_overall_drop]
    if not allowed:
        _say(args, f"no rho keeps overall val top-1 within {args.max_overall_drop} points of {baseline:.1f}; "
                   "taking the one with the best overall accuracy")
        return max(range(len(candidates)), key=lambda i: summaries[i]["overall"]["mean"])
    return max(allowed, key=lambda i: summaries[i]["few"]["mean"])


def _worse_than_input(args: argparse.Namespace, best: Run, weight: torch.Tensor, bias: torch.Tensor,
                      val: Features) -> str | None:
    """Why the chosen correction is worse on val than the input classifier, or None:
    its few-split top-1 is not higher, or its overall top-1 is more than
    --max-overall-drop points lower (what the correction is for, and what it may cost)."""
    before = evaluate(weight, bias, val.x, val.y, best.result.splits, device=args.device)["top1"]
    after = best.result.trial_val_top1[best.result.best_trial]
    reasons = []
    if after["few"] <= before["few"]:
        reasons.append(f"few-split top-1 {before['few']:.1f} -> {after['few']:.1f}")
    if after["overall"] < before["overall"] - args.max_overall_drop:
        reasons.append(f"overall top-1 {before['overall']:.1f} -> {after['overall']:.1f}, more than "
                       f"--max-overall-drop {args.max_overall_drop:g} points lower")
    if not reasons:
        return None
    advice = ("the input classifier is better for this data" if args.rho_auto else
              "try --rho auto (rho chosen on val) or a smaller --rho, or keep the input classifier")
    return (f"the correction (k={best.k}, rho={best.rho}) is worse than the input classifier on val: "
            f"{'; '.join(reasons)}; {advice}")


def _analyses(args: argparse.Namespace, best: Run, evaluated: Features, before: torch.Tensor, after: torch.Tensor,
              hierarchy: Hierarchy | None) -> dict:
    """Prediction changes in the paper's three neighbour views, and semantic closeness,
    from the predictions ``before`` and ``after`` the correction."""
    splits = best.result.splits
    labels = torch.as_tensor(np.asarray(evaluated.y), dtype=torch.long)
    random = best.metric == "random"  # the views show nearest neighbours; the control's are random
    means = best.result.class_means
    if means is None:  # a class-sharded fit holds no rank's full means; the report reads them once here
        means = streamed_class_means(args.full_train.x, torch.as_tensor(np.asarray(args.full_train.y)),
                                     best.result.weight.shape[0], "train", torch.device("cpu"))[0]
    views = neighbor_views(means.to(resolve_device(args.device)), splits, best.k,
                           "euclidean" if random else best.metric, None if random else best.result.neighbors)
    out = {"prediction_changes": {name: prediction_changes(before, after, labels, classes, neighbors)
                                  for name, (classes, neighbors) in views.items()}}
    if hierarchy is not None:
        few, base, every = views["few"][0], views["base"][0], views["all"][0]
        out["semantic"] = {
            "levels": args.levels,
            "top1": {"baseline": semantic_accuracy(before, labels, splits, hierarchy, args.levels),
                     "corrected": semantic_accuracy(after, labels, splits, hierarchy, args.levels)},
            "prediction_changes": {
                name: prediction_changes(before, after, labels, classes, hierarchy, args.levels, candidates)
                for name, classes, candidates in (("few", few, base), ("base", base, few), ("all", every, None))}}
    return out


class UsageError(Exception):
    """A command line that cannot work whatever the files hold: exit 2, before any file is read."""


def _check_fit_options(args: argparse.Namespace) -> None:
    if args.hierarchy and not args.report:
        raise UsageError("--hierarchy is used by the report: add --report DIR")
    args.rho_defaulted = args.rho is None
    if args.rho is None:  # with a val set rho is chosen on it; a fixed 1 can make things worse (README)
        args.rho = ["auto"] if args.val is not None or _folder_has(args.train, "val") else [1.0]
    if "auto" in args.rho and args.rho != ["auto"]:
        raise UsageError("--rho auto cannot be mixed with numbers")
    if args.rho == ["auto"] and args.val is None and not _folder_has(args.train, "val"):
        raise UsageError("--rho auto needs --val (it picks rho on the validation set)")


REPORT_MARK = "# AlphaNet correction report"


def _check_outputs(args: argparse.Namespace, classifier: str | None = None) -> None:
    """Output paths that could not be written, or would clobber an input or a
    file alphanet did not write, fail now, not after the fit."""
    inputs = [getattr(args, flag) for flag in ("classifier", "train", "val", "test", "hierarchy", "data")
              if getattr(args, flag, None)]
    if classifier:
        classifier_format(classifier)
        check_writable(classifier)
        for flag in ("classifier", "train", "val", "test", "hierarchy"):
            given = getattr(args, flag, None)
            if given and os.path.isfile(given) and os.path.exists(classifier) and os.path.samefile(given, classifier):
                raise InputError(f"--out {classifier} is the --{flag} file; write the corrected classifier to "
                                 "another path (inputs are never overwritten)")
    if args.report:
        if classifier and os.path.abspath(args.report) == os.path.abspath(classifier):
            raise UsageError(f"--report {args.report} is also --out; give the report its own folder")
        check_writable(args.report, folder=True)
        for given in inputs:
            if os.path.abspath(given) == os.path.abspath(args.report):
                raise InputError(f"--report {args.report} is an input; give the report its own folder")
        existing = os.path.join(args.report, "report.md")
        if args.command == "fit" and os.path.isfile(existing):
            with open(existing, "rb") as stream:
                first = stream.readline().decode("utf-8", "replace").strip()
            if not first.startswith(REPORT_MARK):
                raise InputError(f"--report {args.report}: it holds a report.md that alphanet did not write; "
                                 "choose another folder (it is not overwritten)")


def _stop_point(args: argparse.Namespace, stage: str) -> None:
    """Test hook (--stop-at STAGE:SIGNAL): the process signals itself at a named stage."""
    wanted = getattr(args, "stop_at", None)
    if wanted and wanted.split(":")[0] == stage:
        os.kill(os.getpid(), getattr(signal, wanted.split(":")[1]))
        time.sleep(0.5)  # let a handled signal arrive here


def _check_finite_features(features: Features, role: str) -> None:
    """Every value of a set that is only scored after the fit, checked before it."""
    for begin, chunk in iter_row_chunks(features.x, role, resolve_device("cpu")):
        if not all_finite(chunk):
            raise InputError(f"{features.source}: {non_finite_error(f'the {role} features', chunk.float(), begin)}")


def _check_rho_work(args: argparse.Namespace, train: Features, num_classes: int) -> None:
    """A --rho whose epochs would redraw every base row over and over is refused before any fit."""
    counts = np.bincount(np.asarray(train.y), minlength=num_classes)
    few = counts < args.few_threshold
    rhos = AUTO_RHOS if args.rho == ["auto"] else args.rho
    try:
        for rho in rhos:
            check_rho(rho, int(counts[few].sum()), int(counts[~few].sum()))
    except ValueError as error:
        raise UsageError(f"argument --rho: {error}") from None


def _join_ranks(args: argparse.Namespace) -> tuple[int, int]:
    """Under torchrun (``WORLD_SIZE`` > 1): joins the process group (NCCL on GPUs, gloo on
    CPUs, ``--timeout``) and gives ``(rank, world size)``; else ``(0, 1)``."""
    args.group = None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if args.shard_classes:
            raise UsageError("--shard-classes needs several processes: start the fit with torchrun "
                             "--nproc-per-node N -m alphanet_ext fit ...")
        return 0, 1
    import datetime
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is not None and args.device.startswith("cuda"):
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "nccl" if args.device is not None and args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    args.group = dist.group.WORLD
    return dist.get_rank(), dist.get_world_size()


def _rows_of_rank(features: Features | None, rank: int, world: int) -> Features | None:
    """Rank ``rank``'s contiguous share of the rows (a memory-mapped file reads only those):
    its own shard when the features are the shards of an extraction with as many ranks."""
    if features is None or world == 1:
        return features
    total = features.x.shape[0]
    if isinstance(features.x, RowShards) and len(features.x.parts) == world:
        part = slice(int(features.x.starts[rank]), int(features.x.starts[rank + 1]))
    else:
        part = slice(total * rank // world, total * (rank + 1) // world)
    return Features(features.x[part], np.asarray(features.y)[part], f"{features.source} (rows {part.start}:{part.stop})")


def run_fit(args: argparse.Namespace) -> int:
    _check_fit_options(args)
    rank, world = _join_ranks(args)
    try:
        return _run_fit(args, rank, world)
    finally:
        if args.group is not None:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run_fit(args: argparse.Namespace, rank: int, world: int) -> int:
    _check_outputs(args, args.out)
    weight, bias = load_classifier(args.classifier, args.classifier_key)
    train, val, test = _load_train_val_test(args, weight)
    args.full_train = train
    full_val = val
    train, val = _rows_of_rank(train, rank, world), _rows_of_rank(val, rank, world)
    if test is not None:
        _check_finite_features(test, "test")
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    evaluated = test or full_val or args.full_train
    evaluated_on = "test" if test else ("val" if val else "train")
    if args.hierarchy:
        check_input_file(args.hierarchy)
    hierarchy = Hierarchy.read(args.hierarchy, weight.shape[0]) if args.hierarchy else None
    _check_rho_work(args, args.full_train, weight.shape[0])
    _stop_point(args, "loaded")
    input_weight, input_bias, on = weight, bias, None
    if args.on:  # every rank derives the same base from the whole train and val sets
        weight, bias, on = _base_classifier(args, args.on, weight, bias, args.full_train, full_val,
                                            _splits_from_labels(args.full_train.y, weight.shape[0],
                                                                args.few_threshold, args.many_threshold),
                                            announce=rank == 0)
        if rank == 0:
            _say(args, f"AlphaNet corrects {base_label(on)} of the input classifier")
    auto = args.rho_auto = args.rho == ["auto"]
    if auto:
        args.rho = list(AUTO_RHOS)
        if args.rho_defaulted and rank == 0:
            _say(args, f"choosing rho on val among {', '.join(map(str, AUTO_RHOS))} (the default with a val set; "
                       "--rho 1 fits once)")
    metrics = [args.metric] + (["random"] if args.control and args.metric != "random" else [])
    runs = _fit_grid(args, train, weight, bias, val, metrics, args.on)
    if world > 1:  # rank 0 writes, once every rank has finished
        from .training.sharding import Shard
        Shard.of(args.group, "rows").barrier("the end of the fits")
        if rank != 0:
            return 0
        val = full_val
    candidates = [run for run in runs if run.metric == args.metric]
    if auto:
        best = candidates[_auto_index(candidates, weight, bias, val, args)]
    elif val:
        best = max(candidates, key=lambda run: run.result.summary()["overall"]["mean"])
    else:
        best = candidates[0]

    splits = best.result.splits
    warning = _worse_than_input(args, best, input_weight, input_bias, val) if val else None
    if warning:
        print(f"alphanet: warning: {warning}", file=sys.stderr, flush=True)
    baseline = evaluate(weight, bias, evaluated.x, evaluated.y, splits, device=args.device)
    given = evaluate(input_weight, input_bias, evaluated.x, evaluated.y, splits, device=args.device) if on else None
    rows = ([("input", given["top1"])] if on else []) + [("baseline", baseline["top1"])]
    report_runs = []
    show_k = len(args.k) > 1
    several = len(runs) > 1
    for run in runs:
        per_trial = _per_trial(run.result, args.trials, weight, bias, evaluated, splits, args.device)
        summary = _accuracy_summary(per_trial)
        entry = {**run.describe(show_k), "best": run is best, "best_on_val": bool(val) and len(candidates) > 1}
        rows.append((run_label(entry) + (" (best)" if run is best and several else ""),
                     {c: summary["top1"][c]["mean"] for c in COLUMNS}))
        report_runs.append({**entry, **summary, "val_top1": run.result.summary(),
                            "best_epochs": run.result.best_epochs, "timings": run.result.timings})
        if run is best:
            chosen = per_trial[run.result.best_trial]

    with StagedOutputs() as outputs:
        metadata = {**_metadata(best.result, on), **({"warning": warning} if warning else {})}
        save_classifier(outputs.file(args.out), best.result.weight, best.result.bias, metadata)
        files = []
        if args.report:
            few = splits["few"]
            change = chosen["per_class_top1"][few] - baseline["per_class_top1"][few]
            distance = best.result.neighbor_distances.mean(dim=1)
            keep = ~torch.isnan(change)
            correlation = (pearson_with_interval(distance[keep], change[keep], device=resolve_device(args.device))
                           if int(keep.sum()) >= 3  # on the fit's device, as the neighbour views
                           else {"r": float("nan"), "low": float("nan"), "high": float("nan")})
            report = {**({"warning": warning} if warning else {}),
                      **({"on": on, "input": {top: {c: {"mean": given[top][c], "std": 0.0} for c in COLUMNS}
                                               for top in ("top1", "top5")}} if on else {}),
                      "config": best.result.config, "evaluated_on": evaluated_on, "samples": baseline["samples"],
                      "baseline": {top: {c: {"mean": baseline[top][c], "std": 0.0} for c in COLUMNS}
                                   for top in ("top1", "top5")},
                      "runs": report_runs, "distance_correlation": correlation["r"],
                      "distance_correlation_95": [correlation["low"], correlation["high"]],
                      **_analyses(args, best, evaluated, baseline["predictions"], chosen["predictions"], hierarchy),
                      "split_sizes": {name: int(ids.numel()) for name, ids in splits.items()}}
            files = write_report(report, {"distance": distance[keep], "change": change[keep]},
                                 outputs.folder(args.report))
        _stop_point(args, "staged")
        outputs.commit(moving=lambda: _stop_point(args, "committing"))
    if not getattr(args, "demo", False):
        _say(args, f"wrote {args.out} (k={best.k}, rho={best.rho})")
    if files:
        _say(args, f"report: {', '.join(os.path.join(args.report, f) for f in files)}")
    heading = f"top-1 on the {evaluated_on} set (%)" + (f"; baseline: {base_label(on)} of the input" if on else "")
    _results(args, heading + ":\n" + _table(rows),
             {"command": "fit", "out": args.out, "k": best.k, "rho": best.rho, "metric": best.metric, "on": on,
              "warning": warning, "evaluated_on": evaluated_on, "samples": baseline["samples"],
              "top1": {name: {c: accuracy[c] for c in COLUMNS} for name, accuracy in rows},
              "runs": [{key: run[key] for key in ("k", "rho", "metric", "best", "top1", "top5", "val_top1")}
                       for run in report_runs],
              "report": [os.path.join(args.report, f) for f in files] if files else None})
    return 0


def _folder_has(path: str, role: str) -> bool:
    return os.path.isdir(path) and folder_features(path, role) is not None


def _check_against(features: Features, role: str, weight: torch.Tensor) -> Features:
    """Features that do not fit the classifier fail when read, not after a fit."""
    num_classes, dim = weight.shape
    if features.x.shape[1] != dim:
        raise InputError(f"{features.source}: the {role} features have {features.x.shape[1]} dims but the classifier "
                         f"expects {dim}")
    outside = (features.y < 0) | (features.y >= num_classes)
    if outside.any():
        raise InputError(f"{features.source}: {role} label {features.y[outside.argmax()]} is outside the "
                         f"classifier's {num_classes} classes [0, {num_classes})")
    return features


def _load_train_val_test(args: argparse.Namespace, weight: torch.Tensor
                         ) -> tuple[Features, Features | None, Features | None]:
    """--train, --val and --test, checked against the classifier; a --train folder
    also gives val and test where it has them."""
    train = _check_against(load_features(args.train, "train", args.trust_pickle), "train", weight)
    loaded = []
    for role in ("val", "test"):
        path = getattr(args, role) or (args.train if _folder_has(args.train, role) else None)
        loaded.append(_check_against(load_features(path, role, args.trust_pickle), role, weight) if path else None)
    return train, loaded[0], loaded[1]


def run_compare(args: argparse.Namespace) -> int:
    from . import baselines
    if args.out and args.val is None and not _folder_has(args.train, "val"):
        raise UsageError("--out exports the method best on val: give --val (or a --train folder with val files)")
    _check_outputs(args, args.out)
    weight, bias = load_classifier(args.classifier, args.classifier_key)
    train, val, test = _load_train_val_test(args, weight)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    evaluated, evaluated_on = (test, "test") if test else ((val, "val") if val else (train, "train"))
    counts = torch.bincount(torch.as_tensor(np.asarray(train.y), dtype=torch.long), minlength=weight.shape[0])
    splits = make_splits(counts, args.few_threshold, args.many_threshold)
    val_x, val_y = (val.x, val.y) if val else (None, None)

    def score(w: torch.Tensor, b: torch.Tensor) -> dict:
        return evaluate(w, b, evaluated.x, evaluated.y, splits, device=args.device)

    def on_val(w: torch.Tensor, b: torch.Tensor) -> dict | None:
        return evaluate(w, b, val.x, val.y, splits, device=args.device)["top1"] if args.out else None

    # (name, results on the evaluated set, classifier, val top-1 of that classifier, fit result or None,
    #  the --on base it corrected or None)
    methods: list[tuple[str, list[dict], tuple, dict | None, FitResult | None, dict | None]] = [
        ("baseline", [score(weight, bias)], (weight, bias), on_val(weight, bias), None, None)]

    def peer(name: str, classifier: tuple) -> None:
        methods.append((name, [score(*classifier)], classifier, on_val(*classifier), None, None))
    _say(args, "peers: NCM, tau-normalisation, logit adjustment, LWS, cRT ...")
    for metric in ("cosine", "euclidean"):
        peer(f"NCM ({metric})", baselines.ncm(train.x, train.y, weight.shape[0], metric))
    bases = {}  # --on: the classifiers AlphaNet also corrects, and what each is
    for key in ("tau", "la", "crt"):
        w, b, on = _base_classifier(args, key, weight, bias, train, val, splits)
        peer(base_label(on), (w, b))
        bases[key] = (w, b, on)
        if key == "la":
            peer("LWS", baselines.lws(weight, bias, train.x, train.y, seed=args.seed))
    grids = [(None, weight, bias, None, (args.metric, "random"))]
    grids += [(key, *bases[key], (args.metric,)) for key in args.on]
    for key, w, b, on, metrics in grids:
        for run in _fit_grid(args, train, w, b, val, metrics, key):
            chosen = run.result.trial_val_top1[run.result.best_trial] if run.result.trial_val_top1 else None
            methods.append((run_label(run.describe(len(args.k) > 1)),
                            _per_trial(run.result, args.trials, w, b, evaluated, splits, args.device),
                            (run.result.weight, run.result.bias), chosen if run.metric != "random" else None,
                            run.result, on))
    selected = _select_method(args, methods) if args.out else None

    rows = []
    for name, results, _, val_top1, _, _ in methods:
        summary = _accuracy_summary(results)
        rows.append({"method": name, **summary, **({"val_top1": val_top1} if args.out else {})})
    header = "| method | " + " | ".join(f"top-1 {c}" for c in COLUMNS) + " | top-5 overall |"
    lines = [f"Accuracy (%) on the {evaluated_on} set, mean ± std over trials", "", header,
             "|---" * (len(COLUMNS) + 2) + "|"]
    for row in rows:
        cells = [f"{row['top1'][c]['mean']:.1f} ± {row['top1'][c]['std']:.1f}" for c in COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['top5']['overall']['mean']:.1f} |")
    table = "\n".join(lines) + "\n"
    _results(args, table, {"command": "compare", "evaluated_on": evaluated_on, "methods": rows,
                           "selected": None if selected is None else methods[selected][0],
                           "select": args.select if args.out else None, "out": args.out})
    if selected is not None:
        name, _, (w, b), val_top1, result, on = methods[selected]
        metadata = {**(_metadata(result, on) if result is not None else {"splits": {k: v.tolist() for k, v in
                                                                                   splits.items()}}),
                    "selected_method": name, "select": args.select, "val_top1": val_top1}
        with StagedOutputs() as outputs:
            save_classifier(outputs.file(args.out), w.float(), (b if b is not None else torch.zeros(w.shape[0])).float(),
                            metadata)
            outputs.commit()
        _say(args, f"wrote {args.out}: {name}, the best on val by --select {args.select}")
    if args.report:
        import json
        with StagedOutputs() as outputs:
            folder = outputs.folder(args.report)
            write_atomic(os.path.join(folder, "compare.json"),
                         lambda t: write_text(t, json.dumps({"evaluated_on": evaluated_on, "methods": rows}, indent=2)))
            write_atomic(os.path.join(folder, "compare.md"), lambda t: write_text(t, table))
            plotted = _frontier_plot(rows, os.path.join(folder, "frontier.png"))
            write_page(folder, "compare.html", table, ["frontier.png"] if plotted else [],
                       "AlphaNet against post-hoc peers")
            outputs.commit()
        _say(args, f"report: {args.report}/compare.json, compare.md" + (", frontier.png" if plotted else "")
             + ", compare.html")
    return 0


def _select_method(args: argparse.Namespace, methods: list) -> int:
    """The method best on val by --select: ``overall`` top-1; ``few`` top-1 among the
    methods whose overall val top-1 stays within --max-overall-drop points of the input
    classifier's (the input itself when none does); ``balanced``: the mean of the many,
    medium and few splits' top-1. Ties go to the earlier method (the input first)."""
    scored = [(i, method[3]) for i, method in enumerate(methods) if method[3] is not None]
    if args.select == "overall":
        key = lambda item: item[1]["overall"]  # noqa: E731
    elif args.select == "balanced":
        key = lambda item: sum(item[1][c] for c in ("many", "medium", "few")) / 3  # noqa: E731
    else:
        floor = methods[0][3]["overall"] - args.max_overall_drop
        scored = [item for item in scored if item[1]["overall"] >= floor] or scored[:1]
        key = lambda item: item[1]["few"]  # noqa: E731
    best = max((key(item) for item in scored))
    return next(i for i, val in scored if key((i, val)) == best)


# How each method family is drawn on the frontier: one colour and marker a family.
# AlphaNet on a peer's classifier shares that peer's colour, with AlphaNet's marker.
_FAMILY_STYLE = {"input classifier": ("black", "*"), "NCM": ("0.45", "s"), "tau-normalised": ("tab:blue", "^"),
                 "logit adjustment": ("tab:orange", "D"), "LWS": ("tab:purple", "v"), "cRT": ("tab:green", "P"),
                 "AlphaNet": ("tab:red", "o"), "AlphaNet, random neighbours": ("0.6", "o"),
                 "AlphaNet on tau-normalised": ("tab:blue", "o"), "AlphaNet on logit adjustment": ("tab:orange", "o"),
                 "AlphaNet on cRT": ("tab:green", "o")}
_FAMILIES = ("AlphaNet, random neighbours", "AlphaNet on tau-normalised", "AlphaNet on logit adjustment",
             "AlphaNet on cRT", "AlphaNet", "NCM", "tau-normalised", "logit adjustment", "LWS", "cRT", "")


def _frontier_series(rows: list[dict]) -> list[tuple[str, str, list[tuple[float | None, dict, dict]]]]:
    """The frontier's series: ``(label, family, points)``, a point ``(rho, few, overall)``.
    An AlphaNet sweep (and its control) is one series per k, its points in rho order,
    drawn as a connected curve; every other method is a point of its family."""
    series: dict[str, tuple[str, list]] = {}
    for row in rows:
        name, rho = row["method"], None
        if name.startswith("AlphaNet") and " rho=" in name:
            name, value = name.rsplit(" rho=", 1)
            rho = float(value)
        family = ("input classifier" if name == "baseline" else
                  next(f for f in _FAMILIES if name.startswith(f)))
        label = "input classifier" if name == "baseline" else name
        series.setdefault(label, (family, []))[1].append((rho, row["top1"]["few"], row["top1"]["overall"]))
    return [(label, family, sorted(points, key=lambda p: -1.0 if p[0] is None else p[0]))
            for label, (family, points) in series.items()]


def _frontier_plot(rows: list[dict], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(8.5, 4.8))
    for label, family, points in _frontier_series(rows):
        colour, marker = _FAMILY_STYLE.get(family, ("tab:green", "o"))
        few = [p[1]["mean"] for p in points]
        overall = [p[2]["mean"] for p in points]
        sweep = points[0][0] is not None
        axis.errorbar(few, overall, xerr=[p[1]["std"] for p in points], yerr=[p[2]["std"] for p in points],
                      color=colour, marker=marker, markersize=11 if family == "input classifier" else 6,
                      linestyle=("--" if "random" in family else "-") if sweep else "none", capsize=2,
                      label=label + (" (rho sweep)" if sweep and len(points) > 1 else ""))
        if sweep:
            for (rho, f, o) in points:
                axis.annotate(f"ρ={rho:g}", (f["mean"], o["mean"]), textcoords="offset points", xytext=(4, 4),
                              fontsize=7, color=colour)
    axis.margins(x=0.1, y=0.06)  # room for the rho labels at the edges
    axis.set_xlabel("few-split top-1 (%)")
    axis.set_ylabel("overall top-1 (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    figure.subplots_adjust(right=0.66)
    save_figure(figure, path)
    plt.close(figure)
    return True


def run_eval(args: argparse.Namespace) -> int:
    weight, bias = load_classifier(args.classifier, args.classifier_key)
    if args.splits_from:
        train = _check_against(load_features(args.splits_from, "train", args.trust_pickle), "train", weight)
        splits = _splits_from_labels(train.y, weight.shape[0], args.few_threshold, args.many_threshold)
    elif os.path.isdir(args.data) and load_author_splits(args.data) is not None:
        splits = load_author_splits(args.data)
    else:
        metadata = read_metadata(args.classifier)
        if metadata is None or "splits" not in metadata:
            raise UsageError("no class splits known: the classifier file has none, so pass --splits-from TRAIN "
                             "(the training labels)")
        splits = {name: torch.tensor(ids, dtype=torch.long) for name, ids in metadata["splits"].items()}
    named = sum(int(ids.numel()) for ids in splits.values())
    highest = max((int(ids.max()) for ids in splits.values() if ids.numel()), default=-1)
    if named != weight.shape[0] or highest >= weight.shape[0]:
        raise InputError(f"{args.classifier}: the classifier has {weight.shape[0]} classes but its class splits name "
                         f"{named} (highest id {highest}); the splits belong to another label space")
    data = _check_against(load_features(args.data, "test", args.trust_pickle), "evaluation", weight)
    used = int(data.y.max()) + 1 if len(data.y) else 0
    if 0 < used < weight.shape[0] // 2:
        warnings.warn(f"{data.source}: its labels use only classes 0..{used - 1} of the classifier's "
                      f"{weight.shape[0]}; check that the data and the classifier share a label space")
    result = evaluate(weight, bias, data.x, data.y, splits, device=args.device)
    _say(args, f"{args.classifier} on {data.source} ({result['samples']} samples), accuracy in percent:")
    _results(args, _table([("top-1", result["top1"]), ("top-5", result["top5"])]).replace("| model |", "| metric |"),
             {"command": "eval", "classifier": args.classifier, "data": data.source, "samples": result["samples"],
              "top1": {c: result["top1"][c] for c in COLUMNS}, "top5": {c: result["top5"][c] for c in COLUMNS}})
    return 0


def _write_npy(path: str, array: np.ndarray) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            np.save(stream, array)
    write_atomic(path, write)


def run_synth(args: argparse.Namespace) -> int:
    tic = time.perf_counter()
    check_writable(args.out, folder=True)
    problem = make_preset(args.preset, scale=args.scale, seed=args.seed, dim=args.dim)
    os.makedirs(args.out, exist_ok=True)
    for role in ("train", "val", "test"):
        x, y = getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y")
        if x.shape[0] == 0:
            continue
        _write_npy(os.path.join(args.out, f"{role}_x.npy"), x.numpy())
        _write_npy(os.path.join(args.out, f"{role}_y.npy"), y.numpy())
    save_classifier(os.path.join(args.out, "classifier.pt"), problem.weight, problem.bias,
                    {"preset": args.preset, "scale": args.scale, "seed": args.seed})
    links = "".join(f"{c} group{int(g)}\n" for c, g in enumerate(problem.groups.tolist()))
    write_atomic(os.path.join(args.out, "hierarchy.txt"),
                 lambda t: write_text(t, "# class group: sibling classes share a group centre\n" + links))
    _say(args, f"wrote {args.preset} (scale {args.scale}: {problem.weight.shape[0]} classes, "
               f"{problem.train_x.shape[0]} train samples, d={problem.train_x.shape[1]}) to {args.out} "
               f"in {time.perf_counter() - tic:.1f}s")
    return 0


def _splits_argument(values: list[str]) -> dict[str, str]:
    splits = {}
    for value in values:
        name, given, path = value.partition("=")
        name, path = (name, path) if given else ("train", value)
        if name not in ("train", "val", "test") or not path:
            raise UsageError(f"--data {value}: expected PATH or SPLIT=PATH with SPLIT train, val or test")
        if name in splits:
            raise UsageError(f"--data: split {name} given twice")
        splits[name] = path
    return splits


def _join_extract_ranks(args: argparse.Namespace):
    """Under torchrun (``WORLD_SIZE`` > 1): joins the process group and gives this rank's
    :class:`Shard`, each rank on its own GPU (``LOCAL_RANK``) when it extracts on GPUs; else None.
    Gloo carries the few small collectives (a start-up check, the end's summaries) on any device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import datetime
    import torch.distributed as dist
    from .training.sharding import Shard
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = args.device.startswith("cuda") if args.device is not None else torch.cuda.is_available()
    if on_gpu:
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    return Shard.of(dist.group.WORLD, "rows", job="sharded extraction",
                    leaves="the finished chunks are kept: rerun the same command to resume")


def run_extract(args: argparse.Namespace) -> int:
    splits = _splits_argument(args.data)
    check_writable(args.out, folder=True)
    shard = _join_extract_ranks(args)
    try:
        return _run_extract(args, splits, shard)
    finally:
        if shard is not None:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run_extract(args: argparse.Namespace, splits: dict[str, str], shard) -> int:
    from . import extract
    loaded = extract.load_model(args.model, args.checkpoint, args.classifier_key)
    resize, crop, mean, std = extract.default_preprocessing(args.model, loaded.model)
    options = extract.Options(resize=args.resize or resize, crop=args.crop or crop, mean=mean, std=std,
                              dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                              amp=args.amp if args.amp != "auto" else ("bf16" if str(args.device).startswith("cuda")
                                                                        else "off"),
                              skip_bad=args.skip_bad, progress=not args.quiet)
    summary = extract.extract(args.model, args.checkpoint, splits, args.out, options, root=args.root,
                              classifier_key=args.classifier_key, device=args.device,
                              say=lambda text: _say(args, text), shard=shard)
    if shard is not None and shard.rank != 0:
        return 0
    _say(args, f"wrote {args.out}: " + ", ".join(f"{name} {split['rows']} rows" for name, split in
                                                 summary["splits"].items())
         + f" of {summary['dim']} features, and classifier.pt ({summary['num_classes']} classes); next: alphanet fit "
           f"--train {args.out} --classifier {os.path.join(args.out, 'classifier.pt')} --out corrected.pt")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from .apply import apply_correction_file
    if os.path.splitext(args.out)[1].lower() not in (".pt", ".pth"):
        raise UsageError(f"--out {args.out}: the corrected checkpoint is written as .pt or .pth")
    check_writable(args.out)
    for flag in ("checkpoint", "corrected"):
        given = getattr(args, flag)
        if os.path.exists(given) and os.path.exists(args.out) and os.path.samefile(given, args.out):
            raise InputError(f"--out {args.out} is the --{flag} file; write to another path (inputs are never "
                             "overwritten)")
    with StagedOutputs() as outputs:
        replaced = apply_correction_file(args.checkpoint, args.corrected, outputs.file(args.out), args.classifier_key)
        outputs.commit()
    _say(args, f"wrote {args.out}: {args.checkpoint} with {replaced} (and its bias) from {args.corrected}")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from .doctor import run
    return run(args.json)


def run_demo(args: argparse.Namespace) -> int:
    _say(args, "AlphaNet demo: a synthetic CIFAR-100-LT-shaped problem (100 classes, 35 many / 35 medium / 30 few, "
               "d=64), corrected with rho=0.5 and 3 trials.")
    problem = make_preset("cifar100-lt", seed=args.seed)
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for role in ("train", "test"):
            paths[role] = os.path.join(folder, f"{role}.npz")
            np.savez(paths[role], x=getattr(problem, f"{role}_x").numpy(), y=getattr(problem, f"{role}_y").numpy())
        paths["classifier"] = os.path.join(folder, "classifier.pt")
        save_classifier(paths["classifier"], problem.weight, problem.bias, {})
        fit_args = build_parser().parse_args(
            ["fit", "--train", paths["train"], "--test", paths["test"], "--classifier", paths["classifier"],
             "--out", args.out or os.path.join(folder, "corrected.pt"), "--rho", "0.5", "--trials", "3",
             "--seed", str(args.seed)] + (["--report", args.report] if args.report else []) +
            (["--quiet"] if args.quiet else []) + (["--device", args.device] if args.device else []))
        fit_args.demo = True
        return run_fit(fit_args)


def _bounded(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite ``kind`` in [low, high] ((low, high] with ``low_open``),
    so a value no fit could use is a usage error before any file is read."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        below = value <= low if low_open else value < low
        if below or (high is not None and value > high):
            show = (lambda v: str(int(v))) if kind is int else (lambda v: f"{v:g}")
            bounds = f"in {'(' if low_open else '['}{show(low)}, {show(high)}]" if high is not None else \
                f"{'above' if low_open else 'at least'} {show(low)}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return convert


def _option(name: str):
    """The argparse type of fit option ``name``: its type and range from :data:`config.OPTIONS`."""
    option = OPTIONS[name]
    return _bounded(option.kind, option.low, option.high, option.low_open)


_non_negative = _bounded(float, 0.0)


def _rho_value(text: str) -> float | str:
    try:
        return text if text == "auto" else _option("rho")(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or 'auto')") from None


def _device(text: str) -> str:
    """A --device value this machine can use (checked before any data is read)."""
    try:
        resolve_device(text)
    except (ValueError, RuntimeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alphanet", description="AlphaNet post-hoc correction of long-tailed "
                                     "classifiers (alphanet_ext " + __version__ + ").")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    def json_output(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true",
                         help="print the results as one JSON document on stdout (messages stay on stderr)")

    def common(sub: argparse.ArgumentParser, device: bool = True, splits: bool = True) -> None:
        if device:
            sub.add_argument("--device", type=_device, default=None,
                             help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sub.add_argument("--quiet", action="store_true", help="no progress output")
        sub.add_argument("--debug", action="store_true", help="on an unexpected error, print the whole traceback")
        if not splits:
            return
        sub.add_argument("--few-threshold", type=_option("few_threshold"), default=DEFAULTS.few_threshold,
                         help=OPTIONS["few_threshold"].help + " (default %(default)s)")
        sub.add_argument("--many-threshold", type=_option("many_threshold"), default=DEFAULTS.many_threshold,
                         help=OPTIONS["many_threshold"].help + " (default %(default)s)")

    def trust_pickle(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--trust-pickle", action="store_true",
                         help="read .pkl feature files with Python's full unpickler. RISK: a crafted .pkl then runs "
                              "any code it names, as you. Without it, .pkl files may hold only arrays, tensors and "
                              "plain containers, and anything else is refused")

    def classifier_key(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--classifier-key", default=None, metavar="LAYER",
                         help="the last layer's name in a whole model's state dict (e.g. fc, module.head): reads "
                              "LAYER.weight and LAYER.bias (default: the file's only 2-D weight)")

    def timeout(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--timeout", type=_bounded(float, 1.0), default=1800.0,
                         help="under torchrun: seconds a rank waits for the others before every rank stops "
                              "with an error naming the silent ones (default 1800)")

    def crt_epochs(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--crt-epochs", type=_bounded(int, 1, 10_000), default=10,
                         help="epochs of cRT's re-training (default 10)")

    def training_options(sub: argparse.ArgumentParser, metrics: tuple[str, ...], rho_default: list,
                         rho_type, rho_help: str) -> None:
        sub.add_argument("--k", type=_option("k"), nargs="+", default=[DEFAULTS.k],
                         help="neighbours per few class; several values sweep k (default 5)")
        sub.add_argument("--rho", type=rho_type, nargs="+", default=rho_default, help=rho_help)
        sub.add_argument("--metric", choices=metrics, default="euclidean",
                         help="each few class's neighbours: the base classes whose train-feature means are nearest"
                              + ("; random: chosen at random, the control" if "random" in metrics else "")
                              + " (default euclidean)")
        for name in ("epochs", "min_epochs", "batch_size", "lr", "weight_decay", "lr_step", "lr_gamma", "trials",
                     "seed", "pred_scale"):
            option, default = OPTIONS[name], getattr(DEFAULTS, name)
            shown = "" if default is None else " (default %(default)s)"
            sub.add_argument("--" + name.replace("_", "-"), type=_option(name), default=default,
                             help=f"{option.help}{shown}; {option.describe()}")
        sub.add_argument("--hidden", type=_bounded(int, 1, 65_536), nargs="*", default=list(DEFAULTS.hidden),
                         help="hidden widths of the coefficient network (default %(default)s; none: linear)")

    fit_parser = commands.add_parser("fit", help="correct a classifier from feature files")
    fit_parser.add_argument("--train", required=True, help="train features (.npz, NAME_x.npy, .pt, .safetensors, "
                            "or a folder: alphanet synth's or the authors' layout, whose val and test are used too)")
    fit_parser.add_argument("--classifier", required=True, help="classifier (.pt/.pth, .npz, .safetensors)")
    classifier_key(fit_parser)
    fit_parser.add_argument("--val", help="validation features (selects epoch, trial and rho)")
    fit_parser.add_argument("--test", help="test features (for the printed table and the report)")
    fit_parser.add_argument("--out", required=True, help="corrected classifier (.pt, .pth, .npz or .safetensors)")
    fit_parser.add_argument("--report", help="folder for report.json, report.md and plots")
    training_options(fit_parser, ("euclidean", "cosine", "random"), None, _rho_value,
                     "one value, several to sweep, or 'auto' (sweep %s on val: %d fits). Default: auto when "
                     "there is a val set (--val, or val files in the --train folder), else 1" % (AUTO_RHOS,
                                                                                                  len(AUTO_RHOS)))
    fit_parser.add_argument("--checkpoint", metavar="DIR",
                            help="save each fit's state here after every epoch; the same command run again resumes "
                                 "from it (bit-identical on the same device), and refuses a checkpoint of other "
                                 "inputs or options")
    fit_parser.add_argument("--shard-classes", action="store_true",
                            help="under torchrun: also split the classifier and the logits by class across the "
                                 "ranks (label spaces too large for one device); rows are always split")
    timeout(fit_parser)
    fit_parser.add_argument("--stop-at", help=argparse.SUPPRESS)  # test hook: STAGE:SIGNAL
    trust_pickle(fit_parser)
    fit_parser.add_argument("--max-overall-drop", type=_non_negative, default=1.0,
                            help="the most overall val top-1 (points) to give up for the few split: --rho auto "
                                 "chooses within it, and a fit with val warns beyond it (default 1)")
    fit_parser.add_argument("--on", choices=sorted(BASES),
                            help="correct a derived classifier instead of the input: la (logit adjustment) or tau "
                                 "(tau-normalisation), tau chosen on val, or crt (the last layer re-trained with "
                                 "class-balanced sampling); the table shows both")
    crt_epochs(fit_parser)
    fit_parser.add_argument("--control", action="store_true",
                            help="also fit the random-neighbour control for every k and rho (report tables only)")
    fit_parser.add_argument("--hierarchy", help="class hierarchy for the report: a text file of 'CHILD PARENT' lines, "
                            "classes named by their 0-based index, inner nodes by any other name")
    fit_parser.add_argument("--levels", type=_bounded(int, 0), default=4,
                            help="with --hierarchy: a prediction sharing an ancestor at most this many levels above "
                            "the true class counts as semantically close (default 4)")
    common(fit_parser)
    json_output(fit_parser)
    fit_parser.set_defaults(handler=run_fit)

    compare_parser = commands.add_parser("compare", help="AlphaNet against post-hoc peers, in one table")
    compare_parser.add_argument("--train", required=True, help="train features, as for fit")
    compare_parser.add_argument("--classifier", required=True, help="classifier (.pt/.pth, .npz, .safetensors)")
    classifier_key(compare_parser)
    compare_parser.add_argument("--val", help="validation features (choose tau, epochs and trials)")
    compare_parser.add_argument("--test", help="test features (the table's data; else val, else train)")
    compare_parser.add_argument("--report", help="folder for compare.json, compare.md and frontier.png")
    compare_parser.add_argument("--out", help="write the classifier of the method best on val (by --select) here, "
                                "whichever method it is; needs a val set")
    compare_parser.add_argument("--select", choices=("overall", "few", "balanced"), default="overall",
                                help="with --out: the val criterion (overall top-1; few-split top-1 within "
                                     "--max-overall-drop points of the input's overall; the mean of the splits' top-1)")
    compare_parser.add_argument("--max-overall-drop", type=_non_negative, default=1.0,
                                help="with --select few: the most overall val top-1 (points) to give up (default 1)")
    trust_pickle(compare_parser)
    compare_parser.add_argument("--on", nargs="*", choices=sorted(BASES), default=["la", "tau", "crt"],
                                help="also fit AlphaNet on these peers' classifiers (default: la tau crt; none: "
                                     "only on the input)")
    crt_epochs(compare_parser)
    training_options(compare_parser, ("euclidean", "cosine"), [0.5, 1.0, 1.5], _option("rho"),
                     "values of rho to compare")
    common(compare_parser)
    json_output(compare_parser)
    compare_parser.set_defaults(handler=run_compare)

    eval_parser = commands.add_parser("eval", help="top-1/top-5 per split of a classifier")
    eval_parser.add_argument("--classifier", required=True, help="classifier to score (.pt/.pth, .npz, "
                             ".safetensors); alphanet fit's output carries its class splits")
    classifier_key(eval_parser)
    eval_parser.add_argument("--data", required=True, help="labelled features to score, in any format fit reads "
                             "(a folder: its test set)")
    trust_pickle(eval_parser)
    eval_parser.add_argument("--splits-from", help="train features whose labels define the splits")
    common(eval_parser)
    json_output(eval_parser)
    eval_parser.set_defaults(handler=run_eval)

    synth_parser = commands.add_parser("synth", help="write a synthetic long-tailed problem")
    synth_parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    synth_parser.add_argument("--out", required=True, help="folder for {train,val,test}_{x,y}.npy, classifier.pt "
                              "and hierarchy.txt")
    synth_parser.add_argument("--scale", type=_bounded(float, 0.0, 1.0, low_open=True), default=1.0,
                              help="fraction of the preset's classes (0, 1]")
    synth_parser.add_argument("--seed", type=_option("seed"), default=0, help="random seed (default 0)")
    synth_parser.add_argument("--dim", type=_bounded(int, 1), default=None,
                              help="feature dimension (default: the preset's)")
    common(synth_parser, device=False, splits=False)
    synth_parser.set_defaults(handler=run_synth)

    extract_parser = commands.add_parser("extract", help="features of a trained network's images, for fit")
    extract_parser.add_argument("--model", required=True, metavar="SPEC",
                                help="torchvision:NAME, timm:NAME or module:package.module.factory (called with "
                                     "num_classes=)")
    extract_parser.add_argument("--checkpoint", required=True, help="the trained weights (read with tensors only)")
    extract_parser.add_argument("--data", required=True, nargs="+", metavar="[SPLIT=]PATH",
                                help="an ImageFolder tree or a list file of 'PATH LABEL' lines, per split "
                                     "(train=... val=... test=...; a bare PATH is train)")
    extract_parser.add_argument("--root", help="folder the list files' paths are relative to (default: the list's)")
    extract_parser.add_argument("--out", required=True, help="folder for SPLIT_x.npy, SPLIT_y.npy, classifier.pt "
                                "(under torchrun, each rank's SPLIT_x-RRRRR-of-WWWWW.npy shards: fit reads them as "
                                "one dataset)")
    classifier_key(extract_parser)
    extract_parser.add_argument("--resize", type=_bounded(int, 1, 8192), help="shorter side before the centre crop "
                                "(default: the model's pretrained config, else 256)")
    extract_parser.add_argument("--crop", type=_bounded(int, 1, 8192), help="centre crop (default: the model's, else 224)")
    extract_parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                                help="stored features (default float16)")
    extract_parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                                help="autocast of the forward pass (default: bf16 on a GPU, off on the CPU)")
    extract_parser.add_argument("--batch-size", type=_bounded(int, 1, 65536), default=64)
    extract_parser.add_argument("--workers", type=_bounded(int, 0, 256), default=min(8, os.cpu_count() or 1),
                                help="DataLoader workers decoding images (default %(default)s)")
    extract_parser.add_argument("--skip-bad", action="store_true",
                                help="skip unreadable images, listed in extract.json (default: stop at the first)")
    timeout(extract_parser)
    common(extract_parser, splits=False)
    extract_parser.set_defaults(handler=run_extract)

    apply_parser = commands.add_parser("apply", help="write your checkpoint back with the corrected classifier")
    apply_parser.add_argument("--checkpoint", required=True,
                              help="the model's checkpoint: a state dict or a training checkpoint (state_dict/model)")
    apply_parser.add_argument("--corrected", required=True, help="alphanet fit's output (--out)")
    apply_parser.add_argument("--out", required=True, help="the corrected checkpoint (.pt/.pth): every other tensor and "
                              "the structure kept, loadable with load_state_dict as the original")
    classifier_key(apply_parser)
    apply_parser.add_argument("--quiet", action="store_true", help="no messages")
    apply_parser.add_argument("--debug", action="store_true", help="on an unexpected error, print the whole traceback")
    apply_parser.set_defaults(handler=run_apply)

    doctor_parser = commands.add_parser("doctor", help="versions, what was built, and a short self-test of each op")
    doctor_parser.add_argument("--json", action="store_true", help="print one JSON document")
    doctor_parser.set_defaults(handler=run_doctor)

    demo_parser = commands.add_parser("demo", help="generate, correct and report a small problem (< 1 minute)")
    demo_parser.add_argument("--out", help="also write the corrected classifier here")
    demo_parser.add_argument("--report", help="also write a report folder")
    demo_parser.add_argument("--seed", type=_option("seed"), default=0,
                             help="random seed of the problem and the fit (default 0)")
    common(demo_parser, splits=False)
    demo_parser.set_defaults(handler=run_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"alphanet: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if hasattr(args, "device"):  # one device for the fits and the evaluations alike
            args.device = str(resolve_device(args.device))
        if hasattr(args, "few_threshold") and args.few_threshold > args.many_threshold + 1:
            raise UsageError(f"--few-threshold ({args.few_threshold}) cannot exceed --many-threshold + 1 "
                             f"({args.many_threshold + 1}): the medium split would overlap the others")
        if getattr(args, "epochs", None) is not None and getattr(args, "min_epochs", None) is not None \
                and args.min_epochs > args.epochs:
            raise UsageError(f"--min-epochs ({args.min_epochs}) is above --epochs ({args.epochs}): no epoch could "
                             "be chosen on val")
        return args.handler(args)
    except KeyboardInterrupt:
        print("alphanet: interrupted (outputs not yet moved into place were discarded)", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"alphanet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (InputError, ValueError, OSError, KeyError, RankFailure) as error:
        print(f"alphanet: error: {_one_line(error)}", file=sys.stderr)
        if getattr(args, "debug", False):
            traceback.print_exc()
        return 1
    except Exception as error:  # noqa: BLE001  (a bug or an environment problem: one line, not a traceback)
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"alphanet: error: {_one_line(error)} ({type(error).__name__}; rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
