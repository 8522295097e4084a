"""The rows of one training epoch."""
from __future__ import annotations

import torch
from torch import Tensor

# Each base row is drawn about rho * F / N_base times an epoch; beyond this many
# the epoch only repeats the same rows, at a cost linear in rho.
MAX_DRAWS_PER_BASE_ROW = 100


def check_rho(rho: float, few_rows: int, base_rows: int) -> None:
    """Refuses a rho whose epochs would draw every base row more than
    ``MAX_DRAWS_PER_BASE_ROW`` times: the work grows with rho, and nothing new is drawn."""
    drawn = int(round(rho * few_rows))
    if drawn > MAX_DRAWS_PER_BASE_ROW * max(base_rows, 1):
        raise ValueError(f"rho={rho:g} would draw {drawn:,} base samples an epoch from {base_rows:,} base "
                         f"training rows ({drawn / max(base_rows, 1):.0f} draws of each): the work grows "
                         f"with rho and nothing is learned past {MAX_DRAWS_PER_BASE_ROW}; use a smaller rho")


class EpochSampler:
    """Every few-split row once, plus ``round(rho * F)`` base rows drawn with
    replacement, each a uniform base class then a uniform member of it (so every
    base class is equally likely whatever its size), shuffled.

    Entries are train row ids, with few rows encoded as ``-(position + 1)`` in
    ``few_rows`` so their kept logits can be found.
    """

    def __init__(self, labels: Tensor, counts: Tensor, is_few_class: Tensor, base: Tensor, rho: float):
        device = labels.device
        self.few_rows = torch.nonzero(is_few_class[labels]).flatten()
        self.base = base
        self.counts = counts.to(device)
        self.base_order = torch.argsort(labels, stable=True)
        self.class_offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=device)
        self.class_offsets[1:] = self.counts.cumsum(0)
        self.num_few = self.few_rows.numel()
        self.num_base = int(round(rho * self.num_few))
        check_rho(rho, self.num_few, int(self.counts[base].sum()))

    @property
    def epoch_size(self) -> int:
        return self.num_few + self.num_base

    def draw(self, generator: torch.Generator) -> Tensor:
        """One epoch's entries, shuffled with ``generator`` (a CPU generator)."""
        device = self.base.device
        picked = self.base[torch.randint(self.base.numel(), (self.num_base,), generator=generator).to(device)]
        within = (torch.rand(self.num_base, generator=generator).to(device) * self.counts[picked]).long()
        base_rows = self.base_order[self.class_offsets[picked] + within]
        entries = torch.cat([-(torch.arange(self.num_few, device=device) + 1), base_rows])
        return entries[torch.randperm(self.epoch_size, generator=generator).to(device)]
