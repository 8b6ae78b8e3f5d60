"""Inference speed per face: torch eager, torch channels_last, onnxruntime fp32, onnxruntime int8 (both formats) and
dlib's 68-point predictor, batch 1 and 32, in one process on the same faces; whole-photo prediction split per stage
(read, detect, crop, network, decode) vs dlib's detector + predictor; and face detection on a downscaled copy (its
time and its recall cost).

Faces: seeded synthetic faces (:func:`facemarks.data.synthetic.render_face` with ``data.synthetic`` of params.yaml, as in
the pipeline's test split), cropped at the model input size with their true boxes (:func:`facemarks.augmentation.augment.face_crop`).
Model: ``--model`` (a trained ``models/<loss>/model.pt``) when given, else a seeded random-init HeatmapNet of the
default size (``train.head_width``, ``augment.size``): speed does not depend on the weights. It is exported to ONNX in
a temp folder (:func:`facemarks.serving.export.export_onnx`) and quantised there (:func:`facemarks.serving.export.quantize_int8`,
``export.calibration_faces`` crops of other seeded synthetic faces, ``export.calibration``) in both formats, the
``export.format`` one first; ``--int8 PATH`` times that int8 file instead of the first. All run through
:class:`facemarks.serving.runtime.OnnxHeatmaps`.

Ours per face = forward + heatmap decode (``encode.decoder``) on ready crops (:func:`facemarks.serving.inference.time_per_face`;
the ``crop`` row is the cost of cutting one crop); dlib's = its predictor on the original image and box (it crops
internally). Backends alternate within each of ``--rounds`` rounds and the best round is kept, so load from other
processes hurts all alike. Every row is measured at each of ``--threads`` intra-op thread counts (torch's forward and,
for every backend, the torch-based decode; onnxruntime's forward); dlib runs on one thread. Also tries onnxruntime
settings at batch 1 (threads, graph optimisation level, spinning).

Whole photos (``--images`` synthetic photos written as PNG files, plus the first ``--photo-images`` of ``--photos``,
a folder of real photos, ``contact.png`` skipped): per photo ``read`` (:func:`facemarks.core.io.read_image`), ``detect``
(:func:`facemarks.serving.detect.detect` with ``--detector``), ``crop`` (:func:`facemarks.augmentation.augment.face_crop` per face),
``network`` (the model on the photo's crops), ``decode`` (:mod:`facemarks.heatmaps.codec` + mapping back to image px) for fp32
and int8 and each of ``--detectors`` (default: ``auto``, the default of ``facemarks predict``, and dlib's HOG alone,
the like-for-like row), against dlib's ``read`` + ``detect`` (HOG, upsample 1) + ``predict`` per face. The
``predict_image`` rows time :func:`facemarks.serving.predict.predict_image` end to end on decoded images (no read) with the
first detector, as ``facemarks predict`` runs it.

Downscaled detection: dlib's HOG detector on a copy whose long side is at most ``--detect-max-sides`` px (PIL
bilinear; never upscaled), boxes scaled back; ms per photo and recall against the full-size detections (IoU >= 0.5)
on every photo of ``--photos`` (and against the true boxes on the synthetic photos).

Prints a table, writes ``metrics/bench_infer.json`` (with the 1-minute load average before and after).

    PYTHONPATH=src python benchmarks/bench_infer.py [--faces 64] [--images 16] [--rounds 3] [--threads 2,1]
        [--model models/mse/model.pt] [--int8 exports/mse/model.int8.onnx] [--photos ../shared/real-photos]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import torch

from facemarks.serving import detect as detection
from facemarks.evaluation import peers
from facemarks.core import cpuinfo
from facemarks.core.atomic import atomic_write_json
from facemarks.augmentation.crops import face_crop, invert_points
from facemarks.serving.export import QUANT_FORMATS, calibration_sample, export_onnx, quantize_int8
from facemarks.serving.inference import make_codec, predict_heatmaps, time_per_face
from facemarks.core.io import box_iou, list_images, read_image, write_image
from facemarks.training.model import build_model, load_model
from facemarks.core.params import Params, load_params
from facemarks.serving.predict import predict_image
from facemarks.serving.runtime import OnnxHeatmaps, available_cores
from facemarks.data.synthetic import render_face

BATCHES = (1, 32)
GOAL_INT8_MS = 1.0  # int8, batch 1, 2 threads (issue 23)
GOAL_WHOLE_RATIO = 1.2  # whole-photo predict / dlib detector + predictor (issue 23)
STAGES = ("read", "detect", "crop", "network", "decode")
DLIB_STAGES = ("read", "detect", "predict")
SKIP_PHOTOS = ("contact.png",)
ORT_VARIANTS = {  # name -> OnnxHeatmaps kwargs (the first is the default predictor)
    "default (threads=cores, all, spinning)": {},
    "threads=1": {"threads": 1},
    "optimization=basic": {"optimization": "basic"},
    "optimization=disable": {"optimization": "disable"},
    "no spinning": {"spinning": False},
}


def best_ms(fn: Callable[[], object], count: int) -> float:
    """Milliseconds per item of one call of ``fn`` covering ``count`` items (one warm-up call first)."""
    fn()
    start = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - start) / count


def faces(n: int, params: Params, seed: int = 0) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """``n`` seeded synthetic photos uint8 ``(H, W, 3)`` with their true face box ``(l, t, w, h)``."""
    out = []
    for i in range(n):
        image, face = render_face(np.random.default_rng([seed, i]), params.data.synthetic)
        out.append((image, tuple(float(v) for v in face.box)))
    return out


def hog_name() -> str:
    """dlib's HOG detector alone under :mod:`facemarks.serving.detect`'s name for it (``hog``, formerly ``dlib``)."""
    return "hog" if "hog" in detection.DETECTORS else "dlib"


def downscaled(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """``image`` shrunk (PIL bilinear) so that its long side is at most ``max_side``, and the factor (<= 1)."""
    from PIL import Image

    side = max(image.shape[:2])
    if not max_side or side <= max_side:
        return image, 1.0
    f = max_side / side
    h, w = (max(1, round(v * f)) for v in image.shape[:2])
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)), f


def detect_downscaled(image: np.ndarray, max_side: int | None) -> list[tuple[float, float, float, float]]:
    """dlib's HOG faces (mapped boxes, as predict gives the model) found on a copy of long side <= ``max_side``, in
    the full image's px (pixel centres at integers: ``x = (x' + 0.5) / f - 0.5``)."""
    small, f = downscaled(image, max_side)
    out = []
    for d in detection.detect(small, hog_name()):
        left, top, w, h = d.box
        out.append(((left + 0.5) / f - 0.5, (top + 0.5) / f - 0.5, w / f, h / f))
    return out


def recall(reference: list[list[tuple]], found: list[list[tuple]], min_iou: float = 0.5) -> float:
    """Share of the reference boxes (over all photos) overlapped by a found box at IoU >= ``min_iou``."""
    hits = total = 0
    for ref, got in zip(reference, found):
        total += len(ref)
        hits += sum(any(box_iou(r, g) >= min_iou for g in got) for r in ref)
    return hits / total if total else float("nan")


def split_ours(net, files: list[Path], loss: str, *, size: int, margin: float, sigma: float, decoder: str,
               detector: str) -> dict[str, float]:
    """Seconds per stage summed over ``files``: read, detect, crop, network, decode (+ map back)."""
    codec = make_codec(size, sigma)
    t = dict.fromkeys(STAGES, 0.0)
    for path in files:
        t0 = time.perf_counter()
        image = read_image(path)
        t1 = time.perf_counter()
        found = detection.detect(image, detector)
        t2 = time.perf_counter()
        if not found:
            t["read"] += t1 - t0
            t["detect"] += t2 - t1
            continue
        crops, transforms = zip(*(face_crop(image, d.box, size, margin) for d in found))
        crops = np.stack(crops)
        t3 = time.perf_counter()
        heat = predict_heatmaps(net, crops, loss)
        t4 = time.perf_counter()
        points, _ = codec.decode(heat, decoder)
        invert_points(np.asarray(points, np.float64), np.stack(transforms))
        t5 = time.perf_counter()
        for k, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
            t[k] += b - a
    return t


def split_dlib(dlib, files: list[Path]) -> dict[str, float]:
    """Seconds per stage summed over ``files``: read, dlib's HOG detector (upsample 1), dlib's predictor per face."""
    t = dict.fromkeys(DLIB_STAGES, 0.0)
    for path in files:
        t0 = time.perf_counter()
        image = read_image(path)
        t1 = time.perf_counter()
        boxes = dlib.detect(image, 1)
        t2 = time.perf_counter()
        for b in boxes:
            dlib.predict(image, b)
        t3 = time.perf_counter()
        t["read"] += t1 - t0
        t["detect"] += t2 - t1
        t["predict"] += t3 - t2
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=64, help="faces timed per backend (a multiple of 32)")
    parser.add_argument("--images", type=int, default=16, help="synthetic photos for the whole-photo rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default=f"{available_cores()},1",
                        help="intra-op thread counts to measure (torch and onnxruntime; the first is the default)")
    parser.add_argument("--model", help="a trained model.pt (default: random-init HeatmapNet of the default size)")
    parser.add_argument("--int8", help="an int8 .onnx to time (default: the model quantised here, export.format)")
    parser.add_argument("--loss", default="mse")
    parser.add_argument("--size", type=int, help="model input size (default: augment.size of --params)")
    parser.add_argument("--detectors", default=f"auto,{hog_name()}",
                        help="facemarks.serving.detect detectors of the whole-photo split (the first: predict_image rows)")
    parser.add_argument("--photos", default="", help="a folder of real photos (default: none)")
    parser.add_argument("--photo-images", type=int, default=20, help="real photos in the whole-photo rows")
    parser.add_argument("--detect-max-sides", default="1024,800,640,480",
                        help="long sides (px) of the downscaled detection rows")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="metrics/bench_infer.json")
    args = parser.parse_args()
    params = load_params(args.params) if Path(args.params).is_file() else Params()
    size, margin = args.size or params.augment.size, params.augment.margin
    sigma, decoder = params.encode.sigma, params.encode.decoder
    thread_counts = [int(t) for t in dict.fromkeys(args.threads.split(","))]
    max_sides = [int(s) for s in args.detect_max_sides.split(",") if s]
    detectors = list(dict.fromkeys(args.detectors.split(",")))

    if args.model:
        model, model_desc = load_model(args.model), str(args.model)
    else:
        torch.manual_seed(0)
        model = build_model(68, params.train.head_width, params.train.dropout).eval()
        model_desc = f"random-init HeatmapNet (head width {params.train.head_width}, seed 0)"
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    photos = faces(max(args.faces, args.images), params)
    crops = np.stack([face_crop(img, box, size, margin)[0] for img, box in photos[:args.faces]])  # (N, S, S)
    calibration = calibration_sample(np.stack([face_crop(img, box, size, margin)[0] for img, box in faces(
        max(params.export.calibration_faces, 1), params, seed=1)]), params.export.calibration_faces, params.export.seed)
    whole = photos[:args.images]
    dlib = peers.Dlib68() if peers.available() else None
    if dlib is None:
        print(f"bench_infer: no dlib rows: {peers.unavailable_reason()}")
    real_files = ([p for p in list_images(args.photos) if p.name not in SKIP_PHOTOS] if args.photos else [])
    load_before = os.getloadavg()
    rounds: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        rounds.setdefault(name, []).append(value)

    formats = [params.export.format] + [f for f in QUANT_FORMATS if f != params.export.format]
    int8_names = [f"onnxruntime int8 {f}" for f in formats]
    net_names = ("torch eager", "torch channels_last", "onnxruntime", *int8_names)
    detect_rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, args.loss, Path(tmp) / "model.onnx", size)
        int8_paths = {f: quantize_int8(onnx_path, Path(tmp) / f"model.int8.{f}.onnx", calibration, fmt=f,
                                       method=params.export.calibration, seed=params.export.seed) for f in formats}
        if args.int8:
            int8_paths[formats[0]] = Path(args.int8)
        int8_desc = {f: str(p) if args.int8 and f == formats[0] else
                     f"quantised here ({f}, {params.export.calibration}, {len(calibration)} synthetic crops)"
                     for f, p in int8_paths.items()}
        ort = {t: OnnxHeatmaps(onnx_path, threads=t) for t in thread_counts}
        ort8 = {(f, t): OnnxHeatmaps(p, threads=t) for f, p in int8_paths.items() for t in thread_counts}
        variants = {name: OnnxHeatmaps(onnx_path, **{"threads": thread_counts[0], **kw})
                    for name, kw in ORT_VARIANTS.items()}
        synth_dir = Path(tmp) / "photos"
        synth_files = []
        for i, (img, _) in enumerate(whole):
            synth_files.append(synth_dir / f"{i:03d}.png")
            write_image(synth_files[-1], img)
        photo_sets = {"synthetic": synth_files}
        if real_files:
            photo_sets["real"] = real_files[:args.photo_images]
        for _ in range(args.rounds):
            for t in thread_counts:
                torch.set_num_threads(t)  # torch's forward and, for every backend, the decode
                nets = {"torch eager": model, "torch channels_last": channels_last, "onnxruntime": ort[t],
                        **{name: ort8[(f, t)] for name, f in zip(int8_names, formats)}}
                for name, net in nets.items():
                    for b in BATCHES:
                        record(f"{t}|{name}|{b}", time_per_face(net, crops, args.loss, sigma, decoder, b, repeats=1))
                for name, net in (("ours int8", ort8[(formats[0], t)]), ("ours onnxruntime", ort[t]),
                                  ("ours torch", model)):
                    record(f"{t}|whole|{name}", best_ms(lambda: [
                        predict_image(net, img, args.loss, size=size, margin=margin, sigma=sigma, decoder=decoder,
                                      detector=detectors[0]) for img, _ in whole], len(whole)))
                for set_name, files in photo_sets.items():
                    for det in detectors:
                        for name, net in (("int8", ort8[(formats[0], t)]), ("fp32", ort[t])):
                            split = split_ours(net, files, args.loss, size=size, margin=margin, sigma=sigma,
                                               decoder=decoder, detector=det)
                            for k, v in split.items():
                                record(f"{t}|split|{set_name}|{det}|{name}|{k}", 1000 * v / len(files))
            torch.set_num_threads(thread_counts[0])
            for name, rt in variants.items():
                record(f"variant|{name}", time_per_face(rt, crops, args.loss, sigma, decoder, 1, repeats=1))
            record("crop", best_ms(lambda: [face_crop(img, box, size, margin) for img, box in photos[:args.faces]],
                                   args.faces))
            if dlib is not None:  # dlib runs on one thread whatever the settings
                record("dlib", best_ms(lambda: [dlib.predict(img, box) for img, box in photos[:args.faces]],
                                       args.faces))
                record("whole|dlib detector + predictor",
                       best_ms(lambda: [[dlib.predict(img, d) for d in dlib.detect(img, 1)] for img, _ in whole],
                               len(whole)))
                record("whole|dlib detector only", best_ms(lambda: [dlib.detect(img, 1) for img, _ in whole],
                                                           len(whole)))
                for set_name, files in photo_sets.items():
                    for k, v in split_dlib(dlib, files).items():
                        record(f"split|{set_name}|dlib|{k}", 1000 * v / len(files))
        if dlib is not None:  # downscaled detection: time and recall, one pass (every real photo)
            sets = {"synthetic": ([img for img, _ in whole], [[box] for _, box in whole])}
            if real_files:
                images = [read_image(p) for p in real_files]
                sets["real"] = (images, None)
            for set_name, (images, truth) in sets.items():
                full, row = None, {}
                for max_side in [None, *max_sides]:
                    start = time.perf_counter()
                    found = [detect_downscaled(img, max_side) for img in images]
                    ms = 1000 * (time.perf_counter() - start) / len(images)
                    full = found if max_side is None else full
                    key = "full size" if max_side is None else f"long side <= {max_side}"
                    row[key] = {"ms_per_photo": ms, "faces": int(sum(map(len, found))),
                                "recall_vs_full_size": recall(full, found)}
                    if truth is not None:
                        row[key]["recall_vs_true_boxes"] = recall(truth, found)
                detect_rows[set_name] = {"n_photos": len(images), "rows": row}
    best = {k: min(v) for k, v in rounds.items()}

    per_face = {str(t): {name: {f"b{b}": best[f"{t}|{name}|{b}"] for b in BATCHES} for name in net_names}
                for t in thread_counts}
    whole_ms = {str(t): {name: best[f"{t}|whole|{name}"] for name in ("ours int8", "ours onnxruntime", "ours torch")}
                for t in thread_counts}
    split_ms = {str(t): {s: {det: {name: {k: best[f"{t}|split|{s}|{det}|{name}|{k}"] for k in STAGES}
                                   for name in ("int8", "fp32")} for det in detectors}
                         for s in photo_sets} for t in thread_counts}
    for by_set in split_ms.values():
        for by_det in by_set.values():
            for by_name in by_det.values():
                for row in by_name.values():
                    row["total"] = sum(row[k] for k in STAGES)
    dlib_split = {}
    default = str(thread_counts[0])
    ratios = {}
    if dlib is not None:
        dlib_split = {s: {k: best[f"split|{s}|dlib|{k}"] for k in DLIB_STAGES} for s in photo_sets}
        for s in dlib_split:
            dlib_split[s]["total"] = sum(dlib_split[s][k] for k in DLIB_STAGES)
        for t in map(str, thread_counts):
            whole_ms[t].update({k: best[f"whole|{k}"] for k in ("dlib detector + predictor", "dlib detector only")})
            ratios[t] = {f"{name.replace(' ', '_')}_b{b}_over_dlib": per_face[t][name][f"b{b}"] / best["dlib"]
                         for name in ("onnxruntime", int8_names[0]) for b in BATCHES}
            ratios[t].update({"int8_b1_over_fp32_b1": per_face[t][int8_names[0]]["b1"] / per_face[t]["onnxruntime"]["b1"],
                              "predict_image_int8_over_dlib": whole_ms[t]["ours int8"]
                              / best["whole|dlib detector + predictor"],
                              "predict_image_fp32_over_dlib": whole_ms[t]["ours onnxruntime"]
                              / best["whole|dlib detector + predictor"]})
            for s in photo_sets:
                for det in detectors:
                    for name in ("int8", "fp32"):
                        ratios[t][f"whole_photo_{s}_{det}_{name}_over_dlib"] = (split_ms[t][s][det][name]["total"]
                                                                                / dlib_split[s]["total"])
    int8_b1 = per_face[default][int8_names[0]]["b1"]
    load_after = os.getloadavg()

    print(f"inference ms/face (forward + {decoder} decode on ready crops), {size} px, {args.faces} faces, best of "
          f"{args.rounds} rounds, model: {model_desc}; load average {load_before[0]:.1f} -> {load_after[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'backend':40s}" + "".join(f"{'batch ' + str(b):>10s}" for b in BATCHES))
    for t in map(str, thread_counts):
        for name, row in per_face[t].items():
            print(f"{name + ' (' + t + ' threads)':40s}" + "".join(f"{row[f'b{b}']:10.2f}" for b in BATCHES))
    if dlib is not None:
        print(f"{'dlib 68-point predictor (1 thread)':40s}" + f"{best['dlib']:10.2f}" * len(BATCHES))
    print(f"{'crop (face_crop)':40s}{best['crop']:10.2f}")
    print(f"onnxruntime fp32 settings, batch 1, {default} threads unless named:")
    for name in ORT_VARIANTS:
        print(f"  {name:40s}{best[f'variant|{name}']:8.2f}")
    print(f"predict_image (detector {detectors[0]}, decoded images), ms/image over {args.images} synthetic photos:")
    for t in map(str, thread_counts):
        for name, v in whole_ms[t].items():
            print(f"  {name + ' (' + t + ' threads)':48s}{v:8.2f}")
    for t in map(str, thread_counts):
        for s in photo_sets:
            for det in detectors:
                print(f"whole photo split, ms/photo, {s} ({len(photo_sets[s])} photos), detector {det}, {t} threads: "
                      + " | ".join(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in split_ms[t][s][det][name].items())
                                   for name in ("int8", "fp32")))
    for s, row in dlib_split.items():
        print(f"whole photo split, ms/photo, {s}, dlib: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    for s, block in detect_rows.items():
        print(f"dlib HOG detection on a downscaled copy, {s} ({block['n_photos']} photos):")
        for key, r in block["rows"].items():
            print(f"  {key:22s}{r['ms_per_photo']:8.1f} ms  faces {r['faces']:4d}  recall vs full size "
                  f"{r['recall_vs_full_size']:.3f}" + (f"  vs true boxes {r['recall_vs_true_boxes']:.3f}"
                                                       if "recall_vs_true_boxes" in r else ""))
    for t, r in ratios.items():
        print(f"{t} threads: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    two = str(2) if "2" in per_face else default
    goal_int8 = per_face[two][int8_names[0]]["b1"]
    print(f"goal: int8 batch 1 <= {GOAL_INT8_MS} ms/face ({two} threads) and faster than dlib's predictor: "
          f"{goal_int8:.2f} ms" + (f" vs dlib {best['dlib']:.2f}" if dlib is not None else ""))
    atomic_write_json(args.out, {
        "size": size, "decoder": decoder, "loss": args.loss, "model": model_desc, "int8": int8_desc,
        "int8_formats": formats, "calibration": params.export.calibration, "detectors": detectors,
        "faces": args.faces, "images": args.images, "photos": args.photos, "photo_images": len(photo_sets.get("real", [])),
        "rounds": args.rounds, "threads": thread_counts,
        "ms_per_face_by_threads": per_face, "dlib_ms_per_face": best.get("dlib"), "crop_ms_per_face": best["crop"],
        "onnxruntime_b1_variants": {n: best[f"variant|{n}"] for n in ORT_VARIANTS},
        "predict_image_ms_per_image_by_threads": whole_ms,
        "whole_photo_split_ms_by_threads": split_ms, "dlib_whole_photo_split_ms": dlib_split,
        "downscaled_detection": detect_rows, "ratios_by_threads": ratios,
        "goal_int8_ms_per_face": GOAL_INT8_MS, "goal_int8_met": bool(goal_int8 <= GOAL_INT8_MS and (
            dlib is None or goal_int8 < best["dlib"])),
        "goal_whole_photo_ratio": GOAL_WHOLE_RATIO, "int8_b1_default_threads": int8_b1,
        "load_average_1min": [load_before[0], load_after[0]],
        "rounds_ms": rounds, "machine": platform.machine(), "processor": cpuinfo.describe(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
    })


if __name__ == "__main__":
    main()
