"""How the face-detector settings do on a folder of real photos (no markup): faces found, faces the other settings
find that a setting misses, likely false positives, and the time per photo.

    photo_report(folder, model=None, ..., half=None) -> (report, timing)
    marked_face_report(folder) -> {settings: {found, found_min_side}, ...}   (a folder of marked faces)

``report`` (quality only; the ``photos`` block of ``metrics/detect.json``) and ``timing`` (ms per photo; for
``timings/`` or a benchmark's ``metrics/bench_*.json``, never a DVC metrics file).

There is no markup, so the reference is the **union**: every detection of every stage (:data:`facemarks.serving.detect.STAGES`)
merged into one face per place (:func:`facemarks.serving.detect.merge`, IoU ≥ :data:`facemarks.serving.detect.MERGE_IOU`). A setting
*finds* a union face when one of its faces has IoU ≥ ``MERGE_IOU`` with it. Per setting (``hog``, ``hog-rotate``,
``cnn``, ``auto`` = the cascade, the default of ``facemarks predict``):

* ``faces``: faces it reports; ``faces_60px``: those with a mapped box side ≥ ``min_side`` (60 px);
* ``missed``: union faces that another setting finds and this one does not (``missed_60px``: of side ≥ 60 px);
* ``recall_60px``: share of the union's faces of side ≥ 60 px it finds; ``recall_plausible_60px`` (and
  ``missed_plausible_60px``): the same over those that are not likely false positives (below) — the goal:
  ≥ :data:`GOAL_RECALL` for ``auto``; ``slow_only_plausible_60px``: such faces that only the slow settings
  (``hog-rotate``, ``cnn``) find, neither ``hog`` nor ``auto``;
* ``likely_fp``: its faces that are *likely false positives*: a union face found by only one detector family —
  dlib's HOG (on the image or a turned copy) *or* its CNN, not both — with a weak score (HOG margin below
  :data:`HOG_WEAK`, CNN confidence below :data:`CNN_WEAK`) and, when a landmark ``model`` is given, with
  a landmark confidence (mean per-point confidence of that model in the face's box) below ``low_confidence``: the
  5th percentile of the landmark confidence of the faces both families agree on (without a model: family agreement
  alone, and the report says so).

Timing: each stage is run once per photo and timed; a setting's time is the sum of the stages it runs on that photo
(:func:`facemarks.serving.detect.stages_for`: ``auto`` runs ``turned`` only where the CNN and HOG disagree), so the
settings are timed on the same work as :func:`facemarks.serving.detect.detect` does (wall-clock, and the process's CPU time,
which the load of other processes inflates less; median and 90th percentile). HOG runs once down to the candidates'
margin for every setting (the threshold changes what dlib reports, not the windows it scores). Reading the image is
not timed.

Halves (:func:`photo_halves`): the folder's photos sorted by file name alternate between a *tuning* half (1st, 3rd,
…), on which the cascade's thresholds were chosen, and a *reporting* half; ``half=`` scores one of them.
``contact.png`` (a contact sheet of the other photos) and any file whose stem starts with ``contact`` are skipped.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from facemarks.serving import detect as D
from facemarks.core.io import box_iou, read_image
from facemarks.core.io import photo_files as list_photos
from facemarks.serving.predict import predict_many
from facemarks.core.landmarks import face_box

SETTINGS = ("hog", "hog-rotate", "cnn", "auto")
MIN_SIDE = 60.0  # px: the faces the goal counts
FP_PERCENTILE = 5.0  # low landmark confidence: below this percentile of the faces both detector families agree on
HOG_WEAK = D.SURE_SCORES["hog"]  # a HOG-only face (image or turned copy) with a margin below this is weak ...
CNN_WEAK = D.SURE_SCORES["cnn"]  # ... and a CNN-only face below this confidence
FAST_SETTINGS = ("hog", "auto")  # the others (hog-rotate, cnn) are the slow ones
GOAL_RECALL = 0.99  # auto's share of the plausible union faces >= MIN_SIDE (the goal)
HALVES = ("tuning", "reporting")


def photo_files(folder: str | Path, pattern: str = "") -> tuple[list[Path], list[str]]:
    """The photos of ``folder`` narrowed by ``pattern`` (the project's one photo lister,
    :func:`facemarks.core.io.photo_files`, as ``evaluate.photos_glob`` narrows the real-photo score) and the names
    skipped (contact sheets)."""
    files = list_photos(folder, pattern)
    skipped = [p.name for p in files if p.stem.lower().startswith("contact")]
    return [p for p in files if p.name not in skipped], skipped


def _found(faces: list[D.Detection], union: list[D.Detection]) -> np.ndarray:
    """Per union face: does one of ``faces`` overlap it by IoU ≥ MERGE_IOU."""
    return np.array([any(D.same_face(u.box, f.box) for f in faces) for u in union], bool)


def photo_halves(names: list[str]) -> dict[str, str]:
    """The fixed split of a photo folder into a *tuning* and a *reporting* half by file name: the names sorted
    (Python's string order), the 1st, 3rd, 5th, … are ``tuning``, the 2nd, 4th, … ``reporting``. Thresholds are
    chosen on the tuning half; the reporting half is only reported on."""
    return {name: HALVES[i % 2] for i, name in enumerate(sorted(names))}


def run_stages(image: np.ndarray) -> tuple[dict[str, list[D.Detection]], dict[str, float]]:
    """Every stage of :data:`facemarks.serving.detect.STAGES` once on ``image`` (``hog`` via
    :func:`facemarks.serving.detect.hog_stage`, which also gives the candidates, ``weak``): ``({stage: detections},
    {stage: wall ms, stage_cpu: process CPU ms})``."""
    found: dict[str, list[D.Detection]] = {}
    ms: dict[str, float] = {}
    for stage in D.STAGES:
        start, cpu = time.perf_counter(), time.process_time()
        if stage == "hog":
            found["hog"], found["weak"] = D.hog_stage(image)
        else:
            found[stage] = D.run_stage(stage, image, found=found)
        ms[stage] = 1000.0 * (time.perf_counter() - start)
        ms[f"{stage}_cpu"] = 1000.0 * (time.process_time() - cpu)
    return found, ms


def photo_report(folder: str | Path, model: Any = None, loss: str = "mse", *, size: int = 96, margin: float = 0.25,
                 sigma: float = 1.5, decoder: str = "subpixel", min_side: float = MIN_SIDE,
                 max_photos: int | None = None, keep: list | None = None,
                 replay: list | None = None, half: str | None = None, pattern: str = "") -> tuple[dict[str, Any], dict[str, float]]:
    """The detector settings on the photos of ``folder`` (module docstring): ``(report, timing)``.

    ``model`` (a torch module or :class:`facemarks.serving.runtime.OnnxHeatmaps` trained with ``loss``; optional) gives each
    union face its landmark confidence for the false-positive rule; ``size``/``margin``/``sigma``/``decoder`` are how
    it predicts (:func:`facemarks.serving.predict.predict_many`). Needs dlib and the CNN model file (the ``peers`` extra):
    :class:`facemarks.serving.detect.DetectorUnavailable` otherwise. ``keep``: a list that gets, per photo, ``(file name,
    image shape, {stage: detections}, {stage: ms})`` (to study other cascade rules without rerunning the detectors).
    ``replay``: such a list from an earlier run, used instead of running the detectors (its times are reported; the
    boxes are mapped again with the current :data:`facemarks.serving.detect.BOX_MAPPING`, :func:`facemarks.serving.detect.remap`).
    ``half``: ``tuning`` or ``reporting`` (:func:`photo_halves`) to score one half only (None: every photo).
    ``pattern``: a glob on the file names (``evaluate.photos_glob``; empty: every photo).
    """
    if not D.cnn_available() and replay is None:
        D.resolve("cnn")  # raises DetectorUnavailable with the one-line reason
    if half is not None and half not in HALVES:
        raise ValueError(f"photo_report: half must be one of {', '.join(HALVES)} or None, got {half!r}")
    files, skipped = photo_files(folder, pattern)
    if half is not None:
        halves = photo_halves([p.name for p in files])
        files = [p for p in files if halves[p.name] == half]
    files = files[:max_photos] if max_photos is not None else files
    replayed = {name: (found, ms) for name, _, found, ms in (replay or [])}
    if replay is not None:
        files = [p for p in files if p.name in replayed]
    if not files:
        raise FileNotFoundError(f"photo_report: no photos in {folder}")
    per_setting: dict[str, dict[str, list]] = {s: {"faces": [], "found": [], "ms": [], "cpu_ms": []} for s in SETTINGS}
    unions, images = [], []
    n_slow = 0
    agree_iou: dict[str, list[float]] = {s: [] for s in D.STAGES if s != "hog"}
    for path in files:
        image = read_image(path)
        if path.name in replayed:
            found = {k: [D.remap(d) for d in v] for k, v in replayed[path.name][0].items()}
            ms = dict(replayed[path.name][1])
        else:
            found, ms = run_stages(image)
        if keep is not None:
            keep.append((path.name, image.shape, found, ms))
        union = D.merge([d for stage in D.STAGES for d in found[stage]])
        unions.append(union)
        images.append((image, [u.box for u in union]))
        n_slow += "cnn" in D.stages_for("auto", found, cnn=True)
        for stage in agree_iou:  # mapped boxes vs HOG's, same face
            for d in found[stage]:
                best = max((box_iou(d.box, h.box) for h in found["hog"]), default=0.0)
                if best >= D.MERGE_IOU:
                    agree_iou[stage].append(best)
        for setting in SETTINGS:
            faces = D.assemble(setting, found, cnn=True)
            row = per_setting[setting]
            row["faces"].append(faces)
            row["found"].append(_found(faces, union))
            plan = D.stages_for(setting, found, cnn=True)
            row["ms"].append(sum(ms[s] for s in plan))
            row["cpu_ms"].append(sum(ms.get(f"{s}_cpu", np.nan) for s in plan))

    flat = [u for union in unions for u in union]
    big = np.array([D.box_side(u.box) >= min_side for u in flat], bool)
    families = [{D.family(t) for t in (u.tag, *u.merged)} for u in flat]
    agreed = np.array([len(f) == 2 for f in families], bool)
    weak = np.array([(u.score if u.score is not None else -np.inf) < D.SURE_SCORES[u.detector] for u in flat], bool)
    conf = None
    rule = (f"found by one detector family only (dlib's HOG or its CNN, not both) with a weak score (HOG < "
            f"{HOG_WEAK:g}, CNN < {CNN_WEAK:g})")
    low = None
    if model is not None:
        preds = predict_many(model, images, loss, size=size, margin=margin, sigma=sigma, decoder=decoder)
        conf = np.concatenate([c.mean(axis=1) if len(c) else np.zeros(0) for _, c in preds]).astype(np.float64)
        low = float(np.percentile(conf[agreed], FP_PERCENTILE)) if agreed.any() else float("nan")
        rule += f" and landmark confidence < {low:.4f} (the {FP_PERCENTILE:g}th percentile over the faces both agree on)"
        likely_fp = ~agreed & weak & (conf < low)
    else:
        rule += " (no landmark model given: the confidence part of the rule was not applied)"
        likely_fp = ~agreed & weak
    plausible = big & ~likely_fp
    hits = {s: np.concatenate(per_setting[s]["found"]) if flat else np.zeros(0, bool) for s in SETTINGS}
    fast = np.zeros(len(flat), bool)
    for s in FAST_SETTINGS:
        fast |= hits[s]
    report: dict[str, Any] = {
        "n_photos": len(files), "half": half, "photos": [p.name for p in files] if half else None,
        "skipped": skipped, "min_side": min_side, "merge_iou": D.MERGE_IOU,
        "union_faces": len(flat), "union_faces_60px": int(big.sum()), "union_agreed": int(agreed.sum()),
        "union_plausible_60px": int(plausible.sum()),
        # faces of >= min_side that only the slow settings (hog-rotate, cnn) find: neither hog nor auto
        "slow_only_plausible_60px": int((plausible & ~fast).sum()),
        "slow_only_share_plausible_60px": float((plausible & ~fast).sum() / plausible.sum()) if plausible.any()
        else float("nan"),
        "union_likely_fp": int(likely_fp.sum()), "likely_fp_rule": rule, "low_confidence": low,
        "model_loss": loss if model is not None else None, "auto_slow_photos": int(n_slow),
        "cascade_rule": {"candidate_score": D.CANDIDATE_SCORE, "candidate_min_side": D.CANDIDATE_MIN_SIDE,
                         "candidate_max": D.CANDIDATE_MAX, "check_context": D.CHECK_CONTEXT,
                         "check_side": D.CHECK_SIDE, "cnn_fast_side": D.CNN_FAST_SIDE, "cnn_sure": D.CNN_SURE,
                         "cnn_max_side": D.CNN_MAX_SIDE, "rotations": list(D.ROTATIONS)},
        "settings": {},
        # how well the other stages' mapped boxes sit on HOG's mapped box of the same face
        "iou_with_hog_median": {k: float(np.median(v)) if v else None for k, v in agree_iou.items()},
        "iou_with_hog_pairs": {k: len(v) for k, v in agree_iou.items()},
        "replayed": replay is not None,
    }
    timing: dict[str, float] = {}
    for setting in SETTINGS:
        row = per_setting[setting]
        hit = hits[setting]
        others = np.zeros_like(hit)
        for other in SETTINGS:
            if other != setting:
                others |= hits[other]
        sides = np.array([D.box_side(f.box) for faces in row["faces"] for f in faces])
        fp_mine = sum(bool(likely_fp[i]) for i in np.flatnonzero(hit))
        report["settings"][setting] = {
            "faces": int(sum(map(len, row["faces"]))), "faces_60px": int((sides >= min_side).sum()),
            "missed": int((others & ~hit).sum()), "missed_60px": int((others & ~hit & big).sum()),
            "recall": float(hit.mean()) if len(hit) else float("nan"),
            "recall_60px": float(hit[big].mean()) if big.any() else float("nan"),
            "missed_plausible_60px": int((others & ~hit & plausible).sum()),
            "recall_plausible_60px": float(hit[plausible].mean()) if plausible.any() else float("nan"),
            "likely_fp": int(fp_mine),
        }
        for key, values in (("ms", row["ms"]), ("cpu_ms", row["cpu_ms"])):
            timing[f"{setting}_{key}_per_image_median"] = float(np.median(values))
            timing[f"{setting}_{key}_per_image_p90"] = float(np.percentile(values, 90))
        timing[f"{setting}_ms_per_image_mean"] = float(np.mean(row["ms"]))
    auto = report["settings"]["auto"]
    report["goal"] = {"recall_min": GOAL_RECALL, "auto_recall_60px": auto["recall_60px"],
                      "auto_recall_plausible_60px": auto["recall_plausible_60px"],
                      "recall_met": bool(auto["recall_plausible_60px"] >= GOAL_RECALL)}
    timing["load_average_1min"] = float(os.getloadavg()[0]) if hasattr(os, "getloadavg") else float("nan")
    timing["cpu_count"] = float(os.cpu_count() or 0)
    return report, timing


def marked_faces(folder: str | Path, csv_name: str = "training_frames_keypoints.csv",
                 images: str = "training") -> list[tuple[Path, np.ndarray]]:
    """One marked face per *person* of a keypoint set laid out like ``../shared/real-faces`` (a CSV with a header row,
    then ``file, x0, y0, …, x67, y67``; the images in ``images/``; files ``<person>_<frame>``): per person the first
    frame by file name (frames of one person are near-duplicates), ``[(image path, points (68, 2))]`` sorted by name."""
    folder = Path(folder)
    with open(folder / csv_name, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    chosen: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: r[0]):
        chosen.setdefault(row[0].rsplit("_", 1)[0], row)
    return [(folder / images / row[0], np.asarray(row[1:137], np.float64).reshape(68, 2))
            for row in sorted(chosen.values(), key=lambda r: r[0])]


def marked_face_report(folder: str | Path, min_side: float = MIN_SIDE, max_faces: int | None = None) -> dict[str, Any]:
    """Share of the marked faces of a keypoint folder (:func:`marked_faces`) that each setting finds: a face counts as
    found when one of the setting's mapped boxes is the same face (:func:`facemarks.serving.detect.same_face`) as the
    box of its marked points (:func:`facemarks.core.landmarks.face_box`: the training convention the mapped boxes
    follow). Over every face and over
    those whose box side is ≥ ``min_side`` (the photo goal's floor; dlib's HOG at upsample 1 finds faces from about
    40 px, the CNN from about 70-80 px)."""
    faces = marked_faces(folder)[:max_faces]
    found = {s: [] for s in SETTINGS}
    sides = []
    for path, points in faces:
        image = read_image(path)
        stages, _ = run_stages(image)
        true = face_box(points)
        sides.append(true[2])
        for s in SETTINGS:
            found[s].append(any(D.same_face(true, d.box) for d in D.assemble(s, stages, cnn=True)))
    big = np.array(sides) >= min_side
    return {"n_faces": len(faces), "n_faces_min_side": int(big.sum()), "min_side": min_side,
            "face_side_median": float(np.median(sides)) if sides else float("nan"),
            "rule": "one frame per person (the first by file name); found: a mapped box that is the same face "
                    "(facemarks.serving.detect.same_face) as face_box of the marked points",
            "settings": {s: {"found": float(np.mean(v)), "found_min_side": float(np.mean(np.array(v)[big]))
                             if big.any() else float("nan")} for s, v in found.items()}}
