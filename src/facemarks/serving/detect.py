"""Face detection behind one small interface: dlib's HOG and CNN detectors in a cascade, scikit-image's LBP cascade
as the fallback without dlib.

Why one module of ~670 lines: it is the one door to face detection (``detect.*``: predict, the teacher, the
evaluation), and its parts are tuned as one: the detector runners, the mapping of their boxes onto the training
convention fitted per detector component (:data:`BOX_MAPPING`), and the cascade's stages, same-face rule, merge
and order, whose thresholds are in mapped px. About 80 of the lines are this docstring and the fit record of
:data:`BOX_MAPPING`.

    detect(image, detector="auto") -> [Detection(box, score, detector, raw_box, component, rotation, merged), ...]

``detector`` (a *setting*; :data:`DETECTORS`):

* ``hog`` (alias ``dlib``): dlib's frontal HOG detector, ``run(image, upsample=1, 0.0)``.
* ``hog-rotate``: ``hog`` on the image and on two copies turned by :data:`ROTATIONS` (±30°; dlib's HOG filters cover
  an in-plane roll of about ±35°, so together up to about ±65°), each copy's boxes turned back.
* ``cnn``: dlib's CNN (MMOD) face detector ``cnn_face_detection_model_v1(mmod_human_face_detector.dat)`` — the
  model file ships in ``face-recognition-models`` (the ``peers`` extra) — at upsample 0 on a copy downscaled to at
  most :data:`CNN_MAX_SIDE` px (long side), boxes scaled back.
* ``auto`` (the default, *the cascade*; :func:`stages_for`): ``hog`` run once down to margin
  :data:`CANDIDATE_SCORE` — its windows of margin ≥ 0 are faces, the weaker ones of mapped side ≥
  :data:`CANDIDATE_MIN_SIDE` that no face covers are *candidates* —, then three more stages on every photo:
  ``check`` (the CNN on a crop around each of the :data:`CANDIDATE_MAX` best candidates, scaled so the candidate is
  :data:`CHECK_SIDE` px: it sees the faces HOG nearly found, even small ones, at the cost of a small crop),
  ``cnn-fast`` (the CNN on a copy downscaled to :data:`CNN_FAST_SIDE` px long side, about 0.15 s: the large faces HOG
  misses altogether) and, only when the CNN and HOG disagree (:func:`disagree`: a CNN face of ``check`` or
  ``cnn-fast`` with confidence ≥ :data:`CNN_SURE` where HOG has no face) or nothing sure was found
  (:func:`nothing_sure`), the slow stages (:func:`needs_slow`): ``turned`` (HOG on the copies turned by
  :data:`ROTATIONS`) and ``cnn`` (the CNN on the :data:`CNN_MAX_SIDE` copy). All merged. Without the CNN model
  file it is ``hog`` + turned copies on every photo (one notice on stderr); without dlib it is scikit-image's
  ``cascade``. Tuned on the tuning half of ``../shared/real-photos``
  (``benchmarks/bench_detect.py``; ``docs/predict.md`` has the numbers of both halves).
* ``cascade``: scikit-image's bundled LBP frontal-face cascade (always offline; the fallback without dlib).

Nothing heavy is imported at module load: dlib, PIL and scikit-image are imported on first use.

Boxes are ``(left, top, width, height)`` px, pixel centres at integer coordinates (``docs/design.md``). Every
detector's own box (``raw_box``; for a rotated copy: the copy's box with its centre turned back into the image) is
mapped onto the box convention the model was trained on — the XML boxes of the training data, which follow dlib's
300-W boxes (:func:`facemarks.core.landmarks.face_box`) — by a shift and scale relative to the detector box side
(:data:`BOX_MAPPING`, :func:`map_box`), per detector and sub-detector (``component``: dlib's HOG detector is 5
filters — 0 frontal, 1 looking left, 2 looking right, 3 / 4 frontal rotated left / right — and a face turned sideways
sits off-centre in the box of filter 1 or 2; ``hog-rotate`` has one mapping per copy angle). The constants are
fitted by ``benchmarks/fit_box_mapping.py`` (see :data:`BOX_MAPPING`); :func:`fit_box_map` is the fit itself.

Merging: overlapping detections of one face (dlib's HOG filters can fire twice on one face; the cascade's
detectors find the same face) are merged when their *mapped* boxes are one face (:func:`same_face`): the detection of
the earlier stage (:data:`STAGES` order; within a stage the higher score) is kept and the others' tags go into its
``merged`` tuple (agreement between detectors).

Order (:func:`detect`, :func:`by_size`): sure faces first — found by both HOG and the CNN, or with a score of at least
:data:`SURE_SCORES` (HOG margin 0.3, CNN confidence 0.5) —, then the weak ones, each group largest mapped box side
first (ties: merge priority); one rule for every setting: a small face must not come before a large one that is as
sure, and a faint large window not before a clear face.
:func:`facemarks.serving.predict.predict_image` reorders by size × the model's landmark confidence.

Every :class:`Detection` says which ``detector`` found it (``hog`` / ``cnn`` / ``cascade``), at which ``scale``
(the resize factor of the image copy the detector ran on: the CNN's downscaled copy or crop; 1 = the image itself,
dlib's HOG upsampling ×2 inside itself not counted) and ``rotation`` (the turned copy; 0 = upright).

Scores: dlib's HOG SVM margin (higher = surer; 0 is dlib's own threshold), dlib's CNN detection confidence (its
own threshold is 0). The two are not on one scale. The scikit-image cascade reports no score (None).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from facemarks.core import extras
from facemarks.core.io import box_iou

DETECTORS = ("auto", "hog", "hog-rotate", "cnn", "cascade", "dlib")
DLIB_UPSAMPLE = 1  # dlib's HOG upsamples the image once: finds faces down to about 40 px (80 px at 0)
ROTATIONS = (-30.0, 30.0)  # degrees, counter-clockwise as seen: the turned copies of `hog-rotate`
CNN_MODEL_FILE = "mmod_human_face_detector.dat"
CNN_MODEL_PACKAGE = "face_recognition_models"  # the installed package whose models/ folder holds CNN_MODEL_FILE
CNN_MAX_SIDE = 640  # px: the `cnn` setting runs on a copy whose long side is at most this (never upscaled)
CNN_FAST_SIDE = 256  # px: `auto`'s whole-image CNN runs on a copy this long (cost falls with the square of the scale)
CANDIDATE_SCORE = -0.7  # HOG windows with a margin in [this, 0) are candidates for the CNN's check ...
CANDIDATE_MIN_SIDE = 60.0  # ... when their mapped side is at least this (px) ...
CANDIDATE_MAX = 4  # ... at most this many per photo, best margin first
CHECK_CONTEXT = 1.6  # the CNN's crop around a candidate: this x its side ...
CHECK_SIDE = 80.0  # ... scaled so that the candidate is this many px (the CNN finds faces from about 70-80 px)
CHECK_IOU = 0.3  # a CNN face in the crop confirms the candidate when they are one face at this IoU (same_face)
CNN_SURE = 0.5  # a CNN face this confident where HOG has none: the detectors disagree, the slow stages run
SURE_SCORES = {"hog": 0.3, "cnn": CNN_SURE}  # a face found by one family only is *weak* below these (order, likely FP)
MERGE_IOU = 0.4  # mapped boxes overlapping this much are one face ...
MERGE_INSIDE = 0.7  # ... or the smaller box lies this much inside the larger one ...
MERGE_RATIO = 2.0  # ... whose side is at most this x the smaller's (the CNN's boxes of faces below its window size)
CASCADE_MIN_SIZE = 48  # px, smallest LBP-cascade window
CASCADE_KEEP = 0.6  # LBP-cascade hits smaller than this x the largest side are dropped (mostly texture false positives)

Box = tuple[float, float, float, float]


class BoxMap(NamedTuple):
    """Detector box → training-convention box: centre shift ``(dx, dy)`` and ``scale``, relative to the detector box
    side ``s = sqrt(w * h)``: ``centre' = centre + (dx, dy) * s``, ``side' = scale * s`` (square)."""

    dx: float
    dy: float
    scale: float


#: Mapping per detector, indexed by ``component`` (dlib's HOG sub-detector; for ``hog-rotate`` the index of the copy's
#: angle in :data:`ROTATIONS`; ``cnn`` and the LBP cascade have one), fitted by ``python benchmarks/fit_box_mapping.py``
#: on the synthetic *training* images (``data.synthetic`` defaults, ``base.seed`` 0; never on the test images that
#: ``metrics/detect.json`` reports): each true face box is paired with the detector box of highest IoU (≥ 0.3, before
#: mapping) on its image, and each constant is the median over the pairs of ``(true centre − detector centre) / s``
#: and ``true side / s`` (a component with fewer than 10 pairs gets the detector's fit over all its pairs).
#: ``hog-rotate`` is fitted on those training images turned by ∓30° (true box: ``face_box`` of the turned points), so
#: that its copies turned by ±30° hold the faces upright; ``cnn`` on the unturned images.
#: HOG fit of 1,000 training images of the realism-v2 generator (775 dlib pairs, 563 cascade pairs; dlib's frontal
#: detector misses most faces turned beyond about 40°, which v2 draws up to 60°): hits at IoU ≥ 0.7 go from 62.1 % to
#: 72.3 % for dlib and from 29.8 % to 40.8 % for the cascade on those images (``metrics/bench_box_mapping.json``).
#: (The fit on the earlier generator, yaw ≤ 40°: 86.0 % → 92.2 % for dlib.)
#: ``hog-rotate``: 806 pairs on those 1,000 images turned by ∓30° (405 / 401 per copy), hits 69.2 % → 72.6 %.
#: ``cnn``: 273 pairs on the first 300 images (the CNN takes about 1 s per image here), hits 61.7 % → 84.7 %: its boxes
#: sit higher and tighter than the training boxes. Fitted on the synthetic training faces like the others rather than
#: on real photos, which are for validation only; on real photos the CNN's mapped boxes are checked against HOG's
#: mapped boxes of the same faces by ``benchmarks/bench_detect.py`` (merge at IoU ≥ MERGE_IOU).
BOX_MAPPING: dict[str, tuple[BoxMap, ...]] = {
    "hog": (BoxMap(0.0000, -0.0183, 1.0000),   # 0 frontal
            BoxMap(0.1269, 0.0548, 0.9401),    # 1 looking left
            BoxMap(-0.1000, 0.0513, 0.9615),   # 2 looking right
            BoxMap(-0.0426, 0.0042, 1.0207),   # 3 frontal, rotated left
            BoxMap(0.0648, -0.0331, 0.9846)),  # 4 frontal, rotated right
    "hog-rotate": (BoxMap(-0.0063, -0.0517, 1.0046),  # copy turned by -30°
                   BoxMap(0.0010, -0.0523, 1.0000)),  # copy turned by +30°
    "cnn": (BoxMap(0.0364, 0.0739, 1.0532),),
    "cascade": (BoxMap(0.0000, 0.0752, 0.9353),),
}
BOX_MAPPING["dlib"] = BOX_MAPPING["hog"]  # the HOG detector's name before the cascade (metrics/detect.json rows)


@dataclass(frozen=True)
class Detection:
    """One face: ``box`` in the training convention (mapped), the detector's own ``raw_box`` (image frame), its
    ``score`` (None for the LBP cascade), the ``detector`` that found it (``hog`` / ``cnn`` / ``cascade``), its
    ``component`` (HOG's sub-detector, else 0), the ``rotation`` (degrees, counter-clockwise) of the image copy it
    was found on (0: the image itself), the other detectors whose detections of this face were ``merged`` into it
    (``"hog"``, ``"cnn"``, ``"hog@30"`` for a turned copy, …) and the ``scale`` of the image copy it was found on
    (the CNN's downscaled copy or crop around a HOG candidate: copy px per image px; 1: the image itself)."""

    box: Box
    score: float | None
    detector: str
    raw_box: Box
    component: int = 0
    rotation: float = 0.0
    merged: tuple[str, ...] = ()
    scale: float = 1.0

    @property
    def tag(self) -> str:
        """``detector`` plus ``@<rotation>`` for a turned copy: ``hog``, ``hog@-30``, ``cnn``."""
        return self.detector if not self.rotation else f"{self.detector}@{self.rotation:g}"


class DetectorUnavailable(RuntimeError):
    """The requested detector cannot run here (one line saying what is missing)."""


def dlib_available() -> bool:
    """True when ``import dlib`` works (the ``peers`` extra; :func:`facemarks.core.extras.dlib_available`)."""
    return extras.dlib_available()


def packaged_model(file: str, package: str) -> Path | None:
    """``file`` in the ``models/`` folder of the installed ``package`` (``face_recognition_models`` for dlib's model
    files; located without importing it: its ``__init__`` needs ``pkg_resources``), or None."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / file
    return path if path.is_file() else None


def cnn_model_path() -> Path | None:
    """:data:`CNN_MODEL_FILE` of the installed :data:`CNN_MODEL_PACKAGE` (``face-recognition-models``), or None."""
    return packaged_model(CNN_MODEL_FILE, CNN_MODEL_PACKAGE)


def cnn_available() -> bool:
    """True when dlib imports and the CNN model file is found."""
    return dlib_available() and cnn_model_path() is not None


def resolve(detector: str = "auto") -> str:
    """The setting that will run: ``auto`` → ``auto`` when dlib imports, else ``cascade``; ``dlib`` → ``hog``; a
    dlib setting without dlib (or ``cnn`` without its model file) raises :class:`DetectorUnavailable`; anything else
    raises ``ValueError`` naming the allowed values."""
    if detector not in DETECTORS:
        raise ValueError(f"detect: unknown detector {detector!r}; allowed: {', '.join(DETECTORS)}")
    if detector == "auto":
        return "auto" if dlib_available() else "cascade"
    if detector == "cascade":
        return detector
    if not dlib_available():
        raise DetectorUnavailable(f"detector {detector}: dlib is not installed (pip install 'facemarks[peers]' adds "
                                  "dlib-bin; or use --detector cascade)")
    if detector == "cnn" and cnn_model_path() is None:
        raise DetectorUnavailable(f"detector cnn: {CNN_MODEL_FILE} not found (pip install 'facemarks[peers]' adds "
                                  "face-recognition-models; or use --detector hog)")
    return "hog" if detector == "dlib" else detector


def describe(detector: str = "auto") -> str:
    """One line saying what setting ``detector`` runs here (``facemarks predict`` prints it)."""
    name = resolve(detector)
    if name == "auto":
        rot = "/".join(f"{a:+g}°" for a in ROTATIONS)
        if not cnn_available():
            return f"auto: hog + hog on copies turned {rot}"
        return (f"auto: hog, the cnn on hog's near misses and on a {CNN_FAST_SIDE} px copy, hog on copies turned "
                f"{rot} where the cnn and hog disagree")
    return name


_NOTICE_SHOWN = False


def _notice_no_cnn() -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print(f"facemarks.serving.detect: dlib's CNN face detector is not available ({CNN_MODEL_FILE} not found; pip install "
              "'facemarks[peers]' adds face-recognition-models): the cascade is hog + turned copies", file=sys.stderr)


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` → uint8 ``(H, W)`` (ITU-R 601 luma)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.uint8, copy=False)
    if image.ndim == 3 and image.shape[2] >= 3:
        luma = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    raise ValueError(f"to_gray: expected (H, W) or (H, W, 3) image, got {image.shape}")


def _uint8(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` contiguous uint8 (alpha dropped)."""
    image = np.asarray(image)
    return np.ascontiguousarray(image if image.ndim == 2 else image[..., :3], dtype=np.uint8)


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


def rotate_image(image: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """``image`` turned by ``angle`` degrees counter-clockwise (as seen) about its centre on a canvas large enough
    for all of it (bilinear; uncovered corners black), and ``A`` ``(2, 3)`` taking a point of the turned copy back
    to the image: ``p = A[:, :2] @ p' + A[:, 2]`` (pixel centres at integer coordinates in both)."""
    from PIL import Image

    img = _uint8(image)
    h, w = img.shape[:2]
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    w2, h2 = int(math.ceil(abs(w * c) + abs(h * s) - 1e-9)), int(math.ceil(abs(w * s) + abs(h * c) - 1e-9))
    lin = np.array([[c, -s], [s, c]])  # copy -> image (y down: a counter-clockwise turn as seen)
    shift = np.array([(w - 1) / 2, (h - 1) / 2]) - lin @ np.array([(w2 - 1) / 2, (h2 - 1) / 2])
    A = np.column_stack([lin, shift])
    # PIL's affine maps output to input in pixel-corner coordinates (centre + 0.5)
    corner = shift + 0.5 - lin @ np.array([0.5, 0.5])
    data = (lin[0, 0], lin[0, 1], corner[0], lin[1, 0], lin[1, 1], corner[1])
    out = Image.fromarray(img).transform((w2, h2), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
    return np.asarray(out), A


@functools.lru_cache(maxsize=1)
def _dlib_detector():
    return extras.dlib().get_frontal_face_detector()


def dlib_boxes(image: np.ndarray, upsample: int = DLIB_UPSAMPLE,
               adjust_threshold: float = 0.0) -> list[tuple[Box, float, int]]:
    """dlib's HOG detections on ``image`` uint8 ``(H, W)`` / ``(H, W, 3)``: ``[(raw box, score, component)]``, best
    first (``component``: which of the detector's 5 HOG filters fired, see the module docstring).

    dlib rectangles have inclusive right/bottom edges: ``width = right − left + 1``.
    """
    rects, scores, comps = _dlib_detector().run(_uint8(image), upsample, adjust_threshold)
    out = [((float(r.left()), float(r.top()), float(r.right() - r.left() + 1), float(r.bottom() - r.top() + 1)),
            float(sc), int(k)) for r, sc, k in zip(rects, scores, comps)]
    return sorted(out, key=lambda d: -d[1])


def rotated_hog_boxes(image: np.ndarray, angle: float, upsample: int = DLIB_UPSAMPLE,
                      adjust_threshold: float = 0.0) -> list[tuple[Box, float, int]]:
    """:func:`dlib_boxes` on ``image`` turned by ``angle`` (:func:`rotate_image`), each box turned back: the raw box
    is the copy's box (same width and height) centred on its centre's place in the image."""
    turned, A = rotate_image(image, angle)
    out = []
    for (left, top, w, h), score, k in dlib_boxes(turned, upsample, adjust_threshold):
        cx, cy = A[:, :2] @ np.array([left + (w - 1) / 2, top + (h - 1) / 2]) + A[:, 2]
        out.append(((float(cx - (w - 1) / 2), float(cy - (h - 1) / 2), w, h), score, k))
    return out


@functools.lru_cache(maxsize=2)
def _cnn_detector(path: str):
    return extras.dlib().cnn_face_detection_model_v1(path)


def copy_scale(shape: tuple[int, ...], max_side: float) -> float:
    """The factor that brings an image of ``shape`` ``(H, W, ...)`` to a long side of at most ``max_side`` (≤ 1:
    never upscaled)."""
    return min(1.0, float(max_side) / max(shape[0], shape[1]))


def _rgb(image: np.ndarray) -> np.ndarray:
    img = _uint8(image)
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def _resized(img: np.ndarray, region: tuple[float, float, float, float], factor: float) -> tuple[np.ndarray, Box]:
    """The part ``region`` = ``(x0, y0, x1, y1)`` (pixel *edges*: the whole image is ``(0, 0, W, H)``) of ``img``
    ``(H, W, 3)`` resized (bilinear) by ``factor`` to ``(h, w, 3)``, and ``(x0, y0, fx, fy)``: the copy's pixel
    centre ``u`` sits at ``x0 + (u + 0.5) / fx − 0.5`` in the image (likewise ``y``)."""
    from PIL import Image

    x0, y0, x1, y1 = region
    w, h = max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor))
    if (x0, y0, x1, y1) == (0, 0, img.shape[1], img.shape[0]) and (w, h) == (img.shape[1], img.shape[0]):
        return img, (0.0, 0.0, 1.0, 1.0)
    out = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1)))
    return out, (x0, y0, w / (x1 - x0), h / (y1 - y0))


