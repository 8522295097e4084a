import importlib
import math
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import alphanet_ext
from alphanet_ext import ops, reference, synthetic
from alphanet_ext.config import FitConfig
from alphanet_ext.data import gather_rows as original_gather
from alphanet_ext.fit import fit_with_config
from alphanet_ext.metrics import SPLIT_NAMES
from alphanet_ext.training.cache import CacheSizes
from conftest import DEVICES, HAS_EMULATION, on_backend

# where host rows can be sent: CUDA goes through a pinned buffer (data._uploaded_row_chunks)
HOST_AND_GPU = [device for device in DEVICES if device != "emulated-cuda"]


@pytest.fixture(scope="module")
def problem():
    return synthetic.make_long_tailed(num_classes=40, dim=24, max_count=300, min_count=4, seed=11)


def quick_fit(problem, **kwargs):
    options = dict(epochs=6, progress=False)
    options.update(kwargs)
    options.setdefault("min_epochs", min(2, options["epochs"]))
    return alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, problem.val_x,
                            problem.val_y, **options)


def sized_fit(problem, sizes, **kwargs):
    """quick_fit with the temporaries' sizes (and the memory budget) set."""
    options = {"epochs": 6, **kwargs}
    options.setdefault("min_epochs", min(2, options["epochs"]))
    return fit_with_config(problem.train_x, problem.train_y, problem.weight, problem.bias, problem.val_x,
                           problem.val_y, FitConfig(**options), progress=False, sizes=sizes)


def test_result_shapes_and_base_rows_untouched(problem):
    result = quick_fit(problem, k=3)
    few = result.splits["few"]
    base = torch.cat([result.splits["many"], result.splits["medium"]])
    assert result.weight.shape == problem.weight.shape and result.bias.shape == problem.bias.shape
    assert torch.equal(result.weight[base], problem.weight[base])
    assert torch.equal(result.bias[base], problem.bias[base])
    assert not torch.equal(result.weight[few], problem.weight[few])
    assert result.neighbors.shape == (few.numel(), 3) and result.alphas.shape == (few.numel(), 3)
    assert torch.isin(result.neighbors, base).all()
    torch.testing.assert_close(result.alphas.abs().sum(1), torch.ones(few.numel()))
    assert len(result.history) == 6 and 2 <= result.best_epochs[0] <= 6
    # The corrected rows are w_c + sum_i alpha_i v_i with the reported coefficients.
    expected = problem.weight[few] + torch.einsum("ck,ckd->cd", result.alphas, problem.weight[result.neighbors])
    torch.testing.assert_close(result.weight[few], expected, rtol=1e-5, atol=1e-5)


def test_neighbours_are_the_nearest_base_class_means(problem):
    result = quick_fit(problem, k=4, epochs=1)
    means, _ = alphanet_ext.class_means(problem.train_x, problem.train_y, 40)
    base = torch.cat([result.splits["many"], result.splits["medium"]]).sort().values
    distances = torch.cdist(means[result.splits["few"]].double(), means[base].double())
    expected = base[distances.argsort(dim=1)[:, :4]]
    assert torch.equal(result.neighbors, expected)


def test_logit_space_scores_equal_materialised_classifier(problem):
    """The training/validation path (combine logit columns) gives the scores of the exported W-hat."""
    result = quick_fit(problem, k=3, epochs=2)
    few = result.splits["few"]
    logits = problem.val_x @ problem.weight.T
    few_scores = alphanet_ext.alpha_combine(logits, few, result.neighbors, result.alphas, dim=1) + result.bias[few]
    materialised = problem.val_x @ result.weight.T + result.bias
    torch.testing.assert_close(few_scores, materialised[:, few], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_EMULATION, reason="needs the CPU build's CUDA emulator")
def test_fit_through_the_cuda_kernels_matches_the_cpu_kernels(problem):
    """The whole correction with class means, kNN and the combine on the CUDA kernels (emulated)."""
    on_cpu = quick_fit(problem, k=3, epochs=3, seed=2)
    with on_backend("emulated-cuda"):
        on_cuda_kernels = quick_fit(problem, k=3, epochs=3, seed=2)
    assert torch.equal(on_cuda_kernels.neighbors, on_cpu.neighbors)
    torch.testing.assert_close(on_cuda_kernels.class_means, on_cpu.class_means, rtol=0, atol=0)
    torch.testing.assert_close(on_cuda_kernels.alphas, on_cpu.alphas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on_cuda_kernels.weight, on_cpu.weight, rtol=1e-5, atol=1e-6)
    assert on_cuda_kernels.best_epochs == on_cpu.best_epochs


def test_deterministic_for_a_seed(problem):
    first, second = quick_fit(problem, seed=3), quick_fit(problem, seed=3)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.history == second.history
    other = quick_fit(problem, seed=4)
    assert not torch.equal(first.weight, other.weight)


def test_batched_trials_match_separate_runs(problem):
    together = quick_fit(problem, trials=3, seed=5, epochs=3)
    for trial in range(3):
        alone = quick_fit(problem, trials=1, seed=5 + trial, epochs=3)
        for epoch_together, epoch_alone in zip(together.history, alone.history):
            assert epoch_together["loss"][trial] == pytest.approx(epoch_alone["loss"][0], rel=1e-4)
    assert together.best_trial in (0, 1, 2) and len(together.trial_val_top1) == 3
    summary = together.summary()
    assert set(summary) == {"many", "medium", "few", "overall"} and summary["few"]["std"] >= 0
    overall = [t["overall"] for t in together.trial_val_top1]
    assert overall[together.best_trial] == max(overall)
    # every trial's classifier, rebuilt from the input one, scores what the fit recorded for it on val
    for trial in range(3):
        weight, bias = together.trial_classifier(trial, problem.weight, problem.bias)
        scored = alphanet_ext.evaluate(weight, bias, problem.val_x, problem.val_y, together.splits)["top1"]
        assert scored == pytest.approx(together.trial_val_top1[trial], abs=1e-4)
    weight, bias = together.trial_classifier(together.best_trial, problem.weight, problem.bias)
    assert torch.equal(weight, together.weight) and torch.equal(bias, together.bias)
    few = together.splits["few"]
    weight, bias = together.trial_classifier(together.best_trial, problem.weight, None)  # no bias: zeros
    assert torch.equal(weight, together.weight) and torch.equal(bias[few], together.bias[few])
    assert bias.shape == (40,) and bias.count_nonzero() == few.numel()


def test_numpy_and_memmap_inputs_give_the_same_result(problem, tmp_path):
    expected = quick_fit(problem, epochs=2)
    path = tmp_path / "train.npy"
    np.save(path, problem.train_x.numpy())
    mapped = np.load(path, mmap_mode="r")
    result = alphanet_ext.fit(mapped, problem.train_y.numpy(), problem.weight.numpy(), problem.bias.numpy(),
                              problem.val_x.numpy(), problem.val_y.numpy(), epochs=2, min_epochs=2, progress=False)
    assert torch.equal(result.weight, expected.weight)


def test_features_held_on_the_device_give_the_same_result(problem, tmp_path, monkeypatch):
    """On a GPU, host features are copied to the device during the class-means
    pass and the epochs gather from that copy; forced here on the CPU."""
    path = tmp_path / "train.npy"
    np.save(path, problem.train_x.numpy())
    mapped = np.load(path, mmap_mode="r")
    expected = quick_fit(problem, epochs=2, seed=6)
    copies = []

    def gather_rows(array, *args):
        copies.append(type(array))
        return original_gather(array, *args)

    result = fit_with_config(mapped, problem.train_y, problem.weight, problem.bias, problem.val_x, problem.val_y,
                             FitConfig(epochs=2, min_epochs=2, seed=6), progress=False, keep_features=True,
                             sizes=CacheSizes(gather=gather_rows))
    assert copies and set(copies) == {torch.Tensor}
    assert torch.equal(result.weight, expected.weight) and result.history == expected.history


def test_blocked_logits_and_chunked_epochs_give_the_same_fit(problem, monkeypatch):
    """Few-split and val logits go in row blocks and each epoch in chunks of
    batches; at iNaturalist size there are many of each. Small blocks (7 rows)
    and chunks (3 batches, the last one short) must not change the fit."""
    options = dict(epochs=3, batch_size=8, trials=2, seed=3)
    expected = quick_fit(problem, **options)
    few_samples = int(torch.isin(problem.train_y, expected.splits["few"]).sum())
    assert (2 * few_samples) % 24 and few_samples > 7 and problem.val_x.shape[0] % 7
    result = sized_fit(problem, CacheSizes(row_block=7, chunk_values=3 * 8 * 2 * 40), **options)
    torch.testing.assert_close(result.weight, expected.weight, rtol=1e-5, atol=1e-6)
    assert [e["val_top1"] for e in result.history] == [e["val_top1"] for e in expected.history]
    assert result.best_epochs == expected.best_epochs
    torch.testing.assert_close([e["loss"] for e in result.history], [e["loss"] for e in expected.history])


