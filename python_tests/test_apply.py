"""alphanet apply: the user's checkpoint with the corrected classifier, everything else untouched."""
import os
from collections import OrderedDict

import pytest
import torch

from alphanet_ext import cli, synthetic


class Net(torch.nn.Module):
    def __init__(self, dim=16, classes=30):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, dim), torch.nn.BatchNorm1d(dim), torch.nn.ReLU())
        self.fc = torch.nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture
def corrected(tmp_path):
    """A model, and a corrected classifier for its fc layer fitted on its features."""
    torch.manual_seed(0)
    model = Net()
    problem = synthetic.make_long_tailed(num_classes=30, dim=16, max_count=150, min_count=4, seed=3)
    with torch.no_grad():
        model.fc.weight.copy_(problem.weight)
        model.fc.bias.copy_(problem.bias)
    np_dir = tmp_path / "data"
    np_dir.mkdir()
    import numpy as np
    np.savez(np_dir / "train.npz", x=problem.train_x.numpy(), y=problem.train_y.numpy())
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert cli.main(["fit", "--train", str(np_dir / "train.npz"), "--classifier", str(tmp_path / "model.pt"),
                     "--classifier-key", "fc", "--out", str(tmp_path / "corrected.pt"), "--epochs", "2",
                     "--quiet"]) == 0
    return model, tmp_path


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) and a.dtype == b.dtype
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("shape", ["state_dict", "training", "module-prefixed"])
def test_apply_replaces_only_the_classifier(corrected, shape):
    model, folder = corrected
    state = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    state = model.state_dict()
    if shape == "state_dict":
        checkpoint, layer = state, "fc"
    elif shape == "training":
        checkpoint, layer = {"epoch": 90, "state_dict": state, "optimizer": optimizer.state_dict(), "best": 71.5}, "fc"
    else:
        checkpoint = {"model": OrderedDict((f"module.{k}", v) for k, v in state.items()), "epoch": 3}
        layer = "module.fc"
    torch.save(checkpoint, folder / "ckpt.pt")
    before = (folder / "ckpt.pt").read_bytes()
    args = ["apply", "--checkpoint", folder / "ckpt.pt", "--corrected", folder / "corrected.pt", "--out",
            folder / "out.pt", "--quiet"] + (["--classifier-key", layer] if shape == "module-prefixed" else [])
    assert cli.main([str(a) for a in args]) == 0
    assert (folder / "ckpt.pt").read_bytes() == before  # the input is never modified
    out = torch.load(folder / "out.pt", weights_only=True)
    fixed = torch.load(folder / "corrected.pt", weights_only=True)
    inner, original = (out, checkpoint) if shape == "state_dict" else \
        ((out["state_dict"], checkpoint["state_dict"]) if shape == "training" else (out["model"], checkpoint["model"]))
    assert torch.equal(inner[f"{layer}.weight"], fixed["weight"]) and torch.equal(inner[f"{layer}.bias"], fixed["bias"])
    assert not torch.equal(inner[f"{layer}.weight"], original[f"{layer}.weight"])  # the correction changed few rows
    for key in original:
        if key not in (f"{layer}.weight", f"{layer}.bias"):
            assert _equal(inner[key], original[key]), key
    assert list(inner) == list(original) and type(inner) is type(original)
    for key in checkpoint if shape != "state_dict" else ():
        if key not in ("state_dict", "model"):
            assert _equal(out[key], checkpoint[key]), key
    if shape != "module-prefixed":
        reloaded = Net()
        reloaded.load_state_dict(inner)  # strict: the structure is the original's
        assert torch.equal(reloaded.fc.weight, fixed["weight"])


def test_apply_refuses_a_classifier_of_another_shape_and_writes_nothing(corrected, capsys):
    model, folder = corrected
    small = Net(classes=12)
    torch.save(small.state_dict(), folder / "small.pt")
    code = cli.main(["apply", "--checkpoint", str(folder / "small.pt"), "--corrected", str(folder / "corrected.pt"),
                     "--out", str(folder / "out.pt"), "--classifier-key", "fc"])
    assert code == 1 and "the corrected classifier is [30, 16] but" in capsys.readouterr().err
    assert not (folder / "out.pt").exists()
    assert [name for name in os.listdir(folder) if name.startswith(".alphanet-tmp-")] == []


def test_apply_refuses_out_equal_to_the_checkpoint(corrected, capsys):
    model, folder = corrected
    torch.save(model.state_dict(), folder / "ckpt.pt")
    before = (folder / "ckpt.pt").read_bytes()
    code = cli.main(["apply", "--checkpoint", str(folder / "ckpt.pt"), "--corrected", str(folder / "corrected.pt"),
                     "--out", str(folder / "ckpt.pt")])
    assert code == 1 and "is the --checkpoint file" in capsys.readouterr().err
    assert (folder / "ckpt.pt").read_bytes() == before


def test_apply_keeps_the_state_dicts_version_metadata(corrected):
    model, folder = corrected
    state = model.state_dict()
    assert hasattr(state, "_metadata")
    torch.save(state, folder / "ckpt.pt")
    assert cli.main(["apply", "--checkpoint", str(folder / "ckpt.pt"), "--corrected", str(folder / "corrected.pt"),
                     "--out", str(folder / "out.pt"), "--quiet"]) == 0
    out = torch.load(folder / "out.pt", weights_only=True)
    assert out._metadata == state._metadata
