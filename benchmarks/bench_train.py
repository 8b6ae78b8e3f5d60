"""Training throughput: the full loop (memory-mapped split + loader + loss + step) vs the model alone.

Both run in this process on the same batch and input size, alternating over ``--rounds`` rounds (best of
each kept, so a busy machine hurts both alike). The model-alone loop repeats ``train_step`` on tensors
already in memory; the full loop is ``train.train_one_epoch`` over ``train.make_loader`` on a split folder
written to a temp dir and memory-mapped back, as the stage does. Also times the model alone at each
``--head-widths`` (CPU speed at the default size). Prints a table, writes ``metrics/bench_train.json``.

    PYTHONPATH=src python benchmarks/bench_train.py [--size 64] [--batch 32] [--batches 10]  (defaults: the default preset)
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facemarks import train as T
from facemarks.atomic import atomic_write_json
from facemarks.codec import HeatmapCodec
from facemarks.model import build_model
from facemarks.store import write_split


def synthetic_split(root: Path, n: int, size: int, sigma: float, seed: int = 0) -> T.SplitArrays:
    """Random crops (N, S, S) and points (N, 68, 2) written as a split folder + float16 targets, memory-mapped back."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0.2 * size, 0.8 * size, (n, 68, 2)).astype(np.float32)
    visible = np.ones((n, 68), bool)
    arrays = {"images": rng.integers(0, 256, (n, size, size), dtype=np.uint8), "points": points,
              "visible": visible, "transform": np.tile(np.eye(3), (n, 1, 1)), "orig_points": points.astype(np.float64),
              "boxes": np.tile([0.0, 0.0, size, size], (n, 1))}
    write_split(root / "augmented" / "train", arrays, {"files": [], "source_index": [], "size": size})
    write_split(root / "augmented" / "val", arrays, {"files": [], "source_index": [], "size": size})
    heat, _ = HeatmapCodec(size, size // 4, sigma).encode(points, visible)
    (root / "heatmaps").mkdir()
    for name in ("train", "val"):
        np.save(root / "heatmaps" / f"{name}.npy", heat.astype(np.float16))
    return T.load_data(root / "augmented", root / "heatmaps").train


def _model(head_width: int, lr: float = 5e-3):
    torch.manual_seed(0)
    net = build_model(68, head_width, dropout=0.1).train()
    return net, torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)


def model_alone(size: int, batch: int, batches: int, head_width: int, loss: str) -> float:
    """Images/s of ``train_step`` on in-memory tensors (first step excluded as warm-up)."""
    net, opt = _model(head_width)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=g)
    targets = torch.rand(batch, 68, size // 4, size // 4, generator=g)
    weights = torch.ones(batch, 68)
    cpu = torch.device("cpu")
    T.train_step(net, opt, images, targets, weights, loss, cpu, 5.0)
    t0 = time.perf_counter()
    for _ in range(batches):
        T.train_step(net, opt, images, targets, weights, loss, cpu, 5.0)
    return batch * batches / (time.perf_counter() - t0)


def full_loop(split: T.SplitArrays, batch: int, head_width: int, loss: str, workers: int) -> float:
    """Images/s of one ``train_one_epoch`` over the memory-mapped split (first batch excluded as warm-up)."""
    net, opt = _model(head_width)
    loader = T.make_loader(split, batch, seed=0, workers=workers)
    loader.sampler.sampler.set_epoch(0)
    stamps: list[float] = []
    T.train_one_epoch(net, loader, opt, loss, torch.device("cpu"), 5.0, on_batch=lambda _: stamps.append(time.perf_counter()))
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--head-width", type=int, default=64)
    parser.add_argument("--head-widths", default="64,128", help="model-alone speed at these head widths")
    parser.add_argument("--loss", default="mse", choices=("mse", "bce"))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", default="metrics/bench_train.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))

    with tempfile.TemporaryDirectory() as tmp:
        split = synthetic_split(Path(tmp), args.batch * (args.batches + 1), args.size, sigma=1.5)
        alone, full = [], []
        for _ in range(args.rounds):
            alone.append(model_alone(args.size, args.batch, args.batches, args.head_width, args.loss))
            full.append(full_loop(split, args.batch, args.head_width, args.loss, args.workers))
    widths = {int(w): model_alone(args.size, args.batch, args.batches, int(w), args.loss)
              for w in args.head_widths.split(",") if int(w) != args.head_width}
    widths[args.head_width] = max(alone)
    ratio = max(full) / max(alone)

    rows = [("model alone (in-memory tensors)", args.head_width, max(alone)),
            ("full loop (mmap split + loader)", args.head_width, max(full))]
    rows += [("model alone", w, v) for w, v in sorted(widths.items()) if w != args.head_width]
    print(f"training throughput, {args.size} px, batch {args.batch}, loss {args.loss}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} rounds x {args.batches} batches")
    print(f"{'loop':34s} {'head':>5s} {'images/s':>9s}")
    for name, w, v in rows:
        print(f"{name:34s} {w:5d} {v:9.1f}")
    print(f"ratio full / model alone: {ratio:.3f} (must be >= 0.9)")
    atomic_write_json(args.out, {
        "size": args.size, "batch": args.batch, "batches": args.batches, "rounds": args.rounds, "loss": args.loss,
        "threads": torch.get_num_threads(), "workers": args.workers, "head_width": args.head_width,
        "model_alone_images_per_s": max(alone), "full_loop_images_per_s": max(full), "ratio": ratio,
        "model_alone_rounds": alone, "full_loop_rounds": full,
        "model_alone_images_per_s_by_head_width": {str(k): v for k, v in sorted(widths.items())},
        "machine": platform.machine(), "torch": torch.__version__,
    })


if __name__ == "__main__":
    main()
