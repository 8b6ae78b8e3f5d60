"""Benchmark the augment stage: crops/s of ``run_augment`` with 1 and 2 workers on synthetic faces, and the
CPU cost of its parts (PNG decode, crop-only face, training face = crop + augmented copies). Wall crops/s
depend on machine load; crops per CPU-second do not (much).

Run from the repo root: ``PYTHONPATH=src python benchmarks/bench_augment.py [--images 200] [--size 128]``.
Prints a table and writes metrics/bench_augment.json. Ratios are measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

from facemarks.core import cpuinfo
from facemarks.core.atomic import atomic_write_json
from facemarks.augmentation.augment import make_samples, run_augment, sample_rng
from facemarks.core.io import read_dlib_xml, read_image, write_dlib_xml
from facemarks.core.params import Augment, Synthetic
from facemarks.data.synthetic import generate_split


def make_raw(root: Path, n_images: int) -> None:
    """Synthetic faces at the default generator sizes (160–400 px) as ``root/{train,test}.xml``."""
    syn = dataclasses.replace(Synthetic(), workers=2)
    write_dlib_xml(root / "train.xml", generate_split(root, "train", n_images, 0, syn))
    write_dlib_xml(root / "test.xml", generate_split(root, "test", max(1, n_images // 5), 0, syn))


def per_part(root: Path, cfg: Augment) -> dict[str, float]:
    """CPU milliseconds (one process) per image decode, per crop-only face, per training face (crop + copies)."""
    recs = read_dlib_xml(root / "train.xml")
    t = time.process_time()
    images = [read_image(root / r.file) for r in recs]
    decode = (time.process_time() - t) / len(recs)
    t = time.process_time()
    for img, r in zip(images, recs):
        make_samples(img, r.faces[0].box, r.faces[0].points, cfg, [None])
    crop = (time.process_time() - t) / len(recs)
    t = time.process_time()
    for i, (img, r) in enumerate(zip(images, recs)):
        rngs = [None] + [sample_rng(0, "train", i, c) for c in range(1, cfg.copies + 1)]
        make_samples(img, r.faces[0].box, r.faces[0].points, cfg, rngs)
    train = (time.process_time() - t) / len(recs)
    return {"decode_cpu_ms": 1e3 * decode, "crop_only_cpu_ms": 1e3 * crop, "train_face_cpu_ms": 1e3 * train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    cfg = Augment(size=args.size)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        make_raw(root, args.images)
        parts = per_part(root, cfg)
        for workers in (1, 2):
            s = run_augment(root, Path(tmp) / f"out{workers}", dataclasses.replace(cfg, workers=workers), seed=0)
            rows[workers] = {"crops": s["total"], "seconds": s["seconds"], "crops_per_s": s["images_per_s"],
                             "crops_per_cpu_s": s["images_per_cpu_s"]}
    speedup = rows[2]["crops_per_s"] / rows[1]["crops_per_s"]
    print(f"augment benchmark: {args.images} train images, size {args.size}, copies {cfg.copies}, "
          f"cores {os.cpu_count()}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (wall numbers are only fair on an idle machine)")
    print(f"{'workers':>8} {'crops':>7} {'seconds':>8} {'crops/s':>8} {'crops/cpu-s':>12}")
    for w, r in rows.items():
        print(f"{w:>8} {r['crops']:>7} {r['seconds']:>8.2f} {r['crops_per_s']:>8.0f} {r['crops_per_cpu_s']:>12.0f}")
    print(f"2-worker wall speed-up: {speedup:.2f}x | CPU per image decode {parts['decode_cpu_ms']:.2f} ms, crop-only "
          f"face {parts['crop_only_cpu_ms']:.2f} ms, training face (crop + {cfg.copies} copies) "
          f"{parts['train_face_cpu_ms']:.2f} ms")
    atomic_write_json("metrics/bench_augment.json", {
        "images": args.images, "size": args.size, "copies": cfg.copies, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "processor": cpuinfo.describe(), "load_average": os.getloadavg()[0],
        "workers": rows,
        "speedup_2_vs_1": round(speedup, 2),
        **{k: round(v, 3) for k, v in parts.items()}})


if __name__ == "__main__":
    main()