def _cnn_on(copy: np.ndarray, frame: Box, upsample: int = 0) -> list[tuple[Box, float]]:
    """dlib's CNN on ``copy`` (from :func:`_resized`), boxes in the image frame ``frame`` = ``(x0, y0, fx, fy)``:
    ``[(raw box, confidence)]``, best first. dlib rectangles have inclusive right/bottom edges."""
    x0, y0, fx, fy = frame
    out = []
    for d in _cnn_detector(str(cnn_model_path()))(copy, upsample):
        r = d.rect
        left, top = x0 + (r.left() + 0.5) / fx - 0.5, y0 + (r.top() + 0.5) / fy - 0.5
        out.append(((left, top, (r.right() - r.left() + 1) / fx, (r.bottom() - r.top() + 1) / fy),
                    float(d.confidence)))
    return sorted(out, key=lambda d: -d[1])


def _need_cnn() -> None:
    if cnn_model_path() is None or not dlib_available():
        raise DetectorUnavailable(f"dlib's CNN face detector: {CNN_MODEL_FILE} not found (pip install "
                                  "'facemarks[peers]' adds dlib-bin and face-recognition-models)")


def cnn_boxes(image: np.ndarray, max_side: int = CNN_MAX_SIDE, upsample: int = 0) -> list[tuple[Box, float]]:
    """dlib's CNN (MMOD) face detections on ``image``: ``[(raw box, confidence)]``, best first. The image is
    downscaled (bilinear) so its long side is at most ``max_side`` (:func:`copy_scale`; about 5 µs per pixel of the
    copy on one core: 2-8 s at full size on 1-megapixel photos) and the boxes scaled back.
    :class:`DetectorUnavailable` without the model file."""
    _need_cnn()
    img = _rgb(image)
    h, w = img.shape[:2]
    return _cnn_on(*_resized(img, (0, 0, w, h), copy_scale(img.shape, max_side)), upsample)


