"""Linear classifiers: ensembles of experts as one classifier, and a fitted
correction applied to a classifier."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import ops
from .data import ArrayLike, as_tensor

__all__ = ["combine_experts", "apply_correction"]


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


def apply_correction(weight: ArrayLike, bias: ArrayLike | None, few: Tensor, neighbors: Tensor, alphas: Tensor,
                     few_bias: Tensor) -> tuple[Tensor, Tensor]:
    """The input classifier (on the CPU) with its few rows corrected: base rows keep
    the caller's exact values and dtype."""
    w = as_tensor(weight, "weight").cpu().clone()
    b = torch.zeros(w.shape[0]) if bias is None else as_tensor(bias, "bias").cpu().clone()
    few, neighbors = few.cpu(), neighbors.cpu()
    w[few] = ops.alpha_combine(w, few, neighbors, alphas.detach().cpu())
    b[few] = few_bias.detach().cpu().to(b.dtype)
    return w, b
