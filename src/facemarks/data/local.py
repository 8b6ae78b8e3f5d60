"""The ``local`` source: a folder of faces you already have → ``{"train": items, "test": items}``.

Three layouts, looked for in this order:

- **dlib XML**: ``*train*.xml`` + ``*test*.xml`` (the split as given), or one XML (split by
  ``data.local.test_fraction``).
- **keypoints CSV**: ``*train*.csv`` + ``*test*.csv``, or one ``*.csv``: one row per face, the image file name
  (relative to the CSV's folder, or a file name found once anywhere under the folder) then ``x0, y0, …, x67, y67``
  in pixels (0-indexed, pixel centres at integer coordinates), with or without a header row. The first row is a
  header when its first cell is not an image file name or any other cell is not a number. A row with the wrong
  number of columns (``wrong_column_count``), a cell that is not a number (``not_a_number``) or an image that is not
  there (``missing_image``) stops the stage with one line naming the file and the row, or is skipped and counted
  under ``data.on_bad: skip``. Rows naming the same image are that image's faces.
- **300-W ``.pts``** files beside their images (same stem; 1-indexed points → 0-indexed).

Points-only faces (CSV, ``.pts``) have no detector box: ``data.local.box`` gives it — ``training`` (default), the
training-box rule :func:`facemarks.core.landmarks.face_box` that ``predict``'s mapped detector boxes follow, or
``tight``, the tight box of the points ``(min x, min y, max x − min x + 1, max y − min y + 1)``.

A single list is split by person group (:mod:`facemarks.data.groups`, ``data.local.group``): a group's images are all
train or all test. The used images are copied under ``images/<split>/`` (``data/raw`` must be self-contained for
DVC), and their groups are returned for ``data/raw/groups.json``.
"""
from __future__ import annotations

import collections
import csv
import logging
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from facemarks.data import groups
from facemarks.core.io import IMAGE_SUFFIXES, DataError, Face, ImageRecord, read_dlib_xml, read_pts
from facemarks.core.landmarks import N_POINTS
from facemarks.core.params import Local, compile_rule
from facemarks.core.landmarks import face_box
from facemarks.data.validate import Items, Splits
from facemarks.data.validate import skip_item as _skip

log = logging.getLogger("facemarks.data.local")

CSV_COLUMNS = 1 + 2 * N_POINTS  # image file name, then x0, y0, ..., x67, y67


