"""Machine-independent float kernels for the data stages: the same bits on every x86-64 CPU.

numpy, OpenBLAS, SciPy and glibc pick code paths per CPU at run time: OpenBLAS's GEMM/GEMV/DOT kernels (FMA or
not, blocking order; ``OPENBLAS_CORETYPE``), numpy's SIMD ``exp`` / ``power`` / ``sin`` (``NPY_DISABLE_CPU_FEATURES``)
and the libm those fall back to. Their last bits then differ from machine to machine, and a rounded ``uint8``
pixel or a stored ``float64`` transform with them (measured: README "Reproducibility", ``docs/design.md``).

Everything here uses only IEEE-754 basic operations (``+ - * /``, ``sqrt``, ``floor``, ``ldexp``) in a fixed
order, which every CPU rounds identically, so the results are defined by this code alone:

- :func:`matmul`, :func:`weighted_sum`, :func:`norm`, :func:`inv3`, :func:`det2`: small linear algebra without BLAS
  (sequential sums, no FMA; :func:`weighted_sum` equals OpenBLAS Haswell's SGEMV bit for bit, so the gray
  conversion of the shipped data did not change);
- :func:`exp`, :func:`log`, :func:`power`, :func:`sin`, :func:`cos`: float64 polynomials (< 2 ulp, bit-identical
  everywhere), float32 results rounded once from float64;
- :func:`gaussian_filter` and :func:`resize`: SciPy's ``gaussian_filter`` and scikit-image's ``resize``
  (``order=1``) with the Gaussian weights from :func:`exp` instead of numpy's dispatched ``exp``; the filtering
  itself (``scipy.ndimage.correlate1d`` / ``zoom``, C without run-time dispatch) is unchanged.
"""
from __future__ import annotations

import numpy as np

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact for |k| < 2**20 (fdlibm)
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
# 1/n! for the Taylor series of exp on |r| <= ln2 / 2 (terms to r**14: error < 2**-60)
_EXP_C = tuple(1.0 / float(np.prod(np.arange(1, n + 1, dtype=np.float64))) for n in range(15))
_SQRT_HALF = 0.70710678118654752440
_PIO2_1 = 1.57079632673412561417e00  # pi/2 in three parts (fdlibm): k * part exact for |k| < 2**20
_PIO2_2 = 6.07710050650619224932e-11
_PIO2_3 = 2.02226624879595063154e-21
_INV_PIO2 = 6.36619772367581382433e-01


def _horner(x: np.ndarray, coeffs) -> np.ndarray:
    acc = np.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * x + c
    return acc


def exp(x) -> np.ndarray:
    """``e**x`` elementwise, float64 (float32 input → float32 result, rounded once). ``|x| < 700``; below −700 → 0."""
    a = np.asarray(x)
    out32 = a.dtype == np.float32
    x64 = a.astype(np.float64)
    xc = np.where(np.isfinite(x64), np.clip(x64, -700.0, 700.0), 0.0)
    k = np.floor(xc * _INV_LN2 + 0.5)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    y = np.ldexp(_horner(r, _EXP_C), k.astype(np.int32))
    y = np.where(x64 < -700.0, 0.0, np.where(x64 > 700.0, np.inf, np.where(np.isnan(x64), np.nan, y)))
    return y.astype(np.float32) if out32 else y


def log(x) -> np.ndarray:
    """Natural log elementwise for ``x > 0`` (float64; float32 in → float32 out); ``x == 0`` → −inf."""
    a = np.asarray(x)
    out32 = a.dtype == np.float32
    x64 = a.astype(np.float64)
    m, e = np.frexp(np.where(x64 > 0, x64, 1.0))  # x = m * 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = np.where(small, m * 2.0, m)  # m in [sqrt(1/2), sqrt(2))
    e = (e - small).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)  # log m = 2 atanh s, |s| <= 0.1716
    s2 = s * s
    series = _horner(s2, tuple(1.0 / (2 * n + 1) for n in range(12)))
    y = (e * _LN2_HI + (2.0 * s * series + e * _LN2_LO))
    y = np.where(x64 > 0, y, -np.inf)
    return y.astype(np.float32) if out32 else y


def power(x, p: float) -> np.ndarray:
    """``x ** p`` for ``x >= 0`` as ``exp(p * log(x))`` (``0 ** p = 0`` for ``p > 0``); float32 in → float32 out."""
    a = np.asarray(x)
    y = exp(float(p) * log(a.astype(np.float64)))
    y = np.where(a.astype(np.float64) > 0, y, 0.0 if p > 0 else 1.0)
    return y.astype(np.float32) if a.dtype == np.float32 else y