@pytest.mark.parametrize("kept", ["none", "few-split only", "both, to the byte"])
def test_logits_too_large_to_keep_are_computed_every_epoch(problem, monkeypatch, kept):
    """Beyond iNaturalist scale the few-split and val logits may not fit in
    memory; the fit then computes them every epoch, with a warning, and gets
    the same result up to rounding."""
    options = dict(epochs=3, batch_size=16, trials=2, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about with the memory this machine has
        expected = quick_fit(problem, **options)
    few_samples = int(torch.isin(problem.train_y, expected.splits["few"]).sum())
    few_bytes, val_bytes = few_samples * 40 * 4, problem.val_x.shape[0] * 40 * 4
    # half of what is available may be kept: nothing; both but for 1 byte; both exactly
    available, warned = {"none": (0, ["the few-split", "the val"]),
                         "few-split only": (2 * (few_bytes + val_bytes) - 2, ["the val"]),
                         "both, to the byte": (2 * (few_bytes + val_bytes), [])}[kept]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sized_fit(problem, CacheSizes(row_block=300, budget=available / 2), **options)  # several val blocks
    assert [str(w.message).split(" samples")[0] for w in caught] == warned
    assert all("computing them every epoch" in str(w.message) for w in caught)
    torch.testing.assert_close(result.weight, expected.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.bias, expected.bias, rtol=1e-5, atol=1e-6)
    assert [e["val_top1"] for e in result.history] == [e["val_top1"] for e in expected.history]
    torch.testing.assert_close([e["loss"] for e in result.history], [e["loss"] for e in expected.history])


def test_available_memory_is_the_hosts():
    from alphanet_ext.data import available_memory
    available = available_memory(torch.device("cpu"))
    if not os.path.exists("/proc/meminfo"):
        assert available is None
        return
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    assert free / 2 <= available <= total


def test_val_rows_that_are_not_finite_are_named_when_not_kept(problem, monkeypatch):
    val_x = problem.val_x.clone()
    val_x[700, 3] = math.inf
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="val_x contains NaN or inf: inf at row 700, column 3"):
        fit_with_config(problem.train_x, problem.train_y, problem.weight, problem.bias, val_x, problem.val_y,
                        FitConfig(epochs=1), progress=False, sizes=CacheSizes(row_block=300, budget=0))


@pytest.mark.skipif(not torch.cuda.is_available() or not alphanet_ext.compiled_with_cuda(), reason="needs a GPU")
def test_fit_on_cuda_from_host_features_matches_device_features(problem, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("alphanet_ext.data"), "CHUNK_ROWS", 100)  # uploads reuse their buffer
    assert problem.train_x.shape[0] > 3 * 100
    path = tmp_path / "train.npy"
    np.save(path, problem.train_x.numpy())
    mapped = np.load(path, mmap_mode="r")
    from alphanet_ext.training.statistics import keeps_features_on
    assert keeps_features_on(torch.device("cuda"), mapped) and keeps_features_on(torch.device("cuda"), problem.train_x)
    assert not keeps_features_on(torch.device("cuda"), problem.train_x.cuda())
    from_host = quick_fit(problem, epochs=2, seed=6, device="cuda")
    from_file = alphanet_ext.fit(mapped, problem.train_y, problem.weight, problem.bias, problem.val_x, problem.val_y,
                                 epochs=2, min_epochs=2, seed=6, device="cuda", progress=False)
    on_device = alphanet_ext.fit(problem.train_x.cuda(), problem.train_y, problem.weight, problem.bias,
                                 problem.val_x, problem.val_y, epochs=2, min_epochs=2, seed=6, device="cuda",
                                 progress=False)
    assert torch.equal(from_host.weight, on_device.weight) and torch.equal(from_file.weight, on_device.weight)


def test_full_batches_reach_the_replayed_step_through_its_buffers(problem, monkeypatch):
    # the CUDA-graph path's plumbing on any device, with a capture that runs the step on the
    # buffers when replayed: it must give the eager fit's values (a real graph: the test below)
    from alphanet_ext.training.step import ReplayedStep as replayed_step
    captures = []

    def capture(self):
        captures.append(self.lr)
        buffers = list(self.buffers)
        return lambda: self.step(*buffers)

    options = dict(epochs=4, min_epochs=1, lr_step=2, batch_size=16, trials=2, seed=5)
    eager = quick_fit(problem, **options)
    monkeypatch.setattr(replayed_step, "wanted", staticmethod(lambda device, enabled=True: enabled))
    monkeypatch.setattr(replayed_step, "_capture", capture)
    replayed = quick_fit(problem, **options)
    assert len(captures) == 2  # one for each learning rate
    assert [r["loss"] for r in replayed.history] == [r["loss"] for r in eager.history]
    assert torch.equal(replayed.trial_alphas, eager.trial_alphas) and torch.equal(replayed.weight, eager.weight)


@pytest.mark.skipif(not torch.cuda.is_available() or not alphanet_ext.compiled_with_cuda(), reason="needs a GPU")
def test_fit_on_cuda_replays_full_batches_as_a_graph_with_the_eager_results(problem, monkeypatch):
    captures = []
    capture = torch.cuda.graph
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, *args, **kwargs: captures.append(graph) or
                        capture(graph, *args, **kwargs))
    # 16-row batches: several full ones an epoch and a short last one; the rate steps down after epoch 2
    options = dict(epochs=4, min_epochs=1, lr_step=2, batch_size=16, trials=2, seed=5, device="cuda")
    replayed = quick_fit(problem, **options)
    assert len(captures) == 2  # one graph for each learning rate
    eager = quick_fit(problem, **options, cuda_graphs=False)
    assert len(captures) == 2
    assert [r["loss"] for r in replayed.history] == [r["loss"] for r in eager.history]
    assert torch.equal(replayed.trial_alphas, eager.trial_alphas) and torch.equal(replayed.weight, eager.weight)


def test_cupy_inputs_on_cuda_match_torch_inputs(problem):
    """cupy arrays come in through DLPack, without a copy."""
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available() or not alphanet_ext.compiled_with_cuda():
        pytest.skip("needs a GPU")
    arrays = [cupy.from_dlpack(t.cuda()) for t in (problem.train_x, problem.train_y, problem.weight, problem.bias,
                                                   problem.val_x, problem.val_y)]
    from alphanet_ext.data import as_tensor
    assert as_tensor(arrays[0], "train_x").data_ptr() == arrays[0].data.ptr
    from_cupy = alphanet_ext.fit(*arrays, epochs=2, min_epochs=2, seed=7, device="cuda", progress=False)
    from_torch = alphanet_ext.fit(*(torch.from_dlpack(a) for a in arrays), epochs=2, min_epochs=2, seed=7,
                                  device="cuda", progress=False)
    assert torch.equal(from_cupy.weight, from_torch.weight) and torch.equal(from_cupy.neighbors, from_torch.neighbors)


def test_inputs_are_not_modified(problem):
    copies = [t.clone() for t in (problem.train_x, problem.train_y, problem.weight, problem.bias)]
    quick_fit(problem, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(copies, (problem.train_x, problem.train_y, problem.weight, problem.bias)))


def test_a_modules_parameters_and_features_with_grad_are_accepted(problem):
    # as a training script has them: the last layer's parameters, features from a forward pass
    layer = torch.nn.Linear(problem.weight.shape[1], problem.weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(problem.weight)
        layer.bias.copy_(problem.bias)
    features = problem.train_x.clone().requires_grad_()
    from_module = alphanet_ext.fit(features, problem.train_y, layer.weight, layer.bias, epochs=2, progress=False)
    plain = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, epochs=2, progress=False)
    assert torch.equal(from_module.weight, plain.weight) and not from_module.weight.requires_grad
    assert layer.weight.grad is None and torch.equal(layer.weight, problem.weight)
    scores = alphanet_ext.evaluate(layer.weight, layer.bias, features, problem.train_y, plain.splits)
    expected = alphanet_ext.evaluate(problem.weight, problem.bias, problem.train_x, problem.train_y, plain.splits)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


def test_features_that_are_not_arrays_are_named():
    with pytest.raises(TypeError, match="train_x: expected a torch tensor, numpy array or cupy array, got list"):
        alphanet_ext.fit([[1.0, 2.0]], [0], torch.ones(2, 2), progress=False)


def test_without_val_keeps_the_last_epoch(problem):
    result = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, progress=False)
    assert len(result.history) == 10 and result.best_epochs == [10] and result.trial_val_top1 == []