class BadRow(DataError):
    """A CSV row that cannot be read; ``reason`` is its skip-count key in ``metrics/download.json``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def local_splits(cfg: Local, seed: int, on_bad: str, skipped: collections.Counter) -> Splits:
    """Read the local folder → ``{"train": [(image path, record)], "test": [...]}`` (records not yet validated)."""
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.local.path = {cfg.path!r}: not a folder")
    rule = compile_rule(cfg.group)
    for suffix, read in ((".xml", _read_xml_lists), (".csv", lambda paths, bad, sk: _read_csvs(paths, bad, sk, cfg.box))):
        lists = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        if not lists:
            continue
        trains = [p for p in lists if "train" in p.name.lower()]
        tests = [p for p in lists if "test" in p.name.lower() and p not in trains]
        if trains and tests:
            ignored = sorted(set(lists) - set(trains) - set(tests))
            if ignored:
                log.info("local: ignoring %s (neither *train*%s nor *test*%s)", ", ".join(p.name for p in ignored),
                         suffix, suffix)
            return {"train": read(trains, on_bad, skipped), "test": read(tests, on_bad, skipped)}
        if len(lists) == 1:
            return seeded_split(read(lists, on_bad, skipped), cfg.test_fraction, seed, rule)
        raise DataError(f"{folder}: {len(lists)} {suffix} files ({', '.join(p.name for p in lists)}) but no "
                        f"*train*{suffix} + *test*{suffix} pair; keep one list, or name them *train*{suffix} / "
                        f"*test*{suffix}")
    pts = sorted(folder.rglob("*.pts"))
    if pts:
        return seeded_split(_read_pts_folder(pts, on_bad, skipped, cfg.box), cfg.test_fraction, seed, rule)
    raise DataError(f"{folder}: no dlib XML (*.xml), no keypoints CSV (*.csv) and no 300-W .pts files found")


def seeded_split(items: Items, test_fraction: float, seed: int, rule=None) -> Splits:
    """Split images (not faces) into train/test by person group: sorted by path, then the groups permuted by a
    generator seeded from ``seed`` (:func:`facemarks.data.groups.group_split`; the empty ``rule``: every item its own
    group, the split by image of before).

    About ``round(n × test_fraction)`` images go to test, at least one of each split when ``n ≥ 2``.
    """
    items = sorted(items, key=lambda it: (str(it[0]), it[1].file))
    names = [str(i) for i in range(len(items))] if rule is None else item_groups(items, rule)
    rng = np.random.default_rng(groups.split_seed(seed, "local-split"))
    test_idx = set(groups.group_split(names, test_fraction, rng).tolist())
    return {"train": [it for i, it in enumerate(items) if i not in test_idx],
            "test": [it for i, it in enumerate(items) if i in test_idx]}


def item_groups(items: Items, rule) -> list[str]:
    """The person group of each item (its source image's file name under ``rule``; the empty rule: the path)."""
    return [groups.group_of(path.name, rule) if rule is not None else str(path) for path, _ in items]


def _read_xml_lists(paths: list[Path], on_bad: str, skipped: collections.Counter) -> Items:
    items = []
    for path in paths:
        items += [(path.parent / r.file, r) for r in read_xml_lenient(path, on_bad, skipped)]
    return items


def read_xml_lenient(path: Path, on_bad: str, skipped: collections.Counter) -> list[ImageRecord]:
    """:func:`facemarks.core.io.read_dlib_xml`; with ``on_bad="skip"`` a malformed ``<image>`` is skipped and counted
    in ``skipped["malformed_xml"]`` instead.

    A file that is not well-formed XML at all is always an error (nothing in it can be trusted).
    """
    try:
        return read_dlib_xml(path)
    except DataError:
        if on_bad == "error":
            raise
    try:
        images = ET.parse(path).getroot().find("images")
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc}); fix or remove it") from None
    if images is None:
        raise DataError(f"{path}: no <images> element (not a dlib landmark XML)")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.xml"
        for elem in images.findall("image"):
            one.write_text(f"<dataset><images>{ET.tostring(elem, encoding='unicode')}</images></dataset>",
                           encoding="utf-8")
            try:
                records += read_dlib_xml(one)
            except DataError as exc:
                message = str(exc).replace(str(one), f"{path} [{elem.get('file')}]")
                _skip(skipped, _message_reason(message, "malformed_xml"), message)
    return records


def _read_csvs(paths: list[Path], on_bad: str, skipped: collections.Counter, box: str) -> Items:
    items: Items = []
    for path in paths:
        items += read_keypoints_csv(path, on_bad, skipped, box)
    return items


