"""AlphaNet post-hoc correction, trained in logit space.

Scores are linear in the corrected classifier, so for a sample with base
logits ``L = x W^T`` a few class ``c`` scores
``L[c] + sum_i a_ci / ||a_c||_1 * L[n_ci] + b_c``: training and validation only
gather and combine columns of ``L`` (``alpha_combine(..., dim=1)``) and never
build the corrected matrix, which is materialised once at the end.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from numbers import Integral
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import __version__, ops, reference
from .data import (ArrayLike, as_tensor, cache_budget, check_classifier, check_features, check_labels,
                   gather_rows, logits, resolve_device, streamed_class_means)
from .metrics import SPLIT_NAMES, accuracy_by_split, make_splits, mean_std

__all__ = ["fit", "FitResult", "load", "combine_experts"]

METRICS = ("euclidean", "cosine", "random")
_ROW_BLOCK = 4096            # rows of the few-split and val logits handled at once (bounds temporaries)
_CHUNK_VALUES = 1 << 25      # logits per training chunk: samples * trials * classes


@dataclass
class FitResult:
    """What :func:`fit` returns. Tensors are on the CPU."""

    weight: Tensor                  # [C, d] corrected classifier; base rows bit-identical to the input
    bias: Tensor                    # [C]
    splits: dict[str, Tensor]       # class ids of many / medium / few
    neighbors: Tensor               # [C_few, k] neighbour class ids of each few class (order of splits["few"])
    alphas: Tensor                  # [C_few, k] L1-normalised coefficients of the chosen trial
    history: list[dict]             # per epoch: loss and val top-1 per split, per trial
    best_epochs: list[int]          # chosen epoch of every trial (1-based)
    best_trial: int
    trial_val_top1: list[dict]      # val top-1 per split of every trial at its chosen epoch (empty without val)
    config: dict
    timings: dict[str, float]
    neighbor_distances: Tensor | None = None  # [C_few, k] distance between the class means
    trial_alphas: Tensor | None = None        # [T, C_few, k] raw coefficients of every trial's chosen epoch
    trial_few_bias: Tensor | None = None      # [T, C_few]
    class_means: Tensor | None = None         # [C, d] train-feature mean of every class (for the analyses)
    mlp_state: dict[str, Tensor] = field(default_factory=dict)
    version: str = __version__

    def trial_classifier(self, trial: int, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """The corrected ``(weight, bias)`` of any trial, rebuilt from the input classifier."""
        return _apply_correction(weight, bias, self.splits["few"], self.neighbors, self.trial_alphas[trial],
                                 self.trial_few_bias[trial])

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and standard deviation over trials of the val top-1 per split."""
        if not self.trial_val_top1:
            return {}
        return {name: mean_std([trial[name] for trial in self.trial_val_top1]) for name in SPLIT_NAMES + ("overall",)}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the result atomically (a temporary file renamed into place)."""
        from .io import save_torch, write_atomic
        data = asdict(self)
        write_atomic(os.fspath(path), lambda temporary: save_torch(data, temporary))


def _apply_correction(weight: ArrayLike, bias: ArrayLike | None, few: Tensor, neighbors: Tensor, alphas: Tensor,
                      few_bias: Tensor) -> tuple[Tensor, Tensor]:
    """The input classifier (on the CPU) with its few rows corrected: base rows keep
    the caller's exact values and dtype."""
    w = as_tensor(weight, "weight").cpu().clone()
    b = torch.zeros(w.shape[0]) if bias is None else as_tensor(bias, "bias").cpu().clone()
    few, neighbors = few.cpu(), neighbors.cpu()
    w[few] = ops.alpha_combine(w, few, neighbors, alphas.detach().cpu())
    b[few] = few_bias.detach().cpu().to(b.dtype)
    return w, b


