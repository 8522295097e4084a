import pytest
import torch

import alphanet_ext
from alphanet_ext import reference
from conftest import FLOAT_DTYPES, TOLERANCE, rand, runs_cuda_kernels


def make_case(lines, elems, n, k, dim, dtype=torch.float32, device="cpu", generator=None):
    shape = (lines, elems) if dim == 0 else (elems, lines)
    source = rand(*shape, dtype=dtype, device=device, generator=generator)
    targets = torch.randint(0, lines, (n,), generator=generator).to(device)
    neighbors = torch.randint(0, lines, (n, k), generator=generator).to(device)
    alphas = rand(n, k, device=device, generator=generator)
    return source, targets, neighbors, alphas


def assert_alpha_gradient_matches(source, targets, neighbors, alphas, grad_out, dim):
    """The gradient of ``alphas`` through alpha_combine, against the float64 reference's."""
    a = alphas.clone().requires_grad_()
    alphanet_ext.alpha_combine(source, targets, neighbors, a, dim=dim).backward(grad_out)
    a_ref = alphas.cpu().double().requires_grad_()
    reference.alpha_combine(source.cpu().double(), targets.cpu(), neighbors.cpu(), a_ref, dim).backward(
        grad_out.cpu().double())
    torch.testing.assert_close(a.grad.cpu().double(), a_ref.grad, rtol=1e-5, atol=1e-5)


SHAPES = [  # lines, elems, n, k
    (1, 1, 1, 1), (5, 1, 3, 2), (9, 33, 4, 5), (100, 257, 30, 5), (40, 2, 40, 10), (13, 64, 0, 3), (6, 0, 4, 2),
    # rows of whole 16-byte packs (CUDA's vectorised kernels): 96 for every dtype, 36 for 4- and 8-byte ones
    (50, 96, 20, 5), (30, 36, 12, 4),
    # k = 11 over 70 logit rows: CUDA's column forward holds 8 neighbours' plan at once, and 8 rows
    (60, 70, 9, 11),
]


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("lines,elems,n,k", SHAPES)
def test_matches_reference(device, generator, dim, dtype, lines, elems, n, k):
    source, targets, neighbors, alphas = make_case(lines, elems, n, k, dim, dtype, device, generator)
    out = alphanet_ext.alpha_combine(source, targets, neighbors, alphas, dim=dim)
    expected = reference.alpha_combine(source.cpu(), targets.cpu(), neighbors.cpu(), alphas.cpu(), dim)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dim", [0, 1])
def test_non_contiguous_source_and_indices(device, generator, dim):
    wide = rand(60, 80, device=device, generator=generator)
    source = wide.T[::2]  # [40, 60] with strides (2, 80)
    targets = torch.randint(0, source.shape[dim], (20,), generator=generator).to(device)[::2]
    neighbors = torch.randint(0, source.shape[dim], (3, 10), generator=generator).to(device).T
    alphas = rand(3, 10, device=device, generator=generator).T
    out = alphanet_ext.alpha_combine(source, targets, neighbors, alphas, dim=dim)
    expected = reference.alpha_combine(source.cpu(), targets.cpu(), neighbors.cpu(), alphas.cpu(), dim)
    torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("elems", [5, 6])  # 6: whole 16-byte packs of float64
@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck(device, generator, dim, elems):
    source, targets, neighbors, alphas = make_case(7, elems, 4, 3, dim, torch.float64, device, generator)
    # Repeat a line so the source gradient must add several contributions.
    neighbors[0, 0] = targets[1]
    source.requires_grad_()
    alphas = alphas.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, a: alphanet_ext.alpha_combine(s, targets, neighbors, a, dim=dim), (source, alphas))


