import math
import warnings
import pytest
import torch

import alphanet_ext
from alphanet_ext import analysis


def test_prediction_changes_by_construction():
    # Three classes on the axes; class 2 is "few" with class 0 as its neighbour.
    x = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([2, 2, 2, 0])
    before_weight = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # class 0 wins on class 2 samples
    splits = {"many": torch.tensor([0, 1]), "medium": torch.tensor([], dtype=torch.long), "few": torch.tensor([2])}
    before = alphanet_ext.evaluate(before_weight, torch.zeros(3), x, y, splits)["predictions"]
    after = alphanet_ext.evaluate(torch.eye(3), None, x, y, splits)["predictions"]
    assert before.tolist() == [0, 0, 0, 0] and after.tolist() == [2, 2, 2, 0]
    table = analysis.prediction_changes(before, after, y, torch.tensor([2]), torch.tensor([[0]]))
    assert table["before"] == {"correct": 0, "as_neighbor": 3, "elsewhere": 0}
    assert table["after"] == {"correct": 3, "as_neighbor": 0, "elsewhere": 0}
    # class 1 is not class 2's neighbour: those errors land "elsewhere"
    table = analysis.prediction_changes(torch.tensor([1, 1, 2, 0]), after, y, torch.tensor([2]), torch.tensor([[0]]))
    assert table["before"] == {"correct": 1, "as_neighbor": 0, "elsewhere": 2}
    with pytest.raises(ValueError, match="same shape"):
        analysis.prediction_changes(before[:2], after, y, torch.tensor([2]), torch.tensor([[0]]))


def test_neighbor_views():
    # classes on a line at 0, 1, 2, ..., 5; few = {1, 4}, base = the rest
    means = torch.arange(6, dtype=torch.float32)[:, None]
    splits = {"many": torch.tensor([0, 5]), "medium": torch.tensor([2, 3]), "few": torch.tensor([1, 4])}
    views = analysis.neighbor_views(means, splits, k=2)
    few_classes, few_neighbors = views["few"]
    assert few_classes.tolist() == [1, 4] and few_neighbors.tolist() == [[0, 2], [3, 5]]
    base_classes, base_neighbors = views["base"]
    assert base_classes.tolist() == [0, 2, 3, 5]
    assert base_neighbors.tolist() == [[1, 4], [1, 4], [4, 1], [4, 1]]
    all_classes, all_neighbors = views["all"]
    assert all_classes.tolist() == list(range(6))
    assert all_neighbors.tolist() == [[1, 2], [0, 2], [1, 3], [2, 4], [3, 5], [4, 3]]
    assert all(c not in row for c, row in zip(all_classes.tolist(), all_neighbors.tolist()))


def test_neighbor_views_with_duplicate_means_never_list_the_class_itself():
    means = torch.zeros(4, 3)  # every class at the same point
    splits = {"many": torch.tensor([0, 1, 2]), "medium": torch.tensor([], dtype=torch.long), "few": torch.tensor([3])}
    classes, neighbors = analysis.neighbor_views(means, splits, k=2)["all"]
    assert neighbors.shape == (4, 2)
    assert all(c not in row for c, row in zip(classes.tolist(), neighbors.tolist()))


# A small tree: animals -> {dogs -> {0, 1}, cats -> {2}}, plants -> {3}; class 4 has no parent.
LINKS = {0: "dogs", 1: "dogs", 2: "cats", "dogs": "animals", "cats": "animals", 3: "plants",
         "animals": "life", "plants": "life"}


def five_class_tree():
    with pytest.warns(UserWarning, match=r"1 of 5 classes have no parent \(4\)"):
        return analysis.Hierarchy.from_parents(LINKS, 5)


def test_hierarchy_levels():
    tree = five_class_tree()
    truth = torch.tensor([0, 0, 0, 0, 0, 4, 4])
    guess = torch.tensor([0, 1, 2, 3, 4, 4, 0])
    assert tree.close(truth, guess, 0).tolist() == [True, False, False, False, False, True, False]
    assert tree.close(truth, guess, 1).tolist() == [True, True, False, False, False, True, False]
    assert tree.close(truth, guess, 2).tolist() == [True, True, True, False, False, True, False]
    assert tree.close(truth, guess, 3).tolist() == [True, True, True, True, False, True, False]
    assert tree.close(truth, guess, 10).tolist() == tree.close(truth, guess, 3).tolist()  # above the root
    # levels count from the true class: class 3 reaches class 0 at its 2nd level
    assert tree.close(torch.tensor([3]), torch.tensor([0]), 1).tolist() == [False]
    assert tree.close(torch.tensor([3]), torch.tensor([0]), 2).tolist() == [True]


