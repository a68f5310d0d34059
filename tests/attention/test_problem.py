"""The canonical problem's static causal tile classification, against the dense mask."""

import numpy as np
import pytest

from transformax.attention.problem import Problem


@pytest.mark.parametrize("q_len, kv_len, offset", [(37, 37, 0), (20, 45, 25), (45, 20, -25),
                                                   (30, 30, 3), (30, 30, -4)])
def test_tile_visibility_matches_the_dense_causal_mask(q_len, kv_len, offset):
    problem = Problem(1, 1, 1, q_len, kv_len, 8, 8, np.dtype(np.float32), 1.0,
                      causal_offset=offset)
    visible = np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + offset
    for row0 in range(q_len):
        for row1 in range(row0 + 1, min(row0 + 9, q_len) + 1):
            for col0 in range(kv_len):
                for col1 in range(col0 + 1, min(col0 + 9, kv_len) + 1):
                    tile = visible[row0:row1, col0:col1]
                    want = "full" if tile.all() else "none" if not tile.any() else "partial"
                    assert problem.tile_visibility(row0, row1, col0, col1) == want