# 96: whole 16-byte packs for every dtype; 290 x 60: CUDA's column alpha gradient
# in 19 chunks of 16 elements (8 staged rows at a time; the last chunk 2); 2000:
# in 65 chunks of 31; 40 x 600: in 3 chunks, its classes shared by 2 blocks
@pytest.mark.parametrize("elems,n", [(70, 20), (96, 20), (290, 60), (2000, 20), (40, 600)])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradients_match_reference(device, generator, dim, dtype, elems, n):
    source, targets, neighbors, alphas = make_case(50, elems, n, 5, dim, dtype, device, generator)
    grad_out = rand(*((n, elems) if dim == 0 else (elems, n)), dtype=dtype, device=device, generator=generator)
    s, a = source.clone().requires_grad_(), alphas.clone().requires_grad_()
    alphanet_ext.alpha_combine(s, targets, neighbors, a, dim=dim).backward(grad_out)
    s_ref, a_ref = source.cpu().double().requires_grad_(), alphas.cpu().double().requires_grad_()
    reference.alpha_combine(s_ref, targets.cpu(), neighbors.cpu(), a_ref, dim).backward(grad_out.cpu().double())
    tol = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
           torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}[dtype]
    # alphas are float32; their gradient sums `elems` float32 products
    alpha_tol = tol if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-5 * max(1, elems / 100),
                                                                          atol=1e-5 * max(1, elems / 100))
    torch.testing.assert_close(a.grad.cpu().double(), a_ref.grad, **alpha_tol)
    torch.testing.assert_close(s.grad.cpu().double(), s_ref.grad, **tol)


@pytest.mark.parametrize("layout", ["transposed", "every_other"])
@pytest.mark.parametrize("dim", [0, 1])
def test_gradients_of_non_contiguous_source_and_grad_out(device, generator, dim, layout):
    if layout == "transposed":
        source = rand(90, 70, device=device, generator=generator).T  # [70, 90], strides (1, 70)
    else:
        source = rand(70, 180, device=device, generator=generator)[:, ::2]  # [70, 90], strides (180, 2)
    lines = source.shape[dim]
    targets = torch.randint(0, lines, (12,), generator=generator).to(device)
    neighbors = torch.randint(0, lines, (12, 4), generator=generator).to(device)
    alphas = rand(12, 4, device=device, generator=generator)
    shape = (12, source.shape[1]) if dim == 0 else (source.shape[0], 12)
    grad_out = rand(shape[1], shape[0], device=device, generator=generator).T  # transposed view
    s, a = source.detach().requires_grad_(), alphas.clone().requires_grad_()
    alphanet_ext.alpha_combine(s, targets, neighbors, a, dim=dim).backward(grad_out)
    s_ref, a_ref = source.cpu().double().requires_grad_(), alphas.cpu().double().requires_grad_()
    reference.alpha_combine(s_ref, targets.cpu(), neighbors.cpu(), a_ref, dim).backward(grad_out.cpu().double())
    torch.testing.assert_close(s.grad.cpu().double(), s_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.cpu().double(), a_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [0, 1])
