"""Full AlphaNet fits on synthetic data shaped like CIFAR-100-LT and ImageNet-LT.

    python benchmarks/bench_fit.py [--threads 2] [--sizes cifar100-lt,imagenet-lt-512,imagenet-lt-2048]
                                   [--peer-epochs 1] [--device cpu] [--logits kept|recomputed|both]
                                   [--graphs on|off|both]

Each size: our fit (25 epochs, rho=1, val selection; 10 epochs and no val for
CIFAR-100-LT; 10 epochs, batch 256 for inat2018, a GPU size not in the
default list) with its time split by stage, then the naive per-class-loop peer
(benchmarks/naive_peer.py) for --peer-epochs epochs in the same process, its
total extrapolated to the same number of epochs (stated as such).
``--logits recomputed`` makes the fit believe no memory is free, so it computes
the few-split and val logits every epoch (what it does when they do not fit);
``both`` runs each size both ways, alternating, in the same process.
``--graphs off`` fits with ``cuda_graphs=False`` (every training step launched
from Python, not replayed as a CUDA graph); ``both`` alternates as above.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import alphanet_ext
from alphanet_ext import synthetic
from alphanet_ext.config import FitConfig
from alphanet_ext.fit import fit_with_config
from alphanet_ext.training.cache import CacheSizes
from common import machine, setup_threads
from naive_peer import naive_epochs

# preset, feature dimension (None: the preset's), epochs, batch size
SIZES = {"cifar100-lt": ("cifar100-lt", None, 10, 64), "imagenet-lt-512": ("imagenet-lt", 512, 25, 64),
         "imagenet-lt-2048": ("imagenet-lt", 2048, 25, 64), "inat2018": ("inat2018", None, 10, 256)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--peer-epochs", type=int, default=1, help="0 skips the peer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--logits", choices=("kept", "recomputed", "both"), default="kept")
    parser.add_argument("--graphs", choices=("on", "off", "both"), default="on")
    args = parser.parse_args()
    modes = [(logits, graphs) for logits in (("kept", "recomputed") if args.logits == "both" else (args.logits,))
             for graphs in (("on", "off") if args.graphs == "both" else (args.graphs,))]
    threads = setup_threads(args.threads)
    print(f"machine: {machine()}; device {args.device}; torch {torch.__version__}; threads {threads}")
    print("| problem | ours total s | class means | neighbours | few logits | val logits | train | validation "
          "| peer s (extrapolated) | speed-up | few top-1 before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        name, dim, epochs, batch_size = SIZES[size]
        problem = synthetic.make_preset(name, dim=dim, seed=0)
        has_val = problem.val_x.shape[0] > 0
        val = (problem.val_x, problem.val_y) if has_val else (None, None)
        for logits, graphs in modes:
            label = "".join([f", logits {logits}" if args.logits == "both" else "",
                             f", CUDA graphs {graphs}" if args.graphs == "both" else ""])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the recomputed mode's warnings
                run(args, size, problem, val, epochs, batch_size, label, CacheSizes(budget=0 if logits ==
                    "recomputed" else None), graphs == "on")


def run(args: argparse.Namespace, size: str, problem: synthetic.LongTailedProblem, val: tuple, epochs: int,
        batch_size: int, label: str, sizes: CacheSizes, graphs: bool) -> None:
    has_val = val[0] is not None
    if args.device != "cpu":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    config = FitConfig(rho=1.0, epochs=epochs, batch_size=batch_size, cuda_graphs=graphs)
    result = fit_with_config(problem.train_x, problem.train_y, problem.weight, problem.bias, *val, config,
                             device=args.device, progress=False, sizes=sizes)
    if args.device != "cpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - tic
    t = result.timings
    before = alphanet_ext.evaluate(problem.weight, problem.bias, problem.test_x, problem.test_y, result.splits)
    after = alphanet_ext.evaluate(result.weight, result.bias, problem.test_x, problem.test_y, result.splits)
    peer, ratio = "skipped", ""
    if args.peer_epochs > 0:
        few = result.splits["few"]
        base = torch.cat([result.splits["many"], result.splits["medium"]]).sort().values
        peer_times = naive_epochs(problem.train_x, problem.train_y, problem.weight, problem.bias,
                                  problem.val_x if has_val else problem.test_x[:0],
                                  problem.val_y if has_val else problem.test_y[:0], few, base,
                                  epochs=args.peer_epochs, batch_size=batch_size, mean_loop_rows=20000)
        peer_total = (peer_times["class_means"] + peer_times["neighbors"] +
                      epochs * (peer_times["train_per_epoch"] + peer_times["val_per_epoch"]))
        peer, ratio = f"{peer_total:.1f}", f"{peer_total / wall:.0f}x"
    print(f"| {size} ({problem.train_x.shape[0]} train, d={problem.train_x.shape[1]}, {epochs} epochs, "
          f"batch {batch_size}{label}) "
          f"| {wall:.2f} | {t['class_means']:.2f} | {t['neighbors']:.2f} | {t['few_logits']:.2f} "
          f"| {t.get('val_logits', 0):.2f} | {t['train']:.2f} | {t['validation']:.2f} | {peer} | {ratio} "
          f"| {before['top1']['few']:.1f} -> {after['top1']['few']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
