"""The fit over torch.distributed (gloo on the CPU, spawned processes, a file store):
row-sharded and class-sharded fits against the one-process fit, reruns, a rank that
dies, ranks given different inputs, and resume."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import Tensor

import alphanet_ext
from alphanet_ext import synthetic

from distributed_harness import launch

OPTIONS = dict(epochs=4, min_epochs=1, trials=2, progress=False, seed=3, batch_size=32)


def _problem(by_class: bool = False):
    p = synthetic.make_long_tailed(num_classes=40, dim=24, max_count=300, min_count=4, seed=11)
    if by_class:  # rows in class order, base classes first, as an ImageFolder of head-first class
        labels = torch.as_tensor(p.train_y)  # folders gives them: the first ranks hold no few row
        order = torch.argsort((torch.bincount(labels) < 20)[labels] * 1000 + labels, stable=True)
        p.train_x, p.train_y = p.train_x[order], p.train_y[order]
    return p


def _part(n: int, rank: int, world: int) -> slice:
    return slice(n * rank // world, n * (rank + 1) // world)


def _fit_rank(rank: int, world: int, mode: str, extra: dict, kill_at: int | None = None) -> dict:
    import torch.distributed as dist
    p = _problem(extra.get("by_class", False))
    rows, val_rows = _part(p.train_x.shape[0], rank, world), _part(p.val_x.shape[0], rank, world)
    weight = p.weight
    if extra.get("other_classifier_on") == rank:
        weight = weight.clone()
        weight[-1, 0] += 1.0
    options = {**OPTIONS, **{k: v for k, v in extra.items() if k not in ("other_classifier_on", "by_class",
                                                                          "hang_at")}}
    if extra.get("epochs_on_rank") is not None:
        options.pop("epochs_on_rank")
        if rank == 1:
            options["epochs"] = 5

    def callback(record):
        if kill_at is not None and rank == 1 and record["epoch"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and record["epoch"] == extra.get("hang_at"):  # alive, answering nothing, then gone
            time.sleep(30)
            os._exit(3)
    result = alphanet_ext.fit(p.train_x[rows], p.train_y[rows], weight, p.bias, p.val_x[val_rows], p.val_y[val_rows],
                              process_group=dist.group.WORLD, shard_classes=mode == "classes", callback=callback,
                              **options)
    return {"weight": result.weight, "bias": result.bias, "neighbors": result.neighbors, "history": result.history,
            "best_epochs": result.best_epochs, "config": result.config, "alphas": result.alphas}


@pytest.fixture(scope="module")
def one_process():
    p = _problem()
    return alphanet_ext.fit(p.train_x, p.train_y, p.weight, p.bias, p.val_x, p.val_y, **OPTIONS)


def _ok(results: list[dict]) -> list[dict]:
    for rank, result in enumerate(results):
        assert "ok" in result, f"rank {rank}: {result.get('trace', result)}"
    return [r["ok"] for r in results]


_RUNS: dict = {}


def _run(mode: str, world: int, tmp_path) -> list[dict]:
    if (mode, world) not in _RUNS:
        _RUNS[(mode, world)] = _ok(launch(world, _fit_rank, (mode, {}), tmp_path))
    return _RUNS[(mode, world)]


@pytest.mark.parametrize("mode", ["rows", "classes"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_fit_matches_one_process(mode, world, one_process, tmp_path):
    results = _run(mode, world, tmp_path)
    for rank, got in enumerate(results):
        assert torch.equal(got["neighbors"], one_process.neighbors), rank
        assert torch.allclose(got["weight"], one_process.weight, rtol=1e-5, atol=1e-5), \
            float((got["weight"] - one_process.weight).abs().max())
        assert torch.allclose(got["alphas"], one_process.alphas, rtol=1e-4, atol=1e-5)
        assert got["best_epochs"] == one_process.best_epochs
        for mine, theirs in zip(got["history"], one_process.history):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            assert [t["overall"] for t in mine["val_top1"]] == pytest.approx(
                [t["overall"] for t in theirs["val_top1"]], abs=1e-9)
        assert got["config"]["world_size"] == world and got["config"]["sharding"] == mode
    for got in results[1:]:  # every rank holds the same result, to the bit
        assert torch.equal(got["weight"], results[0]["weight"])


def _fit_rank_keeping_features(rank: int, world: int) -> dict:
    """A class-sharded fit told to keep a copy of its rows (what it does on a GPU with room):
    the class statistics fill it on their first pass and the later passes and the logits read it."""
    import torch.distributed as dist
    from alphanet_ext.config import FitConfig
    from alphanet_ext.fit import fit_with_config
    p = _problem()
    rows, val_rows = _part(p.train_x.shape[0], rank, world), _part(p.val_x.shape[0], rank, world)
    options = {key: value for key, value in OPTIONS.items() if key != "progress"}
    result = fit_with_config(p.train_x[rows].numpy(), p.train_y[rows], p.weight, p.bias, p.val_x[val_rows],
                             p.val_y[val_rows], FitConfig(**options), progress=False, keep_features=True,
                             process_group=dist.group.WORLD, shard_classes=True)
    return {"weight": result.weight}


def _fit_rank_few_classes(rank: int, world: int) -> dict:
    import torch.distributed as dist
    p = synthetic.make_long_tailed(num_classes=6, dim=8, max_count=300, min_count=4, seed=11)  # 2 few classes
    rows, val_rows = _part(p.train_x.shape[0], rank, world), _part(p.val_x.shape[0], rank, world)
    result = alphanet_ext.fit(p.train_x[rows], p.train_y[rows], p.weight, p.bias, p.val_x[val_rows],
                              p.val_y[val_rows], process_group=dist.group.WORLD, shard_classes=True, k=2,
                              **OPTIONS)
    return {"weight": result.weight, "loss": [r["loss"] for r in result.history]}


def test_class_sharded_fit_with_fewer_few_classes_than_ranks(tmp_path):
    """Three ranks, two few classes: one rank's block of the step is empty, and it still
    takes part in every exchange (the rows' log-sum-exp, the summed gradients)."""
    p = synthetic.make_long_tailed(num_classes=6, dim=8, max_count=300, min_count=4, seed=11)
    alone = alphanet_ext.fit(p.train_x, p.train_y, p.weight, p.bias, p.val_x, p.val_y, k=2, **OPTIONS)
    for got in _ok(launch(3, _fit_rank_few_classes, (), tmp_path)):
        assert torch.allclose(got["weight"], alone.weight, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(got["loss"], [r["loss"] for r in alone.history]):
            assert mine == pytest.approx(theirs, rel=1e-5)


def _input_rows_rank(rank: int, world: int) -> Tensor:
    """A rank's table of the networks' input rows, gathered 2 rows of every rank's a time:
    ranks reading 4, 0 and 7 rows (the last rank the most), from owners of 8/8/7 of 23 classes."""
    import torch.distributed as dist
    from alphanet_ext.training.sharded import FewSplitStep
    from alphanet_ext.training.sharding import Shard
    shard = Shard.of(dist.group.WORLD, "classes")
    w = torch.arange(23 * 3, dtype=torch.float32).view(23, 3)
    first, end = shard.class_range(23)
    columns = torch.tensor([0, 2, 3, 7, 8, 9, 12, 15, 16, 20, 22])
    all_wanted = [torch.tensor([2, 3, 8, 10]), torch.tensor([], dtype=torch.long), torch.tensor([0, 1, 4, 5, 6, 9, 10])]
    return FewSplitStep._input_rows(shard, w[first:end], columns, all_wanted, 23, block=2)


def test_the_input_rows_reach_the_rank_that_reads_them(tmp_path):
    columns = torch.tensor([0, 2, 3, 7, 8, 9, 12, 15, 16, 20, 22])
    expected = torch.arange(23 * 3, dtype=torch.float32).view(23, 3)[columns]
    got = _ok(launch(3, _input_rows_rank, (), tmp_path))
    assert torch.equal(got[0], expected[[2, 3, 8, 10]])
    assert got[1].shape == (0, 3)
    assert torch.equal(got[2], expected[[0, 1, 4, 5, 6, 9, 10]])


def test_class_sharded_fit_keeping_its_rows_matches_one_process(one_process, tmp_path):
    for got in _ok(launch(2, _fit_rank_keeping_features, (), tmp_path)):
        assert torch.allclose(got["weight"], one_process.weight, rtol=1e-5, atol=1e-5)


def _fit_rank_in_chunks(rank: int, world: int, budget: float | str | None) -> dict:
    """A class-sharded fit whose epochs run in many small chunks, each chunk's exchanges
    begun before the previous chunk's steps (``overlap``) or not; with ``budget=0`` the
    few-split rows' logits are computed every epoch, in the chunks, with the base rows'.
    ``"mixed"``: only rank 1 lacks the memory to keep them (every rank must then agree, and
    rank 0 alone says so).
    Over 3 ranks the 40 classes split 13/13/14 and each rank reads a different number of
    columns: the chunks and blocks of rows must still be the same on every rank."""
    import torch.distributed as dist
    from alphanet_ext.config import FitConfig
    from alphanet_ext.fit import fit_with_config
    from alphanet_ext.training.cache import CacheSizes
    p = _problem()
    rows, val_rows = _part(p.train_x.shape[0], rank, world), _part(p.val_x.shape[0], rank, world)
    options = {key: value for key, value in OPTIONS.items() if key != "progress"}
    results = {}
    for overlap in (True, False):
        sizes = CacheSizes(chunk_values=2 * 32 * 40 * world, overlap=overlap,  # about a batch a chunk
                           budget=(0 if rank == 1 else None) if budget == "mixed" else budget)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit_with_config(p.train_x[rows], p.train_y[rows], p.weight, p.bias, p.val_x[val_rows],
                                     p.val_y[val_rows], FitConfig(**options), progress=False, sizes=sizes,
                                     process_group=dist.group.WORLD, shard_classes=True)
        results[overlap] = {"weight": result.weight, "history": result.history,
                            "warned": sum("computing them every epoch" in str(w.message) for w in caught)}
    return results


@pytest.mark.parametrize("budget", [None, 0, "mixed"])
def test_class_sharded_fit_in_overlapped_chunks_matches_one_process(budget, one_process, tmp_path):
    """Exchanges begun a chunk ahead change when the ranks wait, not what they compute."""
    for rank, got in enumerate(_ok(launch(3, _fit_rank_in_chunks, (budget,), tmp_path))):
        # the logits computed every epoch are announced once, by rank 0, whichever rank lacked the memory
        assert got[True]["warned"] == got[False]["warned"] == int(budget is not None and rank == 0)
        assert torch.equal(got[True]["weight"], got[False]["weight"])
        assert got[True]["history"] == got[False]["history"]
        assert torch.allclose(got[True]["weight"], one_process.weight, rtol=1e-5, atol=1e-5)


def _fit_rank_on_hosts(rank: int, world: int, hosts: list[str]) -> list[bool]:
    """A class-sharded fit whose ranks report the given host names; returns whether its
    epochs began each chunk's exchanges ahead (the default follows the hosts)."""
    import socket
    import torch.distributed as dist
    from alphanet_ext.training import sharded
    socket.gethostname = lambda: hosts[rank]  # this spawned rank's own module: nothing else sees it
    seen = []
    epoch = sharded.ClassShardedCache.epoch

    def recording(self, *args):
        seen.append(self.overlap)
        return epoch(self, *args)
    sharded.ClassShardedCache.epoch = recording
    p = _problem()
    rows = _part(p.train_x.shape[0], rank, world)
    alphanet_ext.fit(p.train_x[rows], p.train_y[rows], p.weight, p.bias, process_group=dist.group.WORLD,
                     shard_classes=True, **{**OPTIONS, "epochs": 1})
    return seen


@pytest.mark.parametrize("hosts,overlap", [(["a", "a"], False), (["a", "b"], True)])
def test_overlap_is_on_by_default_when_the_ranks_span_hosts(hosts, overlap, tmp_path):
    for seen in _ok(launch(2, _fit_rank_on_hosts, (hosts,), tmp_path)):
        assert seen == [overlap]


@pytest.mark.parametrize("mode", ["rows", "classes"])
def test_ranks_that_hold_no_few_row(mode, tmp_path):
    """Rows in class order (an ImageFolder extraction's shards): rank 0 of 3 holds base rows only."""
    p = _problem(by_class=True)
    few = torch.bincount(torch.as_tensor(p.train_y), minlength=40) < 20
    assert not few[torch.as_tensor(p.train_y[_part(p.train_x.shape[0], 0, 3)])].any()
    one = alphanet_ext.fit(p.train_x, p.train_y, p.weight, p.bias, p.val_x, p.val_y, **OPTIONS)
    for got in _ok(launch(3, _fit_rank, (mode, {"by_class": True}), tmp_path)):
        assert torch.equal(got["neighbors"], one.neighbors)
        assert torch.allclose(got["weight"], one.weight, rtol=1e-5, atol=1e-5)
        assert got["best_epochs"] == one.best_epochs


@pytest.mark.parametrize("mode,world", [("rows", 3), ("classes", 2)])
def test_rerun_is_bit_identical(mode, world, tmp_path):
    first = _run(mode, world, tmp_path)
    again = _ok(launch(world, _fit_rank, (mode, {}), tmp_path))
    for a, b in zip(first, again):
        assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["bias"], b["bias"])
        assert a["history"] == b["history"]


@pytest.mark.parametrize("mode", ["rows", "classes"])
def test_a_dead_rank_stops_every_other_rank_naming_it(mode, tmp_path):
    results = launch(3, _fit_rank, (mode, {}, 2), tmp_path, timeout=20)
    assert results[1] == {"exitcode": -signal.SIGKILL}
    for rank in (0, 2):
        assert "RankFailure" in results[rank]["error"], results[rank]
        # rank 1 is named; a survivor still waiting on its own timeout may be named with it
        assert re.search(r"ranks? (\d, )*1(, \d)* stopped answering", results[rank]["error"]), results[rank]["error"]


def _fit_rank_killed_mid_epoch(rank: int, world: int) -> dict:
    """A class-sharded fit with each chunk's exchanges begun ahead; rank 1 dies after a few
    steps, with exchanges of the next chunks still in flight on every rank."""
    import torch.distributed as dist
    from alphanet_ext.config import FitConfig
    from alphanet_ext.fit import fit_with_config
    from alphanet_ext.training import sharded
    from alphanet_ext.training.cache import CacheSizes
    step = sharded.FewSplitStep.__call__
    done = []

    def dying(self, *args):
        done.append(1)
        if rank == 1 and len(done) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args)
    sharded.FewSplitStep.__call__ = dying
    p = _problem()
    rows = _part(p.train_x.shape[0], rank, world)
    options = {key: value for key, value in OPTIONS.items() if key != "progress"}
    fit_with_config(p.train_x[rows], p.train_y[rows], p.weight, p.bias, None, None, FitConfig(**options),
                    progress=False, sizes=CacheSizes(chunk_values=2 * 32 * 40 * world, overlap=True),
                    process_group=dist.group.WORLD, shard_classes=True)
    return {}


