"""The two baselines: seeded random pruning and spatial pooling over grid cells."""

from __future__ import annotations

import pytest
import torch

from reference import registry
from reference.baselines import RandomPruning, SpatialPooling, cells
from reference.core import Signals


def signals(x: torch.Tensor) -> Signals:
    return Signals(prefix=1, size=torch.ones(*x.shape[:2], 1))


def test_random_pruning_is_seeded_ordered_and_the_same_for_every_sample():
    x = torch.randn(3, 1 + 16, 8)
    out = RandomPruning(keep=5, seed=3)(x, signals(x))
    assert out.x.shape == (3, 6, 8)
    assert (out.index == out.index[:1]).all() and (out.index[0].diff() > 0).all()
    again = RandomPruning(keep=5, seed=3)(x[1:2], signals(x[1:2]))
    assert torch.equal(again.index[0], out.index[1])
    other = RandomPruning(keep=5, seed=4)(x, signals(x))
    assert not torch.equal(other.index, out.index)


def test_spatial_pooling_averages_2x2_cells_of_a_4x4_grid():
    x = torch.randn(2, 1 + 16, 8)
    out = SpatialPooling(keep=4)(x, signals(x))
    grid = x[:, 1:].view(2, 2, 2, 2, 2, 8).mean(dim=(2, 4)).reshape(2, 4, 8)
    torch.testing.assert_close(out.x[:, 1:], grid)
    assert out.size[:, 1:, 0].tolist() == [[4.0] * 4] * 2
    assert all((row.bincount(minlength=5)[1:] == 4).all() for row in out.assign[:, 1:])


@pytest.mark.parametrize(("keep", "split"), [(64, (8, 8)), (128, (8, 16)), (192, (12, 16))])
def test_budgets_of_the_llava_benchmark_split_the_24x24_grid(keep, split):
    assert cells(keep, 24, 24) == split
    x = torch.randn(1, 1 + 576, 4)
    out = SpatialPooling(keep=keep)(x, signals(x))
    assert out.num_tokens == 1 + keep and out.size.sum() == 577


def test_baselines_are_registered_without_a_catalog_entry():
    found = {e.catalog_id: e.cls for e in registry.entries()}
    assert found["random_pruning"].baseline and found["spatial_pooling"].baseline
    with pytest.raises(ValueError, match="keep must split"):
        cells(7, 2, 2)
