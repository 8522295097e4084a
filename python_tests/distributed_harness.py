"""Runs a function on N gloo processes (torch.multiprocessing, a file store) and
collects what each returns; a hung or dead rank cannot hang the test run."""
from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store_path: str, out_dir: str, timeout: float, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException as error:  # reported to the parent, which asserts on it
        torch.save({"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def launch(world: int, fn, args: tuple, tmp_path, timeout: float = 60.0, join_timeout: float = 240.0) -> list[dict]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns, per rank, ``{"ok": value}``,
    ``{"error": message}`` or ``{"exitcode": code}`` for a process that died."""
    out_dir = os.path.join(str(tmp_path), f"ranks-{world}-{os.urandom(4).hex()}")
    os.makedirs(out_dir)
    store = os.path.join(out_dir, "store")
    context = mp.start_processes(_worker, args=(world, store, out_dir, timeout, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = join_timeout
    import time
    started = time.monotonic()
    while not all(not p.is_alive() for p in context.processes):
        if time.monotonic() - started > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"ranks still running after {deadline}s")
        time.sleep(0.1)
    results = []
    for rank, process in enumerate(context.processes):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path)
                       else {"exitcode": process.exitcode})
    return results
