"""The training step: the coefficient networks of every trial, AdamW, and the
step run eagerly or replayed as a CUDA graph."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops, reference


class FusedAdamW:
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

    def state(self) -> dict[str, list[Tensor]]:
        return {"exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs, "steps": self.steps}

    def load_state(self, state: dict[str, list[Tensor]]) -> None:
        for name, tensors in self.state().items():
            for mine, saved in zip(tensors, state[name]):
                mine.copy_(saved)


class ReplayedStep:
    """Runs ``step(*batch)`` for full batches as one captured CUDA graph.

    Launching a step's few dozen kernels takes longer than running them on a
    GPU. The first call runs eagerly, so lazy set-up (cuBLAS handles,
    workspaces) stays out of the graph; later calls copy the batch into fixed
    buffers and replay. AdamW's learning rate is a constant of the captured
    kernel, so a new rate captures the step again. The graph runs the same
    kernels on the same values as the eager step.
    """

    def __init__(self, step: Callable[..., None]):
        self.step = step
        self.buffers: list[Tensor] = []
        self.replay: Callable[[], None] | None = None
        self.lr: float | None = None

    @staticmethod
    def wanted(device: torch.device, enabled: bool = True) -> bool:
        return enabled and device.type == "cuda"

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


class CoefficientNets:
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

    def __call__(self, inputs: Tensor | GatheredInputs, num_few: int) -> Tensor:
        """The input shared by all trials (from ``network_inputs``, or gathered) -> ``alphas [T, C_f, k]``."""
        if isinstance(inputs, GatheredInputs) or inputs.dim() == 3:  # gathered or packed: the op's own kernels
            tensor, ids = op_inputs(inputs)
            h = ops.input_product(tensor, self.first, num_few, ids)
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


@dataclass(frozen=True)
class GatheredInputs:
    """The networks' input ``[C_f, (k+1)d]`` as rows of a table: input row ``c`` is
    ``table[ids[c, 0]], ..., table[ids[c, k]]`` one after another. The training op lays
    each panel out as it reads it, so the input is never held whole: what is held is the
    distinct rows it reads, which for a block of few classes and their neighbours is a
    fraction of the input (a class-sharded rank's choice; see ``FewSplitStep``)."""

    table: Tensor  # [V, d]
    ids: Tensor    # [C_f, k+1], int64


def op_inputs(inputs: Tensor | GatheredInputs) -> tuple[Tensor, Tensor | None]:
    """The training op's ``inputs_t`` and ``input_ids`` for the networks' input."""
    return (inputs.table, inputs.ids) if isinstance(inputs, GatheredInputs) else (inputs, None)


def network_inputs(rows: Tensor, columns: int) -> Tensor:
    """The coefficient networks' fixed input ``rows [C_f, (k+1)d]`` in the layout the training op reads.

    On an x86 CPU with AVX2 (and a first layer of ``columns`` a multiple of 16)
    it is packed once into panels ``[P, D', panel]``: panel p, row r, slot j holds
    ``rows[panel * p + j, r]``, zero-padded, which the op's first layer streams
    without the per-step repacking a BLAS call does. Elsewhere: ``rows.T``.
    The panel width is the compiled op's (``ops.input_panel()``).
    """
    return laid_out(rows.shape[0], rows.shape[1], lambda begin, end: rows[begin:end], columns, rows.device,
                     rows.dtype)


def classifier_network_inputs(w: Tensor, few: Tensor, neighbors: Tensor, columns: int) -> Tensor:
    """:func:`network_inputs` of ``[w[few], w[neighbors]]`` (each few class's row and its
    neighbours'), built a block of classes at a time: never a second ``[C_f, (k+1)d]`` copy."""
    def rows(begin: int, end: int) -> Tensor:
        return torch.cat([w[few[begin:end]], w[neighbors[begin:end]].reshape(end - begin, -1)], dim=1)
    return laid_out(few.numel(), w.shape[1] * (neighbors.shape[1] + 1), rows, columns, w.device, w.dtype)


def _packable(columns: int, device: torch.device, dtype: torch.dtype) -> bool:
    return (ops.HAS_EXTENSION and device.type == "cpu" and dtype == torch.float32 and columns % 16 == 0
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def input_blocks(num_few: int, columns: int, device: torch.device, dtype: torch.dtype,
                 block: int = 4096) -> list[tuple[int, int]]:
    """The ``(begin, end)`` blocks of few classes in which :func:`laid_out` asks for rows
    (a multiple of the panel width where the input is packed)."""
    if _packable(columns, device, dtype):
        panel = ops.input_panel()
        block = max(panel, block // panel * panel)
    return [(begin, min(begin + block, num_few)) for begin in range(0, num_few, block)]


def laid_out(num_few: int, dims: int, rows: Callable[[int, int], Tensor], columns: int, device: torch.device,
             dtype: torch.dtype, block: int = 4096) -> Tensor:
    """The networks' input ``[C_f, dims]`` in the layout the training op reads, built from
    ``rows(begin, end)`` over :func:`input_blocks` (never a second whole copy)."""
    blocks = input_blocks(num_few, columns, device, dtype, block)
    if not _packable(columns, device, dtype):
        out = torch.empty(dims, num_few, dtype=dtype, device=device)
        for begin, end in blocks:
            out[:, begin:end] = rows(begin, end).T
        return out
    panel = ops.input_panel()
    panels, padded_dims = -(-num_few // panel), dims + (-dims % panel)
    out = torch.zeros(panels, padded_dims, panel, dtype=dtype, device=device)
    by_row = out.transpose(1, 2)  # [P, panel, D']: panel p, slot j is row panel * p + j
    for begin, end in blocks:
        part = rows(begin, end)
        whole = (end - begin) // panel * panel  # every block but the last is whole panels: no padded copy
        if whole:
            by_row[begin // panel:(begin + whole) // panel, :, :dims] = part[:whole].view(-1, panel, dims)
        if whole < end - begin:
            rest = F.pad(part[whole:], (0, 0, 0, -(end - begin - whole) % panel))
            by_row[(begin + whole) // panel, :, :dims] = rest
    return out


@torch.no_grad()
def base_logsumexp_(scratch: Tensor, bias: Tensor, few: Tensor, pred_scale: float,
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


class Diverged(ValueError):
    """Training produced a non-finite loss or non-finite coefficients."""


class TrainStep:
    """The networks of every trial, their few-class biases and optimiser, and one
    step on a batch of logits: losses and gradients in one op, then AdamW.

    The step works on a batch's raw logits ``[B, T, C]``, the base-class
    log-sum-exp ``[B, T]``, each row's few target position (-1 for a base
    target) and its base target's score; it never sees features.
    """

    def __init__(self, w: Tensor, b: Tensor, few: Tensor, neighbors: Tensor, hidden: Sequence[int], trials: int,
                 seed: int, lr: float, weight_decay: float, pred_scale: float, cuda_graphs: bool):
        device, (num_classes, dim) = w.device, w.shape
        k = neighbors.shape[1]
        self.num_classes, self.trials, self.k, self.pred_scale = num_classes, trials, k, pred_scale
        self.generators = [torch.Generator().manual_seed(seed + t) for t in range(trials)]
        self.nets = CoefficientNets([(k + 1) * dim, *hidden, k], self.generators, device)
        self.inputs = classifier_network_inputs(w, few, neighbors, self.nets.first.shape[1])
        self.num_few = few.numel()
        self.few_bias = b[few].repeat(trials, 1)  # [T, C_f]
        self.optimizer = FusedAdamW(self.nets.parameters() + [self.few_bias], lr=lr, weight_decay=weight_decay)
        # Column ids of every trial's few classes and neighbours in a [B, T*C] view of the batch logits.
        trial_offsets = (torch.arange(trials, device=device) * num_classes)[:, None]
        self.trial_targets = (trial_offsets + few[None]).reshape(-1)
        self.trial_neighbors = (trial_offsets[:, :, None] + neighbors[None]).reshape(-1, k)
        self.loss_sum = torch.zeros(trials, device=device)
        self.replayed = ReplayedStep(self._step) if ReplayedStep.wanted(device, cuda_graphs) else None

    def _step(self, raw: Tensor, base_lse: Tensor, target_few: Tensor, target_base_score: Tensor) -> None:
        losses, grads = self._grads(raw, base_lse, target_few, target_base_score)
        self.optimizer.step(grads)
        self.loss_sum.add_(losses * raw.shape[0])

    def _grads(self, raw: Tensor, base_lse: Tensor, target_few: Tensor,
               target_base_score: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The batch's mean loss per trial and its gradients."""
        rows = raw.shape[0]
        nets = self.nets
        inputs, input_ids = op_inputs(self.inputs)
        try:
            return ops.coefficient_grads(
                inputs, nets.first, nets.rest, nets.biases, self.few_bias,
                raw.view(rows, self.trials * self.num_classes), self.trial_targets, self.trial_neighbors, base_lse,
                target_few, target_base_score, self.pred_scale, input_ids)
        except RuntimeError as error:  # the op refuses coefficients that overflowed in an earlier step
            if "NaN or inf" in str(error):
                raise Diverged("the coefficients are no longer finite") from None
            raise

    def __call__(self, batch_size: int, batch) -> None:
        """One step on a :class:`~alphanet_ext.training.cache.Batch`; full batches
        (``batch_size`` rows) go through the CUDA graph where wanted."""
        parts = (batch.raw, batch.base_lse, batch.target_few, batch.target_base)
        if self.replayed is not None and batch.raw.shape[0] == batch_size:
            self.replayed(self.optimizer.lr, *parts)
        else:
            self._step(*parts)

    @torch.no_grad()
    def alphas(self) -> Tensor:
        """``[T, C_f, k]`` raw coefficients of every trial now."""
        return self.nets(self.inputs, self.num_few)

    def state(self) -> dict:
        """Everything that changes during training, for a checkpoint."""
        return {"parameters": self.nets.parameters() + [self.few_bias], "optimizer": self.optimizer.state(),
                "generators": [g.get_state() for g in self.generators]}

    def load_state(self, state: dict) -> None:
        for mine, saved in zip(self.nets.parameters() + [self.few_bias], state["parameters"]):
            mine.copy_(saved)
        self.optimizer.load_state(state["optimizer"])
        for generator, saved in zip(self.generators, state["generators"]):
            generator.set_state(saved)
