"""The arithmetic of training and validation: bf16 autocast where the hardware has native bf16, fp32 elsewhere; the
channels-last memory layout on the CPU."""
from __future__ import annotations

import torch

from facemarks.core import cpuinfo


def amp_active(device: torch.device, amp: bool) -> bool:
    """Whether ``train.amp`` turns bf16 autocast on for ``device``: on CUDA, and on a CPU with native bf16 units
    (:func:`facemarks.core.cpuinfo.has_native_bf16`: AMX or AVX512-BF16). Elsewhere the CPU would emulate bf16, slower
    than fp32, so training stays fp32 there (``benchmarks/bench_train.py`` measures both)."""
    return amp and (device.type == "cuda" or (device.type == "cpu" and cpuinfo.has_native_bf16()))


def autocast(device: torch.device, amp: bool):
    """The ``torch.autocast`` context (bf16) for ``device``, enabled as :func:`amp_active` says."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_active(device, amp))


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout :func:`facemarks.training.train.fit` keeps the network in: ``channels_last`` on the CPU, where it is
    oneDNN's own convolution layout (no reorder around every convolution: 1.06x fp32 images/s under AVX2, 1.18x with
    bf16 on AMX, ``benchmarks/bench_train.py``), PyTorch's default elsewhere. The input needs no conversion: with one
    channel both layouts are the same bytes. Saved weights are contiguous either way
    (:func:`facemarks.training.outputs.save_state_dict`)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format
