"""Heatmap codec: keypoints <-> Gaussian heatmaps, seven decoders and the round-trip metric.

Why one module of ~620 lines: it is one codec. Each of the seven decoders inverts this encoder in the one
coordinate convention below and shares its numpy/torch plumbing (``_as_tensor``, ``_back``, ``_work_dtype``,
``_prep``, ``_finish``); split apart, the decoders would import the encoder's private helpers back. The
round-trip metric (the last ~115 lines) is the codec's own measure of that pair (the encode stage's
``metrics/roundtrip.json``).

Shapes: ``N`` samples, ``K`` keypoints (68), heatmaps ``(N, K, h, w)`` (rows ``h``, columns ``w``),
points ``(N, K, 2)`` as ``(x, y)``, visibility / weights / confidence ``(N, K)``, square input of side ``S``.

Coordinates (docs/design.md): pixel centres sit at integer coordinates, so a map of width ``w`` spans
``u in [-0.5, w - 0.5]``. With stride ``s = S / w``, input -> map is ``u = (x + 0.5) / s - 0.5`` and
map -> input is ``x = (u + 0.5) * s - 0.5`` (:func:`to_map`, :func:`to_input`; nothing else converts).

Functions accept numpy arrays or torch tensors on any device and return the kind they were given.
Module-level :func:`encode` / :func:`decode` work in map pixels; :class:`HeatmapCodec` works in input pixels.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from facemarks.data import portable
from facemarks.core.atomic import atomic_dir
from facemarks.core.params import DECODER_NAMES

#: every decoder, in report order: the one list, spelled in facemarks.core.params (which imports no torch, so that the
#: params validation can name the choices); ``_DECODE`` below implements exactly these
DECODERS = DECODER_NAMES

_LOG_FLOOR = 1e-10  # relative floor (to the peak) before taking logs
_SCRATCH_ELEMENTS = 1 << 19  # float32 scratch (2 MiB) for float16 encoding: stays in cache


# ----------------------------------------------------------------------------------------------------------
# coordinates


def to_map(points: Any, stride: float) -> Any:
    """Input pixels -> map pixels: ``u = (x + 0.5) / stride - 0.5`` (any shape, array / tensor / float)."""
    return (points + 0.5) / stride - 0.5


def to_input(points: Any, stride: float) -> Any:
    """Map pixels -> input pixels: ``x = (u + 0.5) * stride - 0.5``; the inverse of :func:`to_map`."""
    return (points + 0.5) * stride - 0.5


def _as_tensor(x: Any) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    a = np.ascontiguousarray(x)
    if not a.flags.writeable:  # e.g. a read-only memory map: torch tensors must own writable memory
        a = a.copy()
    return torch.from_numpy(a), True


def _back(t: torch.Tensor, was_numpy: bool) -> Any:
    return t.detach().cpu().numpy() if was_numpy else t


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_map(points: Any, size: tuple[int, int]) -> Any:
    """Mask ``(N, K)`` of finite points ``(N, K, 2)`` (map px) inside ``[-0.5, w-0.5] x [-0.5, h-0.5]``."""
    p, was_numpy = _as_tensor(points)
    h, w = size
    x, y = p[..., 0], p[..., 1]
    inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    return _back(inside & torch.isfinite(x) & torch.isfinite(y), was_numpy)


# ----------------------------------------------------------------------------------------------------------
# encoding


def _torch_dtype(dtype: Any) -> torch.dtype:
    """A torch float dtype from a torch dtype, a numpy dtype or a name such as ``"float16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = np.dtype(dtype).name
    if name not in ("float16", "float32", "float64"):
        raise ValueError(f"encode: dtype must be float16, float32 or float64, got {dtype!r}")
    return getattr(torch, name)


