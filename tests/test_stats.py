"""facemarks.evaluation.stats: paired bootstrap interval, Wilcoxon p-value and verdict on known cases."""
from __future__ import annotations

import numpy as np
import pytest

from facemarks.evaluation import stats


def errors(n: int = 300, seed: int = 0) -> np.ndarray:
    """Per-face NME-like errors (%), skewed like real ones."""
    return np.random.default_rng(seed).gamma(4.0, 1.5, n)


def test_identical_arrays_give_an_interval_around_zero_and_no_winner():
    a = errors()
    c = stats.paired_comparison(a, a.copy(), seed=0)
    assert c.mean_delta == 0 and c.ci_low <= 0 <= c.ci_high
    assert c.winner is None and c.p_wilcoxon == 1.0
    assert c.verdict.startswith(stats.NOT_DISTINGUISHABLE)
    assert c.n == 300 and c.n_boot >= 2000


def test_noise_without_a_shift_is_not_distinguishable():
    mse = errors()
    bce = mse + np.random.default_rng(1).normal(0.0, 1.0, mse.shape)
    bce -= (bce - mse).mean()  # exactly zero mean difference, noisy pairs
    c = stats.paired_comparison(bce, mse, seed=3)
    assert c.ci_low < 0 < c.ci_high and c.winner is None
    assert "not distinguishable at this budget" in c.verdict


@pytest.mark.parametrize("shift, winner", [(0.5, "mse"), (-0.5, "bce")])
def test_a_clear_shift_excludes_zero_and_names_the_lower_error(shift, winner):
    mse = errors()
    bce = mse + shift + np.random.default_rng(2).normal(0.0, 0.3, mse.shape)
    c = stats.paired_comparison(bce, mse, names=("bce", "mse"), seed=0)
    assert c.winner == winner
    assert (c.ci_low > 0) if shift > 0 else (c.ci_high < 0)
    assert c.ci_low < c.mean_delta < c.ci_high and abs(c.mean_delta - shift) < 0.1
    assert c.p_wilcoxon < 1e-6
    assert c.verdict.startswith(f"{winner.upper()} better by {abs(c.mean_delta):.3f} NME points [95 % CI ")
    lo, hi = (float(v) for v in c.verdict.split("[95 % CI ")[1].split("]")[0].split(", "))
    assert 0 < lo < abs(c.mean_delta) < hi  # the interval of the winner's advantage, both ends positive


def test_bootstrap_is_reproducible_for_a_seed_and_changes_with_it():
    delta = errors(200) - errors(200, seed=5)
    one, again = stats.bootstrap_means(delta, 2000, seed=7), stats.bootstrap_means(delta, 2000, seed=7)
    assert np.array_equal(one, again)
    assert not np.array_equal(one, stats.bootstrap_means(delta, 2000, seed=8))
    a, b = errors(200), errors(200, seed=5)
    assert stats.paired_comparison(a, b, seed=7) == stats.paired_comparison(a, b, seed=7)


def test_bootstrap_interval_matches_the_normal_approximation():
    """The percentile interval of a mean is close to mean ± 1.96 sd / sqrt(N) for a large N."""
    delta = np.random.default_rng(4).normal(0.2, 1.0, 2000)
    c = stats.paired_comparison(delta, np.zeros_like(delta), seed=0, n_boot=4000)
    half = 1.96 * delta.std(ddof=1) / np.sqrt(len(delta))
    assert c.ci_low == pytest.approx(delta.mean() - half, abs=0.01)
    assert c.ci_high == pytest.approx(delta.mean() + half, abs=0.01)


def test_chunked_bootstrap_equals_one_draw_per_row():
    """Chunking the index draws (bounded memory) gives the same resamples as drawing them all at once."""
    delta = errors(50)
    rng = np.random.default_rng(11)
    direct = delta[rng.integers(0, 50, size=(300, 50))].mean(1)
    old = stats._CHUNK
    stats._CHUNK = 50 * 300
    try:
        assert np.allclose(stats.bootstrap_means(delta, 300, seed=11), direct)
    finally:
        stats._CHUNK = old


def test_non_finite_pairs_are_dropped_and_bad_input_is_refused():
    a, b = errors(10), errors(10, seed=1)
    a[3], b[5] = np.nan, np.inf
    c = stats.paired_comparison(a, b)
    assert c.n == 8 and np.isfinite([c.mean_delta, c.ci_low, c.ci_high, c.p_wilcoxon]).all()
    with pytest.raises(ValueError, match="same length"):
        stats.paired_comparison(a, b[:5])
    with pytest.raises(ValueError, match="no pairs"):
        stats.paired_comparison(np.array([np.nan]), np.array([1.0]))