def check_region(raw: Box, shape: tuple[int, ...], context: float = CHECK_CONTEXT) -> tuple[float, float, float, float]:
    """The crop the CNN checks a HOG candidate on: a square of ``context`` × the side of its raw box ``(l, t, w, h)``
    about its centre, clipped to the image ``shape`` ``(H, W, ...)``; pixel edges ``(x0, y0, x1, y1)``."""
    left, top, w, h = (float(v) for v in raw)
    half = context * box_side(raw) / 2
    cx, cy = left + w / 2, top + h / 2  # pixel edges: the box covers [left - 0.5, left + w - 0.5]
    return (max(0.0, cx - half), max(0.0, cy - half), min(float(shape[1]), cx + half), min(float(shape[0]), cy + half))


def check_boxes(image: np.ndarray, raw: Box, context: float = CHECK_CONTEXT,
                side: float = CHECK_SIDE) -> tuple[list[tuple[Box, float]], float]:
    """dlib's CNN on the crop around a HOG candidate's raw box (:func:`check_region`) scaled so that the box's side
    is ``side`` px: ``([(raw box in the image frame, confidence)], scale)``."""
    _need_cnn()
    img = _rgb(image)
    factor = side / max(box_side(raw), 1.0)
    copy, frame = _resized(img, check_region(raw, img.shape, context), factor)
    return _cnn_on(copy, frame), factor


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


