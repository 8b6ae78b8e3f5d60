"""Readers and writers for dlib landmark XML, 300-W ``.pts`` files and images.

Coordinates are pixels with pixel centres at integer coordinates (0-indexed), see ``docs/design.md``.
dlib XML is already 0-indexed; ``.pts`` files are 1-indexed (MATLAB) and are shifted by −1 on read, +1 on write.

Shape legend: ``K = 68`` landmarks; ``points (K, 2)`` as ``(x, y)``.
"""
from __future__ import annotations

import fnmatch
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from facemarks.core.atomic import atomic_path, atomic_write_text
from facemarks.core.landmarks import N_POINTS

#: image file suffixes every reader of a folder of photos accepts (lower case)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """Bad input data; the message names the offending file."""


@dataclass
class Face:
    """One annotated face: ``box = (left, top, width, height)`` px, ``points (68, 2)`` float64 (NaN = unlabelled)."""

    box: tuple[float, float, float, float]
    points: np.ndarray

    def in_box(self) -> np.ndarray:
        """``(68,)`` bool: point lies inside the box (pixel-centre convention, inclusive edges)."""
        left, top, w, h = self.box
        x, y = self.points[:, 0], self.points[:, 1]
        return (x >= left - 0.5) & (x <= left + w - 0.5) & (y >= top - 0.5) & (y <= top + h - 0.5)


@dataclass
class ImageRecord:
    """One image: ``file`` relative to the XML's folder, and its faces."""

    file: str
    faces: list[Face] = field(default_factory=list)


def in_image(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """``points (..., 2)`` → bool ``(...)``: inside an image of ``width × height`` (edges at −0.5 and size−0.5)."""
    x, y = points[..., 0], points[..., 1]
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def box_iou(a: tuple | np.ndarray, b: tuple | np.ndarray) -> float:
    """Intersection over union of two boxes ``(left, top, width, height)``."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    return float(inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-9))


def _num(elem: ET.Element, key: str, where: str) -> float:
    raw = elem.get(key)
    if raw is None:
        raise DataError(f"{where}: <{elem.tag}> has no '{key}' attribute")
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{where}: <{elem.tag}> {key}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: <{elem.tag}> {key}={raw!r} is not finite")
    return value


def read_dlib_xml(path: str | Path) -> list[ImageRecord]:
    """Parse a dlib ``<dataset><images><image file=…><box …><part …/>`` file.

    Missing parts are NaN. Raises :class:`DataError` naming the file (and image) on malformed content.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: cannot parse dlib XML ({exc})") from None
    images = root.find("images")
    if images is None:
        raise DataError(f"{path}: no <images> element (not a dlib landmark XML)")
    records = []
    for img in images.findall("image"):
        file = img.get("file")
        if not file:
            raise DataError(f"{path}: <image> without a 'file' attribute")
        where = f"{path} [{file}]"
        faces = []
        for box in img.findall("box"):
            b = tuple(_num(box, k, where) for k in ("left", "top", "width", "height"))
            pts = np.full((N_POINTS, 2), np.nan)
            for part in box.findall("part"):
                name = part.get("name", "")
                try:
                    idx = int(name)
                except ValueError:
                    raise DataError(f"{where}: <part name={name!r}> is not a landmark index") from None
                if not 0 <= idx < N_POINTS:
                    raise DataError(f"{where}: part index {idx} outside 0..{N_POINTS - 1}")
                pts[idx] = (_num(part, "x", where), _num(part, "y", where))
            faces.append(Face(box=b, points=pts))
        records.append(ImageRecord(file=file, faces=faces))
    return records


def _fmt(v: float) -> str:
    """Integers as dlib writes them; sub-pixel values to 1e-3 px."""
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}"


def dlib_xml_text(records: list[ImageRecord], name: str = "facemarks") -> str:
    """Serialise records in dlib's layout (integer coordinates stay integers; NaN parts are omitted)."""
    lines = ["<?xml version='1.0' encoding='ISO-8859-1'?>", "<dataset>", f"<name>{name}</name>", "<images>"]
    for rec in records:
        lines.append(f"  <image file='{escape(rec.file, {chr(39): '&apos;'})}'>")
        for face in rec.faces:
            left, top, w, h = face.box
            lines.append(f"    <box top='{_fmt(top)}' left='{_fmt(left)}' width='{_fmt(w)}' height='{_fmt(h)}'>")
            for i, (x, y) in enumerate(face.points):
                if np.isfinite(x) and np.isfinite(y):
                    lines.append(f"      <part name='{i:02d}' x='{_fmt(x)}' y='{_fmt(y)}'/>")
            lines.append("    </box>")
        lines.append("  </image>")
    lines += ["</images>", "</dataset>", ""]
    return "\n".join(lines)


def write_dlib_xml(path: str | Path, records: list[ImageRecord], name: str = "facemarks") -> None:
    """Write records as dlib XML, atomically."""
    atomic_write_text(path, dlib_xml_text(records, name))