def test_gradients_do_not_depend_on_thread_count(generator, dim):
    source, targets, neighbors, alphas = make_case(300, 257, 70, 5, dim, generator=generator)
    grad_out = rand(*((70, 257) if dim == 0 else (257, 70)), generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append(torch.ops.alphanet.alpha_combine_backward(grad_out, source, targets, neighbors, alphas,
                                                                     dim, True, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one, many) for one, many in zip(*results))


# rows: packed (whole 16-byte packs) and element-wise; columns: staged in shared
# memory (rows fit in 112 KB; 41 lines: logit rows start 0-3 elements past a
# 16-byte boundary, or 0-7 in 2-byte types, and the staged NaN follows a whole
# pack's end in some) and read from global memory (15000 float64 lines do not)
@pytest.mark.parametrize("dim,lines,elems,dtype", [(0, 50, 96, torch.float32), (0, 50, 37, torch.float32),
                                                  (1, 40, 30, torch.float32), (1, 41, 30, torch.float32),
                                                  (1, 41, 30, torch.bfloat16), (1, 15000, 3, torch.float64)])
def test_cuda_kernels_read_nan_for_lines_outside_the_source(device, generator, dim, lines, elems, dtype):
    """The CUDA op skips the value checks (the Python wrapper runs them, and a compiled
    graph cannot); a bad index must then give NaN, never an out-of-bounds read."""
    if not runs_cuda_kernels(device):
        pytest.skip("the CPU op checks every index before reading")
    source, targets, neighbors, alphas = make_case(lines, elems, 4, 3, dim, dtype, device, generator)
    bad_neighbors, bad_targets = neighbors.clone(), targets.clone()
    bad_neighbors[1, 2], bad_targets[2] = lines + 5, -1
    out = torch.ops.alphanet.alpha_combine(source, bad_targets, bad_neighbors, alphas, dim).cpu()
    expected = reference.alpha_combine(source.cpu(), targets.cpu(), neighbors.cpu(), alphas.cpu(), dim)
    per_class = out if dim == 0 else out.T
    assert per_class[1:3].isnan().all()
    torch.testing.assert_close(per_class[[0, 3]].double(), (expected if dim == 0 else expected.T)[[0, 3]],
                               **TOLERANCE[dtype])
    # the alpha gradient's kernels guard their reads the same way
    grad_out = rand(*out.shape, dtype=dtype, device=device, generator=generator)
    _, grad_alphas = torch.ops.alphanet.alpha_combine_backward(grad_out, source, bad_targets, bad_neighbors, alphas,
                                                               dim, False, True)
    a_ref = alphas.cpu().double().requires_grad_()
    reference.alpha_combine(source.cpu(), targets.cpu(), neighbors.cpu(), a_ref, dim).backward(grad_out.cpu().double())
    assert grad_alphas[1].isnan().all()
    torch.testing.assert_close(grad_alphas[[0, 2, 3]].cpu().double(), a_ref.grad[[0, 2, 3]], rtol=1e-5, atol=1e-5)


def test_more_elements_and_classes_than_the_kernels_grids_hold(device, generator):
    """The column forward launches at most 2^20 blocks (one per logit row) and the
    row alpha gradient at most 65,535 (one per class); grid-stride loops do the rest."""
    if device != "cuda":
        pytest.skip("about 26 s under the CPU emulator; instant on a GPU")
    elems = (1 << 20) + 7
    source, targets, neighbors, alphas = make_case(3, elems, 2, 1, 1, device=device, generator=generator)
    out = alphanet_ext.alpha_combine(source, targets, neighbors, alphas, dim=1)
    expected = reference.alpha_combine(source.cpu(), targets.cpu(), neighbors.cpu(), alphas.cpu(), 1)
    torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCE[torch.float32])
    n = 65_535 + 9
    source, targets, neighbors, alphas = make_case(4, 3, n, 2, 0, device=device, generator=generator)
    grad_out = rand(n, 3, device=device, generator=generator)
    assert_alpha_gradient_matches(source, targets, neighbors, alphas, grad_out, 0)


# The CUDA column kernels copy logit rows to shared memory, as many as fit in
# 112 KB (up to 8; the forward takes fewer when there are few rows): 6,200
# float32 columns, 4 rows (2 in the forward here; either is above the 48 KB a
# kernel gets without opting in); float64, 2 rows; 15,000 float64 columns,
# none (the kernels that read global memory).
@pytest.mark.parametrize("lines,dtype", [(6200, torch.float32), (6200, torch.float64), (15000, torch.float64)])
def test_wide_logit_rows(device, generator, lines, dtype):
    source, targets, neighbors, alphas = make_case(lines, 11, 40, 5, 1, dtype, device, generator)
    grad_out = rand(11, 40, dtype=dtype, device=device, generator=generator)
    s, a = source.clone().requires_grad_(), alphas.clone().requires_grad_()
    out = alphanet_ext.alpha_combine(s, targets, neighbors, a, dim=1)
    out.backward(grad_out)
    s_ref, a_ref = source.cpu().double().requires_grad_(), alphas.cpu().double().requires_grad_()
    expected = reference.alpha_combine(s_ref, targets.cpu(), neighbors.cpu(), a_ref, 1)
    expected.backward(grad_out.cpu().double())
    torch.testing.assert_close(out.detach().cpu().double(), expected.detach(), **TOLERANCE[dtype])
    torch.testing.assert_close(a.grad.cpu().double(), a_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.cpu().double(), s_ref.grad, **TOLERANCE[dtype])


# CUDA's column alpha gradient keeps a block's sums in shared memory beside the
# staged logit rows. 1,000 classes x 5 neighbours beside 12,500 float32 lines
# leave no room for two rows in 112 KB: one block a multiprocessor, with four
# rows and 1,024 threads. 200 classes x 300 neighbours are more sums than a
# block holds: the classes are split over two blocks.
@pytest.mark.parametrize("lines,n,k", [(12_500, 1_000, 5), (400, 200, 300)])
def test_column_alpha_gradient_with_many_sums(device, generator, lines, n, k):
    source, targets, neighbors, alphas = make_case(lines, 70, n, k, 1, device=device, generator=generator)
    grad_out = rand(70, n, device=device, generator=generator)
    assert_alpha_gradient_matches(source, targets, neighbors, alphas, grad_out, 1)


