"""Synthetic faces: throughput (faces/s, workers 1 vs 2) and realism as dlib sees it.

Run from the repo root: ``PYTHONPATH=src python benchmarks/bench_synthetic.py [--n 200]``.
Prints a table and writes ``metrics/bench_synthetic.json`` atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from facemarks.core import cpuinfo
from facemarks.core.atomic import atomic_write_json
from facemarks.core.params import Synthetic
from facemarks.data.synthetic import generate_split, render_face


def _cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (worker pools)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _split_costs(cfg: Synthetic, n: int, seed: int) -> dict:
    """CPU ms per face of rendering vs PNG encoding (as written now, and at zlib level 1 for comparison)."""
    from PIL import Image

    from facemarks.core.io import write_image

    rng = np.random.default_rng(seed)
    render_face(rng, cfg)  # warm the background cache
    t = time.process_time()
    images = [render_face(rng, cfg)[0] for _ in range(n)]
    render = time.process_time() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.process_time()
        for i, img in enumerate(images):
            write_image(Path(tmp) / f"{i}.png", img)
        png = time.process_time() - t
        t = time.process_time()
        for i, img in enumerate(images):
            Image.fromarray(img).save(Path(tmp) / f"{i}_l1.png", compress_level=1)
        png1 = time.process_time() - t
    return {"render": 1000 * render / n, "png_write_image": 1000 * png / n, "png_level1": 1000 * png1 / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="faces per timing run and for realism")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="metrics/bench_synthetic.json")
    args = ap.parse_args()
    cfg = Synthetic()
    result: dict = {"n": args.n, "config": dataclasses.asdict(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for workers in (1, 2):
            t0, c0 = time.perf_counter(), _cpu_seconds()
            recs = generate_split(Path(tmp) / f"w{workers}", "test", args.n, args.seed, dataclasses.replace(cfg, workers=workers))
            secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            rows.append((workers, secs, args.n / secs, cpu, args.n / cpu))
        result["throughput"] = {f"workers_{w}": {"seconds": s, "faces_per_s": f, "cpu_seconds": c, "faces_per_cpu_s": fc}
                                for w, s, f, c, fc in rows}
        result["speedup_2_vs_1"] = rows[1][2] / rows[0][2]
        result["split_ms_per_face"] = _split_costs(cfg, min(args.n, 40), args.seed)
        print(f"machine load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'workers':>8} {'wall s':>8} {'faces/s':>8} {'cpu s':>8} {'faces/cpu-s':>12}  (PNG writing included)")
        for w, s, f, c, fc in rows:
            print(f"{w:>8} {s:>8.2f} {f:>8.1f} {c:>8.2f} {fc:>12.1f}")
        print(f"speed-up 2 vs 1 worker (wall): {result['speedup_2_vs_1']:.2f}x")
        sp = result["split_ms_per_face"]
        print(f"CPU ms per face: render {sp['render']:.1f}, PNG via facemarks.core.io.write_image {sp['png_write_image']:.1f}, "
              f"PNG at zlib level 1 {sp['png_level1']:.1f}")
        from facemarks.evaluation import peers

        if peers.available():
            r = peers.realism(recs, Path(tmp) / "w2")
            result["realism"] = r
            print(f"\nrealism on {r['n_faces']} faces (dlib 68-pt predictor given the true box, NME inter-ocular %)")
            for k in ("dlib_nme_mean", "dlib_nme_median", "detector_hit_rate", "mean_shape_nme_mean",
                      "mean_shape_nme_median", "dlib_ms_per_face"):
                print(f"  {k:<24} {r[k]:8.3f}")
            print("  goals: dlib_nme_mean ≤ 6, detector_hit_rate ≥ 0.9")
        else:
            result["realism"] = None
            print(f"realism skipped: {peers.unavailable_reason()}")
    result["processor"] = cpuinfo.describe()
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