def test_epoch_selection_learning_rate_schedule_and_epoch_size(problem, monkeypatch):
    steps = []  # the learning rate of every optimiser step
    from alphanet_ext.training.step import FusedAdamW
    original_step = FusedAdamW.step

    def recording_step(self, grads):
        steps.append(self.lr)
        original_step(self, grads)
    monkeypatch.setattr(FusedAdamW, "step", recording_step)
    # a small val set, so epochs often tie on val accuracy: the first best one must win
    keep = torch.arange(problem.val_y.numel()) % 6 == 0
    val_x, val_y = problem.val_x[keep], problem.val_y[keep]
    result = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, val_x, val_y,
                              epochs=12, min_epochs=4, lr=0.01, lr_step=5, lr_gamma=0.5, rho=0.7, batch_size=1,
                              trials=2, seed=4, progress=False, device="cpu")  # here: epochs 1-3 score best, trial 1 wins
    few_samples = int(torch.isin(problem.train_y, result.splits["few"]).sum())
    epoch_size = few_samples + round(0.7 * few_samples)  # base samples drawn per epoch: round(rho * few samples)
    assert len(steps) == 12 * epoch_size  # batch 1: one step per sample
    assert steps == [0.01 * 0.5 ** ((epoch - 1) // 5) for epoch in range(1, 13) for _ in range(epoch_size)]
    for t in range(2):
        scores = [record["val_top1"][t]["overall"] for record in result.history]
        eligible = scores[3:]
        assert result.best_epochs[t] == 4 + eligible.index(max(eligible))
        assert [record["chosen"][t] for record in result.history] == \
            [record["epoch"] == result.best_epochs[t] for record in result.history]
    best = result.best_trial
    assert best == max(range(2), key=lambda t: result.history[result.best_epochs[t] - 1]["val_top1"][t]["overall"])
    # the classifier returned is the one the chosen epoch scored on val
    chosen_val = result.history[result.best_epochs[best] - 1]["val_top1"][best]
    assert alphanet_ext.evaluate(result.weight, result.bias, val_x, val_y, result.splits)["top1"] == \
        pytest.approx(chosen_val, nan_ok=True)
    scaled = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, val_x, val_y, epochs=3,
                              min_epochs=1, pred_scale=3.0, progress=False, device="cpu")
    assert alphanet_ext.evaluate(scaled.weight, scaled.bias, val_x, val_y, scaled.splits)["top1"] == \
        pytest.approx(scaled.history[scaled.best_epochs[0] - 1]["val_top1"][0], nan_ok=True)
    for epochs, min_epochs in ((5, 5), (3, None)):  # the last epoch, however the earlier ones scored
        late = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, val_x, val_y,
                                epochs=epochs, min_epochs=min_epochs, trials=3, progress=False)
        assert late.best_epochs == [epochs] * 3
    with pytest.raises(ValueError, match=r"min_epochs \(9\) is above epochs \(3\)"):
        alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, val_x, val_y,
                         epochs=3, min_epochs=9, progress=False)


def test_epoch_samples_and_loss_follow_the_method(problem, monkeypatch):
    """Every few-split sample once per epoch plus rho * F base samples, each a uniform
    base class then a uniform member; the loss is the cross-entropy of the corrected
    classifier over them (lr ~ 0 keeps the classifier at the one returned)."""
    gathered = []

    def recording_gather(x, rows, *args):
        gathered.append(rows.cpu().clone())
        return original_gather(x, rows, *args)
    rho, pred_scale = 20.0, 1.5
    result = fit_with_config(problem.train_x, problem.train_y, problem.weight, problem.bias, None, None,
                             FitConfig(epochs=1, rho=rho, lr=1e-12, pred_scale=pred_scale), progress=False,
                             device="cpu", sizes=CacheSizes(gather=recording_gather))
    rows = torch.cat(gathered)
    is_few = torch.isin(problem.train_y, result.splits["few"])
    few_rows, base_rows = rows[is_few[rows]], rows[~is_few[rows]]
    assert torch.equal(few_rows.sort().values, torch.nonzero(is_few).flatten())  # each few sample once
    assert base_rows.numel() == round(rho * few_rows.numel())
    base_classes = torch.cat([result.splits["many"], result.splits["medium"]])
    per_class = torch.bincount(problem.train_y[base_rows], minlength=40)[base_classes].double()
    expected = base_rows.numel() / base_classes.numel()  # the same for a class of 20 samples and of 300
    assert (per_class - expected).abs().max() < 5 * expected ** 0.5
    largest = base_classes[torch.bincount(problem.train_y, minlength=40)[base_classes].argmax()]
    drawn = base_rows[problem.train_y[base_rows] == largest]
    size = int((problem.train_y == largest).sum())
    distinct = size * (1 - (1 - 1 / size) ** drawn.numel())  # expected distinct members under uniform draws
    assert abs(drawn.unique().numel() - distinct) < 0.15 * distinct

    samples = torch.cat([few_rows, base_rows])
    scores = pred_scale * (problem.train_x[samples] @ result.weight.T + result.bias)
    loss = torch.nn.functional.cross_entropy(scores.double(), problem.train_y[samples])
    assert result.history[0]["loss"][0] == pytest.approx(float(loss), rel=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "random"])
def test_other_metrics(problem, metric):
    result = quick_fit(problem, metric=metric, epochs=2)
    assert torch.isfinite(result.weight).all()


@pytest.mark.parametrize("name", ["result.pt", "result", ".result", "result.v2.bin"])
def test_save_and_load(problem, tmp_path, name):
    result = quick_fit(problem, epochs=2)
    path = tmp_path / name
    result.save(path)
    loaded = alphanet_ext.load(path)
    assert torch.equal(loaded.weight, result.weight) and loaded.history == result.history
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left behind


def test_load_reads_results_without_the_optional_fields(problem, tmp_path):
    """A file from a version that had not yet added FitResult's optional fields still loads."""
    from dataclasses import MISSING, asdict, fields
    result = quick_fit(problem, epochs=2)
    optional = {f.name for f in fields(alphanet_ext.FitResult)
                if f.default is not MISSING or f.default_factory is not MISSING}
    assert {"class_means", "mlp_state", "version"} <= optional
    torch.save({key: value for key, value in asdict(result).items() if key not in optional}, tmp_path / "old.pt")
    loaded = alphanet_ext.load(tmp_path / "old.pt")
    assert torch.equal(loaded.weight, result.weight) and loaded.class_means is None and loaded.mlp_state == {}


def test_load_refuses_what_save_did_not_write(problem, tmp_path):
    result = quick_fit(problem, epochs=2)
    with pytest.raises(IsADirectoryError, match="is a folder; give the path of a file"):
        result.save(tmp_path)
    torch.save({"weight": problem.weight}, tmp_path / "classifier.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    result.save(tmp_path / "result.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "result.pt").read_bytes()[:2000])
    for name, found in (("classifier.pt", r"found \['weight'\]"), ("garbage.pt", "torch.load raised"),
                        ("truncated.pt", "torch.load raised")):
        with pytest.raises(ValueError, match=f"{name}: not a result saved by FitResult.save " + f"\\(.*{found}"):
            alphanet_ext.load(tmp_path / name)
    # a pickle that would run code is refused, not run
    (tmp_path / "code.pt").write_bytes(pickle.dumps(Exploit(str(tmp_path / "ran")), protocol=2))
    with pytest.raises(ValueError, match="torch.load raised"):
        alphanet_ext.load(tmp_path / "code.pt")
    assert not (tmp_path / "ran").exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))


def test_corrects_the_few_split_and_beats_random_neighbours():
    """Few-split test top-1 rises by >= 5 points at rho=0.5 (mean of 3 seeds), and
    nearest neighbours beat the random-neighbour control."""
    gains, nearest_few, random_few = [], [], []
    for seed in range(3):
        problem = synthetic.make_long_tailed(num_classes=100, dim=64, seed=seed)
        baseline = alphanet_ext.evaluate(problem.weight, problem.bias, problem.test_x, problem.test_y,
                                         alphanet_ext.make_splits(torch.bincount(problem.train_y, minlength=100)))
        for metric, store in (("euclidean", nearest_few), ("random", random_few)):
            result = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, problem.val_x,
                                      problem.val_y, rho=0.5, metric=metric, seed=seed, progress=False)
            corrected = alphanet_ext.evaluate(result.weight, result.bias, problem.test_x, problem.test_y, result.splits)
            store.append(corrected["top1"]["few"])
            if metric == "euclidean":
                gains.append(corrected["top1"]["few"] - baseline["top1"]["few"])
    assert np.mean(gains) >= 5, gains
    assert np.mean(nearest_few) > np.mean(random_few), (nearest_few, random_few)