def test_alpha_gradient_over_more_logit_rows_than_its_chunks_hold(device, generator):
    # 65,543 rows: the column alpha gradient's 1,024 chunks of 65 rows leave the
    # last ones empty, and their partial sums must still be zero
    source, targets, neighbors, alphas = make_case(3, 65_536 + 7, 2, 1, 1, device=device, generator=generator)
    grad_out = rand(65_536 + 7, 2, device=device, generator=generator)
    assert_alpha_gradient_matches(source, targets, neighbors, alphas, grad_out, 1)


def test_only_alpha_gradient_when_source_is_fixed(generator):
    source, targets, neighbors, alphas = make_case(10, 6, 4, 2, 0, torch.float64, generator=generator)
    alphas.requires_grad_()
    alphanet_ext.alpha_combine(source, targets, neighbors, alphas).sum().backward()
    assert source.grad is None and alphas.grad is not None


def test_only_source_gradient_when_alphas_are_fixed(device, generator):
    source, targets, neighbors, alphas = make_case(10, 6, 4, 2, 1, torch.float64, device, generator)
    source.requires_grad_()
    alphanet_ext.alpha_combine(source, targets, neighbors, alphas, dim=1).sum().backward()
    s_ref = source.detach().cpu().requires_grad_()
    reference.alpha_combine(s_ref, targets.cpu(), neighbors.cpu(), alphas.cpu(), 1).sum().backward()
    assert alphas.grad is None
    torch.testing.assert_close(source.grad.cpu(), s_ref.grad)


def test_gradient_of_gradient_is_refused(device, generator):
    source, targets, neighbors, alphas = make_case(10, 6, 4, 2, 0, torch.float64, device, generator)
    alphas.requires_grad_()
    out = alphanet_ext.alpha_combine(source, targets, neighbors, alphas)
    with pytest.raises(RuntimeError, match=r"gradients of its gradients \(create_graph=True\) are not supported"):
        torch.autograd.grad(out.sum(), alphas, create_graph=True)
    # without create_graph, the same backward runs
    assert torch.autograd.grad(out.sum(), alphas)[0].shape == alphas.shape


