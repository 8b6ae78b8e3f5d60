"""Inference speed per face: torch eager, torch channels_last, onnxruntime and dlib's 68-point predictor, batch 1 and
32, in one process on the same faces; and whole-image prediction (detection + landmarks) vs dlib's detector + predictor.

Faces: seeded synthetic faces (:func:`facemarks.synthetic.render_face` with ``data.synthetic`` of params.yaml, as in
the pipeline's test split), cropped at the model input size with their true boxes (:func:`facemarks.augment.face_crop`).
Model: ``--model`` (a trained ``models/<loss>/model.pt``) when given, else a seeded random-init HeatmapNet of the
default size (``train.head_width``, ``augment.size``): speed does not depend on the weights. It is exported to ONNX in
a temp folder (:func:`facemarks.export.export_onnx`) and run by :class:`facemarks.runtime.OnnxHeatmaps`.

Ours per face = forward + heatmap decode (``encode.decoder``) on ready crops (:func:`facemarks.inference.time_per_face`;
the ``crop`` row is the cost of cutting one crop); dlib's = its predictor on the original image and box (it crops
internally). Whole image = :func:`facemarks.predict.predict_image` (dlib's HOG detector when dlib imports, then
landmarks) vs ``Dlib68.detect`` + ``Dlib68.predict`` per face. Backends alternate within each of ``--rounds`` rounds and
the best round is kept, so load from other processes hurts all alike. Every row is measured at each of ``--threads``
intra-op thread counts (torch's forward and, for every backend, the torch-based decode; onnxruntime's forward); dlib
runs on one thread. Also tries onnxruntime settings at batch 1 (threads, graph optimisation level, spinning). Prints
a table, writes ``metrics/bench_infer.json``.

    PYTHONPATH=src python benchmarks/bench_infer.py [--faces 64] [--images 16] [--rounds 3] [--threads 2,1]
                                                    [--model models/mse/model.pt]
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

from facemarks import peers
from facemarks.atomic import atomic_write_json
from facemarks.augment import face_crop
from facemarks.export import export_onnx
from facemarks.inference import time_per_face
from facemarks.model import build_model, load_model
from facemarks.params import Params, load_params
from facemarks.predict import predict_image
from facemarks.runtime import OnnxHeatmaps, available_cores
from facemarks.synthetic import render_face

BATCHES = (1, 32)
GOAL_MS = 2.5  # onnxruntime, batch 1, default input size
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=64, help="faces timed per backend (a multiple of 32)")
    parser.add_argument("--images", type=int, default=16, help="photos for the whole-image rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default=f"{available_cores()},1",
                        help="intra-op thread counts to measure (torch and onnxruntime; the first is the default)")
    parser.add_argument("--model", help="a trained model.pt (default: random-init HeatmapNet of the default size)")
    parser.add_argument("--loss", default="mse", choices=("mse", "bce"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="metrics/bench_infer.json")
    args = parser.parse_args()
    params = load_params(args.params) if Path(args.params).is_file() else Params()
    size, margin = params.augment.size, params.augment.margin
    sigma, decoder = params.encode.sigma, params.encode.decoder
    thread_counts = [int(t) for t in dict.fromkeys(args.threads.split(","))]

    if args.model:
        model, model_desc = load_model(args.model), str(args.model)
    else:
        torch.manual_seed(0)
        model = build_model(68, params.train.head_width, params.train.dropout).eval()
        model_desc = f"random-init HeatmapNet (head width {params.train.head_width}, seed 0)"
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    photos = faces(max(args.faces, args.images), params)
    crops = np.stack([face_crop(img, box, size, margin)[0] for img, box in photos[:args.faces]])  # (N, S, S)
    whole = photos[:args.images]
    dlib = peers.Dlib68() if peers.available() else None
    if dlib is None:
        print(f"bench_infer: no dlib rows: {peers.unavailable_reason()}")
    load_before = os.getloadavg()
    rounds: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        rounds.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, args.loss, Path(tmp) / "model.onnx", size)
        ort = {t: OnnxHeatmaps(onnx_path, threads=t) for t in thread_counts}
        variants = {name: OnnxHeatmaps(onnx_path, **{"threads": thread_counts[0], **kw})
                    for name, kw in ORT_VARIANTS.items()}
        for _ in range(args.rounds):
            for t in thread_counts:
                torch.set_num_threads(t)  # torch's forward and, for every backend, the decode
                for name, net in (("torch eager", model), ("torch channels_last", channels_last),
                                  ("onnxruntime", ort[t])):
                    for b in BATCHES:
                        record(f"{t}|{name}|{b}", time_per_face(net, crops, args.loss, sigma, decoder, b, repeats=1))
                for name, net in (("ours onnxruntime", ort[t]), ("ours torch", model)):
                    record(f"{t}|whole|{name}", best_ms(lambda: [
                        predict_image(net, img, args.loss, size=size, margin=margin, sigma=sigma, decoder=decoder)
                        for img, _ in whole], len(whole)))
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
    best = {k: min(v) for k, v in rounds.items()}

    per_face = {str(t): {name: {f"b{b}": best[f"{t}|{name}|{b}"] for b in BATCHES}
                         for name in ("torch eager", "torch channels_last", "onnxruntime")} for t in thread_counts}
    whole_ms = {str(t): {name: best[f"{t}|whole|{name}"] for name in ("ours onnxruntime", "ours torch")}
                for t in thread_counts}
    default = str(thread_counts[0])
    ort_b1 = per_face[default]["onnxruntime"]["b1"]
    ratios = {}
    if dlib is not None:
        for t in map(str, thread_counts):
            whole_ms[t].update({k: best[f"whole|{k}"] for k in ("dlib detector + predictor", "dlib detector only")})
            ratios[t] = {"onnxruntime_b1_over_dlib": per_face[t]["onnxruntime"]["b1"] / best["dlib"],
                         "onnxruntime_b32_over_dlib": per_face[t]["onnxruntime"]["b32"] / best["dlib"],
                         "whole_image_ours_onnxruntime_over_dlib": whole_ms[t]["ours onnxruntime"]
                         / best["whole|dlib detector + predictor"]}

    print(f"inference ms/face (forward + {decoder} decode on ready crops), {size} px, {args.faces} faces, best of "
          f"{args.rounds} rounds, model: {model_desc}; load average {load_before[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'backend':34s}" + "".join(f"{'batch ' + str(b):>10s}" for b in BATCHES))
    for t in map(str, thread_counts):
        for name, row in per_face[t].items():
            print(f"{name + ' (' + t + ' threads)':34s}" + "".join(f"{row[f'b{b}']:10.2f}" for b in BATCHES))
    if dlib is not None:
        print(f"{'dlib 68-point predictor (1 thread)':34s}" + f"{best['dlib']:10.2f}" * len(BATCHES))
    print(f"{'crop (face_crop)':34s}{best['crop']:10.2f}")
    print(f"onnxruntime settings, batch 1, {default} threads unless named:")
    for name in ORT_VARIANTS:
        print(f"  {name:40s}{best[f'variant|{name}']:8.2f}")
    print(f"whole image (detection + landmarks), ms/image over {args.images} photos:")
    for t in map(str, thread_counts):
        for name, v in whole_ms[t].items():
            print(f"  {name + ' (' + t + ' threads)':48s}{v:8.2f}")
    for t, r in ratios.items():
        print(f"{t} threads: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    print(f"goal: onnxruntime batch 1 <= {GOAL_MS} ms/face ({default} threads): "
          f"{'met' if ort_b1 <= GOAL_MS else 'missed'} ({ort_b1:.2f})")
    atomic_write_json(args.out, {
        "size": size, "decoder": decoder, "loss": args.loss, "model": model_desc, "faces": args.faces,
        "images": args.images, "rounds": args.rounds, "threads": thread_counts,
        "ms_per_face_by_threads": per_face, "dlib_ms_per_face": best.get("dlib"), "crop_ms_per_face": best["crop"],
        "onnxruntime_b1_variants": {n: best[f"variant|{n}"] for n in ORT_VARIANTS},
        "whole_image_ms_per_image_by_threads": whole_ms, "ratios_by_threads": ratios, "goal_ms_per_face": GOAL_MS,
        "goal_met": ort_b1 <= GOAL_MS, "load_average_1min": [load_before[0], os.getloadavg()[0]],
        "rounds_ms": rounds, "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
    })


if __name__ == "__main__":
    main()
