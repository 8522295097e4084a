import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import alphanet_ext
from alphanet_ext import cli, evaluate, synthetic
from alphanet_ext.analysis import pearson_with_interval
from alphanet_ext.io import load_classifier, read_metadata
from alphanet_ext.metrics import mean_std

# Optional packages (the `cli` extra); a GPU image may lack them.
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="safetensors is not installed")


@pytest.fixture(scope="module")
def problem():
    return synthetic.make_long_tailed(num_classes=30, dim=16, max_count=200, min_count=4, val_per_class=5,
                                      test_per_class=10, seed=2)


N_TRAIN = int(synthetic.long_tail_counts(30, 200, 4).sum())  # the problem fixture's train size


def write_features(folder, name, x, y, fmt):
    if fmt == "npz":
        path = os.path.join(folder, f"{name}.npz")
        np.savez(path, x=x.numpy(), y=y.numpy())
    elif fmt == "npy":
        path = os.path.join(folder, f"{name}_x.npy")
        np.save(path, x.numpy())
        np.save(os.path.join(folder, f"{name}_y.npy"), y.numpy())
    elif fmt == "npy-named":  # features.npy with labels.npy, a folder per set
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        path = os.path.join(folder, name, "features.npy")
        np.save(path, x.numpy())
        np.save(os.path.join(folder, name, "labels.npy"), y.numpy())
    elif fmt == "pt":
        path = os.path.join(folder, f"{name}.pt")
        torch.save({"features": x, "labels": y}, path)
    elif fmt == "pt-pair":
        path = os.path.join(folder, f"{name}.pt")
        torch.save((x, y), path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        path = os.path.join(folder, f"{name}.safetensors")
        save_file({"x": x.contiguous(), "y": y.contiguous()}, path)
    return path


def run(*argv):
    return cli.main([str(a) for a in argv])


@pytest.mark.parametrize("fmt", ["npz", "npy", "npy-named", "pt", "pt-pair",
                                 pytest.param("safetensors", marks=needs_safetensors)])
def test_fit_every_feature_format(problem, tmp_path, fmt, capsys):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, fmt)
    val = write_features(tmp_path, "val", problem.val_x, problem.val_y, fmt)
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    out = tmp_path / "corrected.pt"
    assert run("fit", "--train", train, "--val", val, "--classifier", classifier, "--out", out, "--epochs", 2,
               "--rho", 1) == 0
    assert f"wrote {out} (k=5, rho=1.0)\n" in capsys.readouterr().err
    layer = torch.nn.Linear(16, 30)
    layer.load_state_dict(torch.load(out, weights_only=True))
    metadata = read_metadata(str(out))
    assert metadata["k"] == 5 and len(metadata["neighbors"]) == len(metadata["splits"]["few"])


def test_a_npy_name_that_does_not_say_where_the_labels_are(problem, tmp_path, capsys):
    np.save(tmp_path / "train.npy", problem.train_x.numpy())
    np.save(tmp_path / "labels.npy", problem.train_y.numpy())
    torch.save({"weight": problem.weight, "bias": problem.bias}, tmp_path / "classifier.pt")
    assert run("fit", "--train", tmp_path / "train.npy", "--classifier", tmp_path / "classifier.pt", "--out",
               tmp_path / "out.pt", "--quiet") == 1
    assert "a .npy feature file must be NAME_x.npy (labels in NAME_y.npy), a shard NAME_x-R-of-W.npy (labels in NAME_y-R-of-W.npy) or features.npy" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("hidden", [["8", "4"], []])
def test_training_options_reach_fit(problem, tmp_path, hidden):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    val = write_features(tmp_path, "val", problem.val_x, problem.val_y, "npz")
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    options = dict(epochs=4, min_epochs=2, batch_size=32, lr=0.01, weight_decay=0.0, lr_step=3, lr_gamma=0.5,
                   pred_scale=2.0, seed=7, trials=3, rho=1.0)
    flags = [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", value)]
    assert run("fit", "--train", train, "--val", val, "--classifier", classifier, "--out", tmp_path / "c.pt",
               *flags, "--hidden", *hidden, "--quiet", "--device", "cpu") == 0
    config = read_metadata(str(tmp_path / "c.pt"))["config"]
    assert {name: config[name] for name in options} == options and config["hidden"] == [int(h) for h in hidden]
    direct = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, problem.val_x,
                              problem.val_y, hidden=[int(h) for h in hidden], progress=False, device="cpu", **options)
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["weight"], direct.weight)
    assert read_metadata(str(tmp_path / "c.pt"))["best_trial"] == direct.best_trial


