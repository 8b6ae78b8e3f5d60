"""Running a trained heatmap model: crops → heatmaps → points, face detection and whole-image prediction.

Shapes: ``N`` crops, ``K = 68`` keypoints, crops uint8 ``(N, S, S)``, heatmaps float32 ``(N, K, h, w)`` with
``h = w = S / 4``, points ``(N, K, 2)`` in crop px, confidence ``(N, K)``. Boxes ``(left, top, width, height)`` px.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from facemarks.codec import HeatmapCodec
from facemarks.model import STRIDE, images_to_tensor, outputs_to_heatmaps

# The 300-W boxes in dlib's XML come from dlib's HOG detector. On scikit-image's astronaut photo the cascade box is
# (174, 69, 97, 97) and dlib's (175, 76, 91, 91): shift (dx, dy) and scale relative to the cascade box side.
CASCADE_TO_DLIB = (-0.02, 0.04, 0.94)


@torch.inference_mode()
def predict_heatmaps(model: torch.nn.Module, images: np.ndarray, loss: str, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 crops ``(N, S, S)`` → heatmaps float32 ``(N, K, S/4, S/4)`` in target units (sigmoid for ``bce``)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images_to_tensor(np.array(images[i:i + batch_size])).to(device)
        out.append(outputs_to_heatmaps(model(x), loss).float().cpu().numpy())
    if not out:
        raise ValueError("predict_heatmaps: no images given")
    return np.concatenate(out)


def make_codec(input_size: int, sigma: float) -> HeatmapCodec:
    """The codec for a model with input side ``input_size`` (maps are ``input_size / STRIDE``)."""
    return HeatmapCodec(input_size, input_size // STRIDE, sigma)


def predict_crops(model: torch.nn.Module, images: np.ndarray, loss: str, sigma: float, decoder: str = "subpixel",
                  batch_size: int = 64, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 crops ``(N, S, S)`` → points ``(N, K, 2)`` crop px, confidence ``(N, K)``, heatmaps ``(N, K, h, w)``."""
    heat = predict_heatmaps(model, images, loss, batch_size, device)
    points, conf = make_codec(images.shape[-1], sigma).decode(heat, decoder)
    return np.asarray(points, np.float64), np.asarray(conf, np.float32), heat


