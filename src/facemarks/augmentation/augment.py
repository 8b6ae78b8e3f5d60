"""Face crops, seeded geometric + photometric augmentation, and exact crop transforms.

Every sample is produced by ONE affine ``T`` (original-image pixels → crop pixels, row-vector convention
``[x, y, 1] @ T.T``) applied with ONE scikit-image warp (bilinear). ``T`` is the square crop around the face
box (with ``margin``) resized to ``size``, followed on augmented training copies by a rotation, scale and
translation about the crop centre and an optional horizontal flip. Coordinates are pixels with pixel
centres at integer coordinates (``docs/design.md``): a crop of side ``S`` spans ``[-0.5, S - 0.5]``.

On a flip, ``x' = S - 1 - x`` and the points are permuted with :data:`facemarks.core.landmarks.MIRROR`, so index
36 stays the subject's right outer eye corner. ``orig_points`` of a flipped sample are permuted the same way,
so ``invert_points(points, T) == orig_points``.

Domain randomisation (augmented copies only): per face a random colour cast of the gray conversion (RGB weights),
per sample low resolution + re-upscaling, motion blur, sharpening, noise and JPEG re-encoding, so that the model
cannot lean on the clean rendering of the synthetic faces (:func:`photometric`).

Randomness: each sample draws from ``np.random.SeedSequence((seed, split_id, face_index, copy))``; outputs
are byte-identical for any number of workers.

Shape legend: ``S`` crop side, ``K = 68`` landmarks, ``N`` samples; images ``(N, S, S)`` uint8, points
``(N, K, 2)`` float32 crop px, visible ``(N, K)`` bool, transform ``(N, 3, 3)`` float64.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import io as _bytes_io

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import disk, line_aa

from facemarks.data import groups, portable
from facemarks.augmentation.crops import LUMA, antialias_sigma, apply_transform, crop_transform, in_crop, prepare_source, to_uint8, translation, warp_source
from facemarks.core.atomic import atomic_dir
from facemarks.core.io import DataError, ImageRecord, read_dlib_xml, read_image, write_image
from facemarks.core.landmarks import LEFT_EYE, MIRROR, N_POINTS, RIGHT_EYE
from facemarks.core.params import Augment
from facemarks.core.store import read_split, write_split

log = logging.getLogger("facemarks.augmentation.augment")

#: split name -> id used in the per-sample seed.
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_VAL_SEED_TAG = 7  # SeedSequence tag of the train/val image split


# ----------------------------------------------------------------------------------------------- geometry
def augment_matrix(size: int, angle_deg: float, scale: float, shift: tuple[float, float], flip: bool) -> np.ndarray:
    """``(3, 3)`` crop px → crop px: rotate by ``angle_deg`` and scale about the crop centre, shift, then flip."""
    c = (size - 1.0) / 2.0
    a = math.radians(angle_deg)
    cos_a, sin_a = portable.cos(a), portable.sin(a)
    rs = np.array([[scale * cos_a, -scale * sin_a, 0.0], [scale * sin_a, scale * cos_a, 0.0],
                   [0.0, 0.0, 1.0]])
    m = portable.matmul(portable.matmul(translation(c + shift[0], c + shift[1]), rs), translation(-c, -c))
    if flip:
        m = portable.matmul(np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), m)
    return m


def sample_rng(seed: int, split: str, index: int, copy: int) -> np.random.Generator:
    """The generator of one sample: ``SeedSequence((seed, split_id, index, copy))``."""
    return np.random.default_rng(np.random.SeedSequence((seed, SPLIT_IDS[split], index, copy)))


def random_geometry(rng: np.random.Generator, cfg: Augment) -> dict[str, Any]:
    """Draw rotation (deg), scale, shift (crop px) and flip from the ranges in ``cfg``."""
    shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * cfg.size
    return {"angle": float(rng.uniform(-cfg.rotation, cfg.rotation)),
            "scale": float(rng.uniform(cfg.scale_min, cfg.scale_max)),
            "shift": (float(shift[0]), float(shift[1])),
            "flip": bool(rng.random() < cfg.flip_prob)}


def photometric(img: np.ndarray, rng: np.random.Generator, cfg: Augment) -> np.ndarray:
    """Contrast, brightness, gamma, optional Gaussian blur and noise on a float ``(S, S)`` image in [0, 255]."""
    c = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)
    b = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
    g = rng.uniform(1.0 - cfg.gamma, 1.0 + cfg.gamma)
    mean = float(img.mean())
    img = ((img - mean) * c + (mean + b)).astype(np.float32)  # float32 from here: half the memory traffic
    np.clip(img, 0.0, 255.0, out=img)
    img = np.float32(255.0) * portable.power(img / np.float32(255.0), float(np.float32(max(g, 1e-3))))
    if rng.random() < cfg.blur_prob and cfg.blur_sigma > 0:
        img = portable.gaussian_filter(img, rng.uniform(0.25, 1.0) * cfg.blur_sigma, mode="nearest")
    if rng.random() < cfg.lowres_prob and cfg.lowres_factor > 1:  # a small face in a photo, upscaled
        side = img.shape[0]
        small = max(4, int(round(side / rng.uniform(min(1.5, cfg.lowres_factor), cfg.lowres_factor))))
        img = portable.resize(portable.resize(img, (small, small), anti_aliasing=True), (side, side))
    if rng.random() < cfg.motion_blur_prob:
        img = ndimage.convolve(img, motion_kernel(rng.uniform(2.0, 5.0), rng.uniform(0, np.pi)), mode="nearest")
    if rng.random() < cfg.sharpen_prob:  # unsharp masking, as camera pipelines do
        img = img + rng.uniform(0.3, 1.5) * (img - portable.gaussian_filter(img, 1.0, mode="nearest"))
    if cfg.noise_std > 0:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_std)
    if rng.random() < cfg.jpeg_prob:
        img = jpeg_roundtrip(img, int(rng.integers(cfg.jpeg_quality, max(cfg.jpeg_quality, 90) + 1)))
    return img


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """Normalised anti-aliased line kernel ``(k, k)`` of ``length`` px at ``angle`` rad (linear motion blur)."""
    r = int(math.ceil(length / 2))
    dx, dy = 0.5 * length * portable.cos(angle), 0.5 * length * portable.sin(angle)
    k = np.zeros((2 * r + 1, 2 * r + 1), np.float32)
    rr, cc, val = line_aa(int(round(r - dy)), int(round(r - dx)), int(round(r + dy)), int(round(r + dx)))
    k[rr, cc] = np.maximum(k[rr, cc], val)
    return k / k.sum()


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode a float gray image ``(S, S)`` as JPEG at ``quality`` and decode it (float32, [0, 255])."""
    buf = _bytes_io.BytesIO()
    Image.fromarray(to_uint8(img), mode="L").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf), np.float32)


