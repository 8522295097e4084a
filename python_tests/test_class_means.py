import pytest
import torch

import alphanet_ext
from alphanet_ext import reference
from conftest import DEVICES, FLOAT_DTYPES, TOLERANCE, on_backend, rand

SHAPES = [(0, 5, 3), (1, 1, 1), (1, 7, 4), (257, 1, 5), (1000, 67, 13), (333, 300, 40),
          (517, 96, 9)]  # 96: whole 16-byte packs of every dtype (the CUDA kernel's vector loads)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows,dims,classes", SHAPES)
def test_matches_reference(device, generator, dtype, rows, dims, classes):
    x = rand(rows, dims, dtype=dtype, device=device, generator=generator)
    labels = torch.randint(0, classes, (rows,), generator=generator).to(device)
    means, counts = alphanet_ext.class_means(x, labels, classes)
    expected_means, expected_counts = reference.class_means(x.cpu(), labels.cpu(), classes)
    assert means.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert means.shape == (classes, dims) and counts.dtype == torch.long
    torch.testing.assert_close(counts.cpu(), expected_counts)
    tol = TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(means.cpu().double(), expected_means, **tol)


def test_empty_classes_get_zero_mean(device):
    x = torch.ones(4, 3, device=device)
    means, counts = alphanet_ext.class_means(x, torch.tensor([0, 0, 2, 2], device=device), 4)
    assert counts.tolist() == [2, 0, 2, 0]
    assert means[1].abs().sum() == 0 and means[3].abs().sum() == 0 and torch.isfinite(means).all()


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64, torch.int16])
def test_label_dtypes(device, generator, label_dtype):
    x = rand(50, 6, device=device, generator=generator)
    labels = torch.randint(0, 5, (50,), generator=generator)
    means, _ = alphanet_ext.class_means(x, labels.to(label_dtype).to(device), 5)
    torch.testing.assert_close(means.cpu().double(), reference.class_means(x.cpu(), labels, 5)[0], **TOLERANCE[torch.float32])


def test_non_contiguous_inputs(device, generator):
    base = rand(40, 90, device=device, generator=generator)
    labels = torch.randint(0, 7, (90,), generator=generator).to(device)
    for x, y in [(base.T, labels), (base[:, ::3], labels[:40]), (base[::2], labels[:20])]:
        means, _ = alphanet_ext.class_means(x, y, 7)
        torch.testing.assert_close(means.cpu().double(), reference.class_means(x.cpu(), y.cpu(), 7)[0],
                                   **TOLERANCE[torch.float32])


@pytest.mark.parametrize("cols", [1, 4])  # one column per thread, and a 16-byte pack per thread
def test_more_classes_than_a_grid_dimension_holds(device, generator, cols):
    """CUDA grids hold at most 65,535 blocks along y, which the kernels use for classes."""
    num_classes = 65_535 + 40
    labels = torch.cat([torch.arange(num_classes), torch.randint(0, num_classes, (500,), generator=generator)])
    x = rand(labels.numel(), cols, generator=generator)
    means, counts = alphanet_ext.class_means(x.to(device), labels.to(device), num_classes)
    expected, expected_counts = reference.class_means(x, labels, num_classes)
    assert torch.equal(counts.cpu(), expected_counts)
    torch.testing.assert_close(means.cpu().double(), expected, **TOLERANCE[torch.float32])


def test_streaming_equals_one_pass(device, generator):
    x = rand(1001, 33, device=device, generator=generator)
    labels = torch.randint(0, 9, (1001,), generator=generator).to(device)
    accumulator = alphanet_ext.ClassMeanAccumulator(9, 33, device=device)
    for begin in range(0, 1001, 128):
        accumulator.add(x[begin:begin + 128], labels[begin:begin + 128])
    means, counts = accumulator.means()
    one_pass_means, one_pass_counts = alphanet_ext.class_means(x, labels, 9)
    assert torch.equal(counts, one_pass_counts)
    # chunks regroup the four-row additions, so equal up to float32 rounding only
    torch.testing.assert_close(means, one_pass_means, rtol=1e-6, atol=1e-6)
    if device == "cpu":  # numpy chunks (memory-mapped files) are taken as they are
        from_arrays = alphanet_ext.ClassMeanAccumulator(9, 33)
        for begin in range(0, 1001, 128):
            from_arrays.add(x[begin:begin + 128].numpy(), labels[begin:begin + 128].numpy())
        assert torch.equal(from_arrays.means()[0], means) and torch.equal(from_arrays.counts, counts)


