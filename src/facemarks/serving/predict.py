"""Whole-image prediction: find the faces (:mod:`facemarks.serving.detect`), crop each, predict 68 points, map them back.

Also which trained model ``facemarks predict`` uses (:func:`choose_model`): the ``winner`` of ``metrics/eval.json``
unless told otherwise. Kept light on purpose: this is the path of ``facemarks predict``, so nothing here imports
MLflow, DVC, matplotlib or the training loop (``tests/test_predict.py`` checks it in a fresh interpreter).

Shapes: ``F`` faces in one image, ``K = 68``; points ``(F, K, 2)`` image px (pixel centres at integer coordinates),
confidence ``(F, K)``; boxes ``(left, top, width, height)`` px in the training-box convention.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from facemarks.augmentation.crops import face_crop, invert_points
from facemarks.serving.detect import Detection, detect
from facemarks.core.hashing import file_sha256
from facemarks.serving.inference import predict_crops
from facemarks.training.model import LOSSES, load_model
from facemarks.serving.runtime import OnnxHeatmaps

DEFAULT_LOSS = "mse"  # used when metrics/eval.json names no winner (and mse was evaluated)


def fallback_loss(losses: Sequence[str] | None) -> str:
    """The loss used when no winner is named: :data:`DEFAULT_LOSS` when it is among ``losses`` (or ``losses`` is
    unknown), else the first of ``losses`` (``train.losses`` without mse)."""
    return DEFAULT_LOSS if not losses or DEFAULT_LOSS in losses else str(losses[0])


@dataclass(frozen=True)
class ModelChoice:
    """The model file ``predict`` loads, the ``loss`` it was trained with, and ``why`` (one line)."""

    path: Path
    loss: str
    why: str


def choose_model(loss: str | None = None, model: str | Path | None = None, eval_json: str | Path = "metrics/eval.json",
                 models_dir: str | Path = "models") -> ModelChoice:
    """Which model to predict with.

    ``--model`` and/or ``--loss`` win when given (``--model`` alone: the loss is its folder name, as in
    ``models/<loss>/model.pt``; else ``ValueError``). Otherwise ``models/<winner>/model.pt`` with the ``winner`` of
    ``eval_json`` (any loss of :data:`facemarks.training.model.LOSSES`, e.g. ``awing``); when that is null (no loss better than
    every other), absent, or the file is missing: ``models/mse``, or the first loss of the report's ``losses`` when
    it has no mse (:func:`fallback_loss`).
    """
    if model is not None:
        path = Path(model)
        if loss is None:
            if path.parent.name not in LOSSES:
                raise ValueError(f"--model {path}: cannot tell which loss it was trained with from its folder; "
                                 f"pass --loss {{{','.join(LOSSES)}}}")
            return ModelChoice(path, path.parent.name, f"--model (loss {path.parent.name} from its folder name)")
        return ModelChoice(path, loss, "--model and --loss given")
    if loss is not None:
        return ModelChoice(Path(models_dir) / loss / "model.pt", loss, "--loss given")
    path = Path(eval_json)
    if not path.is_file():
        why = f"no {path} (evaluate has not run): {DEFAULT_LOSS} by default"
        return ModelChoice(Path(models_dir) / DEFAULT_LOSS / "model.pt", DEFAULT_LOSS, why)
    report = json.loads(path.read_text(encoding="utf-8"))
    winner = report.get("winner")
    losses = report.get("losses") if isinstance(report.get("losses"), list) else None
    default = fallback_loss(losses)
    if winner in LOSSES:
        why = f"winner in {path}"
        margin = report.get("winner_margin_nme")
        if isinstance(margin, (int, float)):
            why += f" (lower test NME by {margin:.2f} points)"
        return ModelChoice(Path(models_dir) / winner / "model.pt", winner, why)
    why = (f"{path} names no winner (not conclusive): {default} by default" if "winner" in report and winner is None
           else f"{path} has no valid winner ({winner!r}): {default} by default")
    return ModelChoice(Path(models_dir) / default / "model.pt", default, why)


def best_decoder(loss: str, default: str, eval_json: str | Path = "metrics/eval.json") -> str:
    """The ``best_decoder`` of ``loss`` in ``eval_json``, else ``default``."""
    path = Path(eval_json)
    if path.is_file():
        entry = json.loads(path.read_text(encoding="utf-8")).get(loss)
        if isinstance(entry, dict) and isinstance(entry.get("best_decoder"), str):
            return entry["best_decoder"]
    return default


BACKENDS = ("auto", "onnx-int8", "onnx", "torch")


def _exported_from(runtime: OnnxHeatmaps, model_pt: Path) -> bool:
    return model_pt.is_file() and runtime.metadata.get("source_sha256") == file_sha256(model_pt)


def load_predictor(choice: ModelChoice, backend: str = "auto", exports_dir: str | Path = "exports",
                   decoder: str | None = None) -> tuple[torch.nn.Module | OnnxHeatmaps, str, str]:
    """The model to predict with: ``(torch module or OnnxHeatmaps, backend "onnx-int8" | "onnx" | "torch", why
    (one line))``.

    ``choice.path`` may be a ``model.pt`` or an exported ``.onnx`` (fp32 or int8, told apart by its metadata). For a
    ``.pt``: ``onnx`` runs its exported twin ``<exports_dir>/<loss>/model.onnx``, ``onnx-int8`` its quantised twin
    ``<exports_dir>/<loss>/model.int8.onnx`` (stage ``export``; run even when its accuracy guard failed, which
    ``why`` then says). ``auto`` (the default) takes the first of: the int8 twin when it was exported from this very
    file (``source_sha256`` in its metadata) *and* its accuracy guard passed (``int8_check`` in its metadata, or for
    the ``decoder`` predict decodes with: :meth:`facemarks.serving.runtime.OnnxHeatmaps.int8_passed_for`); the fp32 twin when it was exported from this file; the
    ``.pt`` on torch. ``FileNotFoundError`` when the file an explicit backend needs is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: allowed {', '.join(BACKENDS)}")
    if choice.path.suffix == ".onnx":
        if backend == "torch":
            raise ValueError(f"--backend torch needs a model.pt, got {choice.path}")
        runtime = OnnxHeatmaps(choice.path)
        if runtime.precision == "int8":
            verdict = "accuracy guard passed" if runtime.int8_passed_for(decoder) else "accuracy guard NOT passed"
            return runtime, "onnx-int8", f"an exported int8 .onnx model ({verdict})"
        if backend == "onnx-int8":
            raise ValueError(f"--backend onnx-int8: {choice.path} is not an int8 model")
        return runtime, "onnx", "an exported .onnx model"
    folder = Path(exports_dir) / choice.loss
    twin, twin8 = folder / "model.onnx", folder / "model.int8.onnx"
    if backend == "onnx-int8":
        runtime = OnnxHeatmaps(twin8)  # FileNotFoundError names `dvc repro export`
        note = "" if runtime.int8_passed_for(decoder) else " (its accuracy guard did NOT pass: metrics/export.json)"
        return runtime, "onnx-int8", f"--backend onnx-int8: {twin8}{note}"
    notes = []
    if backend == "auto" and twin8.is_file():
        runtime = OnnxHeatmaps(twin8)
        if not _exported_from(runtime, choice.path):
            notes.append(f"{twin8} was not exported from {choice.path}")
        elif runtime.saturates_here:
            notes.append(f"{twin8} has 8-bit weights, which saturate on this CPU without VNNI (docs/deploy.md)")
        elif not runtime.int8_passed_for(decoder):
            notes.append(f"{twin8} did not pass its accuracy guard (metrics/export.json)")
        else:
            passed = "" if runtime.int8_passed else f" for the {decoder} decoder"
            return runtime, "onnx-int8", f"{twin8}, exported from {choice.path}, accuracy guard passed{passed}"
    if backend == "onnx" or (backend == "auto" and twin.is_file()):
        runtime = OnnxHeatmaps(twin)  # FileNotFoundError names `dvc repro export`
        if backend == "onnx":
            return runtime, "onnx", f"--backend onnx: {twin}"
        if _exported_from(runtime, choice.path):
            return runtime, "onnx", "; ".join(notes + [f"{twin}, exported from {choice.path}"])
        notes.append(f"{twin} was not exported from {choice.path} (run: dvc repro export)")
    else:
        notes.append("no exported model" if backend == "auto" else "--backend torch")
    return load_model(choice.path), "torch", "; ".join(notes)