def colour_cast_weights(rng: np.random.Generator, strength: float) -> np.ndarray:
    """RGB → gray weights ``(3,)`` (sum 1): luma with each channel scaled by ``1 ± strength`` (white balance, film)."""
    w = LUMA * rng.uniform(1 - strength, 1 + strength, 3).astype(np.float32)
    return w / w.sum()


# ----------------------------------------------------------------------------------------------- samples
def make_samples(image: np.ndarray, box: tuple[float, float, float, float], points: np.ndarray, cfg: Augment,
                 rngs: list[np.random.Generator | None]) -> list[dict[str, Any]]:
    """Samples of one face: crop only where ``rngs[i]`` is None, else a random geometric + photometric copy.

    ``points (68, 2)`` original px (NaN = unlabelled). Each sample: ``image (S, S)`` uint8, ``points (68, 2)``
    float32 crop px, ``visible (68,)``, ``transform (3, 3)``, ``orig_points (68, 2)`` float64 (permuted on
    flip) and ``flip``. The gray, anti-aliased source region is computed once per face (its sigma follows the
    plain crop scale) and warped once per sample.
    """
    base = crop_transform(box, cfg.size, cfg.margin)
    geos = [random_geometry(rng, cfg) if rng is not None else None for rng in rngs]
    transforms = [base if g is None else
                  portable.matmul(augment_matrix(cfg.size, g["angle"], g["scale"], g["shift"], g["flip"]), base)
                  for g in geos]
    src = prepare_source(image, transforms, cfg.size, antialias_sigma(base))
    style = next((r for r in rngs if r is not None), None)  # per-face style from the first augmented copy's stream
    src_cast = src
    if style is not None and cfg.colour_cast > 0 and np.ndim(image) == 3:
        src_cast = prepare_source(image, transforms, cfg.size, antialias_sigma(base), colour_cast_weights(style, cfg.colour_cast))
    out = []
    for rng, geo, T in zip(rngs, geos, transforms):
        img = warp_source(src if rng is None else src_cast, T, cfg.size)
        if rng is not None:
            img = photometric(img, rng, cfg)
        flip = bool(geo and geo["flip"])
        orig = np.asarray(points, dtype=np.float64)
        orig = orig[MIRROR] if flip else orig.copy()
        pts = apply_transform(orig, T)
        out.append({"image": to_uint8(img), "points": pts.astype(np.float32), "visible": in_crop(pts, cfg.size),
                    "transform": T, "orig_points": orig, "flip": flip})
    return out