@pytest.mark.parametrize("bad", ["label", "feature"])
def test_a_refused_chunk_leaves_the_accumulator_as_it_was_or_refuses_it(device, generator, bad):
    x = rand(40, 8, device=device, generator=generator)
    labels = torch.randint(0, 5, (40,), generator=generator).to(device)
    accumulator = alphanet_ext.ClassMeanAccumulator(5, 8, device=device)
    accumulator.add(x[:20], labels[:20])
    bad_x, bad_labels = x[20:].clone(), labels[20:].clone()
    if bad == "label":
        bad_labels[3] = 5
    else:
        bad_x[3, 2] = float("nan")
    with pytest.raises(RuntimeError, match="labels must lie" if bad == "label" else "NaN or inf"):
        accumulator.add(bad_x, bad_labels)
    if bad == "feature":  # found only once added: every later call says so
        for later_call in (accumulator.means, lambda: accumulator.add(x[:20], labels[:20])):
            with pytest.raises(RuntimeError, match=r"earlier chunk was refused after it had been added "
                                                   r"\(class_means: x .*NaN or inf\).*start a new accumulator"):
                later_call()
        return
    means, counts = accumulator.means()
    expected_means, expected_counts = alphanet_ext.class_means(x[:20], labels[:20], 5)
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(means, expected_means, rtol=1e-6, atol=1e-6)


def test_result_does_not_depend_on_thread_count(generator):
    x = rand(5000, 37, generator=generator)
    labels = torch.randint(0, 11, (5000,), generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread, _ = alphanet_ext.class_means(x, labels, 11)
        torch.set_num_threads(max(2, threads))
        several_threads, _ = alphanet_ext.class_means(x, labels, 11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, several_threads)


@pytest.mark.parametrize("backend", [name for name in DEVICES if name != "cpu"])
@pytest.mark.parametrize("dims", [96, 67])  # with and without the CUDA kernel's vector loads
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_kernels_sum_in_the_cpu_order(backend, generator, dims, dtype):
    x = rand(517, dims, dtype=dtype, generator=generator)
    labels = torch.randint(0, 9, (517,), generator=generator)
    on_cpu, _ = alphanet_ext.class_means(x, labels, 9)
    with on_backend(backend) as device:
        on_device, _ = alphanet_ext.class_means(x.to(device), labels.to(device), 9)
    assert torch.equal(on_device.cpu(), on_cpu)


def test_inputs_are_not_modified(device, generator):
    x = rand(30, 4, device=device, generator=generator)
    labels = torch.randint(0, 3, (30,), generator=generator).to(device)
    x_before, labels_before = x.clone(), labels.clone()
    alphanet_ext.class_means(x, labels, 3)
    assert torch.equal(x, x_before) and torch.equal(labels, labels_before)


def test_gradcheck(generator):
    x = rand(25, 4, dtype=torch.float64, generator=generator).requires_grad_()
    labels = torch.randint(0, 6, (25,), generator=generator)
    assert torch.autograd.gradcheck(lambda t: alphanet_ext.class_means(t, labels, 6)[0], (x,))


@pytest.mark.parametrize("bad,message", [
    (float("nan"), "NaN or inf"),
    (float("inf"), "NaN or inf"),
])
def test_non_finite_features(device, bad, message):
    x = torch.ones(5, 3, device=device)
    x[3, 1] = bad
    with pytest.raises(RuntimeError, match=message):
        alphanet_ext.class_means(x, torch.zeros(5, dtype=torch.long, device=device), 2)


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0, 1, 5]), r"labels must lie in \[0, 3\).*found 5"),
    (torch.tensor([0, -1, 2]), r"labels must lie in \[0, 3\).*found -1"),
    # beyond int32 (the CUDA path sorts labels as int32): 2^32 + 1 must not wrap to 1
    (torch.tensor([0, 2**32 + 1, 2]), r"labels must lie in \[0, 3\).*found 4294967297"),
    (torch.tensor([-2**40, 1, 2]), r"labels must lie in \[0, 3\).*found -1099511627776"),
    (torch.tensor([0.0, 1.0, 2.0]), "labels must be an integer tensor"),
    (torch.tensor([0, 1]), "one entry per row"),
    (torch.tensor([[0, 1, 2]]), "one entry per row"),
])
def test_bad_labels(device, labels, message):
    with pytest.raises(RuntimeError, match=message):
        alphanet_ext.class_means(torch.ones(3, 2, device=device), labels.to(device), 3)


