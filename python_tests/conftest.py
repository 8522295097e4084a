import pytest
import torch

import alphanet_ext

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and alphanet_ext.compiled_with_cuda() else [])
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# Tolerance of a result stored in `dtype` against a float64 reference.
TOLERANCE = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


@pytest.fixture(params=DEVICES)
def device(request):
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
