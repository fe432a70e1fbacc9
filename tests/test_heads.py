"""The head-grouping helper (act_plugin.heads.group_by_layer)."""

from __future__ import annotations

from act_plugin.heads import group_by_layer


def test_group_by_layer_keeps_first_seen_order_and_items():
    assert group_by_layer([(3, 1), (1, 4), (3, 0), (1, 2)]) == {3: [1, 0], 1: [4, 2]}
    assert list(group_by_layer(sorted([(3, 1), (1, 4), (3, 0)]))) == [1, 3]
    assert group_by_layer([("2", (0, 0.5)), (2, (3, 1.0))]) == {2: [(0, 0.5), (3, 1.0)]}
    assert group_by_layer([]) == {}
