"""Reports of a correction: JSON, Markdown tables and PNG plots."""
from __future__ import annotations

import json
import math
import os
import warnings

import torch

from .io import write_atomic
from .metrics import SPLIT_NAMES

COLUMNS = SPLIT_NAMES + ("overall",)


def _cell(entry: dict) -> str:
    if "mean" in entry:
        return f"{entry['mean']:.1f} ± {entry['std']:.1f}" if entry["std"] else f"{entry['mean']:.1f}"
    return f"{entry:.1f}"


def run_label(run: dict) -> str:
    """"AlphaNet rho=1.0", "AlphaNet k=10 rho=1.0", "AlphaNet, random neighbours rho=0.5",
    "AlphaNet on cRT rho=1.0" ..."""
    name = "AlphaNet, random neighbours" if run["metric"] == "random" else "AlphaNet"
    name += f" on {run['on']}" if run.get("on") else ""
    return name + (f" k={run['k']}" if run.get("show_k") else "") + f" rho={run['rho']}"


def base_label(on: dict) -> str:
    """What ``--on`` made of the input: "logit adjustment (tau=1.2)", "cRT (10 epochs)"."""
    return on["method"] + (f" (tau={on['tau']})" if "tau" in on else f" ({on['epochs']} epochs)")


VIEW_TITLES = {
    "few": "few-split samples; neighbours: the k nearest base classes",
    "base": "base-split samples; neighbours: the k nearest few classes",
    "all": "all samples; neighbours: the k nearest other classes",
}


def _changes_table(changes: dict, neighbour_words: str) -> list[str]:
    lines = ["| samples | model | correct | " + neighbour_words + " | elsewhere |", "|---|---|---|---|---|"]
    for view, table in changes.items():
        for model, counts in table.items():
            lines.append(f"| {view} | {model} | {counts['correct']} | {counts['as_neighbor']} | {counts['elsewhere']} |")
    return lines


