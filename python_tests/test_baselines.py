import numpy as np
import pytest
import torch

import alphanet_ext
from alphanet_ext import baselines, synthetic


def test_ncm_hand_computed():
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1])
    weight, bias = baselines.ncm(x, y, 2, "cosine")
    torch.testing.assert_close(weight, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    weight, bias = baselines.ncm(x, y, 2, "euclidean")
    torch.testing.assert_close(weight, torch.tensor([[6.0, 0.0], [0.0, 6.0]]))
    torch.testing.assert_close(bias, torch.tensor([-9.0, -9.0]))
    # (2.9, 2.9) is equally far from both means (3, 0) and (0, 3): equal scores.
    scores = torch.tensor([[2.9, 2.9]]) @ weight.T + bias
    assert scores[0, 0] == scores[0, 1]
    with pytest.raises(ValueError, match=r"class 2 has none \(2 such classes\)"):
        baselines.ncm(x, y, 4)


def test_ncm_of_memory_mapped_features(tmp_path):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=generator)
    y = torch.arange(50) % 4
    np.save(tmp_path / "x.npy", x.numpy())
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    for metric in ("cosine", "euclidean"):
        expected = baselines.ncm(x, y, 4, metric)
        for got, want in zip(baselines.ncm(mapped, y.numpy(), 4, metric), expected):
            torch.testing.assert_close(got, want)
    x[37, 2] = float("nan")
    with pytest.raises(ValueError, match="train_x contains NaN or inf: nan at row 37, column 2"):
        baselines.ncm(x, y, 4)


