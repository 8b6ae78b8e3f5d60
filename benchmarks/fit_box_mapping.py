"""Refit the detector → training-box mapping (``facemarks.serving.detect.BOX_MAPPING``) on synthetic *training* images.

Run from the repo root: ``PYTHONPATH=src python benchmarks/fit_box_mapping.py [--n 500] [--raw data/raw]``.
Reads ``<raw>/train.xml`` and its images when they exist (after ``dvc repro download``), else renders the same
training faces (``data.synthetic`` of params.yaml, ``base.seed``) into a temp folder. Each true face box is paired
with the detector's own box of highest IoU (≥ ``--min-iou``, before mapping), grouped by the detector's component
(dlib's sub-detector); every constant is the median over a group's pairs (:func:`facemarks.serving.detect.fit_box_map`). Prints the constants to paste into ``BOX_MAPPING`` and, per detector,
the hit rate (IoU ≥ 0.7) and mean IoU before and after the fitted mapping and the score of matched vs unmatched
detections, on these training images. Writes ``metrics/bench_box_mapping.json`` (quality only, no timings).

Detectors: ``hog`` (dlib's HOG, per sub-detector), ``cnn`` (dlib's CNN detector as :func:`facemarks.serving.detect.cnn_boxes`
runs it; ``--n-cnn`` images, it is slow), ``hog-rotate`` (each training image turned by ∓30° — the true box is
``face_box`` of the turned points — and HOG on its copy turned by ±30°, boxes turned back: one mapping per copy
angle) and the LBP ``cascade``. ``--only hog-rotate,cnn`` refits some and keeps the others' rows of the old file.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from facemarks.core.atomic import atomic_write_json
from facemarks.serving.detect import (BOX_MAPPING, ROTATIONS, cascade_boxes, cnn_available, cnn_boxes, dlib_available,
                              dlib_boxes, fit_box_map, map_box, rotate_image, rotated_hog_boxes)
from facemarks.core.io import box_iou, read_dlib_xml, read_image
from facemarks.core.params import Params, load_params
from facemarks.core.landmarks import face_box


def training_faces(raw: Path, n: int, tmp: Path) -> tuple[Path, list]:
    """``(root, records)``: the first ``n`` training images of ``raw`` when present, else rendered into ``tmp``."""
    if (raw / "train.xml").is_file():
        return raw, read_dlib_xml(raw / "train.xml")[:n]
    from facemarks.data.synthetic import generate_split

    p = load_params() if Path("params.yaml").is_file() else Params()
    return tmp, generate_split(tmp, "train", n, p.base.seed, p.data.synthetic)


def samples(detector: str, root: Path, records: list):
    """Per training image: ``(found [(raw box, score, component)], true boxes)`` for ``detector``."""
    for i, rec in enumerate(records):
        image = read_image(root / rec.file)
        true = [face.box for face in rec.faces]
        if detector == "hog":
            found = dlib_boxes(image)
        elif detector == "cnn":
            found = [(b, s, 0) for b, s in cnn_boxes(image)]
        elif detector == "hog-rotate":  # turn the image by -a: the copy turned by +a holds its faces upright again
            k = i % len(ROTATIONS)
            turned, A = rotate_image(image, -ROTATIONS[k])
            back = np.linalg.inv(np.vstack([A, [0.0, 0.0, 1.0]]))[:2]  # image -> turned copy
            true = [face_box(face.points @ back[:, :2].T + back[:, 2]) for face in rec.faces
                    if np.isfinite(face.points).all()]
            found = [(b, s, k) for b, s, _ in rotated_hog_boxes(turned, ROTATIONS[k])]
        else:
            found = [(b, None, 0) for b in cascade_boxes(image)]
        yield found, true


def fit(detector: str, root: Path, records: list, min_iou: float, min_pairs: int = 10) -> dict:
    """Fit one detector's mapping per component (HOG's sub-detector, hog-rotate's copy angle; cnn and the cascade
    have one) and score it on the same images: hit rate (IoU >= 0.7) and mean IoU of the best detection per true
    face, before and after mapping."""
    pairs: dict[int, list] = {}
    per_face, scores_hit, scores_other = [], [], []
    for found, true_boxes in samples(detector, root, records):
        used = set()
        for true in true_boxes:
            ious = [box_iou(true, b) for b, _, _ in found]
            best = int(np.argmax(ious)) if ious else -1
            per_face.append((true, found))
            if ious and ious[best] >= min_iou:
                pairs.setdefault(found[best][2], []).append((found[best][0], true))
                used.add(best)
        for i, (_, score, _) in enumerate(found):
            if score is not None:
                (scores_hit if i in used else scores_other).append(score)
    everything = [p for group in pairs.values() for p in group]
    overall = fit_box_map(*map(np.array, zip(*everything)))
    n_components = len(BOX_MAPPING[detector])
    maps = [fit_box_map(*map(np.array, zip(*pairs[k]))) if len(pairs.get(k, [])) >= min_pairs else overall
            for k in range(n_components)]

    def best_iou(true, found, mapped: bool) -> float:
        return max((box_iou(true, map_box(b, maps[k]) if mapped else b) for b, _, k in found), default=0.0)

    raw = np.array([best_iou(t, f, False) for t, f in per_face])
    mapped = np.array([best_iou(t, f, True) for t, f in per_face])
    row = {"mapping": [[round(v, 4) for v in m] for m in maps], "n_images": len(records), "n_faces": len(per_face),
           "n_pairs": {str(k): len(v) for k, v in sorted(pairs.items())}, "hit_rate_raw": float(np.mean(raw >= 0.7)),
           "mean_iou_raw": float(np.mean(raw)), "hit_rate_mapped": float(np.mean(mapped >= 0.7)),
           "mean_iou_mapped": float(np.mean(mapped))}
    if scores_hit:
        row.update(score_matched_p05=float(np.percentile(scores_hit, 5)), n_unmatched=len(scores_other),
                   score_unmatched_max=float(max(scores_other)) if scores_other else None)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="training images to fit on")
    ap.add_argument("--raw", default="data/raw", help="folder with train.xml (else faces are rendered)")
    ap.add_argument("--min-iou", type=float, default=0.3, help="raw IoU for a detection to pair with a true box")
    ap.add_argument("--n-cnn", type=int, default=300, help="training images for the (slow) CNN detector")
    ap.add_argument("--only", help="comma-separated detectors to refit (default: all that run here)")
    ap.add_argument("--out", default="metrics/bench_box_mapping.json")
    args = ap.parse_args()
    detectors = (["hog", "hog-rotate"] if dlib_available() else []) + (["cnn"] if cnn_available() else []) + ["cascade"]
    if args.only:
        detectors = [d for d in detectors if d in args.only.split(",")]
    old = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).is_file() else {}
    result: dict = {**old, "n": args.n, "n_cnn": args.n_cnn, "min_iou": args.min_iou}
    if "dlib" in result:  # the HOG detector's row before the cascade was named after dlib
        result.setdefault("hog", result.pop("dlib"))
    with tempfile.TemporaryDirectory() as tmp:
        root, records = training_faces(Path(args.raw), max(args.n, args.n_cnn), Path(tmp))
        result["source"] = "raw train.xml" if root == Path(args.raw) else "rendered (params.yaml data.synthetic)"
        for name in detectors:
            result[name] = fit(name, root, records[:args.n_cnn if name == "cnn" else args.n], args.min_iou)
    print(f"{'detector':10s}{'pairs':>7s}{'hit raw':>9s}{'IoU raw':>9s}{'hit map':>9s}{'IoU map':>9s}")
    for name in detectors:
        r = result[name]
        print(f"{name:10s}{sum(r['n_pairs'].values()):7d}{r['hit_rate_raw']:9.3f}{r['mean_iou_raw']:9.3f}"
              f"{r['hit_rate_mapped']:9.3f}{r['mean_iou_mapped']:9.3f}")
    print("\nBOX_MAPPING = {  # paste into src/facemarks/serving/detect.py")
    for name in detectors:
        maps = ", ".join(f"BoxMap({', '.join(f'{v:.4f}' for v in m)})" for m in result[name]["mapping"])
        print(f'    "{name}": ({maps},),')
    print("}")
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
