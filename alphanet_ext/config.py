"""Every option of a fit, validated once.

:class:`FitConfig` is the single description of a fit: :func:`alphanet_ext.fit`
builds one from its keyword arguments, the ``alphanet`` command takes its flags'
defaults, ranges and help from :data:`OPTIONS`, and the saved metadata is
:meth:`FitConfig.to_dict`. A value out of range is refused here, with a
``ValueError`` (or ``TypeError``) naming the option, before any work starts.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral, Real
from typing import Any

METRICS = ("euclidean", "cosine", "random")

# Upper limits are far beyond any useful value and well below what would run for
# days or overflow: the paper sweeps rho over 0.1-3 and uses pred_scale up to 100.
MAX_RHO = 100.0
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Option:
    """The range and help of one numeric option (shared by the API and the CLI)."""
    kind: type
    low: float
    high: float
    low_open: bool = False
    help: str = ""

    def describe(self) -> str:
        low = "(" if self.low_open else "["
        show = (lambda v: str(int(v))) if self.kind is int else (lambda v: f"{v:g}")
        return f"in {low}{show(self.low)}, {show(self.high)}]"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and value <= self.high


OPTIONS: dict[str, Option] = {
    "k": Option(int, 1, 256, help="neighbours per few class"),
    "rho": Option(float, 0.0, MAX_RHO, help="base samples drawn per few sample each epoch"),
    "epochs": Option(int, 1, 10_000, help="training epochs (default 25 with a val set, else 10)"),
    "min_epochs": Option(int, 1, 10_000, help="with a val set: the epoch kept is the best on val from this one on "
                         "(default 5, or --epochs if fewer)"),
    "batch_size": Option(int, 1, 1 << 20, help="training samples per step, few and drawn base together"),
    "lr": Option(float, 0.0, 10.0, low_open=True, help="AdamW learning rate"),
    "weight_decay": Option(float, 0.0, 100.0, help="AdamW weight decay"),
    "lr_step": Option(int, 1, 10_000, help="epochs between learning-rate decays"),
    "lr_gamma": Option(float, 0.0, 1.0, low_open=True, help="learning-rate decay factor"),
    "few_threshold": Option(int, 1, 2**31 - 1, help="few split: fewer train samples than this"),
    "many_threshold": Option(int, 0, 2**31 - 1, help="many split: more train samples than this"),
    "pred_scale": Option(float, 0.0, 10_000.0, low_open=True, help="multiplies every score while training"),
    "trials": Option(int, 1, 64, help="independently seeded models, trained together"),
    "seed": Option(int, 0, MAX_SEED - 64, help="trial t uses seed + t"),
}
HIDDEN_WIDTH = Option(int, 1, 65_536)
MAX_HIDDEN_LAYERS = 16


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)  # numpy integers become Python ones


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def checked(name: str, value: Any) -> int | float:
    """``value`` of option ``name`` as its type, or a ValueError naming the option and its range."""
    option = OPTIONS[name]
    value = _integer(name, value) if option.kind is int else _number(name, value)
    if not option.contains(value):
        raise ValueError(f"{name} must be {option.describe()}, got {value!r}")
    return value


@dataclass(frozen=True)
class FitConfig:
    """The options of one fit (see :func:`alphanet_ext.fit` for their meaning).

    ``epochs=None`` means 25 with a val set and 10 without; ``min_epochs=None``
    means 5, or ``epochs`` when fewer. :meth:`resolved` fills both in.
    ``cuda_graphs`` replays full training batches as a CUDA graph on a GPU
    (same values as the eager step; off only to debug or profile).
    """
    k: int = 5
    rho: float = 1.0
    metric: str = "euclidean"
    epochs: int | None = None
    min_epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_step: int = 10
    lr_gamma: float = 0.1
    hidden: tuple[int, ...] = (32, 32, 32)
    few_threshold: int = 20
    many_threshold: int = 100
    pred_scale: float = 1.0
    trials: int = 1
    seed: int = 0
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name in OPTIONS:
            value = getattr(self, name)
            if value is None and name in ("epochs", "min_epochs"):
                continue
            object.__setattr__(self, name, checked(name, value))
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        hidden = self.hidden
        widths = tuple(hidden) if isinstance(hidden, Iterable) and not isinstance(hidden, (str, bytes)) else None
        if widths is None or not all(isinstance(w, Integral) and not isinstance(w, bool) for w in widths):
            raise TypeError(f"hidden must be a sequence of layer widths such as (32, 32, 32), got {hidden!r}")
        if len(widths) > MAX_HIDDEN_LAYERS or not all(HIDDEN_WIDTH.contains(int(w)) for w in widths):
            raise ValueError(f"hidden must be at most {MAX_HIDDEN_LAYERS} layer widths, each "
                             f"{HIDDEN_WIDTH.describe()}, got {tuple(widths)}")
        object.__setattr__(self, "hidden", tuple(int(w) for w in widths))
        if self.epochs is not None and self.min_epochs is not None and self.min_epochs > self.epochs:
            raise ValueError(f"min_epochs ({self.min_epochs}) is above epochs ({self.epochs}): no epoch could be "
                             "chosen on val")
        if self.few_threshold > self.many_threshold + 1:
            raise ValueError(f"few_threshold ({self.few_threshold}) cannot exceed many_threshold + 1 "
                             f"({self.many_threshold + 1}): the medium split would overlap the others")
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")

    def resolved(self, has_val: bool) -> "FitConfig":
        """The config with ``epochs`` and ``min_epochs`` defaults filled in."""
        epochs = (25 if has_val else 10) if self.epochs is None else self.epochs
        min_epochs = min(5, epochs) if self.min_epochs is None else self.min_epochs
        return replace(self, epochs=epochs, min_epochs=min_epochs)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready), as saved in results and checkpoints."""
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(item.name for item in fields(cls))


DEFAULTS = FitConfig()
__all__ = ["FitConfig", "OPTIONS", "METRICS", "MAX_RHO", "checked", "DEFAULTS"]
