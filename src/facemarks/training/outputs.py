"""The train stage's files from a :class:`facemarks.training.train.FitResult`: ``model.pt``, the summary JSON, the
per-epoch CSV, and the wall-clock timings kept apart from them.

Identical runs write identical files: the DVC-tracked ones leave out :data:`VOLATILE_KEYS`, which go to
``timings/train_<loss>.json`` (:func:`timings`) and to MLflow instead.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemarks.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from facemarks.training.train import EPOCH_COLUMNS, FitResult

# Differ between two reproductions of the same commit: kept out of the DVC metrics/plots files (see :func:`timings`).
VOLATILE_KEYS = ("images_per_s", "seconds", "run_id")


def timings(result: FitResult) -> dict[str, Any]:
    """The wall-clock part of a fit (for :func:`facemarks.core.timings.write_timings`): total ``seconds``, median
    ``images_per_s`` and per-epoch ``{"epoch", "images_per_s", "seconds"}`` rows."""
    s = result.summary
    return {"seconds": s["seconds"], "images_per_s": s["images_per_s"],
            "epochs": [{k: r[k] for k in ("epoch", "images_per_s", "seconds") if k in r} for r in result.history]}


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """``torch.save`` of the CPU state dict, contiguous (whatever layout training kept): the same weights give the same
    bytes (``models/<loss>/model.pt``).

    Saved through a file object: given a path, ``torch.save`` names the archive's folder after the file, and an
    atomic write's random temporary name would make every save differ (and ``dvc.lock`` with it)."""
    with open(path, "wb") as f:
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f)
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
