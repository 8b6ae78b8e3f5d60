"""Training loop: two-phase Adam, per-epoch validation NME, atomic resumable checkpoints, DDP.

Note:
    N: samples, K: keypoints (68), S: input side, h = S / 4: heatmap side.

:func:`fit` trains one model for one loss (``mse``, ``bce`` or ``awing``: :data:`facemarks.training.model.LOSSES`) on a
:class:`TrainData` and returns a :class:`FitResult`; :func:`write_outputs` and :func:`log_mlflow` turn that into files and an MLflow run.
Run under ``torchrun`` (``torch.distributed`` initialised, see :func:`init_distributed`) the same call
trains with DistributedDataParallel; only rank 0 writes checkpoints and progress.

Determinism: model init uses ``seed``; the data order of epoch ``e`` is drawn from ``seed + e``
(``DistributedSampler``) and the dropout stream is reseeded from ``(seed, e, rank)`` at the start of every
epoch, so a run resumed from the checkpoint after epoch ``e`` replays exactly what an uninterrupted run does
(bit-identical on CPU, where ``torch.use_deterministic_algorithms`` is on during :func:`fit`).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from facemarks.core import cpuinfo

from facemarks.evaluation import metrics
from facemarks.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from facemarks.heatmaps.codec import HeatmapCodec, in_map, to_map
from facemarks.training.model import LOSSES, STRIDE, HeatmapNet, build_model, heatmap_loss, outputs_to_heatmaps
from facemarks.training.model import load_model  # noqa: F401 (moved to facemarks.training.model; facemarks.training.train.load_model still works)
from facemarks.core.store import read_split
from facemarks.core.tracking import MODEL_HASH_TAG, file_md5, tracking_uri

log = logging.getLogger("facemarks.training.train")

CHECKPOINT_NAME = "last.pt"
COLLAPSE_RATIO = 0.9  # val NME >= 0.9 x mean-shape NME counts as mean-shape collapse
WEAK_PEAK_RATIO = 0.5  # predicted map peak < 0.5 x the target's peak counts as a weak peak (see weak_peaks)
# the per-epoch CSV (a DVC plots file); val_collapse (0/1, :func:`is_collapse`) and val_weak_peak_share
# (:func:`weak_peaks`) are the two failure checks, side by side
EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "val_nme", "lr", "val_collapse", "val_weak_peak_share")
# Differ between two reproductions of the same commit: kept out of the DVC metrics/plots files (see :func:`timings`).
VOLATILE_KEYS = ("images_per_s", "seconds", "run_id")
_NOT_FINGERPRINTED = ("workers",)  # config fields that cannot change the result


@dataclass(frozen=True)
class TrainConfig:
    """Everything :func:`fit` reads (``params.yaml`` sections ``train``, with ``train.seed``, and ``encode``)."""

    epochs_phase1: int = 4
    epochs_phase2: int = 2
    lr: float = 5e-3
    lr_drop: float = 0.1  # lr multiplier at the phase boundary
    batch_size: int = 64  # global batch (split across DDP processes)
    weight_decay: float = 1e-5
    grad_clip: float = 5.0  # max gradient norm, 0 = off
    head_width: int = 128
    dropout: float = 0.1
    pretrained: bool = False
    workers: int = 0  # DataLoader worker processes
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (amp_active)
    seed: int = 0
    sigma: float = 1.5  # heatmap Gaussian sigma (map px), as encoded
    decoder: str = "subpixel"  # codec decoder for validation NME

    @property
    def epochs(self) -> int:
        return self.epochs_phase1 + self.epochs_phase2

    @classmethod
    def from_params(cls, train: Any, base: Any, encode: Any) -> "TrainConfig":
        """Build from the ``train``, ``base`` and ``encode`` sections of :mod:`facemarks.core.params`.

        ``seed`` is ``train.seed`` (weight init, data order, dropout), not ``base.seed`` (the data seed): a seed
        study retrains without regenerating data or targets.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dataclasses.asdict(train).items() if k in names}
        return cls(**kw, sigma=encode.sigma, decoder=encode.decoder)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``."""
        return self.lr * (self.lr_drop if epoch >= self.epochs_phase1 else 1.0)


@dataclass
class SplitArrays:
    """One split for training: arrays may be read-only memory maps."""

    images: np.ndarray  # (N, S, S) uint8
    heatmaps: np.ndarray  # (N, K, h, w) float16 / float32 targets in [0, 1]
    points: np.ndarray  # (N, K, 2) float32 crop px
    visible: np.ndarray  # (N, K) bool

    def __post_init__(self) -> None:
        n, s = len(self.images), self.images.shape[-1]
        assert self.images.ndim == 3 and self.images.shape[1] == s, f"images must be (N, S, S), got {self.images.shape}"
        k = self.points.shape[1]
        assert self.heatmaps.shape == (n, k, s // STRIDE, s // STRIDE), (
            f"heatmaps {self.heatmaps.shape} do not match images {self.images.shape} and points {self.points.shape}"
        )
        assert self.points.shape == (n, k, 2) and self.visible.shape == (n, k), (
            f"points {self.points.shape} / visible {self.visible.shape} do not match N={n}"
        )

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class TrainData:
    train: SplitArrays
    val: SplitArrays

    @property
    def input_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def num_keypoints(self) -> int:
        return int(self.train.points.shape[1])


def load_data(augmented_dir: str | Path, heatmaps_dir: str | Path) -> TrainData:
    """Memory-map ``<augmented_dir>/{train,val}/`` split folders and ``<heatmaps_dir>/{train,val}.npy``."""
    splits = {}
    for name in ("train", "val"):
        split = read_split(Path(augmented_dir) / name)
        heat = np.load(Path(heatmaps_dir) / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        splits[name] = SplitArrays(split.images, heat, split.points, split.visible)
    return TrainData(**splits)


class BatchDataset(Dataset):
    """Batches read with one fancy index per array (fast on memory maps).

    ``dataset[indices]`` -> images (B, 1, S, S) float32 in [0, 1], targets (B, K, h, w) float32,
    weights (B, K) float32 (1 for a visible point on the map, else 0).
    """

    def __init__(self, split: SplitArrays):
        self.split = split
        s = split.images.shape[-1]
        self.weights = np.asarray(split.visible, bool) & in_map(to_map(np.asarray(split.points), STRIDE), (s // STRIDE,) * 2)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.sort(np.asarray(indices))
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx])).unsqueeze(1).float().div_(255.0)
        targets = torch.from_numpy(np.ascontiguousarray(self.split.heatmaps[idx], dtype=np.float32))
        weights = torch.from_numpy(self.weights[idx].astype(np.float32))
        return images, targets, weights


def make_loader(split: SplitArrays, batch_size: int, seed: int, workers: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """Shuffled loader of whole batches (call ``loader.sampler.sampler.set_epoch(e)`` per epoch)."""
    dataset = BatchDataset(split)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    drop_last = len(sampler) >= batch_size  # a lone short batch is kept on tiny data
    batches = BatchSampler(sampler, batch_size, drop_last=drop_last)
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


@dataclass
class FitResult:
    """What :func:`fit` returns; ``history`` rows have the keys of :data:`EPOCH_COLUMNS`."""

    model: HeatmapNet  # trained model (unwrapped, on the training device)
    history: list[dict[str, float]]
    summary: dict[str, Any]
    config: TrainConfig
    loss: str


# ------------------------------------------------------------------------------------------------ helpers
def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU) -> (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _rank_world()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fingerprint(cfg: TrainConfig, data: TrainData, loss: str) -> str:
    """Hash of the config (minus fields that cannot change results), the loss and every data array."""
    h = hashlib.blake2b(digest_size=16)
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    # the epoch columns too: a checkpoint whose history lacks today's columns is not resumed
    h.update(json.dumps({"config": conf, "loss": loss, "columns": EPOCH_COLUMNS}, sort_keys=True).encode())
    for split in (data.train, data.val):
        for arr in (split.images, split.heatmaps, split.points, split.visible):
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            step = max(1, (64 << 20) // max(1, arr[:1].nbytes))  # ~64 MiB per chunk
            for i in range(0, len(arr), step):
                h.update(np.ascontiguousarray(arr[i:i + step]).data)
    return h.hexdigest()


def target_prior(split: SplitArrays, max_samples: int = 256) -> float:
    """Mean target value over the maps of visible points (first ``max_samples`` samples), for the BCE bias."""
    n = min(len(split), max_samples)
    heat = np.asarray(split.heatmaps[:n], dtype=np.float32)
    vis = np.asarray(split.visible[:n], bool)
    mean = float(heat[vis].mean()) if vis.any() else 0.0
    return min(max(mean, 1e-4), 0.5)


def nme_per_sample(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Inter-ocular NME (%) per sample over visible points: pred, gt (N, K, 2), visible (N, K) -> (N,)."""
    return 100.0 * metrics.nme(pred, gt, metrics.normaliser(gt, "io"), visible)


