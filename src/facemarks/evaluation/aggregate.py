"""The losses across training seeds and budgets (MSE vs BCE, and any other loss of ``train.losses``), read back from
the MLflow store.

A *pair* is the set of train runs (tag ``dvc.stage`` = ``train@<loss>``, at least two losses: MSE and BCE, or the
three of ``train.losses = [mse, bce, awing]``) that one ``evaluate`` call scored together:
:func:`facemarks.evaluation.testset.log_eval_mlflow` logs ``test_nme`` into each and tags each
``evaluate_run = <id of the evaluate run>``, whose metrics hold the face-level comparison (``comparison.best.*`` for
BCE − MSE, ``comparison.pairs.<a>-<b>.best.*`` for every pair).
Runs from before that tag pair by DVC experiment name (``dvc.exp_name``), seed and budget. A *budget* is
``(input size px, epochs phase 1, epochs phase 2)`` from the run params (``input_size``, ``train.epochs_phase*``);
the *seed* is the run's ``seed`` tag (``train.seed``), else its ``train.seed`` / ``base.seed`` param. When a
(budget, seed) has several pairs (reruns), the latest counts.

Per budget, :func:`summarise` gives per loss the mean ± sd of test NME over seeds, and for every pair of losses
(:func:`facemarks.evaluation.stats.loss_pairs`) the seeds each wins and the paired difference over the seeds that have both,
with a Student t interval (:func:`facemarks.evaluation.stats.seed_interval`); a loss is named only when that interval excludes
0, and the budget's ``overall`` winner only when it wins that way against every other loss. The BCE − MSE pair keeps
the keys of the two-loss summary (``wins``, ``delta``, ``winner``, ``verdict``). Units: NME in % (inter-ocular).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from facemarks.evaluation.stats import loss_pairs, overall_winner, seed_interval, verdict_text
from facemarks.core.tracking import tracking_uri as default_uri

from facemarks.core.params import LOSS_NAMES as LOSSES  # every loss a pair may hold, in this order
FACE_KEYS = ("mean_delta", "ci_low", "ci_high", "p_wilcoxon", "n")  # the evaluate run's comparison.best.<key>


@dataclass(frozen=True)
class Pair:
    """The runs one evaluate scored together: test NME (%) per loss (two or more), and the face-level comparison of
    its evaluate run (if found): ``face`` for BCE − MSE, ``faces`` per pair key (``"awing-mse"``)."""

    budget: tuple[int | None, int | None, int | None]  # (input size, epochs phase 1, epochs phase 2)
    seed: int
    nme: dict[str, float]  # {"mse": ..., "bce": ..., ["awing": ...]}
    run_ids: dict[str, str]
    start_ms: int  # the later start time of the two runs
    exp_name: str = ""
    study: str = ""
    evaluate_run: str = ""
    face: dict[str, float] = field(default_factory=dict)  # FACE_KEYS of the evaluate run, when logged
    faces: dict[str, dict[str, float]] = field(default_factory=dict)  # per pair key, when logged

    @property
    def losses(self) -> list[str]:
        """The losses of this pair, in :data:`LOSSES` order."""
        return [loss for loss in LOSSES if loss in self.nme]

    def diff(self, a: str, b: str) -> float:
        """``a`` − ``b`` test NME (NME points); NaN when either loss is missing."""
        return self.nme[a] - self.nme[b] if a in self.nme and b in self.nme else math.nan

    @property
    def delta(self) -> float:
        """BCE − MSE test NME (NME points); NaN when either is missing."""
        return self.diff("bce", "mse")


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


def run_seed(run: Any) -> int | None:
    """A train run's training seed: its ``seed`` tag, else its ``train.seed`` / ``base.seed`` param; None if none."""
    tags, params = run.data.tags, run.data.params
    for value in (tags.get("seed"), params.get("train.seed"), params.get("base.seed")):
        if _int(value) is not None:
            return _int(value)
    return None