def test_combine_experts_matches_the_average_of_experts():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(7, d, generator=generator) for d in (3, 5)]
    biases = [torch.randn(7, generator=generator) for _ in range(2)]
    features = [torch.randn(4, d, generator=generator) for d in (3, 5)]
    weight, bias = alphanet_ext.combine_experts(weights, biases)
    average = sum(x @ w.T + b for x, w, b in zip(features, weights, biases)) / 2
    torch.testing.assert_close(torch.cat(features, dim=1) @ weight.T + bias, average)
    alone = alphanet_ext.combine_experts(weights[:1])
    assert torch.equal(alone[0], weights[0]) and torch.equal(alone[1], torch.zeros(7))
    with pytest.raises(ValueError, match="same number of classes"):
        alphanet_ext.combine_experts([weights[0][:6], weights[1], weights[1]])


def test_unusable_devices_are_named(monkeypatch):
    x, y, splits = torch.ones(2, 3), torch.zeros(2, dtype=torch.long), {"few": torch.tensor([0])}
    with pytest.raises(ValueError, match="device 'cuda:64': "):
        alphanet_ext.evaluate(torch.ones(1, 3), None, x, y, splits, device="cuda:64")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
            alphanet_ext.fit(x, y, torch.ones(1, 3), device="cuda")
    # a GPU, but an extension built without its CUDA kernels
    from alphanet_ext import data, ops
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ops, "compiled_with_cuda", lambda: True)
    assert data.resolve_device(None) == data.resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(ops, "compiled_with_cuda", lambda: False)
    assert data.resolve_device(None) == torch.device("cpu")
    if ops.HAS_EXTENSION:
        with pytest.raises(ValueError, match="device 'cuda': alphanet_ext was built without its CUDA kernels"):
            data.resolve_device("cuda")


def test_evaluate_hand_computed():
    weight = torch.eye(3)
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    y = torch.tensor([0, 1, 1, 2])
    splits = {"many": torch.tensor([0]), "medium": torch.tensor([1]), "few": torch.tensor([2])}
    result = alphanet_ext.evaluate(weight, None, x, y, splits)
    assert result["top1"] == {"many": 100.0, "medium": 50.0, "few": 0.0, "overall": 50.0}
    assert result["top5"]["overall"] == 100.0
    assert result["per_class_top1"].tolist() == [100.0, 50.0, 0.0]
    assert result["predictions"].tolist() == [0, 1, 2, 0]
    # a split left out scores NaN; splits that cannot be right are named
    assert math.isnan(alphanet_ext.evaluate(weight, None, x, y, {"many": [0, 1]})["top1"]["few"])
    ranked = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]]).repeat(4, 1)  # class c ranks c + 1 in every row
    ranks = alphanet_ext.evaluate(torch.eye(7), None, ranked, torch.tensor([0, 3, 4, 5]))
    assert ranks["top1"]["overall"] == 25.0 and ranks["top5"]["overall"] == 75.0  # ranks 1 and 4, 5 are in; 6 is not
    without = alphanet_ext.evaluate(weight, None, x, y)
    assert without["top1"]["overall"] == 50.0 and all(math.isnan(without["top1"][name]) for name in SPLIT_NAMES)
    for bad, message in (({"many": [0, 1], "medium": [1]}, "class 1 is in both 'many' and 'medium'"),
                         ({"few": [3]}, r"splits\['few'\] has class 3, outside the classifier's 3 classes"),
                         ({"tail": [2]}, "unknown split 'tail'")):
        with pytest.raises(ValueError, match=message):
            alphanet_ext.evaluate(weight, None, x, y, bad)


def test_evaluate_in_row_blocks_scores_every_row(problem, monkeypatch):
    metrics = importlib.import_module("alphanet_ext.metrics")
    splits = alphanet_ext.make_splits(torch.bincount(problem.train_y, minlength=40))
    x, y = problem.test_x[:1996], problem.test_y[:1996]
    expected = alphanet_ext.evaluate(problem.weight, problem.bias, x, y, splits)
    monkeypatch.setattr(metrics, "EVALUATION_ROWS", 7)  # 1996 rows: 285 blocks of 7 and one of 1
    blocked = alphanet_ext.evaluate(problem.weight, problem.bias, x, y, splits)
    assert torch.equal(blocked["predictions"], expected["predictions"])
    assert blocked["top1"] == expected["top1"] and blocked["top5"] == expected["top5"]
    best = (x.double() @ problem.weight.double().T + problem.bias.double()).topk(2, dim=1)
    clear = best.values[:, 0] - best.values[:, 1] > 1e-3  # rows whose top class no rounding can change
    assert clear[-1] and clear.float().mean() > 0.99  # the last block's one row too
    assert torch.equal(blocked["predictions"][clear], best.indices[clear, 0])
    assert torch.equal(blocked["per_class_top1"], expected["per_class_top1"])
    x = problem.test_x.clone()
    x[1500, 4] = math.nan
    with pytest.raises(ValueError, match="x contains NaN or inf: nan at row 1500, column 4"):
        alphanet_ext.evaluate(problem.weight, problem.bias, x, problem.test_y, splits)
    empty = alphanet_ext.evaluate(problem.weight, problem.bias, problem.test_x[:0], problem.test_y[:0], splits)
    assert empty["samples"] == 0 and empty["predictions"].shape == (0,)


def test_make_splits_takes_counts_of_any_array_kind():
    counts = [3, 20, 100, 101, 0]
    expected = {"many": [3], "medium": [1, 2], "few": [0, 4]}
    for kind in (list, np.array, torch.tensor, lambda c: torch.tensor(c, dtype=torch.float64)):
        assert {name: ids.tolist() for name, ids in alphanet_ext.make_splits(kind(counts)).items()} == expected
    for bad, message in (([3, -1], r"counts must be >= 0, got -1 \(class 1\)"), ([[3, 4]], "counts must be 1-D"),
                         ([3.0, float("nan")], "counts contains NaN or inf")):
        with pytest.raises(ValueError, match=message):
            alphanet_ext.make_splits(bad)


@pytest.mark.parametrize("change,message", [
    (dict(train_y=torch.full((5,), 99)), "train_y has label 99 outside the classifier's"),
    (dict(k=0), r"k must be in \[1, 256\], got 0"),
    (dict(k=50), r"k=50 is larger than the base split"),
    (dict(metric="manhattan"), "metric must be one of"),
    (dict(rho=-1.0), "rho must be"),
    (dict(val_y=None), "give both val_x and val_y"),
    (dict(weight=torch.zeros(40, 7)), "train_x has 24 features but the classifier expects 7"),
    (dict(bias=torch.zeros(3)), r"bias must have shape \[40\]"),
    (dict(train_x="nan"), r"train_x contains NaN or inf: nan at row 3, column 2 \(1 more values in rows 0\.\."),
    (dict(val_x="nan"), r"val_x contains NaN or inf: nan at row 3, column 2 \(1 more values in rows 0\.\."),
    (dict(weight="inf"), r"the classifier's weight contains NaN or inf: inf at row 3, column 2 \(1 more"),
    (dict(bias="inf"), r"the classifier's bias contains NaN or inf: -inf at row 3$"),
    (dict(few_threshold=500, many_threshold=1000), "no base class"),
    (dict(batch_size=0), r"batch_size must be in \[1, 1048576\], got 0"),
    (dict(lr_step=0), r"lr_step must be in \[1, 10000\], got 0"),
    (dict(trials=0), r"trials must be in \[1, 64\], got 0"),
    (dict(train_y="drop_class"), r"class\(es\) have no training samples \(7\)"),
    (dict(few_threshold=1), "no few-split class"),
    (dict(pred_scale=float("nan")), r"pred_scale must be in \(0, 10000\], got nan"),
    (dict(lr=0.0), r"lr must be in \(0, 10\], got 0.0"),
    (dict(weight_decay=-1.0), r"weight_decay must be in \[0, 100\], got -1.0"),
    (dict(hidden=(32, 0)), r"hidden must be at most 16 layer widths, each in \[1, 65536\], got \(32, 0\)"),
    # values that would run for hours, overflow or make no sense are refused before any work
    (dict(rho=1e5), r"rho must be in \[0, 100\], got 100000.0"),
    (dict(rho=1e30), r"rho must be in \[0, 100\]"),
    (dict(rho=99.0, k=2, few_threshold=250, many_threshold=260), r"rho=99 would draw .* base samples an epoch from .* base training rows"),
    (dict(seed=2**70), r"seed must be in \[0, "),
    (dict(seed=-1), r"seed must be in \[0, "),
    (dict(lr=1e30), r"lr must be in \(0, 10\]"),
    (dict(pred_scale=1e30), r"pred_scale must be in \(0, 10000\]"),
    (dict(lr_gamma=2.0), r"lr_gamma must be in \(0, 1\]"),
    (dict(epochs=2, min_epochs=3), r"min_epochs \(3\) is above epochs \(2\)"),
    (dict(few_threshold=300, many_threshold=100), r"few_threshold \(300\) cannot exceed many_threshold \+ 1"),
    (dict(device="mps"), "device 'mps': alphanet_ext runs on 'cpu' or 'cuda'"),
    (dict(device="cuda:64"), "device 'cuda:64': "),
    (dict(device="gpu"), "device 'gpu' is not a device: use 'cpu', 'cuda' or 'cuda:N'"),
])
def test_bad_input(problem, change, message):
    args = dict(train_x=problem.train_x, train_y=problem.train_y, weight=problem.weight, bias=problem.bias,
                val_x=problem.val_x, val_y=problem.val_y, epochs=1, progress=False)
    if change.get("train_y") is not None and not isinstance(change["train_y"], str):
        change = dict(change, train_y=torch.cat([problem.train_y[:-5], change["train_y"]]))
    args.update(change)
    for key in ("train_x", "val_x"):
        if isinstance(args[key], str):
            args[key] = problem.__dict__[key].clone()
            args[key][3, 2] = args[key][6, 5] = float("nan")
    if isinstance(args["weight"], str):
        args["weight"] = problem.weight.clone()
        args["weight"][3, 2] = args["weight"][8, 0] = float("inf")
    if isinstance(args["bias"], str):
        args["bias"] = problem.bias.clone()
        args["bias"][3] = -float("inf")
    if isinstance(args["train_y"], str):
        keep = problem.train_y != 7
        args["train_x"], args["train_y"] = problem.train_x[keep], problem.train_y[keep]
    with pytest.raises(ValueError, match=message):
        alphanet_ext.fit(**args)


