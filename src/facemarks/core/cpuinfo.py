"""What this CPU can do: its model name, the instruction-set flags that decide speed and int8 numerics, and its peak.

Read from ``/proc/cpuinfo`` (Linux); elsewhere every query answers "unknown" (an empty flag set), which callers
treat as the most conservative CPU: no native bf16 (training stays fp32), no VNNI (int8 with 7-bit weights).

- **Native bf16** (``amx_bf16`` or ``avx512_bf16``): bf16 autocast runs on hardware bf16 units, 1.6-1.9x faster
  training here (``benchmarks/bench_train.py``); without them PyTorch emulates bf16 and is slower than fp32.
- **VNNI** (``avx512_vnni``, ``avx_vnni`` or ``amx_int8``): int8 dot products accumulate u8 x s8 products in 32 bits.
  Without it (plain AVX2 / AVX-512) onnxruntime's u8 x s8 kernels add pairs of products in 16 bits with saturation,
  so full-range 8-bit weights can overflow; 7-bit weights (``reduce_range``) cannot (``facemarks.serving.export``).

oneDNN's ISA cap ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``) is honoured: under a cap below the bf16 ISAs, oneDNN cannot
use the bf16 units, so :func:`has_native_bf16` is False, and :func:`peak_gflops` counts the capped vector width. With
``ATEN_CPU_CAPABILITY=avx2`` beside it, a CPU with AVX-512 trains as an AVX2-only CPU would (the emulation used to
time the default on "a CPU without native bf16", ``docs/results.md``). onnxruntime ignores the cap (its int8
kernels follow the hardware flags), so :func:`has_vnni` does not.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"
#: oneDNN ISA caps that leave it 256-bit vectors at most, and no bf16 units (the names oneDNN accepts, upper case)
AVX2_CAPS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
#: caps that leave AVX-512 but not its bf16 instructions
NO_BF16_CAPS = (*AVX2_CAPS, "AVX512_CORE", "AVX512_CORE_VNNI")
# the flags worth recording beside a number that depends on them (speed, int8 numerics)
REPORTED_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                  "amx_tile", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def _fields() -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def flags() -> frozenset[str]:
    """Every instruction-set flag of this CPU (``/proc/cpuinfo`` ``flags``; empty when unknown)."""
    return frozenset(_fields().get("flags", "").split())


def model_name() -> str:
    """The CPU's model string, e.g. ``Intel(R) Xeon(R) Processor`` (``platform.processor()`` where unknown)."""
    return _fields().get("model name") or platform.processor() or platform.machine()


def isa_cap() -> str:
    """oneDNN's ISA cap (``$ONEDNN_MAX_CPU_ISA``, upper case; empty when unset or ``ALL``)."""
    cap = os.environ.get(ISA_CAP_ENV, "").strip().upper()
    return "" if cap == "ALL" else cap


def has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (:data:`BF16_FLAGS`) and oneDNN may use it (:func:`isa_cap`)."""
    return any(f in flags() for f in BF16_FLAGS) and isa_cap() not in NO_BF16_CAPS


def has_vnni() -> bool:
    """True when int8 dot products accumulate in 32 bits without saturation (:data:`VNNI_FLAGS`)."""
    return any(f in flags() for f in VNNI_FLAGS)


def describe() -> dict:
    """``{"model", "flags" (the :data:`REPORTED_FLAGS` present), "native_bf16", "vnni", "cores"}`` for metrics, and
    ``"isa_cap"`` (oneDNN's cap, ATen's capability) when either is set: a number measured under a cap says so."""
    present = flags()
    out = {"model": model_name(), "flags": [f for f in REPORTED_FLAGS if f in present],
           "native_bf16": has_native_bf16(), "vnni": has_vnni(), "cores": len(os.sched_getaffinity(0))}
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "")
    if isa_cap() or aten:
        out["isa_cap"] = {"onednn": isa_cap() or "ALL", "aten": aten or "default"}
    return out


def clock_ghz() -> float:
    """The CPU clock in GHz: the ``cpu MHz`` of ``/proc/cpuinfo`` (the current clock; nan where unknown)."""
    try:
        return float(_fields().get("cpu MHz", "nan")) / 1000.0
    except ValueError:
        return float("nan")


def peak_gflops(cores: int, ghz: float, bf16_amx: bool = False) -> float:
    """Peak GFLOP/s of ``cores`` at ``ghz``: fp32 FMA lanes (16 with AVX-512, 8 with AVX2, 4 otherwise) x 2 FMA
    units x 2 FLOP per FMA; with ``bf16_amx`` the AMX tile unit's 1024 bf16 FMAs per cycle (2048 FLOP) instead.

    Two FMA units per core is an assumption (true of server Xeon and EPYC cores); the clock is the one reported,
    not the all-core turbo, so the ratio to this peak is an estimate of the distance to the limit, not a bound.
    """
    present, cap = flags(), isa_cap()
    if bf16_amx and "amx_bf16" in present and cap not in NO_BF16_CAPS:
        per_cycle = 2048.0
    else:
        wide = "avx512f" in present and cap not in AVX2_CAPS
        lanes = 16 if wide else 8 if "avx2" in present and cap != "SSE41" else 4
        per_cycle = lanes * 2 * 2
    return cores * ghz * per_cycle
