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
