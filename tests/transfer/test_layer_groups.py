"""How a one-shot send splits its layers into notices (pure Python: runs without UCX)."""

from __future__ import annotations

import math

import pytest

from thunderkv.transfer.sender import layer_groups


@pytest.mark.parametrize("layers", [1, 2, 3, 7, 30, 32, 61, 80, 200])
@pytest.mark.parametrize("per_group", [1, 2, 3, 4, 10, 37, 500])
def test_groups_cover_every_layer_and_halve_towards_the_end(layers, per_group):
    sizes = layer_groups(layers, per_group)
    assert sum(sizes) == layers and min(sizes) >= 1 and max(sizes) <= per_group
    assert sizes[-1] == min(layers, max(1, per_group // 4))  # the one check no PUT hides
    # each group's check (about 3x faster than a PUT) hides under the next group's PUT
    assert all(a <= 2 * b for a, b in zip(sizes, sizes[1:]))
    # at most two notices more than equal groups of per_group
    assert len(sizes) <= math.ceil(layers / per_group) + 2


def test_examples():
    assert layer_groups(30, 10) == [6, 10, 8, 4, 2]  # SmolLM2 at 2048 tokens, raw, 16 MiB
    assert layer_groups(30, 37) == [3, 18, 9]  # the same at 4 bits: fits one chunk
    assert layer_groups(0, 5) == []
    with pytest.raises(ValueError, match="per_group >= 1 required"):
        layer_groups(4, 0)
