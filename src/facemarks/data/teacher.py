"""dlib's 68-point predictor as a teacher: the ``photos`` data source labels a folder of the user's own photos.

    files = preflight(cfg)                                  # fails before any work: no images / no peers extra
    labels = label_files(files, cfg, counters)              # every face dlib's HOG detector finds, cached by SHA-256
    split = split_by_file(files, cfg.test_fraction, seed)   # whole photos to train or test, seeded by file name

Labelling: every face dlib's frontal HOG detector finds (``upsample = data.photos.upsample``, dlib's own threshold)
is labelled by dlib's 68-point predictor **inside dlib's own detector box** (the box that predictor was trained
with). Only the HOG stage of ``predict``'s detector cascade (:mod:`facemarks.serving.detect`) is used: the cascade's CNN and
turned-copy detections have other boxes (and, for the copies, another image) than the predictor was trained on, so
a face only they find is not taught (the photo is counted without faces) rather than labelled in a foreign box. The face box written to the XML is that detector box mapped onto the project's training-box convention by
:func:`facemarks.serving.detect.map_box` (:data:`facemarks.serving.detect.BOX_MAPPING`, per HOG sub-detector) — exactly the box
``predict`` gives the model at inference for the same face, so training on a photo sees the box the deployed model
will see (docs/design.md, "photos"). Faces the teacher cannot label are counted by reason and skipped, never
guessed: ``below_min_score`` (dlib's score under ``data.photos.min_score``; default 0, dlib's own threshold, keeps
every detection), ``outside_image`` (more than :data:`MAX_OUTSIDE` of the 68 points outside the image: a face cut by the
border) and whatever :func:`facemarks.data.validate.face_problem` refuses (``zero_area_box``, ``absurd_coordinates`` …).

Cache: one JSON per image, ``<cache_dir>/<sha256 of the file>.json`` (detections + points, the teacher's id): a
rerun, a renamed file or a second folder holding the same photo does not run dlib again; an entry written by another
teacher id (:data:`TEACHER_VERSION`, upsample, predictor file) is recomputed. :class:`Teacher` counts its detector
and predictor calls and the cache hits (the download stage writes them to ``timings/download.json``: run facts, not
data metrics).

The teacher record: ``data/raw/teacher.json`` (:data:`RECORD`) names, per photo file of ``data/raw`` (key = its
``file`` in train.xml / test.xml), its SHA-256, split, original name and each face (``box`` as written, dlib's
``detector_box``, ``score``, ``component``, ``teacher``). A face of a file listed there was labelled by the teacher,
so its "ground truth" is dlib's points: :func:`teacher_files` tells the evaluation which test faces those are, and
:func:`training_photo_hashes` / :func:`check_no_overlap` keep a training photo out of a real-photo evaluation.

Shapes: images uint8 ``(H, W)`` or ``(H, W, 3)``; boxes ``(left, top, width, height)`` px; points ``(68, 2)`` px,
pixel centres at integer coordinates.
"""
from __future__ import annotations

import collections
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from facemarks.evaluation import peers
from facemarks.core.atomic import atomic_write_text
from facemarks.serving.detect import dlib_boxes, map_box
from facemarks.core.hashing import file_sha256
from facemarks.core.io import DataError, Face, ImageRecord, in_image, photo_files, read_image
from facemarks.core.params import Photos
from facemarks.data.validate import bad_item, face_problem

TEACHER = "dlib68"            #: the teacher's name in the record
TEACHER_VERSION = 1           #: bump when the labelling rule changes: older cache entries are recomputed
RECORD = "teacher.json"       #: the teacher record, beside train.xml / test.xml
#: a face with more of its 68 points than this outside the image is skipped: dlib's points beyond the border are
#: extrapolations (6: about a third of the jaw line, a chin cut by the frame; an eye or mouth corner cut is skipped)
MAX_OUTSIDE = 6


# ================================================================================================ preflight
def preflight(cfg: Photos) -> list[Path]:
    """The image files of ``cfg.path`` (the photo-folder lister :func:`facemarks.core.io.photo_files`), checked before
    any work.

    Raises :class:`DataError` with one line naming ``data.photos.path`` when the folder is missing or holds no
    image, or naming ``data.source`` when dlib (the ``peers`` extra) cannot run.
    """
    files = photo_files(cfg.path, key="data.photos.path")
    reason = peers.unavailable_reason()
    if reason:
        raise DataError(f"data.source = photos needs dlib's 68-point predictor as teacher: {reason}")
    return files


