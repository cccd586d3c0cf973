"""Bootstrap intervals over items: against a direct loop, degenerate cases, and pairing."""

import zlib

import numpy as np
import pytest

from evaluation.intervals import (
    Bootstrap,
    Interval,
    bootstrap_indices,
    mean_interval,
    paired_differences,
    percentile_interval,
    retention_intervals,
    score_interval,
)


def _stream(name, seed=0):
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def test_score_interval_matches_a_direct_loop():
    scores = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0.5]
    boot = Bootstrap(resamples=500, seed=3)
    rng, means = _stream("digit", seed=3), []
    for _ in range(500):
        picked = [scores[int(i)] for i in rng.integers(0, len(scores), size=len(scores))]
        means.append(100 * sum(picked) / len(picked))
    low, high = np.percentile(means, [2.5, 97.5])
    got = score_interval(scores, "digit", boot)
    assert got.low == pytest.approx(low, abs=1e-9) and got.high == pytest.approx(high, abs=1e-9)
    assert got.low < 100 * np.mean(scores) < got.high
    # another level is another pair of quantiles of the same resamples
    low80, high80 = np.percentile(means, [10, 90])
    narrow = score_interval(scores, "digit", Bootstrap(level=0.8, resamples=500, seed=3))
    assert (narrow.low, narrow.high) == (pytest.approx(low80), pytest.approx(high80))


def test_retention_interval_matches_a_direct_paired_loop():
    cell = [1, 0, 0, 1, 1, 0, 1, 0]
    dense = [1, 1, 0, 1, 1, 1, 1, 0]
    rng, values = _stream("scene"), []
    for _ in range(300):
        index = rng.integers(0, 8, size=8)
        d = sum(dense[i] for i in index)
        values.append(100 * sum(cell[i] for i in index) / d if d > 0 else None)
    kept = [v for v in values if v is not None]
    low, high = np.percentile(kept, [2.5, 97.5])
    got = retention_intervals({"scene": cell}, {"scene": dense}, Bootstrap(resamples=300))
    assert got.per_benchmark["scene"] == Interval(pytest.approx(low), pytest.approx(high))
    assert got.mean == got.per_benchmark["scene"]  # one benchmark: its mean is itself


def test_mean_retention_interval_averages_benchmarks_per_resample():
    cell = {"a": [1, 0, 1, 1], "b": [0.5, 1.0, 0.25]}
    dense = {"a": [1, 1, 1, 1], "b": [1.0, 1.0, 0.5]}
    boot = Bootstrap(resamples=200, seed=1)
    per = []
    for name in ("a", "b"):
        index = bootstrap_indices(len(cell[name]), name, boot)
        c, d = np.asarray(cell[name])[index].mean(1), np.asarray(dense[name])[index].mean(1)
        per.append(100 * c / d)
    low, high = np.percentile(np.mean(per, axis=0), [2.5, 97.5])
    got = retention_intervals(cell, dense, boot).mean
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))


def test_mean_interval_of_unbounded_values_matches_a_direct_loop():
    """Per-prompt KL (nats, not in [0, 1]) is resampled in its own unit."""
    kl = [0.02, 0.5, 1.75, 0.0, 0.31, 3.2, 0.07]
    rng, means = _stream("map kl", seed=2), []
    for _ in range(400):
        means.append(float(np.mean([kl[int(i)] for i in rng.integers(0, len(kl), size=len(kl))])))
    low, high = np.percentile(means, [2.5, 97.5])
    got = mean_interval(kl, "map kl", Bootstrap(resamples=400, seed=2))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high)) and got.low < np.mean(kl) < got.high
    assert mean_interval([0.4] * 5, "map kl") == Interval(pytest.approx(0.4), pytest.approx(0.4))
    for bad in ([0.1, float("nan")], [[0.1, 0.2]]):
        with pytest.raises(ValueError, match="finite 1-D"):
            mean_interval(bad, "map kl")


