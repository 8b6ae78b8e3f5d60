"""Paired comparison of two models scored on the same items: mean difference, bootstrap interval, Wilcoxon test.

Note:
    N: paired items (test faces, or training seeds). ``a (N,)`` and ``b (N,)`` are the errors of model ``a`` and
    model ``b`` on the same items, in any unit (evaluate passes NME in %); ``delta = a - b``, so a negative
    mean favours ``a`` (lower error).

:func:`paired_comparison` is the face-level test of ``evaluate`` (``a`` = BCE, ``b`` = MSE): a percentile
bootstrap of the mean difference (``n_boot`` resamples of the N pairs, seeded) and SciPy's Wilcoxon signed-rank
p-value. A winner is named only when the interval excludes 0. :func:`seed_interval` is the seed-level interval
used across training seeds (Student t on the per-seed mean differences), where N is too small to bootstrap.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
NOT_DISTINGUISHABLE = "not distinguishable at this budget"
_CHUNK = 4_000_000  # bootstrap indices drawn per chunk (n_resamples x N), bounds memory for large N


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`paired_comparison` (``delta = a - b``; ``winner`` None unless the interval excludes 0)."""

    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    mean_delta: float
    ci_low: float
    ci_high: float
    level: float
    n_boot: int
    seed: int
    p_wilcoxon: float
    winner: str | None
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison: a {a.shape} and b {b.shape} must have the same length (same items)")
    keep = np.isfinite(a) & np.isfinite(b)  # an item without a score in either model is not a pair
    return a[keep], b[keep]


def bootstrap_means(delta: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``delta (N,)`` -> ``(n_boot,)``; same seed, same result."""
    delta = np.asarray(delta, np.float64).ravel()
    n = len(delta)
    if n == 0:
        raise ValueError("bootstrap_means: no pairs")
    if n_boot < 1:
        raise ValueError(f"bootstrap_means: n_boot = {n_boot} must be >= 1")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // n)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        out[start:stop] = delta[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def wilcoxon_p(delta: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``delta (N,)`` against 0 (1.0 when every difference is 0)."""
    from scipy.stats import wilcoxon

    delta = np.asarray(delta, np.float64).ravel()
    if not np.any(delta != 0):
        return 1.0
    return float(wilcoxon(delta).pvalue)


def verdict_text(a: str, b: str, mean_delta: float, low: float, high: float, p: float | None, n: int,
                 unit: str = "NME points", items: str = "faces") -> tuple[str | None, str]:
    """``(winner, sentence)``: e.g. ``"MSE better by 0.61 NME points [95 % CI 0.30, 0.92], p = 0.0012 (n = 300
    faces)"`` when the interval of ``a - b`` excludes 0, else the plain :data:`NOT_DISTINGUISHABLE` sentence."""
    p_text = "" if p is None else f", p = {p:.2g}"
    if not (np.isfinite(low) and np.isfinite(high)):
        return None, (f"{NOT_DISTINGUISHABLE}: {a.upper()} − {b.upper()} = {mean_delta:+.3f} {unit}, "
                      f"no interval (n = {n} {items})")
    if low > 0 or high < 0:
        winner, sign = (b, 1.0) if low > 0 else (a, -1.0)
        lo, hi = sorted((sign * low, sign * high))
        return winner, (f"{winner.upper()} better by {sign * mean_delta:.3f} {unit} [95 % CI {lo:.3f}, {hi:.3f}]"
                        f"{p_text} (n = {n} {items})")
    return None, (f"{NOT_DISTINGUISHABLE}: {a.upper()} − {b.upper()} = {mean_delta:+.3f} {unit} "
                  f"[95 % CI {low:+.3f}, {high:+.3f}]{p_text} (n = {n} {items})")


def paired_comparison(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("bce", "mse"), seed: int = 0,
                      n_boot: int = N_BOOT, level: float = LEVEL) -> Comparison:
    """Paired comparison of errors ``a (N,)`` and ``b (N,)`` on the same items (non-finite pairs are dropped).

    ``mean_delta`` = mean(a - b); ``[ci_low, ci_high]`` the percentile bootstrap interval at ``level`` from
    :func:`bootstrap_means` (``n_boot`` resamples, ``seed``); ``p_wilcoxon`` from :func:`wilcoxon_p`. ``winner`` is
    the name with the lower error only when the interval excludes 0.
    """
    if not 0 < level < 1:
        raise ValueError(f"paired_comparison: level = {level} must be in (0, 1)")
    a, b = _pairs(a, b)
    delta = a - b
    means = bootstrap_means(delta, n_boot, seed)
    low, high = (float(v) for v in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))
    p = wilcoxon_p(delta)
    mean_delta = float(delta.mean())
    winner, verdict = verdict_text(*names, mean_delta, low, high, p, len(delta))
    return Comparison(a=names[0], b=names[1], n=int(len(delta)), mean_a=float(a.mean()), mean_b=float(b.mean()),
                      mean_delta=mean_delta, ci_low=low, ci_high=high, level=level, n_boot=int(n_boot),
                      seed=int(seed), p_wilcoxon=p, winner=winner, verdict=verdict)


