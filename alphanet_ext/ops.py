"""The fused ops (class means, kNN, alpha combine and the training step's
gradients), as ``torch.ops.alphanet.*`` and typed Python wrappers.

The wrappers validate what the kernels cannot check cheaply on a GPU, register
fake (meta) implementations so ``torch.compile`` can trace the ops, and wire up
autograd. Without the compiled module, importing fails with how to rebuild it,
unless ``ALPHANET_ALLOW_REFERENCE=1`` asks for the float64 references in
:mod:`alphanet_ext.reference` (with one warning: they are hours slower at scale).
"""
from __future__ import annotations

import os
import warnings
from numbers import Integral

import torch
from torch import Tensor

from . import fallback_checks, reference

__all__ = ["class_means", "ClassMeanAccumulator", "knn", "alpha_combine", "HAS_EXTENSION",
           "compiled_with_cuda"]

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def torch_mismatch(built: str, running: str) -> str | None:
    """Why a module compiled against torch ``built`` cannot run under torch ``running``, or None.
    The C++ ABI of torch changes between releases, so the versions must match (local
    tags such as ``+cpu`` aside)."""
    def release(version: str) -> str:
        return version.split("+")[0].replace("_", ".")
    if built == "unknown" or release(built) == release(running):
        return None
    return (f"alphanet_ext's compiled kernels were built against torch {release(built)} but torch {running} is "
            f"running; rebuild them for this torch from the source folder: {REBUILD}")


try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.alphanet)
    HAS_EXTENSION = True
except ImportError as _error:
    if os.environ.get("ALPHANET_ALLOW_REFERENCE") != "1":
        raise ImportError(f"alphanet_ext: the compiled kernels are missing or cannot load ({_error}). Rebuild them "
                          f"from the source folder: {REBUILD}. To run the slow float64 reference instead "
                          "(hours at iNaturalist size), set ALPHANET_ALLOW_REFERENCE=1") from _error
    HAS_EXTENSION = False
    _IMPORT_ERROR = _error
if HAS_EXTENSION:
    _mismatch = torch_mismatch(_C.build_info["torch_version"], torch.__version__)
    if _mismatch:
        raise ImportError(_mismatch)

_warned = False