@needs_safetensors
def test_rho_sweep_report_and_eval(problem, tmp_path, capsys):
    paths = {role: write_features(tmp_path, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npz")
             for role in ("train", "val", "test")}
    classifier = tmp_path / "classifier.npz"
    np.savez(classifier, weight=problem.weight.numpy(), bias=problem.bias.numpy())
    out, report = tmp_path / "corrected.safetensors", tmp_path / "report"
    code = run("fit", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--classifier",
               classifier, "--out", out, "--report", report, "--rho", 1.0, 0.5, "--trials", 2, "--epochs", 6,
               "--quiet")
    assert code == 0
    data = json.loads((report / "report.json").read_text())
    assert [r["rho"] for r in data["runs"]] == [1.0, 0.5] and sum(r["best"] for r in data["runs"]) == 1
    assert set(data["runs"][0]["top1"]) == {"many", "medium", "few", "overall"}
    assert "std" in data["runs"][0]["top1"]["few"]
    plots = ("split_accuracy.png", "per_class_change.png", "rho_sweep.png") if HAS_MATPLOTLIB else ()
    for name in ("report.md",) + plots:
        assert (report / name).stat().st_size > 0
    assert "(best on val)" in (report / "report.md").read_text()
    val_means = [r["val_top1"]["overall"]["mean"] for r in data["runs"]]
    chosen = val_means.index(max(val_means))  # here rho 0.5, the second run
    assert [r["best"] for r in data["runs"]] == [i == chosen for i in range(2)]
    metadata = read_metadata(str(out))
    assert metadata["rho"] == data["runs"][chosen]["rho"]
    # the distance correlation: per few class, accuracy change against mean distance to its neighbours
    few, neighbors = torch.tensor(metadata["splits"]["few"]), torch.tensor(metadata["neighbors"])
    means, _ = alphanet_ext.class_means(problem.train_x, problem.train_y, 30)
    distance = (means[few][:, None] - means[neighbors]).norm(dim=2).mean(dim=1)
    corrected = load_classifier(str(out))
    change = (evaluate(*corrected, problem.test_x, problem.test_y)["per_class_top1"][few]
              - evaluate(problem.weight, problem.bias, problem.test_x, problem.test_y)["per_class_top1"][few])
    expected = pearson_with_interval(distance, change, resamples=10)["r"]
    assert data["distance_correlation"] == pytest.approx(expected, rel=1e-5)
    capsys.readouterr()
    assert run("eval", "--classifier", out, "--data", paths["test"]) == 0  # splits from the file's metadata
    assert "top-1" in capsys.readouterr().out
    assert run("eval", "--classifier", classifier, "--data", paths["test"], "--splits-from", paths["train"]) == 0


def test_report_without_matplotlib_has_tables_and_no_plots(problem, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    paths = {role: write_features(tmp_path, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npz")
             for role in ("train", "test")}
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    report = tmp_path / "report"
    capsys.readouterr()
    assert run("fit", "--train", paths["train"], "--test", paths["test"], "--classifier", classifier, "--out",
               tmp_path / "c.pt", "--epochs", 1, "--report", report, "--quiet") == 0
    assert capsys.readouterr().err.strip() == ("alphanet: warning: matplotlib is not installed, so the report has "
                                               "no PNG plots (pip install matplotlib)")
    assert (report / "report.json").stat().st_size > 0 and (report / "report.md").stat().st_size > 0
    assert not list(report.glob("*.png"))
    compared = tmp_path / "compared"
    assert run("compare", "--train", paths["train"], "--test", paths["test"], "--classifier", classifier,
               "--epochs", 1, "--report", compared) == 0
    assert f"report: {compared}/compare.json, compare.md, compare.html\n" in capsys.readouterr().err  # no frontier.png
    assert "<table>" in (report / "report.html").read_text() and "<img" not in (compared / "compare.html").read_text()
    assert sorted(p.name for p in compared.iterdir()) == ["compare.html", "compare.json", "compare.md"]


def test_classifier_inside_a_whole_model_or_checkpoint(problem, tmp_path, capsys):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    head = torch.nn.Linear(16, 30)
    head.load_state_dict({"weight": problem.weight, "bias": problem.bias})
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.Flatten())
    model = torch.nn.Sequential(backbone, head)  # one 2-D weight: the head
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"epoch": 90, "state_dict": model.state_dict()}, tmp_path / "checkpoint.pth")
    mlp_head = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), head)  # two: needs --classifier-key
    torch.save(mlp_head.state_dict(), tmp_path / "mlp.pt")
    for classifier, key in (("model.pt", []), ("checkpoint.pth", []), ("mlp.pt", ["--classifier-key", "2"])):
        capsys.readouterr()
        assert run("eval", "--classifier", tmp_path / classifier, *key, "--data", train, "--splits-from", train) == 0
        out = capsys.readouterr().out
        reference = evaluate(problem.weight, problem.bias, problem.train_x, problem.train_y, None)["top1"]["overall"]
        assert f"{reference:.1f}" in out
    for key, message in (([], "expected one 'weight' entry (a [classes, dims] matrix), found 0.weight [16, 16], "
                              "2.weight [30, 16]; choose one with --classifier-key (e.g. '2')"),
                         (["--classifier-key", "fc"], "no entry 'fc.weight' (--classifier-key fc); 2-D weights there: "
                                                      "0.weight [16, 16], 2.weight [30, 16]"),
                         (["--classifier-key", "1"], "no entry '1.weight' (--classifier-key 1); 2-D weights there: "
                                                     "0.weight [16, 16], 2.weight [30, 16]")):
        capsys.readouterr()
        assert run("eval", "--classifier", tmp_path / "mlp.pt", *key, "--data", train, "--splits-from", train) == 1
        assert capsys.readouterr().err.strip() == f"alphanet: error: {tmp_path / 'mlp.pt'}: {message}"


def test_authors_layout_and_ensemble_classifier(problem, tmp_path, capsys):
    folder = tmp_path / "authors"
    (folder / "splits").mkdir(parents=True)
    counts = torch.bincount(problem.train_y, minlength=30)
    for name, ids in (("many", counts > 100), ("medium", (counts >= 20) & (counts <= 100)), ("few", counts < 20)):
        (folder / "splits" / f"{name}.txt").write_text("\n".join(map(str, torch.nonzero(ids).flatten().tolist())))
    half = 8
    for role in ("train", "val", "test"):
        x, y = getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y")
        experts = [{"feats": x[:, :half], "labels": y.tolist(), "idxs": list(range(len(y)))},
                   {"feats": x[:, half:], "labels": y.tolist(), "idxs": list(range(len(y)))}]
        with open(folder / f"{role}_feats.pkl", "wb") as stream:
            pickle.dump(experts, stream)
    # Two experts whose average equals the original classifier on the concatenated features.
    classifier = folder / "classifier.pth"
    torch.save([{"weight": 2 * problem.weight[:, :half], "bias": problem.bias},
                {"weight": 2 * problem.weight[:, half:], "bias": problem.bias}], classifier)
    out = tmp_path / "out.npz"
    assert run("fit", "--train", folder, "--classifier", classifier, "--out", out, "--epochs", 2, "--quiet") == 0
    with np.load(out) as archive:
        assert archive["weight"].shape == (30, 16) and "metadata" in archive.files
    capsys.readouterr()
    assert run("eval", "--classifier", classifier, "--data", folder) == 0
    assert f"on {folder / 'test_feats.pkl'} (300 samples)" in capsys.readouterr().err  # which of the folder's sets


