"""Rebuild a study's report from its committed run rows plus whatever the MLflow store adds:
reports/study/<study>/{runs.csv, table.md, nme_vs_budget.png}.

    python studies/study_report.py --study NAME [--experiment NAME] [--out reports/study]
                                   [--score-photos [--photos ../shared/real-photos --pattern '*.jpg']
                                    [--dvc-cache DIR ...]]

A study is run over several sittings and machines: every train run it made is one row of ``runs.csv`` (one model:
study, budget, seed, loss, synthetic test NME, real-photo NME, the MLflow run and the md5 of ``model.pt``), which is
committed. Each call reads the committed rows, adds the train runs tagged ``study=NAME`` in the store
(``facemarks.core.tracking.tracking_uri``: ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the repository root) that it
does not hold yet (a row of the same run id is updated, its real-photo columns kept), and rewrites the three files.
Per (budget, seed, loss) the latest run counts; older reruns are listed as superseded.

``--score-photos`` scores every row that has no real-photo NME yet and whose model file is in a DVC cache
(``<cache>/files/md5/<md5[:2]>/<md5[2:]>``, md5 from the train run's ``facemarks.model_md5`` tag; default cache:
the current folder's ``.dvc/cache``): the real-photo evaluation of :mod:`facemarks.evaluation.real_photos` on ``--photos``
(human markup where present, else dlib's points in dlib's box), at the decoder the run's evaluate found best on the
synthetic test faces, crop margin 0.25 (``augment.margin``, which no study changes). Its median is also logged into
the train run as ``photos_median``.

Per budget the table gives, per loss, the mean ± sd over seeds of the synthetic test NME and of the real-photo
median, and for every pair of losses the paired difference over seeds with a Student t 95 % interval
(:func:`facemarks.evaluation.aggregate.summarise`): a loss is named only when that interval excludes 0.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("study", "budget", "input_size", "epochs_phase1", "epochs_phase2", "seed", "loss", "test_nme",
           "photos_median", "photos_mean", "photos_above_10", "photos_faces", "photos_decoder", "exp_name", "run_id",
           "evaluate_run", "model_md5", "sigma", "start_ms")
PHOTO_VALUE = "photos_median"


# --------------------------------------------------------------------------------------------------- the rows
def store_rows(study: str, experiment: str | None = None, tracking_uri: str | None = None) -> list[dict]:
    """One row per evaluated train run tagged ``study`` in the store (real-photo columns from its metrics if any)."""
    from facemarks.evaluation import aggregate

    rows = []
    for run in aggregate.search_train_runs(experiment, study, tracking_uri):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        size, e1, e2 = aggregate.run_budget(run)
        rows.append({
            "study": study, "budget": budget_name(tags.get("dvc.exp_name", ""), study, aggregate.run_seed(run)),
            "input_size": size, "epochs_phase1": e1, "epochs_phase2": e2, "seed": aggregate.run_seed(run),
            "loss": tags.get("loss", ""), "test_nme": metrics.get("test_nme"),
            **{k: metrics.get(k) for k in ("photos_median", "photos_mean", "photos_above_10", "photos_faces")},
            "photos_decoder": tags.get("photos_decoder", ""), "exp_name": tags.get("dvc.exp_name", ""),
            "run_id": run.info.run_id, "evaluate_run": tags.get("evaluate_run", ""),
            "model_md5": tags.get("facemarks.model_md5", ""), "sigma": params.get("encode.sigma"),
            "start_ms": run.info.start_time,
            "_decoder": tags.get("test_best_decoder", "")})
    return rows


def budget_name(exp_name: str, study: str, seed: int | None) -> str:
    """``<budget>`` of an experiment named ``<study>-<budget>[-<loss>...]-s<seed>`` (``studies/budget_study.py``;
    the loss segments name an experiment that trained only those losses), else ''."""
    from facemarks.core.params import LOSS_NAMES

    prefix, suffix = f"{study}-", f"-s{seed}"
    if not (exp_name.startswith(prefix) and exp_name.endswith(suffix)):
        return ""
    parts = exp_name[len(prefix):-len(suffix)].split("-")
    while len(parts) > 1 and parts[-1] in LOSS_NAMES:
        parts.pop()
    return "-".join(parts)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        return [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _value(key: str, text: str):
    if text == "":
        return None if key not in ("study", "budget", "loss", "exp_name", "run_id", "evaluate_run", "model_md5",
                                   "photos_decoder") else ""
    if key in ("input_size", "epochs_phase1", "epochs_phase2", "seed", "photos_faces", "start_ms"):
        return int(float(text))
    if key in ("test_nme", "photos_median", "photos_mean", "photos_above_10", "sigma"):
        return float(text)
    return text


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=_order):
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    return buf.getvalue()


def _order(row: dict) -> tuple:
    return (row.get("input_size") or 0, row.get("epochs_phase1") or 0, row.get("epochs_phase2") or 0,
            row.get("seed") if row.get("seed") is not None else -1, row.get("loss") or "", row.get("start_ms") or 0)


def merge(committed: list[dict], fresh: list[dict]) -> list[dict]:
    """Committed rows updated by the store's rows of the same ``run_id`` (their real-photo columns kept when the store
    has none), plus the store's new runs."""
    by_id = {r["run_id"]: dict(r) for r in committed if r.get("run_id")}
    rows = [dict(r) for r in committed if not r.get("run_id")]
    for r in fresh:
        old = by_id.get(r["run_id"], {})
        keep = {k: old[k] for k in ("photos_median", "photos_mean", "photos_above_10", "photos_faces",
                                    "photos_decoder") if old.get(k) not in (None, "") and r.get(k) in (None, "")}
        by_id[r["run_id"]] = {**old, **{k: v for k, v in r.items() if v not in (None, "") or k not in old}, **keep}
    return rows + list(by_id.values())