def test_a_rank_dying_with_exchanges_in_flight_is_named(tmp_path):
    results = launch(3, _fit_rank_killed_mid_epoch, (), tmp_path, timeout=20)
    assert results[1] == {"exitcode": -signal.SIGKILL}
    for rank in (0, 2):
        assert "RankFailure" in results[rank]["error"], results[rank]
        assert re.search(r"ranks? (\d, )*1(, \d)* stopped answering", results[rank]["error"]), results[rank]["error"]


def test_a_hung_rank_stops_every_other_rank_within_the_timeout(tmp_path):
    """Rank 1 stops answering without dying; the others give up after the 8 s timeout (and
    the grace they give each other to report), naming it."""
    started = time.monotonic()
    results = launch(3, _fit_rank, ("classes", {"hang_at": 2}), tmp_path, timeout=8)
    assert results[1] == {"exitcode": 3}
    for rank in (0, 2):
        assert "RankFailure" in results[rank]["error"], results[rank]
        assert re.search(r"ranks? (\d, )*1(, \d)* stopped answering", results[rank]["error"]), results[rank]["error"]
        assert "Timed out" in results[rank]["error"]  # the timeout ended it, not rank 1's exit 30 s in
    assert time.monotonic() - started < 60


def test_ranks_given_different_inputs_are_refused_alike(tmp_path):
    results = launch(3, _fit_rank, ("rows", {"other_classifier_on": 1}), tmp_path)
    messages = {r["error"] for r in results}
    assert len(messages) == 1, messages
    assert "classifier of rank 1 differs from rank 0's" in messages.pop()
    results = launch(2, _fit_rank, ("classes", {"epochs_on_rank": True}), tmp_path)
    assert all("the options of rank 1 differs" in r["error"] for r in results), results