def test_labels_features_and_classifier_of_the_wrong_kind_are_named(problem):
    def fit(**change):
        args = dict(train_x=problem.train_x, train_y=problem.train_y, weight=problem.weight, bias=problem.bias,
                    epochs=1, progress=False)
        return alphanet_ext.fit(**{**args, **change})

    for labels in (problem.train_y.float(), problem.train_y.bool(), problem.train_y.to(torch.complex64)):
        with pytest.raises(ValueError, match=f"train_y must hold integer class ids, got {labels.dtype}"):
            fit(train_y=labels)
    with pytest.raises(ValueError, match="train_x must hold floating-point features, got torch.int64"):
        fit(train_x=problem.train_x.long())
    with pytest.raises(ValueError, match=r"weight must be a floating-point \[classes, features\] matrix, got torch.int32"):
        fit(weight=problem.weight.int())
    with pytest.raises(ValueError, match=r"weight must be a floating-point \[classes, features\] matrix, got "
                                         r"torch.float32 \(960,\)"):
        fit(weight=problem.weight.flatten())
    for labels in (problem.train_y.int(), problem.train_y.to(torch.uint8), problem.train_y.numpy().astype(np.int16)):
        assert torch.equal(fit(train_y=labels, seed=2).weight, fit(seed=2).weight)  # any integer type


@pytest.mark.parametrize("change,message", [
    (dict(k=2.5), "k must be an integer, got 2.5"),
    (dict(epochs=2.0), "epochs must be an integer, got 2.0"),
    (dict(seed=None), "seed must be an integer, got None"),
    (dict(trials=True), "trials must be an integer, got True"),
    (dict(hidden=32), r"hidden must be a sequence of layer widths such as \(32, 32, 32\), got 32"),
    (dict(hidden=(32, 8.0)), "hidden must be a sequence of layer widths"),
])
def test_arguments_of_the_wrong_type_are_named(problem, change, message):
    with pytest.raises(TypeError, match=message):
        alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, progress=False, **change)


def test_hidden_widths_may_be_any_iterable_and_numpy_integers_count(problem):
    widths = quick_fit(problem, epochs=2, hidden=iter([8, 4]), k=np.int64(3), seed=np.int32(1))
    assert widths.config["hidden"] == [8, 4] and widths.neighbors.shape[1] == 3
    assert torch.equal(widths.weight, quick_fit(problem, epochs=2, hidden=(8, 4), k=3, seed=1).weight)
    assert quick_fit(problem, epochs=1, hidden=(1,)).mlp_state["0.weight"].shape == (1, 6 * 24)  # width 1 is legal


def test_fused_adamw_matches_torch_optim():
    from alphanet_ext.training.step import FusedAdamW as _FusedAdamW
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 3, generator=generator).requires_grad_(), torch.randn(4, generator=generator).requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimizer = _FusedAdamW(ours, lr=1e-2, weight_decay=0.01)
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.01)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator) for p in ours]
        for q, g in zip(theirs, grads):
            q.grad = g.clone()
        optimizer.step(grads)
        reference.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", HOST_AND_GPU)
def test_memmap_rows_and_slices_read_correctly(tmp_path, device):
    from alphanet_ext.data import _backing_file, gather_rows, iter_row_chunks
    array = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")  # a pathlib.Path: numpy keeps it as the filename
    by_name = np.load(str(tmp_path / "a.npy"), mmap_mode="r")
    np.save(tmp_path / "f.npy", np.asfortranarray(array))
    fortran = np.load(tmp_path / "f.npy", mmap_mode="r")
    # C-ordered mappings are read with file reads (not through the mapping), Fortran-ordered ones are not
    assert _backing_file(mapped) == _backing_file(by_name) == (str(tmp_path / "a.npy"), 128)
    assert _backing_file(mapped[5:]) == (str(tmp_path / "a.npy"), 128 + 5 * 12) and _backing_file(fortran) is None
    assert _backing_file(mapped[:, 1:]) is None  # not whole rows
    device = torch.device(device)
    for source, expected in ((mapped, array), (by_name, array), (mapped[5:], array[5:]), (mapped[2:][1:], array[3:]),
                             (fortran, array)):
        chunks = [chunk for _, chunk in iter_row_chunks(source, "x", device, chunk_rows=4)]
        assert all(chunk.device.type == device.type for chunk in chunks)
        assert torch.equal(torch.cat(chunks).cpu(), torch.from_numpy(expected))
        for rows in (torch.tensor([7, 0, 7, 3, 4, 5, 14]), torch.tensor([], dtype=torch.long)):
            assert torch.equal(gather_rows(source, rows, "x", device).cpu(), torch.from_numpy(expected[rows.numpy()]))
    os.truncate(tmp_path / "a.npy", 128 + 10 * 12)  # the file shrinks under the mapping: rows 10+ are gone
    with pytest.raises(OSError, match=r"a.npy: file ended early \(truncated\?\) while reading row 12"):
        gather_rows(mapped, torch.tensor([3, 12]), "x", device)


@pytest.mark.parametrize("device", HOST_AND_GPU)
def test_row_chunks_and_gathers_of_arrays_and_tensors_in_memory(device):
    from alphanet_ext.data import gather_rows, iter_row_chunks
    values = torch.randn(21, 6, generator=torch.Generator().manual_seed(3))
    sources = {"numpy": values.numpy(), "numpy, read-only": values.numpy().copy(), "float16 numpy": values.half().numpy(),
               "tensor": values, "strided tensor": values.T.contiguous().T, "bfloat16 tensor": values.bfloat16()}
    sources["numpy, read-only"].flags.writeable = False
    for label, source in sources.items():
        chunks = list(iter_row_chunks(source, "x", torch.device(device), chunk_rows=4))
        assert [begin for begin, _ in chunks] == list(range(0, 21, 4)), label
        assert all(chunk.device.type == device for _, chunk in chunks), label
        expected = torch.from_numpy(source.copy()) if isinstance(source, np.ndarray) else source
        assert torch.equal(torch.cat([chunk for _, chunk in chunks]).cpu(), expected), label
        for rows in (torch.tensor([7, 0, 7, 20, 4]), torch.tensor([], dtype=torch.long)):
            gathered = gather_rows(source, rows.to(device), "x", torch.device(device))
            assert gathered.device.type == device and torch.equal(gathered.cpu(), expected[rows]), label
    assert list(iter_row_chunks(values[:0], "x", torch.device(device))) == []


