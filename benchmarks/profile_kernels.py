"""Where the GPU time of class means, kNN and the training step's alpha_combine
goes: per-kernel device time from torch.profiler, one table per case.

    python benchmarks/profile_kernels.py [--cases class-means-large,knn-large,knn-large-matmul,knn-huge,
                                           combine-rows-large,combine-columns-large,fit-epoch]
                                         [--fit-data DIR]

`fit-epoch` profiles one epoch of a whole fit (batch 256, rho 1) on the data
of `alphanet synth` in DIR (default /tmp/inat: the inat2018 preset), to show
which kernels the training stage's time goes to.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import alphanet_ext
from alphanet_ext.io import load_classifier, load_features
from bench_ops import SIZES
from common import machine


def device_time_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def kernel_table(label: str, fn, calls: int, plain: bool = False) -> None:
    fn()
    if plain:  # for an outside profiler (ncu): the warm-up call and one more
        fn()
        torch.cuda.synchronize()
        return
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in trace.key_averages() if device_time_us(e) > 0), key=device_time_us, reverse=True)
    total = sum(device_time_us(e) for e in events)
    print(f"\n{label}: {total / calls / 1e3:.2f} ms of device time per call ({calls} calls)")
    print("| kernel | launches per call | ms per call | share |")
    print("|---|---|---|---|")
    for event in events[:10]:
        print(f"| {event.key[:90]} | {event.count / calls:g} | {device_time_us(event) / calls / 1e3:.3f} "
              f"| {device_time_us(event) / total:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="class-means-large,knn-large,knn-large-matmul,knn-huge,combine-rows-large,"
                                           "combine-columns-large")
    parser.add_argument("--plain", action="store_true", help="run the cases without torch.profiler (for ncu)")
    parser.add_argument("--fit-data", default="/tmp/inat", help="alphanet synth's folder for the fit-epoch case")
    args = parser.parse_args()
    print(f"machine: {machine()}; torch {torch.__version__}")
    generator = torch.Generator().manual_seed(0)
    for case in args.cases.split(","):
        if case == "class-means-large":
            rows, dims, classes = SIZES["large"]["means"]
            x = torch.randn(rows, dims, generator=generator).cuda()
            labels = torch.randint(0, classes, (rows,), generator=generator).cuda()
            kernel_table(f"{case} ({rows}x{dims}, C={classes})", lambda: alphanet_ext.class_means(x, labels, classes),
                         5, args.plain)
        elif case.startswith("knn"):
            q, m, dims, k = SIZES["huge" if "huge" in case else "large"]["knn"]
            queries = torch.randn(q, dims, generator=generator).cuda()
            keys = torch.randn(m, dims, generator=generator).cuda()
            ranking = "matmul" if case.endswith("matmul") else "auto"
            fn = lambda: alphanet_ext.knn(queries, keys, k, ranking=ranking)  # noqa: E731
            kernel_table(f"{case} ({q}x{m}x{dims}, k={k})", fn, 1 if "huge" in case else 5, args.plain)
        elif case in ("combine-rows-large", "combine-columns-large"):
            # the training step's pattern: forward, then the gradient of the alphas only
            lines, dims, few, k, logit_rows = SIZES["large"]["combine"]
            dim = 0 if case == "combine-rows-large" else 1
            shape, label = ((lines, dims), f"W {lines}x{dims}") if dim == 0 else ((logit_rows, lines),
                                                                                 f"L {logit_rows}x{lines}")
            source = torch.randn(*shape, generator=generator).cuda()
            targets = torch.randint(0, lines, (few,), generator=generator).cuda()
            neighbors = torch.randint(0, lines, (few, k), generator=generator).cuda()
            alphas = torch.randn(few, k, generator=generator).cuda().requires_grad_()
            grad = torch.randn(*((few, dims) if dim == 0 else (logit_rows, few)), generator=generator).cuda()
            kernel_table(f"{case} ({label}, n={few}, k={k}, forward + alpha gradient)",
                         lambda: torch.autograd.grad(torch.ops.alphanet.alpha_combine(source, targets, neighbors,
                                                                                      alphas, dim), alphas, grad), 5,
                         args.plain)
        elif case == "fit-epoch":
            train = load_features(args.fit_data, "train")
            val_x = val_y = None
            if os.path.exists(os.path.join(args.fit_data, "val_x.npy")):
                val = load_features(args.fit_data, "val")
                val_x, val_y = val.x, val.y
            weight, bias = load_classifier(os.path.join(args.fit_data, "classifier.pt"))
            kernel_table(f"{case} ({args.fit_data}: {train.x.shape[0]}x{train.x.shape[1]}, C={weight.shape[0]}; "
                         "1 epoch, batch 256, rho 1)",
                         lambda: alphanet_ext.fit(train.x, train.y, weight, bias, val_x, val_y, epochs=1, min_epochs=1,
                                                  batch_size=256, rho=1.0, device="cuda", progress=False), 1,
                         args.plain)
        else:
            raise SystemExit(f"unknown case {case}")


if __name__ == "__main__":
    main()