def _sincos(x) -> tuple[np.ndarray, np.ndarray]:
    x64 = np.asarray(x, dtype=np.float64)
    k = np.floor(x64 * _INV_PIO2 + 0.5)
    r = ((x64 - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3  # |r| <= pi/4 (|x| < 1e5)
    r2 = r * r
    s = r * _horner(r2, tuple((-1.0) ** n / float(np.prod(np.arange(1, 2 * n + 2, dtype=np.float64))) for n in range(11)))
    c = _horner(r2, tuple((-1.0) ** n / float(np.prod(np.arange(1, 2 * n + 1, dtype=np.float64))) for n in range(11)))
    q = np.mod(k, 4.0)
    sin = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    cos = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    return sin, cos


def sin(x) -> np.ndarray | float:
    """Sine (float64) for ``|x| < 1e5``; a Python float for a scalar."""
    y = _sincos(x)[0]
    return float(y) if np.ndim(x) == 0 else y


def cos(x) -> np.ndarray | float:
    """Cosine (float64) for ``|x| < 1e5``; a Python float for a scalar."""
    y = _sincos(x)[1]
    return float(y) if np.ndim(x) == 0 else y


# ------------------------------------------------------------------------------------------------ linear algebra
def matmul(a, b) -> np.ndarray:
    """``a @ b`` with sequential sums (no BLAS, no FMA): ``a (..., n, k)``, ``b (..., k, m)`` or ``b (k,)``."""
    a = np.asarray(a)
    b = np.asarray(b)
    if b.ndim == 1:
        return weighted_sum(a, b)
    if a.ndim == 1:
        return matmul(a[None, :], b)[..., 0, :]
    acc = a[..., :, 0, None] * b[..., 0, None, :]
    for j in range(1, a.shape[-1]):
        acc = acc + a[..., :, j, None] * b[..., j, None, :]
    return acc


def weighted_sum(x, w) -> np.ndarray:
    """``sum_j x[..., j] * w[..., j]`` as ``((x0 w0 + x1 w1) + x2 w2) + …`` in ``x``'s float dtype: ``x (..., k) @ w (k,)``
    for a 1-D ``w`` (OpenBLAS Haswell SGEMV's order, bit for bit), a row-wise dot for a ``w`` that broadcasts."""
    x = np.asarray(x)
    w = np.asarray(w, dtype=x.dtype if x.dtype.kind == "f" else np.float64)
    acc = x[..., 0] * w[..., 0]
    for j in range(1, w.shape[-1]):
        acc = acc + x[..., j] * w[..., j]
    return acc


def norm(v, axis: int = -1) -> np.ndarray | float:
    """Euclidean norm along ``axis`` (sequential sum of squares, then ``sqrt``); a float for a 1-D vector."""
    v = np.asarray(v, dtype=np.float64)
    v = np.moveaxis(v, axis, -1)
    acc = v[..., 0] * v[..., 0]
    for j in range(1, v.shape[-1]):
        acc = acc + v[..., j] * v[..., j]
    out = np.sqrt(acc)
    return float(out) if out.ndim == 0 else out


def det2(m) -> np.ndarray | float:
    """Determinant of the leading ``(2, 2)`` block: ``a d − b c``."""
    m = np.asarray(m, dtype=np.float64)
    out = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    return float(out) if out.ndim == 0 else out


def inv3(m) -> np.ndarray:
    """Inverse of ``(..., 3, 3)`` matrices by the adjugate (no LAPACK); raises on a singular matrix."""
    m = np.asarray(m, dtype=np.float64)
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    A, B, C = e * i - f * h, f * g - d * i, d * h - e * g
    det = (a * A + b * B) + c * C
    if np.any(det == 0) or not np.all(np.isfinite(det)):
        raise np.linalg.LinAlgError("inv3: singular matrix")
    adj = np.stack([np.stack([A, c * h - b * i, b * f - c * e], -1),
                    np.stack([B, a * i - c * g, c * d - a * f], -1),
                    np.stack([C, b * g - a * h, a * e - b * d], -1)], -2)
    return adj / det[..., None, None]


# ------------------------------------------------------------------------------------------------ filters
def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """SciPy's ``_gaussian_kernel1d(sigma, 0, int(truncate * sigma + 0.5))`` with :func:`exp`: ``(2r + 1,)`` float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = exp(-0.5 / (float(sigma) * float(sigma)) * x ** 2)
    return phi / phi.sum()


def gaussian_filter(image: np.ndarray, sigma, mode: str = "nearest", cval: float = 0.0,
                    truncate: float = 4.0) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, sigma, mode=mode, cval=cval, truncate=truncate)`` with portable weights.

    Output dtype = input dtype for float input (as ``skimage.filters.gaussian(..., preserve_range=True)`` on
    float32/float64); integer input is filtered as float64. ``sigma``: scalar or one per axis (0 skips an axis).
    """
    image = np.asarray(image)
    if image.dtype.kind != "f":
        image = image.astype(np.float64)
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (image.ndim,))
    modes = [mode] * image.ndim if isinstance(mode, str) else list(mode)
    from scipy import ndimage  # lazy: the codec imports this module on predict's path

    out = np.empty_like(image)
    src = image
    done = False
    for axis, s in enumerate(sigmas):
        if s > 1e-15:
            ndimage.correlate1d(src, gaussian_kernel(float(s), truncate)[::-1], axis, out, modes[axis], cval, 0)
            src, done = out, True
    if not done:
        out[...] = image
    return out


def resize(image: np.ndarray, output_shape: tuple[int, int], anti_aliasing: bool = False) -> np.ndarray:
    """``skimage.transform.resize(image, output_shape, order=1, mode="reflect", anti_aliasing=...,
    preserve_range=True)`` for a float 2-D image, with :func:`gaussian_filter`'s portable weights."""
    image = np.asarray(image)
    if image.dtype.kind != "f":
        image = image.astype(np.float64)
    factors = np.divide(image.shape, output_shape)
    filtered = image
    if anti_aliasing:
        filtered = gaussian_filter(image, np.maximum(0, (factors - 1) / 2), mode="mirror", cval=0.0)
    from scipy import ndimage

    out = ndimage.zoom(filtered, [1 / f for f in factors], order=1, mode="mirror", cval=0.0, grid_mode=True)
    np.clip(out, np.asarray(image.min()), np.asarray(image.max()), out=out)
    return out