# ================================================================================================ teacher
@dataclass
class Labelled:
    """One face the teacher labelled: ``box`` (training convention, written to the XML), dlib's ``detector_box``,
    its ``score`` and ``component`` (HOG sub-detector), and dlib's ``points (68, 2)``."""

    box: tuple[float, float, float, float]
    detector_box: tuple[float, float, float, float]
    score: float
    component: int
    points: np.ndarray

    def face(self) -> Face:
        return Face(box=self.box, points=self.points)

    def record(self) -> dict[str, Any]:
        return {"box": [float(v) for v in self.box], "detector_box": [float(v) for v in self.detector_box],
                "score": round(float(self.score), 6), "component": int(self.component), "teacher": TEACHER}


@dataclass
class PhotoLabels:
    """The teacher's answer for one photo: its SHA-256, size, the labelled faces and the skipped ones by reason."""

    path: Path
    sha256: str
    faces: list[Labelled] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    cached: bool = False


class Teacher:
    """dlib's HOG detector + 68-point predictor with counters (``detector_calls``, ``predictor_calls``,
    ``cache_hits``, ``cache_misses``). Constructing it loads nothing; dlib is loaded on the first miss."""

    def __init__(self, cache_dir: str | Path, upsample: int = 1, min_score: float = 0.0) -> None:
        self.cache_dir, self.upsample, self.min_score = Path(cache_dir), int(upsample), float(min_score)
        self.detector_calls = self.predictor_calls = self.cache_hits = self.cache_misses = 0
        self._dlib = None

    @property
    def id(self) -> dict[str, Any]:
        """What the cache entries depend on."""
        return {"teacher": TEACHER, "version": TEACHER_VERSION, "upsample": self.upsample,
                "predictor": peers.MODEL_FILE, "detector": "dlib.get_frontal_face_detector"}

    def counters(self) -> dict[str, int]:
        return {"teacher_detector_calls": self.detector_calls, "teacher_predictor_calls": self.predictor_calls,
                "teacher_cache_hits": self.cache_hits, "teacher_cache_misses": self.cache_misses}

    def _model(self):
        if self._dlib is None:
            self._dlib = peers.dlib68()
        return self._dlib

    def detections(self, image: np.ndarray) -> list[tuple[tuple, float, int]]:
        """dlib's raw detections ``[(box, score, component)]``, best first (:func:`facemarks.serving.detect.dlib_boxes`)."""
        self.detector_calls += 1
        return dlib_boxes(image, self.upsample)

    def predict(self, image: np.ndarray, detector_box) -> np.ndarray:
        """dlib's 68 points ``(68, 2)`` in its own detector box."""
        self.predictor_calls += 1
        return self._model().predict(image, detector_box)

    # ------------------------------------------------------------------------------------------- one photo
    def label(self, path: str | Path, image: np.ndarray | None = None, sha256: str | None = None) -> PhotoLabels:
        """Label one photo (from the cache when its SHA-256 has an entry of this teacher id)."""
        path = Path(path)
        digest = sha256 or file_sha256(path)
        entry = self._read_cache(digest)
        if entry is None:
            self.cache_misses += 1
            img = read_image(path) if image is None else image
            entry = {"id": self.id, "sha256": digest, "height": int(img.shape[0]), "width": int(img.shape[1]),
                     "detections": []}
            for raw, score, comp in self.detections(img):
                points = self.predict(img, raw)
                entry["detections"].append({"detector_box": [float(v) for v in raw], "score": round(float(score), 6),
                                            "component": int(comp), "points": np.asarray(points).tolist()})
            self._write_cache(digest, entry)
            cached = False
        else:
            self.cache_hits += 1
            cached = True
        out = PhotoLabels(path=path, sha256=digest, cached=cached)
        for det in entry["detections"]:
            face, reason = _accept(det, int(entry["width"]), int(entry["height"]), self.min_score)
            if face is None:
                out.skipped[reason] = out.skipped.get(reason, 0) + 1
            else:
                out.faces.append(face)
        return out

    def _cache_path(self, digest: str) -> Path:
        return self.cache_dir / f"{digest}.json"

    def _read_cache(self, digest: str) -> dict | None:
        path = self._cache_path(digest)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a damaged entry is recomputed
        if not isinstance(entry, dict) or entry.get("id") != self.id or entry.get("sha256") != digest:
            return None
        return entry

    def _write_cache(self, digest: str, entry: dict) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._cache_path(digest), json.dumps(entry, sort_keys=True) + "\n")