def test_tau_normalize():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    same, _ = baselines.tau_normalize(weight, None, 0.0)
    unit, _ = baselines.tau_normalize(weight, None, 1.0)
    half, _ = baselines.tau_normalize(weight, torch.ones(2), 0.5)
    torch.testing.assert_close(same, weight)
    torch.testing.assert_close(unit, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(half[0], weight[0] / 5**0.5)


def test_logit_adjust_hand_computed():
    weight, bias = baselines.logit_adjust(torch.eye(2), torch.zeros(2), torch.tensor([3, 1]), 1.0)
    torch.testing.assert_close(bias, -torch.log(torch.tensor([0.75, 0.25])))
    for counts in ([3, 1], np.array([3, 1])):
        torch.testing.assert_close(baselines.logit_adjust(torch.eye(2), None, counts, 1.0)[1], bias)
    for counts, message in (([3, 0], "class 1 has 0 \\(1 such classes\\)"), ([0, 0], "class 0 has 0 \\(2 such"),
                            ([3.0, float("nan")], "class 1 has nan"), ([3, 1, 1], r"counts must have shape \[2\]")):
        with pytest.raises(ValueError, match=message):
            baselines.logit_adjust(torch.eye(2), None, counts, 1.0)
    for method in (lambda tau: baselines.logit_adjust(torch.eye(2), None, [3, 1], tau),
                   lambda tau: baselines.tau_normalize(torch.eye(2), None, tau)):
        with pytest.raises(ValueError, match="tau must be a finite number, got nan"):
            method(float("nan"))


def test_peers_help_the_few_split_and_choose_tau_on_val():
    problem = synthetic.make_long_tailed(num_classes=40, dim=24, max_count=300, min_count=4, seed=3)
    counts = torch.bincount(problem.train_y, minlength=40)
    splits = alphanet_ext.make_splits(counts)
    base = alphanet_ext.evaluate(problem.weight, problem.bias, problem.test_x, problem.test_y, splits)["top1"]["few"]
    tau, (w, b) = baselines.choose_logit_adjustment(problem.weight, problem.bias, counts, problem.val_x,
                                                    problem.val_y, splits)
    assert tau in baselines.DEFAULT_GRID and tau > 0
    adjusted = alphanet_ext.evaluate(w, b, problem.test_x, problem.test_y, splits)["top1"]["few"]
    assert adjusted > base
    w, b = baselines.lws(problem.weight, problem.bias, problem.train_x, problem.train_y)
    assert alphanet_ext.evaluate(w, b, problem.test_x, problem.test_y, splits)["top1"]["few"] > base
    tau, _ = baselines.choose_tau(problem.weight, problem.bias, None, None, splits)
    assert tau == 1.0
    # where tau changes nothing (unit rows, equal counts), every tau ties on val: the smallest is kept
    unit = problem.weight / problem.weight.norm(dim=1, keepdim=True)
    grid = (0.5, 1.0, 1.5)
    assert baselines.choose_tau(unit, problem.bias, problem.val_x, problem.val_y, splits, grid)[0] == 0.5
    assert baselines.choose_logit_adjustment(unit, problem.bias, torch.full((40,), 7), problem.val_x, problem.val_y,
                                             splits, grid)[0] == 0.5


def test_lws_computes_each_batch_when_the_logits_do_not_fit(monkeypatch, tmp_path):
    """LWS keeps every sample's logits where half the memory available holds them
    (11.5 GB at iNaturalist size), else it computes each batch's, from a memory
    map too; the scales agree up to rounding, and the inputs are read as given."""
    problem = synthetic.make_long_tailed(num_classes=40, dim=24, max_count=300, min_count=4, seed=3)
    expected = baselines.lws(problem.weight, problem.bias, problem.train_x, problem.train_y, epochs=2)
    np.save(tmp_path / "x.npy", problem.train_x.numpy())
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    monkeypatch.setattr(baselines, "cache_budget", lambda device: 0)
    monkeypatch.setattr(baselines, "logits", None)  # every sample's logits at once: not with no memory to spare
    for features in (problem.train_x, mapped):
        weight, bias = baselines.lws(problem.weight, problem.bias, features, problem.train_y, epochs=2)
        torch.testing.assert_close(weight, expected[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bias, expected[1], rtol=1e-4, atol=1e-6)
    assert not torch.equal(expected[0], problem.weight)  # the scales moved


def test_tau_choices_match_scoring_every_candidate_classifier(monkeypatch):
    """The val logits are computed once (in row blocks) and rescored per tau; the
    choice is the one that evaluating each candidate classifier in full gives."""
    monkeypatch.setattr(baselines, "EVALUATION_ROWS", 7)  # 800 val rows: 115 blocks, the last of 2
    problem = synthetic.make_long_tailed(num_classes=40, dim=24, max_count=300, min_count=4, seed=5)
    counts = torch.bincount(problem.train_y, minlength=40)
    splits = alphanet_ext.make_splits(counts)
    val_x, val_y = problem.val_x.numpy(), problem.val_y.numpy()  # any array kind, as evaluate takes
    for choose, build, extra in ((baselines.choose_tau, baselines.tau_normalize, ()),
                                 (baselines.choose_logit_adjustment, baselines.logit_adjust, (counts,))):
        scored = [(alphanet_ext.evaluate(*build(problem.weight, problem.bias, *extra, tau), val_x, val_y,
                                         splits)["top1"]["overall"], -tau) for tau in baselines.DEFAULT_GRID]
        expected = -max(scored)[1]
        assert len({accuracy for accuracy, _ in scored}) > 3  # the curve is not flat
        tau, (weight, bias) = choose(problem.weight, problem.bias, *extra, val_x, val_y, splits)
        assert tau == expected
        reference_weight, reference_bias = build(problem.weight, problem.bias, *extra, tau)
        assert torch.equal(weight, reference_weight) and torch.equal(bias, reference_bias)
    scored_rows = []
    baselines._best_on_val(problem.weight, problem.bias, val_x, val_y, splits, (1.0,),
                           lambda block, b, tau: scored_rows.append(block.shape[0]) or block)
    assert sum(scored_rows) == 800 and scored_rows[-1] == 2  # every val row, once
    with pytest.raises(ValueError, match="the tau grid: tau must be a finite number, got nan"):
        baselines.choose_tau(problem.weight, problem.bias, val_x, val_y, splits, grid=(0.5, float("nan")))
    with pytest.raises(ValueError, match=r"splits\['few'\] has class 40, outside the classifier's 40 classes"):
        baselines.choose_tau(problem.weight, problem.bias, val_x, val_y, {"few": [40]})


def reference_crt(x, y, num_classes, epochs, batch_size, lr, momentum, weight_decay, seed, init=None, min_steps=0):
    """cRT in float64 with autograd and torch's SGD rule (decay added to the gradient,
    then momentum), on the same class-balanced draws: what the hand-written step must match."""
    x = torch.as_tensor(np.asarray(x)).double()
    sampler = baselines.ClassBalancedRows(y, num_classes, seed)
    w = (torch.zeros(num_classes, x.shape[1], dtype=torch.float64) if init is None
         else init[0].double().clone()).requires_grad_()
    b = (torch.zeros(num_classes, dtype=torch.float64) if init is None else init[1].double().clone()).requires_grad_()
    velocity = [torch.zeros_like(w), torch.zeros_like(b)]
    steps = max(epochs * max(1, x.shape[0] // batch_size), min_steps)
    for step in range(steps):
        rows = sampler.draw(batch_size)
        loss = torch.nn.functional.cross_entropy(x[rows] @ w.T + b, y[rows])
        grads = torch.autograd.grad(loss, (w, b))
        rate = 0.5 * lr * (1 + np.cos(np.pi * step / steps))
        with torch.no_grad():
            velocity[0] = momentum * velocity[0] + grads[0] + weight_decay * w
            velocity[1] = momentum * velocity[1] + grads[1]
            w -= rate * velocity[0]
            b -= rate * velocity[1]
    return w.detach(), b.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_crt_matches_a_float64_autograd_reference(dtype, monkeypatch, tmp_path):
    """Awkward shapes (7 classes, 5 dims, 53 rows, batches of 16, one class without
    samples), half-precision features, from memory and from a memory map read batch by batch."""
    generator = torch.Generator().manual_seed(11)
    y = torch.cat([torch.zeros(30, dtype=torch.long), torch.randint(1, 6, (23,), generator=generator)])
    x = (torch.randn(53, 5, generator=generator) + torch.nn.functional.one_hot(y, 7)[:, :5] * 2).to(dtype)
    init = (torch.randn(7, 5, generator=generator), torch.randn(7, generator=generator))
    np.save(tmp_path / "x.npy", x.numpy())
    for start, min_steps in ((None, 0), (init, 0), (init, 20)):  # 3 epochs of 3 steps, or at least 20 steps
        expected = reference_crt(x.float(), y, 7, 3, 16, 0.3, 0.9, 5e-4, seed=4, init=start, min_steps=min_steps)
        weight, bias = baselines.crt(x, y, 7, epochs=3, batch_size=16, lr=0.3, seed=4, init=start,
                                     min_steps=min_steps)
        assert weight.dtype == bias.dtype == torch.float32
        torch.testing.assert_close(weight.double(), expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias.double(), expected[1], rtol=1e-4, atol=1e-5)
    assert bias[6] < bias[:6].min()  # the class without samples is never drawn: only pushed down
    monkeypatch.setattr(baselines, "cache_budget", lambda device: 0)  # not resident: gathered per batch
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    again = baselines.crt(mapped, y.numpy(), 7, epochs=3, batch_size=16, lr=0.3, seed=4, init=init, min_steps=20)
    torch.testing.assert_close(again[0].double(), expected[0], rtol=1e-4, atol=1e-5)


def test_crt_draws_classes_evenly_and_scales_its_step_to_the_features():
    """The sampler's classes are near uniform whatever the imbalance; cRT's default
    rate gives the same classifier for features scaled by 10 (without weight decay),
    helps the few split, and is deterministic for a seed."""
    problem = synthetic.make_long_tailed(num_classes=40, dim=24, max_count=300, min_count=4, seed=3)
    sampler = baselines.ClassBalancedRows(problem.train_y, 40, seed=0)
    drawn = torch.bincount(problem.train_y[torch.cat([sampler.draw(500) for _ in range(40)])], minlength=40)
    assert drawn.min() > 0.8 * 500 and drawn.max() < 1.2 * 500  # 500 a class expected
    counts = torch.bincount(problem.train_y, minlength=40)
    splits = alphanet_ext.make_splits(counts)
    w, b = baselines.crt(problem.train_x, problem.train_y, 40, weight_decay=0)  # decay is not scale-free
    w10, b10 = baselines.crt(problem.train_x * 10, problem.train_y, 40, weight_decay=0)
    torch.testing.assert_close(w10 * 10, w, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b10, b, rtol=1e-3, atol=1e-4)
    w, b = baselines.crt(problem.train_x, problem.train_y, 40)

    def few(weight, bias):
        return alphanet_ext.evaluate(weight, bias, problem.test_x, problem.test_y, splits)["top1"]["few"]
    assert few(w, b) > few(problem.weight, problem.bias) + 5
    again = baselines.crt(problem.train_x, problem.train_y, 40)
    assert torch.equal(again[0], w) and torch.equal(again[1], b)
    with pytest.raises(ValueError, match="epochs and batch_size must be at least 1"):
        baselines.crt(problem.train_x, problem.train_y, 40, epochs=0)
    with pytest.raises(ValueError, match="train_y"):
        baselines.crt(problem.train_x, problem.train_y[:-1], 40)
