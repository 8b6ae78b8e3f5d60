"""Deterministic synthetic faces with 68 iBUG landmarks, drawn from the landmark geometry.

A 3-D landmark template (a 300-W-like mean shape with per-point depth) gets a random identity,
expression and pose, is projected with a perspective camera (the far side compresses; the jaw points
follow the head's silhouette like 300-W contour points), and the face is painted from the projected
points: Lambert-shaded skin with a random light direction and shading contrast, photographic texture blended
into the skin, hair, a neck in the face's own skin tone (so the jaw is found from shading, as in photos), ears,
eyes (sclera, iris, pupil, lash line), brows, nose shading and nostrils, lips, mouth and teeth, each feature at a
random per-face strength, over a crop of one of scikit-image's bundled pictures; then eyeglasses, hair strands,
a hand and other partial occluders (the points stay labelled, as 300-W labels occluded points), blur and noise.
The realism choices and what each one measured are in the README ("Realism of the synthetic faces").

This module puts a face together (:func:`render_face`: geometry from :mod:`facemarks.data.face_geometry`, painting
by :mod:`facemarks.data.face_paint`, then the box, blur and noise), writes splits (:func:`generate_split`) and
checks them (:func:`feature_energy`, :func:`contact_sheet`); :func:`facemarks.core.landmarks.face_box` is the box rule of the XML files.

Coordinates are pixels with pixel centres at integer coordinates (``docs/design.md``).
Shape legend: ``K = 68`` landmarks; ``points (K, 2)`` ``(x, y)``; images ``(H, W, 3)`` uint8.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from facemarks.data import portable
from facemarks.core.atomic import atomic_path
from facemarks.core.io import Face, ImageRecord, read_image, write_image
from facemarks.core.landmarks import face_box
from facemarks.core.params import Synthetic
from facemarks.data.face_geometry import pose_geometry
from facemarks.data.face_paint import Canvas, background, occlude, paint_face

# ----------------------------------------------------------------------------------------------- face
def render_face(rng: np.random.Generator, cfg: Synthetic) -> tuple[np.ndarray, Face]:
    """One synthetic face image: uint8 ``(H, W, 3)`` and its :class:`Face` (box, ``points (68, 2)`` float64 px)."""
    h, w = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, 2))
    g = pose_geometry(rng, cfg)
    lo, hi = g["points"].min(axis=0), g["points"].max(axis=0)
    extent = float(max(hi - lo))
    unit = min(h, w) * rng.uniform(0.4, 0.65) / extent  # px per template unit: face spans 40–65 % of the image
    size = (hi - lo) * unit
    # keep the landmarks (and most of the forehead above them) inside the image
    cx = rng.uniform(size[0] * 0.6, max(size[0] * 0.6, w - size[0] * 0.6))
    cy = rng.uniform(size[1] * 0.75, max(size[1] * 0.75, h - size[1] * 0.55))
    shift = np.array([cx, cy]) - (lo + hi) / 2 * unit
    for key in ("points", "hair", "forehead", "neck", "centre"):
        g[key] = g[key] * unit + shift
    g["ears"] = [e * unit + shift for e in g["ears"]]
    cv = Canvas(background(rng, h, w))
    paint_face(rng, cv, g, unit, cfg)
    points = g["points"].astype(np.float64)
    box = face_box(points)
    if rng.random() < cfg.occluder_prob:
        occlude(rng, cv, box)
    img = cv.img
    img *= np.float32(rng.uniform(0.8, 1.15) * 255.0)
    if rng.random() < cfg.blur_prob:
        s = rng.uniform(0.4, 1.1)
        img = portable.gaussian_filter(img, (s, s, 0), mode="reflect")
    if cfg.noise_std > 0:  # per-pixel noise, mostly luminance
        std = np.float32(cfg.noise_std * rng.uniform(0.2, 1.0))
        img += rng.standard_normal(img.shape[:2] + (1,), dtype=np.float32) * std
    np.clip(img, 0, 255, out=img)
    out = (img + 0.5).astype(np.uint8)
    return out, Face(box=box, points=points)


# ----------------------------------------------------------------------------------------------- splits
def _image_seed(seed: int, split: str, i: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(split.encode("utf-8")), i))


def _render_and_write(args: tuple[str, str, int, int, Synthetic]) -> ImageRecord:
    root, split, i, seed, cfg = args
    rng = np.random.default_rng(_image_seed(seed, split, i))
    image, face = render_face(rng, cfg)
    rel = f"images/{split}/{i:05d}.png"
    write_image(Path(root) / rel, image, portable=True)  # same bytes on every machine (facemarks.core.io.png_bytes)
    return ImageRecord(file=rel, faces=[face])


def generate_split(root: Path, split: str, n: int, seed: int, cfg: Synthetic) -> list[ImageRecord]:
    """Write ``n`` faces to ``root/images/<split>/<i:05d>.png``; records' ``file`` is relative to ``root``.

    Each image's generator is seeded from ``(seed, split, i)``, so the bytes do not depend on ``cfg.workers``.
    """
    (Path(root) / "images" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), split, i, seed, cfg) for i in range(n)]
    if cfg.workers <= 1 or n < 2:
        return [_render_and_write(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=min(cfg.workers, n)) as pool:
        return list(pool.map(_render_and_write, jobs, chunksize=max(1, n // (cfg.workers * 8))))


# ----------------------------------------------------------------------------------------------- checks
def feature_energy(image: np.ndarray, points: np.ndarray, box=None, n_random: int = 500, seed: int = 0) -> float:
    """Mean Sobel gradient magnitude at ``points (68, 2)`` over that at random points of ``box`` (default: points' bbox).

    Well above 1 when features are drawn at the landmarks. ``image`` ``(H, W)`` or ``(H, W, 3)``.
    """
    from skimage.color import rgb2gray
    from skimage.filters import sobel

    gray = rgb2gray(image) if image.ndim == 3 else image.astype(np.float64) / 255.0
    grad = ndimage.maximum_filter(sobel(gray), size=3)  # landmarks sit on edges; allow ±1 px
    h, w = gray.shape
    pts = np.asarray(points, np.float64)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if box is None:
        lo, hi = pts.min(axis=0), pts.max(axis=0)
    else:
        lo = np.array(box[:2], np.float64)
        hi = lo + np.array(box[2:], np.float64)
    rng = np.random.default_rng(seed)
    rnd = rng.uniform(lo, hi, size=(n_random, 2))

    def sample(p: np.ndarray) -> float:
        xi = np.clip(np.rint(p[:, 0]).astype(int), 0, w - 1)
        yi = np.clip(np.rint(p[:, 1]).astype(int), 0, h - 1)
        return float(grad[yi, xi].mean())

    return sample(pts) / max(sample(rnd), 1e-9)


def contact_sheet(records: list[ImageRecord], root: Path, path: Path, n: int = 16) -> None:
    """Grid PNG of the first ``n`` images with their landmarks and boxes, saved atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = records[:n]
    if not recs:
        raise ValueError("contact_sheet: no records to draw")
    cols = int(np.ceil(np.sqrt(len(recs))))
    rows = int(np.ceil(len(recs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, rec in zip(axes.ravel(), recs):
        img = read_image(Path(root) / rec.file)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        for face in rec.faces:
            left, top, bw, bh = face.box
            ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), bw, bh, fill=False, color="yellow", lw=0.8))
            ax.scatter(face.points[:, 0], face.points[:, 1], s=2, c="lime", linewidths=0)
        ax.set_title(Path(rec.file).name, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