def read_keypoints_csv(path: Path, on_bad: str, skipped: collections.Counter, box: str = "training") -> Items:
    """A keypoints CSV (module docstring) → ``[(image path, record)]``, one record per image with its rows' faces,
    each face ``points (68, 2)`` with the ``box`` rule's box; rows are numbered from 1 as a spreadsheet shows them."""
    path = Path(path)
    images = _image_index(path.parent)
    faces: dict[Path, list[Face]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    for row_no, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if row_no == 1 and _is_header(cells):
            continue
        try:
            image, points = _parse_row(path, row_no, cells, images)
        except BadRow as exc:
            if on_bad == "error":
                raise
            _skip(skipped, exc.reason, str(exc))
            continue
        faces.setdefault(image, []).append(Face(box=points_box(points, box), points=points))
    return [(image, ImageRecord(file=image.name, faces=fs)) for image, fs in faces.items()]


def _is_header(cells: list[str]) -> bool:
    """A first row is a header when its first cell is not an image file name or another cell is not a number."""
    return Path(cells[0]).suffix.lower() not in IMAGE_SUFFIXES or not all(_is_number(c) for c in cells[1:])


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _parse_row(path: Path, row_no: int, cells: list[str], images: dict[str, list[Path]]) -> tuple[Path, np.ndarray]:
    """One CSV row → (image path, points (68, 2)); a bad row raises :class:`BadRow`."""
    where = f"{path}: row {row_no}"
    if len(cells) != CSV_COLUMNS:
        raise BadRow(f"{where}: {len(cells)} columns, expected {CSV_COLUMNS} (the image file name, then x0, y0, "
                        f"..., x67, y67)", "wrong_column_count")
    values = []
    for col, cell in enumerate(cells[1:], start=2):
        try:
            values.append(float(cell))
        except ValueError:
            raise BadRow(f"{where}, column {col}: {cell!r} is not a number", "not_a_number") from None
    found = images.get(cells[0].replace("\\", "/")) or images.get(Path(cells[0]).name, [])
    if len(found) != 1:
        problem = "not found" if not found else f"found {len(found)} times ({', '.join(map(str, found[:3]))})"
        raise BadRow(f"{where}: image {cells[0]!r} {problem} under {path.parent}",
                        "missing_image" if not found else "ambiguous_image")
    return found[0], np.asarray(values, np.float64).reshape(N_POINTS, 2)


def _image_index(folder: Path) -> dict[str, list[Path]]:
    """Every image under ``folder`` by its path relative to ``folder`` (posix) and by its bare file name."""
    index: dict[str, list[Path]] = collections.defaultdict(list)
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            rel = p.relative_to(folder).as_posix()
            index[rel].append(p)
            if rel != p.name:
                index[p.name].append(p)
    return dict(index)


def points_box(points: np.ndarray, rule: str = "training") -> tuple[float, float, float, float]:
    """The box of a points-only face ``points (68, 2)``: ``training`` (:func:`facemarks.core.landmarks.face_box`, the
    convention ``predict`` maps detector boxes onto) or ``tight`` (:func:`tight_box`)."""
    if rule == "tight":
        return tight_box(points)
    if rule == "training":
        pts = np.asarray(points, np.float64)
        return face_box(pts[np.isfinite(pts).all(axis=1)])
    raise ValueError(f"points_box: unknown rule {rule!r}; allowed: training, tight")


def _read_pts_folder(pts_files: list[Path], on_bad: str, skipped: collections.Counter, box: str = "training") -> Items:
    """``.pts`` files → ``[(image path, record)]``; one face per file, its box by the ``box`` rule."""
    items = []
    for pts_path in pts_files:
        image = _image_beside(pts_path)
        try:
            if image is None:
                raise DataError(f"{pts_path}: no image with the same stem ({', '.join(IMAGE_SUFFIXES)})")
            points = read_pts(pts_path)
        except DataError as exc:
            reason = _message_reason(str(exc), "bad_pts") if image is not None else "missing_image"
            if on_bad == "error":
                raise
            _skip(skipped, reason, str(exc))
            continue
        items.append((image, ImageRecord(file=image.name, faces=[Face(box=points_box(points, box), points=points)])))
    return items


def _message_reason(message: str, default: str) -> str:
    """Skip reason for a reader's :class:`DataError` message (``.pts`` and dlib XML readers in ``facemarks.core.io``)."""
    if any(k in message for k in ("points, expected", "n_points", "odd number", "part index")):
        return "wrong_point_count"
    if "finite" in message:
        return "nan_coordinates"
    return default


def _image_beside(pts_path: Path) -> Path | None:
    for p in sorted(pts_path.parent.glob(pts_path.stem + ".*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            return p
    return None


def tight_box(points: np.ndarray) -> tuple[float, float, float, float]:
    """``points (68, 2)`` → ``(left, top, width, height)`` whose pixel span covers every point centre."""
    lo, hi = np.nanmin(points, axis=0), np.nanmax(points, axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0] - lo[0] + 1), float(hi[1] - lo[1] + 1)


def copy_local_images(checked: Splits, root: Path) -> dict[str, list[ImageRecord]]:
    """Copy each used image to ``root/images/<split>/<name>`` (a numeric suffix on name clashes)."""
    out: dict[str, list[ImageRecord]] = {}
    for split, items in checked.items():
        used: set[str] = set()
        out[split] = []
        for src, rec in items:
            name, k = src.name, 1
            while name.lower() in used:
                name, k = f"{src.stem}_{k}{src.suffix}", k + 1
            used.add(name.lower())
            dst = root / "images" / split / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            out[split].append(ImageRecord(file=f"images/{split}/{name}", faces=rec.faces))
    return out
