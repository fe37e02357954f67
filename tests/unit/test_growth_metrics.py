"""The growth protocol's measures on made-up curves whose answers are known by hand."""

import math

import pytest

from onnxgrow import growth_metrics as gm

# scratch falls linearly 10 -> 0 over 100 steps: it is at loss L at step 10 * (10 - L)
SCRATCH = [(s, 10 - s / 10) for s in range(0, 101, 10)]


def test_steps_to_reach_interpolates_and_needs_to_stay():
    assert gm.steps_to_reach(SCRATCH, 7.5) == pytest.approx(25)
    bumpy = [(0, 5.0), (10, 3.0), (20, 4.5), (30, 3.5), (40, 2.0)]
    # touches 3.5 at step 10 but rises again; stays from between 20 and 30 (at 30 exactly: 3.5)
    assert gm.steps_to_reach(bumpy, 3.5) == pytest.approx(30)
    assert gm.steps_to_reach(bumpy, 4.0) == pytest.approx(20 + 10 * 0.5 / 1.0)


def test_never_reached_and_reached_at_start():
    assert gm.steps_to_reach(SCRATCH, -1.0) is None
    assert gm.steps_to_reach(SCRATCH, 10.0) == 0


def test_head_start_uses_the_fastest_scratch_arm():
    grown = [(0, 6.0), (10, 5.0)]
    slow = [(s, 10 - s / 20) for s in range(0, 201, 10)]
    assert gm.head_start(grown, [SCRATCH]) == pytest.approx(40)
    assert gm.head_start(grown, [slow, SCRATCH]) == pytest.approx(40)
    assert gm.head_start(grown, [slow]) == pytest.approx(80)
    assert gm.head_start([(0, -5.0)], [SCRATCH]) is None  # scratch never gets there


def test_a_grown_arm_that_keeps_its_head_start():
    # the grown curve is scratch shifted 40 steps left: it keeps H = 40 at every budget
    grown = [(s, 10 - (s + 40) / 10) for s in range(0, 61, 10)]
    m = gm.measure(grown, [SCRATCH], multiples=(1, 1.5))
    assert m["head_start"] == pytest.approx(40)
    assert m["retention"]["1H"] == pytest.approx(1.0)
    assert m["retention"]["1.5H"] == pytest.approx(1.0)
    assert m["savings"]["1H"] == math.inf  # at N = H the grown arm starts where scratch ends
    assert m["savings"]["1.5H"] == pytest.approx(60 / 20)


def test_a_head_start_that_erodes():
    # grown starts at 6 (H = 40), then learns at half scratch's speed: at N = 80 scratch is at 2, the
    # grown arm gets there at step 80 (6 - 80/20 = 2): nothing saved
    grown = [(s, 6 - s / 20) for s in range(0, 101, 10)]
    assert gm.saved_steps(grown, [SCRATCH], 40) == pytest.approx(40)  # at N = H: all of it kept
    m = gm.measure(grown, [SCRATCH], multiples=(1, 2))
    assert m["saved"]["2H"] == pytest.approx(0)
    assert m["retention"]["2H"] == pytest.approx(0)
    assert m["savings"]["2H"] == pytest.approx(1.0)


def test_grown_worse_than_scratch():
    grown = [(s, 6 - s / 40) for s in range(0, 101, 10)]  # ends at 3.5
    # N = 60: scratch at 4, grown reaches 4 at step 80: 20 steps behind
    assert gm.saved_steps(grown, [SCRATCH], 60) == pytest.approx(-20)
    assert gm.retention(-20, 40) == pytest.approx(-0.5)
    assert gm.saving(60, -20) == pytest.approx(60 / 80)
    # N = 100: scratch at 0, which the grown curve never reaches
    assert gm.saved_steps(grown, [SCRATCH], 100) is None
    assert gm.retention(None, 40) is None and gm.saving(100, None) is None


def test_median_ranks_unmeasurable_lowest():
    assert gm.median_and_range([0.5, None, 0.9]) == {"median": 0.5, "min": None, "max": 0.9, "n": 3}
    assert gm.median_and_range([0.2, 0.4])["median"] == pytest.approx(0.3)
    assert gm.median_and_range([None, 0.4])["median"] is None


def test_budgets_past_the_scratch_run_are_not_measured():
    grown = [(s, 6 - s / 10) for s in range(0, 61, 10)]
    m = gm.measure(grown, [SCRATCH], multiples=(1, 4))  # H = 40: 4H = 160 is past scratch's 100 steps
    assert m["retention"]["1H"] == pytest.approx(1.0)
    assert m["retention"]["4H"] == gm.PAST
    assert gm.median_and_range([gm.PAST, 0.5, None])["n"] == 2
