import warnings

import pytest
import torch

import alphanet_ext
from alphanet_ext import reference
from conftest import DEVICES, FLOAT_DTYPES, on_backend, rand

# Every test below runs on each exact path of each backend, chosen by the op's
# `ranking` argument. The CPU: "auto" (int16 screening with a proven bound on
# x86-64 with AVX2) or "matmul" (matmul tiles). CUDA: "int8" (int8 screening with
# a proven bound, the default) or "matmul" (float matmul tiles).
PATHS = [("cpu", ranking) for ranking in ("auto", "matmul") if "cpu" in DEVICES] + [
    (backend, ranking) for backend in DEVICES if backend != "cpu" for ranking in ("int8", "matmul")]
RANKING = {"value": "auto"}  # the path the `device` fixture chose


def knn(*args, **kwargs):
    """``alphanet_ext.knn`` on the ranking path under test."""
    kwargs.setdefault("ranking", RANKING["value"])
    return alphanet_ext.knn(*args, **kwargs)


@pytest.fixture(params=PATHS, ids=lambda path: f"{path[0]}-{path[1]}")
def device(request):
    backend, RANKING["value"] = request.param
    try:
        with on_backend(backend) as device:
            yield device
    finally:
        RANKING["value"] = "auto"


SHAPES = [  # queries, keys, dims, k
    (0, 5, 3, 2), (1, 1, 1, 1), (1, 10, 4, 10), (7, 3, 2, 3), (33, 97, 1, 5), (100, 300, 64, 5),
    (600, 4100, 3, 7),   # crosses the CPU tiles (512 queries, 4096 keys)
    (150, 700, 37, 9),   # dims not a multiple of the int8 code alignment (16)
    (30, 200, 517, 5),   # odd dims over several of the CPU screening's int32 chunks (256) and packing columns
    (20, 150, 16, 70),   # more candidates than the select kernel keeps: the library top-k path
    (20, 200, 16, 56),   # k + 8 = 64 candidates: the select kernel's longest list
]


def check_against_reference(queries, keys, k, metric, distances, indices, dtype):
    expected_distances, expected_indices = reference.knn(queries.cpu(), keys.cpu(), k, metric)
    assert distances.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert indices.dtype == torch.long and indices.shape == (queries.shape[0], k)
    # Exact recheck: the distances are the float64 distances, rounded once.
    torch.testing.assert_close(distances.cpu().double(), expected_distances, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices.cpu(), expected_indices)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("queries_n,keys_n,dims,k", SHAPES)
def test_matches_reference(device, generator, metric, queries_n, keys_n, dims, k):
    queries = rand(queries_n, dims, device=device, generator=generator)
    keys = rand(keys_n, dims, device=device, generator=generator)
    if dims == 1 and metric == "cosine":
        pytest.skip("every 1-d cosine distance is 0 or 2: dozens of exact ties (see knn's docstring)")
    distances, indices = knn(queries, keys, k, metric)
    check_against_reference(queries, keys, k, metric, distances, indices, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_across_cuda_key_tiles(device, generator, dtype):
    # more keys than one CUDA select tile (16384): later tiles start from the
    # earlier tiles' lists; the nearest keys sit in the first and the last tile
    keys = rand(16384 + 37, 3, dtype=dtype, device=device, generator=generator)
    queries = torch.cat([keys[:2], keys[-3:]]) + 1e-3
    distances, indices = knn(queries, keys, 4)
    check_against_reference(queries, keys, 4, "euclidean", distances, indices, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(device, generator, dtype):
    queries = rand(40, 24, dtype=dtype, device=device, generator=generator)
    keys = rand(90, 24, dtype=dtype, device=device, generator=generator)
    distances, indices = knn(queries, keys, 6)
    check_against_reference(queries, keys, 6, "euclidean", distances, indices, dtype)


def test_ties_go_to_the_lower_index(device):
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], device=device)
    distances, indices = knn(torch.zeros(1, 2, device=device), keys, 5)
    assert indices.tolist() == [[0, 1, 2, 3, 4]]
    assert torch.allclose(distances.cpu(), torch.ones(1, 5))
    _, indices = knn(torch.tensor([[2.0, 0.0]], device=device), keys, 3)
    assert indices.tolist() == [[0, 2, 1]]