def _resume_rank(rank: int, world: int, mode: str, path: str, kill_at: int | None) -> dict:
    import torch.distributed as dist
    p = _problem()
    rows, val_rows = _part(p.train_x.shape[0], rank, world), _part(p.val_x.shape[0], rank, world)

    def callback(record):
        if rank == 1 and record["epoch"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    result = alphanet_ext.fit(p.train_x[rows], p.train_y[rows], p.weight, p.bias, p.val_x[val_rows],
                              p.val_y[val_rows], process_group=dist.group.WORLD, shard_classes=mode == "classes",
                              checkpoint=path, callback=callback, **OPTIONS)
    return {"weight": result.weight, "history": result.history}


@pytest.mark.parametrize("mode", ["rows", "classes"])
def test_a_killed_sharded_fit_resumes_bit_identically(mode, tmp_path):
    whole = _ok(launch(2, _resume_rank, (mode, str(tmp_path / "whole.ckpt.pt"), None), tmp_path))
    path = str(tmp_path / "fit.ckpt.pt")
    killed = launch(2, _resume_rank, (mode, path, 2), tmp_path, timeout=20)
    assert killed[1] == {"exitcode": -signal.SIGKILL} and "RankFailure" in killed[0]["error"]
    assert len(torch.load(path, weights_only=True)["history"]) == 2
    resumed = _ok(launch(2, _resume_rank, (mode, path, None), tmp_path))
    for rank in range(2):
        assert torch.equal(resumed[rank]["weight"], whole[rank]["weight"])
        assert resumed[rank]["history"] == whole[rank]["history"]


def test_shard_classes_needs_a_process_group():
    p = _problem()
    with pytest.raises(ValueError, match="shard_classes=True needs a process_group"):
        alphanet_ext.fit(p.train_x, p.train_y, p.weight, p.bias, shard_classes=True, epochs=1, progress=False)


# --------------------------------------------------------------------------- the command under torchrun

def _torchrun(tmp_path, world: int, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "alphanet_ext", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("world,extra", [(2, []), (3, ["--shard-classes", "--report", "report"])])
def test_alphanet_fit_under_torchrun_matches_one_process(world, extra, synth_folder, tmp_path):
    from alphanet_ext import cli
    from alphanet_ext.io import load_classifier, read_metadata
    common = ["fit", "--train", str(synth_folder), "--classifier", str(synth_folder / "classifier.pt"),
              "--epochs", "3", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "one.pt")]) == 0
    done = _torchrun(tmp_path, world, *common, "--out", str(tmp_path / "many.pt"), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    one, many = load_classifier(str(tmp_path / "one.pt")), load_classifier(str(tmp_path / "many.pt"))
    assert torch.allclose(one[0], many[0], atol=1e-5) and torch.allclose(one[1], many[1], atol=1e-5)
    config = read_metadata(str(tmp_path / "many.pt"))["config"]
    assert config["world_size"] == world and config["sharding"] == ("classes" if extra else "rows")
    if extra:
        assert (tmp_path / "report" / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".alphanet-tmp")) == []


def test_a_torchrun_fit_on_crt_announces_the_retraining_once(synth_folder, tmp_path):
    """Every rank re-trains the same cRT base; only rank 0 says so at the terminal."""
    done = _torchrun(tmp_path, 2, "fit", "--train", str(synth_folder), "--classifier",
                     str(synth_folder / "classifier.pt"), "--epochs", "1", "--on", "crt", "--crt-epochs", "1",
                     "--out", str(tmp_path / "many.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("re-training the classifier (cRT") == 1, done.stderr[-3000:]


def test_shard_classes_without_torchrun_is_a_usage_error(synth_folder, tmp_path, capsys):
    from alphanet_ext import cli
    code = cli.main(["fit", "--train", str(synth_folder), "--classifier", str(synth_folder / "classifier.pt"),
                     "--out", str(tmp_path / "x.pt"), "--shard-classes", "--quiet"])
    assert code == 2 and "--shard-classes needs several processes" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
