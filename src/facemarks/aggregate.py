"""MSE vs BCE across training seeds and budgets, read back from the MLflow store.

A *pair* is the MSE and the BCE train run (tag ``dvc.stage`` = ``train@<loss>``) that one ``evaluate`` call scored
together: :func:`facemarks.evaluation.log_eval_mlflow` logs ``test_nme`` into both and tags both
``evaluate_run = <id of the evaluate run>``, whose metrics hold the face-level comparison (``comparison.best.*``).
Runs from before that tag pair by DVC experiment name (``dvc.exp_name``), seed and budget. A *budget* is
``(input size px, epochs phase 1, epochs phase 2)`` from the run params (``input_size``, ``train.epochs_phase*``);
the *seed* is the run's ``seed`` tag (``train.seed``), else its ``train.seed`` / ``base.seed`` param. When a
(budget, seed) has several pairs (reruns), the latest counts.

Per budget, :func:`summarise` gives per loss the mean ± sd of test NME over seeds, the seeds each loss wins, and the
paired difference BCE − MSE over seeds with a Student t interval (:func:`facemarks.stats.seed_interval`); a loss
is named only when that interval excludes 0. Units: NME in % (inter-ocular).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LOSSES = ("mse", "bce")
FACE_KEYS = ("mean_delta", "ci_low", "ci_high", "p_wilcoxon", "n")  # the evaluate run's comparison.best.<key>


@dataclass(frozen=True)
class Pair:
    """One MSE + BCE pair: test NME (%) per loss, and the face-level comparison of its evaluate run (if found)."""

    budget: tuple[int | None, int | None, int | None]  # (input size, epochs phase 1, epochs phase 2)
    seed: int
    nme: dict[str, float]  # {"mse": ..., "bce": ...}
    run_ids: dict[str, str]
    start_ms: int  # the later start time of the two runs
    exp_name: str = ""
    study: str = ""
    evaluate_run: str = ""
    face: dict[str, float] = field(default_factory=dict)  # FACE_KEYS of the evaluate run, when logged

    @property
    def delta(self) -> float:
        """BCE − MSE test NME (NME points)."""
        return self.nme["bce"] - self.nme["mse"]


def budget_label(budget: tuple[int | None, int | None, int | None]) -> str:
    """``"64 px (16×16 maps), 2+1 epochs"``; ``?`` for what the runs did not log."""
    size, e1, e2 = budget
    where = "? px" if size is None else f"{size} px ({size // 4}×{size // 4} maps)"
    return f"{where}, {'?' if e1 is None else e1}+{'?' if e2 is None else e2} epochs"


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _seed(run: Any) -> int | None:
    tags, params = run.data.tags, run.data.params
    for value in (tags.get("seed"), params.get("train.seed"), params.get("base.seed")):
        if _int(value) is not None:
            return _int(value)
    return None


def _budget(run: Any) -> tuple[int | None, int | None, int | None]:
    p = run.data.params
    return _int(p.get("input_size")), _int(p.get("train.epochs_phase1")), _int(p.get("train.epochs_phase2"))


def search_train_runs(experiment: str | None = None, study: str | None = None, tracking_uri: str | None = None) -> list:
    """Train runs (``dvc.stage`` = ``train@…``) with a ``test_nme`` metric in ``experiment`` (default: every
    experiment), optionally only those tagged ``study = <study>``; MLflow ``Run`` objects."""
    import mlflow

    from facemarks.tracking import tracking_uri as default_uri

    client = mlflow.MlflowClient(tracking_uri or default_uri())
    exps = [e.experiment_id for e in client.search_experiments() if experiment in (None, e.name)]
    if not exps:
        return []
    query = "tags.`dvc.stage` LIKE 'train@%' and metrics.test_nme > -1"
    if study:
        query += f" and tags.study = '{study}'"
    runs, token = [], None
    while True:
        page = client.search_runs(exps, query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def pair_runs(runs: list, tracking_uri: str | None = None) -> tuple[list[Pair], dict[str, int]]:
    """Pair MSE and BCE train runs (see the module doc) and keep the latest pair per (budget, seed).

    Returns ``(pairs sorted by budget then seed, counts)``; counts: ``runs``, ``pairs``, ``unpaired`` (runs with no
    partner of the other loss), ``superseded`` (older pairs of a (budget, seed) that has a newer one).
    """
    groups: dict[tuple, dict[str, Any]] = {}
    unpaired = 0
    for run in runs:
        loss, seed = run.data.tags.get("loss"), _seed(run)
        if loss not in LOSSES or seed is None:
            unpaired += 1
            continue
        tags = run.data.tags
        key = (("eval", tags["evaluate_run"]) if tags.get("evaluate_run")
               else ("exp", tags.get("dvc.exp_name", ""), seed, _budget(run)) if tags.get("dvc.exp_name") else None)
        if key is None:
            unpaired += 1
            continue
        slot = groups.setdefault(key, {})
        if loss not in slot or run.info.start_time > slot[loss].info.start_time:
            slot[loss] = run
    pairs: dict[tuple, Pair] = {}
    superseded = 0
    for key, slot in groups.items():
        if set(slot) != set(LOSSES):
            unpaired += len(slot)
            continue
        mse, bce = slot["mse"], slot["bce"]
        pair = Pair(budget=_budget(mse), seed=_seed(mse),
                    nme={name: float(slot[name].data.metrics["test_nme"]) for name in LOSSES},
                    run_ids={name: slot[name].info.run_id for name in LOSSES},
                    start_ms=max(mse.info.start_time, bce.info.start_time),
                    exp_name=mse.data.tags.get("dvc.exp_name", ""), study=mse.data.tags.get("study", ""),
                    evaluate_run=key[1] if key[0] == "eval" else "")
        where = (pair.budget, pair.seed)
        if where in pairs:
            superseded += 1
            if pairs[where].start_ms >= pair.start_ms:
                continue
        pairs[where] = pair
    out = [_with_face(p, tracking_uri) for p in pairs.values()]
    out.sort(key=lambda p: (tuple(-1 if v is None else v for v in p.budget), p.seed))
    return out, {"runs": len(runs), "pairs": len(out), "unpaired": unpaired, "superseded": superseded}


def _with_face(pair: Pair, tracking_uri: str | None) -> Pair:
    """``pair`` with the face-level comparison (``comparison.best.*``) of its evaluate run, when the store has it."""
    if not pair.evaluate_run:
        return pair
    import mlflow
    from mlflow.exceptions import MlflowException

    from facemarks.tracking import tracking_uri as default_uri

    try:
        metrics = mlflow.MlflowClient(tracking_uri or default_uri()).get_run(pair.evaluate_run).data.metrics
    except MlflowException:
        return pair
    face = {k: metrics[f"comparison.best.{k}"] for k in FACE_KEYS if f"comparison.best.{k}" in metrics}
    return dataclasses.replace(pair, face=face)


def summarise(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Per budget (sorted): ``{"budget", "label", "seeds", "pairs", "<loss>": {"mean", "sd", "n", "values"},
    "wins": {"mse", "bce", "tie"}, "delta": seed_interval(BCE − MSE per seed), "winner", "verdict"}``."""
    import numpy as np

    from facemarks.stats import seed_interval, verdict_text

    out = []
    for budget in sorted({p.budget for p in pairs}, key=lambda b: tuple(-1 if v is None else v for v in b)):
        group = sorted((p for p in pairs if p.budget == budget), key=lambda p: p.seed)
        entry: dict[str, Any] = {"budget": budget, "label": budget_label(budget), "seeds": [p.seed for p in group],
                                 "pairs": group}
        for loss in LOSSES:
            values = np.array([p.nme[loss] for p in group])
            entry[loss] = {"mean": float(values.mean()), "n": len(values), "values": values.tolist(),
                           "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan}
        deltas = np.array([p.delta for p in group])
        entry["wins"] = {"mse": int((deltas > 0).sum()), "bce": int((deltas < 0).sum()),
                         "tie": int((deltas == 0).sum())}
        d = seed_interval(deltas)
        entry["delta"] = d
        entry["winner"], entry["verdict"] = verdict_text("bce", "mse", d["mean"], d["ci_low"], d["ci_high"],
                                                         None if math.isnan(d["p_t"]) else d["p_t"], d["n"],
                                                         items="seeds")
        out.append(entry)
    return out


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{mean:.3f}"


def seeds_text(summary: list[dict[str, Any]], counts: dict[str, int] | None = None) -> str:
    """The seed aggregate as aligned text (``facemarks compare``): per budget, per loss mean ± sd of test NME over
    seeds, n seeds, seeds won, and the paired BCE − MSE difference over seeds with its interval and verdict."""
    if not summary:
        return "no MSE/BCE pairs of evaluated train runs (`dvc repro` or `dvc exp run` log them)"
    lines = []
    for entry in summary:
        lines += [f"budget {entry['label']}: seeds {', '.join(map(str, entry['seeds']))}",
                  f"  {'loss':6s}{'test NME % (mean ± sd)':>26s}{'n seeds':>9s}{'seeds won':>11s}   per seed"]
        for loss in LOSSES:
            e = entry[loss]
            lines.append(f"  {loss:6s}{_pm(e['mean'], e['sd']):>26s}{e['n']:>9d}{entry['wins'][loss]:>11d}   "
                         + " ".join(f"{v:.3f}" for v in e["values"]))
        d = entry["delta"]
        ci = f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if math.isfinite(d["ci_low"]) else "(one seed: no interval)"
        sd = f"{d['sd']:.3f}" if math.isfinite(d["sd"]) else "—"
        lines += [f"  paired BCE − MSE over seeds: {d['mean']:+.3f} NME points, sd {sd}, "
                  f"95 % t-interval {ci}"
                  + (f", ties {entry['wins']['tie']}" if entry["wins"]["tie"] else ""),
                  f"  verdict: {entry['verdict']}", ""]
    if counts:
        lines.append(f"{counts['pairs']} pairs from {counts['runs']} evaluated train runs; {counts['unpaired']} "
                     f"unpaired, {counts['superseded']} superseded by a later pair of the same budget and seed")
    return "\n".join(lines).rstrip()
