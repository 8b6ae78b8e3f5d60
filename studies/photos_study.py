"""Photos study (issue 25): what N teacher-labelled photos of one's own add to the synthetic default.

Data: ``../shared/real-photos`` (validation-only photos, never copied into the repository: the work folders link to
them). Fixed split by file name: the files sorted by name, ``contact.png`` (a contact sheet) left out; every third
file (sorted index ``i % 3 == 2``) is the **validation part**, the others the **training part**. The training part is
put in one fixed order (``numpy.random.default_rng(25).permutation``) and the first N of that order are the N
training photos, so 20 ⊂ 40 ⊂ all.

Settings: N = 0 (``data.source: synthetic``, the default) and N = 20, 40, all (``data.source: photos``,
``data.photos.test_fraction: 0`` so every one of the N photos is training, ``data.photos.synthetic: 1500``,
``repeat: 4``), each with training seeds 0 and 1 (``train.seed``), the MSE loss only, at ``params.yaml``'s budget
(96 px, 2 + 1 epochs). Each setting runs the real stage scripts (download → augment → encode → train@mse) in a work
folder of its own, ``.studies/photos/n<N>/`` (gitignored); the teacher's cache (``.studies/photos/teacher-cache``)
is shared, so dlib labels each photo once.

Measured per row (model of one setting and seed, decoder DARK):

- ``val``: NME (%, inter-ocular of dlib's points) on every face dlib's HOG detector finds (upsample 1) in the
  validation part, the model given **dlib's own detector box** (as :mod:`facemarks.evaluation.real_photos` does for the bundled
  portraits) — ``val_nme_median`` / ``val_nme_mean``; ``val_mapped_*``: the same faces given the mapped box that
  ``predict`` feeds the model (:func:`facemarks.serving.detect.map_box`);
- ``portraits``: NME from dlib's points on the two bundled portraits (astronaut, Grace Hopper), dlib's box;
- ``synthetic_test``: the synthetic test split (300 faces, true boxes), NME median.

Budgets: ``default`` (params.yaml) and ``mini`` (64 px, 500 synthetic faces, 1 augmented copy: :data:`BUDGETS`),
for a machine too loaded for the default.

Usage (repo root)::

    nohup python studies/photos_study.py run > .studies/photos/log.txt 2>&1 &   # all default rows not yet written
    python studies/photos_study.py run --budget mini --n 0 20 --seeds 0         # some rows of the mini budget
    python studies/photos_study.py report                                     # table + figure from the rows

Rows: ``reports/photos/rows/[mini_]n<N>_s<seed>.json``; report: ``reports/photos/README.md`` (table) and
``reports/photos/curve.png``.
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
PHOTOS = ROOT.parent / "shared" / "real-photos"
WORK = ROOT / ".studies" / "photos"
CACHE = WORK / "teacher-cache"
REPORT = ROOT / "reports" / "photos"
ROWS = REPORT / "rows"
SKIP = ("contact.png",)
ORDER_SEED = 25
N_SETTINGS = (0, 67, 20, 40)   # run order: the two ends of the curve first
SEEDS = (0, 1)
DECODER = "dark"
#: budgets: ``default`` is params.yaml as shipped; ``mini`` is what a machine loaded far beyond its cores can finish
#: (measured: one default MSE training took an estimated 40-55 min at load average 13-17 on the 2 shared cores)
BUDGETS = {
    "default": {},
    "mini": {"augment.size": 64, "augment.copies": 1, "data.synthetic.n_train": 500, "data.synthetic.n_test": 100,
             "data.photos.synthetic": 500},
}


def split_files(folder: Path = PHOTOS) -> tuple[list[Path], list[Path]]:
    """``(training part in its fixed order, validation part by name)``."""
    from facemarks.core.io import list_images

    files = [p for p in list_images(folder) if p.name not in SKIP]
    val = [p for i, p in enumerate(files) if i % 3 == 2]
    train = [p for i, p in enumerate(files) if i % 3 != 2]
    order = np.random.default_rng(ORDER_SEED).permutation(len(train))
    return [train[i] for i in order], val


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for p in parents:
        node = node[p]
    node[last] = value


def row_name(budget: str, n: int, seed: int) -> str:
    return f"n{n}_s{seed}" if budget == "default" else f"{budget}_n{n}_s{seed}"


def prepare(n: int, train_part: list[Path], budget: str = "default") -> Path:
    work = WORK / (f"n{n}" if budget == "default" else f"{budget}-n{n}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(CODE / "_stages", work / "stages")
    doc = yaml.safe_load((CODE / "_params.yaml").read_text())
    _set(doc, "base.study", "photos")
    for key, value in BUDGETS[budget].items():
        _set(doc, key, value)
    if n:
        folder = work / "photos"
        folder.mkdir()
        for p in train_part[:n]:
            (folder / p.name).symlink_to(p)
        for key, value in (("data.source", "photos"), ("data.photos.path", str(folder)),
                           ("data.photos.test_fraction", 0.0), ("data.photos.cache_dir", str(CACHE))):
            _set(doc, key, value)
    (work / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return work


CODE = WORK / "src"  # a snapshot of the library taken when the run starts: every row runs the same code


def snapshot(tag: str) -> None:
    global CODE
    CODE = WORK / f"src-{tag}"  # one per invocation: two runs (different settings) can go side by side
    if CODE.exists():
        shutil.rmtree(CODE)
    shutil.copytree(ROOT / "src", CODE, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # params.yaml and the stage scripts of the same moment: a key added to the live params.yaml later is unknown to
    # the snapshot's params.py
    shutil.copytree(ROOT / "stages", CODE / "_stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(ROOT / "params.yaml", CODE / "_params.yaml")
    sys.path.insert(0, str(CODE))


def _env(work: Path) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", PYTHONPATH=str(CODE))


def run(cmd: list[str], work: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=work, env=_env(work), check=True)
    return time.perf_counter() - t0


def measure(work: Path, val: list[Path]) -> dict:
    """The MSE model of ``work`` on the validation photos, the bundled portraits and the synthetic test split."""
    from facemarks.augmentation.crops import invert_points
    from facemarks.serving.detect import map_box
    from facemarks.evaluation.real_photos import portrait_scores
    from facemarks.serving.inference import predict_crops
    from facemarks.core.io import read_image
    from facemarks.evaluation.metrics import nme, normaliser
    from facemarks.training.model import load_model
    from facemarks.serving.predict import predict_boxes
    from facemarks.core.store import read_split
    from facemarks.data.teacher import Teacher

    params = yaml.safe_load((work / "params.yaml").read_text())
    size, margin, sigma = params["augment"]["size"], params["augment"]["margin"], params["encode"]["sigma"]
    model = load_model(work / "models/mse/model.pt")
    teacher = Teacher(CACHE, 1)
    errs, errs_mapped, files = [], [], []
    for path in val:
        labels = teacher.label(path)
        if not labels.faces:
            continue
        image = read_image(path)
        raw = [f.detector_box for f in labels.faces]
        mapped = [map_box(f.detector_box, "dlib", f.component) for f in labels.faces]
        gt = np.stack([f.points for f in labels.faces])  # (F, 68, 2)
        for boxes, out in ((raw, errs), (mapped, errs_mapped)):
            pred = predict_boxes(model, image, boxes, "mse", size=size, margin=margin, sigma=sigma,
                                 decoder=DECODER)[0]
            out.extend((100 * nme(pred, gt, normaliser(gt, "io"))).tolist())
        files += [path.name] * len(gt)
    test = read_split(work / "data/augmented/test")
    points = predict_crops(model, np.asarray(test.images), "mse", sigma, DECODER)[0]
    pred = invert_points(points, np.asarray(test.transform))
    gt = np.asarray(test.orig_points)
    syn = 100 * nme(pred, gt, normaliser(gt, "io"))
    portraits = portrait_scores(model, "mse", size=size, margin=margin, sigma=sigma, decoder=DECODER)
    return {"val_n_photos": len(set(files)), "val_n_faces": len(errs),
            "val_nme_median": float(np.median(errs)), "val_nme_mean": float(np.mean(errs)),
            "val_mapped_nme_median": float(np.median(errs_mapped)), "val_mapped_nme_mean": float(np.mean(errs_mapped)),
            "val_nme_per_face": [round(e, 4) for e in errs], "val_files": files,
            "portraits": portraits, "synthetic_test_nme_median": float(np.median(syn))}


def run_all(settings: tuple[int, ...], seeds: tuple[int, ...], budget: str = "default") -> None:
    if not PHOTOS.is_dir():
        sys.exit(f"photos study: {PHOTOS} is absent")
    snapshot(budget + "-" + "-".join(map(str, settings)))
    train_part, val = split_files()
    ROWS.mkdir(parents=True, exist_ok=True)
    for n in settings:
        n = min(n, len(train_part))
        todo = [s for s in seeds if not (ROWS / f"{row_name(budget, n, s)}.json").is_file()]
        if not todo:
            continue
        work = prepare(n, train_part, budget)
        seconds = {s: run(["stages/" + s + ".py"], work) for s in ("download", "augment", "encode")}
        download = json.loads((work / "metrics/download.json").read_text())
        for seed in todo:
            doc = yaml.safe_load((work / "params.yaml").read_text())
            doc["train"]["seed"] = seed
            (work / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            secs = run(["stages/train.py", "--loss", "mse"], work)
            train = json.loads((work / "metrics/train_mse.json").read_text())
            row = {"name": row_name(budget, n, seed), "budget_name": budget, "overrides": BUDGETS[budget],
                   "n_photos": n, "train_seed": seed,
                   "train_photos": sorted(p.name for p in train_part[:n]),
                   "teacher": download.get("teacher"), "n_train_faces": download["n_train_faces"],
                   "measured": measure(work, val), "val_nme_during_training": train.get("final_val_nme"),
                   "seconds": {**seconds, "train@mse": secs},
                   "load_average_1min": os.getloadavg()[0],
                   "budget": {k: doc["train"][k] for k in ("epochs_phase1", "epochs_phase2")} | {"size": doc["augment"]["size"]}}
            (ROWS / f"{row['name']}.json").write_text(json.dumps(row, indent=1, sort_keys=True) + "\n")
            print(f"row {row['name']}: val median {row['measured']['val_nme_median']:.2f} %", flush=True)
            report()


BUDGET_WORDS = {
    "default": "params.yaml as shipped: 96 px, 2 + 1 epochs, 1,500 synthetic training faces, 2 augmented copies, "
               "300 synthetic test faces",
    "mini": "64 px, 2 + 1 epochs, 500 synthetic training faces, 1 augmented copy, 100 synthetic test faces "
            "(overrides: " + ", ".join(f"`{k}={v}`" for k, v in BUDGETS["mini"].items()) + ")",
}


def _by_budget(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    out: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(r.get("budget_name", "default"), {}).setdefault(r["n_photos"], []).append(r)
    return out


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]
    if not rows:
        return
    budgets = _by_budget(rows)
    lines = ["# Photos study (issue 25): synthetic faces + N teacher-labelled photos", "",
             "Generated by `python studies/photos_study.py report` from `rows/*.json` (one row per budget, setting and "
             "training seed); script: `studies/photos_study.py`.", "",
             "Split of `../shared/real-photos` (fixed, by file name): files sorted by name, `contact.png` left out; every "
             "third file (sorted index i % 3 == 2) is the validation part (33 files), the rest the training part (67 "
             f"files); the first N of the training part in the order `numpy.random.default_rng({ORDER_SEED}).permutation` "
             "are the N training photos (20 ⊂ 40 ⊂ all 67). N = 0 is `data.source: synthetic`; N > 0 is "
             "`data.source: photos` (`test_fraction: 0`, `repeat: 4`) with the same synthetic training faces. MSE loss, "
             "DARK decoder.", "",
             "Scores: NME (%, inter-ocular, **from dlib's points**: the reference is the teacher itself) — *validation*: "
             "every face dlib's HOG detector finds in the validation photos, the model given dlib's detector box (and, "
             "*mapped*, the box `predict` gives it); *portraits*: the two bundled portraits (astronaut, Grace Hopper; "
             "neither is in `../shared`) in dlib's box; *synthetic test*: the synthetic test faces (true boxes). dlib is "
             "itself about 3-4 % from human markup on such portraits: values near that are the teacher's limit, not the "
             "truth."]
    for budget, by_n in sorted(budgets.items()):
        lines += ["", f"## Budget `{budget}`: {BUDGET_WORDS.get(budget, budget)}", "",
                  "| N photos | train seed | train faces (listings) | val faces | val median % | val mean % | "
                  "val median, mapped box % | astronaut % | Grace Hopper % | synthetic test median % | train s | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in sorted(by_n):
            for r in sorted(by_n[n], key=lambda r: r["train_seed"]):
                m = r["measured"]
                lines.append(f"| {n} | {r['train_seed']} | {r['n_train_faces']} | {m['val_n_faces']} | "
                             f"{m['val_nme_median']:.2f} | {m['val_nme_mean']:.2f} | {m['val_mapped_nme_median']:.2f} | "
                             f"{m['portraits'].get('astronaut', float('nan')):.2f} | "
                             f"{m['portraits'].get('grace_hopper', float('nan')):.2f} | "
                             f"{m['synthetic_test_nme_median']:.2f} | {r['seconds']['train@mse']:.0f} | "
                             f"{r.get('load_average_1min', float('nan')):.1f} |")
        lines += ["", "Mean over the training seeds run:", "", "| N photos | seeds | val median % | "
                  "val median, mapped box % | portraits mean % | synthetic test median % |", "|---|---|---|---|---|---|"]
        for n in sorted(by_n):
            ms = [r["measured"] for r in by_n[n]]
            mean = lambda k: float(np.mean([m[k] for m in ms]))  # noqa: E731
            portraits = float(np.mean([m["portraits"].get("mean", np.nan) for m in ms]))
            lines.append(f"| {n} | {len(ms)} | {mean('val_nme_median'):.2f} | {mean('val_mapped_nme_median'):.2f} | "
                         f"{portraits:.2f} | {mean('synthetic_test_nme_median'):.2f} |")
        lines += gain_lines(by_n)
    lines += ["", "Machine: 2 CPU cores shared with several other trainings (the `load` column: 1-min load average when "
              "the row finished); train seconds are no speed benchmark. Figure: `curve.png`."]
    REPORT.mkdir(parents=True, exist_ok=True)
    (REPORT / "README.md").write_text("\n".join(lines) + "\n")
    _figure(budgets)


def gain_lines(by_n: dict[int, list[dict]]) -> list[str]:
    """What N photos gain over N = 0 (the synthetic default) on the validation faces, three ways: the per-seed
    difference of the medians (mean over seeds, Student t interval over seeds: :func:`facemarks.evaluation.stats.seed_interval`),
    the per-face paired difference (each face's NME averaged over the seeds of a setting, percentile bootstrap over
    faces: :func:`facemarks.evaluation.stats.paired_comparison`; faces of one photo are not independent, so this interval is the
    optimistic one), and the least-squares slope of the per-seed medians against N (NME points per 10 photos)."""
    from facemarks.evaluation.stats import paired_comparison, seed_interval

    base = by_n.get(0)
    if not base or len(by_n) < 2:
        return []

    def per_face(rows: list[dict]) -> np.ndarray:  # (F,) mean over seeds of each validation face's NME
        return np.mean([r["measured"]["val_nme_per_face"] for r in rows], axis=0)

    files = base[0]["measured"]["val_files"]
    by_seed0 = {r["train_seed"]: r["measured"]["val_nme_median"] for r in base}
    lines = ["", "What the photos gain over N = 0 on the validation faces (negative: lower error with the photos):", "",
             "| N photos | seeds paired | Δ median, per seed (mean [95 % CI over seeds]) | Δ per face (mean NME, "
             "[95 % bootstrap CI over faces]) |", "|---|---|---|---|"]
    for n in sorted(k for k in by_n if k):
        rows = by_n[n]
        if any(r["measured"]["val_files"] != files for r in rows + base):
            lines.append(f"| {n} | – | other validation faces than N = 0: not paired | – |")
            continue
        seeds = sorted(set(by_seed0) & {r["train_seed"] for r in rows})
        d = seed_interval([next(r for r in rows if r["train_seed"] == s)["measured"]["val_nme_median"] - by_seed0[s]
                           for s in seeds])
        ci = "" if not np.isfinite(d["ci_low"]) else f" [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
        c = paired_comparison(per_face(rows), per_face(base), names=(f"n{n}", "n0"))
        lines.append(f"| {n} | {len(seeds)} | {d['mean']:+.2f}{ci} | {c.mean_delta:+.2f} [{c.ci_low:+.2f}, "
                     f"{c.ci_high:+.2f}] (n = {c.n} faces) |")
    ns = np.array([n for n in by_n for _ in by_n[n]], float)
    medians = np.array([r["measured"]["val_nme_median"] for n in by_n for r in by_n[n]])
    slope = float(np.polyfit(ns, medians, 1)[0])
    lines += ["", f"Least-squares slope of the validation median over N = {', '.join(map(str, sorted(by_n)))} "
              f"(every seed a point): **{10 * slope:+.2f} NME points per 10 photos** added."]
    return lines


def _figure(budgets: dict[str, dict[int, list[dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), dpi=100, squeeze=False)
    for ax, (budget, by_n) in zip(axes[0], sorted(budgets.items())):
        ns = sorted(by_n)
        for key, label, marker, colour in (("val_nme_median", "validation photos (dlib's box)", "o", "C0"),
                                           ("val_mapped_nme_median", "validation photos (mapped box)", "s", "C1")):
            for n in ns:
                ax.scatter([n] * len(by_n[n]), [r["measured"][key] for r in by_n[n]], marker=marker, alpha=0.4,
                           color=colour)
            ax.plot(ns, [np.mean([r["measured"][key] for r in by_n[n]]) for n in ns], marker=marker, label=label,
                    color=colour)
        ax.plot(ns, [np.mean([r["measured"]["portraits"].get("mean", np.nan) for r in by_n[n]]) for n in ns],
                marker="^", label="bundled portraits (mean of 2)", color="C2")
        ax.axhline(4.0, color="grey", lw=0.8, ls="--", label="goal: 4 %")
        ax.set_xlabel("teacher-labelled training photos added")
        ax.set_ylabel("median NME from dlib's points (%)")
        ax.set_title(f"MSE, budget {budget!r}; dots: training seeds", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(REPORT / "curve.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--n", type=int, nargs="*", default=list(N_SETTINGS), help="settings (photos added)")
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--budget", choices=tuple(BUDGETS), default="default")
    args = ap.parse_args()
    if args.what == "run":
        run_all(tuple(args.n), tuple(args.seeds), args.budget)
    report()


if __name__ == "__main__":
    main()
