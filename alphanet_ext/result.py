"""What a fit returns, and saving and loading it."""
from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from torch import Tensor

from . import __version__
from .classifier import apply_correction
from .io import load_tensors_only, save_torch, write_atomic
from .metrics import SPLIT_NAMES, mean_std

__all__ = ["FitResult", "load"]


@dataclass
class FitResult:
    """What :func:`alphanet_ext.fit` returns. Tensors are on the CPU."""

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
        return apply_correction(weight, bias, self.splits["few"], self.neighbors, self.trial_alphas[trial],
                                self.trial_few_bias[trial])

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean and standard deviation over trials of the val top-1 per split."""
        if not self.trial_val_top1:
            return {}
        return {name: mean_std([trial[name] for trial in self.trial_val_top1]) for name in SPLIT_NAMES + ("overall",)}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the result atomically (a temporary file renamed into place)."""
        data = asdict(self)
        write_atomic(os.fspath(path), lambda temporary: save_torch(data, temporary))


def load(path: str | os.PathLike) -> FitResult:
    """Reads a result written by :meth:`FitResult.save`. Only tensors and plain
    containers are read (``weights_only``), so a file cannot run code."""
    path = os.fspath(path)
    data = load_tensors_only(path, "not a result saved by FitResult.save")
    names = {item.name for item in fields(FitResult)}
    required = {item.name for item in fields(FitResult) if item.default is MISSING and item.default_factory is MISSING}
    if not isinstance(data, dict) or not required <= data.keys() or not data.keys() <= names:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not a result saved by FitResult.save (found {found})")
    return FitResult(**data)
