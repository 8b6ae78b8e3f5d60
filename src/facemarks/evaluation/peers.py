"""dlib's 68-point predictor and HOG face detector as a yardstick (optional extra ``peers``).

dlib itself is imported on first use (:mod:`facemarks.core.extras`). The model file comes from the ``face-recognition-models``
package, located without importing it (its ``__init__`` needs ``pkg_resources``).

Coordinates: pixels, pixel centres at integer coordinates; boxes ``(left, top, width, height)``.
dlib rectangles have inclusive right/bottom edges: ``right = left + width - 1``.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from facemarks.core import extras

from facemarks.evaluation import metrics
from facemarks.serving.detect import dlib_boxes, map_box, packaged_model, same_face
from facemarks.core.io import ImageRecord, read_image

MODEL_FILE = "shape_predictor_68_face_landmarks.dat"


def _model_path() -> Path | None:
    """Path of dlib's 68-point ``.dat`` inside the installed ``face_recognition_models`` package, or None."""
    return packaged_model(MODEL_FILE, "face_recognition_models")


def unavailable_reason() -> str:
    """Empty when the dlib yardstick can run, else one line saying what is missing."""
    if not extras.dlib_available():
        return "dlib is not installed (pip install 'facemarks[peers]' adds dlib-bin)"
    if _model_path() is None:
        return f"{MODEL_FILE} not found (pip install 'facemarks[peers]' adds face-recognition-models)"
    return ""


def available() -> bool:
    """True when dlib imports and its 68-point model file is found."""
    return unavailable_reason() == ""


def notice(wanted: bool = True) -> str | None:
    """None when dlib's rows can run (``wanted``: ``evaluate.peers``), else the one-line reason they are skipped;
    the evaluate stage's dlib rows and the export stage's real-photo guard ask the same question."""
    if not wanted:
        return "evaluate.peers is false"
    return None if available() else unavailable_reason()


def _rect(box):
    left, top, w, h = (int(round(v)) for v in box)
    return extras.dlib().rectangle(left, top, left + w - 1, top + h - 1)


class Dlib68:
    """dlib's shape predictor (trained on iBUG 300-W); its HOG detector is :func:`facemarks.serving.detect.dlib_boxes`."""

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"dlib yardstick unavailable: {reason}")
        self._predictor = extras.dlib().shape_predictor(str(_model_path()))

    def predict(self, image: np.ndarray, box) -> np.ndarray:
        """Landmarks ``(68, 2)`` float64 for ``image`` ``(H, W)`` or ``(H, W, 3)`` uint8 inside ``box`` (l, t, w, h)."""
        shape = self._predictor(np.ascontiguousarray(image), _rect(box))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


@functools.lru_cache(maxsize=1)
def dlib68() -> Dlib68:
    """The one :class:`Dlib68` of this process: dlib's shape model (about 100 MB) is read once per run, however many
    parts of a stage ask for it."""
    return Dlib68()


def detected(image: np.ndarray, box) -> bool:
    """dlib's HOG detector (:func:`facemarks.serving.detect.dlib_boxes`) finds the face whose training-convention box
    is ``box``: one of its boxes, mapped onto that convention, is the same face (:func:`facemarks.serving.detect.same_face`)."""
    return any(same_face(box, map_box(raw, "dlib", k)) for raw, _, k in dlib_boxes(image))


def realism(records: list[ImageRecord], root: Path, max_faces: int | None = None) -> dict:
    """How real the faces look to dlib: its NME (%, true box), detector hit rate, and the mean-shape baseline.

    The mean-shape baseline places the mean of all faces' box-normalised shapes in each true box.
    """
    model = dlib68()
    faces = [(rec, f) for rec in records for f in rec.faces if np.isfinite(f.points).all()]
    faces = faces[:max_faces] if max_faces is not None else faces
    if not faces:
        raise ValueError("realism: no fully labelled faces to score")
    preds, hits, norm, secs = [], [], [], 0.0
    cache: dict[str, np.ndarray] = {}
    for rec, face in faces:
        img = cache.setdefault(rec.file, read_image(Path(root) / rec.file))
        t0 = time.perf_counter()
        preds.append(model.predict(img, face.box))
        secs += time.perf_counter() - t0
        hits.append(detected(img, face.box))
        left, top, w, h = face.box
        norm.append((face.points - (left, top)) / (w, h))
    gt = np.stack([f.points for _, f in faces])  # (N, 68, 2)
    boxes = np.array([f.box for _, f in faces], np.float64)  # (N, 4)
    mean_shape = np.mean(norm, axis=0) * boxes[:, None, 2:] + boxes[:, None, :2]  # (N, 68, 2), in each true box
    io = metrics.normaliser(gt, "io")
    dlib_nme = 100 * metrics.nme(np.stack(preds), gt, io)
    ms_nme = 100 * metrics.nme(mean_shape, gt, io)
    return {
        "n_faces": len(faces),
        "dlib_nme_mean": float(np.mean(dlib_nme)),
        "dlib_nme_median": float(np.median(dlib_nme)),
        "detector_hit_rate": float(np.mean(hits)),
        "mean_shape_nme_mean": float(np.mean(ms_nme)),
        "mean_shape_nme_median": float(np.median(ms_nme)),
        "dlib_ms_per_face": 1000 * secs / len(faces),
    }
