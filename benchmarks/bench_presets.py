"""`alphanet compare --out --select` on the synthetic presets: the method chosen on val
against each method's own test accuracy.

    python benchmarks/bench_presets.py [--presets places-lt,imagenet-lt] [--folder /tmp/alphanet-presets]
                                       [--threads 2] [--device cpu] [--trials 1]

Each preset is written once with `alphanet synth` (kept in --folder), then
`alphanet compare` runs once with its defaults (rho 0.5 1 1.5, AlphaNet on the
input and on the logit-adjusted, tau-normalised and cRT classifiers, the
random-neighbour control) and `--out`, which records every method's val top-1.
The selection under each criterion (overall, few within 1 point of the input's
overall, balanced) is then made by the command's own `_select_method` from those
val figures, as `--select` would make it. Printed per preset: every method's val
and test top-1, and per criterion the selected method's test top-1 against the
best test top-1 of any method (what an oracle that saw the test set would pick).
The cifar100-lt preset has no val set, so it cannot select; inat2018 is a GPU size.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

from common import machine, setup_threads


def run(*argv: str) -> str:
    from alphanet_ext import cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    if code != 0:
        raise SystemExit(f"alphanet {' '.join(argv)} exited {code}")
    return out.getvalue()


def criterion_value(select: str, top1: dict) -> float:
    if select == "balanced":
        return sum(top1[c] for c in ("many", "medium", "few")) / 3
    return top1["few" if select == "few" else "overall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="places-lt,imagenet-lt")
    parser.add_argument("--folder", default="/tmp/alphanet-presets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=1)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    from alphanet_ext import cli
    print(f"{machine()}; {threads} threads; device {args.device}")
    for preset in args.presets.split(","):
        data = os.path.join(args.folder, preset)
        if not os.path.exists(os.path.join(data, "classifier.pt")):
            run("synth", "--preset", preset, "--out", data, "--quiet")
        tic = time.perf_counter()
        document = json.loads(run("compare", "--train", data, "--classifier", os.path.join(data, "classifier.pt"),
                                  "--out", os.path.join(args.folder, f"{preset}-best.pt"), "--json", "--quiet",
                                  "--device", args.device, "--trials", str(args.trials)))
        seconds = time.perf_counter() - tic
        rows = document["methods"]
        print(f"\n### {preset} ({seconds:.0f} s for the compare command)\n")
        print("| method | val overall | val few | test many | test medium | test few | test overall |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            val = row.get("val_top1")
            cells = [f"{val['overall']:.1f}", f"{val['few']:.1f}"] if val else ["-", "-"]
            cells += [f"{row['top1'][c]['mean']:.1f}" for c in ("many", "medium", "few", "overall")]
            print(f"| {row['method']} | " + " | ".join(cells) + " |")
        methods = [(row["method"], None, None, row.get("val_top1"), None, None) for row in rows]
        print("\n| --select | selected on val | its test value | best test value (method) | gap |")
        print("|---|---|---:|---:|---:|")
        for select in ("overall", "few", "balanced"):
            chosen = cli._select_method(argparse.Namespace(select=select, max_overall_drop=1.0), methods)
            test = {c: rows[chosen]["top1"][c]["mean"] for c in ("many", "medium", "few", "overall")}
            # the oracle under the same rule: for "few", only methods within 1 point of the input's overall on test
            floor = rows[0]["top1"]["overall"]["mean"] - 1.0
            eligible = [row for row in rows if select != "few" or row["top1"]["overall"]["mean"] >= floor]
            best = max(eligible, key=lambda row: criterion_value(select, {c: row["top1"][c]["mean"]
                                                                          for c in test}))
            best_value = criterion_value(select, {c: best["top1"][c]["mean"] for c in test})
            value = criterion_value(select, test)
            print(f"| {select} | {rows[chosen]['method']} | {value:.1f} | {best_value:.1f} ({best['method']}) | "
                  f"{value - best_value + 0.0:+.1f} |")


if __name__ == "__main__":
    main()