def _fallback(op: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(f"alphanet_ext: compiled kernels unavailable ({_IMPORT_ERROR}); "
                      f"{op} and the other ops run the slow pure-torch reference", RuntimeWarning,
                      stacklevel=3)
        _warned = True


def compiled_with_cuda() -> bool:
    """True if the compiled module contains the CUDA kernels."""
    return HAS_EXTENSION and _C.compiled_with_cuda()


def input_panel() -> int:
    """Width of the panels the compiled training op reads its packed input in."""
    return int(_C.input_panel)


OP_NAMES = ("class_means", "class_sums_", "knn", "alpha_combine", "alpha_combine_backward", "_check_combine_values",
            "_coefficient_grads", "_input_product")


def check_registered(dispatch_key: str = "CPU") -> None:
    """Raises if some ``torch.ops.alphanet`` op lacks a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if not HAS_EXTENSION:  # only with ALPHANET_ALLOW_REFERENCE=1
        raise RuntimeError(f"alphanet_ext: compiled module missing ({_IMPORT_ERROR})")
    missing = [name for name in OP_NAMES
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"alphanet::{name}", dispatch_key)]
    if missing:
        raise RuntimeError(f"alphanet_ext: no {dispatch_key} kernel registered for {', '.join(missing)}")


def _runs_cuda_kernels(tensor: Tensor) -> bool:
    """Whether an op on ``tensor`` runs the CUDA kernels: a CUDA tensor, or a CPU
    tensor while the CPU build's emulator of those kernels is on (tests)."""
    return tensor.is_cuda or (tensor.is_cpu and _C.has_cuda_emulation() and _C._cuda_emulation_enabled())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- class means

def class_means(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Mean feature vector of every class.

    Args:
        x: features ``[N, d]``, float16/bfloat16/float32/float64.
        labels: class of every row, ``[N]``, int32 or int64, in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        ``(means [C, d], counts [C])``. Means are float32 (float64 for float64
        input), accumulated in that precision; a class with no rows has a zero
        mean and count 0. Differentiable with respect to ``x``.
    """
    if not HAS_EXTENSION:
        _fallback("class_means")
        fallback_checks.class_means(x, labels, num_classes)
        means, counts = reference.class_means(x, labels, num_classes)
        return means.to(_acc_dtype(x.dtype)), counts
    return torch.ops.alphanet.class_means(x, labels, num_classes)


class ClassMeanAccumulator:
    """Class means over data that arrives in chunks (memory-mapped or sharded).

    >>> acc = ClassMeanAccumulator(num_classes=10, dim=64)
    >>> for x_chunk, y_chunk in chunks:      # doctest: +SKIP
    ...     acc.add(x_chunk, y_chunk)
    >>> means, counts = acc.means()          # doctest: +SKIP

    Sums are kept in float32 (float64 if ``dtype=torch.float64``); adding chunks
    of one dataset in order gives the same bits as one ``class_means`` call.
    It keeps statistics, not a graph: for gradients use ``class_means``.
    A chunk with a label out of range is refused before anything is added. One
    with NaN or inf features is found only once added (a second pass over every
    chunk would double the reading), so the accumulator then refuses all later
    calls, naming the first error.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        for name, value, least in (("num_classes", num_classes, 1), ("dim", dim, 0)):
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"ClassMeanAccumulator: {name} must be an integer, got {value!r}")
            if value < least:
                raise ValueError(f"ClassMeanAccumulator: {name} must be at least {least}, got {value}")
        acc = _acc_dtype(dtype)
        self.sums = torch.zeros(num_classes, dim, dtype=acc, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        self._spoiled_by: str | None = None

    def _check_intact(self) -> None:
        if self._spoiled_by is not None:
            raise RuntimeError("ClassMeanAccumulator: an earlier chunk was refused after it had been added "
                               f"({self._spoiled_by}), so the sums are lost; start a new accumulator")

    def add(self, x: Tensor, labels: Tensor) -> None:
        """Adds one chunk of rows ``[n, dim]`` and their labels ``[n]`` (tensors or arrays)."""
        self._check_intact()
        x = torch.as_tensor(x, device=self.sums.device)
        labels = torch.as_tensor(labels, device=self.sums.device)
        if x.dim() != 2 or x.shape[1] != self.sums.shape[1]:
            raise ValueError(f"ClassMeanAccumulator.add: x must be [rows, {self.sums.shape[1]}], "
                             f"got shape {list(x.shape)}")
        if _acc_dtype(x.dtype) != self.sums.dtype:
            x = x.to(self.sums.dtype)
        if HAS_EXTENSION:
            counts_before = self.counts.clone()
            try:
                torch.ops.alphanet.class_sums_(self.sums, self.counts, x, labels)
            except RuntimeError as error:
                if not torch.equal(self.counts, counts_before):
                    self._spoiled_by = str(error).splitlines()[0]
                raise
        else:
            _fallback("ClassMeanAccumulator")
            fallback_checks.class_means(x, labels, self.sums.shape[0])
            means, counts = reference.class_means(x, labels, self.sums.shape[0])
            self.sums += (means * counts.unsqueeze(1)).to(self.sums.dtype)
            self.counts += counts

    def means(self) -> tuple[Tensor, Tensor]:
        """``(means [C, d], counts [C])`` of everything added so far."""
        self._check_intact()
        return self.sums / self.counts.clamp_min(1).unsqueeze(1).to(self.sums.dtype), self.counts.clone()


# --------------------------------------------------------------------------- kNN

RANKINGS = ("auto", "screening", "int8", "matmul")


def knn(queries: Tensor, keys: Tensor, k: int, metric: str = "euclidean", ranking: str = "auto"
        ) -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest keys of every query.

    Both screenings below first move every row into a frame centred on the
    keys' mean (of the unit rows, for cosine), so features that share a large
    offset (post-ReLU features, class means) keep a tight bound.
    On x86-64 CPUs with AVX2, rows are quantised to int16 and compared with an
    integer matrix product whose error is bounded exactly (Cauchy-Schwarz on the
    measured rounding error); every key the bound cannot rule out is rechecked
    in float64, so the answer is exact at twice fp32 FMA throughput. On CUDA,
    rows are coded as two int8 halves (about 14 bits) and ranked by int8
    tensor-core products with an error bound proven per query; the ``k + 8``
    best estimates are rechecked in float64, and a query whose bound does not
    rule out every other key (ties, near-duplicate keys) is ranked again with
    float64 matmuls. Elsewhere (other CPUs, or ``ranking="matmul"``)
    matmul-expanded tiles feed a
    select kernel and ``k + 8`` candidates are rechecked in float64. All work in tiles:
    memory stays ``O(q*k + tile)`` however many keys.

    Args:
        queries: ``[q, d]``; keys: ``[m, d]``; same float dtype and device.
        k: neighbours per query, ``1 <= k <= m``.
        metric: ``"euclidean"`` (``||a - b||``) or ``"cosine"`` (``1 - cos(a, b)``).
        ranking: how keys are ranked before the exact recheck: ``"auto"`` (the
            fastest exact path here), ``"screening"`` (CPU int16), ``"int8"``
            (CUDA) or ``"matmul"``. Every choice gives the same answer.

    Returns:
        ``(distances [q, k], indices [q, k])``, ascending, equal distances
        ordered by lower key index. Distances are float32 (float64 for float64).
        The matmul-tile path keeps ``k + 8`` candidates for the recheck, so there
        (and for the queries CUDA ranks again) the lower-index rule can only
        fail when more than 8 keys beyond the k-th tie with it to within float32
        (float64 on CUDA) rounding, as in degenerate data such as 1-d cosine;
        the screened CPU path has no such limit. The distances are
        differentiable with respect to queries and keys (zero gradient where a
        distance is zero); the indices are constant.
    """
    if not HAS_EXTENSION:
        _fallback("knn")
        fallback_checks.knn(queries, keys, k, metric, ranking)
        distances, indices = reference.knn(queries, keys, k, metric)
        return distances.to(_acc_dtype(queries.dtype)), indices
    return torch.ops.alphanet.knn(queries, keys, k, metric, ranking)


# --------------------------------------------------------------------------- alpha combine

def alpha_combine(source: Tensor, targets: Tensor, neighbors: Tensor, alphas: Tensor, dim: int = 0) -> Tensor:
    """L1-normalised, alpha-weighted combination of lines of ``source``.

    ``out[c] = source[targets[c]] + sum_i alphas[c, i] / ||alphas[c]||_1 * source[neighbors[c, i]]``

    With ``dim=0`` the lines are rows (combining classifier rows ``W [C, d]``,
    result ``[n, d]``); with ``dim=1`` they are columns (combining logit columns
    ``L [N, C]`` in place, result ``[N, n]``) — no copy or transpose of ``source``.
    Differentiable with respect to ``alphas`` and ``source``.
    """
    if HAS_EXTENSION and not torch.compiler.is_compiling() and _runs_cuda_kernels(source):
        # The CUDA op skips the value checks (they sync the device, and training
        # loops call it every step); here they run in one kernel and one sync.
        # While compiling, values are unknown and the kernels' guarded reads remain.
        torch.ops.alphanet._check_combine_values(source, targets, neighbors, alphas, dim)
    return combine_unchecked(source, targets, neighbors, alphas, dim)


def combine_unchecked(source: Tensor, targets: Tensor, neighbors: Tensor, alphas: Tensor, dim: int = 0) -> Tensor:
    """:func:`alpha_combine` without the CUDA value checks' device sync, for callers
    whose indices and coefficients are valid by construction (the fit's loops)."""
    if not HAS_EXTENSION:
        _fallback("alpha_combine")
        fallback_checks.alpha_combine(source, targets, neighbors, alphas, dim)
        return reference.alpha_combine(source, targets, neighbors, alphas, dim).to(source.dtype)
    return torch.ops.alphanet.alpha_combine(source, targets, neighbors, alphas, dim)


# --------------------------------------------------------------------------- the fit's training step

def coefficient_grads(inputs_t: Tensor, first: Tensor, rest: list[Tensor], biases: list[Tensor], few_bias: Tensor,
                      raw: Tensor, targets: Tensor, neighbors: Tensor, base_lse: Tensor, target_few: Tensor,
                      target_base: Tensor, pred_scale: float,
                      input_ids: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """The fit's training step (``torch.ops.alphanet._coefficient_grads``; see
    :func:`alphanet_ext.reference.coefficient_grads`, its pure-torch form, used
    when the compiled module is missing). With ``input_ids [C_f, k+1]``,
    ``inputs_t`` is a table of rows ``[V, d]`` and the networks' input row ``c``
    is its rows ``input_ids[c]`` one after another."""
    args = (inputs_t, first, rest, biases, few_bias, raw, targets, neighbors, base_lse, target_few, target_base,
            pred_scale, input_ids)
    if not HAS_EXTENSION:
        _fallback("fit's training step")
        return reference.coefficient_grads(*args)
    return torch.ops.alphanet._coefficient_grads(*args)


def input_product(inputs_t: Tensor, first: Tensor, num_few: int, input_ids: Tensor | None = None) -> Tensor:
    """The coefficient networks' first layer ``[C_f, N]``: the input (``inputs_t [D, C_f]``,
    packed panels, or a table of rows with ``input_ids``, as :func:`coefficient_grads`
    reads it) times ``first [D, N]`` (``torch.ops.alphanet._input_product``)."""
    if not HAS_EXTENSION:
        _fallback("networks' first layer")
        rows = inputs_t[input_ids].reshape(num_few, -1) if input_ids is not None else inputs_t.T
        return rows @ first
    return torch.ops.alphanet._input_product(inputs_t, first, num_few, input_ids)


# --------------------------------------------------------------------------- torch.compile and autograd

def _check_one_device(op: str, **tensors: Tensor) -> None:
    """Mixed-device calls can dispatch to the fake kernels below; refuse them there too."""
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            raise RuntimeError(f"{op}: {first_name} is on {first.device} but {name} is on {tensor.device}")


if HAS_EXTENSION:
    @torch.library.register_fake("alphanet::class_sums_")
    def _class_sums_fake(sums, counts, x, labels):
        _check_one_device("class_means", x=x, labels=labels, sums=sums, counts=counts)
        return None

    @torch.library.register_fake("alphanet::class_means")
    def _class_means_fake(x, labels, num_classes):
        _check_one_device("class_means", x=x, labels=labels)
        return (x.new_empty(num_classes, x.shape[1], dtype=_acc_dtype(x.dtype)),
                x.new_empty(num_classes, dtype=torch.long))

    def _class_means_setup(ctx, inputs, output):
        x, labels, _ = inputs
        ctx.save_for_backward(labels, output[1])
        ctx.x_dtype = x.dtype

    def _class_means_backward(ctx, grad_means, grad_counts):
        labels, counts = ctx.saved_tensors
        per_class = grad_means / counts.clamp_min(1).unsqueeze(1).to(grad_means.dtype)
        return per_class.index_select(0, labels.long()).to(ctx.x_dtype), None, None

    torch.library.register_autograd("alphanet::class_means", _class_means_backward,
                                    setup_context=_class_means_setup)

    @torch.library.register_fake("alphanet::knn")
    def _knn_fake(queries, keys, k, metric="euclidean", ranking="auto"):
        _check_one_device("knn", queries=queries, keys=keys)
        return (queries.new_empty(queries.shape[0], k, dtype=_acc_dtype(queries.dtype)),
                queries.new_empty(queries.shape[0], k, dtype=torch.long))

    def _knn_setup(ctx, inputs, output):
        queries, keys, _, metric, _ = inputs
        ctx.save_for_backward(queries, keys, output[1])
        ctx.metric = metric

    def _knn_backward(ctx, grad_distances, _):
        # The indices are piecewise constant, so the distances' gradient is the
        # distance formula's at the chosen pairs: float64, a chunk of queries at a time.
        queries, keys, indices = ctx.saved_tensors
        need_queries, need_keys = ctx.needs_input_grad[:2]
        grad_queries = torch.zeros_like(queries) if need_queries else None
        grad_keys = keys.new_zeros(keys.shape, dtype=torch.float64) if need_keys else None
        chunk = max(1, (1 << 22) // max(1, indices.shape[1] * queries.shape[1]))
        for begin in range(0, queries.shape[0], chunk):
            rows = indices[begin:begin + chunk]
            with torch.enable_grad():
                q = queries[begin:begin + chunk].detach().double().requires_grad_()
                neighbors = keys.detach()[rows].double().requires_grad_()
                distances = reference.pair_distances(q, neighbors, ctx.metric)
                grad_q, grad_n = torch.autograd.grad(distances, (q, neighbors), grad_distances[begin:begin + chunk])
            if need_queries:
                grad_queries[begin:begin + chunk] = grad_q
            if need_keys:
                grad_keys.index_add_(0, rows.flatten(), grad_n.flatten(0, 1))
        return grad_queries, grad_keys.to(keys.dtype) if need_keys else None, None, None, None

    torch.library.register_autograd("alphanet::knn", _knn_backward, setup_context=_knn_setup)

    @torch.library.register_fake("alphanet::alpha_combine")
    def _alpha_combine_fake(source, targets, neighbors, alphas, dim=0):
        _check_one_device("alpha_combine", source=source, targets=targets, neighbors=neighbors, alphas=alphas)
        n = targets.shape[0]
        shape = (n, source.shape[1]) if dim in (0, -2) else (source.shape[0], n)
        return source.new_empty(shape)

    @torch.library.register_fake("alphanet::_check_combine_values")
    def _check_combine_values_fake(source, targets, neighbors, alphas, dim=0):
        _check_one_device("alpha_combine", source=source, targets=targets, neighbors=neighbors, alphas=alphas)
        return None

    @torch.library.register_fake("alphanet::alpha_combine_backward")
    def _alpha_combine_backward_fake(grad_out, source, targets, neighbors, alphas, dim, need_source, need_alphas):
        return (source.new_empty(source.shape if need_source else (0,)),
                alphas.new_empty(alphas.shape if need_alphas else (0,)))

    @torch.library.register_fake("alphanet::_input_product")
    def _input_product_fake(inputs_t, first, num_few, input_ids=None):
        return first.new_empty(num_few, first.shape[1])

    @torch.library.register_fake("alphanet::_coefficient_grads")
    def _coefficient_grads_fake(inputs_t, first, rest, biases, few_bias, raw, targets, neighbors, base_lse, target_few,
                                target_base, pred_scale, input_ids=None):
        grads = [first.new_empty(first.shape)] + [w.new_empty(w.shape) for w in rest]
        grads += [b.new_empty(b.shape) for b in biases] + [few_bias.new_empty(few_bias.shape)]
        return few_bias.new_empty(few_bias.shape[:1]), grads
