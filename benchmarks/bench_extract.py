"""alphanet extract against a plain hand-written extraction loop, on the same generated images.

    python benchmarks/bench_extract.py [--threads 2] [--images 2000] [--model resnet50] [--crop 64] [--repeats 3]
    python benchmarks/bench_extract.py --ranks 2 ...   # the command under torchrun against one process

With --ranks N: `alphanet extract` as a command, one process (--threads threads,
--workers loader workers) against N torchrun ranks splitting the same threads and
workers between them, alternating, median of --repeats wall times (start-up
included, as a user sees it); then the shards are checked against the one file.

The peer: the same model, DataLoader and transforms, a forward hook on the
classifier's input, features gathered in a list and written with torch.save at
the end (what a user would write). Ours: `alphanet_ext.extract.extract`
(memory-mapped .npy written chunk by chunk, resumable). Images/s: both in this
process, alternating, median of --repeats. Peak RSS: each in a fresh process
(a child of this one), at --images and at 4x as many, to show whether memory
grows with the dataset: the main process's anonymous resident memory
(RssAnon, sampled every 10 ms), since the pages of a memory-mapped output are
page cache the kernel can drop. On a GPU (--device cuda): images/s against the
model's pure forward rate on synthetic tensors (bf16 autocast, channels_last).
Needs torchvision (run it in the CUDA venv, as `make extract-test` does).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from common import machine, setup_threads


def make_images(folder: str, count: int, classes: int = 20, size: int = 80) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    for index in range(count):
        label = int(rng.integers(classes))
        path = os.path.join(folder, f"c{label:02d}", f"{index}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def checkpoint(path: str, model_name: str, classes: int = 20) -> None:
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(model_name, num_classes=classes).state_dict(), path)


def ours(args, folder: str, ckpt: str, out: str) -> float:
    from alphanet_ext import extract
    options = extract.Options(resize=args.crop, crop=args.crop, mean=extract.IMAGENET_MEAN, std=extract.IMAGENET_STD,
                              dtype="float32", batch_size=args.batch_size, workers=args.workers,
                              amp="bf16" if args.device == "cuda" else "off", progress=False)
    tic = time.perf_counter()
    extract.extract(f"torchvision:{args.model}", ckpt, {"train": folder}, out, options, device=args.device,
                    say=lambda text: None)
    return time.perf_counter() - tic


def plain(args, folder: str, ckpt: str, out: str) -> float:
    import torchvision
    from torchvision import transforms
    tic = time.perf_counter()
    model = torchvision.models.get_model(args.model, num_classes=20)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model = model.eval().to(args.device)
    captured = []
    model.fc.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].float().cpu()))
    transform = transforms.Compose([transforms.Resize(args.crop), transforms.CenterCrop(args.crop),
                                    transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406),
                                                                                (0.229, 0.224, 0.225))])
    dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=args.device == "cuda")
    labels = []
    with torch.inference_mode(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
        for images, y in loader:
            model(images.to(args.device))
            labels.append(y)
    torch.save({"x": torch.cat(captured), "y": torch.cat(labels)}, os.path.join(out, "features.pt"))
    return time.perf_counter() - tic


def forward_rate(args) -> float:
    """Images/s of the model's forward pass alone on synthetic tensors (the ceiling)."""
    import torchvision
    model = torchvision.models.get_model(args.model, num_classes=20).eval().to(args.device)
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, device=args.device)
    if args.device == "cuda":
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
        for _ in range(3):
            model(images)
        if args.device == "cuda":
            torch.cuda.synchronize()
        tic, steps = time.perf_counter(), 20
        for _ in range(steps):
            model(images)
        if args.device == "cuda":
            torch.cuda.synchronize()
    return steps * args.batch_size / (time.perf_counter() - tic)


def _anonymous_rss() -> int:
    """This process's resident anonymous memory (KiB): heap and tensors, not the
    page cache behind a memory-mapped output file (which the kernel can drop)."""
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def child(args) -> None:
    """One extraction in this fresh process; prints its peak anonymous RSS (sampled every 10 ms)."""
    peak, running = [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _anonymous_rss())
            time.sleep(0.01)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as out:
        (ours if args.child == "ours" else plain)(args, args.folder, args.ckpt, out)
        peak[0] = max(peak[0], _anonymous_rss())
    running[0] = False
    print(json.dumps({"peak_rss_mib": peak[0] / 1024}))