def read_pts(path: str | Path) -> np.ndarray:
    """Read a 300-W ``.pts`` file → ``(68, 2)`` float64, converted from 1-indexed to 0-indexed pixels."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read .pts ({exc})") from None
    header, _, rest = text.partition("{")
    body, close, _ = rest.partition("}")
    if not close:
        raise DataError(f"{path}: .pts without a '{{ … }}' point block")
    n_declared = None
    for line in header.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "n_points":
            try:
                n_declared = int(value)
            except ValueError:
                raise DataError(f"{path}: bad n_points {value.strip()!r}") from None
    try:
        values = np.array(body.split(), dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: non-numeric coordinates") from None
    if values.size % 2:
        raise DataError(f"{path}: odd number of coordinates ({values.size})")
    pts = values.reshape(-1, 2)
    if n_declared is not None and n_declared != len(pts):
        raise DataError(f"{path}: n_points says {n_declared} but {len(pts)} points follow")
    if len(pts) != N_POINTS:
        raise DataError(f"{path}: {len(pts)} points, expected {N_POINTS}")
    if not np.isfinite(pts).all():
        raise DataError(f"{path}: non-finite coordinates")
    return pts - 1.0


def write_pts(path: str | Path, points: np.ndarray) -> None:
    """Write ``points (68, 2)`` (0-indexed) as a 1-indexed 300-W ``.pts`` file, atomically."""
    body = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in np.asarray(points, dtype=np.float64))
    atomic_write_text(path, f"version: 1\nn_points:  {len(points)}\n{{\n{body}\n}}\n")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file → uint8 ``(H, W)`` or ``(H, W, 3)``; raises :class:`DataError` naming the file."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    try:
        img = iio.imread(path)
    except Exception as exc:  # imageio raises many types for truncated/unknown files
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim not in (2, 3) or img.size == 0:
        raise DataError(f"{path}: unexpected image shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img / max(float(img.max()), 1.0) * 255.0, 0, 255).astype(np.uint8)
    return img


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder`` (suffix in :data:`IMAGE_SUFFIXES`, any case), sorted by name.

    No recursion, hidden files skipped; an empty list when there are none (callers decide whether that is an error).
    """
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


class PhotosError(DataError):
    """A bad photo folder: one line naming its params key (a stage prints it and exits 1)."""


def photo_files(folder: str | Path, pattern: str = "", key: str = "evaluate.photos") -> list[Path]:
    """The photo-folder lister: the images of ``folder`` (:func:`list_images`; ``~`` expanded), narrowed by
    ``pattern`` (a glob on the file name, e.g. ``evaluate.photos_glob``; empty: all), or :class:`PhotosError` naming
    ``key`` when the folder does not exist or holds no such image. Cheap: run it before any work."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise PhotosError(f"{key}: {folder} is not a folder (it does not exist or is a file)")
    files = [p for p in list_images(path) if not pattern or fnmatch.fnmatch(p.name, pattern)]
    if not files:
        what = (f"matching {pattern!r}" if pattern
                else f"files (suffixes {', '.join(IMAGE_SUFFIXES)}; subfolders are not searched)")
        raise PhotosError(f"{key}: {folder} holds no image {what}")
    return files


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of a uint8 ``(H, W)`` gray or ``(H, W, 3)`` RGB image whose bytes depend on the pixels alone.

    zlib's compressed output depends on the zlib build that Pillow loads (the system ``libz`` on Debian's Python,
    zlib-ng in other wheels) and on its CPU code paths; this writer uses none of it: filter type 0 on every row and
    stored (uncompressed) deflate blocks, framed by hand, with the CRC-32 and Adler-32 checksums (defined values,
    the same from any implementation). About twice the size of zlib level 1 on the synthetic faces (README).
    """
    import struct
    import zlib

    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"png_bytes: need uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    rows = np.zeros((h, 1 + img[0].size), np.uint8)  # filter byte 0 (None) + the row's samples
    rows[:, 1:] = img.reshape(h, -1)
    raw = rows.tobytes()
    blocks, step = [], 65535
    for i in range(0, max(len(raw), 1), step):
        part = raw[i:i + step]
        blocks.append(struct.pack("<BHH", int(i + step >= len(raw)), len(part), 0xFFFF ^ len(part)) + part)
    idat = b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(raw))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if img.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_image(path: str | Path, image: np.ndarray, portable: bool = False) -> None:
    """Write a uint8 image atomically; the format follows the suffix (``.png``, ``.jpg``).

    ``portable=True`` (``.png`` only): :func:`png_bytes`, the same bytes on every machine (the data stages'
    images); else zlib level 1 through imageio/Pillow (smaller, bytes may differ between machines: reports).
    """
    import imageio.v3 as iio

    path = Path(path)
    if portable:
        if path.suffix.lower() != ".png":
            raise ValueError(f"{path}: portable image writing is PNG only")
        data = png_bytes(image)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
        return
    # zlib level 1: ~3x faster than the default 6 for ~5 % larger files (PNG is lossless either way)
    options = {"compress_level": 1} if path.suffix.lower() == ".png" else {}
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image, extension=path.suffix, **options)
