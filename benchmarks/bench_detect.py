"""Face-detector settings on real photos: faces found, faces the other settings find that a setting misses, likely
false positives, ms per photo (median) — :func:`facemarks.detect_eval.photo_report`.

Run from the repo root: ``PYTHONPATH=src python benchmarks/bench_detect.py [--photos ../shared/real-photos]``.
The landmark confidence of the false-positive rule comes from ``--model`` (default: the model ``facemarks predict``
would use, :func:`facemarks.predict.choose_model`) when that file exists, else the rule is family agreement alone.
Writes ``metrics/bench_detect.json``: the report, the timings and the machine's load average before and after (the
timings are wall-clock on whatever else the machine runs). Skips (exit 0, nothing written) when the folder is absent.
"""
from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

from facemarks.atomic import atomic_write_json
from facemarks.detect_eval import SETTINGS, photo_report



def details_to_json(details: dict) -> str:
    """``--details`` as JSON: per photo (file name, image shape, {stage: [Detection as a dict]}, {stage: ms})."""
    import dataclasses

    photos = [[name, list(shape), {k: [dataclasses.asdict(d) for d in v] for k, v in found.items()}, ms]
              for name, shape, found, ms in details["photos"]]
    return json.dumps({**details, "photos": photos})


def details_from_json(text: str) -> dict:
    """The inverse of :func:`details_to_json` (boxes back to tuples, ``Detection`` objects rebuilt)."""
    from facemarks.detect import Detection

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
    ap.add_argument("--out", default="metrics/bench_detect.json")
    ap.add_argument("--details", help="also write every photo's stage detections and times here as JSON (for rule studies)")
    ap.add_argument("--replay", help="a --details JSON file of an earlier run: summarise its detections and times "
                    "(boxes mapped again with the current BOX_MAPPING) instead of running the detectors")
    args = ap.parse_args()
    if not Path(args.photos).is_dir():
        print(f"bench_detect: {args.photos} not found: skipped")
        return 0
    from facemarks.cli import _defaults
    from facemarks.predict import best_decoder, choose_model, load_predictor

    choice = choose_model(model=args.model)
    cfg = _defaults(args.params)
    model, why = None, f"no model file {choice.path}"
    if choice.path.is_file():
        model, backend, why = load_predictor(choice, "torch" if choice.path.suffix == ".pt" else "auto")
        why = f"{choice.path} ({choice.loss}, {backend})"
    size = getattr(model, "input_size", None) or cfg["size"]
    keep: list | None = [] if args.details else None
    replay = details_from_json(Path(args.replay).read_text(encoding="utf-8")) if args.replay else None
    load_before = os.getloadavg()
    report, timing = photo_report(args.photos, model, choice.loss, size=size, margin=cfg["margin"],
                                  sigma=cfg["sigma"], decoder=best_decoder(choice.loss, cfg["decoder"]),
                                  max_photos=args.max_photos, keep=keep,
                                  replay=replay["photos"] if replay else None)
    load_after = os.getloadavg()
    if args.details:
        Path(args.details).write_text(details_to_json({"photos": keep, "load_average_before": list(load_before),
                                                       "load_average_after": list(load_after)}), encoding="utf-8")
    if replay:  # the times are the earlier run's, and so is the load they were measured under
        load_before, load_after = replay["load_average_before"], replay["load_average_after"]
        timing["load_average_1min"] = float(load_after[0])
    atomic_write_json(args.out, {"report": report, "timing": timing, "landmark_model": why,
                                 "times_from": f"replay of {Path(args.replay).name}" if replay else "this run",
                                 "load_average_before": list(load_before), "load_average_after": list(load_after),
                                 "cpu_count": os.cpu_count()})
    print(f"{report['n_photos']} photos (skipped {', '.join(report['skipped']) or 'none'}); union {report['union_faces']} "
          f"faces, {report['union_faces_60px']} of >= {report['min_side']:g} px; landmark model: {why}")
    print(f"{'setting':12s}{'faces':>7s}{'missed':>8s}{'miss60':>8s}{'rec60':>8s}{'recP60':>8s}{'likelyFP':>10s}"
          f"{'ms med':>9s}{'cpu ms':>9s}")
    for s in SETTINGS:
        r = report["settings"][s]
        print(f"{s:12s}{r['faces']:7d}{r['missed']:8d}{r['missed_60px']:8d}{r['recall_60px']:8.3f}"
              f"{r['recall_plausible_60px']:8.3f}{r['likely_fp']:10d}"
              f"{timing[f'{s}_ms_per_image_median']:9.0f}{timing[f'{s}_cpu_ms_per_image_median']:9.0f}")
    print(f"likely FP: {report['likely_fp_rule']}; recP60: recall over the {report['union_plausible_60px']} union "
          f"faces >= {report['min_side']:g} px that are not likely FP; auto ran cnn + turned copies on "
          f"{report['auto_fallback_photos']} photos")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