def mean_shape_nme(data: TrainData) -> float:
    """Val NME (%) of a predictor that outputs the mean training shape (crop px) for every face."""
    shape = metrics.mean_shape(data.train.points, data.train.visible)
    gt = np.asarray(data.val.points, np.float64)
    return float(np.nanmean(nme_per_sample(np.broadcast_to(shape, gt.shape), gt, np.asarray(data.val.visible))))


def is_collapse(val_nme: float, mean_shape: float) -> bool:
    """Mean-shape collapse: val NME at least :data:`COLLAPSE_RATIO` x the mean-shape predictor's NME."""
    return bool(val_nme >= COLLAPSE_RATIO * mean_shape)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    torch.manual_seed((seed * 1_000_003 + epoch * 1_009 + rank) % (2**63))


class _Progress:
    """tqdm bar on a terminal, periodic plain lines otherwise (CI logs); silent on ranks > 0."""

    def __init__(self, total: int, desc: str, enabled: bool, every_s: float = 30.0):
        self.total, self.desc, self.enabled, self.every_s = total, desc, enabled, every_s
        self.bar = None
        self.start = self.last = time.perf_counter()
        self.n = 0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)

    def update(self, loss: float) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}")
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.n == self.total:
            eta = (now - self.start) / self.n * (self.total - self.n)
            log.info("%s batch %d/%d loss %.4g eta %.0fs", self.desc, self.n, self.total, loss, eta)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ steps