def test_seed_interval_is_a_student_t_interval():
    from scipy.stats import ttest_1samp

    r = stats.seed_interval(np.array([0.1, 0.3, 0.2]))
    assert r["n"] == 3 and r["mean"] == pytest.approx(0.2) and r["sd"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, df=2)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert r["p_t"] == pytest.approx(ttest_1samp([0.1, 0.3, 0.2], 0.0).pvalue)
    assert np.isnan(stats.seed_interval(np.array([0.4]))["ci_low"])


def test_loss_comparison_block_pairs_every_decoder_and_the_best_ones():
    rng = np.random.default_rng(0)
    base = rng.gamma(4.0, 0.015, 300)  # fractions, as metrics.face_metrics returns them
    per_face = {"mse": {"argmax": base + 0.02, "dark": base},
                "bce": {"argmax": base + 0.02 + rng.normal(0, 0.002, 300), "dark": base + 0.005}}
    block = stats.loss_comparison(per_face, {"mse": "dark", "bce": "argmax"}, seed=1)
    assert block["headline"] == "best_decoder" and block["delta"] == "bce - mse" and block["n_boot"] >= 2000
    dark = block["decoders"]["dark"]
    assert dark["winner"] == "mse" and dark["ci_low"] > 0 and dark["mean_delta"] == pytest.approx(0.5)  # NME points
    assert dark["mean_mse"] == pytest.approx(100 * base.mean())
    assert block["decoders"]["argmax"]["winner"] is None
    best = block["best"]
    assert (best["decoder_mse"], best["decoder_bce"]) == ("dark", "argmax")
    assert best["mean_delta"] == pytest.approx(100 * (per_face["bce"]["argmax"] - base).mean())
    assert block["winner"] == best["winner"] == "mse" and block["verdict"].startswith("MSE better by ")


def test_verdict_without_an_interval_names_no_winner():
    winner, text = stats.verdict_text("bce", "mse", 0.3, float("nan"), float("nan"), None, 1, items="seeds")
    assert winner is None
    assert text == "not distinguishable at this budget: BCE − MSE = +0.300 NME points, no interval (n = 1 seeds)"


def test_loss_comparison_pairs_every_loss_and_names_a_winner_only_against_all():
    rng = np.random.default_rng(2)
    base = rng.gamma(4.0, 0.015, 300)
    noise = lambda: rng.normal(0, 0.002, 300)  # noqa: E731
    per_face = {"mse": {"dark": base + 0.005 + noise()}, "bce": {"dark": base + 0.01 + noise()},
                "awing": {"dark": base + noise()}}
    best = {loss: "dark" for loss in per_face}
    block = stats.loss_comparison(per_face, best, seed=1)
    assert stats.loss_pairs(["mse", "bce", "awing"]) == [("bce", "mse"), ("awing", "mse"), ("awing", "bce")]
    assert list(block["pairs"]) == ["bce-mse", "awing-mse", "awing-bce"] and block["losses"] == ["mse", "bce", "awing"]
    for key, pair in block["pairs"].items():
        a, b = pair["a"], pair["b"]
        assert key == f"{a}-{b}" and pair["delta"] == f"{a} - {b}"
        r = pair["best"]
        assert r["mean_delta"] == pytest.approx(100 * (per_face[a]["dark"] - per_face[b]["dark"]).mean())
        assert r["ci_low"] <= r["mean_delta"] <= r["ci_high"]
    assert block["pairs"]["awing-mse"]["winner"] == "awing" and block["pairs"]["awing-bce"]["winner"] == "awing"
    assert block["pairs"]["bce-mse"]["winner"] == "mse"
    assert block["winner"] == "awing" and block["verdict"].startswith("AWING better than every other loss")
    # the mission pair keeps the top-level keys of the two-loss block, with the very same numbers
    two = stats.loss_comparison({k: per_face[k] for k in ("mse", "bce")}, best, seed=1)
    assert block["delta"] == two["delta"] == "bce - mse" and block["best"] == two["best"]
    assert block["decoders"] == two["decoders"] and two["winner"] == "mse"
    assert two["verdict"] == two["best"]["verdict"] and list(two["pairs"]) == ["bce-mse"]
    # no loss better than both others: awing equal to mse -> no overall winner although mse beats bce
    per_face["awing"] = {"dark": per_face["mse"]["dark"] + rng.normal(0, 1e-4, 300)}
    tie = stats.loss_comparison(per_face, best, seed=1)
    assert tie["pairs"]["awing-mse"]["winner"] is None and tie["winner"] is None
    assert tie["verdict"].startswith("no loss better than every other")
    # one loss: nothing compared, no winner
    one = stats.loss_comparison({"awing": per_face["awing"]}, best)
    assert one["pairs"] == {} and one["winner"] is None and "nothing to compare" in one["verdict"]
    # without bce the headline pair is the first one of the list
    assert stats.loss_comparison({k: per_face[k] for k in ("mse", "awing")}, best)["delta"] == "awing - mse"