def _accept(det: dict, width: int, height: int, min_score: float = 0.0) -> tuple[Labelled | None, str]:
    """A cached detection → :class:`Labelled`, or ``(None, reason)`` when the teacher's label is not usable."""
    if float(det["score"]) < min_score:
        return None, "below_min_score"
    points = np.asarray(det["points"], np.float64).reshape(-1, 2)
    raw = tuple(float(v) for v in det["detector_box"])
    comp = int(det["component"])
    box = tuple(round(v, 3) for v in map_box(raw, "hog", comp))
    face = Face(box=box, points=points)
    problem = face_problem(face, width, height)
    if problem is not None:
        return None, problem[0]
    if int((~in_image(points, width, height)).sum()) > MAX_OUTSIDE:
        return None, "outside_image"
    return Labelled(box=box, detector_box=raw, score=float(det["score"]), component=comp, points=points), ""


# ================================================================================================ split
def split_by_file(files: Iterable[Path], test_fraction: float, seed: int) -> dict[str, list[Path]]:
    """Whole photos to ``train`` / ``test``: files ranked by ``sha256(f"{seed}/{file name}")``, the first
    ``round(n × test_fraction)`` go to test (at least one of each when ``n ≥ 2`` and ``test_fraction > 0``).

    Seeded by file name, not by list position: adding a photo moves at most the photos near the cut, and the split
    never depends on how many faces a photo has. Both lists come back sorted by name.
    """
    files = sorted(Path(f) for f in files)
    n = len(files)
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    ranked = sorted(files, key=lambda p: hashlib.sha256(f"{seed}/{p.name}".encode()).hexdigest())
    test = set(ranked[:n_test])
    return {"train": [f for f in files if f not in test], "test": [f for f in files if f in test]}


# ================================================================================================ the source
def photo_items(files: list[Path], cfg: Photos, seed: int, teacher: Teacher, on_bad: str,
                skipped: collections.Counter) -> tuple[dict[str, list], dict[str, dict[str, Any]], dict[str, Any]]:
    """Label ``files`` and split them by file → ``(splits, images, summary)``.

    ``splits``: ``{"train" | "test": [(source path, ImageRecord)]}`` with ``file = images/photos/<split>/<name>``
    (where :func:`mix` copies it); ``images``: the per-file teacher record (:func:`write_record`); ``summary``: photo
    and face counts (labelled, skipped by reason, photos without a face, identical files dropped). Identical files
    (same SHA-256) count once — the first by name — so one photo can never sit in both splits. An undecodable file
    stops the stage (``data.on_bad: error``) or is skipped and counted as ``bad_image`` (``skip``).
    """
    unique: dict[str, Path] = {}
    n_identical = 0
    for path in sorted(files):
        digest = file_sha256(path)
        if digest in unique:
            n_identical += 1
            continue
        unique[digest] = path
    by_path = {p: d for d, p in unique.items()}
    parts = split_by_file(list(unique.values()), cfg.test_fraction, seed)
    splits: dict[str, list] = {"train": [], "test": []}
    images: dict[str, dict[str, Any]] = {}
    faces_skipped: dict[str, int] = {}
    n_without = n_faces = 0
    for split, paths in parts.items():
        for path in paths:
            try:
                labels = teacher.label(path, sha256=by_path[path])
            except DataError as exc:
                bad_item(on_bad, skipped, "bad_image", str(exc))
                continue
            for reason, k in labels.skipped.items():
                faces_skipped[reason] = faces_skipped.get(reason, 0) + k
            if not labels.faces:
                n_without += 1
                continue
            n_faces += len(labels.faces)
            rec = ImageRecord(file=f"images/photos/{split}/{path.name}", faces=[f.face() for f in labels.faces])
            splits[split].append((path, rec))
            images[rec.file] = {"sha256": labels.sha256, "split": split, "source": path.name,
                                "faces": [f.record() for f in labels.faces]}
    summary = {"n_photos": len(files), "n_photos_identical_dropped": n_identical,
               "n_photos_train": len(parts["train"]), "n_photos_test": len(parts["test"]),
               "n_photos_without_faces": n_without, "n_faces_labelled": n_faces,
               "n_faces_skipped": int(sum(faces_skipped.values())), "faces_skipped": dict(sorted(faces_skipped.items()))}
    return splits, images, summary


