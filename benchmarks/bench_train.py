"""Training throughput: the current loop and each speed lever, in one run, beside the machine's peak.

Every lever times ``train.train_step`` (forward, loss, backward, clip, Adam) on in-memory tensors at the default
input size and batch; the levers alternate over ``--rounds`` rounds and the best round of each is kept, so a busy
machine hurts all alike. The full loop (``train.train_one_epoch`` over ``data.make_loader`` on a memory-mapped split
folder, as the stage runs it) is timed too: its ratio to the model alone is the data-loading overhead.

The achieved GFLOP/s is FLOPs per trained image (``torch.utils.flop_counter`` over one forward + backward) x
images/s, beside the peak (:func:`facemarks.core.cpuinfo.peak_gflops`: cores x clock x FMA width, from the CPU flags
read here). Prints a table, writes ``metrics/bench_train.json`` (a benchmark file, never a DVC metric).

    python benchmarks/bench_train.py [--size 96] [--batch 32] [--batches 8] [--rounds 2] [--levers all]

Levers (``--levers`` picks some): ``current`` (what ``fit`` runs on this CPU: channels-last layout,
``facemarks.training.precision.memory_format``, with fp32, or bf16 autocast where the CPU has native bf16), ``fp32``
(autocast off, default layout), ``bf16`` (autocast on, even where emulated), ``channels_last`` (fp32),
``bf16+channels_last``, ``nondeterministic`` (fp32 without ``torch.use_deterministic_algorithms``), ``threads1``
(fp32, one intra-op thread), ``workers1`` (full loop, one loader process). ``torch.compile`` is not a lever here:
measured once on this machine it compiled for minutes and then ran slower than eager (docs/experiments.md).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from facemarks.core import cpuinfo
from facemarks.training import train as T
from facemarks.training.data import SplitArrays, load_data, make_loader
from facemarks.core.atomic import atomic_write_json
from facemarks.heatmaps.codec import HeatmapCodec
from facemarks.training.model import build_model, heatmap_loss
from facemarks.training.precision import memory_format
from facemarks.core.store import write_split

LEVERS = ("current", "fp32", "bf16", "channels_last", "bf16+channels_last", "nondeterministic", "threads1",
          "workers1")
CPU = torch.device("cpu")


def synthetic_split(root: Path, n: int, size: int, sigma: float, seed: int = 0) -> SplitArrays:
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
    return load_data(root / "augmented", root / "heatmaps").train


def _model(head_width: int, channels_last: bool = False):
    torch.manual_seed(0)
    net = build_model(68, head_width, dropout=0.1).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, torch.optim.Adam(net.parameters(), lr=5e-3, weight_decay=1e-5)


def _batch(size: int, batch: int, channels_last: bool = False):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=g)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.rand(batch, 68, size // 4, size // 4, generator=g), torch.ones(batch, 68)


def lever_setup(lever: str) -> dict:
    """How ``lever`` runs a step: autocast flag, memory format, determinism, threads."""
    native, fit_layout = cpuinfo.has_native_bf16(), memory_format(CPU) == torch.channels_last
    return {"amp": {"current": native, "bf16": True, "bf16+channels_last": True}.get(lever, False),
            "force_amp": lever in ("bf16", "bf16+channels_last"),
            "channels_last": "channels_last" in lever or (lever == "current" and fit_layout),
            "deterministic": lever != "nondeterministic",
            "threads": 1 if lever == "threads1" else None}


def model_alone(lever: str, size: int, batch: int, batches: int, head_width: int, loss: str, threads: int) -> float:
    """Images/s of ``train_step`` under ``lever`` on in-memory tensors (two warm-up steps excluded)."""
    setup = lever_setup(lever)
    net, opt = _model(head_width, setup["channels_last"])
    images, targets, weights = _batch(size, batch, setup["channels_last"])
    torch.set_num_threads(setup["threads"] or threads)
    torch.use_deterministic_algorithms(setup["deterministic"], warn_only=True)
    try:
        native = cpuinfo.has_native_bf16
        if setup["force_amp"]:  # autocast on even where the CPU has no native bf16 (precision.amp_active would refuse)
            cpuinfo.has_native_bf16 = lambda: True

        def step():
            T.train_step(net, opt, images, targets, weights, loss, CPU, 5.0, amp=setup["amp"])
        step()
        step()
        t0 = time.perf_counter()
        for _ in range(batches):
            step()
        return batch * batches / (time.perf_counter() - t0)
    finally:
        cpuinfo.has_native_bf16 = native
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def full_loop(split: SplitArrays, batch: int, head_width: int, loss: str, workers: int) -> float:
    """Images/s of one ``train_one_epoch`` over the memory-mapped split as ``fit`` runs it on this CPU (first batch
    excluded as warm-up)."""
    net, opt = _model(head_width, channels_last=memory_format(CPU) == torch.channels_last)
    loader = make_loader(split, batch, seed=0, workers=workers)
    loader.sampler.sampler.set_epoch(0)
    stamps: list[float] = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        T.train_one_epoch(net, loader, opt, loss, CPU, 5.0, amp=True,
                          on_batch=lambda _: stamps.append(time.perf_counter()))
    finally:
        torch.use_deterministic_algorithms(False)
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def flops_per_image(size: int, head_width: int, loss: str) -> float:
    """FLOPs of one forward + backward per image (``torch.utils.flop_counter``; the optimiser step not counted)."""
    net, _ = _model(head_width)
    images, targets, weights = _batch(size, 2)
    with FlopCounterMode(display=False) as counter:
        out = net(images)
        heatmap_loss(out, targets, weights, loss).backward()
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="input px (default: params.yaml's augment.size)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--head-width", type=int, default=64)
    parser.add_argument("--loss", default="mse", choices=("mse", "bce", "awing"))
    parser.add_argument("--levers", default="all", help=f"comma-separated subset of {', '.join(LEVERS)}")
    parser.add_argument("--out", default="metrics/bench_train.json")
    args = parser.parse_args()
    levers = LEVERS if args.levers == "all" else tuple(args.levers.split(","))
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        parser.error(f"--levers: unknown {', '.join(unknown)}; allowed: {', '.join(LEVERS)}")
    threads = int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0))))
    torch.set_num_threads(threads)

    speeds: dict[str, list[float]] = {lever: [] for lever in levers}
    full: dict[str, list[float]] = {"workers0": [], "workers1": []} if "workers1" in levers else {"workers0": []}
    with tempfile.TemporaryDirectory() as tmp:
        split = synthetic_split(Path(tmp), args.batch * (args.batches + 2), args.size, sigma=1.5)
        for _ in range(args.rounds):
            for lever in levers:
                if lever != "workers1":
                    speeds[lever].append(model_alone(lever, args.size, args.batch, args.batches, args.head_width,
                                                     args.loss, threads))
            for name in full:
                full[name].append(full_loop(split, args.batch, args.head_width, args.loss, int(name[-1])))

    flops = flops_per_image(args.size, args.head_width, args.loss)
    cpu = cpuinfo.describe()
    ghz = cpuinfo.clock_ghz()
    peak32 = cpuinfo.peak_gflops(threads, ghz)
    peak_bf16 = cpuinfo.peak_gflops(threads, ghz, bf16_amx=True)
    best = {k: max(v) for k, v in speeds.items() if v}
    best.update({f"full loop ({k})": max(v) for k, v in full.items()})
    base = best.get("fp32") or best.get("current")
    rows = []
    for name, ips in best.items():
        bf16 = "bf16" in name or (name.startswith(("current", "full")) and cpu["native_bf16"])
        peak = peak_bf16 if bf16 else peak32
        rows.append({"lever": name, "images_per_s": ips, "vs_fp32": ips / base if base else float("nan"),
                     "gflops": ips * flops / 1e9, "peak_gflops": peak, "share_of_peak": ips * flops / 1e9 / peak,
                     "rounds": speeds.get(name) or full.get(name.split("(")[-1].rstrip(")"), [])})

    print(f"training throughput: {args.size} px, batch {args.batch}, loss {args.loss}, {threads} threads, "
          f"best of {args.rounds} rounds x {args.batches} batches")
    print(f"CPU: {cpu['model']} at {ghz:.2f} GHz, flags {' '.join(cpu['flags'])}")
    print(f"work: {flops / 1e9:.3f} GFLOP per trained image (forward + backward); peak {peak32:.0f} GFLOP/s fp32"
          + (f", {peak_bf16:.0f} GFLOP/s bf16 (AMX)" if peak_bf16 != peak32 else ""))
    print(f"{'lever':28s} {'images/s':>9s} {'vs fp32':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for r in rows:
        print(f"{r['lever']:28s} {r['images_per_s']:9.1f} {r['vs_fp32']:8.2f} {r['gflops']:8.1f} "
              f"{100 * r['share_of_peak']:7.1f}%")
    atomic_write_json(args.out, {
        "size": args.size, "batch": args.batch, "batches": args.batches, "rounds": args.rounds, "loss": args.loss,
        "threads": threads, "head_width": args.head_width, "gflop_per_image": flops / 1e9, "cpu": cpu,
        "clock_ghz": ghz, "peak_gflops_fp32": peak32, "peak_gflops_bf16": peak_bf16, "levers": rows,
        "torch": torch.__version__,
    })


if __name__ == "__main__":
    main()