def test_synth_then_fit(tmp_path, capsys):
    data = tmp_path / "data"
    assert run("synth", "--preset", "places-lt", "--scale", 0.05, "--dim", 32, "--out", data, "--quiet") == 0
    assert {"train_x.npy", "train_y.npy", "val_x.npy", "test_x.npy", "classifier.pt", "hierarchy.txt"} <= \
        set(os.listdir(data))
    assert run("fit", "--train", data / "train_x.npy", "--val", data / "val_x.npy", "--test", data / "test_x.npy",
               "--classifier", data / "classifier.pt", "--out", tmp_path / "files.pt", "--epochs", 1, "--rho", 1,
               "--report", tmp_path / "files", "--quiet") == 0
    # the folder itself: its val and test files are picked up as if named
    assert run("fit", "--train", data, "--classifier", data / "classifier.pt", "--out", tmp_path / "folder.pt",
               "--epochs", 1, "--rho", 1, "--report", tmp_path / "folder", "--quiet") == 0
    by_folder, by_files = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("folder", "files"))
    assert by_folder["evaluated_on"] == "test" and by_folder["runs"][0]["val_top1"] is not None
    for report in (by_folder, by_files):
        report["runs"][0].pop("timings")
    assert by_folder["runs"] == by_files["runs"]
    assert torch.equal(torch.load(tmp_path / "folder.pt")["weight"], torch.load(tmp_path / "files.pt")["weight"])
    # eval on the folder: its test set, with the splits from the corrected file's metadata
    capsys.readouterr()
    assert run("eval", "--classifier", tmp_path / "folder.pt", "--data", data) == 0
    said = capsys.readouterr()
    table = said.out
    assert f"on {data / 'test_x.npy'}" in said.err and "nan" not in table
    top1 = by_folder["runs"][0]["top1"]
    assert f"| top-1 | {top1['many']['mean']:.1f} | {top1['medium']['mean']:.1f} | {top1['few']['mean']:.1f} |" in table


def test_report_when_the_distance_correlation_is_undefined(tmp_path):
    # Evaluated on its own train set, every few class of this small preset is at
    # 100 % before and after: no spread, so Pearson r is undefined (this crashed).
    data = tmp_path / "data"
    assert run("synth", "--preset", "cifar100-lt", "--scale", 0.2, "--out", data, "--quiet") == 0
    assert run("fit", "--train", data / "train_x.npy", "--classifier", data / "classifier.pt", "--out",
               tmp_path / "c.pt", "--epochs", 2, "--report", tmp_path / "report", "--quiet") == 0
    assert "Pearson r is undefined" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("breakage,message", [
    ("missing_keys", "expected keys x/y or features/labels"),
    ("dims", "train.npz: the train features have 7 dims but the classifier expects 16"),
    ("labels", "train.npz: train label 30 is outside the classifier's 30 classes [0, 30)"),
    ("test_dims", "test.npz: the test features have 7 dims but the classifier expects 16"),
    ("test_labels", "test.npz: test label 30 is outside the classifier's 30 classes [0, 30)"),
    ("truncated", "cannot read features"),
    ("missing_file", "no such file"),
    ("classifier_keys", "expected one 'weight' entry"),
    ("empty_folder", "no train_x.npy (alphanet synth's layout), train_x-*-of-*.npy shards (alphanet extract under torchrun) or train*.pkl (the authors' layout)"),
    ("row_count", f"train.npz: {N_TRAIN} feature rows but {N_TRAIN - 1} labels"),
    ("ensemble_labels", "train_feats.pkl: the ensemble members have different labels"),
    ("two_pickles", "authors: expected one train*.pkl in the authors' layout, found 2"),
    ("whole_model", "classifier.pt: holds pickled Python objects, which are not loaded because unpickling can run "
     "code; save tensors instead: for a whole model, torch.save(model.state_dict(), PATH)"),
    ("pickled_features", "train.pt: holds pickled Python objects, which are not loaded because unpickling can run "
     "code; save tensors instead: torch.save({'x': features, 'y': labels}, PATH)"),
])
def test_bad_files_fail_cleanly(problem, tmp_path, breakage, message, capsys):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    if breakage == "missing_keys":
        np.savez(train, features=problem.train_x.numpy())
    elif breakage == "dims":
        np.savez(train, x=problem.train_x[:, :7].numpy(), y=problem.train_y.numpy())
    elif breakage == "labels":
        labels = problem.train_y.clone()
        labels[0] = 30
        np.savez(train, x=problem.train_x.numpy(), y=labels.numpy())
    elif breakage == "truncated":
        content = open(train, "rb").read()
        open(train, "wb").write(content[: len(content) // 2])
    elif breakage == "missing_file":
        train = tmp_path / "absent.npz"
    elif breakage == "empty_folder":
        train = tmp_path / "empty"
        train.mkdir()
    elif breakage == "classifier_keys":
        torch.save({"matrix": problem.weight}, classifier)
    elif breakage == "whole_model":
        torch.save(torch.nn.Linear(16, 30), classifier)
    elif breakage == "pickled_features":
        train = tmp_path / "train.pt"
        torch.save({"x": problem.train_x, "y": problem.train_y, "model": torch.nn.Linear(16, 30)}, train)
    elif breakage == "row_count":
        np.savez(train, x=problem.train_x.numpy(), y=problem.train_y[:-1].numpy())
    elif breakage == "two_pickles":
        train = tmp_path / "authors"
        train.mkdir()
        for name in ("train_a.pkl", "train_b.pkl"):
            with open(train / name, "wb") as stream:
                pickle.dump({"feats": problem.train_x, "labels": problem.train_y.tolist()}, stream)
    elif breakage == "ensemble_labels":
        train = tmp_path / "authors"
        train.mkdir()
        shuffled = problem.train_y[torch.randperm(problem.train_y.numel(), generator=torch.Generator().manual_seed(0))]
        with open(train / "train_feats.pkl", "wb") as stream:
            pickle.dump([{"feats": problem.train_x[:, :8], "labels": problem.train_y.tolist()},
                         {"feats": problem.train_x[:, 8:], "labels": shuffled.tolist()}], stream)
    test = []
    if breakage.startswith("test_"):  # found before the fit, not after it
        labels = problem.test_y.clone()
        labels[3] = 30
        x = problem.test_x[:, :7] if breakage == "test_dims" else problem.test_x
        np.savez(tmp_path / "test.npz", x=x.numpy(), y=(labels if breakage == "test_labels" else problem.test_y).numpy())
        test = ["--test", tmp_path / "test.npz"]
    out = tmp_path / "out" / "corrected.pt"
    capsys.readouterr()
    assert run("fit", "--train", train, *test, "--classifier", classifier, "--out", out, "--quiet") == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("alphanet: error:") and message in error and "\n" not in error
    assert not out.exists() and not (out.parent.exists() and os.listdir(out.parent))


def test_unwritable_output_fails_before_reading_the_data(problem, tmp_path, capsys, monkeypatch):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.pt").mkdir()

    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the outputs were checked")
    monkeypatch.setattr(cli, "load_features", refuse)
    good = tmp_path / "new" / "c.pt"
    cases = [(["--out", tmp_path / "a_file" / "c.pt"], f"cannot write {tmp_path / 'a_file' / 'c.pt'}: "
              f"{tmp_path / 'a_file'} is a file"),
             (["--out", tmp_path / "folder.pt"], f"{tmp_path / 'folder.pt'} is a folder; give the path of a file to write"),
             (["--out", tmp_path / "corrected"], f"{tmp_path / 'corrected'}: unknown output format (use .pt, "
              ".pth, .npz or .safetensors)"),
             (["--out", good, "--report", tmp_path / "a_file"], f"{tmp_path / 'a_file'} is a file; give a folder to write into"),
             (["--out", good, "--report", tmp_path / "a_file" / "r"], f"cannot write {tmp_path / 'a_file' / 'r'}: "
              f"{tmp_path / 'a_file'} is a file")]
    val = write_features(tmp_path, "val", problem.val_x, problem.val_y, "pt")
    (tmp_path / "tree.pt").write_text("0 root\n")
    for flag, path in [("classifier", f"{tmp_path}/../{tmp_path.name}/classifier.pt"), ("train", train),
                       ("val", val), ("hierarchy", tmp_path / "tree.pt")]:
        cases.append((["--val", val, "--hierarchy", tmp_path / "tree.pt", "--report", tmp_path / "r", "--out", path],
                      f"--out {path} is the --{flag} file; write the corrected classifier to another path "
                      "(inputs are never overwritten)"))
    inputs = {name: (tmp_path / name).read_bytes() for name in ("classifier.pt", "train.npz", "val.pt", "tree.pt")}
    for options, message in cases:
        capsys.readouterr()
        assert run("fit", "--train", train, "--classifier", classifier, *options, "--quiet") == 1
        assert capsys.readouterr().err.strip() == f"alphanet: error: {message}"
    capsys.readouterr()
    assert run("compare", "--train", train, "--classifier", classifier, "--report", tmp_path / "a_file") == 1
    assert capsys.readouterr().err.strip() == f"alphanet: error: {tmp_path / 'a_file'} is a file; give a folder to write into"
    assert run("synth", "--preset", "cifar100-lt", "--out", tmp_path / "a_file", "--quiet") == 1
    assert capsys.readouterr().err.strip() == f"alphanet: error: {tmp_path / 'a_file'} is a file; give a folder to write into"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root may write anywhere)
    assert run("fit", "--train", train, "--classifier", classifier, "--out", good, "--quiet") == 1
    assert capsys.readouterr().err.strip().endswith(f"alphanet: error: cannot write {good}: {tmp_path} is not writable")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "classifier.pt", "folder.pt", "train.npz", "tree.pt", "val.pt"]
    assert {name: (tmp_path / name).read_bytes() for name in inputs} == inputs
    assert not os.listdir(tmp_path / "folder.pt")


