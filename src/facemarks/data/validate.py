"""Record validation of the data sources: which faces are unusable, and what ``data.on_bad`` does with them.

Image level: ``missing_image``, ``bad_image`` (undecodable/truncated). Face level (:func:`face_problem`):
``wrong_point_count``, ``nan_coordinates``, ``zero_area_box``, ``absurd_coordinates`` (farther than one image size
outside the image), and ``duplicate`` (same file and box twice). ``data.on_bad: error`` raises
:class:`~facemarks.core.io.DataError` naming the file and the problem; ``skip`` drops the item, logs one warning line and
counts it by reason (:func:`bad_item`). Points ``(68, 2)`` px; boxes ``(left, top, width, height)`` px.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np

from facemarks.core.io import DataError, Face, ImageRecord, in_image, read_image
from facemarks.core.landmarks import N_POINTS

log = logging.getLogger("facemarks.data.sources")
Items = list[tuple[Path, ImageRecord]]  # (image path, record)
Splits = dict[str, Items]  # split name → items


def skip_item(counter: collections.Counter, reason: str, message: str) -> None:
    """Count a skipped item under ``reason`` and log one warning line."""
    counter[reason] += 1
    log.warning("skipping (%s): %s", reason, message)


def validate_splits(splits: Splits, on_bad: str, skipped: collections.Counter) -> tuple[Splits, dict]:
    """Validate every split with :func:`validate_records` (duplicates are looked for across splits).

    Returns ``(checked, stats)``: the usable ``(image path, record)`` pairs per split and counts of kept points
    outside their box / image and of images left without faces.
    """
    seen: set = set()
    stats = {"n_points_outside_box": 0, "n_points_outside_image": 0, "n_images_without_faces": 0}
    checked = {split: validate_records(items, on_bad, skipped, seen, stats) for split, items in splits.items()}
    return checked, stats


def validate_records(items: Items, on_bad: str, skipped: collections.Counter, seen: set, stats: dict) -> Items:
    """Check each ``(image path, record)``; bad images/faces raise (``on_bad="error"``) or are skipped and counted.

    Image level: ``missing_image``, ``bad_image`` (undecodable/truncated). Face level (:func:`face_problem`):
    ``wrong_point_count``, ``nan_coordinates``, ``zero_area_box``, ``absurd_coordinates``; plus ``duplicate``
    (same image file and box seen before, in any split; ``seen`` carries the keys). Images left with no faces are
    dropped and counted in ``stats["n_images_without_faces"]``.
    """
    out = []
    for image_path, rec in items:
        try:
            img = read_image(image_path)
        except DataError as exc:
            reason = "bad_image" if Path(image_path).is_file() else "missing_image"
            bad_item(on_bad, skipped, reason, f"{exc} (listed as {rec.file!r})")
            continue
        height, width = img.shape[:2]
        faces = []
        for i, face in enumerate(rec.faces):
            problem = face_problem(face, width, height)
            key = (str(Path(image_path).resolve()), tuple(float(v) for v in face.box))
            if problem is None and key in seen:
                problem = ("duplicate", f"box {face.box} listed more than once")
            if problem is not None:
                bad_item(on_bad, skipped, problem[0], f"{image_path} (face {i}, listed as {rec.file!r}): {problem[1]}")
                continue
            seen.add(key)
            stats["n_points_outside_box"] += int((~face.in_box()).sum())
            stats["n_points_outside_image"] += int((~in_image(face.points, width, height)).sum())
            faces.append(face)
        if not faces:
            stats["n_images_without_faces"] += 1
            continue
        out.append((Path(image_path), ImageRecord(file=rec.file, faces=faces)))
    return out


def bad_item(on_bad: str, skipped: collections.Counter, reason: str, message: str) -> None:
    """``on_bad="error"``: raise :class:`~facemarks.core.io.DataError` with ``message``; ``skip``: :func:`skip_item`."""
    if on_bad == "error":
        raise DataError(f"{message} [{reason}; set data.on_bad: skip to skip and count such items]")
    skip_item(skipped, reason, message)


def face_problem(face: Face, width: int, height: int) -> tuple[str, str] | None:
    """``(reason, message)`` when ``face`` is unusable in a ``width × height`` image, else ``None``."""
    pts = np.asarray(face.points, dtype=np.float64)
    if pts.shape != (N_POINTS, 2):
        return "wrong_point_count", f"points of shape {pts.shape}, expected ({N_POINTS}, 2)"
    n_labelled = int(np.isfinite(pts).all(axis=1).sum())
    if n_labelled != N_POINTS:
        return "wrong_point_count", f"{n_labelled} labelled points, expected {N_POINTS}"
    box = np.asarray(face.box, dtype=np.float64)
    if not np.isfinite(box).all():
        return "nan_coordinates", f"box {face.box} is not finite"
    if box[2] <= 0 or box[3] <= 0:
        return "zero_area_box", f"box {face.box} has zero area"
    # The image spans [-0.5, size - 0.5]; allow one more image size on each side.
    lo = np.array([-0.5 - width, -0.5 - height], dtype=np.float64)
    hi = np.array([2 * width - 0.5, 2 * height - 0.5], dtype=np.float64)
    far = ~((pts >= lo) & (pts <= hi)).all(axis=1)
    if far.any():
        i = int(np.flatnonzero(far)[0])
        return "absurd_coordinates", (f"point {i} at ({pts[i, 0]:g}, {pts[i, 1]:g}) lies more than one image size "
                                      f"outside the {width}×{height} image")
    corners = np.array([[box[0], box[1]], [box[0] + box[2], box[1] + box[3]]])
    if not ((corners >= lo) & (corners <= hi)).all():
        return "absurd_coordinates", f"box {face.box} lies more than one image size outside the {width}×{height} image"
    return None


__all__ = ["face_problem", "validate_records", "validate_splits", "bad_item", "skip_item"]