def mix(checked: dict[str, list], root: Path, images: dict[str, dict[str, Any]], repeat: int) -> dict[str, list]:
    """The validated items of every split → the records to write, photos copied under ``root``.

    Synthetic records stay as they are, first; each photo record follows, its image copied byte for byte to
    ``root/<file>`` (so its SHA-256 stays the one recorded), listed ``repeat`` times in ``train`` (once in ``test``):
    the augment stage numbers each listing as a face of its own, so every listing gets its own augmented copies.
    ``images`` is pruned to the photos (and faces) that survived validation.
    """
    out: dict[str, list] = {}
    kept: set[str] = set()
    for split, items in checked.items():
        synth = [rec for _, rec in items if rec.file not in images]
        photos = [(src, rec) for src, rec in items if rec.file in images]
        for src, rec in photos:
            dst = Path(root) / rec.file
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            boxes = {tuple(float(v) for v in f.box) for f in rec.faces}
            images[rec.file]["faces"] = [f for f in images[rec.file]["faces"] if tuple(f["box"]) in boxes]
            kept.add(rec.file)
        times = repeat if split == "train" else 1
        out[split] = synth + [rec for _ in range(times) for _, rec in photos]
    for file in set(images) - kept:
        del images[file]
    return out


# ================================================================================================ record
def write_record(raw_dir: Path, images: dict[str, dict[str, Any]], teacher: Teacher, summary: dict) -> None:
    """Write :data:`RECORD` into ``raw_dir``: ``{"teacher": id, "summary": counts, "images": {file: {...}}}``."""
    doc = {"teacher": teacher.id, "summary": summary, "images": images}
    atomic_write_text(Path(raw_dir) / RECORD, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_record(raw_dir: str | Path) -> dict[str, Any]:
    """The teacher record of ``raw_dir``; ``{"images": {}}`` when the data has no teacher-labelled photo."""
    path = Path(raw_dir) / RECORD
    if not path.is_file():
        return {"images": {}}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), dict):
        raise DataError(f"{path}: no 'images' mapping (not a facemarks teacher record)")
    return doc


def teacher_files(raw_dir: str | Path, split: str | None = None) -> dict[str, str]:
    """``{file: teacher}`` of the files of ``raw_dir`` whose faces the teacher labelled (``file`` as in train.xml /
    test.xml and in the augmented splits' ``meta["files"]``), optionally of one ``split`` only."""
    images = read_record(raw_dir)["images"]
    return {f: TEACHER for f, rec in images.items() if split is None or rec.get("split") == split}


def teacher_mask(raw_dir: str | Path, files: Iterable[str]) -> np.ndarray:
    """``(N,)`` bool: which of ``files`` (e.g. an augmented split's ``meta["files"]``, one per sample) the teacher
    labelled — their NME is "from dlib's points", to be reported apart from faces with real ground truth."""
    taught = teacher_files(raw_dir)
    return np.array([str(f) in taught for f in files], dtype=bool)


def training_photo_hashes(raw_dir: str | Path) -> set[str]:
    """SHA-256 of every photo the ``photos`` source put in the training split of ``raw_dir`` (empty otherwise)."""
    images = read_record(raw_dir)["images"]
    return {rec["sha256"] for rec in images.values() if rec.get("split") == "train"}


def check_no_overlap(paths: Iterable[str | Path], hashes: set[str], key: str = "evaluate.photos") -> None:
    """Refuse a real-photo evaluation that contains a training photo: raises :class:`DataError` (one line naming
    ``key`` and the first offending file) when the SHA-256 of any of ``paths`` is in ``hashes``."""
    if not hashes:
        return
    bad = [Path(p) for p in paths if file_sha256(p) in hashes]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DataError(f"{key}: {bad[0]}{more} is a training photo of data.source = photos (same SHA-256); "
                        "evaluating on it would score the model on what it was taught — use photos it never saw")


__all__ = ["preflight", "Teacher", "photo_items", "mix", "Labelled", "PhotoLabels", "split_by_file", "write_record", "read_record",
           "teacher_files", "teacher_mask", "training_photo_hashes", "check_no_overlap", "file_sha256", "RECORD", "TEACHER",
           "MAX_OUTSIDE"]
