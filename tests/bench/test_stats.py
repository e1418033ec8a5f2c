"""Benchmark statistics: percentiles, median and spread, ratios, and the interleaved run order."""

from __future__ import annotations

import pytest

from slmops.bench.stats import interleaved_schedule, median, percentile, ratio, spread, summarize


def test_percentiles_interpolate_like_numpy():
    vals = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert median(vals) == 3.0
    assert percentile(vals, 0) == 1.0 and percentile(vals, 100) == 5.0
    assert spread(vals) == [2.0, 4.0]
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5  # even count: the mean of the middle two
    assert percentile([1.0, 2.0, 3.0, 10.0], 25) == pytest.approx(1.75)
    assert median([]) is None and spread([]) is None
    assert median([None, 2.0]) == 2.0  # missing samples are skipped
    assert summarize([1.0, 2.0, 3.0]) == {"median": 2.0, "spread": [1.5, 2.5], "n": 3}
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_median_resists_outliers():
    # one request hit by a busy neighbour does not move the median, only the spread's end
    vals = [100.0, 101.0, 99.0, 100.5, 10.0]
    assert median(vals) == 100.0


def test_ratio():
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None and ratio(1.0, 0) is None and ratio(1.0, None) is None


def test_interleaved_schedule_alternates_and_reverses():
    steps = interleaved_schedule(2, [32, 128], repeats=2, warmup=1)
    order = [(s.warmup, s.round, s.prompt_tokens, s.model) for s in steps]
    assert order == [
        (True, 0, 32, 0), (True, 0, 32, 1), (True, 0, 128, 0), (True, 0, 128, 1),     # warm-up: A B
        (False, 1, 32, 1), (False, 1, 32, 0), (False, 1, 128, 1), (False, 1, 128, 0),  # repeat 1: B A
        (False, 2, 32, 0), (False, 2, 32, 1), (False, 2, 128, 0), (False, 2, 128, 1),  # repeat 2: A B
    ]
    timed = [s for s in steps if not s.warmup]
    assert [s.repeat for s in timed] == [0, 0, 0, 0, 1, 1, 1, 1]
    # every model gets the same number of measured requests at every length, and goes first equally often
    for m in (0, 1):
        for n in (32, 128):
            assert sum(1 for s in timed if s.model == m and s.prompt_tokens == n) == 2
    firsts = [timed[i].model for i in range(0, len(timed), 2)]
    assert firsts.count(0) == firsts.count(1)


def test_interleaved_schedule_never_runs_a_model_twice_in_a_row_within_a_length():
    steps = interleaved_schedule(3, [64], repeats=4, warmup=0)
    for rnd in range(4):
        models = [s.model for s in steps if s.round == rnd]
        assert sorted(models) == [0, 1, 2]
    assert [s.model for s in steps[:6]] == [0, 1, 2, 2, 1, 0]


def test_interleaved_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        interleaved_schedule(0, [32], 1, 0)
    with pytest.raises(ValueError):
        interleaved_schedule(1, [32], 0, 0)


def test_paired_ratio_cancels_drift():
    from slmops.bench.stats import paired_ratio

    # the machine slows down 3x halfway through; A and B are identical and measured back to back
    drift = [100.0, 100.0, 100.0, 33.0, 33.0, 33.0]
    a = [d * 1.0 for d in drift]
    b = [d * 1.0 for d in drift]
    assert paired_ratio(a, b) == 1.0
    # A really is 10% faster: the paired ratio says so whatever the drift
    assert paired_ratio([d * 1.1 for d in drift], b) == pytest.approx(1.1)
    assert paired_ratio([1.0, None], [2.0, 4.0]) == 0.5  # incomplete pairs are skipped
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])
