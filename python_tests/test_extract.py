"""alphanet extract: from a checkpoint and images to the classifier's input features,
then fit and apply: the whole journey on generated images and a small random network.

Needs torchvision and pillow. Registry torchvision is built against the CUDA torch
build, so `make extract-test` runs this file in the CUDA venv (on the CPU)."""
import json
import random

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="alphanet extract needs torchvision (make extract-test)")
Image = pytest.importorskip("PIL.Image")

from alphanet_ext import cli, extract  # noqa: E402

COUNTS = [60, 40, 25, 12, 8, 5]  # long-tailed: three base classes, three few ones


def _image(path, generator, label):
    size = generator.randint(36, 64), generator.randint(36, 64)
    base = np.array([(label * 40) % 256, (label * 90) % 256, (label * 150) % 256], dtype=np.float32)
    noise = np.random.default_rng(generator.randint(0, 2**31)).normal(0, 40, (size[1], size[0], 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An ImageFolder of PNG and JPEG files, and a list file of a val split."""
    root = tmp_path_factory.mktemp("images")
    generator = random.Random(0)
    for label, count in enumerate(COUNTS):
        folder = root / "train" / f"class_{label:02d}"
        folder.mkdir(parents=True)
        for index in range(count):
            _image(folder / f"{index}.{'png' if index % 2 else 'jpg'}", generator, label)
    (root / "val").mkdir()
    lines = []
    for label in range(len(COUNTS)):
        for index in range(4):
            _image(root / "val" / f"{label}_{index}.png", generator, label)
            lines.append(f"val/{label}_{index}.png {label}")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root


def _checkpoint(path, shape="training"):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(COUNTS))
    state = model.state_dict()
    if shape == "training":
        torch.save({"epoch": 30, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc": 0.5}, path)
    else:
        torch.save(state, path)
    return model.eval()


def _extract(images, out, checkpoint, *extra):
    return cli.main(["extract", "--model", "torchvision:resnet18", "--checkpoint", str(checkpoint), "--data",
                     f"train={images / 'train'}", f"val={images / 'val.txt'}", "--out", str(out), "--resize", "36",
                     "--crop", "32", "--dtype", "float32", "--workers", "0", "--batch-size", "16", "--device",
                     "cpu", "--quiet", *extra])


def _transformed(paths):
    transform = extract.eval_transform(36, 32, extract.IMAGENET_MEAN, extract.IMAGENET_STD)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("shape", ["training", "state_dict"])
def test_features_are_what_the_classifier_sees(images, tmp_path, shape):
    model = _checkpoint(tmp_path / "model.pt", shape)
    assert _extract(images, tmp_path / "out", tmp_path / "model.pt") == 0
    x = np.load(tmp_path / "out" / "train_x.npy")
    y = np.load(tmp_path / "out" / "train_y.npy")
    assert x.shape == (sum(COUNTS), 512) and np.bincount(y).tolist() == COUNTS
    items = extract.read_image_folder(str(images / "train"))
    rows = list(range(0, len(items), 17))
    with torch.no_grad():
        logits = model(_transformed([items[r][0] for r in rows]))
    classifier = torch.load(tmp_path / "out" / "classifier.pt", weights_only=True)
    ours = torch.from_numpy(x[rows]) @ classifier["weight"].T + classifier["bias"]
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    summary = json.loads((tmp_path / "out" / "extract.json").read_text())
    assert summary["classifier_layer"] == "fc" and summary["splits"]["val"]["rows"] == 4 * len(COUNTS)
    assert np.load(tmp_path / "out" / "val_y.npy").tolist() == [label for label in range(6) for _ in range(4)]


def test_extract_fit_apply(images, tmp_path):
    """The whole journey: extract -> fit (with a report) -> apply, loaded back into the network."""
    _checkpoint(tmp_path / "model.pt")
    assert _extract(images, tmp_path / "features", tmp_path / "model.pt") == 0
    assert cli.main(["fit", "--train", str(tmp_path / "features"), "--classifier",
                     str(tmp_path / "features" / "classifier.pt"), "--out", str(tmp_path / "corrected.pt"), "--k", "2",
                     "--epochs", "3", "--report", str(tmp_path / "report"), "--quiet"]) == 0
    assert cli.main(["apply", "--checkpoint", str(tmp_path / "model.pt"), "--corrected",
                     str(tmp_path / "corrected.pt"), "--out", str(tmp_path / "model_corrected.pt"), "--quiet"]) == 0
    saved = torch.load(tmp_path / "model_corrected.pt", weights_only=True)
    network = torchvision.models.resnet18(num_classes=len(COUNTS))
    network.load_state_dict({k[len("module."):]: v for k, v in saved["state_dict"].items()})
    corrected = torch.load(tmp_path / "corrected.pt", weights_only=True)
    assert torch.equal(network.fc.weight, corrected["weight"]) and saved["epoch"] == 30
    assert (tmp_path / "report" / "report.md").exists()


def test_a_killed_extraction_resumes_to_the_same_bits(images, tmp_path, monkeypatch):
    _checkpoint(tmp_path / "model.pt")
    assert _extract(images, tmp_path / "whole", tmp_path / "model.pt") == 0
    monkeypatch.setattr(extract, "ROWS_PER_CHUNK", 32)
    calls = {"n": 0}
    capture = extract.FeatureHook._capture

    def dying(self, module, inputs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the third chunk of 32 rows (batches of 16)
            raise KeyboardInterrupt
        return capture(self, module, inputs)
    monkeypatch.setattr(extract.FeatureHook, "_capture", dying)
    assert _extract(images, tmp_path / "resumed", tmp_path / "model.pt") == 130
    progress = json.loads((tmp_path / "resumed" / "train.progress.json").read_text())
    assert progress["done"] == 64 and not progress.get("finished")
    monkeypatch.setattr(extract.FeatureHook, "_capture", capture)
    assert _extract(images, tmp_path / "resumed", tmp_path / "model.pt") == 0
    for name in ("train_x.npy", "train_y.npy", "val_x.npy"):
        assert np.array_equal(np.load(tmp_path / "whole" / name), np.load(tmp_path / "resumed" / name)), name
    calls["n"] = 0
    monkeypatch.setattr(extract.FeatureHook, "_capture", dying)  # a finished extraction is not redone
    assert _extract(images, tmp_path / "resumed", tmp_path / "model.pt") == 0 and calls["n"] == 0


def test_corrupt_images_stop_the_run_or_are_skipped(images, tmp_path, capsys):
    _checkpoint(tmp_path / "model.pt")
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(images / "train", broken)
    bad = broken / "class_03" / "0.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    args = ["extract", "--model", "torchvision:resnet18", "--checkpoint", str(tmp_path / "model.pt"), "--data",
            str(broken), "--out", str(tmp_path / "out"), "--resize", "36", "--crop", "32", "--workers", "0",
            "--device", "cpu", "--quiet"]
    assert cli.main(args) == 1
    assert f"{bad}: cannot read the image" in capsys.readouterr().err
    assert cli.main(args + ["--skip-bad", "--out", str(tmp_path / "skipped")]) == 0
    summary = json.loads((tmp_path / "skipped" / "extract.json").read_text())
    assert [entry["path"] for entry in summary["splits"]["train"]["bad_images"]] == [str(bad)]
    assert np.load(tmp_path / "skipped" / "train_x.npy").shape[0] == sum(COUNTS) - 1
    assert np.bincount(np.load(tmp_path / "skipped" / "train_y.npy")).tolist()[3] == COUNTS[3] - 1


def test_model_and_checkpoint_problems_are_named(images, tmp_path, capsys):
    _checkpoint(tmp_path / "model.pt")
    for spec, message in (("torchvision:resnet9000", "torchvision has no model 'resnet9000'"),
                          ("torchvision:resnet34", "does not fit the model: missing"),
                          ("keras:resnet", "unknown kind 'keras'")):
        assert cli.main(["extract", "--model", spec, "--checkpoint", str(tmp_path / "model.pt"), "--data",
                         str(images / "train"), "--out", str(tmp_path / "out")]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_timm_model_if_installed(images, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=len(COUNTS)).eval()
    torch.save(model.state_dict(), tmp_path / "timm.pt")
    assert cli.main(["extract", "--model", "timm:resnet10t", "--checkpoint", str(tmp_path / "timm.pt"), "--data",
                     str(images / "train"), "--out", str(tmp_path / "out"), "--resize", "36", "--crop", "32",
                     "--dtype", "float32", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    x = np.load(tmp_path / "out" / "train_x.npy")
    items = extract.read_image_folder(str(images / "train"))
    with torch.no_grad():
        logits = model(_transformed([items[0][0], items[-1][0]]))
    classifier = torch.load(tmp_path / "out" / "classifier.pt", weights_only=True)
    ours = torch.from_numpy(x[[0, -1]]) @ classifier["weight"].T + classifier["bias"]
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- many processes (torchrun, gloo)

def _extract_command(images, out, checkpoint, data, *extra):
    return ["-m", "alphanet_ext", "extract", "--model", "torchvision:resnet18", "--checkpoint", str(checkpoint),
            "--data", *data, "--out", str(out), "--resize", "36", "--crop", "32", "--dtype", "float32",
            "--workers", "0", "--batch-size", "16", "--device", "cpu", "--quiet", "--timeout", "120", *extra]


def _run(world, argv, cwd):
    """One process, or ``world`` under torchrun; one thread each, so that the only difference
    between the runs is how the images are split between processes."""
    import os
    import subprocess
    import sys
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(extract.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    return subprocess.run([sys.executable, *launcher, *argv], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


def _same_dataset(one, many, world):
    from alphanet_ext.io import load_features
    for split in ("train", "val"):
        a, b = load_features(str(one), split), load_features(str(many), split)
        assert type(b.x).__name__ == "RowShards" and len(b.x.parts) == world
        assert np.asarray(b.x).tobytes() == np.asarray(a.x).tobytes(), split
        assert np.array_equal(a.y, b.y), split


@pytest.fixture(scope="module")
def one_process_features(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract-one")
    _checkpoint(folder / "model.pt")
    data = [f"train={images / 'train'}", f"val={images / 'val.txt'}"]
    done = _run(1, _extract_command(images, folder / "features", folder / "model.pt", data), folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_extraction_writes_shards_bit_identical_to_one_process(world, images, one_process_features,
                                                                       tmp_path):
    """Each rank writes its whole-batch slice of every split (val's 2 batches leave rank 0 of 3
    an empty shard); fit reads the shards as one dataset, equal to the one-process files bit for bit."""
    checkpoint = one_process_features / "model.pt"
    data = [f"train={images / 'train'}", f"val={images / 'val.txt'}"]
    done = _run(world, _extract_command(images, tmp_path / "features", checkpoint, data), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = one_process_features / "features"
    assert not (tmp_path / "features" / "train_x.npy").exists()
    _same_dataset(one, tmp_path / "features", world)
    summary = json.loads((tmp_path / "features" / "extract.json").read_text())
    assert summary["world_size"] == world and summary["splits"]["train"]["rows"] == sum(COUNTS)
    shards = summary["splits"]["train"]["shards"]
    assert [s["images"][0] for s in shards][0] == 0 and shards[-1]["images"][1] == sum(COUNTS)
    assert all(a["images"][1] == b["images"][0] for a, b in zip(shards, shards[1:]))
    classifier = torch.load(tmp_path / "features" / "classifier.pt", weights_only=True)
    reference = torch.load(one / "classifier.pt", weights_only=True)
    assert torch.equal(classifier["weight"], reference["weight"])
    if world == 3:
        assert np.load(tmp_path / "features" / "val_x-00000-of-00003.npy").shape == (0, 512)
        # the same command again redoes nothing; another world size into this folder is refused
        again = _run(world, _extract_command(images, tmp_path / "features", checkpoint, data), tmp_path)
        assert again.returncode == 0 and _same_dataset(one, tmp_path / "features", world) is None
        before = sorted(p.name for p in (tmp_path / "features").iterdir())
        other = _run(2, _extract_command(images, tmp_path / "features", checkpoint, data), tmp_path)
        assert other.returncode != 0 and "with a different number of processes than this one (2)" in other.stderr
        assert sorted(p.name for p in (tmp_path / "features").iterdir()) == before
    else:  # a one-process fit and a 2-rank fit on the shards, against the fit on the one-process files
        fit = ["-m", "alphanet_ext", "fit", "--classifier", str(one / "classifier.pt"), "--k", "2", "--epochs", "3",
               "--rho", "1", "--quiet"]
        assert cli.main(fit[2:] + ["--train", str(one), "--out", str(tmp_path / "one.pt")]) == 0
        assert cli.main(fit[2:] + ["--train", str(tmp_path / "features"), "--out", str(tmp_path / "shards.pt")]) == 0
        a = torch.load(tmp_path / "one.pt", weights_only=True)
        assert torch.equal(a["weight"], torch.load(tmp_path / "shards.pt", weights_only=True)["weight"])
        ranks = _run(2, fit + ["--train", str(tmp_path / "features"), "--out", str(tmp_path / "ranks.pt")], tmp_path)
        assert ranks.returncode == 0, ranks.stderr[-3000:]
        torch.testing.assert_close(torch.load(tmp_path / "ranks.pt", weights_only=True)["weight"], a["weight"],
                                   rtol=1e-5, atol=1e-5)


def test_torchrun_extraction_skips_bad_images_as_one_process_does(images, one_process_features, tmp_path):
    import shutil
    shutil.copytree(images / "train", tmp_path / "broken")
    (tmp_path / "broken" / "class_00" / "7.png").write_bytes(b"\x89PNG not really")   # rank 0's slice
    (tmp_path / "broken" / "class_04" / "1.png").write_bytes(b"\x89PNG not really")   # the last rank's
    checkpoint = one_process_features / "model.pt"
    for world, out in ((1, "one"), (3, "three")):
        done = _run(world, _extract_command(images, tmp_path / out, checkpoint, [str(tmp_path / "broken")],
                                            "--skip-bad"), tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    from alphanet_ext.io import load_features
    a, b = load_features(str(tmp_path / "one"), "train"), load_features(str(tmp_path / "three"), "train")
    assert a.x.shape[0] == sum(COUNTS) - 2 and np.asarray(b.x).tobytes() == np.asarray(a.x).tobytes()
    bad = [json.loads((tmp_path / out / "extract.json").read_text())["splits"]["train"]["bad_images"]
           for out in ("one", "three")]
    assert [(e["row"], e["path"]) for e in bad[0]] == [(e["row"], e["path"]) for e in bad[1]] and len(bad[0]) == 2
    # without --skip-bad the rank that meets a bad image stops the job with its path, and exits non-zero
    stopped = _run(2, _extract_command(images, tmp_path / "stopped", checkpoint, [str(tmp_path / "broken")]),
                   tmp_path)
    assert stopped.returncode != 0 and "7.png: cannot read the image" in stopped.stderr
