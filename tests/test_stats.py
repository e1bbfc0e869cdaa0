"""bench.stats on constructed numbers whose answers are known by hand."""

from __future__ import annotations

import math

import pytest

from bench import stats

# Student's t quantiles t_{0.975, dof} from printed tables.
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105}


def test_summary_of_four_values_matches_the_hand_computed_interval():
    # mean 2.5; sample variance ((1.5² + 0.5²) * 2) / 3 = 5/3
    summary = stats.summarize([1.0, 2.0, 3.0, 4.0])
    s = math.sqrt(5 / 3)
    half = T975[3] * s / 2  # sqrt(4) = 2
    assert summary.n == 4 and summary.mean == pytest.approx(2.5)
    assert summary.std == pytest.approx(s)
    assert summary.low == pytest.approx(2.5 - half) and summary.high == pytest.approx(2.5 + half)
    assert (summary.low, summary.high) == pytest.approx((0.445740, 4.554260), abs=1e-6)


def test_two_seeds_give_the_wide_one_dof_interval():
    low, high = stats.t_interval([77.0, 78.0])
    half = T975[1] * math.sqrt(0.5) / math.sqrt(2)  # = 12.706 * 0.5
    assert (low, high) == pytest.approx((77.5 - half, 77.5 + half))
    assert half == pytest.approx(6.353102, abs=1e-6)


def test_other_confidence_levels():
    # t_{0.95, 4} = 2.131847; five values 0..4: mean 2, s = sqrt(2.5)
    low, high = stats.t_interval([0, 1, 2, 3, 4], confidence=0.90)
    half = 2.131846786 * math.sqrt(2.5) / math.sqrt(5)
    assert (low, high) == pytest.approx((2 - half, 2 + half))


def test_one_value_has_a_mean_but_no_spread_or_interval():
    summary = stats.summarize([80.5])
    assert summary == stats.Summary(n=1, mean=80.5, std=None, low=None, high=None)
    assert stats.t_interval([80.5]) is None
    assert stats.summarize([]) == stats.Summary(0, None, None, None, None)


def test_paired_differences_use_the_common_seeds_only():
    ours = {2: 80.0, 0: 78.0, 1: 79.0}
    baseline = {0: 77.0, 1: 77.5, 2: 78.5, 3: 99.0}  # seed 3 has no partner
    diffs = stats.paired_differences(ours, baseline)
    assert diffs == {0: 1.0, 1: 1.5, 2: 1.5}
    summary = stats.summarize(list(diffs.values()))
    # mean 4/3, s = sqrt(1/12), half = t(2) * s / sqrt(3)
    half = T975[2] * math.sqrt(1 / 12) / math.sqrt(3)
    assert summary.mean == pytest.approx(4 / 3)
    assert (summary.low, summary.high) == pytest.approx((4 / 3 - half, 4 / 3 + half))
    assert summary.low == pytest.approx(0.616224, abs=1e-6)
    assert stats.verdict(summary) == stats.ABOVE


def test_pairing_removes_the_shared_seed_effect():
    """Seeds that move both runs alike (a shared offset) cancel in the differences: the
    unpaired means overlap widely, the paired difference is clearly positive."""
    base = {0: 70.0, 1: 75.0, 2: 80.0, 3: 85.0}
    ours = {s: v + 1.0 + 0.1 * (-1) ** s for s, v in base.items()}
    diff = stats.summarize(list(stats.paired_differences(ours, base).values()))
    assert stats.verdict(diff) == stats.ABOVE
    ours_alone = stats.summarize(list(ours.values()))
    base_alone = stats.summarize(list(base.values()))
    assert ours_alone.low < base_alone.high  # the unpaired intervals overlap


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([1.0, 1.5, 1.5], stats.ABOVE),
        ([-1.0, -1.5, -1.5], stats.BELOW),
        ([-1.0, 1.0, 0.5], stats.WITHIN),
        ([3.0, -0.5], stats.WITHIN),  # two seeds: t(1) = 12.7 makes the interval wide
        ([2.0], stats.TOO_FEW),
        ([], stats.TOO_FEW),
        ([0.5, 0.5, 0.5], stats.ABOVE),  # no spread: the interval is the point 0.5
    ],
)
def test_verdicts(diffs, expected):
    assert stats.verdict(stats.summarize(diffs)) == expected


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: stats.t_interval([1.0, 2.0], confidence=1.5), "confidence"),
        (lambda: stats.summarize([1.0, float("nan")]), "finite"),
        (lambda: stats.summarize([1.0, float("inf"), 2.0]), "finite"),
    ],
)
def test_bad_input_is_named(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