def test_non_contiguous(device, generator):
    queries = rand(30, 50, device=device, generator=generator)[:, ::2]
    keys = rand(25, 80, device=device, generator=generator).T
    assert not queries.is_contiguous() and not keys.is_contiguous()
    distances, indices = knn(queries, keys, 4)
    check_against_reference(queries, keys, 4, "euclidean", distances, indices, torch.float32)


def test_deterministic(device, generator):
    queries = rand(200, 32, device=device, generator=generator)
    keys = rand(500, 32, device=device, generator=generator)
    first = knn(queries, keys, 5)
    second = knn(queries, keys, 5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_when_keys_are_closer_than_the_quantisation_step(device, generator, metric):
    # Keys differ by ~1e-6 of their norm, far below the CPU's int16 step (~3e-4
    # of a row's largest value): its screening cannot separate them, so the
    # float64 recheck must rank all of them. (Keys ~1e-9 apart can tie to within
    # the rounding of the distance formula, where the reference's formula and
    # ours may order them differently: that made this test fail about once in
    # a few hundred runs.)
    base = rand(1, 40, dtype=torch.float64, generator=generator)
    keys = base + 1e-6 * rand(300, 40, dtype=torch.float64, generator=generator)
    queries = base + rand(5, 40, dtype=torch.float64, generator=generator)
    distances, indices = knn(queries.to(device), keys.to(device), 7, metric)
    check_against_reference(queries, keys, 7, metric, distances, indices, torch.float64)


def test_exact_with_outlier_features(device, generator):
    # One huge feature makes a row's quantisation step coarse for all the others.
    queries = rand(30, 64, generator=generator)
    keys = rand(400, 64, generator=generator)
    keys[::7, 3] = 1e4
    queries[::5, 10] = -1e4
    distances, indices = knn(queries.to(device), keys.to(device), 6)
    check_against_reference(queries, keys, 6, "euclidean", distances, indices, torch.float32)


def test_same_result_for_any_thread_count(device, generator):
    queries = rand(150, 40, device=device, generator=generator)
    keys = rand(700, 40, device=device, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = knn(queries, keys, 5, "cosine")
    finally:
        torch.set_num_threads(threads)
    several = knn(queries, keys, 5, "cosine")
    assert torch.equal(one[0], several[0]) and torch.equal(one[1], several[1])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_distances_are_differentiable(device, generator, metric):
    queries = rand(9, 6, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    keys = rand(25, 6, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, x: knn(q, x, 4, metric)[0], (queries, keys))
    # against autograd of the reference, with keys shared by several queries
    weights = rand(9, 4, dtype=torch.float64, generator=generator).to(device)
    (knn(queries, keys, 4, metric)[0] * weights).sum().backward()
    q, x = queries.detach().cpu().requires_grad_(), keys.detach().cpu().requires_grad_()
    (reference.knn(q, x, 4, metric)[0] * weights.cpu()).sum().backward()
    torch.testing.assert_close(queries.grad.cpu(), q.grad)
    torch.testing.assert_close(keys.grad.cpu(), x.grad)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradient_at_zero_distance_is_zero_and_in_the_input_dtype(device, generator, dtype):
    keys = rand(12, 5, dtype=dtype, generator=generator).to(device)
    queries = keys[3:5].clone().requires_grad_()  # each query is also a key, at distance 0
    distances, indices = knn(queries, keys, 1)
    distances.sum().backward()
    assert indices.flatten().tolist() == [3, 4] and queries.grad.dtype == dtype
    assert torch.equal(queries.grad, torch.zeros_like(queries))


@pytest.mark.parametrize("queries,keys,k,metric,message", [
    (torch.ones(2, 3), torch.ones(4, 3), 5, "euclidean", r"k \(5\) is larger than the number of keys \(4\)"),
    (torch.ones(2, 3), torch.ones(4, 3), 0, "euclidean", "k must be at least 1"),
    (torch.ones(2, 3), torch.ones(4, 2), 1, "euclidean", "queries have 3 features but keys have 2"),
    (torch.ones(2, 3), torch.ones(4, 3, dtype=torch.float64), 1, "euclidean", "queries are Float but keys are Double"),
    (torch.ones(2, 3), torch.ones(4, 3), 1, "manhattan", "metric must be 'euclidean' or 'cosine'"),
    (torch.tensor([[0.0, float("nan")]]), torch.ones(4, 2), 1, "euclidean", "queries contains NaN or inf"),
    (torch.ones(1, 2), torch.tensor([[0.0, float("inf")]]), 1, "euclidean", "keys contains NaN or inf"),
    (torch.ones(3), torch.ones(4, 3), 1, "euclidean", "queries must be 2-D"),
    (torch.ones(2, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32), 1, "euclidean", "must be float16"),
    (torch.ones(2, 3), torch.ones(4, 3, device="meta"), 1, "euclidean", "queries is on cpu but keys is on meta"),
])
def test_bad_input(build, queries, keys, k, metric, message):
    with pytest.raises(RuntimeError, match=message):
        knn(queries, keys, k, metric)


CUDA_BACKENDS = [backend for backend in DEVICES if backend != "cpu"]


@pytest.fixture(params=CUDA_BACKENDS)
def int8_device(request):
    RANKING["value"] = "int8"
    try:
        with on_backend(request.param) as device:
            yield device
    finally:
        RANKING["value"] = "auto"


def rechecked_queries():
    return torch.ops.alphanet._knn_rechecked_queries()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_int8_screening_certifies_separated_queries(int8_device, generator, metric, dtype, offset):
    # Random keys in 64-d: the bound (~1e-4 of |t_q||t_k| in the centred frame)
    # is far inside the gaps between a query's neighbours, so no query needs the
    # float64 ranking, also when every feature shares a large offset (as
    # post-ReLU features do), which the frame's centre removes.
    if offset and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("16-bit steps at 100 are 1/16 to 1/2: a lattice with many exact ties, which no bound certifies")
    queries = (offset + rand(150, 64, dtype=torch.float64, generator=generator)).to(dtype).to(int8_device)
    keys = (offset + rand(700, 64, dtype=torch.float64, generator=generator)).to(dtype).to(int8_device)
    before = rechecked_queries()
    distances, indices = knn(queries, keys, 5, metric)
    assert rechecked_queries() == before
    check_against_reference(queries, keys, 5, metric, distances, indices, dtype)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_int8_screening_certifies_a_single_query(int8_device, generator, metric):
    # one query row, padded to the int8 matmul's minimum of 17 rows
    queries = rand(1, 64, generator=generator).to(int8_device)
    keys = rand(300, 64, generator=generator).to(int8_device)
    before = rechecked_queries()
    distances, indices = knn(queries, keys, 5, metric)
    assert rechecked_queries() == before
    check_against_reference(queries, keys, 5, metric, distances, indices, torch.float32)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_int8_screening_ranks_uncertified_queries_in_float64(int8_device, generator, metric):
    # The first 3 queries sit by a cluster of keys 1e-6 apart, which int8 codes
    # cannot order: exactly those are ranked again, and every answer is exact.
    # The other keys lie far from the cluster (distance > 50, where a query's
    # 14 nearest other keys are within about 42; an angle above 90 degrees), so
    # the other queries' neighbourhoods never reach the cluster's ties.
    base = torch.zeros(1, 40, dtype=torch.float64)
    base[0, 0] = 20.0
    near = base + 1e-6 * rand(60, 40, dtype=torch.float64, generator=generator)
    far = 5 * rand(240, 40, dtype=torch.float64, generator=generator)
    far[:, 0] = -far[:, 0].abs() - 30.0
    keys = torch.cat([near, far])
    queries = torch.cat([base + 0.1 * rand(3, 40, dtype=torch.float64, generator=generator), keys[100:120] + 1e-3])
    before = rechecked_queries()
    distances, indices = knn(queries.to(int8_device), keys.to(int8_device), 7, metric)
    assert rechecked_queries() - before == 3
    check_against_reference(queries, keys, 7, metric, distances, indices, torch.float64)


def rows_of_64(shared, tails=((),)):
    """float64 rows of 64 features: 127 in feature 0 (so every row's int8 scale
    is 1), `shared` in features 1-60, and each of `tails` from feature 61 on."""
    rows = torch.zeros(len(tails), 64, dtype=torch.float64)
    rows[:, 0], rows[:, 1:61] = 127.0, shared
    for row, tail in zip(rows, tails):
        row[61:61 + len(tail)] = torch.tensor(tail, dtype=torch.float64)
    return rows


def bound_cases():
    # Each case hides the nearest key behind 9 decoys in the int8 estimates, by
    # an estimate error that one term of the bound alone covers: without that
    # term the bound is under 0.12 in (a) and 1e-4 in (b, c), less than the
    # spread of the decoys, so a decoy would be certified as the nearest key.
    # Features 1-60 carry the error; the decoys differ from feature 61 on.
    # (a) lo.lo / 254^2, which the estimate leaves out: 127/256 codes as hi 0,
    #     lo 126 (coding error 3e-5), so the estimate to the query's exact copy
    #     is 2 * 60 * 126^2 / 254^2 = 29.5 too far, behind decoys at 14.8 to
    #     27.8 without lo codes.
    tails = [(0.0, 0.0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    yield "lo.lo", rows_of_64(127 / 256), rows_of_64(0.0, tails), None
    # (b) the query's coding error: 1 + 1/512 codes as 1 with error 1/512, so
    #     the estimate to the key with 2 there (exact) is 2 * 60 / 512 * 1 =
    #     0.234 too far. The decoys are 1 there and (7, 3, 1 + l/254) after:
    #     farther by 0.026 to 0.20 (no lo codes in the query, no key errors).
    tails = [(7.0, 3.0, 1 + step / 254) for step in range(86, 104, 2)]
    yield "query error", rows_of_64(1 + 1 / 512), rows_of_64(1.0, tails), rows_of_64(2.0)
    # (c) a key's coding error: the nearest key is 1 + 1/512 where the query is
    #     1, so 2 * 60 / 512 = 0.234 too far in the estimate, behind decoys that
    #     are 1 there and farther by (l/254)^2 - 60/512^2 = 0.0013 to 0.13.
    tails = [(step / 254,) for step in range(10, 100, 10)]
    yield "key error", rows_of_64(1.0), rows_of_64(1.0, tails), rows_of_64(1 + 1 / 512)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # 1 + 1/512 is not a bfloat16
@pytest.mark.parametrize("case", list(bound_cases()), ids=lambda case: case[0])
def test_int8_bound_needs_each_of_its_terms(int8_device, generator, dtype, case):
    _, query, decoys, nearest = case
    nearest = query if nearest is None else nearest
    half = torch.cat([nearest, decoys])
    keys = torch.cat([half, -half])[torch.randperm(20, generator=generator)]  # +-rows: the frame's centre is 0
    queries = torch.cat([query, -query]).repeat(9, 1)  # the int8 matmul wants more than 16 rows
    _, expected_indices = reference.knn(queries, keys, 1, "euclidean")
    assert torch.equal(keys[expected_indices[:, 0]].abs(), nearest.expand(18, 64).abs())
    before = rechecked_queries()
    distances, indices = knn(queries.to(dtype).to(int8_device), keys.to(dtype).to(int8_device), 1)
    assert rechecked_queries() - before == 18
    check_against_reference(queries, keys, 1, "euclidean", distances, indices, dtype)


def test_zero_rows(device):
    # zero rows have no quantisation scale; a zero query ties every key under cosine,
    # exactly, so more keys than the candidate lists hold tie. The other keys lie at
    # distinct angles: parallel ones would tie only up to float64 rounding, which
    # differs between machines.
    lengths = torch.arange(1.0, 31.0)
    keys = torch.cat([torch.zeros(3, 16), lengths.outer(torch.ones(16))])
    keys[3:, 0] += lengths.sqrt()
    keys = keys.to(device)
    queries = torch.cat([torch.zeros(1, 16), torch.full((1, 16), 2.2)]).to(device)
    for metric in ("euclidean", "cosine"):
        distances, indices = knn(queries, keys, 4, metric)
        check_against_reference(queries, keys, 4, metric, distances, indices, torch.float32)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs AVX2")
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (100.0, 1.0), (0.0, 1e-3)])
def test_cpu_screening_rules_out_nearly_every_key(generator, metric, offset, scale):
    # Random rows of 301 features, also with a large shared offset (as post-ReLU
    # features and their class means have) or tiny values. The int16 bound rules
    # out all but about k keys per query, so few keys are ranked in float64. A
    # broken code or a loose bound would still give exact results, only slowly:
    # this counts the keys.
    queries = offset + scale * rand(150, 301, dtype=torch.float64, generator=generator)
    keys = offset + scale * rand(700, 301, dtype=torch.float64, generator=generator)
    before = torch.ops.alphanet._knn_screened_candidates()
    distances, indices = knn(queries, keys, 5, metric, ranking="screening")
    ranked = torch.ops.alphanet._knn_screened_candidates() - before
    assert 150 * 5 <= ranked <= 150 * 8
    check_against_reference(queries, keys, 5, metric, distances, indices, torch.float64)


def test_without_the_int8_matmul_knn_ranks_with_float_matmuls(int8_device, generator, capfd):
    # a GPU or build whose int8 matmul refuses: knn warns and takes the matmul path
    library = torch.library.Library("aten", "IMPL")
    def refuse(rows, columns):
        raise RuntimeError("int8 matmul not supported here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the kernel is overridden
        library.impl("_int_mm", refuse, "CUDA" if int8_device == "cuda" else "CPU")
    try:
        queries = rand(40, 24, generator=generator).to(int8_device)
        keys = rand(300, 24, generator=generator).to(int8_device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distances, indices = knn(queries, keys, 5)
    finally:
        library._destroy()
    check_against_reference(queries, keys, 5, "euclidean", distances, indices, torch.float32)
    # C++ warnings of custom ops reach Python's warnings only in newer torch; else stderr
    said = capfd.readouterr().err + " ".join(str(warning.message) for warning in caught)
    assert "knn: the int8 matmul is unavailable (RuntimeError: int8 matmul not supported here)" in said


def test_unknown_ranking_setting_is_named(int8_device):
    with pytest.raises(RuntimeError, match="ranking must be 'auto', 'screening', 'int8' or 'matmul', got 'fp8'"):
        knn(torch.ones(20, 3, device=int8_device), torch.ones(40, 3, device=int8_device), 2, ranking="fp8")


@pytest.mark.parametrize("ranking,message", [("int8", "ranking='int8' is CUDA's int8 screening"),
                                             ("fp8", "ranking must be 'auto', 'screening', 'int8' or 'matmul'")])
def test_a_ranking_the_cpu_cannot_run_is_named(ranking, message):
    with pytest.raises(RuntimeError, match=message):
        alphanet_ext.knn(torch.ones(20, 3), torch.ones(40, 3), 2, ranking=ranking)
