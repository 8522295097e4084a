"""torch.compile tracing of every op, and the host build of the per-element
device functions that otherwise only the CUDA kernels run."""
import random

import pytest
import torch

import alphanet_ext
from alphanet_ext import reference
from conftest import TOLERANCE

pytestmark = pytest.mark.skipif(not alphanet_ext.HAS_EXTENSION, reason="compiled module not built")


def test_torch_compile_traces_every_op(device):
    def step(x, labels, alphas):
        means, counts = alphanet_ext.class_means(x, labels, 6)
        distances, indices = alphanet_ext.knn(means[:2], means[2:], 3)
        combined = alphanet_ext.alpha_combine(means, torch.arange(2, device=x.device), indices + 2, alphas)
        return combined.sum() + distances.sum() + counts.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(60, 8, device=device, requires_grad=True)  # gradients flow back through all three ops
    labels = torch.arange(60, device=device) % 6
    alphas = torch.rand(2, 3, device=device, requires_grad=True)
    eager_x, eager_alphas = (t.detach().clone().requires_grad_() for t in (x, alphas))
    result = compiled(x, labels, alphas)
    result.backward()
    expected = step(eager_x, labels, eager_alphas)
    expected.backward()
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(alphas.grad, eager_alphas.grad)
    torch.testing.assert_close(x.grad, eager_x.grad)


def test_opcheck(device, generator):
    """torch.library.opcheck on each op: its schema (mutations included), its
    autograd registration, its fake kernel against the real one, and AOT dispatch."""
    x = torch.randn(30, 6, generator=generator).to(device).requires_grad_()
    labels = torch.arange(30, device=device) % 4
    source = torch.randn(12, 5, generator=generator).to(device).requires_grad_()
    logits = torch.randn(7, 12, generator=generator).to(device).requires_grad_()
    targets = torch.tensor([0, 1, 2], device=device)
    neighbors = torch.randint(3, 12, (3, 4), generator=generator).to(device)
    alphas = torch.rand(3, 4, generator=generator).to(device).requires_grad_()
    cases = [
        (torch.ops.alphanet.class_means.default, (x, labels, 4)),
        (torch.ops.alphanet.class_sums_.default, (torch.zeros(4, 6, device=device),
                                                  torch.zeros(4, dtype=torch.long, device=device), x.detach(), labels)),
        (torch.ops.alphanet.knn.default, (x[:5], x[5:].detach(), 3, "euclidean")),
        (torch.ops.alphanet.alpha_combine.default, (source, targets, neighbors, alphas, 0)),
        (torch.ops.alphanet.alpha_combine.default, (logits, targets, neighbors, alphas, 1)),
        # the networks' first layer, its input whole and gathered from a table of rows
        (torch.ops.alphanet._input_product.default, (source.detach().T.contiguous(), torch.randn(
            5, 16, generator=generator).to(device), 12)),
        (torch.ops.alphanet._input_product.default, (source.detach(), torch.randn(
            20, 16, generator=generator).to(device), 3, torch.randint(0, 12, (3, 4), generator=generator).to(device))),
    ]
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        means, counts = torch.ops.alphanet.class_means(torch.empty(10, 4, dtype=torch.half),
                                                       torch.zeros(10, dtype=torch.long), 3)
        distances, indices = torch.ops.alphanet.knn(torch.empty(5, 4), torch.empty(9, 4), 2, "cosine")
        logits = torch.ops.alphanet.alpha_combine(torch.empty(7, 11), torch.zeros(3, dtype=torch.long),
                                                  torch.zeros(3, 2, dtype=torch.long), torch.empty(3, 2), 1)
    assert means.shape == (3, 4) and means.dtype == torch.float32 and counts.shape == (3,)
    assert distances.shape == (5, 2) and indices.dtype == torch.long
    assert logits.shape == (7, 3)


def test_topk_insert_keeps_k_best_in_order():
    rng = random.Random(0)
    for _ in range(50):
        values = [rng.choice([0.5, 1.0, rng.random()]) for _ in range(rng.randint(1, 40))]
        k = rng.randint(1, len(values))
        got_values, got_indices = alphanet_ext.ops._C._topk_insert_all(k, values)
        expected = sorted(range(len(values)), key=lambda i: (values[i], i))[:k]
        assert got_indices == expected and got_values == [values[i] for i in expected]


def test_segment_sum_follows_row_order():
    x = [float(v) for v in range(12)]  # 4 rows x 3 columns
    rows = [3, 1, 0, 2]
    assert alphanet_ext.ops._C._segment_sum(x, 3, rows, 1, 3, 2) == x[1 * 3 + 2] + x[0 * 3 + 2]
    assert alphanet_ext.ops._C._segment_sum(x, 3, rows, 2, 2, 0) == 0.0


def test_segment_sum_adds_groups_of_four_pairwise():
    # 1e16 + 1 rounds back to 1e16 in float64, so the order of the additions shows
    big = 1e16
    x = [big, 1.0, -big, 1.0, 1.0]  # one column
    rows = [0, 1, 2, 3, 4]
    pairwise = ((big + 1.0) + (-big + 1.0)) + 1.0
    in_row_order = (((big + 1.0) - big) + 1.0) + 1.0
    assert pairwise != in_row_order
    assert alphanet_ext.ops._C._segment_sum(x, 1, rows, 0, 5, 0) == pairwise


def test_l1_normalized_grad_matches_autograd():
    alphas = torch.tensor([0.5, -1.5, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    grad_normalized = torch.tensor([0.3, -0.2, 1.1, 0.7], dtype=torch.float64)
    (alphas / alphas.abs().sum()).backward(grad_normalized)
    got = alphanet_ext.ops._C._l1_normalized_grad(alphas.tolist(), grad_normalized.tolist())
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), alphas.grad, **TOLERANCE[torch.float64])


def test_cuda_matches_cpu():
    if not torch.cuda.is_available() or not alphanet_ext.compiled_with_cuda():
        pytest.skip("needs a GPU and a CUDA build")
    x = torch.randn(5000, 130)
    labels = torch.randint(0, 77, (5000,))
    cpu_means = alphanet_ext.class_means(x, labels, 77)[0]
    cuda_means = alphanet_ext.class_means(x.cuda(), labels.cuda(), 77)[0]
    torch.testing.assert_close(cuda_means.cpu(), cpu_means, rtol=1e-6, atol=1e-6)
    queries, keys = torch.randn(700, 64), torch.randn(20000, 64)
    cpu_knn = alphanet_ext.knn(queries, keys, 9)
    cuda_knn = alphanet_ext.knn(queries.cuda(), keys.cuda(), 9)
    assert torch.equal(cuda_knn[1].cpu(), cpu_knn[1])
    expected = reference.knn(queries, keys, 9)
    assert torch.equal(cpu_knn[1], expected[1])