def run_budget(run: Any) -> tuple[int | None, int | None, int | None]:
    """A train run's budget ``(input size px, epochs phase 1, epochs phase 2)`` from its params (None: not logged)."""
    p = run.data.params
    return _int(p.get("input_size")), _int(p.get("train.epochs_phase1")), _int(p.get("train.epochs_phase2"))


def search_train_runs(experiment: str | None = None, study: str | None = None, tracking_uri: str | None = None) -> list:
    """Train runs (``dvc.stage`` = ``train@…``) with a ``test_nme`` metric in ``experiment`` (default: every
    experiment), optionally only those tagged ``study = <study>``; MLflow ``Run`` objects."""
    import mlflow

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
    """Pair the train runs one evaluate scored (see the module doc) and keep the latest pair per (budget, seed).

    Returns ``(pairs sorted by budget then seed, counts)``; counts: ``runs``, ``pairs``, ``unpaired`` (runs with no
    partner of another loss), ``superseded`` (older pairs of a (budget, seed) that has a newer one).
    """
    groups: dict[tuple, dict[str, Any]] = {}
    unpaired = 0
    for run in runs:
        loss, seed = run.data.tags.get("loss"), run_seed(run)
        if loss not in LOSSES or seed is None:
            unpaired += 1
            continue
        tags = run.data.tags
        key = (("eval", tags["evaluate_run"]) if tags.get("evaluate_run")
               else ("exp", tags.get("dvc.exp_name", ""), seed, run_budget(run)) if tags.get("dvc.exp_name") else None)
        if key is None:
            unpaired += 1
            continue
        slot = groups.setdefault(key, {})
        if loss not in slot or run.info.start_time > slot[loss].info.start_time:
            slot[loss] = run
    pairs: dict[tuple, Pair] = {}
    superseded = 0
    for key, slot in groups.items():
        if len(slot) < 2:
            unpaired += len(slot)
            continue
        names = [name for name in LOSSES if name in slot]
        first = slot[names[0]]
        pair = Pair(budget=run_budget(first), seed=run_seed(first),
                    nme={name: float(slot[name].data.metrics["test_nme"]) for name in names},
                    run_ids={name: slot[name].info.run_id for name in names},
                    start_ms=max(slot[name].info.start_time for name in names),
                    exp_name=first.data.tags.get("dvc.exp_name", ""), study=first.data.tags.get("study", ""),
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

    try:
        metrics = mlflow.MlflowClient(tracking_uri or default_uri()).get_run(pair.evaluate_run).data.metrics
    except MlflowException:
        return pair
    face = {k: metrics[f"comparison.best.{k}"] for k in FACE_KEYS if f"comparison.best.{k}" in metrics}
    faces: dict[str, dict[str, float]] = {}
    for a, b in loss_pairs(pair.losses):
        key = f"{a}-{b}"
        row = {k: metrics[f"comparison.pairs.{key}.best.{k}"] for k in FACE_KEYS
               if f"comparison.pairs.{key}.best.{k}" in metrics}
        if row:
            faces[key] = row
    if face and "bce-mse" not in faces and {"bce", "mse"} <= set(pair.nme):
        faces["bce-mse"] = face  # an evaluate run from before the loss list
    return dataclasses.replace(pair, face=face, faces=faces)


def summarise(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Per budget (sorted): ``{"budget", "label", "seeds", "pairs", "losses", "<loss>": {"mean", "sd", "n",
    "values"}, "comparisons": {"<a>-<b>": {"a", "b", "wins": {a, b, "tie"}, "delta": seed_interval(a − b per seed),
    "winner", "verdict"}}, "overall", "wins", "delta", "winner", "verdict"}``: ``wins`` … ``verdict`` are the
    BCE − MSE comparison's (the first pair's when the budget has no MSE and BCE runs); ``overall`` the loss better
    than every other over seeds (:func:`facemarks.evaluation.stats.overall_winner`), else None."""
    import numpy as np

    out = []
    for budget in sorted({p.budget for p in pairs}, key=lambda b: tuple(-1 if v is None else v for v in b)):
        group = sorted((p for p in pairs if p.budget == budget), key=lambda p: p.seed)
        losses = [loss for loss in LOSSES if any(loss in p.nme for p in group)]
        entry: dict[str, Any] = {"budget": budget, "label": budget_label(budget), "seeds": [p.seed for p in group],
                                 "pairs": group, "losses": losses}
        for loss in losses:
            values = np.array([p.nme[loss] for p in group if loss in p.nme])
            entry[loss] = {"mean": float(values.mean()), "n": len(values), "values": values.tolist(),
                           "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan}
        comparisons: dict[str, dict[str, Any]] = {}
        for a, b in loss_pairs(losses):
            deltas = np.array([p.diff(a, b) for p in group])
            deltas = deltas[np.isfinite(deltas)]
            if not len(deltas):
                continue
            d = seed_interval(deltas)
            winner, verdict = verdict_text(a, b, d["mean"], d["ci_low"], d["ci_high"],
                                           None if math.isnan(d["p_t"]) else d["p_t"], d["n"], items="seeds")
            comparisons[f"{a}-{b}"] = {"a": a, "b": b, "delta": d, "winner": winner, "verdict": verdict,
                                       "wins": {b: int((deltas > 0).sum()), a: int((deltas < 0).sum()),
                                                "tie": int((deltas == 0).sum())}}
        entry["comparisons"] = comparisons
        entry["overall"] = overall_winner(losses, {(c["a"], c["b"]): c["winner"] for c in comparisons.values()})
        head = comparisons.get("bce-mse") or next(iter(comparisons.values()), None)
        if head is not None:
            entry.update(wins=head["wins"], delta=head["delta"], winner=head["winner"], verdict=head["verdict"])
        out.append(entry)
    return out


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{mean:.3f}"


def seeds_text(summary: list[dict[str, Any]], counts: dict[str, int] | None = None) -> str:
    """The seed aggregate as aligned text (``facemarks compare``): per budget, per loss mean ± sd of test NME over
    seeds, n seeds, seeds won (against every other loss of the seed), and the paired difference over seeds of every
    pair of losses with its interval and verdict."""
    if not summary:
        return "no MSE/BCE pairs of evaluated train runs (`dvc repro` or `dvc exp run` log them)"
    lines = []
    for entry in summary:
        lines += [f"budget {entry['label']}: seeds {', '.join(map(str, entry['seeds']))}",
                  f"  {'loss':6s}{'test NME % (mean ± sd)':>26s}{'n seeds':>9s}{'seeds won':>11s}   per seed"]
        for loss in entry["losses"]:
            e = entry[loss]
            won = sum(1 for p in entry["pairs"] if loss in p.nme and len(p.nme) > 1
                      and all(p.nme[loss] < v for k, v in p.nme.items() if k != loss))
            lines.append(f"  {loss:6s}{_pm(e['mean'], e['sd']):>26s}{e['n']:>9d}{won:>11d}   "
                         + " ".join(f"{v:.3f}" for v in e["values"]))
        for c in entry["comparisons"].values():
            d, a, b = c["delta"], c["a"].upper(), c["b"].upper()
            ci = (f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if math.isfinite(d["ci_low"])
                  else "(one seed: no interval)")
            sd = f"{d['sd']:.3f}" if math.isfinite(d["sd"]) else "—"
            lines += [f"  paired {a} − {b} over seeds: {d['mean']:+.3f} NME points, sd {sd}, 95 % t-interval {ci}"
                      + (f", ties {c['wins']['tie']}" if c["wins"]["tie"] else ""),
                      f"  verdict: {c['verdict']}"]
        if len(entry["comparisons"]) > 1:
            best = entry["overall"]
            lines.append(f"  better than every other loss: {best.upper() if best else 'none'}")
        lines.append("")
    if counts:
        lines.append(f"{counts['pairs']} pairs from {counts['runs']} evaluated train runs; {counts['unpaired']} "
                     f"unpaired, {counts['superseded']} superseded by a later pair of the same budget and seed")
    return "\n".join(lines).rstrip()
