"""Real labelled faces: the losses, the box rule and what synthetic faces are worth, on held-out people.

The faces: a keypoints-CSV folder (``--faces``, e.g. ``../shared/real-faces``; never copied into the repository),
read by the ``local`` source with the person rule ``^(.+)_\\d+$`` and split by person with ``base.seed`` 0 and
``test_fraction`` 0.2 (:func:`facemarks.data.local.seeded_split`; the held-out people are listed in
``reports/real_faces/split.md``). Every model trains with the default recipe (``params.yaml``: 96 px, 2 + 1 epochs,
``train.*``) unless an arm says otherwise, validation split by person too, and is scored on

- ``heldout``: every frame of the held-out people against the human markup, the model given dlib's HOG detector box
  mapped as ``facemarks predict`` maps it (:func:`facemarks.evaluation.real_photos.photo_set`; a face dlib misses gets the box
  of its markup by the training-box rule), dark decoder, flip test on; dlib's own predictor in its own box is the
  reference row (faces dlib finds);
- ``photos``: ``--photos`` (``../shared/real-photos``), against dlib's 68 points;
- ``portraits``: the two bundled portraits, against dlib's 68 points.

Arms (``--arms``): ``loss`` (mse, bce, awing on all training people), ``box`` (mse with ``data.local.box: tight``
beside ``loss``'s mse with the training-box rule), ``worth`` (mse on 10 / 30 / 100 % of the training people: real
only, mixed with the 1,500 default synthetic faces, or trained on the synthetic faces first and fine-tuned on the
real ones with the same recipe), ``sched20`` (the write-up's 10 + 10 epochs at 64 px, the three losses).

Each trained model appends one row to ``reports/real_faces/rows.csv`` at once (and its per-face NMEs to
``reports/real_faces/faces/<row>.json``), so rows survive an interrupted session; a row already there is skipped.
``report`` writes ``table.md`` and ``worth.png`` from the rows alone.

    python studies/real_faces.py run --faces ../shared/real-faces --photos ../shared/real-photos \\
        --arms loss box worth --seeds 0 1
    python studies/real_faces.py report
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from facemarks.data import groups, sources

from facemarks.evaluation import stats

from facemarks.training import train
from facemarks.training.data import load_data
from facemarks.augmentation.augment import run_augment
from facemarks.heatmaps.codec import HeatmapCodec, write_heatmaps
from facemarks.core.io import ImageRecord, read_dlib_xml, write_dlib_xml
from facemarks.training.model import STRIDE
from facemarks.core.params import Data, Local, load_params
from facemarks.evaluation.peers import Dlib68
from facemarks.evaluation.real_photos import face_nme, photo_set, predict_faces
from facemarks.core.store import read_split

PERSON = r"^(.+)_\d+$"
OUT = Path("reports/real_faces")
FIELDS = ("row", "arm", "setting", "loss", "seed", "size", "epochs", "train_people", "train_faces", "heldout_median",
          "heldout_mean", "heldout_n", "heldout_dlib_box_n", "photos_median", "photos_n", "portraits_median",
          "val_nme", "collapse", "bf16", "train_seconds")
FRACTIONS = (0.1, 0.3, 1.0)
DECODER = "dark"
log = logging.getLogger("studies.real_faces")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One trained model: ``arm``, data (``box`` rule, ``fraction`` of the training people, ``mix``: ``real`` /
    ``mixed`` / ``pretrain``), ``loss``, ``size``, epochs, training ``seed``."""

    arm: str
    loss: str
    seed: int
    box: str = "training"
    fraction: float = 1.0
    mix: str = "real"
    size: int = 96
    epochs: tuple[int, int] = (2, 1)

    @property
    def data_name(self) -> str:
        return f"{self.box}-f{int(round(100 * self.fraction))}-{self.mix}-s{self.size}"

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.data_name}-e{self.epochs[0]}+{self.epochs[1]}-{self.loss}-seed{self.seed}"


def settings(arms: list[str], seeds: list[int]) -> list[Setting]:
    """The models of ``arms`` x ``seeds`` in run order (cheap and most-needed first)."""
    out: list[Setting] = []
    for seed in seeds:
        if "loss" in arms:
            out += [Setting("loss", loss, seed) for loss in ("mse", "bce", "awing")]
        if "box" in arms:
            out.append(Setting("box", "mse", seed, box="tight"))
        if "worth" in arms:
            out += [Setting("worth", "mse", seed, fraction=f, mix=m) for m in ("real", "mixed", "pretrain")
                    for f in FRACTIONS if not (m == "real" and f == 1.0)]
        if "sched20" in arms:
            out += [Setting("sched20", loss, seed, size=64, epochs=(10, 10)) for loss in ("mse", "bce", "awing")]
    return out