def command_run(args, folder: str, ckpt: str, out: str, ranks: int) -> float:
    """Wall seconds of one `alphanet extract` command, alone or under torchrun."""
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__import__("alphanet_ext").__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // ranks)), "PYTHONPATH": package_root}
    command = [sys.executable, *launcher, "-m", "alphanet_ext", "extract", "--model", f"torchvision:{args.model}",
               "--checkpoint", ckpt, "--data", folder, "--out", out, "--resize", str(args.crop), "--crop",
               str(args.crop), "--dtype", "float32", "--batch-size", str(args.batch_size), "--workers",
               str(max(0, args.workers // ranks)), "--device", args.device, "--quiet"]
    tic = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=package_root)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - tic


def ranks_main(args, folder: str, ckpt: str) -> None:
    from alphanet_ext.io import load_features
    times: dict[int, list[float]] = {1: [], args.ranks: []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for ranks in times:
                times[ranks].append(command_run(args, folder, ckpt, os.path.join(root, f"{ranks}-{repeat}"), ranks))
        one, many = load_features(os.path.join(root, "1-0"), "train"), load_features(
            os.path.join(root, f"{args.ranks}-0"), "train")
        same = np.asarray(one.x).tobytes() == np.asarray(many.x).tobytes()
        close = float(np.abs(np.asarray(one.x) - np.asarray(many.x)).max())
    rates = {ranks: args.images / statistics.median(values) for ranks, values in times.items()}
    print(f"| `alphanet extract`, {args.images} images | 1 process img/s | {args.ranks} ranks img/s | ratio |")
    print("|---|---|---|---|")
    print(f"| median of {args.repeats} wall times, start-up included | {rates[1]:.1f} | {rates[args.ranks]:.1f} | "
          f"{rates[args.ranks] / rates[1]:.2f}x |")
    print(f"\nshards against the one file: {'bit-identical' if same else f'largest difference {close:.3g}'} "
          f"({args.threads // args.ranks} thread(s) a rank against {args.threads} in one process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=80, help="side of the generated JPEGs")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-RSS runs (each a fresh process)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "alphanet-bench-images"))
    parser.add_argument("--ranks", type=int, default=1, help="> 1: the command under torchrun against one process")
    parser.add_argument("--child", choices=("ours", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    if args.child:
        child(args)
        return
    ckpt = os.path.join(args.cache, f"{args.model}.pt")
    counts = (args.images,) if args.skip_memory else (args.images, 4 * args.images)
    sizes = {count: os.path.join(args.cache, f"n{count}-{args.image_size}px") for count in counts}
    for count, folder in sizes.items():
        make_images(folder, count, size=args.image_size)
    checkpoint(ckpt, args.model)
    print(f"machine: {machine()}; device {args.device}; torch {torch.__version__}; threads {threads}; "
          f"{args.model} at {args.crop}x{args.crop} from {args.image_size}px JPEGs, batch {args.batch_size}, "
          f"{args.workers} loader workers")
    if args.ranks > 1:
        ranks_main(args, sizes[args.images], ckpt)
        return
    times = {"ours": [], "plain": []}
    if args.device == "cuda":  # untimed: CUDA's and cuDNN's start-up would fall on whichever runs first
        for run in (ours, plain):
            with tempfile.TemporaryDirectory() as out:
                run(args, sizes[args.images], ckpt, out)
    for _ in range(args.repeats):
        for name, run in (("ours", ours), ("plain", plain)):
            with tempfile.TemporaryDirectory() as out:
                times[name].append(run(args, sizes[args.images], ckpt, out))
    rates = {name: args.images / statistics.median(values) for name, values in times.items()}
    print(f"| extraction of {args.images} images | ours img/s | plain loop img/s | ratio |")
    print("|---|---|---|---|")
    print(f"| median of {args.repeats}, same process | {rates['ours']:.0f} | {rates['plain']:.0f} | "
          f"{rates['ours'] / rates['plain']:.2f}x |")
    if not args.skip_memory:
        memory(args, sizes, ckpt)
    ceiling = forward_rate(args)
    print(f"\nforward pass alone on synthetic tensors: {ceiling:.0f} img/s; ours reaches "
          f"{rates['ours'] / ceiling:.0%} of it")


def memory(args, sizes: dict, ckpt: str) -> None:
    """Peak anonymous RSS of ours and the plain loop, each in a fresh process, at each size."""
    print("\n| images | ours peak anonymous RSS MiB | plain loop peak anonymous RSS MiB |")
    print("|---|---|---|")
    for count, folder in sizes.items():
        peaks = {}
        for name in ("ours", "plain"):
            done = subprocess.run([sys.executable, __file__, "--child", name, "--folder", folder, "--ckpt", ckpt,
                                   "--model", args.model, "--crop", str(args.crop), "--batch-size",
                                   str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                                   "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            peaks[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        print(f"| {count} | {peaks['ours']:.0f} | {peaks['plain']:.0f} |")


if __name__ == "__main__":
    main()