def make_sample(image: np.ndarray, box: tuple[float, float, float, float], points: np.ndarray, cfg: Augment,
                rng: np.random.Generator | None) -> dict[str, Any]:
    """One sample of :func:`make_samples`: crop only when ``rng`` is None, else an augmented copy."""
    return make_samples(image, box, points, cfg, [rng])[0]


def _process_image(task: tuple) -> list[dict[str, Any]]:
    """Worker: all samples of one source image. ``task = (path, faces, split, cfg, seed, copies)``."""
    path, faces, split, cfg, seed, copies = task
    if not faces:
        return []
    image = read_image(path)
    out = []
    for face_index, box, points in faces:
        rngs = [sample_rng(seed, split, face_index, copy) if copy else None for copy in range(copies + 1)]
        for copy, smp in enumerate(make_samples(image, box, points, cfg, rngs)):
            smp["copy"] = copy
            out.append(smp)
    return out


def _run_tasks(tasks: list[tuple], workers: int) -> list[list[dict[str, Any]]]:
    if workers <= 1 or len(tasks) < 2:
        return [_process_image(t) for t in tasks]
    chunk = max(1, len(tasks) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_process_image, tasks, chunksize=chunk))


def split_val(n_images: int, val_fraction: float, seed: int, image_groups: list[str] | None = None) -> np.ndarray:
    """Sorted indices of the TRAIN images that form the validation split: whole person groups
    (:func:`facemarks.data.groups.group_split`, seeded), ``image_groups`` (n_images,) naming each image's group; without
    it every image is its own group (the split by image)."""
    names = image_groups if image_groups is not None else [str(i) for i in range(n_images)]
    if len(names) != n_images:
        raise ValueError(f"split_val: {len(names)} groups for {n_images} images")
    rng = np.random.default_rng(np.random.SeedSequence((seed, _VAL_SEED_TAG)))
    return groups.group_split(names, val_fraction, rng)


def train_groups(raw_dir: Path, records: list[ImageRecord]) -> list[str] | None:
    """Each train record's person group from ``raw_dir/groups.json`` (written by download under a
    ``data.local.group`` rule), or ``None`` where there is none (every image its own group)."""
    table = groups.read_groups(raw_dir)
    if table is None:
        return None
    missing = [r.file for r in records if r.file not in table]
    if missing:
        raise DataError(f"{Path(raw_dir) / groups.GROUPS_FILE}: no group for {len(missing)} train image(s), e.g. "
                        f"{missing[0]} (rerun the download stage)")
    return [table[r.file] for r in records]


def _face_table(records: list[ImageRecord], xml: Path) -> list[list[tuple[int, tuple, np.ndarray]]]:
    """Per image: ``(global face index, box, points)`` of each face, numbered in XML order."""
    table, n = [], 0
    for rec in records:
        for face in rec.faces:
            if not (face.box[2] > 0 and face.box[3] > 0):
                raise DataError(f"{xml} [{rec.file}]: box {face.box} has no area (width and height must be > 0)")
        table.append([(n + j, f.box, f.points) for j, f in enumerate(rec.faces)])
        n += len(rec.faces)
    return table