def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
               weights: torch.Tensor, loss: str, device: torch.device, grad_clip: float = 0.0,
               amp: bool = False) -> torch.Tensor:
    """One optimisation step on a batch -> the detached batch loss.

    images (B, 1, S, S) float in [0, 1], targets (B, K, h, w) in [0, 1], weights (B, K); moved to ``device``.
    """
    images, targets, weights = (t.to(device, non_blocking=True) for t in (images, targets, weights))
    with _autocast(device, amp):
        outputs = net(images)
    batch_loss = heatmap_loss(outputs, targets, weights, loss)
    optimizer.zero_grad(set_to_none=True)
    batch_loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return batch_loss.detach()


def train_one_epoch(net: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, loss: str, device: torch.device,
                    grad_clip: float = 0.0, amp: bool = False,
                    on_batch: Callable[[float], None] | None = None) -> tuple[float, int, float]:
    """One pass over ``loader`` (batches of images, targets, weights) -> (sum of loss x batch, samples, seconds)."""
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for images, targets, weights in loader:
        value = float(train_step(net, optimizer, images, targets, weights, loss, device, grad_clip, amp))
        total += value * len(images)
        count += len(images)
        if on_batch is not None:
            on_batch(value)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return total, count, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, split: SplitArrays, loss: str, codec: HeatmapCodec, decoder: str,
             device: torch.device, batch_size: int = 64, amp: bool = False) -> tuple[float, float]:
    """Mean heatmap loss and mean NME (%) on ``split`` -> (val_loss, val_nme); see :func:`validate`."""
    row = validate(model, split, loss, codec, decoder, device, batch_size, amp)
    return row["val_loss"], row["val_nme"]