def load(path: str | os.PathLike) -> FitResult:
    """Reads a result written by :meth:`FitResult.save`. Only tensors and plain
    containers are read (``weights_only``), so a file cannot run code."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001  (corrupt, truncated or foreign files)
        raise ValueError(f"{os.fspath(path)}: not a result saved by FitResult.save (torch.load raised "
                         f"{type(error).__name__})") from None
    names = {item.name for item in fields(FitResult)}
    required = {item.name for item in fields(FitResult) if item.default is MISSING and item.default_factory is MISSING}
    if not isinstance(data, dict) or not required <= data.keys() or not data.keys() <= names:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{os.fspath(path)}: not a result saved by FitResult.save (found {found})")
    return FitResult(**data)


def combine_experts(weights: Sequence[ArrayLike], biases: Sequence[ArrayLike] | None = None) -> tuple[Tensor, Tensor]:
    """One linear classifier ``[C, E*d]`` equivalent to averaging E expert classifiers.

    Expert ``e`` scores ``x_e W_e^T + b_e``; the average over experts equals
    ``[x_1 .. x_E] [W_1 .. W_E]^T / E + mean(b)``, so concatenate the experts'
    features along the feature axis (``torch.cat(features, dim=1)``) and use the
    returned ``(weight, bias)``.
    """
    ws = [as_tensor(w, f"weights[{i}]").float() for i, w in enumerate(weights)]
    if not ws or any(w.dim() != 2 or w.shape[0] != ws[0].shape[0] for w in ws):
        raise ValueError("combine_experts: need one or more [C, d_e] matrices with the same number of classes")
    experts = len(ws)
    weight = torch.cat(ws, dim=1) / experts
    if biases is None:
        return weight, torch.zeros(weight.shape[0])
    bs = [as_tensor(b, f"biases[{i}]").float() for i, b in enumerate(biases)]
    if len(bs) != experts or any(b.shape != (weight.shape[0],) for b in bs):
        raise ValueError("combine_experts: need one bias [C] per expert")
    return weight, torch.stack(bs).mean(dim=0)


class _FusedAdamW:
    """AdamW (betas 0.9/0.999, eps 1e-8: torch's defaults) through torch's fused
    kernel: the update of ``torch.optim.AdamW(fused=True)``, without the
    optimiser's per-step Python machinery or its one-time import of
    ``torch._dynamo`` (seconds on a small machine)."""

    def __init__(self, params: list[Tensor], lr: float, weight_decay: float):
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]

    def step(self, grads: list[Tensor]) -> None:
        """One update with ``grads`` (one per parameter, in order)."""
        # the fused kernel walks a gradient's memory in its parameter's order:
        # a transposed one (as autograd gives for a bmm's operand) would be misread
        grads = [g.contiguous() for g in grads]
        torch._foreach_add_(self.steps, 1)
        torch._fused_adamw_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, lr=self.lr,
                            beta1=0.9, beta2=0.999, weight_decay=self.weight_decay, eps=1e-8, amsgrad=False,
                            maximize=False)


class _ReplayedStep:
    """Runs ``step(*batch)`` for full batches as one captured CUDA graph.

    A training step launches a few dozen kernels, and on a GPU launching them took
    longer than running them (an H200: 1.1 ms of wall time a step at iNaturalist
    size against 0.8 ms of device time). The first call runs eagerly, so lazy
    set-up (cuBLAS handles, workspaces) stays out of the graph; later calls copy
    the batch into fixed buffers and replay. AdamW's learning rate is a constant
    of the captured kernel, so a new rate captures the step again. The graph runs
    the same kernels on the same values as the eager step.
    ``ALPHANET_CUDA_GRAPHS=0`` turns this off.
    """

    def __init__(self, step: Callable[..., None]):
        self.step = step
        self.buffers: list[Tensor] = []
        self.replay: Callable[[], None] | None = None
        self.lr: float | None = None

    @staticmethod
    def wanted(device: torch.device) -> bool:
        return device.type == "cuda" and os.environ.get("ALPHANET_CUDA_GRAPHS", "1") != "0"

    def __call__(self, lr: float, *batch: Tensor) -> None:
        if not self.buffers:
            self.step(*batch)
            self.buffers = [torch.empty_like(t) for t in batch]
            return
        for buffer, value in zip(self.buffers, batch):
            buffer.copy_(value)
        if self.replay is None or lr != self.lr:
            self.replay, self.lr = self._capture(), lr
        self.replay()

    def _capture(self) -> Callable[[], None]:
        """The step on the buffers, captured (not run); returns its replay."""
        device = self.buffers[0].device  # a graph captures and replays on the current device
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph):
            self.step(*self.buffers)

        def replay() -> None:
            with torch.cuda.device(device):
                graph.replay()
        return replay


class _CoefficientNets:
    """``trials`` independent MLPs ``[w_c, v_1..v_k] -> alpha [k]`` as stacked parameters.

    AdamW and weight decay act elementwise, so one optimiser over the stacked
    tensors trains every trial exactly as if it had its own. The first layer of
    all trials is one ``[D, T * hidden]`` matrix (trial t's ``Linear.weight.T``
    in columns ``t*hidden:(t+1)*hidden``) so it runs as one GEMM. Training steps
    go through ``torch.ops.alphanet._coefficient_grads``, which runs this same
    forward pass and its backward pass in C++ (``ops.coefficient_grads``).
    """

    def __init__(self, sizes: Sequence[int], generators: Sequence[torch.Generator], device: torch.device):
        weights, self.biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation
            weights.append(torch.stack([(torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound for g in generators]))
            self.biases.append(torch.stack([(torch.rand(fan_out, generator=g) * 2 - 1) * bound
                                            for g in generators]).to(device))
        self.trials, self.hidden = weights[0].shape[0], weights[0].shape[1]
        self.first = weights[0].permute(2, 0, 1).reshape(sizes[0], -1).contiguous().to(device)
        self.rest = [w.to(device) for w in weights[1:]]

    def parameters(self) -> list[Tensor]:
        return [self.first] + self.rest + self.biases

    def __call__(self, inputs: Tensor, num_few: int) -> Tensor:
        """The input shared by all trials (from ``_network_inputs``) -> ``alphas [T, C_f, k]``."""
        if inputs.dim() == 3:  # packed panels
            h = torch.matmul(inputs[:, :self.first.shape[0]].transpose(1, 2), self.first)
            h = h.reshape(-1, self.first.shape[1])[:num_few]
        else:
            h = torch.mm(inputs.T, self.first)
        return reference.coefficient_alphas(h, self.rest, self.biases, self.trials)

    def state(self, trial: int) -> dict[str, Tensor]:
        """Trial ``trial``'s network as a ``torch.nn.Sequential`` state dict (Linear layers at 0, 2, 4, ...)."""
        columns = slice(trial * self.hidden, (trial + 1) * self.hidden)
        weights = [self.first[:, columns].T] + [w[trial] for w in self.rest]
        out = {}
        for layer, (w, b) in enumerate(zip(weights, self.biases)):
            out[f"{2 * layer}.weight"] = w.detach().cpu().clone()
            out[f"{2 * layer}.bias"] = b[trial].detach().cpu().clone()
        return out


_INPUT_PANEL = 6  # kInputPanel in csrc/kernel_params.h; the C++ op checks the packed shape


def _network_inputs(rows: Tensor, columns: int) -> Tensor:
    """The coefficient networks' fixed input ``rows [C_f, (k+1)d]`` in the layout the training op reads.

    On an x86 CPU with AVX2 (and a first layer of ``columns`` a multiple of 16)
    it is packed once into panels ``[P, D', 6]``: panel p, row r, slot j holds
    ``rows[6p + j, r]``, zero-padded, which the op's first layer streams
    without the per-step repacking a BLAS call does. Elsewhere: ``rows.T``.
    """
    packable = (ops.HAS_EXTENSION and rows.device.type == "cpu" and rows.dtype == torch.float32 and columns % 16 == 0
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    if not packable:
        return rows.T.contiguous()
    num_few, dims = rows.shape
    padded = F.pad(rows, (0, -dims % _INPUT_PANEL, 0, -num_few % _INPUT_PANEL))
    return padded.view(-1, _INPUT_PANEL, padded.shape[1]).transpose(1, 2).contiguous()


@torch.no_grad()
def _base_logsumexp_(scratch: Tensor, bias: Tensor, few: Tensor, pred_scale: float,
                     labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per row of raw logits: log-sum-exp of the base-class scores and, given labels,
    the score of each row's label (few columns excluded from the sum). Works in
    place: ``scratch`` (the raw logits) is overwritten, so no logits-sized
    temporary is allocated."""
    scores = scratch.add_(bias).mul_(pred_scale)
    target = None if labels is None else scores.gather(1, labels[:, None]).squeeze(1)
    scores.index_fill_(1, few, -math.inf)
    top = scores.amax(dim=1, keepdim=True)
    return scores.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1)), target


def _keeps_features_on(device: torch.device, train_x: ArrayLike) -> bool:
    """Whether to hold a copy of host features on ``device`` for the whole fit.

    Each epoch gathers scattered base rows; on a GPU, reading them from host
    memory (or a memory-mapped file) every chunk costs far more than one upload
    during the class-means pass, which reads every row anyway. The copy may take
    a quarter of the free device memory; the logit caches need the rest.
    """
    if device.type != "cuda" or as_tensor(train_x[:0], "train_x").is_cuda:  # already on a GPU
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return as_tensor(train_x[:0], "train_x").element_size() * math.prod(train_x.shape) <= free // 4


def _kept_logits(device: torch.device, num_classes: int, few_samples: int, val_samples: int) -> tuple[bool, bool]:
    """Whether the few-split and the val logits (``[rows, C]`` float32 each) are
    kept for the whole fit. Keeping them saves computing those rows' logits
    again every epoch; each is kept while the kept ones take at most half of
    the memory available, so a fit beyond iNaturalist scale slows down instead
    of running out of memory."""
    budget = cache_budget(device)
    available = 2 * budget
    kept = []
    for name, rows in (("few-split", few_samples), ("val", val_samples)):
        size = rows * num_classes * 4
        kept.append(size <= budget)
        if kept[-1]:
            budget -= size
        else:
            warnings.warn(f"the {name} samples' logits ({size / 2**30:.1f} GiB) would take more than half of the "
                          f"{available / 2**30:.1f} GiB available on {device}: computing them every epoch instead "
                          "of keeping them (slower, same result up to rounding)", stacklevel=3)
    return kept[0], kept[1]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(enabled: bool, **kwargs):
    """A tqdm progress bar, or a silent stand-in when disabled or tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(**kwargs)


def fit(train_x: ArrayLike, train_y: ArrayLike, weight: ArrayLike, bias: ArrayLike | None = None,
        val_x: ArrayLike | None = None, val_y: ArrayLike | None = None, *,
        k: int = 5, rho: float = 1.0, metric: str = "euclidean",
        epochs: int | None = None, min_epochs: int = 5, batch_size: int = 64, lr: float = 1e-3,
        weight_decay: float = 0.01, lr_step: int = 10, lr_gamma: float = 0.1,
        hidden: Sequence[int] = (32, 32, 32), few_threshold: int = 20, many_threshold: int = 100,
        pred_scale: float = 1.0, trials: int = 1, seed: int = 0,
        device: torch.device | str | None = None, progress: bool = True) -> FitResult:
    """Corrects the few-split rows of a linear classifier with AlphaNet.

    Args:
        train_x, train_y: training features ``[N, d]`` and labels ``[N]`` (torch,
            numpy — memory-mapped arrays are read in chunks — or cupy arrays).
        weight, bias: the trained classifier ``[C, d]`` and ``[C]`` (bias may be None);
            a module's parameters (``model.fc.weight``) can be passed as they are.
        val_x, val_y: optional validation set; selects the epoch (best overall
            top-1 among epochs ``>= min_epochs``) and the best trial.
        k: neighbours per few class. rho: base samples drawn per few sample each epoch.
        metric: ``"euclidean"``, ``"cosine"`` or ``"random"`` (random base
            classes: the method's control).
        epochs: default 25 with a val set, 10 without (then the last epoch is kept).
        hidden: widths of the coefficient network's hidden layers.
        few_threshold, many_threshold: split limits on per-class train counts.
        pred_scale: multiplies every score (softmax temperature 1/pred_scale).
        trials: independently seeded models trained together in one pass.
        seed: trial ``t`` uses seed ``seed + t``; results are deterministic per device.
        device: defaults to CUDA when a GPU and the CUDA kernels are available.
            On a GPU, host features (even memory-mapped ones) are copied to the
            device once if they take at most a quarter of its free memory;
            otherwise each chunk's rows are read from the host.
        progress: show progress bars (tqdm) on a terminal or in a Jupyter notebook.

    Returns:
        A :class:`FitResult` with the corrected classifier of the best trial.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    device = resolve_device(device)
    integers = dict(k=k, epochs=epochs, min_epochs=min_epochs, batch_size=batch_size, lr_step=lr_step,
                  few_threshold=few_threshold, many_threshold=many_threshold, trials=trials, seed=seed)
    for name, value in integers.items():
        if not (value is None and name == "epochs") and (isinstance(value, bool) or not isinstance(value, Integral)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    k, min_epochs, batch_size, lr_step, few_threshold, many_threshold, trials, seed = (
        int(value) for value in (k, min_epochs, batch_size, lr_step, few_threshold, many_threshold, trials, seed))
    epochs = None if epochs is None else int(epochs)  # numpy integers become Python ones
    widths = tuple(hidden) if isinstance(hidden, Iterable) and not isinstance(hidden, (str, bytes)) else None
    if widths is None or not all(isinstance(width, Integral) and not isinstance(width, bool) for width in widths):
        raise TypeError(f"hidden must be a sequence of layer widths such as (32, 32, 32), got {hidden!r}")
    hidden = tuple(int(width) for width in widths)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if rho < 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    for name, value in (("pred_scale", pred_scale), ("lr", lr), ("lr_gamma", lr_gamma)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if any(width < 1 for width in hidden):
        raise ValueError(f"hidden layer widths must be at least 1, got {tuple(hidden)}")
    for name, value in (("trials", trials), ("batch_size", batch_size), ("lr_step", lr_step)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    has_val = val_x is not None
    epochs = (25 if has_val else 10) if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    progress = progress and (os.isatty(2) or "ipykernel" in sys.modules)  # a terminal or a notebook

    w, b = check_classifier(weight, bias, device)
    num_classes, dim = w.shape
    check_features(train_x, "train_x", dim)
    labels = check_labels(train_y, "train_y", train_x.shape[0], num_classes, device)
    if has_val:
        check_features(val_x, "val_x", dim)
        if val_x.shape[0] == 0:
            raise ValueError("val_x has no samples; pass val_x=None to train without a validation set")
        val_labels = check_labels(val_y, "val_y", val_x.shape[0], num_classes, device)

    # Splits and class means (streamed, so memory-mapped features are read once, in chunks).
    tic = time.perf_counter()
    resident = None
    if _keeps_features_on(device, train_x):
        resident = torch.empty(tuple(train_x.shape), dtype=as_tensor(train_x[:0], "train_x").dtype, device=device)
    bar = _bar(progress, total=labels.numel(), desc="class means", unit="row", leave=False)

    def each_chunk(begin: int, chunk: Tensor) -> None:
        bar.update(chunk.shape[0])
        if resident is not None:
            resident[begin:begin + chunk.shape[0]] = chunk

    means, counts = streamed_class_means(train_x, labels, num_classes, "train_x", device, each_chunk=each_chunk)
    bar.close()
    if resident is not None:
        train_x = resident
    splits = make_splits(counts, few_threshold, many_threshold)
    few, base = splits["few"].to(device), torch.cat([splits["many"], splits["medium"]]).sort().values.to(device)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"{len(empty)} class(es) have no training samples ({shown}); AlphaNet needs at least one "
                         "sample per class for its class mean")
    if few.numel() == 0:
        raise ValueError(f"no few-split class (fewer than {few_threshold} training samples): nothing to correct")
    if base.numel() == 0:
        raise ValueError(f"no base class (many or medium split, at least {few_threshold} training samples): "
                         "few classes have no neighbours to borrow from")
    if k > base.numel():
        raise ValueError(f"k={k} is larger than the base split ({base.numel()} classes)")
    timings["class_means"] = time.perf_counter() - tic

    generators = [torch.Generator().manual_seed(seed + t) for t in range(trials)]
    tic = time.perf_counter()
    if metric == "random":
        control = torch.Generator().manual_seed(seed)
        picks = torch.stack([torch.randperm(base.numel(), generator=control)[:k] for _ in range(few.numel())])
        neighbors = base[picks.to(device)]
        neighbor_distances = (means[few][:, None, :] - means[neighbors]).norm(dim=2)
    else:
        neighbor_distances, nearest = ops.knn(means[few], means[base], k, metric)
        neighbors = base[nearest]
    timings["neighbors"] = time.perf_counter() - tic

    # Fixed inputs of the coefficient network: [w_c, v_1 .. v_k] per few class.
    sizes = [(k + 1) * dim, *hidden, k]
    nets = _CoefficientNets(sizes, generators, device)
    net_inputs = _network_inputs(torch.cat([w[few], w[neighbors].reshape(few.numel(), k * dim)], dim=1),
                                 nets.first.shape[1])
    few_bias = b[few].repeat(trials, 1)  # [T, C_f]
    optimizer = _FusedAdamW(nets.parameters() + [few_bias], lr=lr, weight_decay=weight_decay)

    # Column ids of every trial's few classes and neighbours in a [B, T*C] view of the batch logits.
    trial_offsets = (torch.arange(trials, device=device) * num_classes)[:, None]
    trial_targets = (trial_offsets + few[None]).reshape(-1)
    trial_neighbors = (trial_offsets[:, :, None] + neighbors[None]).reshape(-1, k)
    few_position = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    few_position[few] = torch.arange(few.numel(), device=device)
    is_few_class = few_position >= 0

    # Samples: every few-split sample each epoch (their logits computed once where memory allows),
    # plus rho * F base samples drawn with weight 1 / n_class: a uniform base class, then a uniform member.
    tic = time.perf_counter()
    few_rows = torch.nonzero(is_few_class[labels]).flatten()
    keep_few, keep_val = _kept_logits(device, num_classes, few_rows.numel(), val_x.shape[0] if has_val else 0)
    few_logits = few_base_lse = None
    if keep_few:
        few_logits = torch.empty(few_rows.numel(), num_classes, device=device)
        few_base_lse = torch.empty(few_rows.numel(), device=device)
        bar = _bar(progress, total=few_rows.numel(), desc="few-split logits", unit="row", leave=False)
        for begin in range(0, few_rows.numel(), _ROW_BLOCK):
            rows = few_rows[begin:begin + _ROW_BLOCK]
            bar.update(rows.numel())
            block = few_logits[begin:begin + rows.numel()]
            torch.mm(gather_rows(train_x, rows, "train_x", device).float(), w.T, out=block)
            few_base_lse[begin:begin + rows.numel()] = _base_logsumexp_(block.clone(), b, few, pred_scale)[0]
        bar.close()
    base_order = torch.argsort(labels, stable=True)
    class_offsets = torch.zeros(num_classes + 1, dtype=torch.long, device=device)
    class_offsets[1:] = counts.to(device).cumsum(0)
    num_few, num_base = few_rows.numel(), int(round(rho * few_rows.numel()))
    epoch_size = num_few + num_base
    timings["few_logits"] = time.perf_counter() - tic

    if has_val:
        tic = time.perf_counter()
        num_val = val_x.shape[0]
        val_logits = logits(val_x, w, "val_x", device) if keep_val else None

        def val_block(begin: int, end: int) -> Tensor:
            return val_logits[begin:end] if keep_val else logits(val_x, w, "val_x", device, begin, end)

        # best base class of every val sample, which no correction changes
        val_base_best = torch.empty(num_val, device=device)
        val_base_class = torch.empty(num_val, dtype=torch.long, device=device)
        for begin in range(0, num_val, _ROW_BLOCK):
            end = begin + _ROW_BLOCK
            scores = val_block(begin, end).add(b).mul_(pred_scale).index_fill_(1, few, -math.inf)
            torch.max(scores, dim=1, out=(val_base_best[begin:end], val_base_class[begin:end]))
        timings["val_logits"] = time.perf_counter() - tic

    def draw_epoch(generator: torch.Generator) -> Tensor:
        """Train rows of one epoch, shuffled; few rows encoded as -(position + 1)."""
        picked_classes = base[torch.randint(base.numel(), (num_base,), generator=generator).to(device)]
        within = (torch.rand(num_base, generator=generator).to(device) * counts.to(device)[picked_classes]).long()
        base_rows = base_order[class_offsets[picked_classes] + within]
        entries = torch.cat([-(torch.arange(num_few, device=device) + 1), base_rows])
        return entries[torch.randperm(epoch_size, generator=generator).to(device)]

    chunk_samples = max(batch_size, (_CHUNK_VALUES // (trials * num_classes)) // batch_size * batch_size)
    # Buffers reused by every chunk: allocating them per chunk costs page faults on every step.
    chunk_buffer = torch.empty(min(chunk_samples, epoch_size) * trials, num_classes, device=device)
    base_buffer = torch.empty_like(chunk_buffer)

    def chunk_logits(entries: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For a chunk of epoch entries ``[T, S]``: logits without bias ``[S, T, C]``, train
        labels ``[S, T]``, the log-sum-exp of the base-class scores ``[S, T]`` and the
        score of the true class ``[S, T]`` (read for base classes only; 0 or stale for few ones)."""
        flat = entries.T.reshape(-1)  # sample-major: row s*T + t
        out = chunk_buffer[:flat.numel()]
        base_lse = torch.empty(flat.numel(), device=device)
        target_score = torch.zeros(flat.numel(), device=device)
        is_few = flat < 0
        rows = torch.where(is_few, few_rows[(-flat - 1).clamp_min(0)], flat.clamp_min(0))
        chunk_labels = labels[rows]
        if keep_few:  # few rows from the kept logits, base rows computed
            few_at, computed_at = torch.nonzero(is_few).flatten(), torch.nonzero(~is_few).flatten()
            few_index = -flat[few_at] - 1
            few_part = base_buffer[:few_at.numel()]  # free until the base rows are computed
            out.index_copy_(0, few_at, torch.index_select(few_logits, 0, few_index, out=few_part))
            base_lse[few_at] = few_base_lse[few_index]
        else:
            computed_at = torch.arange(flat.numel(), device=device)
        if computed_at.numel():
            computed = base_buffer[:computed_at.numel()]
            torch.mm(gather_rows(train_x, rows[computed_at], "train_x", device).float(), w.T, out=computed)
            out.index_copy_(0, computed_at, computed)
            base_lse[computed_at], target_score[computed_at] = _base_logsumexp_(computed, b, few, pred_scale,
                                                                                chunk_labels[computed_at])
        shape = (entries.shape[1], trials)
        return out.view(*shape, num_classes), chunk_labels.view(shape), base_lse.view(shape), target_score.view(shape)

    def val_top1(alphas: Tensor) -> list[dict[str, float]]:
        """Val top-1 per split for every trial, from the cached logits: O(N_val * T * C_f * k)."""
        correct = torch.empty(trials, num_val, dtype=torch.bool, device=device)
        flat_alphas = alphas.reshape(-1, k)
        for begin in range(0, num_val, _ROW_BLOCK):
            end = begin + _ROW_BLOCK
            block = val_block(begin, end)
            few_scores = ops.combine_unchecked(
                block, few.repeat(trials), neighbors.repeat(trials, 1), flat_alphas, 1)
            few_scores = pred_scale * (few_scores.view(-1, trials, few.numel()) + few_bias.detach())
            few_best, few_index = few_scores.max(dim=2)
            few_class = few[few_index]
            base_best, base_class = val_base_best[begin:end, None], val_base_class[begin:end, None]
            # argmax over all classes, ties to the lower class id
            take_few = (few_best > base_best) | ((few_best == base_best) & (few_class < base_class))
            predicted = torch.where(take_few, few_class, base_class)
            correct[:, begin:end] = (predicted == val_labels[begin:end, None]).T
        return [accuracy_by_split(correct[t], val_labels, splits, num_classes) for t in range(trials)]

    history: list[dict] = []
    best_score = [-math.inf] * trials
    best_epochs = [epochs] * trials
    best_alphas = torch.zeros(trials, few.numel(), k, device=device)
    best_bias = few_bias.detach().clone()
    best_states: list[dict[str, Tensor]] = [{} for _ in range(trials)]
    train_time = val_time = 0.0

    loss_sum = torch.zeros(trials, device=device)

    def train_step(raw: Tensor, base_lse: Tensor, target_few: Tensor, target_base_score: Tensor) -> None:
        rows = raw.shape[0]
        losses, grads = ops.coefficient_grads(
            net_inputs, nets.first, nets.rest, nets.biases, few_bias, raw.view(rows, trials * num_classes),
            trial_targets, trial_neighbors, base_lse, target_few, target_base_score, pred_scale)
        optimizer.step(grads)
        loss_sum.add_(losses * rows)

    full_batch_step = _ReplayedStep(train_step) if _ReplayedStep.wanted(device) else None
    bar = _bar(progress, total=epochs * epoch_size, desc="alphanet fit", unit="sample")
    for epoch in range(1, epochs + 1):
        tic = time.perf_counter()
        optimizer.lr = lr * lr_gamma ** ((epoch - 1) // lr_step)  # StepLR
        entries = torch.stack([draw_epoch(g) for g in generators])  # [T, epoch_size]
        loss_sum.zero_()
        for chunk_begin in range(0, epoch_size, chunk_samples):
            chunk_entries = entries[:, chunk_begin:chunk_begin + chunk_samples]
            chunk_raw, chunk_labels, base_lse, target_base_score = chunk_logits(chunk_entries)
            target_few = few_position[chunk_labels]  # [S, T], -1 for base targets
            for begin in range(0, chunk_raw.shape[0], batch_size):
                batch = (chunk_raw[begin:begin + batch_size], base_lse[begin:begin + batch_size],
                         target_few[begin:begin + batch_size], target_base_score[begin:begin + batch_size])
                if full_batch_step is not None and batch[0].shape[0] == batch_size:
                    full_batch_step(optimizer.lr, *batch)
                else:
                    train_step(*batch)
                bar.update(batch[0].shape[0])
        train_time += time.perf_counter() - tic

        record: dict[str, Any] = {"epoch": epoch, "loss": (loss_sum / epoch_size).tolist()}
        with torch.no_grad():
            alphas = nets(net_inputs, few.numel())
            if has_val:
                tic = time.perf_counter()
                record["val_top1"] = val_top1(alphas)
                val_time += time.perf_counter() - tic
            for t in range(trials):
                eligible = epoch >= min(min_epochs, epochs)
                score = record["val_top1"][t]["overall"] if has_val else float(epoch)
                if eligible and score > best_score[t]:
                    best_score[t], best_epochs[t] = score, epoch
                    best_alphas[t] = alphas[t]
                    best_bias[t] = few_bias[t]
                    best_states[t] = nets.state(t)
        history.append(record)
        val_text = f", val top-1 {max(r['overall'] for r in record['val_top1']):.1f}" if has_val else ""
        bar.set_postfix_str(f"epoch {epoch}/{epochs}, loss {min(record['loss']):.3f}{val_text}")
    bar.close()

    for record in history:
        record["chosen"] = [record["epoch"] == e for e in best_epochs]
    trial_val = [history[best_epochs[t] - 1]["val_top1"][t] for t in range(trials)] if has_val else []
    best_trial = max(range(trials), key=lambda t: trial_val[t]["overall"]) if has_val else 0

    tic = time.perf_counter()
    chosen = best_alphas[best_trial]
    normalized = chosen / chosen.abs().sum(dim=1, keepdim=True)
    out_weight, out_bias = _apply_correction(weight, bias, few, neighbors, chosen, best_bias[best_trial])
    timings["export"] = time.perf_counter() - tic
    timings["train"] = train_time
    timings["validation"] = val_time
    timings["total"] = time.perf_counter() - started

    config = dict(k=k, rho=rho, metric=metric, epochs=epochs, min_epochs=min_epochs, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma, hidden=list(hidden),
                  few_threshold=few_threshold, many_threshold=many_threshold, pred_scale=pred_scale, trials=trials,
                  seed=seed, device=str(device))
    return FitResult(
        weight=out_weight, bias=out_bias, splits={name: ids.cpu() for name, ids in splits.items()},
        neighbors=neighbors.cpu(), alphas=normalized.detach().cpu(), history=history, best_epochs=best_epochs,
        best_trial=best_trial, trial_val_top1=trial_val, config=config, timings=timings,
        neighbor_distances=neighbor_distances.float().cpu(), trial_alphas=best_alphas.detach().cpu(),
        trial_few_bias=best_bias.detach().cpu(), class_means=means.float().cpu(), mlp_state=best_states[best_trial])
