"""Test-set scoring for the ``evaluate`` stage: every decoder in original px, the mean-shape and dlib rows, the
heatmap round trip, the astronaut figure's numbers (from :mod:`facemarks.evaluation.real_photos`), face detection
quality (``metrics/detect.json``) and the MLflow logging.

Shapes: ``N`` test faces, ``K = 68``; heatmaps ``(N, K, h, w)``, points ``(N, K, 2)`` original px, transforms
``(N, 3, 3)`` original px → crop px, boxes ``(N, 4)`` ``(left, top, width, height)`` px, per-face NME ``(N,)``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemarks.evaluation import real_photos
from facemarks.heatmaps.codec import DECODERS, roundtrip_table
from facemarks.serving.detect import BOX_MAPPING, detect, dlib_available, same_face
from facemarks.serving.inference import make_codec, predict_heatmaps, time_per_face
from facemarks.core.io import box_iou, read_dlib_xml, read_image
from facemarks.evaluation.metrics import crop_to_original, face_metrics, mean_shape, mean_shape_predictions, nme, normaliser
from facemarks.training.model import STRIDE
from facemarks.evaluation.peers import dlib68
from facemarks.serving.predict import predict_many
from facemarks.core.landmarks import face_box
from facemarks.core.tracking import MODEL_HASH_TAG, file_md5, numeric_leaves, start_run, tracking_uri

def evaluate_decoders(heatmaps: np.ndarray, transform: np.ndarray, gt: np.ndarray, boxes: np.ndarray,
                      visible: np.ndarray, sigma: float, threshold: float) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Decode heatmaps ``(N, K, h, w)`` with every decoder, map to original px through ``transform (N, 3, 3)``, score.

    gt ``(N, K, 2)`` original px, boxes ``(N, 4)``, visible ``(N, K)``. Returns ``({decoder: metrics row}, {decoder:
    points (N, K, 2) original px})``; each row is :func:`facemarks.evaluation.metrics.face_metrics` (``per_face`` included).
    """
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
    predictor = dlib68()
    points, elapsed = [], 0.0
    for file, box in zip(files, np.asarray(boxes, np.float64)):
        image = read_image(Path(raw_dir) / file)
        start = time.perf_counter()
        points.append(np.asarray(predictor.predict(image, tuple(box)), np.float64))
        elapsed += time.perf_counter() - start
    return np.stack(points), 1000.0 * elapsed / max(len(files), 1)


def astronaut(portraits: real_photos.PhotoSet, points: np.ndarray, loss: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The astronaut figure's numbers from the real-photo protocol (:func:`facemarks.evaluation.real_photos.photo_set`
    of the bundled portraits): her face's box (dlib's box mapped as ``facemarks predict`` maps it), our points
    ``points (F, 68, 2)`` (the model ``loss`` on every face of ``portraits``, in face order) and dlib's reference.

    Returns the JSON summary (``found``, ``loss``, ``box``, ``nme_vs_dlib`` %: the same number as that face's row of
    the ``photos`` block when the bundled portraits are the real photos) and arrays ``astro_box (4,)``,
    ``astro_ours (68, 2)``, ``astro_dlib (68, 2)`` px.
    """
    i = portraits.index("astronaut.png")
    if i is None:
        return {"found": False}, {}
    face = portraits.faces[i]
    ours = np.asarray(points[i], np.float64)
    summary = {"found": True, "loss": loss, "box": [float(v) for v in face.box],
               "nme_vs_dlib": float(real_photos.face_nme(ours[None], [face])[0])}
    return summary, {"astro_box": np.asarray(face.box, np.float64), "astro_ours": ours, "astro_dlib": face.points}


def train_run_id(loss: str, metrics_dir: str = "metrics", experiment: str | None = None) -> str | None:
    """The MLflow run of ``train@<loss>``: the ``run_id`` in ``metrics/train_<loss>.json`` when the store has it
    (older outputs), else the run tagged ``facemarks.model_md5`` = md5 of ``models/<loss>/model.pt`` beside
    ``metrics_dir``, else the latest run tagged ``loss = <loss>`` and ``dvc.stage = train``; None if none exists."""
    import mlflow

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
    model = Path(metrics_dir).parent / "models" / loss / "model.pt"
    if exps and model.is_file():  # the run that wrote this very file: exact, also on a server the team shares
        hit = client.search_runs(exps, f"tags.`{MODEL_HASH_TAG}` = '{file_md5(model)}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
        if hit:
            return hit[0].info.run_id
    runs = client.search_runs(exps, f"tags.loss = '{loss}' and tags.`dvc.stage` LIKE 'train%'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exps else []
    return runs[0].info.run_id if runs else None


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "per_face"}


def evaluate_loss(model: torch.nn.Module, split: Any, loss: str, sigma: float, threshold: float, batch_size: int = 64,
                  speed_faces: int = 32, device: str | torch.device = "cpu",
                  flip: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score one trained model on a split (every decoder, original px; ``flip``: flip test-time augmentation,
    ``evaluate.flip_test``) and time it.

    ``split`` is a :class:`facemarks.core.store.Split`. Returns the ``eval.json`` entry ``{decoder: row, "best_decoder",
    "ms_per_face_b1", "ms_per_face_batched"}`` and arrays for the best decoder: ``points (N, K, 2)`` original px,
    ``crop_points (N, K, 2)``, ``conf (N, K)``, ``nme (N,)`` inter-ocular fraction, and ``nme_<decoder> (N,)`` for
    every decoder (the paired comparison, :func:`facemarks.evaluation.stats.loss_comparison`).
    """
    images = np.asarray(split.images)
    gt = np.asarray(split.orig_points, np.float64)
    heat = predict_heatmaps(model, images, loss, batch_size, device, flip)
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
              "conf": np.asarray(conf, np.float32), "nme": rows[best]["per_face"],
              **{f"nme_{name}": row["per_face"] for name, row in rows.items()}}  # per decoder, for the comparison
    return entry, arrays


