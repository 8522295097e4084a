import contextlib

import pytest
import torch

import alphanet_ext
from alphanet_ext import ops

# "emulated-cuda": CPU tensors through the CUDA kernels and code paths, run by
# the CPU build's emulator (csrc/emulation), so CI without a GPU runs them too.
HAS_EMULATION = ops.HAS_EXTENSION and ops._C.has_cuda_emulation()
DEVICES = (["cpu"] + (["cuda"] if torch.cuda.is_available() and alphanet_ext.compiled_with_cuda() else [])
           + (["emulated-cuda"] if HAS_EMULATION else []))


@contextlib.contextmanager
def on_backend(name):
    """Yields the torch device for backend `name`, with the emulator on for "emulated-cuda"."""
    if name != "emulated-cuda":
        yield name
        return
    # The order a block's threads run in between barriers is shuffled, afresh
    # each run (printed on failure), so a missing barrier shows as a failure.
    schedule_seed = torch.randint(1, 2**62, ()).item()
    print(f"schedule_seed={schedule_seed}")
    ops._C._set_cuda_emulation(True, schedule_seed)
    # torch.empty's memory comes back NaN-filled (and integers at their largest)
    # in deterministic mode: a kernel that leaves part of an output unwritten then
    # shows, where fresh CPU pages would be zeros on a GPU's garbage
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield "cpu"
    finally:
        torch.use_deterministic_algorithms(deterministic)
        ops._C._set_cuda_emulation(False)
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# Tolerance of a result stored in `dtype` against a float64 reference.
TOLERANCE = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def runs_cuda_kernels(device) -> bool:
    """Whether ops on `device` run the CUDA kernels (on a GPU or the emulator)."""
    return device == "cuda" or (HAS_EMULATION and ops._C._cuda_emulation_enabled())


@pytest.fixture(params=DEVICES)
def device(request):
    with on_backend(request.param) as device:
        yield device


@pytest.fixture(params=["compiled", "fallback"])
def build(request, monkeypatch):
    """The ops through the compiled module, or as if it had failed to load (the
    pure-torch fallback, whose warning is taken as given)."""
    if request.param == "fallback":
        monkeypatch.setattr(ops, "HAS_EXTENSION", False)
        monkeypatch.setattr(ops, "_warned", True)
    return request.param


@pytest.fixture
def generator():
    # A fresh seed per test run, printed on failure, so inputs are new each run
    # but any failure can be replayed.
    seed = torch.randint(0, 2**31 - 1, ()).item()
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=torch.float32, device="cpu", generator=None):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory):
    """A small `alphanet synth` folder (cifar100-lt at 0.3 scale, 32 dims), made once per run."""
    from alphanet_ext import cli
    folder = tmp_path_factory.mktemp("synth") / "problem"
    assert cli.main(["synth", "--preset", "cifar100-lt", "--out", str(folder), "--scale", "0.3", "--dim", "32",
                     "--quiet"]) == 0
    return folder
