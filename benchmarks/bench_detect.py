"""Face-detector settings on real photos: faces found, faces the other settings find that a setting misses, likely
false positives, ms per photo (median, 90th percentile) — :func:`facemarks.evaluation.detect_eval.photo_report` — on the tuning
and the reporting half of the folder (:func:`facemarks.evaluation.detect_eval.photo_halves`), and the share of marked faces
each setting finds on a folder of marked faces (:func:`facemarks.evaluation.detect_eval.marked_face_report`).

Run from the repo root: ``PYTHONPATH=src python benchmarks/bench_detect.py [--photos ../shared/real-photos]
[--faces ../shared/real-faces]``. The detectors run once per photo (every stage timed); both halves are scored from
that run. The landmark confidence of the false-positive rule comes from ``--model`` (default: the model ``facemarks
predict`` would use, :func:`facemarks.serving.predict.choose_model`) when that file exists, else the rule is family agreement
alone. Writes ``metrics/bench_detect.json`` (the reports, the timings, the CPU model and SIMD flags from
/proc/cpuinfo and the load average before and after: the timings are wall-clock on whatever else the machine runs)
and ``--counts`` (default ``metrics/detect_photos.json``: the counts only, no times). Skips (exit 0, nothing
written) when the photo folder is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from facemarks.core import cpuinfo
from facemarks.core.atomic import atomic_write_json
from facemarks.evaluation.detect_eval import HALVES, SETTINGS, marked_face_report, photo_report


def details_to_json(details: dict) -> str:
    """``--details`` as JSON: per photo (file name, image shape, {stage: [Detection as a dict]}, {stage: ms})."""
    import dataclasses

    photos = [[name, list(shape), {k: [dataclasses.asdict(d) for d in v] for k, v in found.items()}, ms]
              for name, shape, found, ms in details["photos"]]
    return json.dumps({**details, "photos": photos})


def details_from_json(text: str) -> dict:
    """The inverse of :func:`details_to_json` (boxes back to tuples, ``Detection`` objects rebuilt)."""
    from facemarks.serving.detect import Detection

    def det(d: dict) -> Detection:
        return Detection(**{**d, "box": tuple(d["box"]), "raw_box": tuple(d["raw_box"]), "merged": tuple(d["merged"])})

    doc = json.loads(text)
    doc["photos"] = [(name, tuple(shape), {k: [det(d) for d in v] for k, v in found.items()}, ms)
                     for name, shape, found, ms in doc["photos"]]
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", default="../shared/real-photos", help="folder of real photos (validation only)")
    ap.add_argument("--model", help="model.pt or .onnx for the landmark confidence (default: predict's choice)")
    ap.add_argument("--max-photos", type=int)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--faces", default="../shared/real-faces", help="folder of marked faces (CSV + training/)")
    ap.add_argument("--out", default="metrics/bench_detect.json")
    ap.add_argument("--counts", default="metrics/detect_photos.json", help="the counts alone (no times)")
    ap.add_argument("--details", help="also write every photo's stage detections and times here as JSON (for rule studies)")
    ap.add_argument("--replay", help="a --details JSON file of an earlier run: summarise its detections and times "
                    "(boxes mapped again with the current BOX_MAPPING) instead of running the detectors")
    args = ap.parse_args()
    if not Path(args.photos).is_dir():
        print(f"bench_detect: {args.photos} not found: skipped")
        return 0
    from facemarks.cli import _defaults
    from facemarks.serving.predict import best_decoder, choose_model, load_predictor

    choice = choose_model(model=args.model)
    cfg = _defaults(args.params)
    model, why = None, f"no model file {choice.path}"
    if choice.path.is_file():
        model, backend, why = load_predictor(choice, "torch" if choice.path.suffix == ".pt" else "auto")
        why = f"{choice.path} ({choice.loss}, {backend})"
    size = getattr(model, "input_size", None) or cfg["size"]
    replay = details_from_json(Path(args.replay).read_text(encoding="utf-8")) if args.replay else None
    load_before = os.getloadavg()
    kw = dict(size=size, margin=cfg["margin"], sigma=cfg["sigma"], decoder=best_decoder(choice.loss, cfg["decoder"]))
    if replay is None:  # run every stage once on every photo, keeping the detections and times
        keep = []
        photo_report(args.photos, None, choice.loss, max_photos=args.max_photos, keep=keep, **kw)
    else:
        keep = replay["photos"]
    halves = {h: photo_report(args.photos, model, choice.loss, replay=keep, half=h, **kw) for h in HALVES}
    load_after = os.getloadavg()
    if args.details:
        Path(args.details).write_text(details_to_json({"photos": keep, "load_average_before": list(load_before),
                                                       "load_average_after": list(load_after)}), encoding="utf-8")
    if replay:  # the times are the earlier run's, and so is the load they were measured under
        load_before, load_after = replay["load_average_before"], replay["load_average_after"]
    faces = marked_face_report(args.faces) if args.faces and Path(args.faces).is_dir() else None
    cpu = cpuinfo.describe()
    atomic_write_json(args.out, {"halves": {h: {"report": r, "timing": t} for h, (r, t) in halves.items()},
                                 "marked_faces": faces, "landmark_model": why,
                                 "times_from": f"replay of {Path(args.replay).name}" if replay else "this run",
                                 "load_average_before": list(load_before), "load_average_after": list(load_after),
                                 "cpu_count": os.cpu_count(), "cpu": cpu})
    atomic_write_json(args.counts, {"halves": {h: r for h, (r, _) in halves.items()}, "marked_faces": faces,
                                    "landmark_model": why})
    for h, (report, timing) in halves.items():
        print(f"\n{h} half: {report['n_photos']} photos; union {report['union_faces']} faces, "
              f"{report['union_faces_60px']} of >= {report['min_side']:g} px, {report['union_plausible_60px']} of them "
              f"plausible, {report['slow_only_plausible_60px']} found only by the slow settings; "
              f"auto ran its slow stages (turned copies, 640 px CNN) on {report['auto_slow_photos']} photos")
        print(f"{'setting':12s}{'faces':>7s}{'missed':>8s}{'miss60':>8s}{'rec60':>8s}{'recP60':>8s}{'likelyFP':>10s}"
              f"{'ms med':>9s}{'ms p90':>9s}{'cpu med':>9s}{'cpu p90':>9s}")
        for s in SETTINGS:
            r = report["settings"][s]
            print(f"{s:12s}{r['faces']:7d}{r['missed']:8d}{r['missed_60px']:8d}{r['recall_60px']:8.3f}"
                  f"{r['recall_plausible_60px']:8.3f}{r['likely_fp']:10d}"
                  + "".join(f"{timing[f'{s}_{k}']:9.0f}" for k in ("ms_per_image_median", "ms_per_image_p90",
                                                                   "cpu_ms_per_image_median", "cpu_ms_per_image_p90")))
    print(f"likely FP: {halves['tuning'][0]['likely_fp_rule']}; recP60: recall over the union faces >= 60 px that are "
          "not likely FP")
    if faces:
        print(f"\nmarked faces ({faces['n_faces']}, {faces['n_faces_min_side']} of >= {faces['min_side']:g} px): " +
              ", ".join(f"{s} {r['found']:.3f} / {r['found_min_side']:.3f}" for s, r in faces["settings"].items()))
    print(f"CPU {cpu['model']} ({' '.join(cpu['simd_flags'])}), {os.cpu_count()} CPUs; load average (1, 5, 15 min) "
          f"before {load_before}, after {load_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