def test_deterministic(device, generator):
    source, targets, neighbors, alphas = make_case(300, 200, 120, 5, 1, device=device, generator=generator)
    results = []
    for _ in range(2):
        s, a = source.clone().requires_grad_(), alphas.clone().requires_grad_()
        out = alphanet_ext.alpha_combine(s, targets, neighbors, a, dim=1)
        out.pow(2).sum().backward()
        results.append((out, s.grad, a.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("problem", ["neighbour", "target", "nan", "zeros", "nan and zeros"])
def test_value_checks_see_every_class(device, problem):
    """The checks fold classes and indices in strided shares (the CUDA kernel's
    threads) and merge them: a bad value in any share is found."""
    source = torch.ones(50, 3, device=device)
    targets = torch.arange(1000, device=device) % 50
    neighbors = (torch.arange(3000, device=device) % 50).view(1000, 3)
    alphas = torch.ones(1000, 3, device=device)
    expected = {"neighbour": r"neighbors must lie in \[0, 50\) \(rows of source\), found 50",
                "target": r"targets must lie in \[0, 50\) \(rows of source\), found -3",
                "nan": "alphas contains NaN or inf", "zeros": "a row of alphas is all zeros",
                "nan and zeros": "alphas contains NaN or inf"}[problem]
    if problem == "neighbour":
        neighbors[999, 2] = 50
    elif problem == "target":
        targets[511] = -3
    if "zeros" in problem:
        alphas[3] = 0
    if "nan" in problem:
        alphas[777, 1] = float("nan")
    with pytest.raises(RuntimeError, match=expected):
        alphanet_ext.alpha_combine(source, targets, neighbors, alphas)
    alphanet_ext.alpha_combine(source, targets % 50, neighbors % 50, torch.ones(1000, 3, device=device))


def test_inputs_are_not_modified(device, generator):
    case = make_case(10, 6, 4, 2, 0, device=device, generator=generator)
    before = [t.clone() for t in case]
    alphanet_ext.alpha_combine(*case)
    assert all(torch.equal(a, b) for a, b in zip(case, before))


def test_bad_input(device, build):
    if build == "fallback" and runs_cuda_kernels(device):
        pytest.skip("the fallback runs no kernels: the CPU run covers it")
    source = torch.ones(5, 4, device=device)
    targets = torch.tensor([0, 1], device=device)
    neighbors = torch.tensor([[2, 3], [3, 4]], device=device)
    alphas = torch.ones(2, 2, device=device)
    error = RuntimeError  # the same type and words on every backend
    with pytest.raises(error, match=r"neighbors must lie in \[0, 5\) \(rows of source\), found 5"):
        alphanet_ext.alpha_combine(source, targets, neighbors + 1, alphas)
    with pytest.raises(error, match=r"targets must lie in \[0, 4\) \(columns of source\), found 4"):
        alphanet_ext.alpha_combine(source, targets + 3, neighbors - 2, alphas, dim=1)
    with pytest.raises(error, match=r"targets must lie in \[0, 5\) \(rows of source\), found -1"):
        alphanet_ext.alpha_combine(source, targets - 1, neighbors, alphas)
    with pytest.raises(error, match="alphas contains NaN or inf"):
        alphanet_ext.alpha_combine(source, targets, neighbors, torch.tensor([[1.0, float("nan")], [1.0, 1.0]], device=device))
    with pytest.raises(error, match="a row of alphas is all zeros"):
        alphanet_ext.alpha_combine(source, targets, neighbors, torch.tensor([[0.0, 0.0], [1.0, 1.0]], device=device))
    with pytest.raises(RuntimeError, match="alphas must have the shape of neighbors"):
        alphanet_ext.alpha_combine(source, targets, neighbors, torch.ones(2, 3, device=device))
    with pytest.raises(RuntimeError, match=r"neighbors must be \[len\(targets\), k\]"):
        alphanet_ext.alpha_combine(source, targets, neighbors[:1], alphas)
    with pytest.raises(RuntimeError, match="dim must be 0"):
        alphanet_ext.alpha_combine(source, targets, neighbors, alphas, dim=2)
    with pytest.raises(RuntimeError, match="at least one neighbour"):
        alphanet_ext.alpha_combine(source, targets, neighbors[:, :0], alphas[:, :0])
    with pytest.raises(RuntimeError, match="source must be 2-D"):
        alphanet_ext.alpha_combine(source[0], targets, neighbors, alphas)
    with pytest.raises(RuntimeError, match="must be an integer tensor"):
        alphanet_ext.alpha_combine(source, targets.float(), neighbors, alphas)
    with pytest.raises(RuntimeError, match="is on"):
        alphanet_ext.alpha_combine(source, targets, neighbors, alphas.to("meta"))
    if build == "fallback":
        return  # the rest calls the compiled backward op directly
    for dim, shape in ((0, r"\[2, 4\]"), (1, r"\[5, 2\]")):
        with pytest.raises(RuntimeError, match=f"grad_out must have shape {shape}, got \\[4, 2\\]"):
            torch.ops.alphanet.alpha_combine_backward(torch.ones(4, 2, device=device), source, targets, neighbors - 1,
                                                      alphas, dim, True, True)


# k = 11: CUDA's row alpha gradient takes 8 neighbours per pass over a gradient
# row, then 3; k = 300: more pairs per class than a block of the column
# gradient's second pass has threads
@pytest.mark.parametrize("k", [11, 300])
@pytest.mark.parametrize("dim", [0, 1])
def test_alpha_gradient_with_many_neighbours(device, generator, dim, k):
    source, targets, neighbors, alphas = make_case(400, 70, 3, k, dim, device=device, generator=generator)
    grad_out = rand(*((3, 70) if dim == 0 else (70, 3)), device=device, generator=generator)
    assert_alpha_gradient_matches(source, targets, neighbors, alphas, grad_out, dim)


def test_alpha_gradient_neighbour_limit_on_cuda(device, generator):
    source, targets, neighbors, alphas = make_case(20, 8, 1, 4097, 0, device=device, generator=generator)
    alphas.requires_grad_(True)
    out = alphanet_ext.alpha_combine(source, targets, neighbors, alphas)
    if runs_cuda_kernels(device):
        with pytest.raises(RuntimeError, match="supports up to 4096 neighbours per class, got k=4097"):
            out.sum().backward()
    else:
        out.sum().backward()
        assert torch.isfinite(alphas.grad).all()