@torch.no_grad()
def validate(model: nn.Module, split: SplitArrays, loss: str, codec: HeatmapCodec, decoder: str,
             device: torch.device, batch_size: int = 64, amp: bool = False) -> dict[str, float]:
    """``{"val_loss", "val_nme" (%), "val_weak_peak_share"}`` on ``split`` (:func:`weak_peaks`); shards and sums
    under DDP."""
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    dataset = BatchDataset(split)
    own = np.arange(rank, len(split), world)
    sums = torch.zeros(5, dtype=torch.float64)  # loss * batch, nme sum, samples, weak peaks, weighted points
    for i in range(0, len(own), batch_size):
        idx = own[i:i + batch_size]
        images, targets, weights = (t.to(device) for t in dataset[idx])
        with _autocast(device, amp):
            outputs = model(images)
        sums[0] += float(heatmap_loss(outputs, targets, weights, loss)) * len(idx)
        heat = outputs_to_heatmaps(outputs.float(), loss)
        points, _ = codec.decode(heat, decoder)
        gt = np.asarray(split.points[idx], np.float64)
        nme = nme_per_sample(points.cpu().double().numpy(), gt, np.asarray(split.visible[idx]))
        sums[1] += float(np.nansum(nme))  # a face with no visible point has no NME
        sums[2] += len(idx)
        sums[3:5] += torch.tensor(weak_peaks(heat, targets, weights), dtype=torch.float64)
    if world > 1:
        sums = _all_reduce(sums, device)
    model.train(was_training)
    n = max(float(sums[2]), 1.0)
    share = float(sums[3] / sums[4]) if float(sums[4]) > 0 else float("nan")
    return {"val_loss": float(sums[0]) / n, "val_nme": float(sums[1]) / n, "val_weak_peak_share": share}


def weak_peaks(predicted: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
               weights: torch.Tensor | np.ndarray, ratio: float | None = None) -> tuple[int, int]:
    """Count the keypoints whose predicted map has a weak peak -> ``(weak, counted)``.

    predicted, target ``(N, K, h, w)`` in target units (after the sigmoid for ``bce``, see
    :func:`facemarks.training.model.outputs_to_heatmaps`); weights ``(N, K)``: only points with weight > 0 (visible, on the
    map) are counted. A peak is weak when ``max(predicted map) < ratio x max(target map)`` (default
    :data:`WEAK_PEAK_RATIO`): the target's own sampled peak, just under 1 for a sub-pixel Gaussian centre. This is
    the write-up's "predicts zeros / organised but wrong" symptom: the net outputs near-flat maps and the decoder
    reads points off noise. An all-zero prediction counts every point, the exact target none.
    """
    ratio = WEAK_PEAK_RATIO if ratio is None else ratio
    pred_max = torch.as_tensor(predicted).float().flatten(-2).amax(-1)
    target_max = torch.as_tensor(target).float().to(pred_max.device).flatten(-2).amax(-1)
    counted = torch.as_tensor(weights).to(pred_max.device) > 0
    weak = (pred_max < ratio * target_max) & counted
    return int(weak.sum()), int(counted.sum())


def _all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``t`` over all processes on ``device`` (NCCL needs CUDA tensors) -> a CPU tensor."""
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def amp_active(device: torch.device, amp: bool) -> bool:
    """Whether ``train.amp`` turns bf16 autocast on for ``device``: on CUDA, and on a CPU with native bf16 units
    (:func:`facemarks.core.cpuinfo.has_native_bf16`: AMX or AVX512-BF16). Elsewhere the CPU would emulate bf16, slower
    than fp32, so training stays fp32 there (``benchmarks/bench_train.py`` measures both)."""
    return amp and (device.type == "cuda" or (device.type == "cpu" and cpuinfo.has_native_bf16()))


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_active(device, amp))


# ------------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(checkpoint_dir: str | Path, fp: str | None = None) -> dict[str, Any] | None:
    """The checkpoint in ``checkpoint_dir`` (``weights_only`` load), or None if absent or (given ``fp``) stale."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if fp is not None and ckpt.get("fingerprint") != fp:
        return None
    return ckpt