def test_mean_std_over_trials_is_the_population_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0} and mean_std([5.0]) == {"mean": 5.0, "std": 0.0}


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--train", "x.npz"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["synth", "--preset", "nope", "--out", "x"])
    assert exit_info.value.code == 2
    # options a command would ignore are refused, not accepted silently
    out = str(tmp_path / "out")
    for argv in (["synth", "--preset", "cifar100-lt", "--out", out, "--device", "cpu"],
                 ["synth", "--preset", "cifar100-lt", "--out", out, "--few-threshold", "5"],
                 ["demo", "--many-threshold", "50"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    for device in ("mps", "cuda:64"):  # refused before any file is read
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit", "--train", "absent.npz", "--classifier", "absent.pt", "--out", "x.pt", "--device", device])
        assert exit_info.value.code == 2


@pytest.mark.parametrize("arguments,message", [
    (["--few-threshold", "50", "--many-threshold", "10"], "--few-threshold (50) cannot exceed --many-threshold + 1"),
    (["--hierarchy", "tree.txt"], "--hierarchy is used by the report: add --report DIR"),
    (["--rho", "auto", "0.5"], "--rho auto cannot be mixed with numbers"),
    (["--rho", "auto"], "--rho auto needs --val"),
    (["--epochs", "3", "--min-epochs", "6"], "--min-epochs (6) is above --epochs (3)"),
])
def test_option_conflicts_exit_2_before_any_file_is_read(arguments, message, capsys):
    # the files do not exist: the options alone are refused
    assert run("fit", "--train", "absent.npz", "--classifier", "absent.pt", "--out", "x.pt", *arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("alphanet fit: error:") and message in error


@pytest.mark.parametrize("command,option,value,message", [
    ("fit", "--k", "0", "must be in [1, 256], got 0"),
    ("fit", "--rho", "-0.5", "must be in [0, 100], got -0.5 (or 'auto')"),
    ("fit", "--rho", "nan", "must be a finite number, got nan"),
    ("fit", "--rho", "1e5", "must be in [0, 100], got 1e5 (or 'auto')"),
    ("fit", "--rho", "1e30", "must be in [0, 100], got 1e30"),
    ("fit", "--seed", str(2**70), "must be in [0, "),
    ("fit", "--seed", "-3", "must be in [0, "),
    ("fit", "--lr", "1e30", "must be in (0, 10], got 1e30"),
    ("fit", "--pred-scale", "1e30", "must be in (0, 10000], got 1e30"),
    ("fit", "--lr-gamma", "3", "must be in (0, 1], got 3"),
    ("fit", "--weight-decay", "1e9", "must be in [0, 100], got 1e9"),
    ("fit", "--epochs", "2.5", "expected an integer, got '2.5'"),
    ("fit", "--epochs", "100000000", "must be in [1, 10000], got 100000000"),
    ("fit", "--batch-size", "0", "must be in [1, 1048576]"),
    ("fit", "--trials", "-1", "must be in [1, 64]"),
    ("fit", "--pred-scale", "0", "must be in (0, 10000], got 0"),
    ("fit", "--max-overall-drop", "-1", "must be at least 0"),
    ("fit", "--levels", "-1", "must be at least 0, got -1"),
    ("compare", "--rho", "-1", "must be in [0, 100], got -1"),
    ("eval", "--few-threshold", "0", "must be in [1, 2147483647], got 0"),
    ("synth", "--seed", str(2**70), "must be in [0, "),
    ("synth", "--scale", "0", "must be in (0, 1], got 0"),
    ("synth", "--scale", "1.5", "must be in (0, 1], got 1.5"),
    ("synth", "--dim", "0", "must be at least 1, got 0"),
])
def test_values_no_fit_can_use_exit_2_before_any_file_is_read(command, option, value, message, capsys):
    files = {"fit": ["--train", "absent.npz", "--classifier", "absent.pt", "--out", "x.pt"],
             "compare": ["--train", "absent.npz", "--classifier", "absent.pt"],
             "eval": ["--classifier", "absent.pt", "--data", "absent.npz"],
             "synth": ["--preset", "cifar100-lt", "--out", "absent"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, *files, option, value])
    assert exit_info.value.code == 2
    assert f"alphanet {command}: error: argument {option}: {message}" in capsys.readouterr().err
    assert not os.path.exists("absent")


def test_eval_without_known_splits_exits_2(problem, tmp_path, capsys):
    data = write_features(tmp_path, "test", problem.test_x, problem.test_y, "npz")
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)  # no split metadata
    assert run("eval", "--classifier", classifier, "--data", data) == 2
    assert "pass --splits-from TRAIN" in capsys.readouterr().err


def test_module_entry_point_and_help():
    for command in ([], ["fit"], ["eval"], ["synth"], ["demo"]):
        completed = subprocess.run([sys.executable, "-m", "alphanet_ext", *command, "--help"], capture_output=True,
                                   text=True)
        assert completed.returncode == 0 and "usage:" in completed.stdout


def test_demo(capsys):
    assert run("demo") == 0
    out = capsys.readouterr().out
    assert "| baseline |" in out and "| AlphaNet rho=0.5 |" in out
    assert "wrote" not in out  # the demo's classifier goes to a temporary folder, not worth naming


def test_compare(problem, tmp_path, capsys):
    paths = {role: write_features(tmp_path, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npz")
             for role in ("train", "val", "test")}
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    report = tmp_path / "report"
    capsys.readouterr()
    assert run("compare", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--classifier",
               classifier, "--rho", 0.5, "--epochs", 2, "--report", report, "--quiet") == 0
    out = capsys.readouterr().out
    methods = ("baseline", "NCM (cosine)", "NCM (euclidean)", "tau-normalised (tau=", "logit adjustment (tau=",
               "LWS", "cRT (10 epochs)", "AlphaNet rho=0.5", "AlphaNet, random neighbours rho=0.5",
               "AlphaNet on logit adjustment rho=0.5", "AlphaNet on tau-normalised rho=0.5", "AlphaNet on cRT rho=0.5")
    for method in methods:
        assert f"| {method}" in out
    data = json.loads((report / "compare.json").read_text())
    names = [row["method"] for row in data["methods"]]
    assert len(names) == len(methods) and all(name.startswith(m) for name, m in zip(names, methods)), names
    assert (report / "frontier.png").exists() == HAS_MATPLOTLIB
    # a folder of NAME_x.npy pairs gives the same table: its val and test sets are used
    folder = tmp_path / "folder"
    folder.mkdir()
    for role in ("train", "val", "test"):
        write_features(folder, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npy")
    assert run("compare", "--train", folder, "--classifier", classifier, "--rho", 0.5, "--epochs", 2,
               "--report", tmp_path / "by_folder", "--quiet") == 0
    assert json.loads((tmp_path / "by_folder" / "compare.json").read_text())["methods"] == data["methods"]


def test_k_sweep_control_and_analyses_in_the_report(problem, tmp_path):
    paths = {role: write_features(tmp_path, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npz")
             for role in ("train", "val", "test")}
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    tree = tmp_path / "tree.txt"
    tree.write_text("".join(f"{c} group{g}\n" for c, g in enumerate(problem.groups.tolist())))
    report = tmp_path / "report"
    assert run("fit", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--classifier",
               classifier, "--out", tmp_path / "c.pt", "--k", 2, 4, "--rho", 0.5, 1.0, "--control", "--epochs", 2,
               "--hierarchy", tree, "--levels", 1, "--report", report, "--quiet") == 0
    data = json.loads((report / "report.json").read_text())
    grid = [(r["metric"], r["k"], r["rho"]) for r in data["runs"]]
    assert grid == [(m, k, rho) for m in ("euclidean", "random") for k in (2, 4) for rho in (0.5, 1.0)]
    best = next(r for r in data["runs"] if r["best"])
    assert best["metric"] == "euclidean"  # the control is never the exported model
    text = (report / "report.md").read_text()
    assert "AlphaNet k=4 ρ=1.0" in text and "AlphaNet, random neighbours k=2 ρ=0.5" in text

    few_classes = set(read_metadata(str(tmp_path / "c.pt"))["splits"]["few"])
    samples = {"few": sum(int(c) in few_classes for c in problem.test_y), "all": len(problem.test_y)}
    samples["base"] = samples["all"] - samples["few"]
    for view in ("few", "base", "all"):
        for model in ("before", "after"):
            assert sum(data["prediction_changes"][view][model].values()) == samples[view]
            assert sum(data["semantic"]["prediction_changes"][view][model].values()) == samples[view]
    # correct counts agree with the plain accuracy; siblings make the semantic accuracy at least as high
    assert data["prediction_changes"]["all"]["before"]["correct"] == \
        pytest.approx(data["baseline"]["top1"]["overall"]["mean"] * samples["all"] / 100)
    for name in ("many", "medium", "few", "overall"):
        assert data["semantic"]["top1"]["baseline"][name] >= data["baseline"]["top1"][name]["mean"]
    # on this generator most baseline errors on few classes go to a sibling (same group)
    semantic_few = data["semantic"]["prediction_changes"]["few"]["before"]
    assert semantic_few["as_neighbor"] > semantic_few["elsewhere"]
    assert "Semantic closeness (within 1 levels" in text
    assert (report / "prediction_changes.png").exists() == HAS_MATPLOTLIB

    assert run("fit", "--train", paths["train"], "--classifier", classifier, "--out", tmp_path / "d.pt",
               "--hierarchy", tree, "--quiet") == 2  # the hierarchy is for the report


def test_hierarchy_files_with_missing_or_shifted_classes(problem, tmp_path, capsys):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    groups = problem.groups.tolist()
    shifted = tmp_path / "one_based.txt"
    shifted.write_text("".join(f"{c + 1} group{g}\n" for c, g in enumerate(groups)))
    command = ["fit", "--train", train, "--classifier", classifier, "--out", tmp_path / "c.pt", "--epochs", 1,
               "--report", tmp_path / "report", "--quiet", "--hierarchy"]
    capsys.readouterr()
    assert run(*command, shifted) == 1
    assert capsys.readouterr().err.strip() == ("alphanet: error: hierarchy: '30' has a parent but is neither a class "
                                               "(0 to 29) nor the parent of another node; are the class ids 0-based?")
    assert not (tmp_path / "c.pt").exists()  # refused before fitting
    partial = tmp_path / "partial.txt"
    partial.write_text("".join(f"{c} group{g}\n" for c, g in enumerate(groups) if c not in (3, 7)))
    assert run(*command, partial) == 0
    assert capsys.readouterr().err.strip() == ("alphanet: warning: hierarchy: 2 of 30 classes have no parent (3, 7); "
                                               "a prediction is close to them only when it is exact")


def test_rho_auto_respects_the_overall_drop(problem, tmp_path):
    paths = {role: write_features(tmp_path, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npz")
             for role in ("train", "val")}
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    out, report = tmp_path / "c.pt", tmp_path / "report"
    assert run("fit", "--train", paths["train"], "--val", paths["val"], "--classifier", classifier, "--out", out,
               "--rho", "auto", "--max-overall-drop", 100, "--epochs", 2, "--report", report, "--quiet") == 0
    data = json.loads((report / "report.json").read_text())
    assert [r["rho"] for r in data["runs"]] == list(cli.AUTO_RHOS)
    chosen = next(r for r in data["runs"] if r["best"])
    # With a 100-point allowance every rho qualifies: the pick is the best few-split val accuracy.
    assert chosen["val_top1"]["few"]["mean"] == max(r["val_top1"]["few"]["mean"] for r in data["runs"])
    assert read_metadata(str(out))["rho"] == chosen["rho"]
    assert run("fit", "--train", paths["train"], "--classifier", classifier, "--out", out, "--rho", "auto",
               "--quiet") == 2


def test_rho_is_chosen_on_val_by_default_when_there_is_a_val_set(problem, tmp_path, capsys):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    val = write_features(tmp_path, "val", problem.val_x, problem.val_y, "npz")
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    assert run("fit", "--train", train, "--val", val, "--classifier", classifier, "--out", tmp_path / "a.pt",
               "--epochs", 2) == 0
    assert "choosing rho on val among 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0" in capsys.readouterr().err
    assert read_metadata(str(tmp_path / "a.pt"))["rho"] in cli.AUTO_RHOS
    assert run("fit", "--train", train, "--classifier", classifier, "--out", tmp_path / "b.pt", "--epochs", 2) == 0
    assert "choosing rho" not in capsys.readouterr().err and read_metadata(str(tmp_path / "b.pt"))["rho"] == 1.0


def test_a_correction_worse_than_the_input_on_val_is_said_everywhere(tmp_path, capsys):
    """The input classifier is already right on every val sample of the few split (nearest
    class centre, centres far apart), so no correction can raise it: the fit still writes
    its output, and says on stderr, in the report's first line, in report.json and in the
    output's metadata that it is worse than the input on val."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=generator) * 20
    counts = [60, 50, 40, 30, 10, 8, 6, 5]

    def sample(per_class):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
        return centres[labels] + torch.randn(len(labels), 16, generator=generator), labels
    train_x, train_y = sample(counts)
    val_x, val_y = sample([6] * 8)
    train = write_features(tmp_path, "train", train_x, train_y, "npz")
    val = write_features(tmp_path, "val", val_x, val_y, "npz")
    torch.save({"weight": centres, "bias": -0.5 * (centres * centres).sum(1)}, tmp_path / "classifier.pt")
    out = tmp_path / "corrected.pt"
    assert run("fit", "--train", train, "--val", val, "--classifier", tmp_path / "classifier.pt", "--out", out,
               "--k", 2, "--rho", 1, "--epochs", 2, "--report", tmp_path / "report", "--quiet") == 0
    err = capsys.readouterr().err
    assert "alphanet: warning: the correction (k=2, rho=1.0) is worse than the input classifier on val: " \
           "few-split top-1 100.0 -> " in err and "try --rho auto" in err
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert lines[0] == "# AlphaNet correction report: WORSE than the input classifier on val"
    assert lines[2].startswith("**Warning: the correction (k=2, rho=1.0) is worse than the input classifier on val")
    assert "few-split top-1 100.0" in json.loads((tmp_path / "report" / "report.json").read_text())["warning"]
    assert "few-split top-1 100.0" in read_metadata(str(out))["warning"] and out.exists()
    # alphanet still knows the report folder for its own: a rerun may replace it
    assert run("fit", "--train", train, "--val", val, "--classifier", tmp_path / "classifier.pt", "--out", out,
               "--k", 2, "--rho", 1, "--epochs", 2, "--report", tmp_path / "report", "--quiet") == 0


def test_a_correction_better_on_val_carries_no_warning(problem, tmp_path, capsys):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    val = write_features(tmp_path, "val", problem.val_x, problem.val_y, "npz")
    torch.save({"weight": problem.weight, "bias": problem.bias}, tmp_path / "classifier.pt")
    assert run("fit", "--train", train, "--val", val, "--classifier", tmp_path / "classifier.pt", "--out",
               tmp_path / "c.pt", "--rho", 0.5, "--epochs", 10, "--quiet") == 0
    assert "warning" not in capsys.readouterr().err and "warning" not in read_metadata(str(tmp_path / "c.pt"))


@pytest.mark.parametrize("before,after,expected", [
    ({"few": 40.0, "overall": 70.0}, {"few": 45.0, "overall": 69.5}, None),
    ({"few": 40.0, "overall": 70.0}, {"few": 40.0, "overall": 71.0}, "few-split top-1 40.0 -> 40.0"),
    ({"few": 40.0, "overall": 70.0}, {"few": 55.0, "overall": 68.5}, "overall top-1 70.0 -> 68.5, more than "
                                                                     "--max-overall-drop 1 points lower"),
    ({"few": 68.0, "overall": 76.8}, {"few": 66.9, "overall": 73.4}, "few-split top-1 68.0 -> 66.9; overall"),
])
def test_worse_than_the_input_means_no_few_gain_or_too_large_an_overall_drop(before, after, expected, monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(cli, "evaluate", lambda *args, **kwargs: {"top1": before})
    best = SimpleNamespace(k=5, rho=1.0, result=SimpleNamespace(splits={}, best_trial=0, trial_val_top1=[after]))
    args = SimpleNamespace(device="cpu", max_overall_drop=1.0, rho_auto=False)
    val = SimpleNamespace(x=None, y=None)
    said = cli._worse_than_input(args, best, None, None, val)
    assert said is None if expected is None else expected in said


def test_stdout_holds_results_only_and_json_is_one_document(problem, tmp_path, capsys):
    """Messages go to stderr and results to stdout, so `alphanet eval ... > results.txt`
    holds the table only; --json makes stdout one JSON document, on fit, eval and compare."""
    paths = {name: write_features(tmp_path, name, getattr(problem, f"{name}_x"), getattr(problem, f"{name}_y"), "npz")
             for name in ("train", "val", "test")}
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    common = ["--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--classifier", classifier,
              "--epochs", 2, "--rho", 0.5]
    assert run("fit", *common, "--out", tmp_path / "c.pt") == 0
    said = capsys.readouterr()
    assert said.out.startswith("top-1 on the test set (%):\n| model |") and "wrote" not in said.out
    assert f"wrote {tmp_path / 'c.pt'}" in said.err and "fitting rho=0.5" in said.err

    assert run("fit", *common, "--out", tmp_path / "d.pt", "--json") == 0
    said = capsys.readouterr()
    document = json.loads(said.out)
    assert document["command"] == "fit" and document["rho"] == 0.5 and document["evaluated_on"] == "test"
    assert set(document["top1"]) == {"baseline", "AlphaNet rho=0.5"} and document["runs"][0]["best"]
    assert "few" in document["top1"]["baseline"] and document["warning"] is None

    assert run("eval", "--classifier", tmp_path / "c.pt", "--data", paths["test"]) == 0
    said = capsys.readouterr()
    assert said.out.startswith("| metric |") and said.out.count("\n") == 4 and "accuracy in percent" in said.err
    assert run("eval", "--classifier", tmp_path / "c.pt", "--data", paths["test"], "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["command"] == "eval" and document["samples"] == len(problem.test_y)
    overall = evaluate(*load_classifier(str(tmp_path / "c.pt")), problem.test_x, problem.test_y, None)["top1"]
    assert document["top1"]["overall"] == pytest.approx(overall["overall"])

    assert run("compare", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--classifier",
               classifier, "--epochs", 2, "--rho", 0.5, "--json", "--quiet") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["command"] == "compare" and document["methods"][0]["method"] == "baseline"
    assert any(m["method"].startswith("LWS") for m in document["methods"])


@pytest.mark.parametrize("select", ["overall", "few", "balanced"])
def test_compare_exports_the_method_best_on_val(problem, tmp_path, capsys, select):
    paths = {name: write_features(tmp_path, name, getattr(problem, f"{name}_x"), getattr(problem, f"{name}_y"), "npz")
             for name in ("train", "val", "test")}
    torch.save({"weight": problem.weight, "bias": problem.bias}, tmp_path / "classifier.pt")
    out = tmp_path / "best.pt"
    assert run("compare", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--classifier",
               tmp_path / "classifier.pt", "--epochs", 3, "--rho", 0.5, 1.0, "--out", out, "--select", select,
               "--json", "--quiet") == 0
    document = json.loads(capsys.readouterr().out)
    scored = [m for m in document["methods"] if m["val_top1"] is not None]
    assert len(scored) == len(document["methods"]) - 2  # the random-neighbour controls are not candidates
    if select == "overall":
        criterion = {m["method"]: m["val_top1"]["overall"] for m in scored}
    elif select == "balanced":
        criterion = {m["method"]: sum(m["val_top1"][c] for c in ("many", "medium", "few")) / 3 for m in scored}
    else:
        floor = scored[0]["val_top1"]["overall"] - 1.0
        criterion = {m["method"]: m["val_top1"]["few"] for m in scored if m["val_top1"]["overall"] >= floor}
    assert document["selected"] == max(criterion, key=criterion.get) and document["select"] == select
    metadata = read_metadata(str(out))
    assert metadata["selected_method"] == document["selected"]
    weight, bias = load_classifier(str(out))
    splits = {name: torch.tensor(ids) for name, ids in metadata["splits"].items()}
    again = evaluate(weight, bias, problem.val_x, problem.val_y, splits)["top1"]
    chosen = next(m for m in scored if m["method"] == document["selected"])
    assert again["overall"] == pytest.approx(chosen["val_top1"]["overall"], abs=1e-6)


def test_compare_out_needs_a_val_set(problem, tmp_path, capsys):
    train = write_features(tmp_path, "train", problem.train_x, problem.train_y, "npz")
    torch.save({"weight": problem.weight, "bias": problem.bias}, tmp_path / "classifier.pt")
    assert run("compare", "--train", train, "--classifier", tmp_path / "classifier.pt", "--out",
               tmp_path / "best.pt") == 2
    assert "--out exports the method best on val: give --val" in capsys.readouterr().err
    assert not (tmp_path / "best.pt").exists()


def _row(method, few, overall):
    return {"method": method, "top1": {"few": {"mean": few, "std": 0.0}, "overall": {"mean": overall, "std": 0.0}}}


def test_the_frontier_draws_families_and_rho_sweeps_as_curves():
    rows = [_row("baseline", 10, 70), _row("NCM (cosine)", 30, 60), _row("NCM (euclidean)", 25, 62),
            _row("tau-normalised (tau=1.0)", 20, 69), _row("AlphaNet rho=1.5", 40, 66), _row("AlphaNet rho=0.5", 30, 69),
            _row("AlphaNet, random neighbours rho=0.5", 12, 70), _row("AlphaNet, random neighbours rho=1.5", 14, 69)]
    series = {label: (family, points) for label, family, points in cli._frontier_series(rows)}
    assert series["input classifier"][0] == "input classifier"
    assert series["NCM (cosine)"][0] == series["NCM (euclidean)"][0] == "NCM"
    family, points = series["AlphaNet"]
    assert family == "AlphaNet" and [p[0] for p in points] == [0.5, 1.5]  # one curve, in rho order
    assert series["AlphaNet, random neighbours"][0] == "AlphaNet, random neighbours"
    styles = {cli._FAMILY_STYLE[f] for f, _ in series.values()}
    assert len(styles) == len({f for f, _ in series.values()})  # one colour and marker per family


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_the_frontier_and_the_binned_per_class_plot_are_drawn(tmp_path):
    from alphanet_ext.report import BINNED_ABOVE, binned_means, plots
    rows = [_row("baseline", 10, 70), _row("AlphaNet rho=0.5", 30, 69), _row("AlphaNet rho=1.0", 35, 67)]
    assert cli._frontier_plot(rows, str(tmp_path / "frontier.png"))
    x = torch.arange(1000, dtype=torch.float64)
    y = torch.where(x < 500, 1.0, 3.0) + torch.sin(x)
    centres, means, half = binned_means(x, y, bins=4)
    assert centres.tolist() == [124.5, 374.5, 624.5, 874.5]
    assert means[:2].sub(1).abs().max() < 0.1 and means[2:].sub(3).abs().max() < 0.1 and (half > 0).all()
    assert binned_means(x[:3], y[:3], bins=20)[2].tolist() == [0.0, 0.0, 0.0]
    from PIL import Image  # noqa: F401  (matplotlib depends on pillow)
    assert Image.open(tmp_path / "frontier.png").size[0] > 600
    n = BINNED_ABOVE + 1
    report = {"config": {"k": 5}, "evaluated_on": "test", "distance_correlation": 0.1,
              "baseline": {"top1": {c: {"mean": 50.0, "std": 0.0} for c in ("many", "medium", "few", "overall")}},
              "runs": [{"best": True, "rho": 1.0, "k": 5, "metric": "euclidean",
                        "top1": {c: {"mean": 55.0, "std": 0.0} for c in ("many", "medium", "few", "overall")}}]}
    written = plots(report, {"distance": torch.rand(n), "change": torch.randn(n)}, str(tmp_path))
    assert "per_class_change.png" in written and (tmp_path / "per_class_change.png").exists()


@pytest.mark.parametrize("on", ["la", "tau", "crt"])
def test_fit_on_a_peer_classifier(problem, tmp_path, capsys, on):
    """--on corrects the logit-adjusted, tau-normalised or cRT classifier: the export
    keeps that classifier's base-class rows exactly, names it in the metadata, the
    JSON and the report, and the table shows the input and the base."""
    from alphanet_ext import baselines
    paths = {role: write_features(tmp_path, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npz")
             for role in ("train", "val", "test")}
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    out, report = tmp_path / "c.pt", tmp_path / "report"
    capsys.readouterr()
    assert run("fit", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--classifier",
               classifier, "--out", out, "--on", on, "--rho", 0.5, "--epochs", 2, "--crt-epochs", 3,
               "--report", report, "--json", "--quiet") == 0
    document = json.loads(capsys.readouterr().out)
    counts = torch.bincount(problem.train_y, minlength=30)
    splits = alphanet_ext.make_splits(counts)
    if on == "la":
        tau, (weight, bias) = baselines.choose_logit_adjustment(problem.weight, problem.bias, counts, problem.val_x,
                                                                problem.val_y, splits)
    elif on == "tau":
        tau, (weight, bias) = baselines.choose_tau(problem.weight, problem.bias, problem.val_x, problem.val_y, splits)
    else:
        weight, bias = baselines.crt(problem.train_x, problem.train_y, 30, epochs=3, seed=0)
    metadata = read_metadata(str(out))
    assert metadata["on"] == document["on"] and metadata["on"]["method"] == cli.BASES[on]
    if on != "crt":
        assert metadata["on"]["tau"] == tau
    corrected_weight, corrected_bias = load_classifier(str(out))
    base = torch.tensor(sorted(set(range(30)) - set(metadata["splits"]["few"])))
    assert torch.equal(corrected_weight[base], weight[base]) and torch.equal(corrected_bias[base], bias[base])
    few = torch.tensor(metadata["splits"]["few"])
    assert not torch.equal(corrected_weight[few], weight[few])  # and the few rows were corrected
    expected = evaluate(weight, bias, problem.test_x, problem.test_y, splits)["top1"]
    given = evaluate(problem.weight, problem.bias, problem.test_x, problem.test_y, splits)["top1"]
    assert document["top1"]["baseline"] == pytest.approx(expected) and document["top1"]["input"] == pytest.approx(given)
    assert f"AlphaNet on {cli.BASES[on]} rho=0.5" in document["top1"]
    text = (report / "report.md").read_text()
    assert "| input classifier |" in text and f"| baseline: {cli.BASES[on]} (" in text
    assert f"AlphaNet on {cli.BASES[on]} ρ=0.5" in text


def test_compare_exports_alphanet_on_a_peer_when_it_is_best(problem, tmp_path, monkeypatch, capsys):
    """compare --out takes whichever method is best on val, AlphaNet on a peer's classifier
    included, and its export says what it corrected."""
    paths = {role: write_features(tmp_path, role, getattr(problem, f"{role}_x"), getattr(problem, f"{role}_y"), "npz")
             for role in ("train", "val")}
    classifier = tmp_path / "classifier.pt"
    torch.save({"weight": problem.weight, "bias": problem.bias}, classifier)
    # make AlphaNet on cRT the best on val, whatever the data says
    real = cli._select_method
    monkeypatch.setattr(cli, "_select_method", lambda args, methods: next(
        i for i, method in enumerate(methods) if method[0].startswith("AlphaNet on cRT")) if real(args, methods) >= 0
        else None)
    out = tmp_path / "best.pt"
    assert run("compare", "--train", paths["train"], "--val", paths["val"], "--classifier", classifier, "--rho", 0.5,
               "--epochs", 2, "--crt-epochs", 2, "--on", "crt", "--out", out, "--json", "--quiet") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["selected"] == "AlphaNet on cRT rho=0.5"
    metadata = read_metadata(str(out))
    assert metadata["on"] == {"method": "cRT", "epochs": 2, "seed": 0} and metadata["rho"] == 0.5
    assert [row["method"] for row in document["methods"]][-1] == "AlphaNet on cRT rho=0.5"
    assert not any(row["method"].startswith("AlphaNet on logit") for row in document["methods"])  # --on crt only