def seed_interval(delta: np.ndarray, level: float = LEVEL) -> dict[str, float]:
    """Across training seeds: per-seed mean differences ``delta (S,)`` -> ``{"n", "mean", "sd", "ci_low",
    "ci_high", "p_t"}``: a Student t interval at ``level`` and the one-sample t-test p-value against 0 (NaN with
    fewer than 2 seeds; ``sd`` with ``ddof=1``). With 3 seeds the interval is wide by construction (t = 4.30)."""
    from scipy.stats import t

    delta = np.asarray(delta, np.float64).ravel()
    delta = delta[np.isfinite(delta)]
    if len(delta) == 0:
        raise ValueError("seed_interval: no seeds")
    n, mean = len(delta), float(delta.mean())
    nan = float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "sd": nan, "ci_low": nan, "ci_high": nan, "p_t": nan}
    sd = float(delta.std(ddof=1))
    se = sd / np.sqrt(n)
    half = float(t.ppf((1 + level) / 2, n - 1)) * se
    p = float(2 * t.sf(abs(mean) / se, n - 1)) if se > 0 else (1.0 if mean == 0 else 0.0)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "p_t": p}


# ------------------------------------------------------------------------------------------------ evaluate's block
HEADLINE = "best_decoder"  # the headline pairs each loss at its own best test decoder (the eval.json `nme_io` rows)


MISSION_PAIR = ("bce", "mse")  # the pair whose rows keep the block's top-level keys (a, b: delta = a - b)


