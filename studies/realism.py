"""Realism study of the synthetic faces: one row per generator / augmentation setting.

Each row runs the real stage scripts (download → augment → encode → train@mse) in a work folder of its own
(``.studies/realism/<name>/``, gitignored) on ``params.yaml`` plus the row's overrides, then measures:

- dlib realism on the synthetic test faces (``metrics/realism.json``: dlib's NME and detector hit rate),
- the MSE model's synthetic test NME (inter-ocular, %, DARK decoder, true boxes),
- its NME from dlib's points on the bundled real portraits (:mod:`facemarks.evaluation.real_photos`: astronaut, Grace Hopper),
- the download stage's seconds (kept in the row's JSON; not a speed benchmark on a shared machine:
  ``benchmarks/bench_synthetic.py`` measures generation speed).

Usage (from the repo root)::

    python studies/realism.py v2 data.synthetic.glasses_prob=0 augment.jpeg_prob=0
    python studies/realism.py --table            # rebuild reports/realism/table.md from the rows

Rows are written to ``reports/realism/rows/<name>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "reports" / "realism" / "rows"
STAGES = ("download", "augment", "encode")


def _set(doc: dict, dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for p in parents:
        node = node[p]
    node[last] = yaml.safe_load(value)


def prepare(work: Path, overrides: list[str], code: Path = ROOT) -> dict:
    """A work folder with the stage scripts and params.yaml of ``code`` + overrides; returns the merged params."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(code / "stages", work / "stages")
    doc = yaml.safe_load((code / "params.yaml").read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        _set(doc, key, value)
    (work / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


def run_stages(work: Path, code: Path = ROOT, data_only: bool = False) -> dict[str, float]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", PYTHONPATH=str(code / "src"))
    seconds = {}
    cmds = [[sys.executable, "stages/download.py"]]
    if not data_only:
        cmds += [[sys.executable, f"stages/{s}.py"] for s in STAGES[1:]] + [[sys.executable, "stages/train.py", "--loss", "mse"]]
    for cmd in cmds:
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=work, env=env, check=True)
        seconds[Path(cmd[1]).stem + ("@mse" if "--loss" in cmd else "")] = time.perf_counter() - t0
    return seconds


def measure(work: Path) -> dict:
    """The MSE model of ``work`` on its synthetic test split and on the bundled real portraits (DARK decoder), with the
    library's own scoring: :func:`facemarks.serving.inference.predict_crops` and :func:`facemarks.evaluation.real_photos.portrait_scores`."""
    from facemarks.augmentation.crops import invert_points
    from facemarks.evaluation.real_photos import portrait_scores
    from facemarks.serving.inference import predict_crops
    from facemarks.evaluation.metrics import nme, normaliser
    from facemarks.training.model import load_model
    from facemarks.core.store import read_split

    params = yaml.safe_load((work / "params.yaml").read_text())
    size, margin, sigma = params["augment"]["size"], params["augment"]["margin"], params["encode"]["sigma"]
    model = load_model(work / "models/mse/model.pt")
    test = read_split(work / "data/augmented/test")
    points = predict_crops(model, np.asarray(test.images), "mse", sigma, "dark")[0]
    pred = invert_points(points, np.asarray(test.transform))
    gt = np.asarray(test.orig_points)
    syn = 100 * nme(pred, gt, normaliser(gt, "io"))
    real = portrait_scores(model, "mse", size=size, margin=margin, sigma=sigma, decoder="dark")
    realism = json.loads((work / "metrics/realism.json").read_text())
    train = json.loads((work / "metrics/train_mse.json").read_text())
    return {"synthetic_test_nme": float(np.mean(syn)), "synthetic_test_nme_median": float(np.median(syn)),
            "real": real, "dlib_realism_nme": realism.get("dlib_nme_mean"),
            "dlib_detector_hit_rate": realism.get("detector_hit_rate"), "val_nme": train.get("best_val_nme")}


def measure_data(work: Path) -> dict:
    realism = json.loads((work / "metrics/realism.json").read_text())
    return {"dlib_realism_nme": realism.get("dlib_nme_mean"), "dlib_detector_hit_rate": realism.get("detector_hit_rate")}


LEVERS = ROWS.parent / "levers"  # studies/photo_levers.py: real-photo rows per trained model (one per seed)
PHOTO_SETTING = "mapped|flip|dark"  # what evaluate reports by default: predict's box, flip TTA, the DARK decoder


def real_photo_cell(name: str, loss: str = "mse", setting: str = PHOTO_SETTING) -> str:
    """Median NME % on the real-photo set of the models of realism row ``name`` (levers rows of that group): mean ±
    sd over their training seeds, with the seed count; '—' when no model of the row was kept and re-scored."""
    vals = [r["losses"][loss][setting]["median"] for r in (json.loads(p.read_text()) for p in sorted(LEVERS.glob("*.json")))
            if r.get("group") == name and loss in r["losses"]]
    if not vals:
        return "— (model not kept)"
    spread = f" ± {np.std(vals, ddof=1):.2f}" if len(vals) > 1 else ""
    return f"{np.mean(vals):.2f}{spread} ({len(vals)} seed{'s' if len(vals) > 1 else ''})"


def table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"), key=lambda p: p.stat().st_mtime)]
    rows = [r for r in rows if "synthetic_test_nme" in r["measured"]]
    lines = ["| row | overrides | dlib NME on synthetic test % | dlib detects % | synthetic test NME % (MSE) | "
             "astronaut NME % | Grace Hopper NME % | real photos: median NME % (MSE, mean ± sd over seeds) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, real = r["measured"], r["measured"]["real"]
        lines.append(f"| {r['name']} | {' '.join(r['overrides']) or '(params.yaml)'} | {m['dlib_realism_nme']:.2f} | "
                     f"{100 * m['dlib_detector_hit_rate']:.1f} | {m['synthetic_test_nme']:.2f} | "
                     f"{real.get('astronaut', float('nan')):.2f} | {real.get('grace_hopper', float('nan')):.2f} | "
                     f"{real_photo_cell(r['name'])} |")
    lines += ["", "Real photos: the 100 photos of `../shared/real-photos` (dlib finds 210 faces; NME from dlib's "
              "points, in predict's mapped dlib box, DARK decoder, flip test-time augmentation as shipped), scored by `studies/photo_levers.py` "
              "on each kept model of the row, one training seed each (`reports/realism/levers/`, table: "
              "`reports/realism/levers.md`). Rows whose models were not kept would need retraining to be scored."]
    lines += ["", "Generator ablation (data only: one change left out of the shipped generator at a time; 300 test faces):",
              "", "| row | overrides | dlib NME on synthetic test % | dlib detects % |", "|---|---|---|---|"]
    for r in (json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"), key=lambda p: p.stat().st_mtime)):
        if "synthetic_test_nme" not in r["measured"]:
            m = r["measured"]
            lines.append(f"| {r['name']} | {' '.join(o for o in r['overrides'] if 'n_train=1' not in o) or '(params.yaml)'} "
                         f"| {m['dlib_realism_nme']:.2f} | {100 * m['dlib_detector_hit_rate']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value (YAML value)")
    ap.add_argument("--table", action="store_true", help="only rebuild reports/realism/table.md")
    ap.add_argument("--measure", type=Path, metavar="DIR",
                    help="measure a folder where these stages already ran (e.g. a `dvc repro` of the default)")
    ap.add_argument("--data-only", action="store_true",
                    help="only generate the faces (1 train image + the test set) and score dlib realism")
    ap.add_argument("--rev", help="run the stages of this git revision (e.g. the generator before a change); "
                                  "the measurement uses the current library")
    args = ap.parse_args()
    if not args.table:
        if not args.name:
            ap.error("a row name is required")
        if args.measure:
            row = {"name": args.name, "overrides": args.overrides, "measured": measure(args.measure.resolve()),
                   "faces_per_s": None, "measured_dir": args.measure.name}
            ROWS.mkdir(parents=True, exist_ok=True)
            (ROWS / f"{args.name}.json").write_text(json.dumps(row, indent=1, sort_keys=True) + "\n")
            print(table())
            return
        work = ROOT / ".studies" / "realism" / args.name
        code = ROOT
        if args.rev:
            code = ROOT / ".studies" / "realism" / f"code-{args.rev}"
            if not code.exists():
                code.mkdir(parents=True)
                archive = subprocess.run(["git", "archive", args.rev, "src", "stages", "params.yaml"], cwd=ROOT,
                                         check=True, capture_output=True).stdout
                subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        overrides = args.overrides + (["data.synthetic.n_train=1"] if args.data_only else [])
        doc = prepare(work, overrides, code)
        seconds = run_stages(work, code, args.data_only)
        measured = measure_data(work) if args.data_only else measure(work)
        syn = doc["data"]["synthetic"]
        row = {"name": args.name, "rev": args.rev, "overrides": args.overrides, "measured": measured,
               "stage_seconds": seconds,
               # download stage = generation + contact sheet + dlib realism check: a lower bound of the generation rate
               "faces_per_s": (syn["n_train"] + syn["n_test"]) / seconds["download"]}
        ROWS.mkdir(parents=True, exist_ok=True)
        (ROWS / f"{args.name}.json").write_text(json.dumps(row, indent=1, sort_keys=True) + "\n")
        print(json.dumps(row, indent=1))
    (ROWS.parent / "table.md").write_text(table())
    print(table())


if __name__ == "__main__":
    main()
