"""How the face-detector settings do on a folder of real photos (no markup): faces found, faces the other settings
find that a setting misses, likely false positives, and the time per photo.

    photo_report(folder, model=None, ...) -> (report, timing)

``report`` (quality only; the ``photos`` block of ``metrics/detect.json``) and ``timing`` (ms per photo; for
``timings/`` or a benchmark's ``metrics/bench_*.json``, never a DVC metrics file).

There is no markup, so the reference is the **union**: every detection of every stage (:data:`facemarks.detect.STAGES`)
merged into one face per place (:func:`facemarks.detect.merge`, IoU ≥ :data:`facemarks.detect.MERGE_IOU`). A setting
*finds* a union face when one of its faces has IoU ≥ ``MERGE_IOU`` with it. Per setting (``hog``, ``hog-rotate``,
``cnn``, ``auto`` = the cascade, the default of ``facemarks predict``):

* ``faces``: faces it reports; ``faces_60px``: those with a mapped box side ≥ ``min_side`` (60 px);
* ``missed``: union faces that another setting finds and this one does not (``missed_60px``: of side ≥ 60 px);
* ``recall_60px``: share of the union's faces of side ≥ 60 px it finds; ``recall_plausible_60px`` (and
  ``missed_plausible_60px``): the same over those that are not likely false positives (below) — the goal: ≥ 0.98
  for ``auto``;
* ``likely_fp``: its faces that are *likely false positives*: a union face found by only one detector family —
  dlib's HOG (on the image or a turned copy) *or* its CNN, not both — with a weak score (HOG margin below
  :data:`HOG_WEAK`, CNN confidence below :data:`CNN_WEAK`) and, when a landmark ``model`` is given, with
  a landmark confidence (mean per-point confidence of that model in the face's box) below ``low_confidence``: the
  5th percentile of the landmark confidence of the faces both families agree on (without a model: family agreement
  alone, and the report says so).

Timing: each stage is run once per photo and timed; a setting's time is the sum of the stages it runs on that photo
(:func:`facemarks.detect.stages_for`: ``auto`` runs ``cnn`` and ``turned`` only where HOG found no sure face), so
the settings are timed on the same work as :func:`facemarks.detect.detect` does (wall-clock, and the process's CPU
time, which the load of other processes inflates less). Reading the image is not timed.
``contact.png`` (a contact sheet of the other photos) and any file whose stem starts with ``contact`` are skipped.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from facemarks import detect as D
from facemarks.io import box_iou, list_images, read_image
from facemarks.predict import predict_many

SETTINGS = ("hog", "hog-rotate", "cnn", "auto")
MIN_SIDE = 60.0  # px: the faces the goal counts
FP_PERCENTILE = 5.0  # low landmark confidence: below this percentile of the faces both detector families agree on
HOG_WEAK = 0.3  # a HOG-only face (image or turned copy) with a margin below this is weak ...
CNN_WEAK = 0.5  # ... and a CNN-only face below this confidence


def photo_files(folder: str | Path) -> tuple[list[Path], list[str]]:
    """The photos of ``folder`` (:func:`facemarks.io.list_images`) and the names skipped (contact sheets)."""
    files = list_images(folder)
    skipped = [p.name for p in files if p.stem.lower().startswith("contact")]
    return [p for p in files if p.name not in skipped], skipped


def _family(tag: str) -> str:
    return "cnn" if tag.startswith("cnn") else "hog"


def _found(faces: list[D.Detection], union: list[D.Detection]) -> np.ndarray:
    """Per union face: does one of ``faces`` overlap it by IoU ≥ MERGE_IOU."""
    return np.array([any(D.same_face(u.box, f.box) for f in faces) for u in union], bool)


def photo_report(folder: str | Path, model: Any = None, loss: str = "mse", *, size: int = 96, margin: float = 0.25,
                 sigma: float = 1.5, decoder: str = "subpixel", min_side: float = MIN_SIDE,
                 max_photos: int | None = None, keep: list | None = None,
                 replay: list | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """The detector settings on the photos of ``folder`` (module docstring): ``(report, timing)``.

    ``model`` (a torch module or :class:`facemarks.runtime.OnnxHeatmaps` trained with ``loss``; optional) gives each
    union face its landmark confidence for the false-positive rule; ``size``/``margin``/``sigma``/``decoder`` are how
    it predicts (:func:`facemarks.predict.predict_many`). Needs dlib and the CNN model file (the ``peers`` extra):
    :class:`facemarks.detect.DetectorUnavailable` otherwise. ``keep``: a list that gets, per photo, ``(file name,
    image shape, {stage: detections}, {stage: ms})`` (to study other cascade rules without rerunning the detectors).
    ``replay``: such a list from an earlier run, used instead of running the detectors (its times are reported; the
    boxes are mapped again with the current :data:`facemarks.detect.BOX_MAPPING`, :func:`facemarks.detect.remap`).
    """
    if not D.cnn_available() and replay is None:
        D.resolve("cnn")  # raises DetectorUnavailable with the one-line reason
    files, skipped = photo_files(folder)
    files = files[:max_photos] if max_photos is not None else files
    replayed = {name: (found, ms) for name, _, found, ms in (replay or [])}
    if replay is not None:
        files = [p for p in files if p.name in replayed]
    if not files:
        raise FileNotFoundError(f"photo_report: no photos in {folder}")
    per_setting: dict[str, dict[str, list]] = {s: {"faces": [], "found": [], "ms": [], "cpu_ms": []} for s in SETTINGS}
    unions, images = [], []
    n_fallback = 0
    agree_iou: dict[str, list[float]] = {"cnn": [], "turned": []}
    for path in files:
        image = read_image(path)
        found, ms = {}, {}
        if path.name in replayed:
            found = {k: [D.remap(d) for d in v] for k, v in replayed[path.name][0].items()}
            ms = dict(replayed[path.name][1])
        for stage in D.STAGES:
            if stage not in found:
                start, cpu = time.perf_counter(), time.process_time()
                found[stage] = D.run_stage(stage, image)
                ms[stage] = 1000.0 * (time.perf_counter() - start)
                ms[f"{stage}_cpu"] = 1000.0 * (time.process_time() - cpu)
        if keep is not None:
            keep.append((path.name, image.shape, found, ms))
        union = D.merge([d for stage in D.STAGES for d in found[stage]])
        unions.append(union)
        images.append((image, [u.box for u in union]))
        n_fallback += "cnn" in D.stages_for("auto", found["hog"], image.shape, cnn=True)
        for stage, dets in (("cnn", found["cnn"]), ("turned", found["turned"])):  # mapped boxes vs HOG's, same face
            for d in dets:
                best = max((box_iou(d.box, h.box) for h in found["hog"]), default=0.0)
                if best >= D.MERGE_IOU:
                    agree_iou[stage].append(best)
        for setting in SETTINGS:
            faces = D.assemble(setting, found, image.shape, cnn=True)
            row = per_setting[setting]
            row["faces"].append(faces)
            row["found"].append(_found(faces, union))
            plan = D.stages_for(setting, found["hog"], image.shape, cnn=True)
            row["ms"].append(sum(ms[s] for s in plan))
            row["cpu_ms"].append(sum(ms.get(f"{s}_cpu", np.nan) for s in plan))

    flat = [u for union in unions for u in union]
    big = np.array([D.box_side(u.box) >= min_side for u in flat], bool)
    families = [{_family(t) for t in (u.tag, *u.merged)} for u in flat]
    agreed = np.array([len(f) == 2 for f in families], bool)
    weak = np.array([(u.score if u.score is not None else -np.inf) < (CNN_WEAK if u.detector == "cnn" else HOG_WEAK)
                     for u in flat], bool)
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
    report: dict[str, Any] = {
        "n_photos": len(files), "skipped": skipped, "min_side": min_side, "merge_iou": D.MERGE_IOU,
        "union_faces": len(flat), "union_faces_60px": int(big.sum()), "union_agreed": int(agreed.sum()),
        "union_plausible_60px": int(plausible.sum()),
        "union_likely_fp": int(likely_fp.sum()), "likely_fp_rule": rule, "low_confidence": low,
        "model_loss": loss if model is not None else None, "auto_fallback_photos": int(n_fallback),
        "cascade_rule": {"sure_score": D.SURE_SCORE, "sure_fraction": D.SURE_FRACTION,
                         "cnn_max_side": D.CNN_MAX_SIDE, "rotations": list(D.ROTATIONS)},
        "settings": {},
        # how well the CNN's and the turned copies' mapped boxes sit on HOG's mapped box of the same face
        "iou_with_hog_median": {k: float(np.median(v)) if v else None for k, v in agree_iou.items()},
        "iou_with_hog_pairs": {k: len(v) for k, v in agree_iou.items()},
        "replayed": replay is not None,
    }
    timing: dict[str, float] = {}
    for setting in SETTINGS:
        row = per_setting[setting]
        hit = np.concatenate(row["found"]) if flat else np.zeros(0, bool)
        others = np.zeros_like(hit)
        for other in SETTINGS:
            if other != setting:
                others |= np.concatenate(per_setting[other]["found"])
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
        timing[f"{setting}_ms_per_image_median"] = float(np.median(row["ms"]))
        timing[f"{setting}_ms_per_image_mean"] = float(np.mean(row["ms"]))
        # CPU time of this process (all its threads): what the work costs without the other processes' load
        timing[f"{setting}_cpu_ms_per_image_median"] = float(np.median(row["cpu_ms"]))
    auto = report["settings"]["auto"]
    report["goal"] = {"recall_min": 0.98, "auto_recall_60px": auto["recall_60px"],
                      "auto_recall_plausible_60px": auto["recall_plausible_60px"],
                      "recall_met": bool(auto["recall_plausible_60px"] >= 0.98)}
    timing["load_average_1min"] = float(os.getloadavg()[0]) if hasattr(os, "getloadavg") else float("nan")
    timing["cpu_count"] = float(os.cpu_count() or 0)
    return report, timing