def loss_pairs(losses: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Every pair of ``losses`` once, as ``(a, b)`` with ``delta = a - b`` and ``a`` the later one in the list:
    ``[mse, bce, awing]`` -> ``[(bce, mse), (awing, mse), (awing, bce)]``."""
    losses = list(losses)
    return [(losses[j], losses[i]) for i in range(len(losses)) for j in range(i + 1, len(losses))]


def pair_key(a: str, b: str) -> str:
    """``"bce-mse"``: the key of pair ``(a, b)`` under ``comparison.pairs`` (delta = a - b)."""
    return f"{a}-{b}"


def overall_winner(losses: list[str] | tuple[str, ...], pair_winners: dict[tuple[str, str], str | None]) -> str | None:
    """The loss that wins its pair against every other loss (each interval excludes 0), else None; with one loss,
    None (nothing was compared)."""
    for loss in losses:
        others = [pair for pair in pair_winners if loss in pair]
        if others and len(others) == len(losses) - 1 and all(pair_winners[pair] == loss for pair in others):
            return loss
    return None


def loss_comparison(per_face: dict[str, dict[str, np.ndarray]], best: dict[str, str], seed: int = 0,
                    n_boot: int = N_BOOT) -> dict[str, Any]:
    """The ``comparison`` block of ``metrics/eval.json``: every pair of losses on the same test faces, NME points (%).

    Args:
        per_face: ``{loss: {decoder: NME (N,) as a fraction}}`` for each evaluated loss (the same N faces, same
            order), in the order of ``train.losses``.
        best: ``{loss: decoder}``, each loss's best decoder on the test set.
        seed: bootstrap seed (``base.seed``), the same for every pair.

    Returns ``{"losses", "pairs", "level", "n_boot", "seed", "headline", "unit", "winner", "verdict"}`` and, for the
    headline pair (BCE vs MSE when both were evaluated, else the first pair of :func:`loss_pairs`), its rows at the
    top level as before the list: ``"delta"``, ``"decoders"``, ``"best"``. ``pairs`` maps :func:`pair_key` to
    ``{"a", "b", "delta", "decoders": {decoder: row}, "best": row, "winner", "verdict"}``; a row is ``{"n",
    "mean_<a>", "mean_<b>", "mean_delta", "ci_low", "ci_high", "p_wilcoxon", "winner", "verdict"}``
    (:func:`paired_comparison`, delta = a − b); ``decoders`` pairs both losses at the same decoder, ``best`` each at
    its own best one (and names them, ``decoder_<loss>``). ``winner``: the loss better than every other at the
    headline (:data:`HEADLINE`) with each interval excluding 0 (:func:`overall_winner`), else None; ``verdict``: the
    headline pair's sentence for two losses, else one sentence over every pair.
    """
    losses = list(per_face)

    def row(a: str, b: str, da: str, db: str) -> dict[str, Any]:
        c = paired_comparison(100 * np.asarray(per_face[a][da]), 100 * np.asarray(per_face[b][db]), (a, b), seed,
                              n_boot)
        return {"n": c.n, f"mean_{a}": c.mean_a, f"mean_{b}": c.mean_b, "mean_delta": c.mean_delta,
                "ci_low": c.ci_low, "ci_high": c.ci_high, "p_wilcoxon": c.p_wilcoxon, "winner": c.winner,
                "verdict": c.verdict}

    pairs: dict[str, dict[str, Any]] = {}
    for a, b in loss_pairs(losses):
        rows = {d: row(a, b, d, d) for d in per_face[a] if d in per_face[b]}
        head = {f"decoder_{a}": best[a], f"decoder_{b}": best[b], **row(a, b, best[a], best[b])}
        pairs[pair_key(a, b)] = {"a": a, "b": b, "delta": f"{a} - {b}", "decoders": rows, "best": head,
                                 "winner": head["winner"], "verdict": head["verdict"]}
    winner = overall_winner(losses, {(p["a"], p["b"]): p["winner"] for p in pairs.values()})
    block: dict[str, Any] = {"losses": losses, "unit": "NME % (inter-ocular), per test face", "level": LEVEL,
                             "n_boot": n_boot, "seed": int(seed), "headline": HEADLINE}
    if pairs:
        key = pair_key(*MISSION_PAIR) if pair_key(*MISSION_PAIR) in pairs else next(iter(pairs))
        block.update(delta=pairs[key]["delta"], decoders=pairs[key]["decoders"], best=pairs[key]["best"])
    if len(pairs) == 1:
        verdict = next(iter(pairs.values()))["verdict"]
    elif not pairs:
        verdict = f"one loss ({losses[0] if losses else 'none'}): nothing to compare"
    else:
        each = "; ".join(f"{p['a'].upper()} vs {p['b'].upper()}: {p['verdict']}" for p in pairs.values())
        verdict = (f"{winner.upper()} better than every other loss ({each})" if winner
                   else f"no loss better than every other ({each})")
    return {**block, "pairs": pairs, "winner": winner, "verdict": verdict}