def test_hierarchy_from_a_file_and_from_parent_ids(tmp_path):
    path = tmp_path / "tree.txt"
    path.write_text("# child parent\n0 dogs\n1, dogs\n2 cats\n\ndogs animals  # comment\ncats animals\n")
    with pytest.warns(UserWarning, match=r"1 of 4 classes have no parent \(3\)"):
        tree = analysis.Hierarchy.read(path, 4)
    assert tree.close(torch.tensor([0, 0, 0]), torch.tensor([1, 2, 3]), 2).tolist() == [True, True, False]
    flat = analysis.Hierarchy.from_parents(torch.tensor([7, 7, 0, 1]), 4)  # parent ids are not class ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class has a parent: no warning
        analysis.Hierarchy.read(path, 3)
    assert flat.close(torch.tensor([0, 0, 2, 3]), torch.tensor([1, 2, 0, 0]), 1).tolist() == [True, False, False, False]


@pytest.mark.parametrize("text,message", [
    ("0 a\na b\nb a\n", "cycle"),
    ("0 1\n", "names class 1"),
    ("0 a b\n", "expected 'CHILD PARENT'"),
    ("0 a\n0 b\n", "already has parent"),
    ("1 a\n2 a\n3 a\n", "'3' has a parent but is neither a class \\(0 to 2\\) nor the parent"),  # 1-based ids
    ("x a\n", "'x' has a parent but is neither"),
    ("# no links\n", "none of the 3 classes has a parent"),
])
def test_bad_hierarchy_files(tmp_path, text, message):
    path = tmp_path / "tree.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        analysis.Hierarchy.read(path, 3)


def test_semantic_accuracy_and_changes_by_construction():
    tree = five_class_tree()
    labels = torch.tensor([0, 0, 1, 2, 3])
    predicted = torch.tensor([0, 1, 2, 0, 0])
    splits = {"many": torch.tensor([0, 1]), "medium": torch.tensor([2]), "few": torch.tensor([3, 4])}
    at_one = analysis.semantic_accuracy(predicted, labels, splits, tree, 1)
    assert at_one["many"] == pytest.approx(200 / 3) and at_one["medium"] == 0 and at_one["few"] == 0
    at_two = analysis.semantic_accuracy(predicted, labels, splits, tree, 2)
    assert at_two["many"] == 100 and at_two["medium"] == 100 and at_two["few"] == 100  # 3 -> 0 meet at 'life'
    assert analysis.semantic_accuracy(predicted, labels, splits, tree, 0)["overall"] == 20
    # samples of classes 0 and 1; only class 2 may count as a neighbour: 0 -> 1 is close but not
    # allowed (elsewhere), 1 -> 2 is close at 2 levels and allowed
    changes = analysis.prediction_changes(predicted, labels, labels, torch.tensor([0, 1]), tree, 2,
                                          candidates=torch.tensor([2]))
    assert changes["before"] == {"correct": 1, "as_neighbor": 1, "elsewhere": 1}
    assert changes["after"] == {"correct": 3, "as_neighbor": 0, "elsewhere": 0}
    # a correct prediction counts once, as correct, though a class is within any levels of itself
    changes = analysis.prediction_changes(predicted, labels, labels, torch.tensor([0, 1, 2]), tree, 2)
    assert changes["before"] == {"correct": 1, "as_neighbor": 3, "elsewhere": 0}  # siblings and cousins
    assert changes["after"] == {"correct": 4, "as_neighbor": 0, "elsewhere": 0}