BAD_CALLS = [  # x, labels, num_classes, message
    (torch.ones(3), torch.zeros(3, dtype=torch.long), 2, "x must be 2-D"),
    (torch.ones(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2,
     "x must be float16, bfloat16, float32 or float64"),
    (torch.ones(3, 2), torch.zeros(3, dtype=torch.long), 0, "num_classes must be at least 1"),
    (torch.ones(3, 2), torch.tensor([0.0, 1.0, 2.0]), 3, "labels must be an integer tensor"),
    (torch.ones(3, 2), torch.tensor([0, 1]), 3, "labels must be 1-D with one entry per row of x"),
    (torch.ones(3, 2), torch.tensor([0, 1, 5]), 3, r"labels must lie in \[0, 3\) \(num_classes\), found 5"),
    (torch.ones(3, 2), torch.tensor([0, -1, 2]), 3, r"labels must lie in \[0, 3\) \(num_classes\), found -1"),
    (torch.tensor([[1.0, float("nan")], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1, 2]), 3,
     "class_means: x.* contains NaN or inf"),
]


@pytest.mark.parametrize("x,labels,num_classes,message", BAD_CALLS)
def test_fallback_refuses_what_the_op_refuses(build, x, labels, num_classes, message):
    """Without the compiled module class means and the accumulator refuse the same
    calls with the same messages."""
    with pytest.raises(RuntimeError, match=message):
        alphanet_ext.class_means(x, labels, num_classes)
    if x.dim() == 2 and x.is_floating_point() and num_classes >= 1:
        accumulator = alphanet_ext.ClassMeanAccumulator(num_classes, x.shape[1])
        with pytest.raises(RuntimeError, match=message):
            accumulator.add(x, labels)


def test_bad_features_and_arguments():
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        alphanet_ext.class_means(torch.ones(3), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        alphanet_ext.class_means(torch.ones(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(RuntimeError, match="num_classes must be at least 1"):
        alphanet_ext.class_means(torch.ones(3, 2), torch.zeros(3, dtype=torch.long), 0)
    with pytest.raises(RuntimeError, match="x is on cpu but labels is on meta"):
        alphanet_ext.class_means(torch.ones(3, 2), torch.zeros(3, dtype=torch.long, device="meta"), 2)
    with pytest.raises(ValueError, match=r"ClassMeanAccumulator.add: x must be \[rows, 5\], got shape \[2, 4\]"):
        alphanet_ext.ClassMeanAccumulator(3, 5).add(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \[rows, 5\], got shape \[5\]"):
        alphanet_ext.ClassMeanAccumulator(3, 5).add(torch.ones(5), torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="num_classes must be an integer, got 3.5"):
        alphanet_ext.ClassMeanAccumulator(3.5, 5)
    with pytest.raises(ValueError, match="dim must be at least 0, got -1"):
        alphanet_ext.ClassMeanAccumulator(3, -1)
    with pytest.raises(ValueError, match="num_classes must be at least 1, got 0"):
        alphanet_ext.ClassMeanAccumulator(0, 5)
    smallest = alphanet_ext.ClassMeanAccumulator(1, 0)  # the least of each is allowed
    smallest.add(torch.ones(2, 0), torch.zeros(2, dtype=torch.long))
    means, counts = smallest.means()
    assert means.shape == (1, 0) and counts.tolist() == [2]