def _hog(image: np.ndarray, upsample: int, adjust_threshold: float) -> list[Detection]:
    return [Detection(map_box(raw, "hog", k), score, "hog", tuple(raw), k)
            for raw, score, k in dlib_boxes(image, upsample, adjust_threshold)]


def _turned(image: np.ndarray, upsample: int, adjust_threshold: float) -> list[Detection]:
    out = []
    for i, angle in enumerate(ROTATIONS):
        out += [Detection(map_box(raw, "hog-rotate", i), score, "hog", tuple(raw), k, angle)
                for raw, score, k in rotated_hog_boxes(image, angle, upsample, adjust_threshold)]
    return out


def _cnn(image: np.ndarray, max_side: int = CNN_MAX_SIDE) -> list[Detection]:
    f = copy_scale(np.shape(image), max_side)
    return [Detection(map_box(raw, "cnn"), score, "cnn", tuple(raw), scale=f)
            for raw, score in cnn_boxes(image, max_side)]


def candidates(weak: list[Detection], faces: list[Detection], min_side: float = CANDIDATE_MIN_SIDE,
               limit: int = CANDIDATE_MAX) -> list[Detection]:
    """The HOG windows worth the CNN's check: of ``weak`` (HOG detections below dlib's threshold, best first) those
    with a mapped side ≥ ``min_side`` that are not the same face as one of ``faces`` nor as a better candidate, at
    most ``limit``."""
    out: list[Detection] = []
    for d in weak:
        if len(out) < limit and box_side(d.box) >= min_side and not any(same_face(d.box, k.box) for k in faces + out):
            out.append(d)
    return out