def encode(
    points: Any, visible: Any, size: tuple[int, int], sigma: float, dtype: Any = torch.float32, out: Any = None
) -> tuple[Any, Any]:
    """Gaussian heatmaps (peak 1, never truncated) at sub-pixel points, all in map pixels.

    points ``(N, K, 2)`` map px; visible ``(N, K)`` bool; size ``(h, w)``; sigma in map px; dtype of the maps
    (torch / numpy dtype or name: float16, float32, float64). Returns heatmaps ``(N, K, h, w)`` in ``dtype`` and
    weights ``(N, K)`` float32 (1 for a visible point inside the map, else 0 with an all-zero map: off-map points
    are dropped, never snapped to the border). ``out``: an optional writable ``(N, K, h, w)`` array / tensor of
    that dtype (a reused buffer or a memory-map slice) filled in place and returned.

    Vectorised as the outer product of two 1-D Gaussian profiles per point: the offsets ``col - x`` are taken in
    float64, the profiles and their product in float32 (float64 for float64 maps), rounded to ``dtype`` once, so a
    float16 map equals the float32 map cast to float16. Runs on the device of ``points`` when given a tensor.
    """
    if not sigma > 0:
        raise ValueError(f"encode: sigma must be > 0, got {sigma}")
    dtype = _torch_dtype(dtype)
    p, was_numpy = _as_tensor(points)
    if p.ndim < 1 or p.shape[-1] != 2:
        raise ValueError(f"encode: points must be (..., 2), got {tuple(p.shape)}")
    v, _ = _as_tensor(visible)
    if tuple(v.shape) != tuple(p.shape[:-1]):
        raise ValueError(f"encode: visible {tuple(v.shape)} does not match points {tuple(p.shape)}")
    h, w = int(size[0]), int(size[1])
    p = p.to(torch.float64)
    keep = v.to(device=p.device, dtype=torch.bool) & in_map(p, (h, w))
    work = torch.float64 if dtype == torch.float64 else torch.float32
    gx = _profile(torch.where(keep, p[..., 0], 0.0), w, sigma, work) * keep[..., None]  # (N, K, w)
    gy = _profile(torch.where(keep, p[..., 1], 0.0), h, sigma, work)  # (N, K, h)
    heatmaps = _output(out, (*p.shape[:-1], h, w), dtype, p.device)
    if dtype == work:
        torch.mul(gy[..., :, None], gx[..., None, :], out=heatmaps)
    else:  # mixed-dtype stores are slow: multiply into a cache-sized `work` scratch, then round once on copy
        flat, fy, fx = heatmaps.view(-1, h, w), gy.reshape(-1, h), gx.reshape(-1, w)
        step = max(1, _SCRATCH_ELEMENTS // (h * w))
        scratch = torch.empty((min(step, flat.shape[0]), h, w), dtype=work, device=p.device)
        for i in range(0, flat.shape[0], step):
            n = min(step, flat.shape[0] - i)
            torch.mul(fy[i : i + n, :, None], fx[i : i + n, None, :], out=scratch[:n])
            flat[i : i + n].copy_(scratch[:n])
    result = out if out is not None else _back(heatmaps, was_numpy)
    return result, _back(keep.to(torch.float32), was_numpy)


def _profile(centre: torch.Tensor, n: int, sigma: float, work: torch.dtype) -> torch.Tensor:
    """1-D Gaussians ``exp(-(i - c)^2 / (2 sigma^2))`` for ``i = 0..n-1``: centres ``(...)`` float64 -> ``(..., n)``
    in ``work``. The offset is taken in float64, the rest in ``work``; numpy on the CPU (several times faster
    than torch for these small element-wise chains), torch elsewhere."""
    scale = -0.5 / (sigma * sigma)
    if centre.device.type == "cpu":
        np_work = np.float64 if work == torch.float64 else np.float32
        d = (np.arange(n, dtype=np.float64) - centre.numpy()[..., None]).astype(np_work)
        d *= d
        d *= np_work(scale)
        return torch.from_numpy(portable.exp(d))  # the same bits on every CPU (numpy's exp dispatches per CPU)
    d = (torch.arange(n, device=centre.device, dtype=torch.float64) - centre[..., None]).to(work)
    return torch.exp(d * d * scale)


def _output(out: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor :func:`encode` writes: a view of ``out`` (checked) or a fresh one."""
    if out is None:
        if device.type == "cpu":  # numpy's allocator (huge pages) halves the page-fault cost of a fresh map
            return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
        return torch.empty(shape, dtype=dtype, device=device)
    t = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)  # shares memory; must be writable
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"encode: out is {tuple(t.shape)} {t.dtype} on {t.device}, need a contiguous {shape} {dtype} on {device}")
    return t


# ----------------------------------------------------------------------------------------------------------
# decoding helpers: maps are flattened to (B, h, w); B = prod of leading dims


def _prep(heatmaps: Any) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    t, was_numpy = _as_tensor(heatmaps)
    if t.ndim < 2 or t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"decode: heatmaps must be (..., h, w) with h, w > 0, got {tuple(t.shape)}")
    lead = tuple(t.shape[:-2])
    t = t.reshape(-1, *t.shape[-2:]).to(_work_dtype(t.dtype))
    if not torch.isfinite(t.sum()):  # one reduction instead of a full-size finiteness mask
        t = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
    return t, lead, was_numpy


def _finish(x: torch.Tensor, y: torch.Tensor, conf: torch.Tensor, lead: tuple, was_numpy: bool):
    points = torch.stack([x, y], dim=-1).reshape(*lead, 2)
    return _back(points, was_numpy), _back(conf.reshape(lead), was_numpy)


def _peak(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmax of (B, h, w) maps (first one on ties): row (B,), column (B,), value (B,)."""
    flat = t.flatten(1)
    idx = flat.argmax(dim=1)
    value = flat.gather(1, idx[:, None])[:, 0]
    w = t.shape[-1]
    return idx // w, idx % w, value


def _gather(t: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """Values of (B, h, w) maps at integer rows/cols (B, M), which must lie inside the map."""
    w = t.shape[-1]
    return t.flatten(1).gather(1, iy * w + ix)


def _offsets(radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return dy.reshape(-1), dx.reshape(-1)


def _local_centroid(t, iy, ix, radius):
    """Centroid of max(t, 0) in the window of ``radius`` around (iy, ix), clipped to the map; argmax if empty."""
    h, w = t.shape[-2:]
    dy, dx = _offsets(radius, t.device)
    yy, xx = iy[:, None] + dy, ix[:, None] + dx
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    vals = _gather(t, yy.clamp(0, h - 1), xx.clamp(0, w - 1)).clamp(min=0) * ok
    mass = vals.sum(1)
    good = mass > 0
    safe = torch.where(good, mass, torch.ones_like(mass))
    x = torch.where(good, (vals * xx).sum(1) / safe, ix.to(t.dtype))
    y = torch.where(good, (vals * yy).sum(1) / safe, iy.to(t.dtype))
    return x, y


# ----------------------------------------------------------------------------------------------------------
# decoders: (..., h, w) heatmaps -> points (..., 2) in map px and confidence (...) = the map's maximum


def decode_argmax(heatmaps: Any):
    """Integer argmax. heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` map px, confidence ``(N, K)``."""
    t, lead, was_numpy = _prep(heatmaps)
    iy, ix, peak = _peak(t)
    return _finish(ix.to(t.dtype), iy.to(t.dtype), peak, lead, was_numpy)


def decode_argmax_quarter(heatmaps: Any):
    """Argmax shifted 1/4 px toward the higher neighbour on each axis (only where both neighbours exist).

    heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` map px, confidence ``(N, K)``.
    """
    t, lead, was_numpy = _prep(heatmaps)
    h, w = t.shape[-2:]
    iy, ix, peak = _peak(t)
    iy1, ix1 = iy[:, None], ix[:, None]
    left = _gather(t, iy1, (ix1 - 1).clamp(min=0))[:, 0]
    right = _gather(t, iy1, (ix1 + 1).clamp(max=w - 1))[:, 0]
    up = _gather(t, (iy1 - 1).clamp(min=0), ix1)[:, 0]
    down = _gather(t, (iy1 + 1).clamp(max=h - 1), ix1)[:, 0]
    x = ix.to(t.dtype) + 0.25 * torch.sign(right - left) * ((ix > 0) & (ix < w - 1))
    y = iy.to(t.dtype) + 0.25 * torch.sign(down - up) * ((iy > 0) & (iy < h - 1))
    return _finish(x, y, peak, lead, was_numpy)


def decode_weighted_average(heatmaps: Any):
    """Global centroid of ``max(map, 0)`` (argmax for maps without positive mass).

    heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` map px, confidence ``(N, K)``.
    Biased toward the map centre when the Gaussian is cut by a border.
    """
    t, lead, was_numpy = _prep(heatmaps)
    h, w = t.shape[-2:]
    iy, ix, peak = _peak(t)
    p = t.clamp(min=0)
    mass = p.sum((1, 2))
    good = mass > 0
    safe = torch.where(good, mass, torch.ones_like(mass))
    cols = torch.arange(w, device=t.device, dtype=t.dtype)
    rows = torch.arange(h, device=t.device, dtype=t.dtype)
    x = torch.where(good, p.sum(1) @ cols / safe, ix.to(t.dtype))
    y = torch.where(good, p.sum(2) @ rows / safe, iy.to(t.dtype))
    return _finish(x, y, peak, lead, was_numpy)


def decode_local_weighted_average(heatmaps: Any, radius: int = 2):
    """Centroid of ``max(map, 0)`` in a ``(2r+1)^2`` window around the argmax, clipped to the map.

    heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` map px, confidence ``(N, K)``.
    """
    t, lead, was_numpy = _prep(heatmaps)
    iy, ix, peak = _peak(t)
    x, y = _local_centroid(t, iy, ix, int(radius))
    return _finish(x, y, peak, lead, was_numpy)


def decode_soft_argmax(heatmaps: Any, temperature: float = 0.05):
    """Expectation of ``softmax(map / temperature)`` over all pixels.

    heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` map px, confidence ``(N, K)``.
    """
    if not temperature > 0:
        raise ValueError(f"soft_argmax: temperature must be > 0, got {temperature}")
    t, lead, was_numpy = _prep(heatmaps)
    h, w = t.shape[-2:]
    _, _, peak = _peak(t)
    prob = torch.softmax(t.flatten(1) / temperature, dim=1).view(-1, h, w)
    x = prob.sum(1) @ torch.arange(w, device=t.device, dtype=t.dtype)
    y = prob.sum(2) @ torch.arange(h, device=t.device, dtype=t.dtype)
    return _finish(x, y, peak, lead, was_numpy)


def _blurred_stencil(t: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (radius ceil(3 sigma), zero outside the map) of (B, h, w) maps, evaluated only on the
    5x5 stencil around (iy, ix): returns (B, 5, 5). Blurring a local patch costs O(B r^2), not O(B h w r)."""
    h, w = t.shape[-2:]
    radius = max(1, math.ceil(3 * sigma))
    half = radius + 2
    k = torch.arange(-radius, radius + 1, device=t.device, dtype=t.dtype)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = k / k.sum()
    # band[q, m] = k[q - m] for patch index q (0..2 half) and stencil index m (0..4); zero off the band
    q = torch.arange(2 * half + 1, device=t.device)[:, None]
    m = torch.arange(5, device=t.device)[None, :]
    lag = q - m
    band = torch.where((lag >= 0) & (lag <= 2 * radius), k[lag.clamp(0, 2 * radius)], torch.zeros((), dtype=t.dtype, device=t.device))
    dy, dx = _offsets(half, t.device)
    yy, xx = iy[:, None] + dy, ix[:, None] + dx
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    patch = (_gather(t, yy.clamp(0, h - 1), xx.clamp(0, w - 1)) * ok).view(-1, 2 * half + 1, 2 * half + 1)
    return band.T @ patch @ band


def decode_dark(heatmaps: Any, blur_sigma: float = 2.0):
    """DARK (Zhang et al., CVPR 2020): Gaussian modulation, then one Taylor step on the log map at the argmax.

    heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` map px, confidence ``(N, K)``.
    ``blur_sigma`` should match the training sigma; the blur sees zeros outside the map, as in DARK (measured
    best of zero / reflect / edge padding) and is evaluated only where the Taylor step reads it. Derivatives
    are central differences (step 1 for the gradient and the mixed term, step 2 for dxx / dyy). As in DARK,
    only argmaxes at least 2 px inside the map are refined; the step is also skipped where the Hessian is
    not negative definite or the step exceeds 1 px.
    """
    if not blur_sigma > 0:
        raise ValueError(f"dark: blur_sigma must be > 0, got {blur_sigma}")
    t, lead, was_numpy = _prep(heatmaps)
    h, w = t.shape[-2:]
    iy, ix, peak = _peak(t)
    b = _blurred_stencil(t, iy, ix, float(blur_sigma))  # (B, 5, 5), centre = argmax
    bmax = b.flatten(1).amax(1).clamp(min=torch.finfo(t.dtype).tiny)
    logb = torch.log((b / bmax[:, None, None]).clamp(min=_LOG_FLOOR))

    def at(dy: int, dx: int) -> torch.Tensor:
        return logb[:, 2 + dy, 2 + dx]

    c = at(0, 0)
    gx = 0.5 * (at(0, 1) - at(0, -1))
    gy = 0.5 * (at(1, 0) - at(-1, 0))
    dxx = 0.25 * (at(0, 2) - 2 * c + at(0, -2))
    dyy = 0.25 * (at(2, 0) - 2 * c + at(-2, 0))
    dxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
    det = dxx * dyy - dxy * dxy
    inside = (ix >= 2) & (ix <= w - 3) & (iy >= 2) & (iy <= h - 3)
    ok = (dxx < 0) & (det > 0) & (peak > 0) & inside
    safe = torch.where(ok, det, torch.ones_like(det))
    ox = -(dyy * gx - dxy * gy) / safe
    oy = -(dxx * gy - dxy * gx) / safe
    ok &= (ox.abs() <= 1) & (oy.abs() <= 1)
    ox = torch.where(ok, ox, torch.zeros_like(ox))
    oy = torch.where(ok, oy, torch.zeros_like(oy))
    return _finish(ix.to(t.dtype) + ox, iy.to(t.dtype) + oy, peak, lead, was_numpy)


def _quadratic_pinv(radius: int, device, dtype) -> torch.Tensor:
    dy, dx = _offsets(radius, torch.device("cpu"))
    dx, dy = dx.double(), dy.double()
    design = torch.stack([torch.ones_like(dx), dx, dy, dx * dx, dy * dy, dx * dy], dim=1)  # (M, 6)
    return torch.linalg.pinv(design).to(device=device, dtype=dtype)  # (6, M)


def decode_subpixel(heatmaps: Any, radius: int = 1):
    """Least-squares quadratic fit of the log map in a ``(2r+1)^2`` window; exact for a sampled Gaussian.

    heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` map px, confidence ``(N, K)``.
    ``log(map / peak)`` (floored at 1e-10) is fitted with ``c + bx dx + by dy + axx dx^2 + ayy dy^2 + axy dx dy``
    around the argmax; the window is shifted inward at borders (the log of a Gaussian is quadratic
    everywhere, so border points stay exact). The stationary point is used when the fit is a maximum within
    1 px of the argmax; otherwise the decoder falls back to the 3x3 centroid.
    """
    radius = int(radius)
    t, lead, was_numpy = _prep(heatmaps)
    h, w = t.shape[-2:]
    iy, ix, peak = _peak(t)
    fx, fy = _local_centroid(t, iy, ix, 1)
    if h < 2 * radius + 1 or w < 2 * radius + 1:
        return _finish(fx, fy, peak, lead, was_numpy)
    cy = iy.clamp(radius, h - 1 - radius)
    cx = ix.clamp(radius, w - 1 - radius)
    dy, dx = _offsets(radius, t.device)
    vals = _gather(t, cy[:, None] + dy, cx[:, None] + dx)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))
    logv = torch.log((vals / scale[:, None]).clamp(min=_LOG_FLOOR))
    _, bx, by, axx, ayy, axy = (logv @ _quadratic_pinv(radius, t.device, t.dtype).T).unbind(1)
    det = 4 * axx * ayy - axy * axy
    ok = (axx < 0) & (det > 0) & (peak > 0)
    safe = torch.where(ok, det, torch.ones_like(det))
    x = cx.to(t.dtype) - (2 * ayy * bx - axy * by) / safe
    y = cy.to(t.dtype) - (2 * axx * by - axy * bx) / safe
    ok &= torch.isfinite(x) & torch.isfinite(y) & ((x - ix).abs() <= 1) & ((y - iy).abs() <= 1)
    return _finish(torch.where(ok, x, fx), torch.where(ok, y, fy), peak, lead, was_numpy)


_DECODE: dict[str, Callable[..., tuple[Any, Any]]] = {
    "argmax": decode_argmax,
    "argmax_quarter": decode_argmax_quarter,
    "weighted_average": decode_weighted_average,
    "local_weighted_average": decode_local_weighted_average,
    "soft_argmax": decode_soft_argmax,
    "dark": decode_dark,
    "subpixel": decode_subpixel,
}
assert tuple(_DECODE) == DECODERS


def decode(heatmaps: Any, method: str = "subpixel", **kw: Any) -> tuple[Any, Any]:
    """Decode heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` in map px and confidence ``(N, K)``.

    ``method`` is one of :data:`DECODERS`; ``kw`` go to that decoder (``radius``, ``temperature``, ``blur_sigma``).
    Inputs may be any float dtype (computed in float32, float64 kept); non-finite values count as 0.
    """
    if method not in _DECODE:
        raise ValueError(f"decode: unknown method {method!r}; allowed: {', '.join(DECODERS)}")
    return _DECODE[method](heatmaps, **kw)


# ----------------------------------------------------------------------------------------------------------
# codec in input pixels


@dataclass(frozen=True)
class HeatmapCodec:
    """Input-pixel codec: a square input of side ``input_size`` <-> ``(heatmap_size, heatmap_size)`` maps.

    Shapes: points ``(N, K, 2)`` input px, visible / weights / confidence ``(N, K)``, heatmaps ``(N, K, h, w)``
    with ``h = w = heatmap_size``. ``sigma`` is in map pixels.
    """

    input_size: int
    heatmap_size: int
    sigma: float

    def __post_init__(self) -> None:
        if not (0 < self.heatmap_size <= self.input_size):
            raise ValueError(f"HeatmapCodec: need 0 < heatmap_size <= input_size, got {self.heatmap_size}, {self.input_size}")
        if not self.sigma > 0:
            raise ValueError(f"HeatmapCodec: sigma must be > 0, got {self.sigma}")

    @property
    def stride(self) -> float:
        """Input pixels per map pixel."""
        return self.input_size / self.heatmap_size

    @property
    def size(self) -> tuple[int, int]:
        return (self.heatmap_size, self.heatmap_size)

    def encode(self, points: Any, visible: Any, dtype: Any = torch.float32, out: Any = None) -> tuple[Any, Any]:
        """points ``(N, K, 2)`` input px, visible ``(N, K)`` -> heatmaps ``(N, K, h, w)`` in ``dtype``, weights float32 ``(N, K)``."""
        return encode(to_map(points, self.stride), visible, self.size, self.sigma, dtype, out)

    def decode(self, heatmaps: Any, method: str = "subpixel", **kw: Any) -> tuple[Any, Any]:
        """heatmaps ``(N, K, h, w)`` -> points ``(N, K, 2)`` input px, confidence ``(N, K)``."""
        if method == "dark":
            kw.setdefault("blur_sigma", self.sigma)
        points, conf = decode(heatmaps, method, **kw)
        return to_input(points, self.stride), conf


def encode_to_npy(
    path: str | Path, points_input_px: np.ndarray, visible: np.ndarray, codec: HeatmapCodec,
    dtype: str = "float16", chunk: int = 256,
) -> np.ndarray:
    """Encode faces chunk by chunk straight into a new ``.npy`` file, so memory stays bounded by ``chunk``.

    points ``(N, K, 2)`` input px (a memory map is fine), visible ``(N, K)``; writes ``path`` as ``(N, K, h, w)``
    in ``dtype`` (not atomic by itself: write into a :func:`facemarks.core.atomic.atomic_dir`). Returns the weights
    ``(N, K)`` float32.
    """
    n, k = visible.shape
    if tuple(points_input_px.shape) != (n, k, 2):
        raise ValueError(f"encode_to_npy({path}): points {points_input_px.shape} do not match visible {visible.shape}")
    shape = (n, k, *codec.size)
    weights = np.zeros((n, k), dtype=np.float32)
    if n == 0:  # a zero-length memory map cannot be opened
        np.save(path, np.zeros(shape, dtype=dtype), allow_pickle=False)
        return weights
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    for i in range(0, n, chunk):
        pts = to_map(np.asarray(points_input_px[i : i + chunk], dtype=np.float64), codec.stride)
        vis = np.asarray(visible[i : i + chunk], dtype=bool)
        _, weights[i : i + chunk] = encode(pts, vis, codec.size, codec.sigma, dtype, out=out[i : i + chunk])
    out.flush()
    del out
    return weights


def write_heatmaps(splits: dict[str, Any], codec: HeatmapCodec, dtype: str, out: str | Path) -> dict[str, dict]:
    """The ``encode`` stage's folder: ``out/{split}.npy`` ``(N, K, h, w)`` in ``dtype``, ``out/{split}_weights.npy``
    float32 ``(N, K)`` and ``out/meta.json``, for each split folder of ``splits`` (name → a
    :func:`facemarks.core.store.read_split` result with ``points`` ``(N, K, 2)`` input px and ``visible`` ``(N, K)``);
    the folder appears whole (:func:`facemarks.core.atomic.atomic_dir`). Returns ``{split: {"n", "encoded_points"}}``.
    The bytes depend on the data alone (``tests/test_repro_bytes.py``)."""
    with atomic_dir(Path(out)) as tmp:
        counts = {}
        for name, split in splits.items():
            weights = encode_to_npy(tmp / f"{name}.npy", split.points, split.visible, codec, dtype)
            np.save(tmp / f"{name}_weights.npy", weights, allow_pickle=False)  # the folder is atomic
            counts[name] = {"n": len(weights), "encoded_points": int(weights.sum())}
        meta = {"sigma": codec.sigma, "input_size": codec.input_size, "heatmap_size": codec.heatmap_size,
                "stride": codec.stride, "dtype": dtype, "splits": counts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return counts


# ----------------------------------------------------------------------------------------------------------
# round-trip metric


def uniform_points(rng: np.random.Generator, n: int, size: int, k: int = 68) -> np.ndarray:
    """``n`` faces of ``k`` points ``(n, k, 2)`` uniform over an input of side ``size``: ``[-0.5, size-0.5]^2``."""
    return rng.uniform(-0.5, size - 0.5, size=(n, k, 2))


def _stats(err: np.ndarray) -> dict[str, float | None]:
    if err.size == 0:
        return {"mean": None, "median": None, "p99": None, "max": None}
    return {
        "mean": float(err.mean()),
        "median": float(np.median(err)),
        "p99": float(np.percentile(err, 99)),
        "max": float(err.max()),
    }


def roundtrip_table(
    points_input_px: np.ndarray,
    visible: np.ndarray,
    codec: HeatmapCodec,
    dtypes: Sequence[str] = ("float32", "float16"),
    decoders: Sequence[str] = DECODERS,
    chunk: int = 128,
) -> dict:
    """Encode, store as each dtype, decode with each decoder; Euclidean error statistics (JSON-able).

    points ``(N, K, 2)`` input px, visible ``(N, K)``. Errors are over encoded points (visible and on the map);
    visible points off the map are counted in ``n_off_map`` (encoded with weight 0, never snapped).
    ``border`` = encoded points within 1 map px of the map edge. Result:
    ``{..counts.., "dtypes": {dtype: {decoder: {"map_px"|"input_px"|"border_map_px"|"border_input_px": stats}}}}``
    with stats ``{"mean", "median", "p99", "max"}`` (``None`` for an empty set), and, when ``subpixel`` is among
    the decoders, ``"subpixel_targets": {dtype: {target: bool}}`` against :data:`TARGETS` (map px): this is
    where a storage dtype too lossy for the exact decoder shows (float16 at sigma 3: mean about 1.1e-3 map px).
    """
    points = np.asarray(points_input_px, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    assert points.shape[:-1] == visible.shape and points.shape[-1] == 2, f"{points.shape} vs {visible.shape}"
    for name in decoders:
        if name not in _DECODE:
            raise ValueError(f"roundtrip_table: unknown decoder {name!r}; allowed: {', '.join(DECODERS)}")
    hs = codec.heatmap_size
    errors: dict[str, dict[str, list[np.ndarray]]] = {d: {m: [] for m in decoders} for d in dtypes}
    border: list[np.ndarray] = []
    n_encoded = 0
    for i in range(0, len(points), chunk):
        pts, vis = points[i : i + chunk], visible[i : i + chunk]
        heat, weights = codec.encode(pts, vis)
        keep = weights > 0
        n_encoded += int(keep.sum())
        u = to_map(pts[keep], codec.stride)
        border.append(((u < 0.5) | (u > hs - 1.5)).any(-1))
        for dtype in dtypes:
            stored = heat.astype(dtype, copy=False)
            for name in decoders:
                pred, _ = codec.decode(stored, name)
                errors[dtype][name].append(np.linalg.norm(pred[keep] - pts[keep], axis=-1))
    at_border = np.concatenate(border) if border else np.zeros(0, bool)
    table: dict = {
        "input_size": codec.input_size,
        "heatmap_size": hs,
        "sigma": codec.sigma,
        "stride": codec.stride,
        "n_points": int(visible.size),
        "n_visible": int(visible.sum()),
        "n_encoded": n_encoded,
        "n_off_map": int(visible.sum()) - n_encoded,
        "n_border": int(at_border.sum()),
        "dtypes": {},
    }
    for dtype in dtypes:
        table["dtypes"][dtype] = {}
        for name in decoders:
            err = np.concatenate(errors[dtype][name]) if errors[dtype][name] else np.zeros(0)
            table["dtypes"][dtype][name] = {
                "input_px": _stats(err),
                "map_px": _stats(err / codec.stride),
                "border_input_px": _stats(err[at_border]),
                "border_map_px": _stats(err[at_border] / codec.stride),
            }
    if "subpixel" in decoders:
        table["subpixel_targets"] = {d: _meets_targets(table["dtypes"][d]["subpixel"]) for d in dtypes}
    return table


TARGETS = {"mean_map_px": 1e-3, "max_map_px": 1e-2, "border_max_map_px": 0.05}  # issue 4, best decoder, in-frame


def _meets_targets(cell: dict) -> dict[str, bool | None]:
    """Whether one decoder's round trip meets :data:`TARGETS` (``None`` where there were no points)."""
    got = {"mean_map_px": cell["map_px"]["mean"], "max_map_px": cell["map_px"]["max"],
           "border_max_map_px": cell["border_map_px"]["max"]}
    return {k: None if got[k] is None else bool(got[k] <= TARGETS[k]) for k in TARGETS}


def flatten_roundtrip(tables: dict, prefix: str = "roundtrip") -> dict[str, float]:
    """Flat metric names for MLflow from ``{set_name: roundtrip_table(...)}`` (other keys are skipped):
    ``f"{prefix}_{set}_{decoder}_{dtype}_{unit}_{stat}"``, e.g. ``roundtrip_uniform_subpixel_float32_input_px_mean``;
    empty statistics (``None``) are left out.
    """
    flat: dict[str, float] = {}
    for set_name, table in tables.items():
        if not isinstance(table, dict) or "dtypes" not in table:
            continue
        for dtype, by_decoder in table["dtypes"].items():
            for decoder, by_unit in by_decoder.items():
                for unit, stats in by_unit.items():
                    for stat, value in stats.items():
                        if value is not None:
                            flat[f"{prefix}_{set_name}_{decoder}_{dtype}_{unit}_{stat}"] = float(value)
    return flat
