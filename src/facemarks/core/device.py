"""Which torch device a stage runs on: ``train.device`` (``auto`` | ``cpu`` | ``cuda``) → :class:`torch.device`.

Under ``torchrun`` each process takes the GPU of its ``LOCAL_RANK``. Used by the train stage (training, DDP) and by
evaluate (scoring the trained models).
"""
from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` (this process's ``LOCAL_RANK``) if available, else ``cpu``."""
    if name not in DEVICES:
        raise ValueError(f"resolve_device: unknown device {name!r}; allowed: auto, cpu, cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device = cuda but no CUDA device is available (use auto or cpu)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


__all__ = ["DEVICES", "resolve_device"]
