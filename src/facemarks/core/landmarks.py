"""The 68-point iBUG (300-W / Multi-PIE) markup: regions, mirror permutation, normalisers, the training-box rule.

Indices are 0-based. "Right" means the subject's right, which is image-left on a frontal face.
"""
from __future__ import annotations

import numpy as np

N_POINTS = 68

#: Region name -> landmark indices.
REGIONS: dict[str, np.ndarray] = {
    "jaw": np.arange(0, 17),
    "brows": np.arange(17, 27),
    "nose": np.arange(27, 36),
    "eyes": np.arange(36, 48),
    "mouth": np.arange(48, 68),
}

RIGHT_EYE = np.arange(36, 42)
LEFT_EYE = np.arange(42, 48)
OUTER_EYE_CORNERS = (36, 45)

_PAIRS = (
    [(i, 16 - i) for i in range(8)]
    + [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)


def _mirror_permutation() -> np.ndarray:
    perm = np.arange(N_POINTS)
    for a, b in _PAIRS:
        perm[a], perm[b] = b, a
    return perm


#: ``points_flipped = flip_x(points)[MIRROR]``: index i of a mirrored face takes point MIRROR[i].
MIRROR: np.ndarray = _mirror_permutation()


def inter_ocular(points: np.ndarray) -> np.ndarray:
    """Outer-eye-corner distance ‖p36 − p45‖ of ``points (..., 68, 2)`` → ``(...)``."""
    a, b = OUTER_EYE_CORNERS
    return np.linalg.norm(points[..., a, :] - points[..., b, :], axis=-1)


def inter_pupil(points: np.ndarray) -> np.ndarray:
    """Distance between pupil centres (means of 36–41 and 42–47) of ``points (..., 68, 2)`` → ``(...)``."""
    right = points[..., RIGHT_EYE, :].mean(axis=-2)
    left = points[..., LEFT_EYE, :].mean(axis=-2)
    return np.linalg.norm(right - left, axis=-1)


# The training-box rule: the face box every training face gets from its 68 points (synthetic, local, photos), and
# the convention detector boxes are mapped onto (facemarks.serving.detect.map_box). Fitted to dlib's HOG detector on
# the synthetic faces: centre and side relative to the landmarks' bounding box; see benchmarks/bench_synthetic.py.
BOX_SIDE = 1.02  # side / max(landmark bbox width, height)
BOX_DX = 0.0     # centre x offset / side (from the bbox centre)
BOX_DY = -0.10   # centre y offset / side (positive: down)


def face_box(points: np.ndarray) -> tuple[float, float, float, float]:
    """Detector-like square box ``(left, top, width, height)`` (integers) from ``points (68, 2)``."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    side = BOX_SIDE * float(max(hi - lo))
    cx = (lo[0] + hi[0]) / 2 + BOX_DX * side
    cy = (lo[1] + hi[1]) / 2 + BOX_DY * side
    side = round(side)
    return (float(round(cx - side / 2)), float(round(cy - side / 2)), float(side), float(side))