# ----------------------------------------------------------------------------------------------- data
def real_raw(work: Path, faces: Path, box: str) -> Path:
    """``download`` of the real faces (local source, person split) into ``work/raw-<box>`` (once)."""
    out = work / f"raw-{box}"
    if not (out / "train.xml").is_file():
        data = Data(source="local", local=Local(path=str(faces), test_fraction=0.2, group=PERSON, box=box))
        summary = sources.fetch(data, 0, out)
        log.info("real faces (%s box): %s", box, {k: summary[k] for k in ("n_train_faces", "n_test_faces", "groups")})
    return out


def synthetic_raw(work: Path) -> Path:
    out = work / "raw-synthetic"
    if not (out / "train.xml").is_file():
        sources.fetch(load_params().data, 0, out)  # params.yaml's data section: the default synthetic faces
    return out


def subset_raw(work: Path, real: Path, fraction: float, mix: str) -> Path:
    """A raw folder with ``fraction`` of the training people of ``real`` (seeded by person) — plus, for ``mixed``,
    the synthetic training faces — and ``real``'s test split; images by symlink, groups in ``groups.json``."""
    name = f"{real.name}-f{int(round(100 * fraction))}-{'mixed' if mix == 'mixed' else 'real'}"
    out = work / name
    if (out / "train.xml").is_file():
        return out
    table = groups.read_groups(real) or {}
    records = read_dlib_xml(real / "train.xml")
    people = sorted({table[r.file] for r in records})
    keep = set(np.random.default_rng(groups.split_seed(0, "worth")).permutation(people)[:max(1, round(fraction * len(people)))])
    chosen = [r for r in records if table[r.file] in keep]
    tmp = work / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "images").symlink_to((real / "images").resolve())
    group_map = {r.file: table[r.file] for r in chosen}
    if mix == "mixed":
        syn = synthetic_raw(work)
        (tmp / "synthetic").symlink_to(syn.resolve())
        syn_records = [ImageRecord(file=f"synthetic/{r.file}", faces=r.faces) for r in read_dlib_xml(syn / "train.xml")]
        chosen += syn_records
        group_map.update({r.file: r.file for r in syn_records})
    write_dlib_xml(tmp / "train.xml", chosen, name=f"real faces {name}")
    shutil.copyfile(real / "test.xml", tmp / "test.xml")
    groups.write_groups(tmp, PERSON, group_map)
    tmp.rename(out)
    return out


