"""The one real-photo protocol: a folder of photos (``evaluate.photos``) or, by default, the portraits bundled with the
installed packages, scored against human markup where a photo has it, else against dlib's 68 points.

scikit-image's ``astronaut`` (Eileen Collins) and matplotlib's ``grace_hopper`` sample are real photographs that
every install of this project has. Neither is used for training (the synthetic generator's backgrounds are other
bundled pictures). Per photo, dlib's HOG detector (upsample 1) and 68-point predictor run once, cached by the image's
SHA-256 (:data:`PHOTO_CACHE`); a detection is a reference face only when it is a face
(:func:`facemarks.serving.detect.is_face`: a sure HOG margin, or dlib's CNN confirms it — the astronaut's mission
patch is not); the model is given dlib's box mapped onto the training convention, exactly as ``facemarks predict``
gives it, with one flip setting (``evaluate.flip_test``). dlib itself is about 3-4 % from human markup on such
portraits, so values below that are not meaningful. The astronaut figure and the detection report reuse these
references.

Shapes: images uint8 ``(H, W, 3)``; boxes ``(left, top, width, height)`` px; points ``(68, 2)`` px with pixel
centres at integer coordinates.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from facemarks.evaluation import metrics
from facemarks.core.atomic import atomic_write_json
from facemarks.augmentation.crops import apply_transform, face_crop
from facemarks.serving.detect import DLIB_UPSAMPLE, best_same_face, dlib_boxes, is_face, map_box
from facemarks.core.hashing import file_sha256
from facemarks.core.io import photo_files, read_dlib_xml, read_image, read_pts
from facemarks.evaluation.peers import dlib68
from facemarks.serving.predict import predict_many
from facemarks.evaluation.stats import paired_comparison
from facemarks.core.landmarks import face_box

#: name -> loader of a bundled portrait (uint8 RGB).
PORTRAITS = ("astronaut", "grace_hopper")


def load_portrait(name: str) -> np.ndarray:
    """The bundled portrait ``name`` as uint8 ``(H, W, 3)``."""
    if name == "astronaut":
        from skimage import data

        return np.asarray(data.astronaut())
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        return np.asarray(Image.open(path).convert("RGB"))
    raise ValueError(f"unknown portrait {name!r}; known: {', '.join(PORTRAITS)}")


# ------------------------------------------------------------------------------------ a folder of photos
# ``evaluate.photos``: every loss on a folder of photos. A photo with human markup beside it (a dlib XML list in the
# folder, or a 300-W ``<stem>.pts``) is scored against that markup; a photo without against dlib's 68 points in dlib's
# own detector box. Shapes: ``F`` faces over the folder; points ``(F, 68, 2)`` px; per-face NME ``(F,)`` in %.
PHOTOS_KEY = "evaluate.photos"
#: dlib's detections and points per photo, by image SHA-256 (an untracked side cache of evaluate and export)
PHOTO_CACHE = "data/cache/photo_refs"
ABOVE_NME = 10.0  # % NME: a face above this counts as a failure in the real-photo summary (``share_above_10``)
REFERENCES = ("human", "dlib")
#: the rule that decides which of dlib's detections are reference faces (metrics/eval.json, ``photos.face_rule``)
FACE_RULE = ("dlib HOG margin >= 0.3, or a weaker detection that dlib's CNN confirms in a crop around it "
             "(facemarks.serving.detect.is_face); other detections are dropped and counted")
CACHE_VERSION = 2  # cache rows carry the HOG score and the face rule's answer


@dataclass(frozen=True)
class PhotoFace:
    """One face of the real-photo set.

    ``box`` is what the model is given: dlib's detector box mapped onto the training-box convention
    (:func:`facemarks.serving.detect.map_box`, exactly what ``facemarks predict`` gives the model), or, for a human-marked
    face dlib's detector misses, the box made from the markup the way training boxes are made
    (:func:`facemarks.core.landmarks.face_box`; ``box_source`` says which). ``detector_box`` is dlib's own box (None when
    dlib missed the face); ``points`` ``(68, 2)`` the reference (``reference``: ``human`` or ``dlib``).
    """

    file: str
    index: int
    sha256: str
    reference: str
    box: tuple[float, float, float, float]
    box_source: str
    detector_box: tuple[float, float, float, float] | None
    points: np.ndarray


@dataclass
class PhotoSet:
    """The faces of a folder (or of the bundled portraits) with their images, and what was left out."""

    folder: str
    faces: list[PhotoFace]
    images: dict[str, np.ndarray]  # file -> (H, W[, 3]) uint8
    n_images: int
    no_face: list[str]  # images in which neither markup nor dlib gives a face
    dropped: list[str] = field(default_factory=list)  # "<file>@<left>,<top>": dlib detections that are not faces

    def index(self, file: str) -> int | None:
        """The largest face of ``file`` (its position in :attr:`faces`), None when the file has none."""
        found = [i for i, f in enumerate(self.faces) if f.file == file]
        return max(found, key=lambda i: self.faces[i].box[2]) if found else None


def human_markup(folder: str | Path, files: list[Path]) -> dict[str, list[np.ndarray]]:
    """Human 68-point markup of ``files`` by file name: faces of every dlib XML list in ``folder`` whose ``file``
    names one of them, and a 300-W ``<stem>.pts`` beside an image (1-indexed on disk, 0-indexed here). Points
    ``(68, 2)`` px; a face with missing points is kept (NaN points are left out of its NME)."""
    names = {p.name for p in files}
    out: dict[str, list[np.ndarray]] = {}
    for xml in sorted(Path(folder).glob("*.xml")):
        try:
            records = read_dlib_xml(xml)
        except ValueError:  # an XML that is not a dlib landmark list: not markup
            continue
        for rec in records:
            name = Path(rec.file).name
            if name in names:
                out.setdefault(name, []).extend(np.asarray(f.points, np.float64) for f in rec.faces)
    for p in files:
        pts = p.with_suffix(".pts")
        if p.name not in out and pts.is_file():
            out[p.name] = [np.asarray(read_pts(pts), np.float64)]
    return out


def _dlib_faces(image: np.ndarray, digest: str, cache: Path | None) -> list[tuple[tuple, int, np.ndarray, bool]]:
    """dlib's HOG detections (upsample 1) of one image with dlib's 68 points in each: ``[(raw box, component,
    points (68, 2), is a face)]``, best first (the last item: :func:`facemarks.serving.detect.is_face`); cached as
    ``<cache>/<sha256 of the image>-u1-v2.json`` when ``cache`` is given (a rerun then runs no dlib on that image)."""
    path = None if cache is None else Path(cache) / f"{digest}-u{DLIB_UPSAMPLE}-v{CACHE_VERSION}.json"
    if path is not None and path.is_file():
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [(tuple(r["box"]), int(r["component"]), np.asarray(r["points"], np.float64), bool(r["face"]))
                for r in rows]
    out = [(tuple(float(v) for v in raw), int(k), np.asarray(dlib68().predict(image, raw), np.float64),
            is_face(image, raw, score, k)) for raw, score, k in dlib_boxes(image, DLIB_UPSAMPLE)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, [{"box": list(b), "component": k, "points": p.tolist(), "face": f}
                                 for b, k, p, f in out])
    return out


def photo_set(folder: str | Path | None, pattern: str = "", key: str = PHOTOS_KEY,
              cache: str | Path | None = None) -> PhotoSet:
    """References for the real-photo evaluation (needs the ``peers`` extra for dlib).

    ``folder`` empty / None: the two bundled portraits (:data:`PORTRAITS`). Per image: dlib's detections that are
    faces (:data:`FACE_RULE`; the others are counted in :attr:`PhotoSet.dropped`); then human-marked faces
    (:func:`human_markup`) first, each given the detection that is the same face as its markup box
    (:func:`facemarks.serving.detect.best_same_face`); only in images without markup, every detected face, with
    dlib's 68 points in dlib's box as the reference. Faces are ordered by file name, then left to right. ``cache``:
    a folder for dlib's results per image (:func:`_dlib_faces`), keyed by the image's SHA-256.
    """
    if folder:
        files = photo_files(folder, pattern, key)
        markup = human_markup(folder, files)
        images = {p.name: read_image(p) for p in files}
        hashes = {p.name: file_sha256(p) for p in files}
    else:
        images = {f"{name}.png": load_portrait(name) for name in PORTRAITS}
        markup = {}
        hashes = {n: hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for n, im in images.items()}
    faces, no_face, dropped = [], [], []
    for name, image in images.items():
        found = _dlib_faces(image, hashes[name], None if cache is None else Path(cache))
        dropped += [f"{name}@{raw[0]:.0f},{raw[1]:.0f}" for raw, _, _, face in found if not face]
        found = [(raw, k, pts) for raw, k, pts, face in found if face]
        mapped = [map_box(raw, "dlib", k) for raw, k, _ in found]
        rows = []
        if name in markup:
            for pts in markup[name]:
                own = face_box(pts[np.isfinite(pts).all(1)])
                k = best_same_face(own, mapped)
                rows.append(("human", own if k is None else mapped[k], "markup" if k is None else "dlib",
                             None if k is None else found[k][0], pts))
        else:
            rows = [("dlib", box, "dlib", raw, pts) for (raw, _, pts), box in zip(found, mapped)]
        if not rows:
            no_face.append(name)
        rows.sort(key=lambda r: r[1][0])
        faces += [PhotoFace(name, i, hashes[name], ref, tuple(float(v) for v in box), src, det, np.asarray(pts))
                  for i, (ref, box, src, det, pts) in enumerate(rows)]
    return PhotoSet(str(folder or ""), faces, images, len(images), no_face, dropped)


def face_nme(pred: np.ndarray, faces: list[PhotoFace]) -> np.ndarray:
    """Per-face NME (%) of ``pred (F, 68, 2)`` against each face's reference, inter-ocular (points 36, 45) of the
    reference; missing reference points are left out."""
    gt = np.stack([f.points for f in faces])
    return 100 * metrics.nme(np.asarray(pred, np.float64), gt, metrics.normaliser(gt, "io"), np.isfinite(gt).all(-1))


def loss_summary(nme: np.ndarray, faces: list[PhotoFace]) -> dict[str, Any]:
    """``{n_faces, median, mean, share_above_10}`` of per-face NME ``(F,)`` (%), overall and per reference kind."""
    def row(v: np.ndarray) -> dict[str, Any]:
        v = v[np.isfinite(v)]
        return {"n_faces": int(len(v)), "median": float(np.median(v)) if len(v) else None,
                "mean": float(np.mean(v)) if len(v) else None,
                "share_above_10": float(np.mean(v > ABOVE_NME)) if len(v) else None}

    out = row(np.asarray(nme, np.float64))
    kinds = np.array([f.reference for f in faces])
    out["by_reference"] = {k: row(np.asarray(nme)[kinds == k]) for k in REFERENCES if (kinds == k).any()}
    return out


def photos_report(photos: PhotoSet, nme: dict[str, np.ndarray], decoders: dict[str, str], seed: int = 0,
                  flip: bool = False) -> dict[str, Any]:
    """The ``photos`` block of ``metrics/eval.json``: what was scored (folder, images, faces per reference kind, box
    sources, images without a face), each loss's :func:`loss_summary` and decoder, and the paired per-face
    comparison of every pair of losses (:func:`facemarks.evaluation.stats.paired_comparison`, NME points)."""
    kinds = [f.reference for f in photos.faces]
    report: dict[str, Any] = {
        "folder": photos.folder or "bundled portraits (astronaut, grace_hopper)",
        "n_images": photos.n_images, "n_faces": len(photos.faces), "images_without_face": len(photos.no_face),
        "references": {k: kinds.count(k) for k in REFERENCES if k in kinds},
        "box_sources": {s: [f.box_source for f in photos.faces].count(s) for s in ("dlib", "markup")},
        "reference_rule": "human markup beside the photo where present, else dlib's 68 points in dlib's box",
        "face_rule": FACE_RULE, "false_faces_dropped": len(photos.dropped),
        "box_rule": "dlib's HOG box mapped to the training convention (as facemarks predict); markup box if dlib "
                    "misses a marked face",
        "flip_test": flip,
    }
    for loss, values in nme.items():
        report[loss] = {**loss_summary(values, photos.faces), "decoder": decoders[loss]}
    report["comparison"] = {}
    for a, b in combinations(list(nme), 2):
        if len(photos.faces) >= 2:
            c = paired_comparison(np.asarray(nme[b]), np.asarray(nme[a]), names=(b, a), seed=seed)
            report["comparison"][f"{b}_vs_{a}"] = c.as_dict()
    return report


def faces_csv(photos: PhotoSet, nme: dict[str, np.ndarray]) -> str:
    """Per-face rows (file, face, reference, box_source, NME % per loss) as CSV text, in face order."""
    head = ["file", "face", "reference", "box_source", *[f"nme_{loss}" for loss in nme]]
    lines = [",".join(head)]
    for i, f in enumerate(photos.faces):
        vals = [f"{float(nme[loss][i]):.4f}" for loss in nme]
        lines.append(",".join([f.file, str(f.index), f.reference, f.box_source, *vals]))
    return "\n".join(lines) + "\n"


def predict_faces(model: Any, loss: str, photos: PhotoSet, *, size: int, margin: float, sigma: float, decoder: str,
                  flip: bool = False, batch_size: int = 64) -> np.ndarray:
    """``model`` (torch or :class:`facemarks.serving.runtime.OnnxHeatmaps`) on every face of ``photos`` in its ``box``,
    exactly as ``facemarks predict --box`` crops and decodes: points ``(F, 68, 2)`` image px, in face order."""
    groups: list[tuple[str, list]] = []
    for f in photos.faces:
        if not groups or groups[-1][0] != f.file:
            groups.append((f.file, []))
        groups[-1][1].append(f.box)
    out = predict_many(model, [(photos.images[name], boxes) for name, boxes in groups], loss, size=size,
                       margin=margin, sigma=sigma, decoder=decoder, batch_size=batch_size, flip=flip)
    if not out:
        return np.zeros((0, 68, 2))
    return np.concatenate([points for points, _ in out])


def worst_faces(photos: PhotoSet, points: np.ndarray, nme: np.ndarray, n: int = 12, size: int = 128,
                margin: float = 0.25) -> dict[str, np.ndarray]:
    """The ``n`` faces with the highest NME ``(F,)``, worst first, for a contact sheet: grey crops
    ``photos_crops (M, size, size)`` uint8 around each face's box, the reference ``photos_ref (M, 68, 2)`` and the
    prediction ``photos_pred (M, 68, 2)`` in crop px, ``photos_nme (M,)`` % and ``photos_label (M,)`` text
    (``file#face (reference)``)."""
    order = [int(i) for i in np.argsort(-np.nan_to_num(np.asarray(nme, np.float64), nan=-1.0))[:n]]
    crops, refs, preds = [], [], []
    for i in order:
        face = photos.faces[i]
        crop, T = face_crop(photos.images[face.file], face.box, size, margin)
        crops.append(crop)
        refs.append(apply_transform(face.points, T))
        preds.append(apply_transform(points[i], T))
    empty = np.zeros((0, 68, 2))
    return {"photos_crops": np.stack(crops) if crops else np.zeros((0, size, size), np.uint8),
            "photos_ref": np.stack(refs) if refs else empty, "photos_pred": np.stack(preds) if preds else empty,
            "photos_nme": np.asarray([float(nme[i]) for i in order], np.float64),
            "photos_label": np.asarray([f"{photos.faces[i].file}#{photos.faces[i].index} "
                                        f"({photos.faces[i].reference})" for i in order])}


def evaluate_photos(models: dict[str, Any], decoders: dict[str, str], photos: PhotoSet, *, size: int, margin: float,
                    sigma: float, flip: bool = False, seed: int = 0,
                    worst: int = 12) -> tuple[dict[str, Any], str, dict[str, np.ndarray]]:
    """Every model ``{loss: model}`` on every face of ``photos`` (each at its ``decoders[loss]``): the ``photos``
    block (:func:`photos_report`), the per-face CSV (:func:`faces_csv`) and arrays for ``data/eval``:
    ``photos_points_<loss> (F, 68, 2)``, ``photos_nme_<loss> (F,)`` and the worst faces of the loss with the lowest
    median (:func:`worst_faces`), for the contact sheet of the plot stage."""
    nme, arrays = {}, {}
    for loss, model in models.items():
        pts = predict_faces(model, loss, photos, size=size, margin=margin, sigma=sigma, decoder=decoders[loss],
                            flip=flip)
        nme[loss] = face_nme(pts, photos.faces) if photos.faces else np.zeros(0)
        arrays[f"photos_points_{loss}"], arrays[f"photos_nme_{loss}"] = pts, nme[loss]
    report = photos_report(photos, nme, decoders, seed=seed, flip=flip)
    if photos.faces:
        leader = min(nme, key=lambda loss: float(np.nanmedian(nme[loss])))
        report["leader"] = leader
        arrays.update(worst_faces(photos, arrays[f"photos_points_{leader}"], nme[leader], n=worst))
        arrays["photos_worst_loss"] = np.asarray(leader)
    return report, faces_csv(photos, nme), arrays


def portrait_scores(model: Any, loss: str, *, size: int, margin: float, sigma: float, decoder: str,
                    flip: bool = False, cache: str | Path | None = None) -> dict[str, float]:
    """NME (%) of ``model`` on each bundled portrait's face (the largest of the file) under this module's protocol,
    and their ``mean``: ``{"astronaut": …, "grace_hopper": …, "mean": …}`` (the studies' smoke check)."""
    photos = photo_set(None, cache=cache)
    nme = face_nme(predict_faces(model, loss, photos, size=size, margin=margin, sigma=sigma, decoder=decoder,
                                 flip=flip), photos.faces)
    out = {name: float(nme[i]) for name in PORTRAITS if (i := photos.index(f"{name}.png")) is not None}
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out