def time_per_face(model: torch.nn.Module, images: np.ndarray, loss: str, sigma: float, decoder: str,
                  batch_size: int, device: str | torch.device = "cpu", repeats: int = 3) -> float:
    """Milliseconds per face of :func:`predict_crops` (forward + decode) at ``batch_size``: one warm-up batch, then
    the best of ``repeats`` passes over ``images`` (the least disturbed by other load on the machine)."""
    predict_crops(model, images[:batch_size], loss, sigma, decoder, batch_size, device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict_crops(model, images, loss, sigma, decoder, batch_size, device)
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / len(images)


# ------------------------------------------------------------------------------------------------ detection
def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` → uint8 ``(H, W)`` (ITU-R 601 luma)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.uint8, copy=False)
    if image.ndim == 3 and image.shape[2] >= 3:
        luma = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    raise ValueError(f"to_gray: expected (H, W) or (H, W, 3) image, got {image.shape}")


def detect_faces(image: np.ndarray, min_size: int = 48, keep: float = 0.6) -> list[tuple[float, float, float, float]]:
    """Frontal faces with scikit-image's bundled LBP cascade (offline) as dlib-like boxes ``(l, t, w, h)``, largest first.

    The cascade merges overlapping hits itself; hits smaller than ``keep`` × the largest side are dropped (they
    are mostly false positives on textures).
    """
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    gray = to_gray(image)
    side = min(gray.shape)
    if side < min_size:
        return []
    detector = Cascade(lbp_frontal_face_cascade_filename())
    raw = detector.detect_multi_scale(img=gray.astype(np.float64) / 255.0, scale_factor=1.1, step_ratio=1,
                                      min_size=(min_size, min_size), max_size=(side, side))
    boxes = sorted(([d["c"], d["r"], d["width"], d["height"]] for d in raw), key=lambda b: -b[2] * b[3])
    return [cascade_to_dlib_box(b) for b in boxes if b[2] >= keep * boxes[0][2]]


def cascade_to_dlib_box(box: np.ndarray) -> tuple[float, float, float, float]:
    """Shift / scale a cascade box ``(l, t, w, h)`` by :data:`CASCADE_TO_DLIB` to look like a 300-W box."""
    dx, dy, scale = CASCADE_TO_DLIB
    left, top, w, h = (float(v) for v in box)
    side = scale * max(w, h)
    cx, cy = left + w / 2 + dx * w, top + h / 2 + dy * h
    return (cx - side / 2, cy - side / 2, side, side)


# ------------------------------------------------------------------------------------------------ whole images
def predict_image(model: torch.nn.Module, image: np.ndarray, loss: str, box: tuple | None = None, *, size: int,
                  margin: float = 0.25, sigma: float = 1.5, decoder: str = "subpixel",
                  device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Predict every face of an image (or the one in ``box``): ``[{"box", "points" (68, 2) image px, "confidence" (68,)}]``.

    Faces are cropped with :func:`facemarks.augment.face_crop` at the model input ``size`` with ``margin``, and
    points are mapped back with :func:`facemarks.augment.invert_points`. Returns ``[]`` when no face is found.
    """
    from facemarks.augment import face_crop, invert_points

    boxes = [tuple(float(v) for v in box)] if box is not None else detect_faces(image)
    faces = []
    for b in boxes:
        crop, transform = face_crop(image, b, size, margin)
        points, conf, _ = predict_crops(model, crop[None], loss, sigma, decoder, 1, device)
        faces.append({"box": [float(v) for v in b], "points": np.asarray(invert_points(points[0], transform), np.float64),
                      "confidence": conf[0]})
    return faces


def face_to_json(face: dict[str, Any]) -> dict[str, Any]:
    """A :func:`predict_image` face as plain JSON types (points as ``[[x, y], ...]`` image px)."""
    return {"box": [round(float(v), 2) for v in face["box"]],
            "points": np.round(np.asarray(face["points"], np.float64), 3).tolist(),
            "confidence": np.round(np.asarray(face["confidence"], np.float64), 4).tolist()}


# ------------------------------------------------------------------------------------------------ test-set evaluation
def evaluate_decoders(heatmaps: np.ndarray, transform: np.ndarray, gt: np.ndarray, boxes: np.ndarray,
                      visible: np.ndarray, sigma: float, threshold: float) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Decode heatmaps ``(N, K, h, w)`` with every decoder, map to original px through ``transform (N, 3, 3)``, score.

    gt ``(N, K, 2)`` original px, boxes ``(N, 4)``, visible ``(N, K)``. Returns ``({decoder: metrics row}, {decoder:
    points (N, K, 2) original px})``; each row is :func:`facemarks.metrics.face_metrics` (``per_face`` included).
    """
    from facemarks.codec import DECODERS
    from facemarks.metrics import crop_to_original, face_metrics

    codec = make_codec(heatmaps.shape[-1] * STRIDE, sigma)
    rows, points = {}, {}
    for name in DECODERS:
        crop_pts, _ = codec.decode(heatmaps, name)
        points[name] = crop_to_original(np.asarray(crop_pts, np.float64), transform)
        rows[name] = face_metrics(points[name], gt, boxes, visible, threshold)
    return rows, points


def raw_sources(meta: dict[str, Any], boxes: np.ndarray, records: list) -> list[str]:
    """The raw image file of each split sample ``(N,)``: ``meta["files"]`` when it has one entry per sample,
    else the record holding a face whose box matches ``boxes[i] (4,)`` (within 1 px)."""
    files = meta.get("files")
    if isinstance(files, list) and len(files) == len(boxes):
        return [str(f) for f in files]
    out = []
    for i, box in enumerate(np.asarray(boxes, np.float64)):
        hits = [r.file for r in records for f in r.faces if np.abs(np.asarray(f.box, np.float64) - box).max() <= 1.0]
        if not hits:
            raise ValueError(f"test sample {i}: no face with box {box.tolist()} in the raw test XML")
        out.append(hits[0])
    return out


def dlib_predictions(raw_dir: str, files: list[str], boxes: np.ndarray) -> tuple[np.ndarray, float]:
    """dlib's 68-point predictor on the original images with the true boxes: points ``(N, K, 2)`` px, ms/face."""
    from pathlib import Path

    from facemarks.io import read_image
    from facemarks.peers import Dlib68

    predictor = Dlib68()
    points, elapsed = [], 0.0
    for file, box in zip(files, np.asarray(boxes, np.float64)):
        image = read_image(Path(raw_dir) / file)
        start = time.perf_counter()
        points.append(np.asarray(predictor.predict(image, tuple(box)), np.float64))
        elapsed += time.perf_counter() - start
    return np.stack(points), 1000.0 * elapsed / max(len(files), 1)


def astronaut(model: torch.nn.Module, loss: str, *, size: int, margin: float, sigma: float, decoder: str,
              use_dlib: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our model (and dlib, when ``use_dlib``) on the face the cascade finds in scikit-image's astronaut photo.

    Returns the JSON summary (``found``, ``box``, ``nme_vs_dlib`` in % of dlib's inter-ocular distance) and arrays
    ``astro_box (4,)``, ``astro_ours (68, 2)``, ``astro_dlib (68, 2)`` px (NaN when dlib is not used).
    """
    from skimage.data import astronaut as load

    from facemarks.metrics import nme, normaliser

    image = load()
    faces = predict_image(model, image, loss, size=size, margin=margin, sigma=sigma, decoder=decoder)
    if not faces:
        return {"found": False}, {}
    face = faces[0]
    theirs = np.full((68, 2), np.nan)
    summary: dict[str, Any] = {"found": True, "loss": loss, "box": face["box"],
                               "mean_confidence": float(np.mean(face["confidence"]))}
    if use_dlib:
        from facemarks.peers import Dlib68

        theirs = np.asarray(Dlib68().predict(image, tuple(face["box"])), np.float64)
        norm = normaliser(theirs[None], "io")
        summary["nme_vs_dlib"] = 100 * float(nme(face["points"][None], theirs[None], norm)[0])
    return summary, {"astro_box": np.asarray(face["box"]), "astro_ours": face["points"], "astro_dlib": theirs}


def train_run_id(loss: str, metrics_dir: str = "metrics", experiment: str | None = None) -> str | None:
    """The MLflow run of ``train@<loss>``: the ``run_id`` in ``metrics/train_<loss>.json`` when the store has it,
    else the latest run tagged ``loss = <loss>`` and ``dvc.stage = train``; None if neither exists."""
    import json
    from pathlib import Path

    import mlflow

    from facemarks.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    path = Path(metrics_dir) / f"train_{loss}.json"
    if path.is_file():
        rid = json.loads(path.read_text(encoding="utf-8")).get("run_id")
        if rid:
            try:
                return client.get_run(rid).info.run_id
            except mlflow.exceptions.MlflowException:
                pass
    exps = [e.experiment_id for e in client.search_experiments() if experiment in (None, e.name)]
    runs = client.search_runs(exps, f"tags.loss = '{loss}' and tags.`dvc.stage` LIKE 'train%'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exps else []
    return runs[0].info.run_id if runs else None


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "per_face"}


def evaluate_loss(model: torch.nn.Module, split: Any, loss: str, sigma: float, threshold: float, batch_size: int = 64,
                  speed_faces: int = 32, device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score one trained model on a split (every decoder, original px) and time it.

    ``split`` is a :class:`facemarks.store.Split`. Returns the ``eval.json`` entry ``{decoder: row, "best_decoder",
    "ms_per_face_b1", "ms_per_face_batched"}`` and arrays for the best decoder: ``points (N, K, 2)`` original px,
    ``crop_points (N, K, 2)``, ``conf (N, K)``, ``nme (N,)`` inter-ocular fraction.
    """
    images = np.asarray(split.images)
    gt = np.asarray(split.orig_points, np.float64)
    heat = predict_heatmaps(model, images, loss, batch_size, device)
    rows, points = evaluate_decoders(heat, np.asarray(split.transform), gt, np.asarray(split.boxes),
                                     np.isfinite(gt).all(-1), sigma, threshold)
    best = min(rows, key=lambda d: rows[d]["nme_io"])
    crop_pts, conf = make_codec(images.shape[-1], sigma).decode(heat, best)
    timed = images[:speed_faces]
    entry: dict[str, Any] = {name: _public(row) for name, row in rows.items()}
    entry.update(best_decoder=best, nme_io=rows[best]["nme_io"], auc=rows[best]["auc"], fr=rows[best]["fr"],
                 ms_per_face_b1=time_per_face(model, timed, loss, sigma, best, 1, device),
                 ms_per_face_batched=time_per_face(model, timed, loss, sigma, best, batch_size, device))
    arrays = {"points": points[best], "crop_points": np.asarray(crop_pts, np.float64),
              "conf": np.asarray(conf, np.float32), "nme": rows[best]["per_face"]}
    return entry, arrays


def baseline_rows(train_split: Any, test_split: Any, threshold: float) -> tuple[dict[str, Any], np.ndarray]:
    """Mean-shape baseline: the mean training crop shape placed on every test crop; row and per-face NME ``(N,)``."""
    from facemarks.metrics import face_metrics, mean_shape, mean_shape_predictions

    shape = mean_shape(np.asarray(train_split.points), np.asarray(train_split.visible))
    gt = np.asarray(test_split.orig_points, np.float64)
    pred = mean_shape_predictions(shape, np.asarray(test_split.transform))
    row = face_metrics(pred, gt, np.asarray(test_split.boxes), np.isfinite(gt).all(-1), threshold)
    return _public(row), row["per_face"]


def roundtrip_summary(split: Any, sigma: float) -> dict[str, float]:
    """Round-trip error (input px) of the split's own targets, float32 maps, every decoder: ``{decoder: mean}``
    plus ``subpixel_p99`` / ``subpixel_max``."""
    from facemarks.codec import roundtrip_table

    size = int(np.asarray(split.images).shape[-1])
    table = roundtrip_table(np.asarray(split.points), np.asarray(split.visible), make_codec(size, sigma),
                            dtypes=("float32",))
    rows = table["dtypes"]["float32"]
    out = {name: rows[name]["input_px"]["mean"] for name in rows}
    out.update(subpixel_p99=rows["subpixel"]["input_px"]["p99"], subpixel_max=rows["subpixel"]["input_px"]["max"])
    return out


def dlib_row(split: Any, raw_dir: str, threshold: float) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The ``dlib68`` evaluation row on a split's original images (``raw_dir/test.xml`` resolves files when the split
    meta lacks them): row (with ``ms_per_face``), points ``(N, K, 2)`` original px, per-face NME ``(N,)``."""
    from pathlib import Path

    from facemarks.metrics import face_metrics

    boxes = np.asarray(split.boxes, np.float64)
    records = []
    if len(split.meta.get("files", [])) != len(boxes):
        from facemarks.io import read_dlib_xml

        records = read_dlib_xml(Path(raw_dir) / "test.xml")
    points, ms = dlib_predictions(raw_dir, raw_sources(split.meta, boxes, records), boxes)
    gt = np.asarray(split.orig_points, np.float64)
    row = face_metrics(points, gt, boxes, np.isfinite(gt).all(-1), threshold)
    per_face = row.pop("per_face")
    return {**row, "ms_per_face": ms}, points, per_face


def log_eval_mlflow(report: dict[str, Any], losses: tuple[str, ...] = ("mse", "bce")) -> None:
    """``test_*`` metrics into each loss's train run (:func:`train_run_id`); every number into an ``evaluate`` run."""
    import mlflow

    from facemarks.codec import DECODERS
    from facemarks.tracking import numeric_leaves, start_run

    for loss in losses:
        r = report[loss]
        metrics = {"test_nme": r["nme_io"], "test_nme_ip": r[r["best_decoder"]]["nme_ip"], "test_auc": r["auc"],
                   "test_fr": r["fr"], "test_roundtrip_px": report["roundtrip"][r["best_decoder"]],
                   "test_ms_per_face_b1": r["ms_per_face_b1"], "test_ms_per_face_batched": r["ms_per_face_batched"],
                   **{f"test_nme_{region}": v for region, v in r[r["best_decoder"]]["regions"].items()},
                   **{f"test_nme_{name}": r[name]["nme_io"] for name in DECODERS}}
        rid = train_run_id(loss)  # a fresh `<loss>-eval` run only when the train run is gone
        with start_run("evaluate", f"{loss}-eval", run_id=rid, tags={"loss": loss}):
            mlflow.log_metrics(metrics)
            mlflow.set_tag("test_best_decoder", r["best_decoder"])
    with start_run("evaluate", "evaluate", tags={"winner": report["winner"]}):
        mlflow.log_metrics(numeric_leaves(report))