def baseline_rows(train_split: Any, test_split: Any, threshold: float) -> tuple[dict[str, Any], np.ndarray]:
    """Mean-shape baseline: the mean training crop shape placed on every test crop; row and per-face NME ``(N,)``."""
    shape = mean_shape(np.asarray(train_split.points), np.asarray(train_split.visible))
    gt = np.asarray(test_split.orig_points, np.float64)
    pred = mean_shape_predictions(shape, np.asarray(test_split.transform))
    row = face_metrics(pred, gt, np.asarray(test_split.boxes), np.isfinite(gt).all(-1), threshold)
    return _public(row), row["per_face"]


def roundtrip_summary(split: Any, sigma: float) -> dict[str, float]:
    """Round-trip error (input px) of the split's own targets, float32 maps, every decoder: ``{decoder: mean}``
    plus ``subpixel_p99`` / ``subpixel_max``."""
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
    boxes = np.asarray(split.boxes, np.float64)
    records = []
    if len(split.meta.get("files", [])) != len(boxes):
        records = read_dlib_xml(Path(raw_dir) / "test.xml")
    points, ms = dlib_predictions(raw_dir, raw_sources(split.meta, boxes, records), boxes)
    gt = np.asarray(split.orig_points, np.float64)
    row = face_metrics(points, gt, boxes, np.isfinite(gt).all(-1), threshold)
    per_face = row.pop("per_face")
    return {**row, "ms_per_face": ms}, points, per_face


def log_eval_mlflow(report: dict[str, Any], losses: tuple[str, ...] = ("mse", "bce")) -> None:
    """Every number into an ``evaluate`` run, tagged ``winner`` (``none`` when the interval includes 0),
    ``verdict`` and ``<loss>_run``, with the ``comparison`` block also as ``comparison.json``; ``test_*`` metrics into
    each loss's train run (:func:`train_run_id`), tagged ``evaluate_run`` = that run's id: the two train runs scored
    together, the pairs that ``facemarks compare`` and the study report use (:mod:`facemarks.evaluation.aggregate`)."""
    import mlflow

    rids = {loss: train_run_id(loss) for loss in losses}  # a fresh `<loss>-eval` run only when the train run is gone
    comparison = report.get("comparison", {})
    tags = {"winner": report["winner"] or "none", **{f"{loss}_run": rid for loss, rid in rids.items() if rid}}
    if comparison:
        tags["verdict"] = comparison["verdict"]
    with start_run("evaluate", "evaluate", tags=tags) as evaluate_run:
        mlflow.log_metrics(numeric_leaves(report))
        if comparison:
            mlflow.log_dict(comparison, "comparison.json")
    for loss in losses:
        r = report[loss]
        metrics = {"test_nme": r["nme_io"], "test_nme_ip": r[r["best_decoder"]]["nme_ip"], "test_auc": r["auc"],
                   "test_fr": r["fr"], "test_roundtrip_px": report["roundtrip"][r["best_decoder"]],
                   "test_ms_per_face_b1": r["ms_per_face_b1"], "test_ms_per_face_batched": r["ms_per_face_batched"],
                   **{f"test_nme_{region}": v for region, v in r[r["best_decoder"]]["regions"].items()},
                   **{f"test_nme_{name}": r[name]["nme_io"] for name in DECODERS}}
        with start_run("evaluate", f"{loss}-eval", run_id=rids[loss],
                       tags={"loss": loss, "evaluate_run": evaluate_run.info.run_id}):
            mlflow.log_metrics(metrics)
            mlflow.set_tag("test_best_decoder", r["best_decoder"])