def markdown(report: dict) -> str:
    if report.get("warning"):  # the first line says it; alphanet recognises its reports by that line's start
        lines = ["# AlphaNet correction report: WORSE than the input classifier on val", "",
                 f"**Warning: {report['warning']}**", ""]
    else:
        lines = ["# AlphaNet correction report", ""]
    config = report["config"]
    lines.append(f"k={config['k']}, metric={config['metric']}, epochs={config['epochs']}, trials={config['trials']}, "
                 f"seed={config['seed']}, evaluated on the {report['evaluated_on']} set "
                 f"({report['samples']} samples). Accuracies in percent; mean ± std over trials.")
    for top in ("top1", "top5"):
        lines += ["", f"## {top.replace('top', 'Top-')}", "",
                  "| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        if report.get("input"):
            lines.append("| input classifier | " + " | ".join(_cell(report["input"][top][c]) for c in COLUMNS) + " |")
        base = f"baseline: {base_label(report['on'])}" if report.get("on") else "baseline"
        lines.append(f"| {base} | " + " | ".join(_cell(report["baseline"][top][c]) for c in COLUMNS) + " |")
        for run in report["runs"]:
            marker = " (best on val)" if run.get("best") and run.get("best_on_val") else ""
            lines.append(f"| {run_label(run).replace('rho=', 'ρ=')}{marker} | " +
                         " | ".join(_cell(run[top][c]) for c in COLUMNS) + " |")
    if report.get("distance_correlation") is not None:
        low, high = report.get("distance_correlation_95", [float("nan")] * 2)
        heading = f"Few-class accuracy change vs mean distance to the {config['k']} neighbours: "
        if math.isnan(report["distance_correlation"]):
            lines += ["", heading + "Pearson r is undefined (fewer than 3 few classes, or a series without "
                                    "spread; plot: per_class_change.png)."]
        else:
            lines += ["", heading + f"Pearson r = {report['distance_correlation']:.3f} (bootstrap 95% interval "
                                    f"{low:.3f} to {high:.3f}; plot: per_class_change.png)."]
    if report.get("prediction_changes"):
        lines += ["", "## Prediction changes (best run)", "",
                  "Where the predictions of each group of samples land, before and after the correction:"]
        lines += [f"* {view}: {VIEW_TITLES[view]}" for view in report["prediction_changes"]]
        lines += [""] + _changes_table(report["prediction_changes"], "as one of its neighbours")
    semantic = report.get("semantic")
    if semantic:
        levels = semantic["levels"]
        lines += ["", f"## Semantic closeness (within {levels} levels of the class hierarchy)", "",
                  f"Top-1 counting a prediction that shares an ancestor at most {levels} levels above the true "
                  "class as correct:", "", "| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for model, accuracy in semantic["top1"].items():
            lines.append(f"| {model} | " + " | ".join(f"{accuracy[c]:.1f}" for c in COLUMNS) + " |")
        lines += ["", "Prediction changes with semantically close classes (of the other split; any class for "
                  "'all') as the neighbours:", ""]
        lines += _changes_table(semantic["prediction_changes"], "semantically close")
    return "\n".join(lines) + "\n"


BINNED_ABOVE = 300  # few classes beyond which per_class_change.png shows binned means


def binned_means(x: torch.Tensor, y: torch.Tensor, bins: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y``'s mean in ``bins`` bins of (about) equal counts along ``x``: each bin's mean x,
    mean y and the half-width of a normal 95 % interval of that mean (0 for one point)."""
    order = torch.argsort(x, stable=True)
    parts = [part for part in torch.tensor_split(order, min(bins, x.numel())) if part.numel()]
    centres = torch.stack([x[part].double().mean() for part in parts])
    means = torch.stack([y[part].double().mean() for part in parts])
    half = torch.stack([1.96 * y[part].double().std() / part.numel() ** 0.5 if part.numel() > 1
                        else torch.zeros((), dtype=torch.float64) for part in parts])
    return centres, means, half


def save_figure(figure, path: str) -> None:
    write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=110, bbox_inches="tight", format="png"))


def _changes_plot(plt, changes: dict, path: str) -> None:
    """Stacked bars per sample group: share correct / on a neighbour / elsewhere, before and after."""
    figure, axes = plt.subplots(1, len(changes), figsize=(3.2 * len(changes), 3.5), squeeze=False)
    for axis, (view, table) in zip(axes[0], changes.items()):
        bottom = [0.0, 0.0]
        for outcome, label, color in (("correct", "correct", "C2"), ("as_neighbor", "on a neighbour", "C3"),
                                      ("elsewhere", "elsewhere", "C7")):
            shares = []
            for model in ("before", "after"):
                total = sum(table[model].values())
                shares.append(100 * table[model][outcome] / total if total else 0.0)
            axis.bar(["before", "after"], shares, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, shares)]
        axis.set_title(f"{view} samples", fontsize=9)
        axis.set_ylim(0, 100)
    axes[0][0].set_ylabel("share of samples (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    save_figure(figure, path)
    plt.close(figure)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed, so the report has no PNG plots (pip install matplotlib)",
                      stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plots(report: dict, per_class: dict, folder: str) -> list[str]:
    """Split accuracies before/after, per-class change vs neighbour distance, prediction
    changes, accuracy vs rho. None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    best = next(run for run in report["runs"] if run.get("best"))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    positions = torch.arange(len(COLUMNS)).float()
    before = [report["baseline"]["top1"][c]["mean"] for c in COLUMNS]
    after = [best["top1"][c]["mean"] for c in COLUMNS]
    for offset, values, errors, label in ((-0.2, before, None, "baseline"),
                                          (0.2, after, [best["top1"][c]["std"] for c in COLUMNS],
                                           f"AlphaNet ρ={best['rho']}")):
        bars = axis.bar(positions + offset, values, 0.4, yerr=errors, label=label)
        axis.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    axis.set_xticks(positions.tolist(), COLUMNS)
    axis.set_ylim(0, 112)
    axis.set_ylabel(f"top-1 accuracy (%), {report['evaluated_on']}")
    axis.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    save_figure(figure, os.path.join(folder, "split_accuracy.png"))
    plt.close(figure)
    written.append("split_accuracy.png")

    figure, axis = plt.subplots(figsize=(5, 4))
    distance, change = per_class["distance"], per_class["change"]
    if distance.numel() > BINNED_ABOVE:  # thousands of points overplot: binned means with 95 % intervals
        axis.scatter(distance.numpy(), change.numpy(), s=2, alpha=0.15, color="0.5", linewidths=0)
        centres, means, half_widths = binned_means(distance, change)
        axis.errorbar(centres.numpy(), means.numpy(), yerr=half_widths.numpy(), marker="o", markersize=4,
                      color="C0", capsize=2, label=f"mean per {len(centres)} equal-count bins, 95 % interval")
        axis.legend(fontsize=7, loc="best")
    else:
        axis.scatter(distance.numpy(), change.numpy(), s=12, alpha=0.7)
    if distance.numel() > 1 and float(distance.std()) > 0:
        slope, intercept = torch.linalg.lstsq(torch.stack([distance, torch.ones_like(distance)], 1).double(),
                                              change.double()[:, None]).solution.flatten().tolist()
        xs = torch.linspace(float(distance.min()), float(distance.max()), 50)
        axis.plot(xs.numpy(), (slope * xs + intercept).numpy(), color="C1")
    axis.set_xlabel(f"mean distance to the {report['config']['k']} neighbours")
    axis.set_ylabel("few-class top-1 change (points)")
    axis.set_title(f"Pearson r = {report['distance_correlation']:.2f}")
    save_figure(figure, os.path.join(folder, "per_class_change.png"))
    plt.close(figure)
    written.append("per_class_change.png")

    if report.get("prediction_changes"):
        _changes_plot(plt, report["prediction_changes"], os.path.join(folder, "prediction_changes.png"))
        written.append("prediction_changes.png")

    sweep = [run for run in report["runs"] if run["k"] == best["k"] and run["metric"] == best["metric"]]
    control = [run for run in report["runs"] if run["k"] == best["k"] and run["metric"] == "random" != best["metric"]]
    if len(sweep) > 1:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        rhos = [run["rho"] for run in sweep]
        for column in COLUMNS:
            axis.errorbar(rhos, [run["top1"][column]["mean"] for run in sweep],
                          yerr=[run["top1"][column]["std"] for run in sweep], marker="o", label=column)
            color = axis.lines[-1].get_color()
            axis.axhline(report["baseline"]["top1"][column]["mean"], linestyle=":", linewidth=0.8, color=color)
            if control and column == "few":
                axis.plot([run["rho"] for run in control], [run["top1"]["few"]["mean"] for run in control],
                          linestyle="--", marker="x", color=color, label="few, random neighbours")
        axis.plot([], [], linestyle=":", linewidth=0.8, color="k", label="baseline of each split")
        axis.set_xlabel("ρ")
        axis.set_ylabel("top-1 accuracy (%)")
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        save_figure(figure, os.path.join(folder, "rho_sweep.png"))
        plt.close(figure)
        written.append("rho_sweep.png")
    return written


def write_text(path: str, text: str) -> None:
    with open(path, "w") as stream:
        stream.write(text)


def write_page(folder: str, name: str, markdown_text: str, images: list[str], title: str) -> str:
    """``name`` (an .html file) in ``folder``: the Markdown and the PNG files ``images``
    of that folder, in one self-contained page."""
    from .page import page
    text = page(markdown_text, [os.path.join(folder, image) for image in images], title)
    write_atomic(os.path.join(folder, name), lambda t: write_text(t, text))
    return name


def write_report(report: dict, per_class: dict, folder: str) -> list[str]:
    """report.json, report.md, the PNG plots and report.html (all of them in one page)."""
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=True)
    write_atomic(os.path.join(folder, "report.json"), lambda t: write_text(t, text))
    summary = markdown(report)
    write_atomic(os.path.join(folder, "report.md"), lambda t: write_text(t, summary))
    images = plots(report, per_class, folder)
    return ["report.json", "report.md"] + images + [write_page(folder, "report.html", summary, images,
                                                               "AlphaNet correction report")]

