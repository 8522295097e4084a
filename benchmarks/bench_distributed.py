"""The class-sharded fit against the one-process fit on a large synthetic label space.

    python benchmarks/bench_distributed.py [--classes 200000] [--dim 256] [--rows 2000000]
        [--ranks 4] [--steps 24] [--threads 1] [--folder DIR] [--device cpu|cuda]

Writes (once, into --folder) a long-tailed problem: fp16 train features as a
memory-mapped .npy, int64 labels, a float32 classifier. Then, each in fresh
processes on this machine: the one-process fit and the class-sharded fit on
--ranks gloo processes (each reading its own contiguous rows of the same
file), both stopped after --steps training steps of the first epoch (a full
fit at this size takes hours on 2 cores). Per process: peak RSS (VmHWM, which
counts the pages of the memory-mapped features a process read) and peak
anonymous RSS (RssAnon sampled every 20 ms: the memory the process itself
allocated), both without overlap (see below); the time of the set-up stages and of a training step (median
over whole chunks after the first); and, for the sharded fit, the bytes
each rank sent into collectives per step and the step time with each chunk's
exchanges begun before the previous chunk's steps (``overlap``, the default)
against without, in alternating blocks of steps in the same processes. The ratio of the largest rank's
peaks to the one-process fit's is printed last. With --device cuda the ranks
join over NCCL, rank r on GPU r, and the GPU's peak allocated memory is
printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta

import numpy as np
import torch


def write_problem(folder: str, classes: int, dim: int, rows: int, seed: int = 0) -> None:
    """Long-tailed counts (an exponential profile from 200 down to 2 rows a class, scaled to
    ``rows``), class centres in a 64-dimensional subspace, fp16 features written in chunks."""
    if os.path.exists(os.path.join(folder, "done")):
        return
    os.makedirs(folder, exist_ok=True)
    generator = np.random.default_rng(seed)
    profile = 200.0 * (2 / 200.0) ** (np.arange(classes) / max(1, classes - 1))
    counts = np.maximum(2, np.round(profile * rows / profile.sum())).astype(np.int64)
    labels = generator.permutation(np.repeat(np.arange(classes), counts))
    latent = generator.standard_normal((classes, 64)).astype(np.float32)
    embedding = np.linalg.qr(generator.standard_normal((dim, 64)))[0].T.astype(np.float32)
    centres = latent @ embedding * 2.0
    np.save(os.path.join(folder, "train_y.npy"), labels)
    features = np.lib.format.open_memmap(os.path.join(folder, "train_x.npy"), "w+", np.float16,
                                         (labels.size, dim))
    for begin in range(0, labels.size, 1 << 18):
        block = labels[begin:begin + (1 << 18)]
        noise = generator.standard_normal((block.size, dim), dtype=np.float32) * 0.5
        features[begin:begin + block.size] = (centres[block] + noise).astype(np.float16)
    features.flush()
    weight = centres + generator.standard_normal(centres.shape, dtype=np.float32) * 0.1
    np.save(os.path.join(folder, "weight.npy"), weight.astype(np.float32))
    np.save(os.path.join(folder, "bias.npy"), np.zeros(classes, dtype=np.float32))
    open(os.path.join(folder, "done"), "w").close()


class _Enough(Exception):
    pass


class _AnonPeak:
    """The peak of RssAnon, sampled every 20 ms on a thread."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _fit_steps(folder: str, steps: int, rank: int, world: int, shard_classes: bool, device: str) -> dict:
    """Runs the fit until ``steps`` training steps are done; returns its measurements."""
    import alphanet_ext
    import importlib
    fit_module = importlib.import_module("alphanet_ext.fit")  # the package exports the function under that name
    anon = _AnonPeak()
    x = np.load(os.path.join(folder, "train_x.npy"), mmap_mode="r")
    y = np.load(os.path.join(folder, "train_y.npy"), mmap_mode="r")
    part = slice(x.shape[0] * rank // world, x.shape[0] * (rank + 1) // world)
    weight = np.load(os.path.join(folder, "weight.npy"), mmap_mode="r")
    bias = np.load(os.path.join(folder, "bias.npy"))
    times, marks = {True: [], False: []}, {"start": time.perf_counter()}
    shard_holder = {}

    def train_epoch(step, sampler, cache, few_position, batch_size, bar):
        marks["setup"] = time.perf_counter() - marks["start"]
        shard = getattr(cache, "shard", None) or getattr(step, "shard", None)
        entries = torch.stack([sampler.draw(g) for g in step.generators])
        # Blocks of steps with the next chunk's exchanges begun ahead (overlap) and without,
        # alternating; a block's first chunk has nothing begun ahead, so its steps are not timed.
        modes = [False, True] * 2 if hasattr(cache, "overlap") else [False]
        block = max(2, steps // len(modes))
        per_chunk = max(1, cache.chunk_samples // batch_size)
        begin = 0
        for overlap in modes:
            if hasattr(cache, "overlap"):
                cache.overlap = overlap
            if overlap and "peak_rss" not in marks:  # the peaks without overlap (on one host, the default)
                marks["peak_rss"], marks["peak_anon"] = _peak_rss(), anon.peak
            before, done = shard.collective_bytes if shard else 0, 0
            tic = time.perf_counter()
            for batch in cache.epoch(entries[:, begin:begin + (block + per_chunk) * batch_size], batch_size,
                                     few_position):
                step(batch_size, batch)
                done += 1
                if done % per_chunk == 0:  # a step's time includes its chunk's logits: whole chunks are timed
                    if device != "cpu":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    if done > per_chunk:
                        times[overlap].append((now - tic) / per_chunk)
                    tic = now
            shard_holder["bytes"] = (shard.collective_bytes - before) / done if shard else 0
            begin += (block + per_chunk) * batch_size
        raise _Enough
    fit_module._train_epoch = train_epoch
    group = None
    if shard_classes:  # a class-sharded fit on any number of ranks, one included
        import torch.distributed as dist
        group = dist.group.WORLD
    try:
        alphanet_ext.fit(x[part], np.asarray(y[part]), weight, bias, k=5, rho=1.0, epochs=1, min_epochs=1,
                         batch_size=64, progress=False, process_group=group, shard_classes=shard_classes,
                         cuda_graphs=False, device=device)
    except _Enough:
        pass
    overlapped, plain = times[True], times[False]
    peak_rss, peak_anon = _peak_rss(), anon.stop()
    return {"rank": rank, "peak_rss": marks.get("peak_rss", peak_rss), "peak_anon": marks.get("peak_anon", peak_anon),
            "overlap_peak_rss": peak_rss, "overlap_peak_anon": peak_anon, "setup_s": marks.get("setup"),
            "step_s": statistics.median(plain), "overlap_step_s": statistics.median(overlapped) if overlapped else None,
            "bytes_per_step": shard_holder.get("bytes", 0), "steps": len(plain) + len(overlapped),
            "gpu_peak": torch.cuda.max_memory_allocated() if device != "cpu" else 0}


def _rank_main(rank: int, world: int, store: str, folder: str, steps: int, threads: int, out: str,
               device: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(threads)
    if device != "cpu":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=3600))
    result = _fit_steps(folder, steps, rank, world, True, device)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


def _one_process_main(folder: str, steps: int, threads: int, out: str, device: str) -> None:
    torch.set_num_threads(threads)
    with open(os.path.join(out, "one.json"), "w") as handle:
        json.dump(_fit_steps(folder, steps, 0, 1, False, device), handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--folder", default=None, help="where the problem is written (default: a temporary folder)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks-only", action="store_true",
                        help="skip the one-process fit (for the step and overlap figures alone)")
    args = parser.parse_args()
    import torch.multiprocessing as mp
    folder = args.folder or os.path.join(tempfile.gettempdir(), f"alphanet-bench-{args.classes}-{args.dim}-{args.rows}")
    tic = time.perf_counter()
    write_problem(folder, args.classes, args.dim, args.rows)
    print(f"problem: {args.classes:,} classes, d={args.dim}, {np.load(os.path.join(folder, 'train_y.npy'), mmap_mode='r').size:,}"
          f" fp16 rows in {folder} ({time.perf_counter() - tic:.0f}s); {args.threads} thread(s) per process, "
          f"{os.cpu_count()} CPUs, device {args.device}", flush=True)
    out = tempfile.mkdtemp()
    context = mp.get_context("spawn")
    single = None
    if not args.ranks_only:
        one = context.Process(target=_one_process_main, args=(folder, args.steps, args.threads, out, args.device))
        tic = time.perf_counter()
        one.start()
        one.join()
        with open(os.path.join(out, "one.json")) as handle:
            single = json.load(handle)
        print(f"one process: {time.perf_counter() - tic:.0f}s", flush=True)
    tic = time.perf_counter()
    mp.start_processes(_rank_main, args=(args.ranks, os.path.join(out, "store"), folder, args.steps, args.threads, out,
                                                   args.device),
                       nprocs=args.ranks, start_method="spawn")
    print(f"{args.ranks} ranks: {time.perf_counter() - tic:.0f}s", flush=True)
    ranks = []
    for rank in range(args.ranks):
        with open(os.path.join(out, f"rank{rank}.json")) as handle:
            ranks.append(json.load(handle))
    gib = 2 ** 30
    print(f"{'':22s}{'peak RSS GiB':>14s}{'peak anon GiB':>15s}{'GPU peak GiB':>14s}{'set-up s':>10s}"
          f"{'step ms':>9s}{'overlapped ms':>15s}{'sent MB/step':>14s}")
    for name, r in [("one process", single)] * (single is not None) + [(f"rank {r['rank']} of {args.ranks}", r)
                                                                        for r in ranks]:
        overlapped = f"{r['overlap_step_s'] * 1e3:15.2f}" if r["overlap_step_s"] else f"{'-':>15s}"
        print(f"{name:22s}{r['peak_rss'] / gib:14.2f}{r['peak_anon'] / gib:15.2f}{r['gpu_peak'] / gib:14.2f}"
              f"{r['setup_s']:10.1f}{r['step_s'] * 1e3:9.2f}{overlapped}{r['bytes_per_step'] / 1e6:14.2f}")
    plain = statistics.median(r["step_s"] for r in ranks)
    overlapped = statistics.median(r["overlap_step_s"] for r in ranks)
    print(f"step with the next chunk's exchanges begun ahead: {overlapped * 1e3:.1f} ms against {plain * 1e3:.1f} ms "
          f"without ({plain / overlapped:.3f}x; median over ranks); largest rank's peak RSS with it "
          f"{max(r['overlap_peak_rss'] for r in ranks) / gib:.2f} GiB, without {max(r['peak_rss'] for r in ranks) / gib:.2f}")
    if single is None:
        return
    worst_rss = max(r["peak_rss"] for r in ranks) / single["peak_rss"]
    worst_anon = max(r["peak_anon"] for r in ranks) / single["peak_anon"]
    print(f"largest rank / one process: peak RSS {worst_rss:.2f}x, peak anonymous RSS {worst_anon:.2f}x "
          f"(target <= 0.35x)")


if __name__ == "__main__":
    sys.exit(main())
