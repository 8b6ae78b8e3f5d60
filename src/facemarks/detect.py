"""Face detection behind one small interface: dlib's frontal HOG detector, scikit-image's LBP cascade as fallback.

    detect(image, detector="auto") -> [Detection(box, score, detector, raw_box), ...]   (best first)

``detector``: ``dlib`` (``dlib.get_frontal_face_detector()``; needs the ``peers`` extra, which adds ``dlib-bin``),
``cascade`` (scikit-image's bundled LBP frontal-face cascade, always offline) or ``auto`` (dlib when ``dlib``
imports, else the cascade). Nothing else is imported at module load: dlib and scikit-image are imported on first use.

Boxes are ``(left, top, width, height)`` px, pixel centres at integer coordinates (``docs/design.md``). Every
detector's own box (``raw_box``) is mapped onto the box convention the model was trained on — the XML boxes of the
training data, which follow dlib's 300-W boxes (:func:`facemarks.synthetic.face_box`) — by a shift and scale relative
to the detector box side (:data:`BOX_MAPPING`, :func:`map_box`), per detector and, for dlib, per sub-detector
(``component``: dlib's frontal detector is 5 HOG filters — 0 frontal, 1 looking left, 2 looking right, 3 / 4 frontal
rotated left / right — and a face turned sideways sits off-centre in the box of filter 1 or 2). The constants are
fitted by ``benchmarks/fit_box_mapping.py`` (see :data:`BOX_MAPPING` for how); :func:`fit_box_map` is the fit itself.

Scores: dlib's SVM margin from ``detector.run(image, upsample, adjust_threshold)`` (higher = surer; 0 is dlib's own
threshold). The cascade reports no score: ``score`` is None and its detections are ordered by area.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

DETECTORS = ("auto", "dlib", "cascade")
DLIB_UPSAMPLE = 1  # dlib upsamples the image once: finds faces down to about 40 px (80 px at 0)
CASCADE_MIN_SIZE = 48  # px, smallest cascade window
CASCADE_KEEP = 0.6  # cascade hits smaller than this x the largest side are dropped (mostly texture false positives)

Box = tuple[float, float, float, float]


class BoxMap(NamedTuple):
    """Detector box → training-convention box: centre shift ``(dx, dy)`` and ``scale``, relative to the detector box
    side ``s = sqrt(w * h)``: ``centre' = centre + (dx, dy) * s``, ``side' = scale * s`` (square)."""

    dx: float
    dy: float
    scale: float


#: Mapping per detector, indexed by ``component`` (dlib's sub-detector; the cascade has one), fitted by
#: ``python benchmarks/fit_box_mapping.py`` on the synthetic *training* images (``data.synthetic`` defaults,
#: ``base.seed`` 0; never on the test images that ``metrics/detect.json`` reports): each true face box is paired with
#: the detector box of highest IoU (≥ 0.3, before mapping) on its image, and each constant is the median over the
#: pairs of ``(true centre − detector centre) / s`` and ``true side / s`` (a component with fewer than 10 pairs gets
#: the detector's fit over all its pairs).
#: Fit of 1,000 training images of the realism-v2 generator (775 dlib pairs, 563 cascade pairs; dlib's frontal
#: detector misses most faces turned beyond about 40°, which v2 draws up to 60°): hits at IoU ≥ 0.7 go from 62.1 % to
#: 72.3 % for dlib and from 29.8 % to 40.8 % for the cascade on those images (``metrics/bench_box_mapping.json``).
#: (The fit on the earlier generator, yaw ≤ 40°: 86.0 % → 92.2 % for dlib.)
BOX_MAPPING: dict[str, tuple[BoxMap, ...]] = {
    "dlib": (BoxMap(0.0000, -0.0183, 1.0000),   # 0 frontal
             BoxMap(0.1269, 0.0548, 0.9401),    # 1 looking left
             BoxMap(-0.1000, 0.0513, 0.9615),   # 2 looking right
             BoxMap(-0.0426, 0.0042, 1.0207),   # 3 frontal, rotated left
             BoxMap(0.0648, -0.0331, 0.9846)),  # 4 frontal, rotated right
    "cascade": (BoxMap(0.0000, 0.0752, 0.9353),),
}


@dataclass(frozen=True)
class Detection:
    """One face: ``box`` in the training convention (mapped), the detector's own ``raw_box``, its ``score`` (None
    for the cascade), the ``detector`` that found it (``dlib`` / ``cascade``) and its ``component`` (dlib's
    sub-detector, 0 for the cascade)."""

    box: Box
    score: float | None
    detector: str
    raw_box: Box
    component: int = 0


class DetectorUnavailable(RuntimeError):
    """The requested detector cannot run here (one line saying what is missing)."""


def dlib_available() -> bool:
    """True when ``import dlib`` works (the ``peers`` extra)."""
    try:
        import dlib  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(detector: str = "auto") -> str:
    """``auto`` → ``dlib`` when dlib imports, else ``cascade``; ``dlib`` without dlib raises
    :class:`DetectorUnavailable`; anything else raises ``ValueError`` naming the allowed values."""
    if detector not in DETECTORS:
        raise ValueError(f"detect: unknown detector {detector!r}; allowed: {', '.join(DETECTORS)}")
    if detector == "auto":
        return "dlib" if dlib_available() else "cascade"
    if detector == "dlib" and not dlib_available():
        raise DetectorUnavailable("detector dlib: dlib is not installed (pip install 'facemarks[peers]' adds dlib-bin;"
                                  " or use --detector cascade)")
    return detector


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` → uint8 ``(H, W)`` (ITU-R 601 luma)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.uint8, copy=False)
    if image.ndim == 3 and image.shape[2] >= 3:
        luma = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    raise ValueError(f"to_gray: expected (H, W) or (H, W, 3) image, got {image.shape}")


def box_side(box: Box) -> float:
    """``sqrt(w * h)``: the side the mapping is relative to."""
    return math.sqrt(max(float(box[2]) * float(box[3]), 0.0))


def mapping_for(detector: str, component: int = 0) -> BoxMap:
    """The :data:`BOX_MAPPING` entry of ``detector``'s ``component``."""
    maps = BOX_MAPPING[detector]
    if not 0 <= component < len(maps):
        raise ValueError(f"mapping_for: {detector} has components 0..{len(maps) - 1}, got {component}")
    return maps[component]


