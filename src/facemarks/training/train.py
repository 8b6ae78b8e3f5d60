"""Training loop: two-phase Adam, per-epoch validation NME, resumable checkpoints, DDP.

Note:
    N: samples, K: keypoints (68), S: input side, h = S / 4: heatmap side.

:func:`fit` trains one model for one loss (``mse``, ``bce`` or ``awing``: :data:`facemarks.training.model.LOSSES`) on a
:class:`facemarks.training.data.TrainData` and returns a :class:`FitResult`; :mod:`facemarks.training.outputs` and
:mod:`facemarks.training.mlflow_log` turn that into files and an MLflow run. Each epoch is scored by
:mod:`facemarks.training.validation` and saved by :mod:`facemarks.training.checkpoint`.
Run under ``torchrun`` (``torch.distributed`` initialised, see :func:`facemarks.training.distributed.init_distributed`)
the same call trains with DistributedDataParallel; only rank 0 writes checkpoints and progress.

Determinism: model init uses ``seed``; the data order of epoch ``e`` is drawn from ``seed + e``
(``DistributedSampler``) and the dropout stream is reseeded from ``(seed, e, rank)`` at the start of every
epoch, so a run resumed from the checkpoint after epoch ``e`` replays exactly what an uninterrupted run does
(bit-identical on CPU, where ``torch.use_deterministic_algorithms`` is on during :func:`fit`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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

from facemarks.heatmaps.codec import HeatmapCodec
from facemarks.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from facemarks.training.data import TrainData, make_loader, target_prior
from facemarks.training.distributed import all_reduce, rank_world
from facemarks.training.model import LOSSES, STRIDE, HeatmapNet, build_model, heatmap_loss
from facemarks.training.precision import amp_active, autocast, memory_format
from facemarks.training.validation import COLLAPSE_RATIO, WEAK_PEAK_RATIO, is_collapse, mean_shape_nme, validate

log = logging.getLogger("facemarks.training.train")

# the per-epoch CSV (a DVC plots file); val_collapse (0/1, :func:`facemarks.training.validation.is_collapse`) and
# val_weak_peak_share (:func:`facemarks.training.validation.weak_peaks`) are the two failure checks, side by side
EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "val_nme", "lr", "val_collapse", "val_weak_peak_share")
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
class FitResult:
    """What :func:`fit` returns; ``history`` rows have the keys of :data:`EPOCH_COLUMNS`."""

    model: HeatmapNet  # trained model (unwrapped, on the training device)
    history: list[dict[str, float]]
    summary: dict[str, Any]
    config: TrainConfig
    loss: str


# ------------------------------------------------------------------------------------------------ helpers
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
    with autocast(device, amp):
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
            (read it back with :func:`facemarks.training.checkpoint.load_checkpoint`).
        init: a state dict to start from instead of the seeded initialisation (fine-tuning a trained model; part
            of the checkpoint fingerprint).
    """
    if loss not in LOSSES:
        raise ValueError(f"fit: unknown loss {loss!r}; allowed: {LOSSES}")
    device = torch.device(device)
    rank, world = rank_world()
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
    model = model.to(device, memory_format=memory_format(device))
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
            stats = all_reduce(stats, device)
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
            save_checkpoint(checkpoint_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1, "config": dataclasses.asdict(cfg), "loss": loss, "fingerprint": fp,
                "history": history, "run_id": run_id or "",
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
