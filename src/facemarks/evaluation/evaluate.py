"""Everything the ``evaluate`` stage computes, as one call: :func:`evaluate` → :class:`Outputs` (the stage writes them).

The test split at every decoder against the mean shape and dlib; every pair of losses compared on the same faces;
the one real-photo protocol (:mod:`facemarks.evaluation.real_photos`: ``evaluate.photos``, else the bundled
portraits) whose references also give the astronaut figure and the astronaut row of the detection report; the face
detectors on the test images (and, with ``evaluate.photos``, every detector setting on that folder, narrowed by the
same ``evaluate.photos_glob``).

Shapes: ``N`` test faces, ``F`` real-photo faces; points ``(N, 68, 2)`` / ``(F, 68, 2)`` original px; per-face NME
``(N,)`` / ``(F,)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from facemarks.core.io import photo_files, read_dlib_xml
from facemarks.core.params import Evaluate, Params
from facemarks.core.store import Split, read_split
from facemarks.core.timings import split_timings
from facemarks.data.teacher import check_no_overlap, teacher_mask, training_photo_hashes
from facemarks.evaluation import detect_eval, peers, real_photos, testset
from facemarks.evaluation.metrics import ced_csv
from facemarks.evaluation.stats import loss_comparison
from facemarks.heatmaps.codec import DECODERS
from facemarks.serving import detect
from facemarks.serving.inference import time_per_face
from facemarks.serving.predict import fallback_loss
from facemarks.serving.runtime import OnnxHeatmaps
from facemarks.training.model import load_model

# wall clock, per model row: timings/evaluate.json (untracked) and MLflow, not metrics/eval.json
EVAL_TIMINGS = ("ms_per_face_b1", "ms_per_face_batched", "ms_per_face",
                "onnx_ms_per_face_b1", "onnx_ms_per_face_batched")


@dataclass(frozen=True)
class Crop:
    """How a face is cropped and decoded, read once from the test split: crop ``size`` px, ``margin`` around the
    box, heatmap ``sigma`` (the arguments every real-image prediction takes, :func:`facemarks.serving.predict.predict_many`)."""

    size: int
    margin: float
    sigma: float

    @classmethod
    def of(cls, split: Split, sigma: float) -> Crop:
        return cls(int(split.meta["size"]), float(split.meta.get("augment", {}).get("margin", 0.25)), float(sigma))

    def kw(self, decoder: str | None = None) -> dict[str, Any]:
        """Keyword arguments ``size``, ``margin``, ``sigma`` (and ``decoder`` when given)."""
        out: dict[str, Any] = {"size": self.size, "margin": self.margin, "sigma": self.sigma}
        return out if decoder is None else {**out, "decoder": decoder}


@dataclass
class Outputs:
    """What the stage writes: ``quality`` → metrics/eval.json, ``timing`` → timings/evaluate.json, ``arrays`` →
    data/eval/predictions.npz, ``ced`` → metrics/ced.csv, ``photos_csv`` → metrics/photos.csv, ``detection`` →
    metrics/detect.json, ``detect_timing`` → timings/detect.json; ``report`` is ``quality`` with the timings."""

    report: dict[str, Any]
    quality: dict[str, Any]
    timing: dict[str, Any]
    arrays: dict[str, np.ndarray]
    ced: str
    photos_csv: str
    detection: dict[str, Any]
    detect_timing: dict[str, float]


def preflight(ev: Evaluate, raw: str = "data/raw") -> None:
    """Before any work: the real-photo folder exists, holds images (narrowed by ``evaluate.photos_glob``), and none of
    them is a training photo (:class:`facemarks.core.io.PhotosError` / :class:`facemarks.core.io.DataError`)."""
    if ev.photos:
        check_no_overlap(photo_files(ev.photos, ev.photos_glob), training_photo_hashes(raw))


def evaluate(params: Params, device: torch.device) -> Outputs:
    """The whole evaluation of ``models/<loss>/model.pt`` for each loss of ``train.losses`` (module docstring)."""
    ev, sigma, losses = params.evaluate, params.encode.sigma, params.train.losses
    test, train = read_split("data/augmented/test"), read_split("data/augmented/train")
    crop = Crop.of(test, sigma)
    report: dict[str, Any] = {"losses": list(losses)}
    arrays: dict[str, np.ndarray] = {"gt": np.asarray(test.orig_points), "sigma": np.float64(sigma)}
    models = {loss: load_model(f"models/{loss}/model.pt", device) for loss in losses}
    for loss in losses:
        report[loss], out = testset.evaluate_loss(models[loss], test, loss, sigma, ev.threshold, ev.batch_size,
                                                  ev.speed_faces, device, flip=ev.flip_test)
        arrays.update({f"{k}_{loss}": v for k, v in out.items()})
        # the same crops and decoder on onnxruntime (stage export's file), timed next to torch (timings only)
        onnx, best = OnnxHeatmaps(f"exports/{loss}/model.onnx"), report[loss]["best_decoder"]
        timed = np.asarray(test.images[:ev.speed_faces])
        report[loss].update(onnx_ms_per_face_b1=time_per_face(onnx, timed, loss, sigma, best, 1),
                            onnx_ms_per_face_batched=time_per_face(onnx, timed, loss, sigma, best, ev.batch_size))
    report["mean_shape"], arrays["nme_mean_shape"] = testset.baseline_rows(train, test, ev.threshold)
    notice = peers.notice(ev.peers)
    if notice is None:
        report["dlib68"], arrays["points_dlib68"], arrays["nme_dlib68"] = testset.dlib_row(test, "data/raw",
                                                                                           ev.threshold)
    else:
        print(f"evaluate: no dlib68 row: {notice}")
    report["roundtrip"] = testset.roundtrip_summary(test, sigma)
    # every pair of losses per test face, every decoder; headline: each loss at its best decoder
    report["comparison"] = loss_comparison(
        {loss: {d: arrays[f"nme_{d}_{loss}"] for d in DECODERS} for loss in losses},
        {loss: report[loss]["best_decoder"] for loss in losses}, seed=params.base.seed)
    # a loss only when it beats every other with 95 % intervals excluding 0, else None (JSON null)
    winner = report["comparison"]["winner"]
    leader = winner or min(losses, key=lambda name: report[name]["nme_io"])  # lower mean NME: shown in the figures
    report.update(winner=winner, leader=leader)

    portraits = None
    if notice is None:
        report["photos"], photos_csv, portraits = photos_block(models, report, ev, crop, params.base.seed, arrays)
    else:  # the dlib notice was printed once already
        report["photos"], photos_csv = {"skipped": notice}, "file,face,reference,box_source\n"
        report["astronaut"] = {"found": False, "skipped": notice}
    report["test_reference"] = test_references(test)

    # face detection quality per detector (metrics/detect.json), with the model `facemarks predict` uses by default
    chosen = report["winner"] or fallback_loss(losses)
    detection, detect_timing = testset.detection_report(
        models[chosen], chosen, read_dlib_xml("data/raw/test.xml"), "data/raw", **crop.kw(report[chosen]["best_decoder"]),
        max_images=ev.detect_images, portraits=portraits)
    if ev.photos:  # every detector setting of `facemarks predict` on the real-photo folder (detect_eval)
        detection["photos"], photo_timing = detect_photos(ev, models[chosen], chosen,
                                                          **crop.kw(report[chosen]["best_decoder"]))
        detect_timing.update({f"photos.{k}": v for k, v in photo_timing.items()})

    errors = {name: arrays[f"nme_{name}"] for name in (*losses, "dlib68") if f"nme_{name}" in arrays}
    quality, timing = split_timings(report, [f"{name}.{key}" for name in (*losses, "dlib68") for key in EVAL_TIMINGS])
    return Outputs(report, quality, timing, arrays, ced_csv(errors, ev.threshold), photos_csv, detection, detect_timing)


def photos_block(models: dict, report: dict, ev: Evaluate, crop: Crop, seed: int,
                 arrays: dict) -> tuple[dict, str, real_photos.PhotoSet]:
    """The real-photo evaluation (``evaluate.photos``; empty: the bundled portraits) of every loss at its best test
    decoder: the ``photos`` block of ``metrics/eval.json`` and the per-face CSV (``metrics/photos.csv``); the per-face
    arrays, the worst faces and the astronaut figure's arrays go into ``arrays``, the astronaut summary into
    ``report["astronaut"]`` — from the same references (cached by image hash). Returns the block, the CSV and the
    bundled portraits' :class:`facemarks.evaluation.real_photos.PhotoSet` (the detection report's astronaut box)."""
    decoders = {loss: report[loss]["best_decoder"] for loss in models}
    portraits = real_photos.photo_set(None, cache=real_photos.PHOTO_CACHE)
    photos = real_photos.photo_set(ev.photos, ev.photos_glob, cache=real_photos.PHOTO_CACHE) if ev.photos else portraits
    block, csv_text, photo_arrays = real_photos.evaluate_photos(models, decoders, photos, **crop.kw(),
                                                                flip=ev.flip_test, seed=seed)
    arrays.update(photo_arrays)
    leader = report["leader"]
    points = photo_arrays[f"photos_points_{leader}"] if photos is portraits else real_photos.predict_faces(
        models[leader], leader, portraits, **crop.kw(decoders[leader]), flip=ev.flip_test)
    report["astronaut"], astro = testset.astronaut(portraits, points, leader)
    arrays.update(astro)
    return block, csv_text, portraits


def detect_photos(ev: Evaluate, model, loss: str, **kw) -> tuple[dict, dict]:
    """The ``photos`` block of ``metrics/detect.json`` (:func:`facemarks.evaluation.detect_eval.photo_report` on the
    photos of ``evaluate.photos`` narrowed by ``evaluate.photos_glob``) and its timings; without dlib's CNN model
    (the peers extra) a one-line ``skipped``."""
    if not detect.cnn_available():
        print("evaluate: no photos block in metrics/detect.json: dlib's CNN face detector is not installed")
        return {"skipped": "dlib's CNN face detector (peers extra) is not installed"}, {}
    return detect_eval.photo_report(ev.photos, model, loss, pattern=ev.photos_glob, **kw)


def test_references(test: Split) -> dict[str, int]:
    """How many test faces carry which reference: ``teacher`` (dlib's points, data.source = photos: their NME is
    "from dlib's points") and ``ground_truth`` (markup or the synthetic generator's exact points)."""
    files = test.meta.get("files", [])
    taught = int(teacher_mask("data/raw", files).sum()) if len(files) == len(test.boxes) else 0
    return {"teacher": taught, "ground_truth": int(len(test.boxes)) - taught}


def summary_lines(out: Outputs) -> list[str]:
    """What the stage prints: each loss's test NME, AUC and FR, the real photos, the detectors, the verdict."""
    report, lines = out.report, []
    for name in (*report["losses"], "mean_shape", "dlib68"):
        if name in report:
            r = report[name]
            lines.append(f"evaluate: {name:10s} NME {r['nme_io']:.3f}% (io)  AUC {r['auc']:.3f}  FR {r['fr']:.3f}")
    block = report.get("photos", {})
    for loss in report["losses"]:
        if isinstance(block.get(loss), dict) and block[loss].get("median") is not None:
            r = block[loss]
            lines.append(f"evaluate: photos {loss:6s} median {r['median']:.2f} %  mean {r['mean']:.2f} %  above 10 % "
                         f"{r['share_above_10']:.3f} ({block['n_faces']} faces of {block['n_images']} images, "
                         f"references {block['references']}, false faces dropped {block['false_faces_dropped']})")
    for name, row in out.detection["synthetic_test"].items():
        lines.append(f"evaluate: detector {name:8s} hits {row['hit_rate']:.3f} (IoU >= {out.detection['hit_iou']}), "
                     f"FP/image {row['fp_per_image']:.3f}, mean IoU {row['mean_iou']:.3f}; NME own / true box "
                     f"{row.get('nme_own_box', float('nan')):.2f} / {row.get('nme_true_box', float('nan')):.2f} %")
    astro = report.get("astronaut", {})
    said = (f"astronaut ({astro['loss']}) NME vs the reference {astro['nme_vs_dlib']:.2f} %" if astro.get("found")
            else "no astronaut reference")
    lines.append(f"evaluate: {report['comparison']['verdict']}; {said}")
    return lines
