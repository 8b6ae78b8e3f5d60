"""Landmark accuracy metrics: NME under three normalisers, per-region NME, CED, AUC / FR, mean-shape baseline.

Shapes: ``N`` faces, ``K = 68`` keypoints; points ``(N, K, 2)`` in pixels (any frame, as long as prediction and
ground truth share it), visibility ``(N, K)`` bool, boxes ``(N, 4)`` ``(left, top, width, height)``.
Errors are *fractions* of the normaliser (0.05 = 5 %); callers multiply by 100 for reports.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from facemarks.augmentation.crops import invert_points  # the one place crop transforms are applied
from facemarks.core.landmarks import REGIONS, inter_ocular, inter_pupil

NORMALISERS = ("io", "ip", "box")  # inter-ocular (36/45), inter-pupil, box diagonal
_EPS = 1e-9


def normaliser(gt: np.ndarray, kind: str, boxes: np.ndarray | None = None) -> np.ndarray:
    """Per-face normalising distance ``(N,)``: ``io`` ‖gt36 − gt45‖, ``ip`` pupil distance, ``box`` √(w² + h²)."""
    gt = np.asarray(gt, np.float64)
    if kind == "io":
        return inter_ocular(gt)
    if kind == "ip":
        return inter_pupil(gt)
    if kind == "box":
        if boxes is None:
            raise ValueError("normaliser: kind 'box' needs boxes (N, 4)")
        boxes = np.asarray(boxes, np.float64)
        return np.hypot(boxes[:, 2], boxes[:, 3])
    raise ValueError(f"normaliser: unknown kind {kind!r}; allowed: {', '.join(NORMALISERS)}")


def point_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Euclidean error per point: pred, gt ``(N, K, 2)`` → ``(N, K)`` px."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.shape[-1] != 2:
        raise ValueError(f"point_errors: pred {pred.shape} and gt {gt.shape} must both be (N, K, 2)")
    return np.linalg.norm(pred - gt, axis=-1)


def nme(pred: np.ndarray, gt: np.ndarray, norm: np.ndarray, visible: np.ndarray | None = None,
        index: np.ndarray | None = None) -> np.ndarray:
    """Normalised mean error per face ``(N,)`` (fraction): mean over visible points of ‖pred − gt‖ / norm.

    pred, gt ``(N, K, 2)``; norm ``(N,)`` (see :func:`normaliser`); visible ``(N, K)`` (default all);
    ``index`` restricts to a subset of keypoints (a region). A face with no visible point gets NaN.
    """
    err = point_errors(pred, gt)
    vis = np.ones(err.shape, bool) if visible is None else np.asarray(visible, bool)
    if index is not None:
        err, vis = err[:, index], vis[:, index]
    count = vis.sum(-1)
    total = np.where(vis, err, 0.0).sum(-1)  # unlabelled points may be NaN: masked, not multiplied
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean / np.maximum(np.asarray(norm, np.float64), _EPS)


def region_nme(pred: np.ndarray, gt: np.ndarray, norm: np.ndarray, visible: np.ndarray | None = None) -> dict[str, float]:
    """Mean NME (fraction) over faces for each region of :data:`facemarks.core.landmarks.REGIONS`."""
    return {name: float(np.nanmean(nme(pred, gt, norm, visible, idx))) for name, idx in REGIONS.items()}


def ced(errors: np.ndarray, threshold: float = 0.08, n_bins: int = 81) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: ``x (n_bins,)`` from 0 to ``threshold``, ``y (n_bins,)`` share of faces ≤ x."""
    errors = np.sort(np.asarray(errors, np.float64).ravel())
    x = np.linspace(0.0, threshold, n_bins)
    y = np.searchsorted(errors, x, side="right") / max(len(errors), 1)
    return x, y


def auc_fr(errors: np.ndarray, threshold: float = 0.08) -> tuple[float, float]:
    """AUC of the CED from 0 to ``threshold`` divided by ``threshold``, and FR = share of faces with error > threshold.

    The area is exact: ∫₀ᵗ 1[e ≤ x] dx = max(t − e, 0), so AUC = mean(max(t − e, 0)) / t.
    """
    e = np.asarray(errors, np.float64).ravel()
    if e.size == 0:
        raise ValueError("auc_fr: no errors given")
    auc = float(np.mean(np.clip(threshold - e, 0.0, None)) / threshold)
    fr = float(np.mean(e > threshold))
    return auc, fr


def face_metrics(pred: np.ndarray, gt: np.ndarray, boxes: np.ndarray, visible: np.ndarray | None = None,
                 threshold: float = 0.08) -> dict[str, Any]:
    """The evaluation row for one predictor, in %: ``nme_io``, ``nme_ip``, ``nme_box``, ``auc``, ``fr``, ``regions``.

    pred, gt ``(N, K, 2)`` original-image px; boxes ``(N, 4)``; AUC / FR use the inter-ocular NME.
    Also returns ``per_face`` (inter-ocular NME fraction ``(N,)``) for CED curves and figures.
    """
    io = nme(pred, gt, normaliser(gt, "io"), visible)
    ip = nme(pred, gt, normaliser(gt, "ip"), visible)
    bx = nme(pred, gt, normaliser(gt, "box", boxes), visible)
    auc, fr = auc_fr(io, threshold)
    regions = region_nme(pred, gt, normaliser(gt, "io"), visible)
    return {
        "nme_io": 100 * float(np.nanmean(io)),
        "nme_ip": 100 * float(np.nanmean(ip)),
        "nme_box": 100 * float(np.nanmean(bx)),
        "nme_io_median": 100 * float(np.nanmedian(io)),
        "auc": auc,
        "fr": fr,
        "regions": {k: 100 * v for k, v in regions.items()},
        "per_face": io,
    }


def crop_to_original(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Crop px ``(N, K, 2)`` → original-image px through the inverse of the stored original→crop ``(N, 3, 3)``."""
    return invert_points(points, transform)


def mean_shape(points: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """Mean of training crop points ``(N, K, 2)`` → ``(K, 2)`` (over visible samples per point when given)."""
    points = np.asarray(points, np.float64)
    if visible is None:
        return points.mean(0)
    vis = np.asarray(visible, bool)[..., None]
    return np.where(vis, points, 0.0).sum(0) / np.maximum(vis.sum(0), 1)


def mean_shape_predictions(shape: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Place the mean crop shape ``(K, 2)`` on every test crop, mapped to original px: ``(N, K, 2)``."""
    n = len(transform)
    return crop_to_original(np.broadcast_to(np.asarray(shape, np.float64), (n, *np.shape(shape))), transform)


def ced_csv(errors: dict[str, np.ndarray], threshold: float = 0.08, n_bins: int = 81) -> str:
    """CED curves as CSV text: column ``nme`` (in %, 0 … threshold) then one cumulative-share column per name."""
    x = np.linspace(0.0, threshold, n_bins)
    curves = {name: ced(e, threshold, n_bins)[1] for name, e in errors.items()}
    lines = [",".join(["nme", *curves])]
    for i, xi in enumerate(x):
        lines.append(",".join([f"{100 * xi:.4f}", *(f"{c[i]:.4f}" for c in curves.values())]))
    return "\n".join(lines) + "\n"