def test_coefficient_networks_start_as_torch_linear_layers_do():
    """Each trial's layers are initialised as torch.nn.Linear's defaults (the
    authors' model): weights and biases uniform in +-1/sqrt(fan_in)."""
    from alphanet_ext.training.step import CoefficientNets as _CoefficientNets
    sizes = [600, 64, 48, 5]
    nets = _CoefficientNets(sizes, [torch.Generator().manual_seed(t) for t in range(3)], torch.device("cpu"))
    for trial in range(3):
        state = nets.state(trial)
        for layer, fan_in in enumerate(sizes[:-1]):
            bound = 1 / math.sqrt(fan_in)
            for name in ("weight", "bias"):
                values = state[f"{2 * layer}.{name}"]
                assert values.abs().max() <= bound and values.min() < -bound / 2 and values.max() > bound / 2
            weight = state[f"{2 * layer}.weight"]
            assert weight.shape == (sizes[layer + 1], fan_in)
            spread = bound / math.sqrt(3)  # a uniform's standard deviation; 4 standard errors below
            assert abs(weight.mean()) < 4 * spread / math.sqrt(weight.numel())
            assert abs(weight.std() / spread - 1) < 4 * math.sqrt(0.2 / weight.numel())
    assert not torch.equal(nets.state(0)["0.weight"], nets.state(1)["0.weight"])  # trials are seeded apart


def test_fused_step_gradients_match_autograd_of_the_full_softmax(device):
    # the C++ training step against plain autograd through the networks and a
    # cross-entropy over the corrected classifier's full scores
    from alphanet_ext.training.step import CoefficientNets as _CoefficientNets
    generator = torch.Generator().manual_seed(3)
    rows, trials, classes, k, dims, scale = 7, 2, 9, 3, 4, 1.5
    few = torch.tensor([1, 4, 6])
    is_base = torch.ones(classes, dtype=torch.bool)
    is_base[few] = False
    base = torch.nonzero(is_base).flatten()
    neighbors = torch.stack([base[torch.randperm(base.numel(), generator=generator)[:k]] for _ in few])
    raw = torch.randn(rows, trials, classes, dtype=torch.float64, generator=generator)
    bias = torch.randn(classes, dtype=torch.float64, generator=generator)
    labels = torch.tensor([1, 0, 4, 8, 6, 2, 4])[:, None].expand(rows, trials)
    nets = _CoefficientNets([(k + 1) * dims, 5, 6, k], [torch.Generator().manual_seed(t) for t in range(trials)],
                            torch.device("cpu"))
    nets.first = nets.first.double()
    nets.rest = [w.double() for w in nets.rest]
    nets.biases = [b.double() for b in nets.biases]
    inputs_t = torch.randn((k + 1) * dims, few.numel(), dtype=torch.float64, generator=generator)
    few_bias = torch.randn(trials, few.numel(), dtype=torch.float64, generator=generator)

    params = [p.clone().requires_grad_() for p in nets.parameters() + [few_bias]]
    nets.first, *rest_and_biases, few_bias_leaf = params
    nets.rest, nets.biases = rest_and_biases[:len(nets.rest)], rest_and_biases[len(nets.rest):]
    alphas = nets(inputs_t, few.numel())
    weights = alphas / alphas.abs().sum(dim=2, keepdim=True)
    few_columns = raw[:, :, few] + torch.einsum("tck,stck->stc", weights, raw[:, :, neighbors])
    scores = scale * (raw + bias).clone()
    scores[:, :, few] = scale * (few_columns + few_bias_leaf)
    expected = torch.stack([torch.nn.functional.cross_entropy(scores[:, t], labels[:, t]) for t in range(trials)])
    expected_grads = torch.autograd.grad(expected.sum(), params)

    base_scores = scale * (raw + bias)
    position = torch.full((classes,), -1, dtype=torch.long)
    position[few] = torch.arange(few.numel())
    target_few = position[labels]
    offsets = (torch.arange(trials) * classes)[:, None]
    detached = [p.detach() for p in params]
    rest = detached[1:1 + len(nets.rest)]
    biases = detached[1 + len(nets.rest):-1]
    on_device = [[t.to(device) for t in a] if isinstance(a, list) else a.to(device) for a in (
        inputs_t, detached[0], rest, biases, detached[-1], raw.reshape(rows, -1), (offsets + few).reshape(-1),
        (offsets[:, :, None] + neighbors).reshape(-1, k), base_scores[:, :, base].logsumexp(dim=2), target_few,
        torch.where(target_few < 0, base_scores.gather(2, labels[..., None]).squeeze(2), 0.0))]
    losses, grads = torch.ops.alphanet._coefficient_grads(*on_device, scale)
    losses, grads = losses.cpu(), [g.cpu() for g in grads]
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-12, atol=1e-12)
    assert len(grads) == len(expected_grads)
    for ours, theirs in zip(grads, expected_grads):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # the pure-torch step that fit falls back to without the compiled module
    reference_losses, reference_grads = reference.coefficient_grads(
        inputs_t, detached[0], rest, biases, detached[-1], raw.reshape(rows, -1), (offsets + few).reshape(-1),
        (offsets[:, :, None] + neighbors).reshape(-1, k), base_scores[:, :, base].logsumexp(dim=2), target_few,
        torch.where(target_few < 0, base_scores.gather(2, labels[..., None]).squeeze(2), 0.0), scale)
    torch.testing.assert_close(reference_losses, expected.detach(), rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(reference_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # its fake implementation (for torch.compile) gives the real outputs' shapes and dtypes
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    args = (inputs_t, detached[0], rest, biases, detached[-1], raw.reshape(rows, -1), (offsets + few).reshape(-1),
            (offsets[:, :, None] + neighbors).reshape(-1, k), base_scores[:, :, base].logsumexp(dim=2), target_few,
            torch.zeros(rows, trials, dtype=torch.float64))
    fake_args = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else mode.from_tensor(a) for a in args]
    with mode:
        fake_losses, fake_grads = torch.ops.alphanet._coefficient_grads(*fake_args, scale)
    assert [(t.shape, t.dtype) for t in [fake_losses, *fake_grads]] == [(t.shape, t.dtype) for t in [losses, *grads]]


@pytest.mark.parametrize("num_few", [2053, 3 * 1024])
def test_step_with_thousands_of_few_classes_matches_the_reference(device, num_few):
    # on CUDA the first layer's gradient sums products over parts of the few classes
    # (1,024 or more each, the last part taking what is left over)
    from alphanet_ext.training.step import CoefficientNets as _CoefficientNets
    generator = torch.Generator().manual_seed(4)
    rows, classes, k, dims = 3, num_few + 40, 3, 2
    nets = _CoefficientNets([(k + 1) * dims, 4, k], [torch.Generator().manual_seed(0)], torch.device("cpu"))
    parameters = [p.double() for p in nets.parameters()]
    args = (torch.randn((k + 1) * dims, num_few, dtype=torch.float64, generator=generator), parameters[0],
            parameters[1:2], parameters[2:], torch.randn(1, num_few, dtype=torch.float64, generator=generator),
            torch.randn(rows, classes, dtype=torch.float64, generator=generator), torch.arange(num_few),
            torch.randint(num_few, classes, (num_few, k), generator=generator),
            torch.randn(rows, 1, dtype=torch.float64, generator=generator), torch.tensor([[0], [-1], [num_few - 1]]),
            torch.randn(rows, 1, dtype=torch.float64, generator=generator))
    expected_losses, expected = reference.coefficient_grads(*args, 2.0)
    on_device = [[t.to(device) for t in a] if isinstance(a, list) else a.to(device) for a in args]
    losses, grads = torch.ops.alphanet._coefficient_grads(*on_device, 2.0)
    torch.testing.assert_close(losses.cpu(), expected_losses, rtol=1e-12, atol=1e-12)
    assert expected[0].abs().sum() > 0
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-10, atol=1e-12)


