"""``alphanet doctor``: what is installed and built, and a short self-test of every op."""
from __future__ import annotations

import importlib.util
import platform
import sys
import time
from typing import Any

import torch

from . import __version__, ops, reference

EXTRAS = {"cli": ("tqdm", "matplotlib", "safetensors"), "extract": ("torchvision", "PIL"), "optional": ("timm", "cupy")}


def _cuda_archs(build: dict) -> list[str]:
    """``sm_75_80_90_PTX`` -> ``["7.5", "8.0", "9.0", "PTX"]``."""
    parts = build.get("cuda_archs", "").removeprefix("sm_").split("_")
    return [part if part == "PTX" else f"{part[:-1]}.{part[-1]}" for part in parts if part]


def _gpu_usable(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether a kernel of this build can run on a GPU of ``capability``: SASS of the
    same major version and no newer minor, or PTX of an architecture not above it."""
    numbers = [tuple(int(x) for x in arch.split(".")) for arch in archs if arch != "PTX"]
    if any(major == capability[0] and minor <= capability[1] for major, minor in numbers):
        return True
    return "PTX" in archs and bool(numbers) and max(numbers) <= capability


def facts() -> dict[str, Any]:
    build = dict(ops._C.build_info) if ops.HAS_EXTENSION else {}
    archs = _cuda_archs(build)
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                         "capability": ".".join(map(str, capability)),
                         "usable": ops.compiled_with_cuda() and _gpu_usable(archs, capability)})
    return {
        "alphanet_ext": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "compiled": ops.HAS_EXTENSION,
        "built_against_torch": build.get("torch_version", "").replace("_", ".") or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": {"native_build": build.get("native_cpu"),
                        "avx2_paths": torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")},
        "cuda_kernels": ops.compiled_with_cuda(), "cuda_archs": archs,
        "cuda_built_with": build.get("cuda_version", "").replace("_", ".") or None,
        "gpus": gpus,
        "extras": {group: {name: importlib.util.find_spec(name) is not None for name in names}
                   for group, names in EXTRAS.items()},
    }


def _close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = 1e-4) -> bool:
    return bool(torch.allclose(ours.double().cpu(), theirs.double().cpu(), rtol=tolerance, atol=tolerance))


def self_test(device: torch.device) -> dict[str, str]:
    """Each op against its float64 reference on small random inputs, and a tiny fit: ``{check: "ok" or why}``."""
    generator = torch.Generator().manual_seed(0)
    out: dict[str, str] = {}

    def check(name: str, run) -> None:
        try:
            out[name] = "ok" if run() else "wrong result"
        except Exception as error:  # noqa: BLE001  (a broken build shows up here)
            out[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"

    x = torch.randn(500, 24, generator=generator)
    labels = torch.randint(0, 12, (500,), generator=generator)
    check("class_means", lambda: _close(ops.class_means(x.to(device), labels.to(device), 12)[0],
                                        reference.class_means(x, labels, 12)[0]))
    queries, keys = torch.randn(40, 24, generator=generator), torch.randn(300, 24, generator=generator)
    check("knn", lambda: torch.equal(ops.knn(queries.to(device), keys.to(device), 5)[1].cpu(),
                                     reference.knn(queries, keys, 5)[1]))
    source = torch.randn(30, 24, generator=generator)
    targets, neighbors = torch.arange(6), torch.randint(6, 30, (6, 4), generator=generator)
    alphas = torch.rand(6, 4, generator=generator)

    def combine() -> bool:
        a = alphas.clone().to(device).requires_grad_()
        result = ops.alpha_combine(source.to(device), targets.to(device), neighbors.to(device), a)
        result.sum().backward()
        a64 = alphas.clone().double().requires_grad_()
        expected = reference.alpha_combine(source, targets, neighbors, a64)
        expected.sum().backward()
        return _close(result, expected) and _close(a.grad, a64.grad)
    check("alpha_combine", combine)

    def tiny_fit() -> bool:
        from .fit import fit
        from .synthetic import make_long_tailed
        problem = make_long_tailed(num_classes=20, dim=8, max_count=80, min_count=3, seed=1)
        result = fit(problem.train_x, problem.train_y, problem.weight, problem.bias, epochs=2, device=device,
                     progress=False)
        return bool(torch.isfinite(result.weight).all()) and all(
            torch.isfinite(torch.tensor(r["loss"])).all() for r in result.history)
    check("training step (a tiny fit)", tiny_fit)
    return out


def run(as_json: bool = False) -> int:
    """Prints the report; returns 0 when everything a user needs works, else 1."""
    import json
    report = facts()
    problems = []
    if not report["compiled"]:
        problems.append("the compiled kernels are missing (running the float64 reference)")
    devices = [torch.device("cpu")] + [torch.device("cuda", gpu["index"]) for gpu in report["gpus"] if gpu["usable"]]
    tic = time.perf_counter()
    report["self_test"] = {str(device): self_test(device) for device in devices}
    report["self_test_seconds"] = round(time.perf_counter() - tic, 2)
    for device, results in report["self_test"].items():
        problems += [f"{name} on {device}: {status}" for name, status in results.items() if status != "ok"]
    for gpu in report["gpus"]:
        if not gpu["usable"]:
            problems.append(f"GPU {gpu['index']} ({gpu['name']}, compute capability {gpu['capability']}) cannot run "
                            f"these kernels (built for {', '.join(report['cuda_archs']) or 'no GPU'})")
    if not report["extras"]["cli"]["tqdm"] or not report["extras"]["cli"]["matplotlib"]:
        report["notes"] = ["the cli extra is incomplete: pip install 'alphanet_ext[cli]' for progress bars and plots"]
    report["problems"] = problems
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 1 if problems else 0


def _print(report: dict) -> None:
    yes = {True: "yes", False: "no", None: "-"}
    lines = [
        f"alphanet_ext {report['alphanet_ext']} (Python {report['python']}, {sys.platform})",
        f"torch {report['torch']} (CUDA {report['torch_cuda'] or 'none'}); kernels built against torch "
        f"{report['built_against_torch'] or '-'}",
        f"compiled kernels: {yes[report['compiled']]}; CPU {report['cpu_capability']} "
        f"(AVX2 paths {'on' if report['cpu_kernels']['avx2_paths'] else 'off'}, "
        f"native build {yes[report['cpu_kernels']['native_build']]})",
        f"CUDA kernels: {yes[report['cuda_kernels']]}" + (f" (CUDA {report['cuda_built_with']}, architectures "
                                                           f"{', '.join(report['cuda_archs'])})"
                                                           if report["cuda_kernels"] else ""),
    ]
    for gpu in report["gpus"] or [None]:
        lines.append("GPU: none visible" if gpu is None else
                     f"GPU {gpu['index']}: {gpu['name']} (compute capability {gpu['capability']}), "
                     f"{'usable' if gpu['usable'] else 'NOT usable by these kernels'}")
    for group, found in report["extras"].items():
        lines.append(f"extras [{group}]: " + ", ".join(f"{name} {yes[ok]}" for name, ok in found.items()))
    for device, results in report["self_test"].items():
        lines.append(f"self-test on {device}: " + ", ".join(f"{name} {status}" for name, status in results.items()))
    lines.append(f"self-test took {report['self_test_seconds']} s")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]] or ["everything a user needs works"]
    print("\n".join(lines))
