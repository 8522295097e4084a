"""A fit spread over the processes of a ``torch.distributed`` group.

Every collective of a sharded fit goes through :class:`Shard`, which turns a
failed or timed-out collective into one :class:`RankFailure` naming the ranks
that stopped answering, and checks at the start that every rank was given the
same classifier and options (:meth:`Shard.check_agreement`).

Rows are held in rank order: rank ``r``'s rows are global rows
``offsets[r]:offsets[r + 1]``, the order a one-process fit on the concatenated
files sees.
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

MODES = ("rows", "classes")
_FAILED_KEY = "alphanet/failed/{}"


def _digest(text: str) -> int:
    """56 bits of ``text``'s SHA-256, to compare across ranks in one all-gathered int64 tensor."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _done() -> None:
    """The wait of a collective that had nothing to wait for (a one-rank group)."""


class RankFailure(RuntimeError):
    """A collective of a sharded fit failed: a rank died, hung past the timeout or left."""


@dataclass
class Shard:
    """This process's place in a sharded fit: its group, rank and world size, the
    sharding mode (``"rows"`` or ``"classes"``) and, once known, every rank's row
    offsets for the train and val rows."""

    group: Any
    mode: str = "rows"
    rank: int = 0
    world: int = 1
    store: Any = None
    grace: float = 10.0
    offsets: dict[str, list[int]] = field(default_factory=dict)
    collective_bytes: int = 0
    one_host: bool = True  # every rank on this host (loopback exchanges); known after check_agreement
    job: str = "sharded fit"  # how failures name what stopped, and what it leaves
    leaves: str = "no output is written"

    @classmethod
    def of(cls, group: Any, mode: str, store: Any = None, job: str = "sharded fit",
           leaves: str = "no output is written") -> "Shard":
        if mode not in MODES:
            raise ValueError(f"shard mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group: torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first (torchrun sets up its environment)")
        group = group if group is not None else dist.group.WORLD
        if store is None and group is dist.group.WORLD:
            try:  # the store torchrun or init_process_group made, to name a rank that stopped answering
                store = dist.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError, ValueError):
                store = None
        grace = 10.0
        try:  # wait as long as a collective would for the other survivors to report their own failure
            grace = min(60.0, max(grace, store.timeout.total_seconds()))
        except AttributeError:
            pass
        return cls(group, mode, dist.get_rank(group), dist.get_world_size(group), store, grace, job=job, leaves=leaves)

    # ----------------------------------------------------------------- collectives
    def _run(self, what: str, call, *tensors: Tensor) -> None:
        self.collective_bytes += sum(t.numel() * t.element_size() for t in tensors)
        try:
            call()
        except RankFailure:
            raise
        except Exception as error:  # gloo/NCCL raise RuntimeError subclasses, timeouts among them
            raise RankFailure(self._failure(what, error)) from None

    def _started(self, what: str, call, counted: list[Tensor], kept: list[Tensor]) -> Callable[[], None]:
        """Issues an asynchronous collective (``call`` returns its work) and returns the
        function that waits for it, failures named as :meth:`_run` names them. ``counted``
        are the tensors whose bytes it sends; ``kept`` live until it is done."""
        work = []
        self._run(what, lambda: work.append(call()), *counted)

        def wait() -> None:
            self._run(what, work[0].wait)  # no tensors: the bytes were counted when it was issued
            kept.clear()
        return wait

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM, what: str = "all_reduce") -> Tensor:
        if self.world > 1:
            self._run(what, lambda: dist.all_reduce(tensor, op=op, group=self.group), tensor)
        return tensor

    def reduce(self, tensor: Tensor, dst: int, what: str = "reduce") -> Tensor:
        """Sums ``tensor`` over ranks onto rank ``dst`` (other ranks' copies are left undefined)."""
        if self.world > 1:
            target = dist.get_global_rank(self.group, dst) if self.group is not dist.group.WORLD else dst
            self._run(what, lambda: dist.reduce(tensor, dst=target, group=self.group), tensor)
        return tensor

    def all_gather(self, tensor: Tensor, what: str = "all_gather") -> Tensor:
        """``[world, *tensor.shape]``: every rank's ``tensor``."""
        out, wait = self.all_gather_started(tensor, what)
        wait()
        return out

    def all_gather_object(self, value: Any, what: str = "all_gather_object") -> list[Any]:
        """Every rank's ``value`` (a small picklable summary, never a data file's contents)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        self._run(what, lambda: dist.all_gather_object(out, value, group=self.group))
        return out

    def all_gather_started(self, tensor: Tensor, what: str = "all_gather") -> tuple[Tensor, Callable[[], None]]:
        """:meth:`all_gather`, issued without waiting: ``(out, wait)``; ``out`` holds every
        rank's ``tensor`` once ``wait()`` has returned."""
        out = tensor.new_empty((self.world,) + tuple(tensor.shape))
        if self.world == 1:
            out[0] = tensor
            return out, _done
        source = tensor.contiguous()
        return out, self._started(what, lambda: dist.all_gather(list(out.unbind(0)), source, group=self.group,
                                                                 async_op=True), [out], [source, out])

    def all_to_all(self, out: Tensor, tensor: Tensor, out_splits: list[int], in_splits: list[int],
                   what: str = "all_to_all") -> Tensor:
        """Rank ``r`` sends the ``in_splits[q]`` rows of ``tensor`` after the first
        ``sum(in_splits[:q])`` to rank ``q``, and receives into ``out`` each rank's block in
        rank order (``out_splits[s]`` rows from rank ``s``)."""
        self.all_to_all_started(out, tensor, out_splits, in_splits, what)()
        return out

    def all_to_all_started(self, out: Tensor, tensor: Tensor, out_splits: list[int], in_splits: list[int],
                           what: str = "all_to_all") -> Callable[[], None]:
        """:meth:`all_to_all`, issued without waiting; ``out`` is filled once the returned
        function has been called (``tensor`` must live until then)."""
        if self.world == 1:
            out.copy_(tensor)
            return _done
        return self._started(what, lambda: dist.all_to_all_single(out, tensor, out_splits, in_splits,
                                                                  group=self.group, async_op=True), [tensor],
                             [tensor, out])

    def broadcast(self, tensor: Tensor, src: int = 0, what: str = "broadcast") -> Tensor:
        if self.world > 1:
            self._run(what, lambda: dist.broadcast(tensor, src=dist.get_global_rank(self.group, src)
                                                   if self.group is not dist.group.WORLD else src,
                                                   group=self.group), tensor)
        return tensor

    def barrier(self, what: str = "barrier") -> None:
        if self.world > 1:
            flag = torch.zeros(1)
            self._run(what, lambda: dist.all_reduce(flag, group=self.group), flag)

    def _failure(self, what: str, error: BaseException) -> str:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        silent = self._silent_ranks()
        if silent is None:
            who = "another rank died, hung past the timeout or left the group"
        elif silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering"
        else:
            who = "every rank saw the failure"
        return f"rank {self.rank}: the {self.job} stopped in {what}: {who} ({cause}); {self.leaves}"

    def _silent_ranks(self) -> list[int] | None:
        """The ranks that did not report a failure within ``grace`` seconds (the dead or hung
        ones), from the rendezvous store; None when there is no store or it is gone too."""
        if self.store is None:
            return None
        try:
            self.store.set(_FAILED_KEY.format(self.rank), "1")
            deadline = time.monotonic() + self.grace
            while True:
                silent = [r for r in range(self.world) if not self.store.check([_FAILED_KEY.format(r)])]
                if not silent or time.monotonic() > deadline:
                    return silent
                time.sleep(0.2)
        except Exception:  # the store's host may be the rank that died
            return None

    # ----------------------------------------------------------------- set-up
    def check_agreement(self, facts: dict[str, Any], local: dict[str, int]) -> None:
        """Refuses, on every rank with the same message, inputs that disagree across ranks:
        ``facts`` must be equal everywhere (options, classifier digest, class count...);
        ``local`` are per-rank counts (train and val rows), gathered into ``offsets``."""
        names = sorted(facts)
        digests = [_digest(json.dumps(facts[n], sort_keys=True, default=str)) for n in names]
        counts = [int(local[n]) for n in sorted(local)]
        host = _digest(socket.gethostname())
        table = self.all_gather(torch.tensor(digests + counts + [host], dtype=torch.long),
                                "the start-up check").tolist()
        self.one_host = len({row[-1] for row in table}) == 1
        for column, name in enumerate(names):
            differing = [r for r in range(self.world) if table[r][column] != table[0][column]]
            if differing:
                ranks = ", ".join(map(str, differing))
                raise ValueError(f"the ranks of a {self.job} disagree: the {name} of rank{'s' if len(differing) > 1 else ''}"
                                 f" {ranks} differs from rank 0's; give every rank the same classifier and options")
        for column, name in enumerate(sorted(local)):
            per_rank = [row[len(names) + column] for row in table]
            offsets = [0]
            for count in per_rank:
                offsets.append(offsets[-1] + count)
            self.offsets[name] = offsets

    def rows_of(self, name: str) -> tuple[int, int]:
        """This rank's global row range of ``name`` (``"train"`` or ``"val"``)."""
        offsets = self.offsets[name]
        return offsets[self.rank], offsets[self.rank + 1]

    def gather_rows_of(self, local: Tensor, name: str, what: str) -> Tensor:
        """Every rank's ``local`` rows (``[n_r, ...]``), concatenated in rank order on every rank."""
        offsets = self.offsets[name]
        largest = max(b - a for a, b in zip(offsets[:-1], offsets[1:]))
        padded = local.new_zeros((largest,) + tuple(local.shape[1:]))
        padded[:local.shape[0]] = local
        gathered = self.all_gather(padded, what)
        return torch.cat([gathered[r, :offsets[r + 1] - offsets[r]] for r in range(self.world)])

    def class_range(self, num_classes: int, rank: int | None = None) -> tuple[int, int]:
        """Rank ``rank``'s contiguous slice of the classes (class-sharded fits)."""
        rank = self.rank if rank is None else rank
        return num_classes * rank // self.world, num_classes * (rank + 1) // self.world

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "sharding": self.mode}
