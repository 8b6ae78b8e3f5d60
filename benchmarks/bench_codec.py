"""Benchmark the heatmap codec: encode throughput (faces/s, 68 maps each) vs a per-point Python loop, and
decode throughput per decoder, at 56x56 (224 input) and at the default size (augment.size -> size / 4).

Run from the repo root: ``PYTHONPATH=src python benchmarks/bench_codec.py [--faces 2000]``.
Prints a table and writes metrics/bench_codec.json. Ratios are measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import numpy as np
import torch

from facemarks.heatmaps import codec
from facemarks.core import cpuinfo
from facemarks.core.atomic import atomic_write_json
from facemarks.training.model import STRIDE
from facemarks.core.params import Augment, Encode

K = 68
THREADS = (1, 2)  # torch threads for the encode rows; decoders and the loop run on 1


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Fastest of ``repeats`` calls after one warm-up: (wall seconds, CPU seconds of this process)."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
    return best


def loop_encode(points: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """The straightforward baseline: one 2-D Gaussian per point in a Python loop. points ``(N, K, 2)`` map px
    -> heatmaps float32 ``(N, K, size, size)``."""
    n, k = points.shape[:2]
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((n, k, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(k):
            x, y = points[i, j]
            if -0.5 <= x <= size - 0.5 and -0.5 <= y <= size - 0.5:
                out[i, j] = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma * sigma))
    return out


def bench_size(input_size: int, faces: int, batch: int, sigma: float, repeats: int, rng: np.random.Generator) -> dict:
    """Encode / loop / decode timings at one input size; points uniform over the map, ``batch`` faces per call.

    ``encode_<dtype>_fresh``: each call allocates its maps (page faults included); ``encode_<dtype>_buffer``: each
    call fills a reused buffer (``out=``, as a data loader or the stage's memory map does).
    """
    hm = codec.HeatmapCodec(input_size, input_size // STRIDE, sigma)
    h = hm.heatmap_size
    pts = codec.to_map(codec.uniform_points(rng, faces, input_size), hm.stride)
    vis = np.ones((faces, K), bool)
    row: dict = {"input_size": input_size, "heatmap_size": h, "faces": faces, "batch": batch}
    n = faces // batch * batch
    for threads in THREADS:
        torch.set_num_threads(threads)
        for dtype in ("float32", "float16"):
            buf = np.empty((batch, K, h, h), dtype=dtype)

            def run(out: np.ndarray | None) -> None:
                for i in range(0, n, batch):
                    codec.encode(pts[i : i + batch], vis[i : i + batch], hm.size, sigma, dtype, out=out)

            for mode, out in (("fresh", None), ("buffer", buf)):
                wall, cpu = best_time(lambda: run(out), repeats)
                row[f"encode_{dtype}_{mode}_{threads}t_faces_per_s"] = n / wall
                row[f"encode_{dtype}_{mode}_{threads}t_faces_per_cpu_s"] = n / cpu
    torch.set_num_threads(THREADS[0])
    loop_faces = max(1, faces // 20)
    wall, cpu = best_time(lambda: loop_encode(pts[:loop_faces], h, sigma), 1)
    row["loop_faces_per_s"] = loop_faces / wall
    row["loop_faces_per_cpu_s"] = loop_faces / cpu
    for mode in ("fresh", "buffer"):
        for unit in ("faces_per_s", "faces_per_cpu_s"):
            best = max(row[f"encode_float32_{mode}_{t}t_{unit}"] for t in THREADS)
            row[f"encode_float32_{mode}_vs_loop_{unit.replace('faces_per_', '')}"] = best / row[f"loop_{unit}"]
    fast, _ = codec.encode(pts[:loop_faces], vis[:loop_faces], hm.size, sigma)
    row["loop_max_abs_diff"] = float(np.abs(fast - loop_encode(pts[:loop_faces], h, sigma)).max())
    heat, _ = codec.encode(pts[:batch], vis[:batch], hm.size, sigma)
    for name in codec.DECODERS:
        kw = {"blur_sigma": sigma} if name == "dark" else {}
        wall, cpu = best_time(lambda: codec.decode(heat, name, **kw), repeats)
        row[f"decode_{name}_faces_per_s"] = batch / wall
        row[f"decode_{name}_faces_per_cpu_s"] = batch / cpu
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64, help="faces per encode / decode call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="metrics/bench_codec.json")
    args = parser.parse_args()
    sigma = Encode().sigma
    rng = np.random.default_rng(0)
    rows = [bench_size(s, args.faces, args.batch, sigma, args.repeats, rng) for s in (56 * STRIDE, Augment().size)]

    print(f"codec benchmark: sigma {sigma}, {args.faces} faces x {K} maps in calls of {args.batch}, torch threads "
          f"{THREADS} (encode) / 1 (rest), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    keys = [k for k in rows[0] if "_per_" in k or "_vs_loop" in k]
    print(f"{'metric':44s}" + "".join(f"{r['heatmap_size']:>7d}x{r['heatmap_size']:<4d}" for r in rows))
    for k in keys:
        print(f"{k:44s}" + "".join(f"{r[k]:12,.1f}" for r in rows))
    result = {
        "sigma": sigma, "faces": args.faces, "keypoints": K, "torch_threads_encode": THREADS,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": cpuinfo.describe(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0], "batch": args.batch,
        "goal_encode_faces_per_s": 5000, "goal_encode_vs_loop": 20,
        "sizes": {f"{r['heatmap_size']}x{r['heatmap_size']}": r for r in rows},
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
