"""Resumable training checkpoints: ``<checkpoint_dir>/last.pt``, written atomically after every epoch.

A checkpoint is a dict of tensors and plain values (loaded back with ``weights_only=True``): ``model``, ``optimizer``
and ``scheduler`` state dicts, ``epoch`` (epochs done), ``config`` (the train config as a dict), ``loss``,
``fingerprint`` (:func:`facemarks.training.train.fingerprint`: a checkpoint of other params or data is not resumed),
``history`` (the per-epoch rows so far) and ``run_id`` (the MLflow run a resumed stage continues).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from facemarks.core.atomic import atomic_path

CHECKPOINT_NAME = "last.pt"


def load_checkpoint(checkpoint_dir: str | Path, fp: str | None = None) -> dict[str, Any] | None:
    """The checkpoint in ``checkpoint_dir`` (``weights_only`` load), or None if absent or (given ``fp``) stale."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if fp is not None and ckpt.get("fingerprint") != fp:
        return None
    return ckpt


def save_checkpoint(checkpoint_dir: str | Path, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` as ``<checkpoint_dir>/last.pt`` atomically: a run killed while saving leaves the previous one."""
    with atomic_path(Path(checkpoint_dir) / CHECKPOINT_NAME) as tmp:
        torch.save(ckpt, tmp)
