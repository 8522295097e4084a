import pytest
import torch

from alphanet_ext import analysis


def test_prediction_changes_by_construction():
    # Three classes on the axes; class 2 is "few" with class 0 as its neighbour.
    x = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([2, 2, 2, 0])
    before_weight = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # class 0 wins on class 2 samples
    before_bias = torch.tensor([0.0, 0.0, 0.0])
    after_weight = torch.eye(3)
    table = analysis.prediction_changes((before_weight, before_bias), (after_weight, None), x, y,
                                        torch.tensor([2]), torch.tensor([[0]]))
    assert table["before"] == {"correct": 0, "as_neighbor": 3, "elsewhere": 0}
    assert table["after"] == {"correct": 3, "as_neighbor": 0, "elsewhere": 0}


def test_pearson_with_interval():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=generator)
    result = analysis.pearson_with_interval(x, 2 * x + 0.5 * torch.randn(200, generator=generator), resamples=2000)
    assert 0.9 < result["r"] < 1 and result["low"] < result["r"] < result["high"] <= 1
    perfect = analysis.pearson_with_interval(x, -x, resamples=500)
    assert perfect["r"] == pytest.approx(-1) and perfect["high"] == pytest.approx(-1)
    with pytest.raises(ValueError):
        analysis.pearson_with_interval(x[:2], x[:2])
