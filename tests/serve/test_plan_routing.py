"""The router's plan-driven weighted choice (serve.routing) and the engine following a plan."""

from __future__ import annotations

import pytest
from thunderkv.serve.routing import PlanRouting


def no_tie(_):
    return 0


def test_prefill_and_decode_follow_the_planned_fractions():
    plan = PlanRouting([{"prefill": 0, "decode": 2, "req_per_s": 3.0},
                        {"prefill": 0, "decode": 3, "req_per_s": 1.0},
                        {"prefill": 1, "decode": 3, "req_per_s": 2.0}])
    picks = []
    for _ in range(12):
        p = plan.pick_prefill([0, 1], no_tie)
        picks.append((p, plan.pick_decode(p, [2, 3], no_tie)))
    assert picks.count((0, 2)) == 6 and picks.count((0, 3)) == 2 and picks.count((1, 3)) == 4
    # every prefix stays within one request of its share (a smooth round robin, no bursts)
    for n in range(1, 13):
        share0 = sum(1 for p, _ in picks[:n] if p == 0)
        assert abs(share0 - n * 4 / 6) <= 1
    assert {(d["prefill"], d["decode"]): d["routed"] for d in plan.to_dicts()} == {
        (0, 2): 6, (0, 3): 2, (1, 3): 4}


def test_dead_or_flipped_workers_drop_out_and_nothing_left_means_none():
    plan = PlanRouting([{"prefill": 0, "decode": 1, "req_per_s": 1.0},
                        {"prefill": 0, "decode": 2, "req_per_s": 1.0}])
    assert {plan.pick_decode(0, [2], no_tie) for _ in range(3)} == {2}  # worker 1 is gone
    assert plan.pick_decode(0, [5], no_tie) is None  # nothing planned among the candidates
    assert plan.pick_prefill([7], no_tie) is None
    assert plan.pick_decode(3, [1, 2], no_tie) is None  # an unplanned prefill worker


def test_ties_are_broken_by_the_callers_key():
    plan = PlanRouting([{"prefill": 0, "decode": 1, "req_per_s": 1.0},
                        {"prefill": 0, "decode": 2, "req_per_s": 1.0}])
    assert plan.pick_decode(0, [1, 2], lambda j: -j) == 2


@pytest.mark.parametrize("entries,match", [
    ([], "routes no requests"),
    ([{"prefill": 0, "decode": 1, "req_per_s": 0}], "routes no requests"),
    ([{"prefill": 0, "decode": 1}], "req_per_s"),
    ([{"prefill": -1, "decode": 1, "req_per_s": 1}], "negative"),
    ([{"prefill": 0, "decode": 1, "req_per_s": -1}], "finite number >= 0"),
    ([{"prefill": 0, "decode": 1, "req_per_s": "inf"}], "finite number >= 0"),  # was accepted
    ([{"prefill": 0, "decode": 1, "req_per_s": float("inf")}], "finite number >= 0"),
    ([{"prefill": 0, "decode": 1, "req_per_s": float("nan")}], "finite number >= 0"),
    ([{"prefill": "x", "decode": 1, "req_per_s": 1}], "integer"),
])
def test_bad_routing_is_refused(entries, match):
    with pytest.raises(ValueError, match=match):
        PlanRouting(entries)
