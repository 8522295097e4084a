"""The distributed fit on a group of one rank against the plain fit, in one process.

    python benchmarks/bench_one_rank.py --data DIR [--device cuda] [--epochs 10] [--batch-size 256]
                                        [--repeats 3] [--modes rows,classes]

DIR is what ``alphanet synth --preset inat2018 --out DIR`` writes (or any
folder with train_x.npy/train_y.npy, val_x.npy/val_y.npy and classifier.pt).
The process joins a one-rank ``torch.distributed`` group (NCCL on a GPU, gloo
on the CPU) and fits the same data three ways, alternating, --repeats times:
the plain fit, the row-sharded fit (``process_group=``) and the class-sharded
fit (``shard_classes=True``). It prints each one's median wall time, its stage
times, the ratio to the plain fit (the distributed path's overhead; the
issue's target is at most 1.05) and whether the corrected classifier matches
the plain fit's. It also times one all-reduce of a step's gradients through
the group, the collective a multi-rank row-sharded step adds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import alphanet_ext
from alphanet_ext import io
from common import machine, setup_threads


def _load(folder: str) -> dict:
    data = {}
    for split in ("train", "val"):
        features = io.load_features(os.path.join(folder, f"{split}_x.npy"), split)
        data[f"{split}_x"], data[f"{split}_y"] = features.x, features.y
    data["weight"], data["bias"] = io.load_classifier(os.path.join(folder, "classifier.pt"))
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="rows,classes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    device = torch.device(args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=timedelta(seconds=300))
    data = _load(args.data)
    print(f"machine: {machine()}; device {device}; torch {torch.__version__}; threads {threads}; backend {backend}; "
          f"{data['train_x'].shape[0]:,} train rows, {data['weight'].shape[0]:,} classes, d={data['weight'].shape[1]}; "
          f"{args.epochs} epochs, batch {args.batch_size}, rho 1")
    variants = {"plain": {}, "rows": {"process_group": dist.group.WORLD},
                "classes": {"process_group": dist.group.WORLD, "shard_classes": True}}
    names = ["plain"] + [m for m in args.modes.split(",") if m]
    times = {name: [] for name in names}
    stages, weights, accuracy = {}, {}, {}

    def run(name: str) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        result = alphanet_ext.fit(data["train_x"], data["train_y"], data["weight"], data["bias"], data["val_x"],
                                  data["val_y"], rho=1.0, epochs=args.epochs, batch_size=args.batch_size,
                                  device=device, progress=False, **variants[name])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[name].append(time.perf_counter() - tic)
        stages[name] = {key: round(value, 2) for key, value in result.timings.items()}
        weights[name] = result.weight.cpu()
        chosen = result.trial_val_top1[result.best_trial]
        accuracy[name] = f"{chosen['few']:.2f} / {chosen['overall']:.2f}"

    for name in names:  # warm-up: CUDA context, cuBLAS handles, the kernels' first launches
        run(name)
        times[name].clear()
    for _ in range(args.repeats):
        for name in names:
            run(name)
    plain = statistics.median(times["plain"])
    print("| fit | median s | runs s | vs plain | max abs diff of W vs plain | val top-1 few / overall | stages s |")
    print("|---|---:|---|---:|---:|---|---|")
    for name in names:
        median = statistics.median(times[name])
        diff = float((weights[name] - weights["plain"]).abs().max())
        print(f"| {name} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times[name])} | {median / plain:.3f}x "
              f"| {diff:.2e} | {accuracy[name]} | {stages[name]} |")
    # what a multi-rank row-sharded step adds: one all-reduce of the gradients (k=5, d=2048, hidden 32x3)
    few = int((torch.bincount(torch.as_tensor(np.asarray(data['train_y']))) <= 20).sum())
    values = 1 + 6 * data["weight"].shape[1] * 32 + 2 * 32 * 32 + 32 * 5 + 3 * 32 + 5 + few
    flat = torch.zeros(values, device=device)
    for _ in range(3):
        dist.all_reduce(flat)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = []
    for _ in range(5):
        tic = time.perf_counter()
        for _ in range(100):
            dist.all_reduce(flat)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - tic) / 100)
    print(f"one all-reduce of a step's gradients ({values * 4 / 1e6:.2f} MB) on this one-rank group: "
          f"{statistics.median(samples) * 1e6:.0f} us (median of 5 x 100)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
