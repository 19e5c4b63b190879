"""``Grid.index_at``: cell number → multi-index, in the order of ``Grid.indices()`` (row-major)."""

from __future__ import annotations

import pytest

from patchtrace.grid import Grid, GridError


@pytest.mark.parametrize("coords", [((3, 7), (0, 1, 2)), ((0, 1), (4,), (0, 1, 2, 3)), ((5,),)])
def test_index_at_walks_the_cells_in_indices_order(coords):
    axes = ("layer", "head", "pos")[: len(coords)]
    g = Grid("head", axes, coords)
    assert [g.index_at(j) for j in range(len(g))] == list(g.indices())
    for bad in (-1, len(g)):
        with pytest.raises(GridError, match=rf"cell {bad} is outside a grid of {len(g)} cells"):
            g.index_at(bad)
