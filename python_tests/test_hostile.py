"""Hostile and careless inputs to the real ``alphanet`` console script, each in a subprocess.

Every case asserts the exit code, a one-line message naming the problem, and
that nothing was left behind or clobbered: an existing ``--out`` (and report)
keeps its bytes, no temporary file stays, and no payload ran.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from alphanet_ext import synthetic

SCRIPT = os.path.join(os.path.dirname(sys.executable), "alphanet")
COMMAND = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "alphanet_ext"]
OLD_OUT = b"an earlier result that must survive"


@pytest.fixture(scope="module")
def problem():
    return synthetic.make_long_tailed(num_classes=20, dim=8, max_count=120, min_count=3, val_per_class=4,
                                      test_per_class=4, seed=5)


@pytest.fixture
def files(problem, tmp_path):
    """A small, valid problem on disk, and an earlier --out that a failed run must not touch."""
    for role in ("train", "val", "test"):
        np.savez(tmp_path / f"{role}.npz", x=getattr(problem, f"{role}_x").numpy(),
                 y=getattr(problem, f"{role}_y").numpy())
    torch.save({"weight": problem.weight, "bias": problem.bias}, tmp_path / "classifier.pt")
    (tmp_path / "out.pt").write_bytes(OLD_OUT)
    return tmp_path


def alphanet(*argv, cwd=None, timeout=120):
    return subprocess.run(COMMAND + [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def fit_args(folder, *extra, train=None, classifier=None, out=None):
    return ["fit", "--train", train or folder / "train.npz", "--val", folder / "val.npz", "--test",
            folder / "test.npz", "--classifier", classifier or folder / "classifier.pt", "--out",
            out or folder / "out.pt", "--epochs", "2", "--rho", "1", "--quiet", *extra]


def one_line_error(done, code, *fragments):
    """The run exited ``code`` with a single stderr line holding every fragment, and no traceback."""
    err = done.stderr.strip()
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("alphanet")]
    assert lines, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def untouched(folder):
    """The earlier --out is intact and no temporary file of ours is left in the folder."""
    assert (folder / "out.pt").read_bytes() == OLD_OUT
    leftovers = [name for name in os.listdir(folder) if name.startswith(".alphanet-tmp-")]
    assert leftovers == [], leftovers


# ----------------------------------------------------------------------------- files


def test_truncated_npz(files):
    data = (files / "train.npz").read_bytes()
    (files / "train.npz").write_bytes(data[:len(data) // 2])
    one_line_error(alphanet(*fit_args(files)), 1, f"{files / 'train.npz'}: cannot read features")
    untouched(files)


def test_empty_feature_file(files):
    (files / "train.npz").write_bytes(b"")
    one_line_error(alphanet(*fit_args(files)), 1, f"{files / 'train.npz'}: cannot read features")
    untouched(files)


@pytest.mark.parametrize("which", ["train", "classifier"])
def test_fifo_is_refused_not_waited_on(files, which):
    path = files / ("train.npz" if which == "train" else "classifier.pt")
    path.unlink()
    os.mkfifo(path)
    done = alphanet(*fit_args(files), timeout=60)  # reading a FIFO would block forever
    one_line_error(done, 1, f"{path}: not a regular file (a FIFO, device or socket)")
    untouched(files)


def test_device_as_classifier(files):
    done = alphanet(*fit_args(files, classifier="/dev/zero"))
    one_line_error(done, 1, "/dev/zero: not a regular file")
    untouched(files)


def test_folder_as_classifier(files):
    (files / "folder.pt").mkdir()
    one_line_error(alphanet(*fit_args(files, classifier=files / "folder.pt")), 1, "folder.pt: is a folder")
    untouched(files)


def test_missing_train_file(files):
    one_line_error(alphanet(*fit_args(files, train=files / "absent.npz")), 1, "absent.npz: no such file")
    untouched(files)


def test_truncated_classifier_says_why(files):
    data = (files / "classifier.pt").read_bytes()
    (files / "classifier.pt").write_bytes(data[:len(data) - 200])
    err = one_line_error(alphanet(*fit_args(files)), 1, f"{files / 'classifier.pt'}: cannot read classifier (")
    assert "truncated or corrupt" in err
    untouched(files)


def test_empty_classifier(files):
    (files / "classifier.pt").write_bytes(b"")
    one_line_error(alphanet(*fit_args(files)), 1, "classifier.pt: cannot read classifier (")
    untouched(files)


def test_garbage_classifier(files):
    (files / "classifier.pt").write_bytes(os.urandom(4096))
    one_line_error(alphanet(*fit_args(files)), 1, "classifier.pt: cannot read classifier (")
    untouched(files)


@pytest.mark.parametrize("container", [tuple, list])
def test_classifier_saved_as_a_weight_bias_pair(files, problem, container):
    torch.save(container([problem.weight, problem.bias]), files / "pair.pt")
    done = alphanet(*fit_args(files, classifier=files / "pair.pt"))
    assert done.returncode == 0, done.stderr
    assert torch.load(files / "out.pt", weights_only=True)["weight"].shape == problem.weight.shape


def test_pair_with_mismatched_bias(files, problem):
    torch.save((problem.weight, problem.bias[:5]), files / "pair.pt")
    one_line_error(alphanet(*fit_args(files, classifier=files / "pair.pt")), 1,
                   "pair.pt: the (weight, bias) pair has 20 weight rows but 5 biases")
    untouched(files)


def test_whole_pickled_model_is_refused(files, problem):
    layer = torch.nn.Linear(8, 20)
    torch.save(layer, files / "model.pt")
    one_line_error(alphanet(*fit_args(files, classifier=files / "model.pt")), 1,
                   "model.pt: holds pickled Python objects")
    untouched(files)


# ----------------------------------------------------------------------------- malicious pickles

PAYLOAD_HELPERS = textwrap.dedent("""
    import builtins, os, pickle, subprocess, sys
    marker, kind, target = sys.argv[1], sys.argv[2], sys.argv[3]

    class Payload:
        def __init__(self, how):
            self.how = how
        def __reduce__(self):
            if self.how == "os.system":
                return (os.system, (f"touch {marker}",))
            if self.how == "eval":
                return (builtins.eval, (f"open({marker!r}, 'w').close() or {{'feats': [[0.0]], 'labels': [0]}}",))
            if self.how == "exec":
                return (builtins.exec, (f"open({marker!r}, 'w').close()",))
            if self.how == "subprocess":
                return (subprocess.call, (["touch", marker],))
            raise ValueError(self.how)

    if kind == "top":
        data = Payload("os.system")
    elif kind == "list":
        data = [{"feats": [[0.0]], "labels": [0]}, Payload("os.system")]
    elif kind == "dict":
        data = {"feats": Payload("exec"), "labels": [0]}
    elif kind == "returns-features":
        data = Payload("eval")
    else:
        data = {"feats": [[0.0]], "labels": Payload(kind)}
    with open(target, "wb") as stream:
        pickle.dump(data, stream)
