"""Per-rank feature shards (what ``alphanet extract`` writes under torchrun) read as one
dataset: the ``RowShards`` array against the concatenated array, fits on shards against
fits on the one file, each rank of a torchrun fit reading only its own shard, and every
way a shard set can be broken, named before anything is fitted."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import alphanet_ext
from alphanet_ext import cli, data
from alphanet_ext.data import RowShards
from alphanet_ext.io import InputError, load_features, shard_suffix


def _shard_folder(source, out, world: int, splits=("train", "test"), records: bool = True):
    """``source`` (alphanet synth's layout) rewritten as ``world`` shards per split, with the
    progress records a torchrun extraction leaves (items split in whole batches of 16)."""
    out.mkdir()
    shutil.copy(source / "classifier.pt", out / "classifier.pt")
    for split in ("train", "test"):
        x, y = np.load(source / f"{split}_x.npy"), np.load(source / f"{split}_y.npy")
        if split not in splits:
            np.save(out / f"{split}_x.npy", x)
            np.save(out / f"{split}_y.npy", y)
            continue
        batches = -(-len(y) // 16)
        for rank in range(world):
            begin, end = (min(16 * (batches * r // world), len(y)) for r in (rank, rank + 1))
            suffix = shard_suffix(rank, world)
            np.save(out / f"{split}_x{suffix}.npy", x[begin:end])
            np.save(out / f"{split}_y{suffix}.npy", y[begin:end])
            if records:
                (out / f"{split}{suffix}.progress.json").write_text(json.dumps(
                    {"finished": True, "split_fingerprint": "f" * 32, "first_row": begin, "end_row": end,
                     "split_rows": len(y), "rows": end - begin, "done": end - begin, "bad": []}))
    return out


@pytest.fixture
def synth(synth_folder):
    return synth_folder


# --------------------------------------------------------------------------- the array

@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [7, 0, 13, 1, 9]  # an empty shard and a one-row shard among them
    parts = []
    for index, size in enumerate(sizes):
        np.save(tmp_path / f"p{index}.npy", rng.normal(size=(size, 5)).astype(np.float16))
        parts.append(np.load(tmp_path / f"p{index}.npy", mmap_mode="r"))
    return RowShards(parts), np.concatenate([np.asarray(p) for p in parts])


def test_row_shards_read_as_the_concatenated_array(arrays):
    shards, whole = arrays
    assert shards.shape == whole.shape and shards.dtype == whole.dtype and len(shards) == 30
    for begin in range(0, 31):
        for end in (begin, begin + 1, begin + 6, 30):
            piece = shards[begin:end]
            assert np.array_equal(np.asarray(piece), whole[begin:end]), (begin, end)
    assert isinstance(shards[21:29], np.memmap)  # inside one shard: that shard's own view
    rows = np.array([29, 0, 7, 7, 21, 6, 20, 3])  # any order, repeats, across every shard
    assert np.array_equal(shards[rows], whole[rows]) and np.array_equal(shards[-1], whole[-1])
    assert np.array_equal(shards[::3], whole[::3])
    with pytest.raises(IndexError, match="row 30 is outside the 30 rows"):
        shards[[1, 30]]


def test_the_readers_of_data_treat_row_shards_as_the_array(arrays):
    shards, whole = arrays
    cpu = torch.device("cpu")
    chunks = list(data.iter_row_chunks(shards, "x", cpu, chunk_rows=8))
    assert [begin for begin, _ in chunks] == [0, 8, 16, 24]
    assert torch.equal(torch.cat([c for _, c in chunks]), torch.from_numpy(whole))
    rows = torch.tensor([28, 2, 15, 15, 7])
    assert torch.equal(data.gather_rows(shards, rows, "x", cpu), torch.from_numpy(whole[rows.numpy()]))
    assert data.as_tensor(shards[:0], "x").shape == (0, 5) and data.as_tensor(shards[:0], "x").dtype == torch.float16
    labels = torch.arange(30) % 4
    sums = data.streamed_class_sums(shards, labels, 4, "x", cpu)
    assert torch.allclose(sums.sums, torch.zeros(4, 5).index_add_(0, labels, torch.from_numpy(whole).float()))


# --------------------------------------------------------------------------- fits on shards

def test_a_fit_on_shards_is_the_fit_on_the_one_file(synth, tmp_path):
    sharded = _shard_folder(synth, tmp_path / "shards", 3)
    train = load_features(str(sharded), "train")
    assert isinstance(train.x, RowShards) and len(train.x.parts) == 3 and "train_x-*-of-00003.npy" in train.source
    common = ["fit", "--classifier", str(synth / "classifier.pt"), "--epochs", "3", "--quiet"]
    assert cli.main(common + ["--train", str(synth), "--out", str(tmp_path / "one.pt")]) == 0
    assert cli.main(common + ["--train", str(sharded), "--out", str(tmp_path / "shards.pt"),
                              "--report", str(tmp_path / "report")]) == 0
    one, shards = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "shards.pt"))
    assert torch.equal(one["weight"], shards["weight"]) and torch.equal(one["bias"], shards["bias"])
    assert cli.main(["eval", "--classifier", str(tmp_path / "shards.pt"), "--data", str(sharded), "--quiet"]) == 0


def test_each_rank_of_a_torchrun_fit_reads_only_its_own_shard(synth, tmp_path):
    sharded = _shard_folder(synth, tmp_path / "shards", 3)
    train = load_features(str(sharded), "train")
    for rank in range(3):
        mine = cli._rows_of_rank(train, rank, 3)
        assert isinstance(mine.x, np.memmap) and mine.x.filename.endswith(f"train_x{shard_suffix(rank, 3)}.npy")
    across = cli._rows_of_rank(train, 0, 2)  # another world size: a range across shards, still no copy
    assert isinstance(across.x, RowShards) and np.array_equal(np.asarray(across.x), np.asarray(train.x)[:len(across.y)])


def test_the_fit_api_takes_row_shards(synth, tmp_path):
    sharded = _shard_folder(synth, tmp_path / "shards", 2, records=False)
    weight = torch.load(synth / "classifier.pt", weights_only=True)
    train, val = load_features(str(sharded), "train"), load_features(str(sharded), "test")
    options = dict(epochs=2, progress=False, seed=1)
    a = alphanet_ext.fit(train.x, train.y, weight["weight"], weight["bias"], val.x, val.y, **options)
    b = alphanet_ext.fit(np.asarray(train.x), train.y, weight["weight"], weight["bias"], np.asarray(val.x), val.y,
                         **options)
    assert torch.equal(a.weight, b.weight)


# --------------------------------------------------------------------------- broken shard sets

def _broken(synth, tmp_path, damage):
    folder = _shard_folder(synth, tmp_path / "shards", 3, splits=("train",))
    damage(folder)
    return folder


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "train_x-00001-of-00003.npy").unlink(), "train shard 1 of 3 is missing (train_x-00001-of-00003.npy)"),
    (lambda f: shutil.copy(f / "train_x-00000-of-00003.npy", f / "train_x-00000-of-00002.npy"),
     "holds train shards of 2 extractions (world sizes 2, 3)"),
    (lambda f: shutil.copy(f / "test_x.npy", f / "train_x.npy"), "holds both train_x.npy and 3 shard file(s)"),
    (lambda f: (f / "train_y-00002-of-00003.npy").unlink(), "labels file"),
    (lambda f: np.save(f / "train_x-00002-of-00003.npy",
                       np.zeros((len(np.load(f / "train_y-00002-of-00003.npy")), 7), np.float32)), "rows of shape (7,)"),
    (lambda f: _edit(f, 1, finished=False, done=3), "the extraction of train-00001-of-00003 did not finish (3 of"),
    (lambda f: _edit(f, 2, split_fingerprint="e" * 32), "comes from another extraction than shard 0"),
    (lambda f: _edit(f, 1, first_row=_record(f, 1)["first_row"] + 16), "a gap or an overlap"),
    (lambda f: _edit(f, 2, end_row=_record(f, 2)["end_row"] - 16), "but its extraction recorded"),
    (lambda f: _edit(f, 0, split_rows=10 ** 6), "the train shards cover"),
    (lambda f: (f / "train-00001-of-00003.progress.json").unlink(), "missing, while other shards of train have one"),
    (lambda f: (f / "train-00001-of-00003.progress.json").write_text("{not json"), "cannot read the extraction's"),
    (lambda f: _edit(f, 2, bad=7), "not an extraction progress record (a field of the wrong type)"),
    (lambda f: _edit(f, 1, first_row="16"), "not an extraction progress record (a field of the wrong type)"),
])
def test_a_broken_shard_set_is_named_before_any_fit(synth, tmp_path, capsys, damage, message):
    folder = _broken(synth, tmp_path, damage)
    with pytest.raises(InputError, match=None) as raised:
        load_features(str(folder), "train")
    assert message in str(raised.value)
    code = cli.main(["fit", "--train", str(folder), "--classifier", str(folder / "classifier.pt"), "--out",
                     str(tmp_path / "out.pt"), "--quiet"])
    assert code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_an_unfinished_one_process_extraction_is_refused(synth, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(synth, folder)
    (folder / "train.progress.json").write_text(json.dumps({"finished": False, "done": 4096, "rows": 9000}))
    with pytest.raises(InputError, match="the extraction of train did not finish \\(4096 of 9000 rows\\)"):
        load_features(str(folder), "train")


def _record(folder, rank):
    return json.loads((folder / f"train{shard_suffix(rank, 3)}.progress.json").read_text())


def _edit(folder, rank, **changes):
    (folder / f"train{shard_suffix(rank, 3)}.progress.json").write_text(json.dumps({**_record(folder, rank),
                                                                                   **changes}))


def test_a_torchrun_fit_on_shards_with_an_empty_one(synth, tmp_path):
    """3 ranks on 3 train shards and 3 val shards, rank 0's val shard empty (a split of
    fewer batches than ranks): the one-process fit on the same folder, within float tolerance."""
    import os
    import subprocess
    import sys
    folder = _shard_folder(synth, tmp_path / "shards", 3, splits=("train",))
    x, y = np.load(synth / "test_x.npy"), np.load(synth / "test_y.npy")
    for rank, (begin, end) in enumerate([(0, 0), (0, 200), (200, len(y))]):
        np.save(folder / f"val_x{shard_suffix(rank, 3)}.npy", x[begin:end])
        np.save(folder / f"val_y{shard_suffix(rank, 3)}.npy", y[begin:end])
    common = ["fit", "--train", str(folder), "--classifier", str(folder / "classifier.pt"), "--epochs", "3",
              "--rho", "1", "--quiet", "--timeout", "120"]
    assert cli.main(common + ["--out", str(tmp_path / "one.pt")]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                           "-m", "alphanet_ext", *common, "--out", str(tmp_path / "ranks.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one, ranks = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "ranks.pt"))
    torch.testing.assert_close(ranks["weight"], one["weight"], rtol=1e-5, atol=1e-5)
