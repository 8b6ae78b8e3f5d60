"""Split folders: one directory of memory-mappable ``.npy`` arrays plus ``meta.json`` per data split.

Written whole and atomically (temp dir + rename); read with ``mmap_mode='r'`` so loaders touch only what they use.
Array names and shapes are listed in ``docs/design.md`` (``images (N, S, S)``, ``points (N, 68, 2)`` …).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facemarks.core.atomic import _json_default, atomic_dir

ARRAYS = ("images", "points", "visible", "transform", "orig_points", "boxes")


@dataclass
class Split:
    """A loaded split. Arrays are read-only memory maps when read with ``mmap=True``."""

    images: np.ndarray  # (N, S, S) uint8
    points: np.ndarray  # (N, 68, 2) float32, crop pixels
    visible: np.ndarray  # (N, 68) bool
    transform: np.ndarray  # (N, 3, 3) float64, original px -> crop px
    orig_points: np.ndarray  # (N, 68, 2) float64, original-image px
    boxes: np.ndarray  # (N, 4) float64, (left, top, width, height)
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.images)


def write_split(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write every array of :data:`ARRAYS` plus ``meta.json`` into ``path`` atomically."""
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"write_split: missing arrays {missing}")
    n = {k: len(arrays[k]) for k in ARRAYS}
    if len(set(n.values())) != 1:
        raise ValueError(f"write_split: arrays disagree on N: {n}")
    with atomic_dir(path) as tmp:
        for key in ARRAYS:
            np.save(tmp / f"{key}.npy", np.ascontiguousarray(arrays[key]), allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default), encoding="utf-8")


def read_split(path: str | Path, mmap: bool = True) -> Split:
    """Read a split folder written by :func:`write_split`."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path}: not a split folder (no meta.json); run the augment stage first")
    mode = "r" if mmap else None
    arrays = {k: np.load(path / f"{k}.npy", mmap_mode=mode, allow_pickle=False) for k in ARRAYS}
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    return Split(**arrays, meta=meta)