def _check(image: np.ndarray, cands: list[Detection]) -> list[Detection]:
    out = []
    for c in cands:
        boxes, f = check_boxes(image, c.raw_box)
        found = [Detection(map_box(raw, "cnn"), score, "cnn", tuple(raw), scale=f) for raw, score in boxes]
        out += [d for d in found if same_face(d.box, c.box, CHECK_IOU)]
    return out


def hog_stage(image: np.ndarray, upsample: int = DLIB_UPSAMPLE, adjust_threshold: float = 0.0,
              floor: float = CANDIDATE_SCORE) -> tuple[list[Detection], list[Detection]]:
    """dlib's HOG run once down to margin ``min(floor, adjust_threshold)``: ``(faces, weak)``, the detections with
    score ≥ ``adjust_threshold`` and those below it, each best first."""
    found = _by_score(_hog(image, upsample, min(floor, adjust_threshold)))
    return ([d for d in found if d.score >= adjust_threshold], [d for d in found if d.score < adjust_threshold])


def remap(d: Detection) -> Detection:
    """``d`` with its ``box`` mapped again from its ``raw_box`` by the current :data:`BOX_MAPPING` (its detector,
    copy angle and component): the same as a fresh detection would get."""
    if d.detector == "hog" and d.rotation:
        m = mapping_for("hog-rotate", ROTATIONS.index(d.rotation))
    elif d.detector in ("hog", "cnn", "cascade"):
        m = mapping_for(d.detector, d.component)
    else:
        return d
    return replace(d, box=map_box(d.raw_box, m))