def predict_boxes(model: torch.nn.Module | OnnxHeatmaps, image: np.ndarray, boxes: Sequence[Sequence[float]],
                  loss: str, *, size: int, margin: float = 0.25, sigma: float = 1.5, decoder: str = "subpixel",
                  device: str | torch.device = "cpu", flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The faces in ``boxes`` ``(F, 4)`` of ``image`` (H, W[, 3]) uint8 → points ``(F, K, 2)`` image px, confidence
    ``(F, K)`` (:func:`predict_many` for one image)."""
    return predict_many(model, [(image, boxes)], loss, size=size, margin=margin, sigma=sigma, decoder=decoder,
                        device=device, flip=flip)[0]


def predict_many(model: torch.nn.Module | OnnxHeatmaps, items: Sequence[tuple[np.ndarray, Sequence[Sequence[float]]]],
                 loss: str, *, size: int, margin: float = 0.25, sigma: float = 1.5, decoder: str = "subpixel", batch_size: int = 64,
                 device: str | torch.device = "cpu", flip: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """``items``: ``(image, boxes (F_i, 4))`` pairs → per item, points ``(F_i, K, 2)`` image px and confidence
    ``(F_i, K)``. Each face is cropped with :func:`facemarks.augmentation.augment.face_crop` at ``size`` with ``margin``, all crops
    are predicted in batches of ``batch_size`` (``flip``: flip test-time augmentation, :func:`facemarks.serving.inference.predict_heatmaps`),
    and points are mapped back with :func:`facemarks.augmentation.augment.invert_points`."""
    crops, transforms, counts = [], [], []
    for image, boxes in items:
        for b in boxes:
            crop, T = face_crop(image, tuple(float(v) for v in b), size, margin)
            crops.append(crop)
            transforms.append(T)
        counts.append(len(boxes))
    if not crops:
        return [(np.zeros((0, 68, 2)), np.zeros((0, 68), np.float32)) for _ in counts]
    points, conf, _ = predict_crops(model, np.stack(crops), loss, sigma, decoder, batch_size, device, flip)
    points = np.asarray(invert_points(points, np.stack(transforms)), np.float64)
    ends = np.cumsum(counts)
    return [(points[e - n:e], conf[e - n:e]) for n, e in zip(counts, ends)]


def predict_image(model: torch.nn.Module | OnnxHeatmaps, image: np.ndarray, loss: str, box: tuple | None = None, *,
                  size: int, margin: float = 0.25, sigma: float = 1.5, decoder: str = "subpixel",
                  device: str | torch.device = "cpu", detector: str = "auto",
                  flip: bool = False) -> list[dict[str, Any]]:
    """Predict every face of an image (or the one in ``box``): ``[{"box", "points" (K, 2) image px, "confidence"
    (K,), "landmark_confidence", "detector", "rotation", "scale", "merged", "score", "detector_box"}]``; ``[]`` when
    no face is found.

    Faces come from :func:`facemarks.serving.detect.detect` with ``detector`` (boxes mapped to the training convention,
    overlapping detections of one face merged); a given ``box`` is used as-is (``detector`` ``"given"``, ``score``
    None). ``landmark_confidence`` is the mean of the model's per-point confidence (heatmap peak: a false positive
    scores low). Order: :func:`face_rank` (box side × landmark confidence), highest first. ``flip``: flip test-time
    augmentation (:func:`facemarks.serving.inference.predict_heatmaps`; ``evaluate.flip_test``).
    """
    if box is not None:
        b = tuple(float(v) for v in box)
        found = [Detection(b, None, "given", b)]  # type: ignore[arg-type]
    else:
        found = detect(image, detector)
    points, conf = predict_boxes(model, image, [d.box for d in found], loss, size=size, margin=margin, sigma=sigma,
                                 decoder=decoder, device=device, flip=flip)
    faces = [{"box": [float(v) for v in d.box], "points": points[i], "confidence": conf[i],
              "landmark_confidence": float(np.mean(conf[i])), "detector": d.detector, "rotation": float(d.rotation),
              "merged": list(d.merged), "score": d.score, "detector_box": [float(v) for v in d.raw_box],
              "scale": float(d.scale)}
             for i, d in enumerate(found)]
    return sorted(faces, key=face_rank, reverse=True)  # stable: ties keep the detector's order


def face_rank(face: dict[str, Any]) -> float:
    """The order of :func:`predict_image`'s faces: box side (px, ``sqrt(w·h)``) × landmark confidence — the large,
    clearly drawn main face first, a small or doubtful detection last; the same rule for every detector (their own
    scores are not on one scale)."""
    w, h = face["box"][2], face["box"][3]
    return float(np.sqrt(max(w * h, 0.0)) * face["landmark_confidence"])


def face_to_json(face: dict[str, Any]) -> dict[str, Any]:
    """A :func:`predict_image` face as plain JSON types (points as ``[[x, y], ...]`` image px; ``rotation``: degrees
    counter-clockwise of the image copy the detector found the face on, 0 = the image itself; ``scale``: that copy's
    resize factor, e.g. the CNN's downscaled copy, 1 = the image itself; ``merged``: the other
    detectors that found the same face, e.g. ``["cnn", "hog@30"]``)."""
    out = {"box": [round(float(v), 2) for v in face["box"]],
           "points": np.round(np.asarray(face["points"], np.float64), 3).tolist(),
           "confidence": np.round(np.asarray(face["confidence"], np.float64), 4).tolist()}
    if "landmark_confidence" in face:
        out["landmark_confidence"] = float(f"{float(face['landmark_confidence']):.6g}")  # 6 digits: it orders the faces
    if "detector" in face:
        score = face.get("score")
        out.update(detector=face["detector"], rotation=float(face.get("rotation", 0.0)),
                   scale=round(float(face.get("scale", 1.0)), 4),
                   merged=list(face.get("merged", [])), score=None if score is None else round(float(score), 4),
                   detector_box=[round(float(v), 2) for v in face.get("detector_box", face["box"])])
    return out