def test_pearson_with_interval():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=generator)
    result = analysis.pearson_with_interval(x, 2 * x + 0.5 * torch.randn(200, generator=generator), resamples=2000)
    assert 0.9 < result["r"] < 1 and result["low"] < result["r"] < result["high"] <= 1
    perfect = analysis.pearson_with_interval(x, -x, resamples=500)
    assert perfect["r"] == pytest.approx(-1) and perfect["high"] == pytest.approx(-1)
    with pytest.raises(ValueError, match="at least 3"):
        analysis.pearson_with_interval(x[:2], x[:2])
    smallest = analysis.pearson_with_interval(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0]),
                                              resamples=200)  # three pairs: the fewest allowed
    assert smallest["r"] == pytest.approx(3 / math.sqrt(84)) and -1 <= smallest["low"] <= smallest["high"] <= 1
    with pytest.raises(ValueError, match="contain NaN or inf"):
        analysis.pearson_with_interval(torch.tensor([1.0, float("nan"), 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 5.0]))
    undefined = analysis.pearson_with_interval(x, torch.full_like(x, 3.0), resamples=100)  # constant y
    assert all(math.isnan(value) for value in undefined.values())


def test_pearson_bootstrap_in_blocks_draws_the_same_resamples(monkeypatch):
    """The resamples are drawn a block at a time (all at once they took 1.8 GB
    for iNaturalist's 4,515 few classes); torch's generator gives the same
    stream either way, so the interval is the same to the bit."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, generator=generator)
    y = x + torch.randn(200, generator=generator)
    expected = [analysis.pearson_with_interval(x, y, resamples=count) for count in (2000, 1999)]
    assert expected[0] != expected[1]
    monkeypatch.setattr(analysis, "BOOTSTRAP_VALUES", 3 * 200)  # blocks of 3 resamples, the last of 2 or 1
    assert [analysis.pearson_with_interval(x, y, resamples=count) for count in (2000, 1999)] == expected


def test_the_few_view_reuses_the_fits_neighbours():
    from alphanet_ext import synthetic
    from alphanet_ext.analysis import neighbor_views
    problem = synthetic.make_long_tailed(num_classes=30, dim=12, max_count=150, min_count=4, seed=4)
    result = alphanet_ext.fit(problem.train_x, problem.train_y, problem.weight, problem.bias, epochs=1, k=3,
                              progress=False)
    searched = neighbor_views(result.class_means, result.splits, 3)
    reused = neighbor_views(result.class_means, result.splits, 3, few_neighbors=result.neighbors)
    assert torch.equal(reused["few"][1], searched["few"][1]) and torch.equal(reused["few"][0], searched["few"][0])
    marked = neighbor_views(result.class_means, result.splits, 3, few_neighbors=result.neighbors.flip(1))
    assert torch.equal(marked["few"][1], result.neighbors.flip(1))  # taken as given, not searched again


CUDA = torch.cuda.is_available() and alphanet_ext.compiled_with_cuda()


@pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")
def test_report_analyses_on_cuda_match_the_cpu():
    """The report runs its neighbour views and bootstrap on the fit's device: the views are
    the CPU's exactly (exact kNN, ties to the lower id) and come back on the CPU; the
    bootstrap's interval is its own per device, around the same r."""
    generator = torch.Generator().manual_seed(4)
    means = torch.randn(60, 16, generator=generator)
    splits = {"many": torch.arange(0, 30), "medium": torch.arange(30, 40), "few": torch.arange(40, 60)}
    on_cpu, on_gpu = analysis.neighbor_views(means, splits, k=3), analysis.neighbor_views(means.cuda(), splits, k=3)
    for name in on_cpu:
        assert on_gpu[name][1].device.type == "cpu"
        assert torch.equal(on_gpu[name][0], on_cpu[name][0]) and torch.equal(on_gpu[name][1], on_cpu[name][1])
    x = torch.randn(300, generator=generator)
    y = x + torch.randn(300, generator=generator)
    cpu, gpu = (analysis.pearson_with_interval(x, y, resamples=4000, device=d) for d in ("cpu", "cuda"))
    assert gpu["r"] == pytest.approx(cpu["r"], abs=1e-12)
    assert gpu["low"] == pytest.approx(cpu["low"], abs=0.03) and gpu["high"] == pytest.approx(cpu["high"], abs=0.03)
    assert analysis.pearson_with_interval(x, y, resamples=4000, device="cuda") == gpu  # deterministic per device