def nothing_sure(found: dict[str, list[Detection]]) -> bool:
    """No face of the ``hog``, ``check`` and ``cnn-fast`` stages in ``found`` (``{stage: detections}``) is sure
    (:func:`is_sure`)."""
    return not any(is_sure(d) for stage in ("hog", "check", "cnn-fast") for d in found.get(stage, []))


def disagree(found: dict[str, list[Detection]]) -> bool:
    """The CNN and HOG disagree: a face of the ``check`` or ``cnn-fast`` stage in ``found`` with confidence ≥
    :data:`CNN_SURE` is not the same face as any ``hog`` face (HOG missed a face the CNN sees: the photo may hold
    more faces that HOG misses, turned ones or ones too small for the CNN's 256 px copy)."""
    hog = found.get("hog", [])
    return any(c.score is not None and c.score >= CNN_SURE and not any(same_face(c.box, h.box) for h in hog)
               for stage in ("check", "cnn-fast") for c in found.get(stage, []))


def needs_slow(found: dict[str, list[Detection]]) -> bool:
    """The cascade's rule for its slow stages (``turned``, HOG on the turned copies, and ``cnn``, the CNN on the
    :data:`CNN_MAX_SIDE` copy): nothing sure was found (:func:`nothing_sure`) or the CNN and HOG disagree
    (:func:`disagree`).

    Chosen on the tuning half of the real photos (``benchmarks/bench_detect.py --replay``): with the turned copies
    alone on that rule the cascade found 87 of the 88 plausible faces ≥ 60 px of the tuning half (the miss: a 233 px
    face in a 1024 px group photo that only the 640 px CNN sees, where the CNN and HOG disagreed); with both, all 88,
    the slow stages running on 5 of the 50 photos."""
    return nothing_sure(found) or disagree(found)


