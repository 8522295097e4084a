"""cRT (`alphanet_ext.baselines.crt`) against the plain torch loop a user would write.

    python benchmarks/bench_crt.py [--preset places-lt] [--scale 1] [--epochs 2] [--threads 2] [--repeats 3]
                                   [--device cpu|cuda]

Both re-train the last layer on the same frozen features with the same algorithm:
class-balanced draws, zero start, SGD with momentum 0.9, weight decay 5e-4 on the
weight, a cosine rate per step, the same rates (ours picks them from the features;
the peer is given them), batches of 512, as many draws an epoch as train rows, and
the same number of steps (at least 500, cRT's floor).

The peer: `TensorDataset` + `DataLoader` with a `WeightedRandomSampler` (weights
1/n_c: classes equally likely), `nn.Linear`, `cross_entropy`, autograd,
`torch.optim.SGD` and `CosineAnnealingLR`. Ours: rows drawn by index from the
features kept resident, the softmax gradient written out in place, two matrix
products a step into buffers allocated once, no autograd.

Wall time of the whole re-training, both in this process, alternating, median of
--repeats; then the test top-1 (overall and few split) of each, to show they learn
the same classifier.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import machine, setup_threads, synchronize


def plain_loop(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, batch_size: int, lr: float,
               bias_lr: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = x.device
    counts = torch.bincount(y, minlength=num_classes).double()
    weights = (1.0 / counts)[y].cpu()
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(y), replacement=True,
                                                     generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                         sampler=sampler, drop_last=True)
    model = torch.nn.Linear(x.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": lr, "weight_decay": 5e-4},
                                 {"params": [model.bias], "lr": bias_lr, "weight_decay": 0.0}], momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    done = 0
    while done < steps:  # as many passes over the loader as the steps take
        for features, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(features.float()), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == steps:
                break
    return model.weight.detach(), model.bias.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="places-lt")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    import alphanet_ext
    from alphanet_ext import baselines, synthetic

    problem = synthetic.make_preset(args.preset, scale=args.scale, seed=0)
    device = torch.device(args.device)
    x, y = problem.train_x.to(device), problem.train_y.to(device)
    num_classes = problem.weight.shape[0]
    lr = 2.0 / float(x.float().square().sum(dim=1).mean())  # the rates ours picks: the peer is given them
    steps = max(args.epochs * (x.shape[0] // 512), 500)  # cRT's floor of 500 steps, for both
    print(f"{machine()}; {threads} threads; {args.preset} x{args.scale}: {x.shape[0]} train rows, {num_classes} "
          f"classes, d={x.shape[1]}; {args.epochs} epochs of {x.shape[0] // 512} steps ({steps} steps); "
          f"device {device}")

    def ours():
        return baselines.crt(x, y, num_classes, epochs=args.epochs, seed=0, device=device)

    def peer():
        return plain_loop(x, y, num_classes, steps, 512, lr, 2.0, seed=0)

    times = {"ours": [], "plain torch loop": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("plain torch loop", peer)):
            synchronize(args.device)
            start = time.perf_counter()
            results[name] = fn()
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    splits = alphanet_ext.make_splits(torch.bincount(problem.train_y, minlength=num_classes))
    figures = {"preset": args.preset, "scale": args.scale, "epochs": args.epochs, "threads": threads,
               "device": str(device), "machine": machine()}
    for name, (weight, bias) in results.items():
        top1 = alphanet_ext.evaluate(weight.cpu(), bias.cpu(), problem.test_x, problem.test_y, splits)["top1"]
        median = statistics.median(times[name])
        figures[name] = {"seconds": median, "top1_overall": top1["overall"], "top1_few": top1["few"]}
        print(f"{name:>17}: {median:7.2f} s (median of {args.repeats}; "
              f"{', '.join(f'{t:.2f}' for t in times[name])}), test top-1 {top1['overall']:.1f}, "
              f"few {top1['few']:.1f}")
    given = alphanet_ext.evaluate(problem.weight, problem.bias, problem.test_x, problem.test_y, splits)["top1"]
    ratio = figures["plain torch loop"]["seconds"] / figures["ours"]["seconds"]
    figures["speedup"] = ratio
    print(f"{'input classifier':>17}: test top-1 {given['overall']:.1f}, few {given['few']:.1f}")
    print(f"ours is {ratio:.2f}x the plain loop's speed")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(figures, stream, indent=2)


if __name__ == "__main__":
    main()
