"""Crop transforms: the one affine from original-image pixels to a square face crop, its inverse, and the warp.

``T`` (3, 3) maps original-image pixels to crop pixels (row-vector convention ``[x, y, 1] @ T.T``): the square crop
around the face box (with ``margin``) resized to ``size``; the training copies compose it with an augmentation
(:mod:`facemarks.augmentation.augment`). One scikit-image warp (bilinear) applies it; coordinates are pixels with pixel centres at
integer coordinates (``docs/design.md``): a crop of side ``S`` spans ``[-0.5, S - 0.5]``. Every user of a crop —
augment, the metrics in original pixels, predict, export's int8 guard, the real-photo evaluation — goes through
this module, so a face is cropped and mapped back the same way everywhere.

Shape legend: ``S`` crop side, ``K = 68`` landmarks, ``N`` samples; points ``(K, 2)`` or ``(N, K, 2)``, transforms
``(3, 3)`` or ``(N, 3, 3)`` float64.
"""
from __future__ import annotations

import math

import numpy as np
from skimage.transform import ProjectiveTransform, warp

from facemarks.data import portable

LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # skimage.color.rgb2gray weights


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def crop_transform(box: tuple[float, float, float, float], size: int, margin: float) -> np.ndarray:
    """``(3, 3)`` affine original px → crop px for a square crop around ``box = (left, top, width, height)``.

    The box covers pixels ``left .. left + width - 1`` (edges at ``left - 0.5`` and ``left + width - 0.5``);
    the crop is a square of side ``max(width, height) * (1 + 2 * margin)`` centred on the box and mapped onto
    ``[-0.5, size - 0.5]``.
    """
    left, top, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise ValueError(f"crop_transform: box {box} must have positive width and height")
    side = max(w, h) * (1.0 + 2.0 * margin)
    k = size / side
    cx, cy = left + (w - 1.0) / 2.0, top + (h - 1.0) / 2.0
    c = (size - 1.0) / 2.0
    return portable.matmul(portable.matmul(translation(c, c), np.diag([k, k, 1.0])), translation(-cx, -cy))


def apply_transform(points: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Map points with ``[x, y, 1] @ T.T`` → float64, same shape as ``points``.

    ``T (3, 3)`` maps every point ``(..., 2)``; ``T (N, 3, 3)`` maps each sample of ``points (N, K, 2)`` with its own.
    """
    p = np.asarray(points, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    if T.ndim == 2:
        h = portable.matmul(p, T[:2, :2].T) + T[:2, 2]
        w = portable.weighted_sum(p, T[2, :2]) + T[2, 2]
    else:
        h = portable.matmul(p, np.swapaxes(T[:, :2, :2], 1, 2)) + T[:, None, :2, 2]
        w = portable.weighted_sum(p, T[:, None, 2, :2]) + T[:, None, 2, 2]
    return h / w[..., None]


def invert_points(points: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Crop px → original px: points mapped with ``inverse(T)`` (``T (3, 3)`` or ``(N, 3, 3)``, see
    :func:`apply_transform`) → float64, same shape as ``points``."""
    return apply_transform(points, portable.inv3(np.asarray(T, dtype=np.float64)))


def in_crop(points: np.ndarray, size: int) -> np.ndarray:
    """``points (..., 2)`` → bool ``(...)``: finite and inside ``[-0.5, size - 0.5]`` on both axes."""
    p = np.asarray(points, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(p).all(-1) & ((p >= -0.5) & (p <= size - 0.5)).all(-1)


def gray_float(image: np.ndarray, weights: np.ndarray = LUMA) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` uint8 → ``(H, W)`` float32 in ``[0, 255]`` (RGB ``weights``, default luma)."""
    if image.ndim == 2:
        return image.astype(np.float32)
    return portable.weighted_sum(image[..., :3].astype(np.float32), np.asarray(weights, np.float32))


def antialias_sigma(T: np.ndarray) -> float:
    """Gaussian pre-filter sigma (source px) for a transform that shrinks by ``k``: ``max(0, (1/k - 1) / 2)``,
    as ``skimage.transform.resize`` anti-aliasing."""
    k = math.sqrt(abs(portable.det2(np.asarray(T, dtype=np.float64))))  # crop px per source px
    return max(0.0, (1.0 / k - 1.0) / 2.0)


def prepare_source(image: np.ndarray, transforms: list[np.ndarray], size: int, sigma: float, weights: np.ndarray = LUMA):
    """The part of ``image`` that the crops of ``transforms`` see, as float gray, low-passed with ``sigma``.

    Returns ``(sub (h, w) float64, x0, y0)`` (``sub`` starts at pixel ``(x0, y0)``), or None when no crop
    touches the image.
    """
    e = size - 0.5
    box = np.array([[-0.5, -0.5], [e, -0.5], [-0.5, e], [e, e]])
    corners = np.concatenate([apply_transform(box, portable.inv3(T)) for T in transforms])
    pad = 2 + int(math.ceil(4 * sigma))
    hgt, wid = image.shape[:2]
    x0 = max(int(math.floor(corners[:, 0].min())) - pad, 0)
    y0 = max(int(math.floor(corners[:, 1].min())) - pad, 0)
    x1 = min(int(math.ceil(corners[:, 0].max())) + pad + 1, wid)
    y1 = min(int(math.ceil(corners[:, 1].max())) + pad + 1, hgt)
    if x1 <= x0 or y1 <= y0:
        return None
    sub = gray_float(image[y0:y1, x0:x1], weights)
    if sigma > 0:
        sub = portable.gaussian_filter(sub, sigma, mode="nearest")
    return sub.astype(np.float64, copy=False), x0, y0


def warp_source(src, T: np.ndarray, size: int) -> np.ndarray:
    """ONE bilinear ``skimage.transform.warp`` of a :func:`prepare_source` region → ``(size, size)`` float64."""
    if src is None:
        return np.zeros((size, size))
    sub, x0, y0 = src
    t_sub = portable.matmul(np.asarray(T, dtype=np.float64), translation(x0, y0))  # sub-image px -> crop px
    return warp(sub, ProjectiveTransform(matrix=portable.inv3(t_sub)), output_shape=(size, size), order=1,
                mode="constant", cval=0.0, preserve_range=True)


def warp_gray(image: np.ndarray, T: np.ndarray, size: int) -> np.ndarray:
    """Warp ``image (H, W[, 3])`` into a ``(size, size)`` float64 grayscale crop with ``T`` (original → crop px).

    Only the source region the crop sees is converted to gray; when the crop shrinks the image it is first
    low-passed (:func:`antialias_sigma`), then ONE bilinear ``skimage.transform.warp`` samples it (skimage maps
    output ``(col, row) = (x, y)`` with pixel centres at integers, our convention). Outside the image: 0.
    """
    return warp_source(prepare_source(image, [T], size, antialias_sigma(T)), T, size)


def face_crop(image: np.ndarray, box: tuple[float, float, float, float], size: int,
              margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop-only sample of a face: ``image (H, W[, 3])`` uint8 → crop ``(size, size)`` uint8 and ``T (3, 3)``."""
    T = crop_transform(box, size, margin)
    return to_uint8(warp_gray(image, T, size)), T


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- randomness
