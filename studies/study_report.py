"""Rebuild the budget study's table and figure from the MLflow store: reports/study/{table.md, table.csv,
nme_vs_budget.png}.

    python studies/study_report.py --study NAME [--experiment NAME] [--out reports/study]

Reads the train runs tagged ``study=NAME`` (the store of facemarks.tracking.tracking_uri: ``MLFLOW_TRACKING_URI``,
else ``mlflow.db`` at the repository root), pairs MSE and BCE per evaluate run and groups the pairs by budget
(input size, epochs) and training seed (facemarks.aggregate). Per budget and loss: test NME mean ± sd over seeds and
each seed's value. The paired interval per budget is the seed-level one: the per-seed differences BCE − MSE of test
NME, Student t over seeds (a verdict only when it excludes 0). Each seed's face-level interval (the bootstrap
over test faces that its evaluate run logged, comparison.best.*) is listed beside it; per-face values are not
pooled across seeds, because faces of one seed are not independent of that seed's training.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

from facemarks import aggregate
from facemarks.atomic import atomic_write_text

CSV_COLUMNS = ("study", "budget", "input_size", "epochs_phase1", "epochs_phase2", "seed", "nme_mse", "nme_bce", "delta",
               "face_mean_delta", "face_ci_low", "face_ci_high", "face_p_wilcoxon", "face_n", "exp_name", "run_mse",
               "run_bce", "evaluate_run")


def budget_names(summary: list[dict], study: str) -> dict[tuple, str]:
    """Budget -> the name ``studies/budget_study.py`` put in the experiment names (``<study>-<budget>-s<seed>``),
    when every pair of that budget agrees on one."""
    out = {}
    for entry in summary:
        names = set()
        for p in entry["pairs"]:
            prefix, suffix = f"{study}-", f"-s{p.seed}"
            ok = p.exp_name.startswith(prefix) and p.exp_name.endswith(suffix)
            names.add(p.exp_name[len(prefix):-len(suffix)] if ok else None)
        if len(names) == 1 and None not in names:
            out[entry["budget"]] = names.pop()
    return out


def _label(entry: dict, names: dict) -> str:
    name = names.get(entry["budget"])
    return f"{name}: {entry['label']}" if name else entry["label"]


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{mean:.3f}"


def table_markdown(summary: list[dict], study: str, names: dict, counts: dict) -> str:
    lines = [f"# Budget study `{study}`: MSE vs BCE test NME over training seeds", "",
             "Test NME in % (inter-ocular) on the synthetic test faces; one MSE and one BCE model per budget and "
             "training seed (`train.seed`), the data the same for every seed (`base.seed`). Δ = BCE − MSE "
             "(negative: BCE better). Per budget the interval is over seeds (Student t on the per-seed Δ, 95 %); a "
             "loss is named only when it excludes 0. Rebuilt by `python studies/study_report.py --study "
             f"{study}` from the MLflow store.", "",
             "| budget | seeds | MSE NME % (mean ± sd) | BCE NME % (mean ± sd) | seeds won MSE / BCE | "
             "Δ over seeds [95 % CI] | verdict |",
             "|---|---|---|---|---|---|---|"]
    for e in summary:
        d = e["delta"]
        ci = f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if math.isfinite(d["ci_low"]) else "(one seed)"
        lines.append(f"| {_label(e, names)} | {len(e['seeds'])} | {_pm(e['mse']['mean'], e['mse']['sd'])} | "
                     f"{_pm(e['bce']['mean'], e['bce']['sd'])} | {e['wins']['mse']} / {e['wins']['bce']} | "
                     f"{d['mean']:+.3f} {ci} | {e['verdict']} |")
    best = min(((e[loss]["mean"], loss, _label(e, names)) for e in summary for loss in ("mse", "bce")))
    lines += ["", f"Best mean test NME: {best[0]:.3f} % ({best[1].upper()}, {best[2]}).", "",
              "## Each seed", "",
              "Face-level Δ: the bootstrap interval over the test faces that this seed's `evaluate` logged "
              "(`comparison.best`, each loss at its best decoder; — when the run predates it).", "",
              "| budget | seed | MSE NME % | BCE NME % | Δ BCE − MSE | face-level Δ [95 % CI] | Wilcoxon p | "
              "DVC experiment |",
              "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        for p in e["pairs"]:
            f = p.face
            face = (f"{f['mean_delta']:+.3f} [{f['ci_low']:+.3f}, {f['ci_high']:+.3f}]"
                    if {"mean_delta", "ci_low", "ci_high"} <= set(f) else "—")
            pw = f"{f['p_wilcoxon']:.2g}" if "p_wilcoxon" in f else "—"
            lines.append(f"| {_label(e, names)} | {p.seed} | {p.nme['mse']:.3f} | {p.nme['bce']:.3f} | "
                         f"{p.delta:+.3f} | {face} | {pw} | {p.exp_name or '—'} |")
    lines += ["", f"{counts['pairs']} pairs from {counts['runs']} evaluated train runs; {counts['unpaired']} unpaired "
              f"runs and {counts['superseded']} superseded pairs (older reruns of a budget and seed) left out.", ""]
    return "\n".join(lines)


def table_csv(summary: list[dict], names: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for e in summary:
        for p in e["pairs"]:
            size, e1, e2 = p.budget
            writer.writerow({"study": p.study, "budget": names.get(e["budget"], e["label"]), "input_size": size,
                             "epochs_phase1": e1, "epochs_phase2": e2, "seed": p.seed, "nme_mse": p.nme["mse"],
                             "nme_bce": p.nme["bce"], "delta": p.delta,
                             **{f"face_{k}": p.face.get(k, "") for k in aggregate.FACE_KEYS},
                             "exp_name": p.exp_name, "run_mse": p.run_ids["mse"], "run_bce": p.run_ids["bce"],
                             "evaluate_run": p.evaluate_run})
    return buf.getvalue()


def figure(summary: list[dict], names: dict, study: str):
    """Left: test NME per budget and loss (each seed a dot, mean ± sd a bar). Right: Δ = BCE − MSE per budget, each
    seed's face-level interval (thin) and the interval over seeds (thick)."""
    from facemarks.plots import plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = list(range(len(summary)))
    for offset, loss, colour in ((-0.12, "mse", "C0"), (0.12, "bce", "C3")):
        for i, e in enumerate(summary):
            ax1.scatter([i + offset] * len(e[loss]["values"]), e[loss]["values"], color=colour, s=14, alpha=0.6)
            sd = e[loss]["sd"] if math.isfinite(e[loss]["sd"]) else 0.0
            ax1.errorbar(i + offset, e[loss]["mean"], yerr=sd, fmt="o", color=colour, capsize=4, ms=7,
                         label=loss.upper() if i == 0 else None)
    ax1.set(ylabel="test NME % (inter-ocular)", title="Test NME per budget (dots: seeds; bar: mean ± sd)")
    for i, e in enumerate(summary):
        pairs = e["pairs"]
        for j, p in enumerate(pairs):
            xs = i + 0.12 + 0.24 * j / max(len(pairs) - 1, 1)  # seeds to the right of the over-seeds bar
            if {"ci_low", "ci_high"} <= set(p.face):
                ax2.plot([xs, xs], [p.face["ci_low"], p.face["ci_high"]], color="0.6", lw=1)
            ax2.scatter([xs], [p.delta], color="0.3", s=12, zorder=3)
        d = e["delta"]
        if math.isfinite(d["ci_low"]):
            ax2.plot([i, i], [d["ci_low"], d["ci_high"]], color="k", lw=3, solid_capstyle="butt")
        ax2.scatter([i], [d["mean"]], color="k", s=40, zorder=4)
    ax2.axhline(0.0, color="C2", lw=1, ls="--")
    ax2.set(ylabel="Δ NME = BCE − MSE (NME points)",
            title="Paired Δ: over seeds (thick, 95 % t) and per seed over faces (thin)")
    labels = [_label(e, names).replace(": ", "\n").replace(", ", "\n") for e in summary]
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlim(-0.6, len(summary) - 0.4)
    ax1.legend(fontsize=8)
    fig.suptitle(f"Budget study {study}: MSE vs BCE over training seeds")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="the study name (base.study, MLflow tag study)")
    parser.add_argument("--experiment", help="MLflow experiment (default: every experiment)")
    parser.add_argument("--out", default="reports/study", help="output folder (default: reports/study)")
    args = parser.parse_args(argv)

    runs = aggregate.search_train_runs(args.experiment, args.study)
    pairs, counts = aggregate.pair_runs(runs)
    if not pairs:
        print(f"study_report: no evaluated MSE/BCE pairs tagged study={args.study} ({counts['runs']} train runs)",
              file=sys.stderr)
        return 1
    summary = aggregate.summarise(pairs)
    names = budget_names(summary, args.study)
    out = Path(args.out)
    atomic_write_text(out / "table.md", table_markdown(summary, args.study, names, counts))
    atomic_write_text(out / "table.csv", table_csv(summary, names))
    from facemarks.plots import save_figure

    save_figure(figure(summary, names, args.study), out / "nme_vs_budget.png", dpi=110)
    print(aggregate.seeds_text(summary, counts))
    print(f"study_report: wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'nme_vs_budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