def same_face(a: Box, b: Box, min_iou: float = MERGE_IOU) -> bool:
    """Two mapped boxes are one face: IoU ≥ ``min_iou``, or the smaller lies ≥ :data:`MERGE_INSIDE` inside the larger
    and the larger's side is at most :data:`MERGE_RATIO` × the smaller's (dlib's CNN reports faces smaller than its
    window — 80 px on its downscaled copy — in a box of about the window's size)."""
    if box_iou(a, b) >= min_iou:
        return True
    small, large = sorted((a, b), key=box_side)
    if box_side(large) > MERGE_RATIO * box_side(small) or box_side(small) <= 0:
        return False
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih >= MERGE_INSIDE * small[2] * small[3]


def best_same_face(box: Box, candidates: list[Box]) -> int | None:
    """The index of the candidate that is the same face as ``box`` (:func:`same_face`, the one rule for "the same
    face" in this project), the highest-IoU one when several are; None when none is."""
    same = [i for i, c in enumerate(candidates) if same_face(box, c)]
    return max(same, key=lambda i: box_iou(box, candidates[i])) if same else None


def is_face(image: np.ndarray, raw: Box, score: float, component: int = 0) -> bool:
    """A HOG detection (``raw`` box, ``score``, ``component``) is a face: its margin reaches
    ``SURE_SCORES["hog"]``, or — a weak one — dlib's CNN confirms it in a crop around it (the cascade's check of a
    near miss). Without the CNN model (the ``peers`` extra) a weak detection is not a face. The rule that keeps the
    astronaut's mission patch out of the real-photo references."""
    if score >= SURE_SCORES["hog"]:
        return True
    if not cnn_available():
        return False
    return bool(_check(image, [Detection(map_box(raw, "hog", component), score, "hog", tuple(raw), component)]))


def merge(found: list[Detection], min_iou: float = MERGE_IOU) -> list[Detection]:
    """One detection per face: ``found`` in priority order (the caller's stage order; within a stage higher score
    first); a detection whose mapped box is the same face as a kept one's (:func:`same_face`) is dropped and its
    :attr:`Detection.tag` added to that one's ``merged``. Returns the kept ones in ``found``'s order."""
    kept: list[Detection] = []
    for d in found:
        for i, k in enumerate(kept):
            if same_face(d.box, k.box, min_iou):
                if d.tag != k.tag and d.tag not in k.merged:
                    kept[i] = replace(k, merged=k.merged + (d.tag,))
                break
        else:
            kept.append(d)
    return kept


def _by_score(found: list[Detection]) -> list[Detection]:
    return sorted(found, key=lambda d: -(d.score if d.score is not None else -math.inf))


def family(tag: str) -> str:
    """The detector family of a :attr:`Detection.tag`: ``cnn`` or ``hog`` (HOG on the image or a turned copy)."""
    return "cnn" if tag.startswith("cnn") else "hog" if tag.startswith("hog") else tag


def is_sure(d: Detection) -> bool:
    """A face both families found (HOG and the CNN, its ``merged`` tags), or one whose score reaches its detector's
    :data:`SURE_SCORES` entry (the LBP cascade has no score: sure)."""
    if d.score is None or len({family(t) for t in (d.tag, *d.merged)}) > 1:
        return True
    return d.score >= SURE_SCORES.get(d.detector, 0.0)


def by_size(found: list[Detection]) -> list[Detection]:
    """``found`` in the documented order: sure faces (:func:`is_sure`) before weak ones, each group by mapped box side,
    largest first (stable: ties keep their order)."""
    return sorted(found, key=lambda d: (not is_sure(d), -box_side(d.box)))