def map_box(box: Box, mapping: BoxMap | str, component: int = 0) -> Box:
    """A detector box ``(l, t, w, h)`` → the square training-convention box (``mapping``: a :class:`BoxMap`, or a
    detector name whose ``component`` entry of :data:`BOX_MAPPING` is used)."""
    m = mapping_for(mapping, component) if isinstance(mapping, str) else mapping
    left, top, w, h = (float(v) for v in box)
    s = box_side(box)
    cx, cy, side = left + w / 2 + m.dx * s, top + h / 2 + m.dy * s, m.scale * s
    return (cx - side / 2, cy - side / 2, side, side)


def fit_box_map(raw_boxes: np.ndarray, true_boxes: np.ndarray) -> BoxMap:
    """The :class:`BoxMap` taking detector boxes ``(N, 4)`` onto their paired true boxes ``(N, 4)``: per constant,
    the median over the pairs (robust to the odd loose detection)."""
    raw, true = np.asarray(raw_boxes, np.float64).reshape(-1, 4), np.asarray(true_boxes, np.float64).reshape(-1, 4)
    if len(raw) == 0 or raw.shape != true.shape:
        raise ValueError(f"fit_box_map: need paired boxes (N, 4) with N > 0, got {raw.shape} and {true.shape}")
    s = np.sqrt(raw[:, 2] * raw[:, 3])
    centre = lambda b: b[:, :2] + b[:, 2:] / 2  # noqa: E731
    shift = (centre(true) - centre(raw)) / s[:, None]
    scale = np.sqrt(true[:, 2] * true[:, 3]) / s
    return BoxMap(float(np.median(shift[:, 0])), float(np.median(shift[:, 1])), float(np.median(scale)))


@functools.lru_cache(maxsize=1)
def _dlib_detector():
    import dlib

    return dlib.get_frontal_face_detector()


def dlib_boxes(image: np.ndarray, upsample: int = DLIB_UPSAMPLE,
               adjust_threshold: float = 0.0) -> list[tuple[Box, float, int]]:
    """dlib's HOG detections on ``image`` uint8 ``(H, W)`` / ``(H, W, 3)``: ``[(raw box, score, component)]``, best
    first (``component``: which of the detector's 5 HOG filters fired, see the module docstring).

    dlib rectangles have inclusive right/bottom edges: ``width = right − left + 1``.
    """
    image = np.asarray(image)
    img = image if image.ndim == 2 else image[..., :3]
    rects, scores, comps = _dlib_detector().run(np.ascontiguousarray(img, dtype=np.uint8), upsample, adjust_threshold)
    out = [((float(r.left()), float(r.top()), float(r.right() - r.left() + 1), float(r.bottom() - r.top() + 1)),
            float(sc), int(k)) for r, sc, k in zip(rects, scores, comps)]
    return sorted(out, key=lambda d: -d[1])


@functools.lru_cache(maxsize=1)
def _cascade():
    from skimage.data import lbp_frontal_face_cascade_filename
    from skimage.feature import Cascade

    return Cascade(lbp_frontal_face_cascade_filename())


def cascade_boxes(image: np.ndarray, min_size: int = CASCADE_MIN_SIZE, keep: float = CASCADE_KEEP) -> list[Box]:
    """scikit-image's LBP frontal-face cascade on ``image``: raw boxes ``(l, t, w, h)``, largest first.

    The cascade merges overlapping hits itself; hits smaller than ``keep`` × the largest side are dropped.
    """
    gray = to_gray(image)
    side = min(gray.shape)
    if side < min_size:
        return []
    raw = _cascade().detect_multi_scale(img=gray.astype(np.float64) / 255.0, scale_factor=1.1, step_ratio=1,
                                        min_size=(min_size, min_size), max_size=(side, side))
    boxes = sorted(((float(d["c"]), float(d["r"]), float(d["width"]), float(d["height"])) for d in raw),
                   key=lambda b: -b[2] * b[3])
    return [b for b in boxes if b[2] >= keep * boxes[0][2]]


def detect(image: np.ndarray, detector: str = "auto", *, upsample: int = DLIB_UPSAMPLE,
           adjust_threshold: float = 0.0) -> list[Detection]:
    """Every face in ``image`` uint8 ``(H, W)`` or ``(H, W, 3)`` as :class:`Detection` (mapped box), best first.

    ``detector``: ``auto`` | ``dlib`` | ``cascade`` (:func:`resolve`); ``upsample`` and ``adjust_threshold`` are
    passed to dlib (a negative ``adjust_threshold`` finds more faces and more false positives).
    """
    name = resolve(detector)
    if name == "dlib":
        found = dlib_boxes(image, upsample, adjust_threshold)
    else:
        found = [(b, None, 0) for b in cascade_boxes(image)]
    return [Detection(map_box(raw, name, k), score, name, tuple(raw), k) for raw, score, k in found]