def test_zero_variance_collapses_to_the_point():
    assert score_interval([1, 1, 1, 1, 1], "x") == Interval(100.0, 100.0)
    assert score_interval([0.25] * 7, "x") == Interval(25.0, 25.0)
    same = {"x": [1, 0, 1, 1, 0, 0, 1]}
    kept = retention_intervals(same, same)  # a cell equal to dense item by item keeps 100% on every resample
    assert kept.per_benchmark["x"] == Interval(100.0, 100.0) and kept.mean == Interval(100.0, 100.0)


def test_pairing_matters():
    """A and B differ on exactly one item of 20 and agree on the rest (which vary a lot): paired, the
    difference is never negative and its interval is narrow; resampled independently it is wide and
    straddles 0."""
    rng = np.random.default_rng(7)
    b = rng.integers(0, 2, size=20).astype(float)
    b[0] = 0.0
    a = b.copy()
    a[0] = 1.0  # A = B + one more right answer
    boot = Bootstrap(resamples=1000)
    paired = paired_differences({"t": a}, {"t": b}, None, boot).scores["t"]
    assert paired.value == pytest.approx(5.0)
    assert paired.interval.low == 0.0 and paired.interval.high == pytest.approx(15.0)
    own = np.random.default_rng(11)
    unpaired = [100 * (a[own.integers(0, 20, 20)].mean() - b[own.integers(0, 20, 20)].mean()) for _ in range(1000)]
    low, high = np.percentile(unpaired, [2.5, 97.5])
    assert low < -15.0 and high > 25.0  # much wider, and it straddles 0
    assert high - low > 3 * (paired.interval.high - paired.interval.low)
    # retention against the same dense: identical cells differ by exactly 0 on every resample
    dense = {"t": np.ones(20)}
    same = paired_differences({"t": b}, {"t": b}, dense, boot)
    assert same.mean_retention.value == 0.0 and same.mean_retention.interval == Interval(0.0, 0.0)


def test_paired_difference_matches_a_direct_loop():
    a, b, dense = [1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1], [1, 1, 1, 1, 0, 1]
    boot = Bootstrap(resamples=400, seed=2)
    rng, scores, kept = _stream("m", seed=2), [], []
    for _ in range(400):
        i = rng.integers(0, 6, size=6)
        sa, sb, sd = (sum(v[j] for j in i) for v in (a, b, dense))
        scores.append(100 * (sa - sb) / 6)
        kept.append(100 * (sa - sb) / sd if sd else np.nan)
    got = paired_differences({"m": a}, {"m": b}, {"m": dense}, boot)
    assert got.scores["m"].value == pytest.approx(100 * 2 / 6)
    assert got.scores["m"].interval == Interval(*map(pytest.approx, np.percentile(scores, [2.5, 97.5])))
    assert got.mean_retention.value == pytest.approx(100 * 2 / 5)
    assert got.mean_retention.interval == Interval(*map(pytest.approx, np.nanpercentile(kept, [2.5, 97.5])))


def test_draws_are_seeded_and_per_benchmark():
    boot = Bootstrap(resamples=50, seed=4)
    assert np.array_equal(bootstrap_indices(9, "a", boot), bootstrap_indices(9, "a", boot))
    assert not np.array_equal(bootstrap_indices(9, "a", boot), bootstrap_indices(9, "b", boot))
    other_seed = Bootstrap(resamples=50, seed=5)
    assert not np.array_equal(bootstrap_indices(9, "a", boot), bootstrap_indices(9, "a", other_seed))
    assert percentile_interval(np.array([np.nan, np.nan]), 0.95) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"level": 1.0}, r"level must be in \(0, 1\).*1.0"),
    ({"level": float("nan")}, "level"),
    ({"resamples": 0}, "resamples must be an integer >= 1.*0"),
    ({"resamples": 2.5}, "2.5"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_bad_bootstrap_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Bootstrap(**kwargs)


def test_bad_items_are_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_differences({"t": [1, 0]}, {"t": [1, 0, 1]})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_interval([1, 2], "t")
    with pytest.raises(ValueError, match="no items"):
        score_interval([], "t")
    with pytest.raises(ValueError, match="dense items of \\['u'\\]"):
        retention_intervals({"u": [1]}, {"t": [1]})
    with pytest.raises(ValueError, match="share no benchmark"):
        paired_differences({"t": [1]}, {"u": [1]})