#: The cascade's parts, in merge priority: HOG on the image, the CNN's check of HOG's candidates, the CNN on a small
#: copy, HOG on the turned copies, the CNN on the CNN_MAX_SIDE copy (the `cnn` setting).
STAGES = ("hog", "check", "cnn-fast", "turned", "cnn")
#: The stages each dlib setting may run (``auto``'s ``turned`` and ``cnn`` only when :func:`needs_slow`).
SETTING_STAGES = {"hog": ("hog",), "hog-rotate": ("hog", "turned"), "cnn": ("cnn",),
                  "auto": ("hog", "check", "cnn-fast", "turned", "cnn")}


def run_stage(stage: str, image: np.ndarray, upsample: int = DLIB_UPSAMPLE, adjust_threshold: float = 0.0,
              found: dict[str, list[Detection]] | None = None) -> list[Detection]:
    """One part of the cascade (:data:`STAGES`) on ``image``: its mapped detections, best score first. ``check``
    needs ``found["hog"]`` and ``found["weak"]`` (:func:`hog_stage`): the candidates it checks."""
    image = _uint8(image)
    if stage == "hog":
        return hog_stage(image, upsample, adjust_threshold)[0]
    if stage == "check":
        found = found or {}
        return _by_score(_check(image, candidates(found.get("weak", []), found.get("hog", []))))
    if stage == "cnn-fast":
        return _by_score(_cnn(image, CNN_FAST_SIDE))
    if stage == "cnn":
        return _by_score(_cnn(image))
    if stage == "turned":
        return _by_score(_turned(image, upsample, adjust_threshold))
    raise ValueError(f"run_stage: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")


def stages_for(setting: str, found: dict[str, list[Detection]], cnn: bool | None = None) -> tuple[str, ...]:
    """The stages a resolved ``setting`` (``hog`` / ``hog-rotate`` / ``cnn`` / ``auto``) runs given the stage results
    ``found`` so far: ``auto`` runs ``hog``, ``check`` and ``cnn-fast``, then ``turned`` and ``cnn`` when
    :func:`needs_slow` (without the CNN, ``cnn`` False, default :func:`cnn_available`: ``hog`` and ``turned``)."""
    if setting not in SETTING_STAGES:
        raise ValueError(f"stages_for: not a dlib setting: {setting!r}")
    if setting != "auto":
        return SETTING_STAGES[setting]
    if not (cnn_available() if cnn is None else cnn):
        return ("hog", "turned")
    return ("hog", "check", "cnn-fast") + (("turned", "cnn") if needs_slow(found) else ())


def assemble(setting: str, found: dict[str, list[Detection]], cnn: bool | None = None) -> list[Detection]:
    """The faces of ``setting`` from the stage results ``found`` (``{stage: detections}``, each best first; the
    stages :func:`stages_for` names must be there): :func:`merge` of the stages in :data:`STAGES` order, then
    :func:`by_size`."""
    plan = stages_for(setting, found, cnn)
    return by_size(merge([d for stage in STAGES if stage in plan for d in found[stage]]))


def detect(image: np.ndarray, detector: str = "auto", *, upsample: int = DLIB_UPSAMPLE,
           adjust_threshold: float = 0.0) -> list[Detection]:
    """Every face in ``image`` uint8 ``(H, W)`` or ``(H, W, 3)`` as :class:`Detection` (mapped box), one per face
    (:func:`merge`), largest mapped box first (:func:`by_size`).

    ``detector``: a setting of :data:`DETECTORS` (:func:`resolve`; the module docstring says what each runs);
    ``upsample`` and ``adjust_threshold`` are passed to dlib's HOG detector (a negative ``adjust_threshold`` finds
    more faces and more false positives; ``auto``'s candidates are the windows between :data:`CANDIDATE_SCORE` and
    it).
    """
    name = resolve(detector)
    image = _uint8(image)
    if name == "cascade":
        return [Detection(map_box(b, "cascade"), None, "cascade", tuple(b)) for b in cascade_boxes(image)]
    found: dict[str, list[Detection]] = {}
    if name != "cnn":
        found["hog"], found["weak"] = hog_stage(image, upsample, adjust_threshold)
    if name == "auto" and not cnn_available():
        _notice_no_cnn()
    for stage in SETTING_STAGES[name]:  # in this order: `auto` decides on its slow stages after its first ones
        if stage not in found and stage in stages_for(name, found):
            found[stage] = run_stage(stage, image, upsample, adjust_threshold, found)
    return assemble(name, found)