def current(rows: list[dict]) -> tuple[list[dict], int]:
    """The latest row per (budget, seed, loss) and the number of older ones left out (superseded reruns)."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("test_nme") is None or r.get("seed") is None:
            continue
        key = (r["input_size"], r["epochs_phase1"], r["epochs_phase2"], r["seed"], r["loss"])
        if key not in latest or (r.get("start_ms") or 0) > (latest[key].get("start_ms") or 0):
            latest[key] = r
    return list(latest.values()), sum(1 for r in rows if r.get("test_nme") is not None) - len(latest)


def pairs(rows: list[dict], value: str = "test_nme") -> list:
    """Rows grouped by (budget, seed) as :class:`facemarks.evaluation.aggregate.Pair` with ``nme`` = ``value`` per loss."""
    from facemarks.evaluation.aggregate import Pair

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get(value) is not None:
            groups.setdefault(((r["input_size"], r["epochs_phase1"], r["epochs_phase2"]), r["seed"]), []).append(r)
    return [Pair(budget=budget, seed=seed, nme={r["loss"]: float(r[value]) for r in group},
                 run_ids={r["loss"]: r.get("run_id") or "" for r in group},
                 start_ms=max(r.get("start_ms") or 0 for r in group),
                 exp_name=",".join(sorted({r.get("exp_name") or "" for r in group} - {""})),
                 study=group[0].get("study", ""))
            for (budget, seed), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


# ------------------------------------------------------------------------------------------- real-photo scoring
def model_file(md5: str, caches: list[Path]) -> Path | None:
    for cache in caches:
        path = Path(cache) / "files" / "md5" / md5[:2] / md5[2:]
        if md5 and path.is_file():
            return path
    return None


def score_photos(rows: list[dict], caches: list[Path], folder: str, pattern: str,
                 tracking_uri: str | None = None) -> int:
    """Fill the real-photo columns of every row without them whose model is in ``caches``; returns how many."""
    from facemarks.training.model import load_model
    from facemarks.evaluation.real_photos import face_nme, loss_summary, photo_set, predict_faces

    todo = [r for r in rows if r.get(PHOTO_VALUE) is None and model_file(r.get("model_md5") or "", caches)]
    if not todo:
        return 0
    photos = photo_set(folder, pattern, cache=Path("data") / "cache" / "photo_refs")  # dlib's answers, by image hash
    for r in todo:
        decoder = r.get("_decoder") or r.get("photos_decoder") or "dark"
        model = load_model(model_file(r["model_md5"], caches))
        pts = predict_faces(model, r["loss"], photos, size=int(r["input_size"]), margin=0.25,
                            sigma=float(r.get("sigma") or 1.5), decoder=decoder)
        s = loss_summary(face_nme(pts, photos.faces), photos.faces)
        r.update(photos_median=s["median"], photos_mean=s["mean"], photos_above_10=s["share_above_10"],
                 photos_faces=s["n_faces"], photos_decoder=decoder)
        print(f"study_report: {r.get('exp_name') or r['run_id']} {r['loss']}: real-photo median {s['median']:.2f} % "
              f"({s['n_faces']} faces, {decoder})", flush=True)
        if r.get("run_id"):
            _log_photos(r, tracking_uri)
    return len(todo)


def _log_photos(row: dict, tracking_uri: str | None) -> None:
    import mlflow

    from facemarks.core.tracking import tracking_uri as default_uri

    client = mlflow.MlflowClient(tracking_uri or default_uri())
    try:
        for key in ("photos_median", "photos_mean", "photos_above_10", "photos_faces"):
            client.log_metric(row["run_id"], key, float(row[key]))
        client.set_tag(row["run_id"], "photos_decoder", row["photos_decoder"])
    except mlflow.exceptions.MlflowException:  # the run lives in another store (another sitting): the row has it
        pass


# -------------------------------------------------------------------------------------------------- the report
def _pm(entry: dict | None) -> str:
    if not entry:
        return "—"
    sd = entry["sd"]
    return f"{entry['mean']:.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{entry['mean']:.3f}"


def _label(budget: tuple, names: dict) -> str:
    from facemarks.evaluation.aggregate import budget_label

    return f"{names[budget]}: {budget_label(budget)}" if names.get(budget) else budget_label(budget)


def _comparisons(entry: dict | None) -> dict:
    return {} if entry is None else entry.get("comparisons", {})


def table_markdown(study: str, rows: list[dict], superseded: int) -> str:
    from facemarks.evaluation import aggregate

    test = {e["budget"]: e for e in aggregate.summarise(pairs(rows, "test_nme"))}
    photo = {e["budget"]: e for e in aggregate.summarise(pairs(rows, PHOTO_VALUE))} if any(
        r.get(PHOTO_VALUE) is not None for r in rows) else {}
    names = {}
    for r in rows:
        names.setdefault((r["input_size"], r["epochs_phase1"], r["epochs_phase2"]), r.get("budget") or "")
    losses = [loss for loss in aggregate.LOSSES if any(r["loss"] == loss for r in rows)]
    lines = [f"# Study `{study}`: the losses over training seeds, on synthetic test faces and on real photos", "",
             "Synthetic: test NME in % (inter-ocular) on the synthetic test faces. Real photos: the median NME % over "
             "the faces of the real-photo set (`studies/study_report.py --score-photos`: human markup where "
             "present, else dlib's 68 points in dlib's box; each model at the decoder its evaluate found best, no flip test-time augmentation). "
             "Per budget and loss: mean ± sd over training seeds (`train.seed`; the data are the same for every "
             "seed). Δ a − b per seed, Student t 95 % interval over seeds; a loss is named only when it excludes 0. "
             f"Rebuilt by `python studies/study_report.py --study {study}` from the committed `runs.csv` plus the "
             "MLflow store.", "",
             "| budget | loss | seeds | synthetic NME % | real-photo median NME % |", "|---|---|---|---|---|"]
    for budget, e in test.items():
        for loss in losses:
            if loss in e:
                p = photo.get(budget, {}).get(loss)
                real = _pm(p) + (f" (n = {p['n']})" if p and p["n"] != e[loss]["n"] else "")
                lines.append(f"| {_label(budget, names)} | {loss} | {e[loss]['n']} | {_pm(e[loss])} | {real} |")
    lines += ["", "## Paired differences over seeds", "",
              "| budget | pair | synthetic Δ [95 % CI] | verdict (synthetic) | real-photo Δ [95 % CI] | "
              "verdict (real photos) |", "|---|---|---|---|---|---|"]
    for budget, e in test.items():
        for key, c in _comparisons(e).items():
            pc = _comparisons(photo.get(budget)).get(key)
            lines.append(f"| {_label(budget, names)} | {c['a']} − {c['b']} | {_delta(c)} | {c['verdict']} | "
                         f"{_delta(pc)} | {pc['verdict'] if pc else '—'} |")
    n_photo = sum(1 for r in rows if r.get(PHOTO_VALUE) is not None)
    lines += ["", f"{len(rows)} runs ({n_photo} scored on real photos); {superseded} superseded reruns left out. "
              "Each run: `runs.csv`.", ""]
    return "\n".join(lines)


def _delta(c: dict | None) -> str:
    if not c:
        return "—"
    d = c["delta"]
    ci = f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if math.isfinite(d["ci_low"]) else "(one seed)"
    return f"{d['mean']:+.3f} {ci}"


def figure(study: str, rows: list[dict]):
    """Per budget and loss, each seed a dot and the mean ± sd a bar: synthetic test NME (left), real-photo median
    (right)."""
    import numpy as np

    from facemarks.evaluation import aggregate
    from facemarks.reporting.plots import plt

    budgets = sorted({(r["input_size"], r["epochs_phase1"], r["epochs_phase2"]) for r in rows})
    losses = [loss for loss in aggregate.LOSSES if any(r["loss"] == loss for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, value, title in ((axes[0], "test_nme", "synthetic test NME %"),
                             (axes[1], PHOTO_VALUE, "real-photo median NME %")):
        for j, loss in enumerate(losses):
            off = (j - (len(losses) - 1) / 2) * 0.2
            for i, b in enumerate(budgets):
                vals = [r[value] for r in rows if r["loss"] == loss and r.get(value) is not None
                        and (r["input_size"], r["epochs_phase1"], r["epochs_phase2"]) == b]
                if not vals:
                    continue
                ax.scatter([i + off] * len(vals), vals, color=f"C{j}", s=14, alpha=0.6)
                ax.errorbar(i + off, np.mean(vals), yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0, fmt="o",
                            color=f"C{j}", capsize=4, ms=7, label=loss.upper() if i == 0 else None)
        ax.set_xticks(range(len(budgets)), [f"{b[0]} px\n{b[1]}+{b[2]} epochs" for b in budgets], fontsize=8)
        ax.set_xlim(-0.6, len(budgets) - 0.4)
        ax.set(title=title, ylabel="NME % (inter-ocular)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not scored yet", ha="center", transform=ax.transAxes, color="0.5")
    fig.suptitle(f"Study {study}: each training seed a dot, mean ± sd a bar")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="the study name (base.study, MLflow tag study)")
    parser.add_argument("--experiment", help="MLflow experiment (default: every experiment)")
    parser.add_argument("--out", default="reports/study", help="parent folder of <study>/ (default: reports/study "
                                                                "of the current folder, the repository root)")
    parser.add_argument("--no-store", action="store_true", help="only the committed rows (no MLflow store)")
    parser.add_argument("--score-photos", action="store_true", help="score unscored models on real photos")
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "real-photos"))
    parser.add_argument("--pattern", default="*.jpg")
    parser.add_argument("--dvc-cache", nargs="*", default=[".dvc/cache"], help="DVC caches holding the models")
    args = parser.parse_args(argv)

    from facemarks.core.atomic import atomic_write_text
    from facemarks.reporting.plots import save_figure

    out = Path(args.out) / args.study
    rows = merge(read_rows(out / "runs.csv"), [] if args.no_store else store_rows(args.study, args.experiment))
    if args.score_photos:
        score_photos(rows, [Path(c) for c in args.dvc_cache], args.photos, args.pattern)
    if not rows:
        print(f"study_report: no rows for study {args.study} (no {out / 'runs.csv'}, no runs in the store)",
              file=sys.stderr)
        return 1
    atomic_write_text(out / "runs.csv", rows_csv(rows))
    latest, superseded = current(rows)
    atomic_write_text(out / "table.md", table_markdown(args.study, latest, superseded))
    save_figure(figure(args.study, latest), out / "nme_vs_budget.png", dpi=110)
    print(f"study_report: wrote {out / 'runs.csv'} ({len(rows)} rows), {out / 'table.md'}, {out / 'nme_vs_budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