def test_progress_bars_only_on_a_terminal(problem, monkeypatch, capsys):
    pytest.importorskip("tqdm")  # without it the bars are silent stand-ins
    fit_module = importlib.import_module("alphanet_ext.training.progress")
    args = (problem.train_x, problem.train_y, problem.weight, problem.bias, problem.val_x, problem.val_y)
    alphanet_ext.fit(*args, epochs=2, progress=True)  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(fit_module.os, "isatty", lambda fd: True)
    alphanet_ext.fit(*args, epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "alphanet fit" in err and "epoch 2/2" in err and "val top-1" in err
    alphanet_ext.fit(*args, epochs=2, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(fit_module.os, "isatty", lambda fd: False)
    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # a Jupyter kernel: not a terminal, bars wanted
    alphanet_ext.fit(*args, epochs=2, progress=True)
    assert "alphanet fit" in capsys.readouterr().err


def test_fit_without_tqdm_is_silent(problem, monkeypatch, capsys):
    fit_module = importlib.import_module("alphanet_ext.training.progress")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm...` now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(fit_module.os, "isatty", lambda fd: True)
    result = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, epochs=1, progress=True)
    assert capsys.readouterr().err == "" and result.weight.shape == problem.weight.shape


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs AVX2")
@pytest.mark.parametrize("num_few,dims,hidden", [(1, 3, 16), (13, 5, 16), (151, 260, 32)])
def test_packed_network_inputs_give_the_same_step(num_few, dims, hidden):
    # The CPU packs the networks' fixed input once per fit; the training step must
    # not change. Shapes: few classes not a multiple of the 6-wide panels, rows
    # (k+1)*dims not a multiple of 6, and (last case) several depth and class chunks.
    from alphanet_ext.training.step import CoefficientNets as _CoefficientNets, network_inputs as _network_inputs
    generator = torch.Generator().manual_seed(num_few)
    trials, k, classes, rows = 2, 3, num_few + 9, 11
    nets = _CoefficientNets([(k + 1) * dims, hidden, 7, k], [torch.Generator().manual_seed(t) for t in range(trials)],
                            torch.device("cpu"))
    inputs = torch.randn(num_few, (k + 1) * dims, generator=generator)
    packed, plain = _network_inputs(inputs, trials * hidden), inputs.T.contiguous()
    assert packed.dim() == 3 and packed.shape[2] == 6
    few = torch.arange(num_few)
    neighbors = torch.randint(num_few, classes, (num_few, k), generator=generator)
    offsets = (torch.arange(trials) * classes)[:, None]
    raw = torch.randn(rows, trials * classes, generator=generator)
    labels = torch.randint(0, classes, (rows, trials), generator=generator)
    target_few = torch.where(labels < num_few, labels, -1)
    few_bias = torch.randn(trials, num_few, generator=generator)
    common = (nets.rest, nets.biases, few_bias, raw, (offsets + few).reshape(-1),
              (offsets[:, :, None] + neighbors).reshape(-1, k), torch.randn(rows, trials, generator=generator),
              target_few, torch.randn(rows, trials, generator=generator), 1.0)
    expected_losses, expected = torch.ops.alphanet._coefficient_grads(plain, nets.first, *common)
    losses, grads = torch.ops.alphanet._coefficient_grads(packed, nets.first, *common)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(grads, expected):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nets(packed, num_few), nets(plain, num_few), rtol=1e-5, atol=1e-5)


def _gathered_step_problem(num_few, dims, hidden, dtype=torch.float32, trials=2, k=3):
    """A step's arguments with the networks' input as a table of rows and each few class's
    ids in it (rows repeated, as neighbours are), and the same input whole."""
    from alphanet_ext.training.step import CoefficientNets as _CoefficientNets
    generator = torch.Generator().manual_seed(num_few)
    classes, rows = num_few + 9, 11
    nets = _CoefficientNets([(k + 1) * dims, hidden, 7, k], [torch.Generator().manual_seed(t) for t in range(trials)],
                            torch.device("cpu"))
    table = torch.randn(num_few // 2 + 5, dims, generator=generator, dtype=dtype)
    ids = torch.randint(0, table.shape[0], (num_few, k + 1), generator=generator)
    neighbors = torch.randint(num_few, classes, (num_few, k), generator=generator)
    offsets = (torch.arange(trials) * classes)[:, None]
    labels = torch.randint(0, classes, (rows, trials), generator=generator)
    parameters = [p.to(dtype) for p in nets.parameters()]
    common = (parameters[1:1 + len(nets.rest)], parameters[1 + len(nets.rest):],
              torch.randn(trials, num_few, generator=generator, dtype=dtype),
              torch.randn(rows, trials * classes, generator=generator, dtype=dtype),
              (offsets + torch.arange(num_few)).reshape(-1), (offsets[:, :, None] + neighbors).reshape(-1, k),
              torch.randn(rows, trials, generator=generator, dtype=dtype), torch.where(labels < num_few, labels, -1),
              torch.randn(rows, trials, generator=generator, dtype=dtype), 1.5)
    return nets, parameters[0], table, ids, table[ids].reshape(num_few, -1), common


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs AVX2")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("num_few,dims,hidden", [(1, 3, 16), (13, 5, 16), (151, 260, 32)])
def test_gathered_network_inputs_give_the_packed_step_bit_for_bit(num_few, dims, hidden, threads):
    # The gathered input's panels are laid out as the op reads them, with the packed
    # panels' values in the packed panels' places: the same sums in the same order.
    # Shapes as for the packed input, rows of d not a multiple of the 6-wide panels
    # (a panel's rows straddle two table rows), and 3 threads splitting the work unevenly.
    from alphanet_ext.training.step import GatheredInputs, network_inputs as _network_inputs
    nets, first, table, ids, whole, common = _gathered_step_problem(num_few, dims, hidden)
    packed = _network_inputs(whole, first.shape[1])
    assert packed.dim() == 3
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected_losses, expected = torch.ops.alphanet._coefficient_grads(packed, first, *common)
        losses, grads = torch.ops.alphanet._coefficient_grads(table, first, *common, ids)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(losses, expected_losses)
    assert expected[0].abs().sum() > 0
    for ours, theirs in zip(grads, expected, strict=True):
        assert torch.equal(ours, theirs)
    # the first layer alone (the coefficients without a step) through the same kernels
    assert torch.equal(ops.input_product(table, first, num_few, ids), ops.input_product(packed, first, num_few))
    torch.testing.assert_close(ops.input_product(table, first, num_few, ids), whole @ first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nets(GatheredInputs(table, ids), num_few), nets(whole.T, num_few), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("num_few,dims", [(1, 3), (13, 5), (2053, 4)])
def test_gathered_network_inputs_match_the_reference(device, num_few, dims):
    # float64 (and any device but an AVX2 CPU in float32) takes the op's other path:
    # one product per part of the rows. The float64 reference gathers the input whole.
    _, first, table, ids, whole, common = _gathered_step_problem(num_few, dims, 4, torch.float64)
    expected_losses, expected = reference.coefficient_grads(whole.T, first, *common)
    assert expected[0].abs().sum() > 0
    for args in ((table, first, *common, ids), (whole.T, first, *common)):
        on_device = [[t.to(device) for t in a] if isinstance(a, list) else
                     a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        losses, grads = torch.ops.alphanet._coefficient_grads(*on_device)
        torch.testing.assert_close(losses.cpu(), expected_losses, rtol=1e-12, atol=1e-12)
        for ours, theirs in zip(grads, expected, strict=True):
            torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-10, atol=1e-12)
    reference_losses, _ = reference.coefficient_grads(table, first, *common, ids)
    torch.testing.assert_close(reference_losses, expected_losses, rtol=0, atol=0)


def test_gathered_network_inputs_that_do_not_fit_are_refused():
    _, first, table, ids, _, common = _gathered_step_problem(13, 5, 16)
    torch.ops.alphanet._coefficient_grads(table, first, *common, ids)  # fits
    refusals = {
        "input_ids must lie in \\[0, 11\\) \\(the table's rows\\), found -1": (table, ids - 1),
        "input_ids must lie in \\[0, 10\\) \\(the table's rows\\), found 10": (table[:-1], ids),
        "input_ids' 3 rows of 5 values .* do not make the first layer's 20 inputs": (table, ids[:, :3].contiguous()),
        "input_ids has 12 rows for 13 few classes": (table, ids[:12]),
        "input_ids must be a contiguous int64": (table, ids.int()),
        "with input_ids, inputs_t must be a contiguous table of rows": (table.T, ids),
    }
    for message, (rows, given) in refusals.items():
        with pytest.raises(RuntimeError, match=f"^_coefficient_grads: {message}"):
            torch.ops.alphanet._coefficient_grads(rows, first, *common, given)
        with pytest.raises(RuntimeError, match=f"^_input_product: {message}"):
            torch.ops.alphanet._input_product(rows, first, 13, given)


def test_packed_network_inputs_that_do_not_fit_are_refused():
    from alphanet_ext.training.step import network_inputs as _network_inputs
    packed = _network_inputs(torch.randn(10, 12), 16)
    if packed.dim() != 3:
        pytest.skip("inputs are packed only on an AVX2 CPU")
    first, few_bias = torch.randn(12, 16), torch.randn(1, 10)
    rest, biases = [torch.randn(1, 3, 16)], [torch.randn(1, 16), torch.randn(1, 3)]
    args = (rest, biases, few_bias, torch.randn(4, 20), torch.arange(10), torch.randint(10, 20, (10, 3)),
            torch.randn(4, 1), torch.full((4, 1), -1), torch.randn(4, 1), 1.0)
    torch.ops.alphanet._coefficient_grads(packed, first, *args)  # fits
    with pytest.raises(RuntimeError, match="packed inputs hold 12 rows, which does not fit a first layer of 30 rows"):
        torch.ops.alphanet._coefficient_grads(packed, torch.randn(30, 16), *args)
    with pytest.raises(RuntimeError, match="packed inputs hold 2 panels, which does not fit 3 few classes"):
        torch.ops.alphanet._coefficient_grads(packed, first, rest, biases, torch.randn(1, 3), *args[3:])
    with pytest.raises(RuntimeError, match="multiple of 16 columns"):
        torch.ops.alphanet._coefficient_grads(packed, torch.randn(12, 8), *args)


def test_fit_without_the_compiled_module(problem, tmp_path):
    """Without the compiled module, and asked for (ALPHANET_ALLOW_REFERENCE=1), every op
    and the training step fall back to the references, with one warning, and the fit
    follows the compiled one's path."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["alphanet_ext._C"] = None  # as if the build had failed
        import torch, alphanet_ext
        from alphanet_ext import synthetic
        problem = synthetic.make_long_tailed(num_classes=40, dim=24, max_count=300, min_count=4, seed=11)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, problem.val_x,
                                      problem.val_y, epochs=3, min_epochs=1, progress=False)
        assert not alphanet_ext.HAS_EXTENSION
        warned = [str(w.message) for w in caught if "compiled kernels unavailable" in str(w.message)]
        torch.save({"warned": warned, "alphas": result.alphas, "neighbors": result.neighbors,
                    "weight": result.weight}, sys.argv[1])
    """)
    out = tmp_path / "fallback.pt"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "ALPHANET_ALLOW_REFERENCE": "1"})
    fallback = torch.load(out)
    assert len(fallback["warned"]) == 1 and "pure-torch reference" in fallback["warned"][0]
    compiled = quick_fit(problem, epochs=3, min_epochs=1)
    assert torch.equal(fallback["neighbors"], compiled.neighbors)
    # float64 steps against float32 ones: the same training, to rounding
    torch.testing.assert_close(fallback["alphas"], compiled.alphas, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fallback["weight"], compiled.weight, rtol=1e-3, atol=1e-3)


def test_optimizer_reads_transposed_gradients_as_their_values():
    # torch's fused AdamW walks a gradient's memory in its parameter's order, so a
    # transposed gradient (autograd's for a bmm operand) must be laid out first
    from alphanet_ext.training.step import FusedAdamW as _FusedAdamW
    gradient = torch.arange(12.0).view(4, 3).T
    updated = []
    for grads in ([gradient], [gradient.contiguous()]):
        params = [torch.zeros(3, 4)]
        optimizer = _FusedAdamW(params, lr=0.1, weight_decay=0.0)
        optimizer.step(grads)
        updated.append(optimizer.exp_avgs[0])
    torch.testing.assert_close(updated[0], updated[1], rtol=0, atol=0)
    torch.testing.assert_close(updated[1], 0.1 * gradient, rtol=1e-6, atol=0)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_after", [1, 3, 6])
def test_a_killed_fit_resumes_bit_identical(problem, tmp_path, kill_after):
    """The state is saved after every epoch; a fit stopped after any epoch and run
    again with the same checkpoint ends with the uninterrupted fit's bits."""
    options = dict(epochs=7, min_epochs=2, lr_step=3, batch_size=16, trials=2, seed=9)
    expected = quick_fit(problem, **options)
    checkpoint = tmp_path / "fit.ckpt.pt"

    def kill(record):
        if record["epoch"] == kill_after:
            raise _Killed
    with pytest.raises(_Killed):
        quick_fit(problem, **options, checkpoint=checkpoint, callback=kill)
    assert checkpoint.exists()
    epochs_run = []
    resumed = quick_fit(problem, **options, checkpoint=checkpoint, callback=lambda r: epochs_run.append(r["epoch"]))
    assert epochs_run == list(range(kill_after + 1, 8))
    for name in ("weight", "bias", "trial_alphas", "trial_few_bias", "alphas"):
        assert torch.equal(getattr(resumed, name), getattr(expected, name)), name
    assert resumed.history == expected.history and resumed.best_epochs == expected.best_epochs
    assert resumed.mlp_state.keys() == expected.mlp_state.keys()
    assert all(torch.equal(resumed.mlp_state[key], expected.mlp_state[key]) for key in expected.mlp_state)
    # a finished fit's checkpoint gives its result again without training
    again = quick_fit(problem, **options, checkpoint=checkpoint, callback=lambda r: epochs_run.append(r["epoch"]))
    assert torch.equal(again.weight, expected.weight) and epochs_run == list(range(kill_after + 1, 8))


@pytest.mark.parametrize("change,named", [
    (dict(rho=0.5), "option 'rho'"),
    (dict(seed=10), "option 'seed'"),
    (dict(epochs=8), "option 'epochs'"),
    (dict(weight="scaled"), "input 'classifier weight'"),
    (dict(train_x="shifted"), "input 'train features'"),
    (dict(val_y="rolled"), "input 'val labels'"),
])
def test_a_checkpoint_of_other_inputs_or_options_is_refused(problem, tmp_path, change, named):
    checkpoint = tmp_path / "fit.ckpt.pt"
    args = dict(train_x=problem.train_x, train_y=problem.train_y, weight=problem.weight, bias=problem.bias,
                val_x=problem.val_x, val_y=problem.val_y, epochs=2, min_epochs=1, progress=False,
                checkpoint=checkpoint)
    alphanet_ext.fit(**args)
    before = checkpoint.read_bytes()
    altered = {"scaled": problem.weight * 1.001, "shifted": problem.train_x + 1e-3, "rolled": problem.val_y.roll(1)}
    args.update({key: altered.get(value, value) if isinstance(value, str) else value for key, value in change.items()})
    with pytest.raises(ValueError, match=f"the checkpoint was written for a different {named}"):
        alphanet_ext.fit(**args)
    assert checkpoint.read_bytes() == before  # refused, not overwritten


def test_a_callback_sees_every_epoch_and_can_stop_the_fit(problem):
    seen = []

    def callback(record):
        seen.append(record)
        return record["epoch"] < 3
    result = quick_fit(problem, epochs=6, min_epochs=5, callback=callback)
    assert [r["epoch"] for r in seen] == [1, 2, 3] and len(result.history) == 3
    assert set(seen[0]) >= {"epoch", "loss", "lr", "val_top1"} and seen[0]["lr"] == pytest.approx(1e-3)
    assert result.best_epochs == [3]  # stopped before min_epochs: the last epoch run is kept
    with pytest.raises(TypeError, match="callback must be callable"):
        quick_fit(problem, epochs=1, callback="print")


def test_divergence_stops_the_fit_naming_the_learning_rate(problem):
    with pytest.raises(ValueError, match=r"training diverged at epoch 1: .* with lr=0.001 \(pred_scale 10000\); "
                                         "lower lr or pred_scale"):
        alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight * 1e34, problem.bias, epochs=3,
                         pred_scale=1e4, progress=False)


def test_the_inputs_device_is_the_default():
    from alphanet_ext.data import inputs_device

    class OnGpu:  # a cupy array on GPU 1, as DLPack describes it
        def __dlpack_device__(self):
            return (2, 1)

    class OnHost:
        def __dlpack_device__(self):
            return (1, 0)
    assert inputs_device(torch.ones(2), np.ones(2), OnHost()) is None
    assert inputs_device(torch.ones(2), OnGpu()) == torch.device("cuda", 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not alphanet_ext.compiled_with_cuda(), reason="needs two GPUs")
def test_inputs_on_the_second_gpu_are_fitted_and_scored_there(problem):
    with torch.cuda.device(0):
        on_second = [t.to("cuda:1") for t in (problem.train_x, problem.train_y, problem.weight, problem.bias)]
        result = alphanet_ext.fit(*on_second, epochs=2, progress=False)
        assert result.config["device"] == "cuda:1"
        scores = alphanet_ext.evaluate(result.weight.to("cuda:1"), result.bias, on_second[0], on_second[1],
                                       result.splits)
        assert scores["samples"] == problem.train_y.numel()


@pytest.mark.parametrize("num_few,k,dim,columns", [(37, 3, 5, 16), (200, 5, 24, 32), (9, 1, 7, 12)])
def test_network_inputs_built_in_blocks_equal_the_whole(num_few, k, dim, columns):
    from alphanet_ext.training import step as steps
    generator = torch.Generator().manual_seed(num_few)
    w = torch.randn(300, dim, generator=generator)
    few = torch.randperm(300, generator=generator)[:num_few]
    neighbors = torch.randint(0, 300, (num_few, k), generator=generator)
    whole = steps.network_inputs(torch.cat([w[few], w[neighbors].reshape(num_few, -1)], dim=1), columns)
    rows = lambda b, e: torch.cat([w[few[b:e]], w[neighbors[b:e]].reshape(e - b, -1)], dim=1)  # noqa: E731
    for block in (1, 16, 48, 4096):
        built = steps.laid_out(num_few, (k + 1) * dim, rows, columns, w.device, w.dtype, block=block)
        assert torch.equal(built, whole), block
    assert torch.equal(steps.classifier_network_inputs(w, few, neighbors, columns), whole)