def _assemble(samples: list[list[dict]], records: list[ImageRecord], image_ids: list[int], cfg: Augment,
              seed: int, source: str, copies: int) -> dict[str, Any]:
    """Stack per-sample dicts into the split-folder arrays plus ``meta``."""
    s, k = cfg.size, N_POINTS
    flat = [(i, j // (copies + 1), smp) for i, per in zip(image_ids, samples) for j, smp in enumerate(per)]
    arrays = {
        "images": np.zeros((len(flat), s, s), np.uint8), "points": np.zeros((len(flat), k, 2), np.float32),
        "visible": np.zeros((len(flat), k), bool), "transform": np.zeros((len(flat), 3, 3)),
        "orig_points": np.zeros((len(flat), k, 2)), "boxes": np.zeros((len(flat), 4)),
    }
    meta: dict[str, Any] = {"files": [], "source_index": [], "box_index": [], "copy": [], "flip": []}
    for n, (i, j, smp) in enumerate(flat):
        for key in ("image", "points", "visible", "transform", "orig_points"):
            arrays["images" if key == "image" else key][n] = smp[key]
        arrays["boxes"][n] = records[i].faces[j].box
        meta["files"].append(records[i].file)
        meta["source_index"].append(i)
        meta["box_index"].append(j)
        meta["copy"].append(smp["copy"])
        meta["flip"].append(smp["flip"])
    meta.update({"size": s, "source": source, "seed": seed, "n": len(flat),
                 "copy_note": "copy 0 = crop only (no augmentation); copy >= 1 = augmented",
                 "augment": dataclasses.asdict(cfg)})
    return {"arrays": arrays, "meta": meta}


def build_splits(raw_dir: Path, cfg: Augment, seed: int) -> dict[str, dict[str, Any]]:
    """Read ``raw_dir/{train,test}.xml`` and build ``{"train", "val", "test"}`` → ``{"arrays", "meta"}``.

    Train: per face the crop-only original (copy 0) plus ``cfg.copies`` augmented copies. Val: a seeded
    ``val_fraction`` of the train IMAGES, crop only. Test: crop only.
    """
    raw_dir = Path(raw_dir)
    out = {}
    for xml_name, parts in (("train.xml", ("train", "val")), ("test.xml", ("test",))):
        xml = raw_dir / xml_name
        if not xml.is_file():
            raise DataError(f"{xml}: missing (run the download stage first)")
        records = read_dlib_xml(xml)
        table = _face_table(records, xml)
        val: set[int] = set()
        if xml_name == "train.xml":
            names = train_groups(raw_dir, records)
            val = set(split_val(len(records), cfg.val_fraction, seed, names).tolist())
            names = names if names is not None else [r.file for r in records]
            split_groups = {"train": [g for i, g in enumerate(names) if i not in val],
                            "val": [g for i, g in enumerate(names) if i in val]}
        for split in parts:
            ids = [i for i in range(len(records)) if (i in val) == (split == "val")]
            copies = cfg.copies if split == "train" else 0
            tasks = [(raw_dir / records[i].file, table[i], split, cfg, seed, copies) for i in ids]
            samples = _run_tasks(tasks, cfg.workers)
            out[split] = _assemble(samples, records, ids, cfg, seed, xml_name, copies)
    out["train"]["groups"] = split_groups
    return out


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished worker processes (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_augment(raw_dir: Path, out_dir: Path, cfg: Augment, seed: int) -> dict[str, Any]:
    """Build the three splits and write them as split folders under ``out_dir`` (replaced whole, atomically).

    Returns the summary: crop counts per split, seconds, crops/s (wall) and crops per CPU-second.
    """
    t0, c0 = time.perf_counter(), _cpu_seconds()
    splits = build_splits(raw_dir, cfg, seed)
    t_build, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    with atomic_dir(out_dir) as tmp:  # all three splits appear together, or none (a killed run leaves no mix)
        for name, split in splits.items():
            write_split(tmp / name, split["arrays"], split["meta"])
    seconds = time.perf_counter() - t0
    counts = {name: len(split["arrays"]["images"]) for name, split in splits.items()}
    total = sum(counts.values())
    summary = {"counts": counts, "total": total, "seconds": round(seconds, 3), "build_seconds": round(t_build, 3),
               "images_per_s": round(total / max(t_build, 1e-9), 1), "cpu_seconds": round(cpu, 3),
               "images_per_cpu_s": round(total / max(cpu, 1e-9), 1), "workers": cfg.workers, "size": cfg.size,
               "visible_fraction": {n: float(np.mean(s["arrays"]["visible"])) if counts[n] else 0.0
                                    for n, s in splits.items()},
               "groups": {"rule": "groups.json" if (Path(raw_dir) / groups.GROUPS_FILE).is_file() else "file",
                          **groups.summary(splits["train"]["groups"])}}
    log.info("augment: %s crops in %.1f s (%.0f crops/s, %d workers)", counts, seconds, summary["images_per_s"],
             cfg.workers)
    return summary


# ----------------------------------------------------------------------------------------------- contact sheet
RIGHT_EYE_COLOUR = (255, 40, 40)  # subject's right eye (36–41): red, image-left on a frontal face
LEFT_EYE_COLOUR = (40, 120, 255)  # subject's left eye (42–47): blue
OTHER_COLOUR = (40, 220, 40)
HIDDEN_COLOUR = (255, 220, 0)  # not visible (outside the crop)


def contact_sheet(images: np.ndarray, points: np.ndarray, visible: np.ndarray, cols: int = 4,
                  cell: int = 160) -> np.ndarray:
    """A grid of crops with landmarks: ``images (n, S, S)`` uint8, ``points (n, 68, 2)``, ``visible (n, 68)``
    → RGB ``(rows * C, cols * C, 3)`` uint8 with ``C = S * f`` (nearest upscaling by ``f = max(1, cell // S)``).

    Right eye red, left eye blue, other points green, invisible points yellow: a flip bug shows as a blue
    eye at image-left on a frontal face.
    """
    n, s = len(images), images.shape[-1]
    if points.shape != (n, N_POINTS, 2) or visible.shape != (n, N_POINTS):
        raise ValueError(f"contact_sheet: points {points.shape} / visible {visible.shape} do not match {n} images")
    f = max(1, cell // s)
    c = s * f
    rows = max(1, math.ceil(n / cols))
    sheet = np.full((rows * c, cols * c, 3), 32, np.uint8)
    radius = max(1.5, c / 80)
    for i in range(n):
        r0, c0 = (i // cols) * c, (i % cols) * c
        tile = np.repeat(np.repeat(images[i], f, 0), f, 1)
        sheet[r0:r0 + c, c0:c0 + c] = tile[..., None]
        for j, (x, y) in enumerate(np.asarray(points[i], np.float64)):
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            colour = (RIGHT_EYE_COLOUR if j in RIGHT_EYE else LEFT_EYE_COLOUR if j in LEFT_EYE else OTHER_COLOUR)
            if not visible[i, j]:
                colour = HIDDEN_COLOUR
            rr, cc = disk(((y + 0.5) * f - 0.5, (x + 0.5) * f - 0.5), radius, shape=(c, c))
            sheet[r0 + rr, c0 + cc] = colour
    return sheet


def write_contact_sheet(path: Path, split_dir: Path, n: int = 16, cols: int = 4) -> int:
    """Write a contact sheet of the first ``n`` augmented samples (copy ≥ 1, else any) of a split; returns n used."""
    split = read_split(split_dir)
    copy = np.asarray(split.meta.get("copy", [0] * len(split)))
    idx = np.flatnonzero(copy > 0)
    if len(idx) == 0:
        idx = np.arange(len(split))
    idx = idx[:n]
    if len(idx) == 0:
        raise DataError(f"{split_dir}: empty split, nothing for the contact sheet")
    sheet = contact_sheet(np.asarray(split.images[idx]), np.asarray(split.points[idx]),
                          np.asarray(split.visible[idx]), cols=min(cols, len(idx)))
    write_image(path, sheet)
    return len(idx)