# ------------------------------------------------------------------------------------------------ face detection
HIT_IOU = 0.7  # a true face is hit when its matched (mapped) detection has IoU >= 0.7


def match_detections(true_boxes: np.ndarray, det_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One-to-one greedy matching (highest IoU first) of true boxes ``(F, 4)`` and detections ``(D, 4)``, a pair
    only where they are the same face (:func:`facemarks.serving.detect.same_face`, the project's one rule).

    Returns the matched detection per true face ``(F,)`` (-1: none), its IoU ``(F,)`` (0 when unmatched) and the
    number of false positives (detections matched to no true face).
    """
    true_boxes, det_boxes = np.reshape(true_boxes, (-1, 4)), np.reshape(det_boxes, (-1, 4))
    iou = np.array([[box_iou(t, d) if same_face(tuple(t), tuple(d)) else -1.0 for d in det_boxes]
                    for t in true_boxes]).reshape(len(true_boxes), len(det_boxes))
    match, match_iou, free = np.full(len(true_boxes), -1), np.zeros(len(true_boxes)), iou.copy()
    while free.size and free.max() >= 0.0:
        f, d = np.unravel_index(int(np.argmax(free)), free.shape)
        match[f], match_iou[f] = d, max(iou[f, d], 0.0)
        free[f, :], free[:, d] = -1.0, -1.0
    return match, match_iou, int(len(det_boxes) - (match >= 0).sum())


def detection_row(true_boxes: list[np.ndarray], detections: list[list[Any]]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Quality of one detector over images: ``true_boxes[i] (F_i, 4)``, ``detections[i]`` its
    :class:`facemarks.serving.detect.Detection` list. Returns the row (``hit_rate`` at IoU ≥ :data:`HIT_IOU` after mapping,
    ``found_rate``: matched, the same face, ``fp_per_image``, ``mean_iou`` over true faces with 0 for a miss,
    the same before mapping as ``*_raw``) and, per image, the matched mapped box per true face ``(F_i, 4)`` (NaN: none).
    """
    ious, ious_raw, fps, matched, founds = [], [], 0, [], []
    for boxes, dets in zip(true_boxes, detections):
        mapped = np.array([d.box for d in dets], np.float64).reshape(-1, 4)
        idx, iou, fp = match_detections(boxes, mapped)
        ious.append(iou)
        founds.append(idx >= 0)
        ious_raw.append(match_detections(boxes, np.array([d.raw_box for d in dets], np.float64).reshape(-1, 4))[1])
        fps += fp
        box = np.full((len(idx), 4), np.nan)
        box[idx >= 0] = mapped[idx[idx >= 0]]
        matched.append(box)
    iou, iou_raw, found = np.concatenate(ious), np.concatenate(ious_raw), np.concatenate(founds)
    row = {"n_images": len(true_boxes), "n_faces": int(len(iou)), "n_detections": int(sum(map(len, detections))),
           "hit_rate": float(np.mean(iou >= HIT_IOU)), "found_rate": float(np.mean(found)),
           "fp_per_image": fps / max(len(true_boxes), 1), "mean_iou": float(np.mean(iou)),
           "hit_rate_raw": float(np.mean(iou_raw >= HIT_IOU)), "mean_iou_raw": float(np.mean(iou_raw))}
    return row, matched


def detection_report(model: torch.nn.Module, loss: str, records: list, raw_dir: str, *, size: int, margin: float,
                     sigma: float, decoder: str, max_images: int,
                     portraits: real_photos.PhotoSet | None) -> tuple[dict[str, Any], dict[str, float]]:
    """Face detection quality per detector (``dlib`` when it imports, ``cascade`` always) for ``metrics/detect.json``.

    On the first ``max_images`` test images (``records``: :class:`facemarks.core.io.ImageRecord` of ``raw_dir/test.xml``):
    :func:`detection_row` against the true boxes, plus ``nme_own_box`` / ``nme_true_box`` (mean inter-ocular NME, %)
    of the model predicting from the detector's mapped box vs from the true box, on the faces the detector found
    (the same face), and ``nme_ratio`` = own / true. On the astronaut photo: the same row without NME, against the
    reference box of the real-photo protocol (``portraits``: dlib's 68 points of her face made into a box the way
    training boxes are made, :func:`facemarks.core.landmarks.face_box`; None without dlib).
    Returns the report and the detection wall-clock (``<detector>_ms_per_image``, for timings/MLflow only).
    """
    detectors = ("dlib", "cascade") if dlib_available() else ("cascade",)
    recs = list(records)[:max_images]
    images = [read_image(Path(raw_dir) / r.file) for r in recs]
    true_boxes = [np.array([f.box for f in r.faces], np.float64).reshape(-1, 4) for r in recs]
    gt = [np.array([f.points for f in r.faces], np.float64).reshape(-1, 68, 2) for r in recs]
    kw = dict(size=size, margin=margin, sigma=sigma, decoder=decoder)
    pred_true = [p for p, _ in predict_many(model, list(zip(images, true_boxes)), loss, **kw)]
    report: dict[str, Any] = {"hit_iou": HIT_IOU, "found_rule": "the same face (facemarks.serving.detect.same_face)",
                              "loss": loss, "decoder": decoder,
                              "mapping": {d: [m._asdict() for m in BOX_MAPPING[d]] for d in detectors}, "synthetic_test": {}}
    timing: dict[str, float] = {}
    for name in detectors:
        found, seconds = [], 0.0
        for im in images:
            start = time.perf_counter()
            found.append(detect(im, name))
            seconds += time.perf_counter() - start
        timing[f"{name}_ms_per_image"] = 1000.0 * seconds / max(len(images), 1)
        row, matched = detection_row(true_boxes, found)
        ok = [np.isfinite(boxes).all(1) for boxes in matched]  # per image, the true faces this detector found
        own = [p for p, _ in predict_many(model, [(im, b[k]) for im, b, k in zip(images, matched, ok)], loss, **kw)]
        true = [ref[k] for ref, k in zip(pred_true, ok)]
        truth = [pts[k] for pts, k in zip(gt, ok)]
        if sum(map(len, own)):
            g = np.concatenate(truth)
            norm, vis = normaliser(g, "io"), np.isfinite(g).all(-1)
            own_nme = 100 * float(np.nanmean(nme(np.concatenate(own), g, norm, vis)))
            true_nme = 100 * float(np.nanmean(nme(np.concatenate(true), g, norm, vis)))
            row.update(n_nme_faces=int(len(g)), nme_own_box=own_nme, nme_true_box=true_nme,
                       nme_ratio=own_nme / max(true_nme, 1e-9))
        report["synthetic_test"][name] = row
    i = None if portraits is None else portraits.index("astronaut.png")
    if i is not None:
        image, ref_box = portraits.images["astronaut.png"], face_box(portraits.faces[i].points)
        report["astronaut"] = {"reference_box": [float(v) for v in ref_box]}
        for name in detectors:
            report["astronaut"][name] = detection_row([np.array([ref_box], np.float64)], [detect(image, name)])[0]
    else:
        report["astronaut"] = {"skipped": "the reference box needs dlib's 68-point predictor (peers extra)"}
    return report, timing


def log_detect_mlflow(report: dict[str, Any], timing: dict[str, float]) -> None:
    """Every number of ``metrics/detect.json`` (as ``detect.<path>``) and the detection timings (``detect.<name>``)
    into a ``detect`` run of the evaluate stage."""
    import mlflow

    with start_run("evaluate", "detect"):
        mlflow.log_metrics({**numeric_leaves(report, "detect"), **{f"detect.{k}": v for k, v in timing.items()}})