def _save_checkpoint(checkpoint_dir: Path, ckpt: dict[str, Any]) -> None:
    with atomic_path(checkpoint_dir / CHECKPOINT_NAME) as tmp:
        torch.save(ckpt, tmp)


# ------------------------------------------------------------------------------------------------ fit
def fit(
    cfg: TrainConfig,
    data: TrainData,
    loss: str,
    checkpoint_dir: str | Path,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    run_id: str | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train one model with ``loss`` (``mse`` | ``bce`` | ``awing``), resuming from ``checkpoint_dir`` when it matches.

    Args:
        cfg: hyperparameters; ``cfg.epochs`` epochs in total, lr drops by ``lr_drop`` after ``epochs_phase1``.
        data: train and val splits (targets at 1/4 of the input size).
        checkpoint_dir: ``last.pt`` is written there after every epoch (rank 0, atomically). A checkpoint
            with the same fingerprint (:func:`fingerprint`) is resumed; any other one is replaced.
        device: torch device (see :func:`facemarks.core.device.resolve_device`).
        on_epoch: called with each new history row after its checkpoint is saved.
        run_id: stored in the checkpoint so that a resumed stage continues the same MLflow run
            (read it back with :func:`load_checkpoint`).
        init: a state dict to start from instead of the seeded initialisation (fine-tuning a trained model; part
            of the checkpoint fingerprint).
    """
    if loss not in LOSSES:
        raise ValueError(f"fit: unknown loss {loss!r}; allowed: {LOSSES}")
    device = torch.device(device)
    rank, world = _rank_world()
    if cfg.batch_size % world:
        raise ValueError(f"fit: batch_size {cfg.batch_size} is not divisible by {world} processes")
    checkpoint_dir = Path(checkpoint_dir)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _fit(cfg, data, loss, checkpoint_dir, device, on_epoch, run_id, rank, world, init)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _fit(cfg, data, loss, checkpoint_dir, device, on_epoch, run_id, rank, world, init=None) -> FitResult:
    s = data.input_size
    codec = HeatmapCodec(s, s // STRIDE, cfg.sigma)
    fp = fingerprint(cfg, data, loss)
    if init is not None:  # a fine-tuning run resumes only from a checkpoint that started from the same weights
        h = hashlib.blake2b(fp.encode(), digest_size=16)
        for name, tensor in sorted(init.items()):
            h.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        fp = h.hexdigest()

    torch.manual_seed(cfg.seed)
    prior = target_prior(data.train) if loss == "bce" else None
    model = build_model(data.num_keypoints, cfg.head_width, cfg.dropout, cfg.pretrained and rank == 0, prior)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    milestones = [cfg.epochs_phase1] if cfg.epochs_phase2 else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_drop)
    history: list[dict[str, float]] = []
    start = 0

    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt is not None and ckpt.get("fingerprint") == fp:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, start = list(ckpt["history"]), int(ckpt["epoch"])
        run_id = run_id or ckpt.get("run_id")
        if rank == 0:
            log.info("%s: resuming from %s after epoch %d/%d", loss, checkpoint_dir / CHECKPOINT_NAME, start, cfg.epochs)
    elif ckpt is not None and rank == 0:
        log.info("%s: checkpoint %s was made with other params or data; starting fresh",
                 loss, checkpoint_dir / CHECKPOINT_NAME)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = make_loader(data.train, cfg.batch_size // world, cfg.seed, cfg.workers, rank, world)
    msn = mean_shape_nme(data)

    for epoch in range(start, cfg.epochs):
        t_epoch = time.perf_counter()
        _seed_epoch(cfg.seed, epoch, rank)
        loader.sampler.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        net.train()
        progress = _Progress(len(loader), f"{loss} epoch {epoch + 1}/{cfg.epochs}", enabled=rank == 0)
        total, count, seconds = train_one_epoch(net, loader, optimizer, loss, device, cfg.grad_clip, cfg.amp,
                                                progress.update)
        progress.close()
        stats = torch.tensor([total, float(count)], dtype=torch.float64)
        if world > 1:
            stats = _all_reduce(stats, device)
        scheduler.step()
        val = validate(net.module if world > 1 else net, data.val, loss, codec, cfg.decoder, device, cfg.batch_size,
                       cfg.amp)
        val_loss, val_nme = val["val_loss"], val["val_nme"]
        row = {"epoch": epoch + 1, "train_loss": float(stats[0] / max(float(stats[1]), 1.0)), "val_loss": val_loss,
               "val_nme": val_nme, "lr": lr, "val_collapse": float(is_collapse(val_nme, msn)),
               "val_weak_peak_share": val["val_weak_peak_share"], "images_per_s": float(stats[1]) / max(seconds, 1e-9),
               "seconds": time.perf_counter() - t_epoch}
        history.append(row)
        if rank == 0:
            log.info("%s epoch %d/%d train_loss %.5g val_loss %.5g val_nme %.3f%% (mean shape %.3f%%) lr %.3g %.1f img/s",
                     loss, epoch + 1, cfg.epochs, row["train_loss"], val_loss, val_nme, msn, lr, row["images_per_s"])
            _save_checkpoint(checkpoint_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1, "rng": {"torch": torch.get_rng_state()}, "config": dataclasses.asdict(cfg),
                "loss": loss, "fingerprint": fp, "history": history, "run_id": run_id or "",
            })
        if world > 1:
            dist.barrier()
        if on_epoch is not None:
            on_epoch(row)

    summary = _summary(history, msn, loss, data, run_id)
    summary["bf16_autocast"] = amp_active(device, cfg.amp)  # which arithmetic trained it (CPU flags decide on CPU)
    if rank == 0 and summary["collapse"]:
        log.warning("%s: MEAN-SHAPE COLLAPSE: val NME %.3f%% >= %.1f x mean-shape NME %.3f%% (the net predicts "
                    "about the average face; try a lower lr, more epochs or another init)",
                    loss, summary["final_val_nme"], COLLAPSE_RATIO, msn)
    return FitResult(model=model, history=history, summary=summary, config=cfg, loss=loss)


def _summary(history, msn, loss, data, run_id) -> dict[str, Any]:
    if not history:
        raise ValueError("fit: no epochs were run (epochs_phase1 + epochs_phase2 must be >= 1)")
    last = history[-1]
    best = min(history, key=lambda r: r["val_nme"])
    collapse = is_collapse(last["val_nme"], msn)
    return {
        "loss": loss,
        "epochs": len(history),
        "final_val_nme": last["val_nme"],
        "best_val_nme": best["val_nme"],
        "best_epoch": int(best["epoch"]),
        "final_val_loss": last["val_loss"],
        "final_train_loss": last["train_loss"],
        "mean_shape_nme": msn,
        "collapse": collapse,
        "final_weak_peak_share": last.get("val_weak_peak_share", float("nan")),
        "weak_peak_ratio": WEAK_PEAK_RATIO,
        "images_per_s": statistics.median(r["images_per_s"] for r in history),
        "input_size": data.input_size,
        "heatmap_size": data.input_size // STRIDE,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "seconds": float(sum(r.get("seconds", 0.0) for r in history)),
        "collapse_ratio": COLLAPSE_RATIO,
        "run_id": run_id or "",
    }


# ------------------------------------------------------------------------------------------------ outputs
def timings(result: FitResult) -> dict[str, Any]:
    """The wall-clock part of a fit (for :func:`facemarks.core.timings.write_timings`): total ``seconds``, median
    ``images_per_s`` and per-epoch ``{"epoch", "images_per_s", "seconds"}`` rows."""
    s = result.summary
    return {"seconds": s["seconds"], "images_per_s": s["images_per_s"],
            "epochs": [{k: r[k] for k in ("epoch", "images_per_s", "seconds") if k in r} for r in result.history]}


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """``torch.save`` of the CPU state dict: the same weights give the same bytes (``models/<loss>/model.pt``).

    Saved through a file object: given a path, ``torch.save`` names the archive's folder after the file, and an
    atomic write's random temporary name would make every save differ (and ``dvc.lock`` with it)."""
    with open(path, "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f)
    return Path(path)


def write_outputs(result: FitResult, model_path: str | Path, metrics_path: str | Path, epochs_csv: str | Path) -> None:
    """``model.pt`` (state_dict), the summary JSON and the per-epoch CSV, each written atomically; the summary and the
    CSV leave out :data:`VOLATILE_KEYS` (timings and the MLflow run id), so that identical runs write identical files."""
    with atomic_path(model_path) as tmp:
        save_state_dict(result.model, tmp)
    atomic_write_json(metrics_path, {k: v for k, v in result.summary.items() if k not in VOLATILE_KEYS})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in result.history:
        writer.writerow({k: row[k] for k in EPOCH_COLUMNS})
    atomic_write_text(epochs_csv, buf.getvalue())


def loss_figure(history: list[dict[str, float]], loss: str):
    """Matplotlib figure: train/val loss (left) and val NME (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel=f"{loss} loss", title=f"{loss} loss", yscale="log")
    ax1.legend()
    ax2.plot(epochs, [r["val_nme"] for r in history], "o-", color="C2")
    ax2.set(xlabel="epoch", ylabel="val NME (%)", title="validation NME (inter-ocular)")
    fig.tight_layout()
    return fig


def mlflow_epoch_logger() -> Callable[[dict[str, float]], None]:
    """An ``on_epoch`` callback logging ``train_loss``, ``val_loss``, ``val_nme``, ``lr``, the failure checks
    ``val_collapse`` and ``val_weak_peak_share``, and ``images_per_s`` to the active run."""
    import mlflow

    keys = ("train_loss", "val_loss", "val_nme", "lr", "val_collapse", "val_weak_peak_share", "images_per_s")

    def log_row(row: dict[str, float]) -> None:
        mlflow.log_metrics({k: row[k] for k in keys if k in row and math.isfinite(row[k])}, step=int(row["epoch"]))

    return log_row


def log_mlflow(result: FitResult) -> None:
    """Log summary metrics, the loss-curve figure and the model to the active run.

    The model is logged with a ``(2, 1, S, S)`` input example (signature with a free batch axis), the state dict as
    ``extra_files/model.pt`` (byte-identical to ``models/<loss>/model.pt``, tag ``facemarks.model_md5``) and the
    ``facemarks`` metadata a loader needs (loss, input size, sigma, decoder): see
    :func:`facemarks.serving.registry.load_registered_model`."""
    import matplotlib.pyplot as plt
    import mlflow
    import mlflow.pytorch

    s = result.summary
    mlflow.log_metrics({
        "final_val_nme": s["final_val_nme"], "best_val_nme": s["best_val_nme"], "final_val_loss": s["final_val_loss"],
        "mean_shape_nme": s["mean_shape_nme"], "collapse": float(s["collapse"]), "images_per_s": s["images_per_s"],
        **({"final_weak_peak_share": s["final_weak_peak_share"]} if math.isfinite(s["final_weak_peak_share"]) else {}),
        "train_seconds": s["seconds"],
    })
    fig = loss_figure(result.history, result.loss)
    mlflow.log_figure(fig, f"loss_curves_{result.loss}.png")
    plt.close(fig)
    import tempfile

    model = result.model.to("cpu").eval()
    example = np.zeros((2, 1, s["input_size"], s["input_size"]), np.float32)  # batch 2: the batch axis stays free
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    meta = {"facemarks": {"loss": result.loss, "input_size": s["input_size"], "heatmap_size": s["heatmap_size"],
                          "sigma": result.config.sigma, "decoder": result.config.decoder}}
    with tempfile.TemporaryDirectory() as tmp:
        state_path = save_state_dict(model, Path(tmp) / "model.pt")
        mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=reqs,
                                 extra_files=[str(state_path)], metadata=meta)
        mlflow.set_tag(MODEL_HASH_TAG, file_md5(state_path))
    result.model.train()


def existing_run_id(run_id: str | None) -> str | None:
    """``run_id`` if the current MLflow store (:func:`facemarks.core.tracking.tracking_uri`) holds that run, else None."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException:
        return None
    return run_id