""")


@pytest.mark.parametrize("kind", ["top", "list", "dict", "returns-features", "eval", "exec", "subprocess"])
def test_malicious_pickle_never_runs(files, tmp_path, kind):
    folder = tmp_path / "authors"
    (folder / "splits").mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    script = tmp_path / "make_payload.py"
    script.write_text(PAYLOAD_HELPERS)
    subprocess.run([sys.executable, str(script), str(marker), kind, str(folder / "train_feats.pkl")], check=True)
    done = alphanet(*fit_args(files, train=folder))
    err = one_line_error(done, 1, f"{folder / 'train_feats.pkl'}: refused to unpickle", "--trust-pickle")
    assert not marker.exists()
    assert any(name in err for name in ("posix.system", "builtins.eval", "builtins.exec", "subprocess.call"))
    untouched(files)


def test_legitimate_authors_pickle_needs_no_trust(files, problem, tmp_path):
    folder = tmp_path / "authors"
    folder.mkdir()
    for role in ("train", "val", "test"):
        with open(folder / f"{role}_feats.pkl", "wb") as stream:
            pickle.dump({"feats": getattr(problem, f"{role}_x"), "labels": getattr(problem, f"{role}_y").tolist(),
                         "idxs": np.arange(len(getattr(problem, f"{role}_y")))}, stream)
    done = alphanet("fit", "--train", folder, "--classifier", files / "classifier.pt", "--out", files / "new.pt",
                    "--epochs", "2", "--rho", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (files / "new.pt").exists()


def test_malformed_split_file_is_named(files, problem, tmp_path):
    folder = tmp_path / "authors"
    (folder / "splits").mkdir(parents=True)
    with open(folder / "test_feats.pkl", "wb") as stream:
        pickle.dump({"feats": problem.test_x, "labels": problem.test_y.tolist()}, stream)
    (folder / "splits" / "many.txt").write_text("0\n1\n")
    (folder / "splits" / "medium.txt").write_text("2\nthree\n")
    (folder / "splits" / "few.txt").write_text("4\n")
    done = alphanet("eval", "--classifier", files / "classifier.pt", "--data", folder)
    one_line_error(done, 1, f"{folder / 'splits' / 'medium.txt'}:2: expected a class id (an integer), got 'three'")


def test_binary_hierarchy_is_named(files):
    (files / "hierarchy.txt").write_bytes(bytes(range(256)) * 4)
    done = alphanet(*fit_args(files, "--report", files / "report", "--hierarchy", files / "hierarchy.txt"))
    one_line_error(done, 1, f"{files / 'hierarchy.txt'}: not a text file")
    untouched(files)
    assert not (files / "report").exists()


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(files):
    # text where features belong: no check anticipates it, so it surfaces as an unexpected error
    np.savez(files / "strings.npz", x=np.array([["a"] * 8] * 3), y=np.array([0, 1, 2]))
    done = alphanet(*fit_args(files, train=files / "strings.npz"))
    one_line_error(done, 1, "rerun with --debug for the traceback")
    debug = alphanet(*fit_args(files, "--debug", train=files / "strings.npz"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    untouched(files)


# ----------------------------------------------------------------------------- values and outputs


@pytest.mark.parametrize("option,value,fragment", [
    ("--rho", "1e5", "argument --rho: must be in [0, 100], got 1e5"),
    ("--rho", "1e30", "argument --rho: must be in [0, 100]"),
    ("--seed", str(2**70), "argument --seed: must be in [0, "),
    ("--pred-scale", "1e30", "argument --pred-scale: must be in (0, 10000]"),
    ("--lr", "1e30", "argument --lr: must be in (0, 10]"),
    ("--lr", "nan", "argument --lr: must be a finite number"),
    ("--epochs", "0", "argument --epochs: must be in [1, 10000]"),
    ("--k", "1000", "argument --k: must be in [1, 256]"),
])
def test_option_values_refused_before_work(files, option, value, fragment):
    done = alphanet(*fit_args(files, option, value))
    assert done.returncode == 2 and fragment in done.stderr, done.stderr
    untouched(files)


def test_min_epochs_above_epochs(files):
    one_line_error(alphanet(*fit_args(files, "--min-epochs", "5")), 2, "--min-epochs (5) is above --epochs (2)")
    untouched(files)


def test_rho_whose_work_is_absurd_for_the_data(files):
    # 18 of the 20 classes few: each base row would be drawn hundreds of times an epoch
    done = alphanet(*fit_args(files, "--rho", "100", "--few-threshold", "100", "--many-threshold", "110", "--k", "1"))
    one_line_error(done, 2, "argument --rho: rho=100 would draw", "use a smaller rho")
    untouched(files)


def test_divergence_names_the_learning_rate(files, problem):
    torch.save({"weight": problem.weight * 1e34, "bias": problem.bias}, files / "huge.pt")
    done = alphanet(*fit_args(files, "--pred-scale", "10000", classifier=files / "huge.pt"))
    one_line_error(done, 1, "training diverged at epoch 1", "lr=0.001")
    untouched(files)


def test_nan_in_test_features_fails_before_any_write(files, problem):
    x = problem.test_x.numpy().copy()
    x[7, 3] = np.nan
    np.savez(files / "test.npz", x=x, y=problem.test_y.numpy())
    one_line_error(alphanet(*fit_args(files, "--report", files / "report")), 1,
                   f"{files / 'test.npz'}: the test features contains NaN or inf: nan at row 7, column 3")
    untouched(files)
    assert not (files / "report").exists()


def test_nan_in_val_features_leaves_nothing(files, problem):
    x = problem.val_x.numpy().copy()
    x[2, 1] = np.inf
    np.savez(files / "val.npz", x=x, y=problem.val_y.numpy())
    one_line_error(alphanet(*fit_args(files)), 1, "val_x contains NaN or inf: inf at row 2, column 1")
    untouched(files)


def test_report_equal_to_out(files):
    one_line_error(alphanet(*fit_args(files, "--report", files / "out.pt")), 2, "is also --out")
    untouched(files)


def test_out_equal_to_an_input(files):
    before = (files / "train.npz").read_bytes()
    one_line_error(alphanet(*fit_args(files, out=files / "classifier.pt")), 1, "is the --classifier file")
    assert (files / "train.npz").read_bytes() == before
    untouched(files)


def test_a_report_md_alphanet_did_not_write_is_kept(files):
    (files / "report").mkdir()
    (files / "report" / "report.md").write_text("# my own notes\n")
    one_line_error(alphanet(*fit_args(files, "--report", files / "report")), 1,
                   "holds a report.md that alphanet did not write")
    assert (files / "report" / "report.md").read_text() == "# my own notes\n"
    untouched(files)


def test_eval_of_a_classifier_whose_splits_do_not_match(files, problem):
    done = alphanet(*fit_args(files))
    assert done.returncode == 0, done.stderr
    state = torch.load(files / "out.pt", weights_only=True)
    small = {"weight": state["weight"][:10], "bias": state["bias"][:10]}
    from alphanet_ext.io import read_metadata, save_classifier
    save_classifier(str(files / "small.pt"), small["weight"], small["bias"], read_metadata(str(files / "out.pt")))
    x = problem.test_x.numpy()[problem.test_y.numpy() < 10]
    np.savez(files / "small_test.npz", x=x, y=problem.test_y.numpy()[problem.test_y.numpy() < 10])
    one_line_error(alphanet("eval", "--classifier", files / "small.pt", "--data", files / "small_test.npz"), 1,
                   "the classifier has 10 classes but its class splits name 20")


def test_unwritable_output_folder(files):
    if os.geteuid() == 0:
        target = "/proc/alphanet-out.pt"  # root may write anywhere else
    else:
        locked = files / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = locked / "out.pt"
    done = alphanet(*fit_args(files, out=target))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    untouched(files)


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("stage", ["loaded", "fitted", "staged"])
def test_sigint_before_the_outputs_move_leaves_everything(files, stage):
    (files / "report").mkdir()
    done = alphanet(*fit_args(files, "--report", files / "report", "--stop-at", f"{stage}:SIGINT"))
    assert done.returncode == 130 and "interrupted" in done.stderr and "Traceback" not in done.stderr, done.stderr
    untouched(files)
    assert os.listdir(files / "report") == []


def test_sigint_while_the_outputs_move_completes_them(files):
    done = alphanet(*fit_args(files, "--report", files / "report", "--stop-at", "committing:SIGINT"))
    assert done.returncode == 0, done.stderr
    assert (files / "out.pt").read_bytes() != OLD_OUT
    assert torch.load(files / "out.pt", weights_only=True)["weight"].shape == (20, 8)
    assert (files / "report" / "report.md").exists()


def test_sigkill_leaves_temporaries_that_the_next_run_removes(files):
    done = alphanet(*fit_args(files, "--report", files / "report", "--stop-at", "staged:SIGKILL"))
    assert done.returncode == -signal.SIGKILL
    assert (files / "out.pt").read_bytes() == OLD_OUT
    left = [name for name in os.listdir(files) if name.startswith(".alphanet-tmp-")]
    assert left, "the killed run staged its outputs under temporary names"
    done = alphanet(*fit_args(files, "--report", files / "report"))
    assert done.returncode == 0, done.stderr
    assert [name for name in os.listdir(files) if name.startswith(".alphanet-tmp-")] == []


def test_sigkill_mid_fit_resumes_bit_identical(files):
    expected = files / "expected.pt"
    options = ["--epochs", "6", "--trials", "2", "--seed", "3"]
    assert alphanet(*fit_args(files, *options, out=expected)).returncode == 0
    checkpoint = files / "ckpt"
    done = alphanet(*fit_args(files, *options, "--checkpoint", checkpoint, "--stop-at", "epoch4:SIGKILL"))
    assert done.returncode == -signal.SIGKILL
    assert (files / "out.pt").read_bytes() == OLD_OUT
    done = alphanet(*fit_args(files, *options, "--checkpoint", checkpoint))
    assert done.returncode == 0, done.stderr
    resumed, reference = (torch.load(p, weights_only=True) for p in (files / "out.pt", expected))
    assert torch.equal(resumed["weight"], reference["weight"]) and torch.equal(resumed["bias"], reference["bias"])
    # other options against the same checkpoint: refused, naming the option
    done = alphanet(*fit_args(files, "--epochs", "6", "--trials", "2", "--seed", "4", "--checkpoint", checkpoint))
    one_line_error(done, 1, "the checkpoint was written for a different option 'seed'")


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_names_the_path(files, small_disk, problem):
    big = problem.weight.repeat(200, 1)  # larger than the 64 KiB disk
    torch.save({"weight": big, "bias": torch.zeros(big.shape[0])}, files / "big.pt")
    (small_disk / "out.pt").write_bytes(OLD_OUT)
    done = alphanet("synth", "--preset", "cifar100-lt", "--scale", "0.5", "--out", small_disk / "synth", "--quiet")
    err = one_line_error(done, 1, "no space left on device")
    assert str(small_disk) in err
    assert (small_disk / "out.pt").read_bytes() == OLD_OUT


def test_full_disk_during_a_fit_keeps_the_earlier_outputs(files, small_disk):
    (small_disk / "out.pt").write_bytes(OLD_OUT)
    done = alphanet(*fit_args(files, "--report", small_disk / "report", out=small_disk / "out.pt"))
    err = one_line_error(done, 1, "no space left on device")
    assert str(small_disk) in err
    assert (small_disk / "out.pt").read_bytes() == OLD_OUT
    assert [name for name in os.listdir(small_disk) if name.startswith(".alphanet-tmp-")] == []