def prepared(work: Path, raw: Path, size: int) -> Path:
    """augment + encode of ``raw`` at ``size`` (default augment params otherwise) into ``work/prep/<raw>-<size>``."""
    out = work / "prep" / f"{raw.name}-{size}"
    if (out / "heatmaps" / "val.npy").is_file():
        return out
    params = load_params()
    cfg = dataclasses.replace(params.augment, size=size)
    summary = run_augment(raw, out / "augmented", cfg, params.base.seed)
    log.info("augment %s: %s, groups %s", out.name, summary["counts"], summary["groups"])
    splits = {name: read_split(out / "augmented" / name) for name in ("train", "val", "test")}
    write_heatmaps(splits, HeatmapCodec(size, size // STRIDE, params.encode.sigma), params.encode.dtype,
                   out / "heatmaps")
    return out


# ----------------------------------------------------------------------------------------------- training
def fit(work: Path, prep: Path, s: Setting, init: dict | None = None) -> train.FitResult:
    params = load_params()
    cfg = train.TrainConfig.from_params(params.train, params.base, params.encode)
    cfg = dataclasses.replace(cfg, seed=s.seed, epochs_phase1=s.epochs[0], epochs_phase2=s.epochs[1])
    data = load_data(prep / "augmented", prep / "heatmaps")
    ckpt = work / "checkpoints" / s.name
    return train.fit(cfg, data, s.loss, ckpt, "cpu", init=init)


def trained(work: Path, faces: Path, s: Setting) -> tuple[train.FitResult, dict]:
    """Train the model of ``s`` → (result, facts for its row)."""
    real = real_raw(work, faces, s.box)
    if s.mix == "pretrain":
        pre = Setting("pretrain", s.loss, s.seed, fraction=1.0, mix="synthetic", size=s.size, epochs=s.epochs)
        syn = fit(work, prepared(work, synthetic_raw(work), s.size), pre)  # one per seed, resumed by the others
        init = {k: v.detach().clone() for k, v in syn.model.state_dict().items()}
    else:
        init = None
    raw = real if s.fraction == 1.0 and s.mix != "mixed" else subset_raw(work, real, s.fraction, s.mix)
    prep = prepared(work, raw, s.size)
    t0 = time.perf_counter()
    result = fit(work, prep, s, init=init)
    table = groups.read_groups(raw) or {}
    real_train = [r for r in read_dlib_xml(raw / "train.xml") if not r.file.startswith("synthetic/")]
    return result, {"train_people": len({table.get(r.file, r.file) for r in real_train}),
                    "train_faces": len(real_train), "train_seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------------- scoring
def heldout_folder(work: Path, faces: Path) -> Path:
    """The held-out people's frames with their human markup as dlib XML (``work/heldout``; read by photo_set)."""
    out = work / "heldout"
    if (out / "markup.xml").is_file():
        return out
    raw = real_raw(work, faces, "training")
    tmp = work / "heldout.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = []
    for rec in read_dlib_xml(raw / "test.xml"):
        name = Path(rec.file).name
        os.symlink((raw / rec.file).resolve(), tmp / name)
        records.append(ImageRecord(file=name, faces=rec.faces))
    write_dlib_xml(tmp / "markup.xml", records, name="held-out people, human markup")
    tmp.rename(out)
    return out


class Scorer:
    """The three face sets, built once (dlib's detections cached by image hash under ``work/dlib-cache``)."""

    def __init__(self, work: Path, faces: Path, photos: Path | None):
        cache = work / "dlib-cache"
        self.sets = {"heldout": photo_set(heldout_folder(work, faces), cache=cache),
                     "portraits": photo_set(None, cache=cache)}
        if photos is not None:
            self.sets["photos"] = photo_set(photos, cache=cache)
        params = load_params()
        self.margin, self.sigma = params.augment.margin, params.encode.sigma

    def score(self, model: torch.nn.Module, loss: str, size: int) -> dict[str, np.ndarray]:
        model.eval()
        return {name: face_nme(predict_faces(model, loss, ps, size=size, margin=self.margin, sigma=self.sigma,
                                             decoder=DECODER, flip=True), ps.faces)
                for name, ps in self.sets.items()}

    def dlib_reference(self) -> np.ndarray:
        """dlib's 68 points in its own detector box on the held-out faces it finds (NaN where it missed)."""
        dlib, ps = Dlib68(), self.sets["heldout"]
        pts = np.full((len(ps.faces), 68, 2), np.nan)
        for i, f in enumerate(ps.faces):
            if f.detector_box is not None:
                pts[i] = dlib.predict(ps.images[f.file], f.detector_box)
        return face_nme(pts, ps.faces)


# ----------------------------------------------------------------------------------------------- rows
def done_rows(out: Path) -> dict[str, dict]:
    path = out / "rows.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {r["row"]: r for r in csv.DictReader(fh)}


def append_row(out: Path, row: dict, per_face: dict[str, np.ndarray]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "faces").mkdir(exist_ok=True)
    (out / "faces" / f"{row['row']}.json").write_text(json.dumps(
        {k: [None if not math.isfinite(x) else round(float(x), 4) for x in v] for k, v in per_face.items()}) + "\n")
    path = out / "rows.csv"
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def median(v: np.ndarray) -> float:
    v = np.asarray(v, float)
    return round(float(np.nanmedian(v)), 3) if np.isfinite(v).any() else float("nan")


def run(args: argparse.Namespace) -> None:
    work, out = Path(args.work), Path(args.out)
    faces = Path(args.faces).resolve()
    photos = Path(args.photos).resolve() if args.photos else None
    scorer = Scorer(work, faces, photos)
    have = done_rows(out)
    if "dlib-reference" not in have:
        ref = scorer.dlib_reference()
        ps = scorer.sets["heldout"]
        append_row(out, {"row": "dlib-reference", "arm": "reference", "setting": "dlib 68-point predictor, own box",
                         "loss": "dlib", "heldout_median": median(ref), "heldout_mean": round(float(np.nanmean(ref)), 3),
                         "heldout_n": int(np.isfinite(ref).sum()),
                         "heldout_dlib_box_n": sum(f.detector_box is not None for f in ps.faces)},
                   {"heldout": ref})
        write_split_note(work, faces, out, ps)
    for s in settings(args.arms, args.seeds):
        if s.name in have:
            continue
        log.info("training %s", s.name)
        result, facts = trained(work, faces, s)
        nme = scorer.score(result.model, s.loss, s.size)
        hs = scorer.sets["heldout"]
        row = {"row": s.name, "arm": s.arm, "setting": s.data_name, "loss": s.loss, "seed": s.seed, "size": s.size,
               "epochs": f"{s.epochs[0]}+{s.epochs[1]}", **facts,
               "heldout_median": median(nme["heldout"]), "heldout_mean": round(float(np.nanmean(nme["heldout"])), 3),
               "heldout_n": len(nme["heldout"]), "heldout_dlib_box_n": sum(f.box_source == "dlib" for f in hs.faces),
               "photos_median": median(nme["photos"]) if "photos" in nme else "", "photos_n": len(nme.get("photos", [])),
               "portraits_median": median(nme["portraits"]), "val_nme": round(result.summary["final_val_nme"], 3),
               "collapse": result.summary["collapse"], "bf16": result.summary.get("bf16_autocast", False)}
        append_row(out, row, nme)
        log.info("row %s: held-out %.2f %%, photos %s %%", s.name, row["heldout_median"], row["photos_median"])
        print(json.dumps(row), flush=True)


def write_split_note(work: Path, faces: Path, out: Path, heldout) -> None:
    raw = real_raw(work, faces, "training")
    table = groups.read_groups(raw) or {}
    test_people = sorted({table[r.file] for r in read_dlib_xml(raw / "test.xml")})
    train_people = sorted({table[r.file] for r in read_dlib_xml(raw / "train.xml")})
    lines = ["# The person split of the real-faces study", "",
             f"`local` source, `data.local.group: '{PERSON}'`, `test_fraction: 0.2`, `base.seed: 0` "
             "(`facemarks.data.local.seeded_split`): "
             f"{len(train_people)} training people, {len(test_people)} held-out people "
             f"({sum(1 for _ in read_dlib_xml(raw / 'test.xml'))} frames; dlib's HOG detector finds "
             f"{sum(f.detector_box is not None for f in heldout.faces)} of them). Held-out people:", "",
             ", ".join(test_people), ""]
    (out / "split.md").write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- report
def per_face(out: Path, row: str, key: str) -> np.ndarray:
    data = json.loads((out / "faces" / f"{row}.json").read_text())
    return np.array([np.nan if v is None else v for v in data[key]], float)


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = list(done_rows(out).values())
    by = collections.defaultdict(dict)
    for r in rows:
        if r["arm"] != "reference":
            by[(r["arm"], r["setting"], r["epochs"], r["loss"])][int(r["seed"])] = r
    lines = ["# Real labelled faces: results", "",
             "Written by `studies/real_faces.py report` from `rows.csv` (one row per trained model; per-face NMEs in "
             "`faces/`). NME: inter-ocular, %, median over faces. `held-out`: the held-out people against their human "
             "markup, each model given dlib's mapped detector box (`split.md`); `photos`: the 100 real photos against "
             "dlib's points; `portraits`: the two bundled portraits against dlib's points.", ""]
    ref = [r for r in rows if r["arm"] == "reference"]
    if ref:
        lines += [f"dlib's 68-point predictor in its own box on the held-out faces it finds: median "
                  f"{float(ref[0]['heldout_median']):.2f} % (n = {ref[0]['heldout_n']}).", ""]
    lines += ["| arm | data | epochs | loss | seeds | held-out | photos | portraits | val NME |", "|---|---|---|---|---|---|---|---|---|"]
    for (arm, setting, epochs, loss), seeds in sorted(by.items()):
        def mean_of(key):
            vals = [float(r[key]) for r in seeds.values() if r[key] not in ("", "nan")]
            return f"{np.mean(vals):.2f}" + (f" ({', '.join(f'{v:.2f}' for v in vals)})" if len(vals) > 1 else "") if vals else "—"
        lines.append(f"| {arm} | {setting} | {epochs} | {loss} | {len(seeds)} | {mean_of('heldout_median')} | "
                     f"{mean_of('photos_median')} | {mean_of('portraits_median')} | {mean_of('val_nme')} |")
    lines += ["", "Per seed: median of that model; the table shows the mean over seeds and each seed in brackets.", ""]
    lines += comparisons(out, by)
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    worth_figure(out, by)
    print("\n".join(lines))


def comparisons(out: Path, by: dict) -> list[str]:
    """Paired differences: per face (bootstrap over faces, seed 0's models) and over seeds (t interval of the
    per-seed median differences)."""
    pairs = []
    loss_rows = {k[3]: v for k, v in by.items() if k[0] == "loss"}
    sched_rows = {k[3]: v for k, v in by.items() if k[0] == "sched20"}
    for arm_rows, budget in ((loss_rows, "default budget: 96 px, 2 + 1 epochs"), (sched_rows, "64 px, 10 + 10 epochs")):
        for a, b in (("bce", "mse"), ("awing", "mse"), ("awing", "bce")):
            if a in arm_rows and b in arm_rows:
                pairs.append((f"{a} − {b} ({budget})", arm_rows[a], arm_rows[b]))
    for loss in sorted(set(sched_rows) & set(loss_rows)):
        pairs.append((f"{loss}: 10 + 10 epochs at 64 px − 2 + 1 at 96 px", sched_rows[loss], loss_rows[loss]))
    box = {k: v for k, v in by.items() if k[0] == "box"}
    if box and "mse" in loss_rows:
        pairs.append(("tight box − training box (mse)", next(iter(box.values())), loss_rows["mse"]))
    lines = ["## Paired differences (NME points; negative: the first is better)", "",
             "| comparison | set | per face, seed 0 [95 % CI] | over seeds: mean of per-seed median Δ [95 % t CI] |",
             "|---|---|---|---|"]
    for title, ra, rb in pairs:
        seeds = sorted(set(ra) & set(rb))
        for key in ("heldout", "photos"):
            try:
                fa = [per_face(out, ra[s]["row"], key) for s in seeds]
                fb = [per_face(out, rb[s]["row"], key) for s in seeds]
            except (KeyError, FileNotFoundError):
                continue
            c = stats.paired_comparison(fa[0], fb[0], names=("a", "b"))
            d = np.array([np.nanmedian(x) - np.nanmedian(y) for x, y in zip(fa, fb)])
            over = stats.seed_interval(d) if len(d) >= 2 else None
            over_txt = (f"{over['mean']:+.2f} [{over['ci_low']:+.2f}, {over['ci_high']:+.2f}] (n = {len(d)})"
                        if over else f"{d[0]:+.2f} (one seed)")
            lines.append(f"| {title} | {key} | {c.mean_delta:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}] | {over_txt} |")
    return lines + [""]


def worth_figure(out: Path, by: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    full = {k[1]: v for k, v in by.items() if k[0] == "loss" and k[3] == "mse"}
    for mix, colour in (("real", "tab:blue"), ("mixed", "tab:orange"), ("pretrain", "tab:green")):
        xs, ys = [], []
        for f in FRACTIONS:
            setting = f"training-f{int(round(100 * f))}-{mix}-s96"
            seeds = by.get(("worth", setting, "2+1", "mse")) or (full.get("training-f100-real-s96") if mix == "real" and f == 1.0 else None)
            if seeds:
                xs.append(100 * f)
                ys.append(np.mean([float(r["heldout_median"]) for r in seeds.values()]))
        if xs:
            ax.plot(xs, ys, "o-", color=colour, label=mix)
    ax.set_xscale("log")
    ax.set_xticks([10, 30, 100], ["10 %", "30 %", "100 %"])
    ax.set_xlabel("share of the training people")
    ax.set_ylabel("held-out people: median NME %")
    ax.set_title("What synthetic faces are worth beside real ones (mse, mean of seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "worth.png")
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--faces", required=True, help="keypoints-CSV folder (e.g. ../shared/real-faces)")
    r.add_argument("--photos", default="", help="real photos scored against dlib's points (e.g. ../shared/real-photos)")
    r.add_argument("--arms", nargs="+", default=["loss", "box", "worth"], choices=("loss", "box", "worth", "sched20"))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    r.add_argument("--work", default=".studies/real_faces")
    r.add_argument("--out", default=str(OUT))
    p = sub.add_parser("report")
    p.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0)))))
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
