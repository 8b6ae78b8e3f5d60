"""Training data: the train / val splits as memory maps, whole-batch datasets and the shuffled DDP loader.

Note:
    N: samples, K: keypoints (68), S: input side, h = S / 4: heatmap side.

:func:`load_data` memory-maps the augment stage's split folders and the encode stage's targets into a
:class:`TrainData`; :func:`make_loader` draws whole batches through a ``DistributedSampler`` (the data order of epoch
``e`` comes from ``seed + e``, the same under one process and under ``torchrun``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from facemarks.core.store import read_split
from facemarks.heatmaps.codec import in_map, to_map
from facemarks.training.model import STRIDE


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


def target_prior(split: SplitArrays, max_samples: int = 256) -> float:
    """Mean target value over the maps of visible points (first ``max_samples`` samples), for the BCE bias."""
    n = min(len(split), max_samples)
    heat = np.asarray(split.heatmaps[:n], dtype=np.float32)
    vis = np.asarray(split.visible[:n], bool)
    mean = float(heat[vis].mean()) if vis.any() else 0.0
    return min(max(mean, 1e-4), 0.5)
