"""Painting a synthetic face from its projected geometry (:func:`facemarks.data.face_geometry.pose_geometry`).

:class:`Canvas` is a float RGB image with soft, anti-aliased layer blending; :func:`background` crops one of
scikit-image's bundled pictures. :func:`paint_face` paints clothing, a neck in the face's own skin tone, ears, hair,
Lambert-shaded skin with a random light direction and photographic texture, then eyes (sclera, iris, pupil, lash
line), brows, nose shading and nostrils, lips, mouth and teeth at a random per-face strength, and maybe hair strands,
eyeglasses and a hand; :func:`occlude` adds a partial occluder. Every random draw comes from the generator passed
in, in a fixed order: the bytes of a face depend on it (``tests/test_synthetic.py``).

Coordinates are pixels with pixel centres at integer coordinates (``docs/design.md``); images ``(H, W, 3)``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facemarks.core.params import Synthetic
from facemarks.data import portable

SKIN_TONES = np.array([(250, 222, 200), (241, 194, 167), (224, 172, 140), (198, 140, 108),
                       (166, 110, 80), (120, 80, 58), (86, 58, 42)], dtype=np.float32) / 255.0
HAIR_COLOURS = np.array([(20, 16, 14), (45, 30, 22), (80, 55, 35), (120, 85, 50), (170, 135, 85),
                         (60, 58, 56), (140, 60, 30)], dtype=np.float32) / 255.0
IRIS_COLOURS = np.array([(70, 45, 25), (40, 28, 18), (70, 100, 130), (80, 100, 70), (100, 100, 100)],
                        dtype=np.float32) / 255.0
BACKGROUNDS = ("brick", "grass", "gravel", "rough_wall", "camera", "coffee", "chelsea", "rocket", "moon",
               "page", "text", "coins", "clock", "horse", "hubble_deep_field", "immunohistochemistry")


# ----------------------------------------------------------------------------------------------- drawing
def _catmull(pts: np.ndarray, closed: bool, k: int = 6) -> np.ndarray:
    """Smooth curve through ``pts (N, 2)`` (Catmull-Rom, ``k`` samples per segment) → ``(M, 2)``."""
    pts = np.asarray(pts, dtype=np.float64)
    if closed:
        ext = np.vstack([pts[-1:], pts, pts[:2]])
        segs = len(pts)
    else:
        ext = np.vstack([2 * pts[:1] - pts[1:2], pts, 2 * pts[-1:] - pts[-2:-1]])
        segs = len(pts) - 1
    t = np.linspace(0, 1, k, endpoint=False)[None, :, None]
    p0, p1, p2, p3 = (ext[i:i + segs, None, :] for i in range(4))
    out = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * (t * t)
                 + (-p0 + 3 * p1 - 3 * p2 + p3) * (t * t * t))
    out = out.reshape(-1, 2)
    return out if closed else np.vstack([out, pts[-1:]])


class Canvas:
    """Float RGB image ``(H, W, 3)`` in [0, 1] with soft, anti-aliased layer blending."""

    def __init__(self, image: np.ndarray):
        self.img = image
        self.h, self.w = image.shape[:2]

    def _window(self, pts: np.ndarray, pad: float):
        x0 = int(max(0, np.floor(pts[:, 0].min() - pad)))
        y0 = int(max(0, np.floor(pts[:, 1].min() - pad)))
        x1 = int(min(self.w, np.ceil(pts[:, 0].max() + pad) + 1))
        y1 = int(min(self.h, np.ceil(pts[:, 1].max() + pad) + 1))
        return x0, y0, x1, y1

    def _raster(self, pts: np.ndarray, pad: float, soft: float, paint) -> tuple[np.ndarray, tuple[int, int]] | None:
        """Supersampled (anti-aliased) mask in the window around ``pts``; ``paint(draw, to_ss)`` draws in white."""
        x0, y0, x1, y1 = self._window(pts, pad + 3 * soft + 2)
        if x1 - x0 < 1 or y1 - y0 < 1:
            return None
        ss = 2 if (x1 - x0) * (y1 - y0) > 150 * 150 else 4
        im = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        off = np.array([x0 - 0.5 + 0.5 / ss, y0 - 0.5 + 0.5 / ss])

        def to_ss(p: np.ndarray) -> list[float]:
            return ((np.asarray(p, np.float64) - off) * ss).ravel().tolist()

        paint(ImageDraw.Draw(im), to_ss, ss)
        im = im.reduce(ss)
        if soft >= 0.8:
            im = im.filter(ImageFilter.GaussianBlur(float(soft)))
        return np.asarray(im, np.float32) * np.float32(1 / 255), (x0, y0)

    def poly_mask(self, poly: np.ndarray, soft: float = 0.6):
        """Soft fill of polygon ``(M, 2)``: returns ``(mask (h, w), (x0, y0))`` or ``None`` when off-canvas."""
        return self._raster(poly, 0.0, soft, lambda d, f, ss: d.polygon(f(poly), fill=255))

    def stroke_mask(self, curve: np.ndarray, width, soft: float = 0.5):
        """Anti-aliased stroke along polyline ``(M, 2)``; ``width`` scalar or per-vertex ``(M,)`` px."""
        width = np.broadcast_to(np.asarray(width, np.float64), (len(curve),))

        def paint(d, f, ss):
            q = f(curve)
            if np.ptp(width) < 0.25:
                d.line(q, fill=255, width=max(1, int(round(width[0] * ss))))
                return
            n = len(curve)
            for i in range(0, n - 1, 3):  # chunks of 3 segments with their mean width
                j = min(i + 3, n - 1)
                w = max(1, int(round(width[i:j + 1].mean() * ss)))
                d.line(q[2 * i:2 * j + 2], fill=255, width=w)

        return self._raster(curve, float(width.max()) / 2 + 1, soft, paint)

    def blend(self, mm, colour, alpha: float = 1.0) -> None:
        """Alpha-blend ``colour`` (RGB or ``(h, w, 3)``) through soft mask ``mm`` from :meth:`poly_mask`."""
        if mm is None:
            return
        m, (x0, y0) = mm
        h, w = m.shape
        sl = self.img[y0:y0 + h, x0:x0 + w]
        a = (m * np.float32(alpha))[..., None]
        col = np.asarray(colour, np.float32)
        col = col if col.ndim == 1 else col[: sl.shape[0], : sl.shape[1]]
        sl += a * (col - sl)

    def multiply(self, mm, factor: float, strength: float = 1.0) -> None:
        """Darken/brighten: pixels × (1 + strength·mask·(factor − 1))."""
        if mm is None:
            return
        m, (x0, y0) = mm
        h, w = m.shape
        self.img[y0:y0 + h, x0:x0 + w] *= (1 + strength * m * (factor - 1))[..., None]


@lru_cache(maxsize=None)
def _background_images() -> tuple[Image.Image, ...]:
    """scikit-image's bundled pictures that load offline, as RGB PIL images."""
    import warnings

    from skimage import data

    out = []
    for name in BACKGROUNDS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = np.asarray(getattr(data, name)())
        except Exception:  # not bundled in this install (needs a download): skip it
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = (img.astype(np.float64) / max(float(img.max()), 1.0) * 255).astype(np.uint8)
        out.append(Image.fromarray(np.ascontiguousarray(img)))
    if not out:
        raise RuntimeError("no scikit-image bundled picture loads offline; reinstall scikit-image")
    return tuple(out)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random crop of a bundled picture, resized to ``(h, w, 3)`` float32 in [0, 1], flipped and colour-jittered."""
    bgs = _background_images()
    src = bgs[rng.integers(len(bgs))]
    sw, sh = src.size
    scale = rng.uniform(0.3, 1.0)
    ch = min(sh, max(8, int(sh * scale)))
    cw = min(sw, max(8, int(ch * w / h)))
    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    bg = np.asarray(src.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)), np.float32) * (1 / 255)
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    tint = (rng.uniform(0.6, 1.2, 3) * rng.uniform(0.5, 1.1)).astype(np.float32)
    return np.clip(bg * tint, 0, 1)


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Roughly unit-std noise ``shape`` with features about ``sigma`` px (bilinear-upsampled white noise)."""
    h, w = shape
    sh, sw = max(2, int(h / (2 * sigma)) + 1), max(2, int(w / (2 * sigma)) + 1)
    small = Image.fromarray(rng.standard_normal((sh, sw), dtype=np.float32), mode="F")
    return np.asarray(small.resize((w, h), Image.BILINEAR), np.float32)


# ----------------------------------------------------------------------------------------------- face
def paint_face(rng: np.random.Generator, cv: Canvas, g: dict, unit: float, cfg: Synthetic) -> None:
    """Paint head, skin, features from the projected geometry ``g`` (pixels; ``unit`` px per template unit)."""
    pts = g["points"]
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.08, 3).astype(np.float32)
    skin = np.clip(skin, 0, 1)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.8, 1.2)
    light = np.array([rng.uniform(-0.9, 0.9), rng.uniform(-0.9, 0.4), rng.uniform(0.5, 1.0)])
    light /= portable.norm(light)
    soft = max(0.5, unit * 0.004)
    fw = portable.norm(pts[16] - pts[0]) + 1e-6

    if rng.random() < 0.8:  # shoulders and clothing (a textured, tinted bundled picture) below the neck
        c8 = pts[8]
        top = c8[1] + rng.uniform(0.45, 0.8) * fw
        wide = rng.uniform(1.2, 1.8) * fw
        torso = np.array([[c8[0] - 0.35 * fw, top], [c8[0] + 0.35 * fw, top], [c8[0] + wide, top + 0.45 * fw],
                          [c8[0] + wide * 1.1, top + 3 * fw], [c8[0] - wide * 1.1, top + 3 * fw],
                          [c8[0] - wide, top + 0.45 * fw]])
        tm = cv.poly_mask(_catmull(torso, closed=True, k=3), soft * 2)
        if tm is not None:
            cloth = background(rng, *tm[0].shape) * rng.uniform(0.2, 1.1, 3).astype(np.float32)
            cv.blend(tm, cloth)
    if rng.random() < 0.9:  # neck in the face's own tone (photos: the jaw is a shading edge, not a colour edge)
        cv.blend(cv.poly_mask(g["neck"], soft * 2), skin * rng.uniform(0.72, 0.98))
        chin = _catmull(pts[3:14], closed=False, k=3) + (pts[8] - (pts[0] + pts[16]) / 2) * 0.08
        cv.multiply(cv.stroke_mask(chin, 0.12 * fw, soft + rng.uniform(0.03, 0.08) * fw), rng.uniform(0.45, 0.9))
    ears = g["ears"] if cfg.ears else []
    if not g["short_hair"]:
        _paint_ears(cv, ears, skin, soft)
    bald = rng.random() < 0.1
    if not bald:
        hm = cv.poly_mask(g["hair"], soft * 1.5)
        if hm is not None:
            tex = 1 + 0.15 * _smooth_noise(rng, hm[0].shape, max(1.0, unit * 0.01))
            cv.blend(hm, hair[None, None, :] * tex[..., None])
    if g["short_hair"]:
        _paint_ears(cv, ears, skin, soft)
    face_poly = np.vstack([_catmull(pts[:17], closed=False, k=4), g["forehead"]])
    fm = cv.poly_mask(face_poly, soft * rng.uniform(1.2, 3.0))
    if fm is None:
        return
    # Lambert shading on an ellipsoid fitted to the face
    m, (x0, y0) = fm
    cx, cy = g["centre"]
    rx = (pts[:17, 0].max() - pts[:17, 0].min()) * 0.62 + 1
    ry = (pts[8, 1] - face_poly[:, 1].min()) * 0.62 + 1
    u = ((np.arange(x0, x0 + m.shape[1], dtype=np.float32) - cx) / rx)[None, :]
    v = ((np.arange(y0, y0 + m.shape[0], dtype=np.float32) - cy) / ry)[:, None]
    r2 = u * u + v * v
    nz = np.sqrt(np.clip(1 - r2, 0.0, 1.0))
    lam = np.clip((u * np.float32(light[0]) + v * np.float32(light[1]) + nz * np.float32(light[2]))
                  / np.sqrt(np.maximum(r2, 1.0)), 0, 1)
    low = rng.uniform(0.3, 0.75)  # shading contrast: flat frontal light .. hard side light
    shade = low + (1.1 - low) * lam
    tex = 1 + 0.04 * _smooth_noise(rng, m.shape, max(1.0, unit * 0.02)) + 0.02 * rng.standard_normal(m.shape, dtype=np.float32)
    if cfg.photo_texture > 0:  # photographic structure in the skin (pores, shadows, highlights of a real picture)
        photo = portable.weighted_sum(background(rng, *m.shape), np.float32([0.3, 0.59, 0.11]))
        photo -= photo.mean()
        tex += np.float32(rng.uniform(0, cfg.photo_texture)) * photo / np.float32(photo.std() + 1e-3)
    cv.blend(fm, skin[None, None, :] * (shade * tex)[..., None].astype(np.float32))
    strength = rng.uniform(cfg.feature_contrast_min, 1.0)
    _paint_features(rng, cv, pts, unit, skin, hair, light, soft, g["yaw"], strength)
    if rng.random() < cfg.strand_prob:
        _strands(rng, cv, pts, g["forehead"], hair, soft, fw)
    if rng.random() < cfg.glasses_prob:
        _glasses(rng, cv, pts, soft)
    if rng.random() < cfg.hand_prob:
        _hand(rng, cv, pts, skin, soft, fw)


def _paint_ears(cv: Canvas, ears: list[np.ndarray], skin: np.ndarray, soft: float) -> None:
    """Ears: a skin-toned outline with a shaded rim (painted before the face, which covers their inner part)."""
    for ear in ears:
        cv.blend(cv.poly_mask(_catmull(ear, closed=True, k=3), soft * 1.2), skin * 0.9)
        cv.multiply(cv.stroke_mask(_catmull(ear, closed=True, k=3), max(1.0, 0.15 * np.ptp(ear[:, 1]) / 2), soft * 2),
                    0.8)


def _strands(rng, cv: Canvas, pts: np.ndarray, hairline: np.ndarray, hair: np.ndarray, soft: float, fw: float) -> None:
    """Hair over the face: a fringe over the forehead (sometimes down to the brows) and loose strands."""
    if rng.random() < 0.5:  # fringe: from the hairline arc down toward the brows, with a wavy lower edge
        brow_y = pts[17:27, 1].min()
        depth = rng.uniform(0.3, 1.05)
        lower = hairline[::-1].copy()
        lower[:, 1] = lower[:, 1] + (brow_y - lower[:, 1]) * depth * portable.sin(np.linspace(0.2, np.pi - 0.2, len(lower)))
        lower[:, 1] += rng.normal(0, 0.02 * fw, len(lower))
        cv.blend(cv.poly_mask(np.vstack([hairline, lower]), soft * 1.5), hair * rng.uniform(0.8, 1.2), rng.uniform(0.85, 1))
    for _ in range(int(rng.integers(2, 10))):  # loose strands from the hairline over forehead, temple and cheek
        start = hairline[int(rng.integers(len(hairline)))]
        drop = np.array([rng.normal(0, 0.12), rng.uniform(0.15, 0.6)]) * fw
        ctrl = np.vstack([start, start + drop * 0.5 + rng.normal(0, 0.05 * fw, 2), start + drop])
        cv.blend(cv.stroke_mask(_catmull(ctrl, closed=False, k=5), rng.uniform(0.008, 0.03) * fw + 0.6, soft),
                 hair * rng.uniform(0.7, 1.4), rng.uniform(0.6, 1.0))


def _glasses(rng, cv: Canvas, pts: np.ndarray, soft: float) -> None:
    """Eyeglasses: two rims around the eyes, a bridge over point 27 and the temples toward the ears."""
    iod = portable.norm(pts[45] - pts[36]) + 1e-6
    frame = np.full(3, rng.uniform(0.02, 0.35)) if rng.random() < 0.7 else rng.uniform(0.1, 0.7, 3)
    width = rng.uniform(0.015, 0.05) * iod + 0.6
    power = rng.uniform(2.0, 4.0)  # superellipse: round .. rectangular rims
    t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    unit_rim = np.column_stack([np.sign(portable.cos(t)) * portable.power(np.abs(portable.cos(t)), 2 / power),
                                np.sign(portable.sin(t)) * portable.power(np.abs(portable.sin(t)), 2 / power)])
    hw, hh, lift = rng.uniform(0.27, 0.36) * iod, rng.uniform(0.16, 0.24) * iod, rng.uniform(-0.02, 0.06) * iod
    rims = []
    for eye in (np.arange(36, 42), np.arange(42, 48)):
        e = pts[eye]
        axis = (e[3] - e[0]) / (portable.norm(e[3] - e[0]) + 1e-6)
        normal = np.array([-axis[1], axis[0]])
        scale = portable.norm(e[3] - e[0]) / (0.25 * iod + 1e-6)  # foreshortened on a turned face
        c = e.mean(axis=0) - normal * lift
        rim = c + np.outer(unit_rim[:, 0] * hw * min(scale, 1.3), axis) + np.outer(unit_rim[:, 1] * hh, normal)
        rims.append(rim)
        if rng.random() < 0.5:  # tinted / reflecting lens
            cv.multiply(cv.poly_mask(rim, soft), rng.uniform(0.7, 1.15))
        cv.blend(cv.stroke_mask(np.vstack([rim, rim[:1]]), width, soft * 0.8), frame)
    a, b = rims[0], rims[1]
    inner_a, inner_b = a[np.argmin(portable.norm(a - pts[27], axis=1))], b[np.argmin(portable.norm(b - pts[27], axis=1))]
    bridge = np.vstack([inner_a, (inner_a + inner_b) / 2 - np.array([0, 0.04 * iod]), inner_b])
    cv.blend(cv.stroke_mask(_catmull(bridge, closed=False, k=4), width, soft * 0.8), frame)
    for rim, ear_pt in ((a, pts[0]), (b, pts[16])):
        outer = rim[np.argmax(portable.norm(rim - pts[27], axis=1))]
        cv.blend(cv.stroke_mask(np.vstack([outer, ear_pt - np.array([0, 0.05 * iod])]), width, soft * 0.8), frame)


def _hand(rng, cv: Canvas, pts: np.ndarray, skin: np.ndarray, soft: float, fw: float) -> None:
    """A hand (palm and four fingers) resting on the chin, over the mouth or against a cheek."""
    where = rng.choice(3)
    if where == 0:  # under the chin, fingers up
        palm_c, up = pts[8] + np.array([rng.normal(0, 0.1), 0.25]) * fw, np.array([0.0, -1.0])
    elif where == 1:  # over the mouth
        palm_c, up = pts[57] + np.array([rng.normal(0, 0.15), 0.3]) * fw, np.array([rng.normal(0, 0.3), -1.0])
    else:  # against a cheek from the side
        side = rng.choice([-1.0, 1.0])
        jaw = pts[4] if side < 0 else pts[12]
        palm_c, up = jaw + np.array([side * 0.15, 0.2]) * fw, np.array([-side * 0.5, -1.0])
    up = up / portable.norm(up)
    across = np.array([-up[1], up[0]])
    tone = np.clip(skin * rng.uniform(0.85, 1.08, 3), 0, 1)
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    pr = rng.uniform(0.18, 0.26) * fw
    palm = palm_c + np.outer(portable.cos(t) * pr, across) + np.outer(portable.sin(t) * pr * 1.1, up)
    cv.blend(cv.poly_mask(palm, soft * 1.5), tone)
    fwid = pr * rng.uniform(0.32, 0.42)
    for j, off in enumerate((-1.5, -0.5, 0.5, 1.5)):
        base = palm_c + across * off * fwid * 1.05 + up * pr * 0.7
        tip = base + up * pr * rng.uniform(0.9, 1.5) * (0.85 if j in (0, 3) else 1.0) + across * off * fwid * 0.3
        finger = np.vstack([base, tip])
        cv.blend(cv.stroke_mask(finger, fwid, soft), tone)
        cv.multiply(cv.stroke_mask(finger + across * fwid * 0.5, max(1.0, 0.12 * fwid), soft * 1.5), 0.8)


def _paint_features(rng, cv: Canvas, pts, unit, skin, hair, light, soft, yaw: float, strength: float = 1.0) -> None:
    """Eyes, brows, nose, mouth and shading details, each from its landmarks, at a per-face ``strength`` in (0, 1]
    (faint brows, lashes and lips are common in photos; the cartoon-strong features are not)."""
    iod = portable.norm(pts[36] - pts[45]) + 1e-6
    dark = skin * 0.35
    # eye sockets and upper-lid creases
    for eye, brow in ((np.arange(36, 42), np.arange(17, 22)), (np.arange(42, 48), np.arange(22, 27))):
        e = pts[eye]
        socket = np.vstack([e[[0, 1, 2, 3]], pts[brow][[4, 3, 1, 0]] * 0.45 + e[[3, 2, 1, 0]] * 0.55])
        cv.multiply(cv.poly_mask(_catmull(socket, True, 4), soft + iod * 0.05), 0.72, 1.0)
    # brows
    bw = rng.uniform(0.05, 0.1) * iod
    for brow in (np.arange(17, 22), np.arange(22, 27)):
        c = _catmull(pts[brow], closed=False, k=4)
        taper = np.linspace(0.55, 1.0, len(c))  # thicker at the inner end (21 / 22)
        taper = taper if brow[0] == 17 else taper[::-1]
        cv.blend(cv.stroke_mask(c, bw * taper + 1, soft * 1.2), hair * 0.7, rng.uniform(0.75, 0.95) * strength)
    # eyes
    iris_col = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]
    gaze = rng.uniform(-0.12, 0.12, 2)
    for eye in (np.arange(36, 42), np.arange(42, 48)):
        e = pts[eye]
        outline = _catmull(e, closed=True, k=6)
        ew = portable.norm(e[3] - e[0]) + 1e-6
        em = cv.poly_mask(outline, soft * 0.7)
        if em is None:
            continue
        sclera = np.array([0.86, 0.83, 0.8]) * strength + skin * 0.75 * (1 - strength)
        cv.blend(em, sclera * (0.7 + 0.3 * light[2]))
        centre = e.mean(axis=0) + gaze * ew * np.array([1, 0.3])
        r = 0.24 * ew
        circ = centre + r * np.column_stack([portable.cos(np.linspace(0, 2 * np.pi, 20)), portable.sin(np.linspace(0, 2 * np.pi, 20))])
        im = cv.poly_mask(circ, soft * 0.6)
        if im is not None:
            m, (ix, iy) = im
            m2, (ex, ey) = em
            clip = np.zeros_like(m)
            ys, xs = slice(max(iy, ey), min(iy + m.shape[0], ey + m2.shape[0])), slice(max(ix, ex), min(ix + m.shape[1], ex + m2.shape[1]))
            clip[ys.start - iy:ys.stop - iy, xs.start - ix:xs.stop - ix] = m2[ys.start - ey:ys.stop - ey, xs.start - ex:xs.stop - ex]
            cv.blend((m * clip, (ix, iy)), iris_col)
            pm = cv.poly_mask(centre + 0.45 * (circ - centre), soft * 0.6)
            if pm is not None:
                cv.blend(pm, np.array([0.03, 0.03, 0.03]), 0.9)
        upper = _catmull(e[[0, 1, 2, 3]], closed=False, k=5)
        lw = np.maximum(1.0, 0.09 * ew * portable.sin(np.linspace(0.3, np.pi - 0.3, len(upper))) * 1.6)
        cv.blend(cv.stroke_mask(upper, lw, soft * 0.6), np.array([0.05, 0.04, 0.04]), 0.92 * (0.4 + 0.6 * strength))
        lower = _catmull(e[[3, 4, 5, 0]], closed=False, k=5)
        cv.blend(cv.stroke_mask(lower, max(1.0, 0.04 * ew), soft * 0.6), dark, 0.5)
        crease = upper + np.array([0, -0.22 * ew])
        cv.blend(cv.stroke_mask(crease[2:-2], max(1.0, 0.04 * ew), soft), dark, 0.35)
    # nose: ridge highlight / side shadow, base shadow, nostrils
    ridge = _catmull(pts[27:31], closed=False, k=4)
    side = np.sign(light[0]) if abs(light[0]) > 0.05 else 1.0
    nw = portable.norm(pts[31] - pts[35]) + 1e-6
    cv.multiply(cv.stroke_mask(ridge + np.array([-side * 0.28 * nw, 0]), 0.25 * nw, soft + nw * 0.1), 0.75)
    cv.multiply(cv.stroke_mask(ridge + np.array([side * 0.05 * nw, 0]), 0.12 * nw, soft + nw * 0.05), 1.15)
    wing_l = _catmull(np.vstack([pts[29] * 0.5 + pts[31] * 0.5 + np.array([-0.2 * nw, 0]), pts[31], pts[32]]), False, 4)
    wing_r = _catmull(np.vstack([pts[29] * 0.5 + pts[35] * 0.5 + np.array([0.2 * nw, 0]), pts[35], pts[34]]), False, 4)
    for wing in (wing_l, wing_r):
        cv.multiply(cv.stroke_mask(wing, 0.1 * nw, soft + 0.04 * nw), 0.6)
    turn = abs(portable.sin(np.radians(yaw)))
    if turn > 0.1:  # turned face: the nose's profile edge against the far cheek
        far = 35 if yaw > 0 else 31
        prof = _catmull(np.vstack([pts[28], pts[29], pts[30], pts[far]]), closed=False, k=4)
        cv.multiply(cv.stroke_mask(prof + np.array([np.sign(yaw) * 0.06 * nw, 0]), 0.1 * nw, soft + 0.04 * nw),
                    1 - min(0.5, 0.9 * turn))
    base = _catmull(pts[31:36], closed=False, k=4)
    cv.multiply(cv.stroke_mask(base + np.array([0, 0.08 * nw]), 0.15 * nw, soft + 0.08 * nw), 0.7)
    for a, b in ((31, 32), (35, 34)):
        c = pts[a] * 0.45 + pts[b] * 0.55 - np.array([0, 0.06 * nw])
        ax = 0.13 * nw
        ell = c + np.column_stack([ax * portable.cos(np.linspace(0, 2 * np.pi, 12)), 0.55 * ax * portable.sin(np.linspace(0, 2 * np.pi, 12))])
        cv.multiply(cv.poly_mask(ell, soft), 1 - 0.7 * (0.3 + 0.7 * strength))
    # mouth: lips, opening, corners
    lip = np.clip(skin * np.array([0.85, 0.55, 0.55]) + np.array([0.08, 0.0, 0.02]), 0, 1)
    outer = _catmull(pts[48:60], closed=True, k=5)
    cv.blend(cv.poly_mask(outer, soft * 0.8), lip, rng.uniform(0.6, 0.95) * strength)
    mw = portable.norm(pts[48] - pts[54]) + 1e-6
    inner = pts[60:68]
    gap = portable.norm(pts[62] - pts[66])
    if gap > 0.04 * mw:
        mm = cv.poly_mask(_catmull(inner, closed=True, k=5), soft * 0.7)
        cv.blend(mm, np.array([0.12, 0.04, 0.04]) * rng.uniform(0.6, 2.2))
        if gap > 0.1 * mw and rng.random() < 0.85:  # upper teeth (a smile shows them), sometimes the lower ones
            depth = rng.uniform(0.3, 0.6)
            teeth = np.vstack([inner[[0, 1, 2, 3, 4]], (inner[[4, 3, 2, 1, 0]] * (1 - depth) + inner[[4, 5, 6, 7, 0]] * depth)])
            tm = cv.poly_mask(teeth, soft * 0.7)
            shade = np.array([0.85, 0.82, 0.75]) * rng.uniform(0.75, 1.05)
            if tm is not None and mm is not None:
                cv.blend(tm, shade, rng.uniform(0.7, 0.95))
            if rng.random() < 0.4:
                low = np.vstack([inner[[4, 5, 6, 7, 0]], (inner[[0, 7, 6, 5, 4]] * 0.75 + inner[[0, 1, 2, 3, 4]] * 0.25)])
                cv.blend(cv.poly_mask(low, soft * 0.7), shade * 0.9, rng.uniform(0.5, 0.85))
    line = _catmull(np.vstack([pts[48], pts[60:65], pts[54]]), closed=False, k=4)
    cv.blend(cv.stroke_mask(line, max(1.0, 0.025 * mw), soft * 0.7), skin * 0.25, 0.85)
    under = _catmull(pts[[55, 56, 57, 58, 59]], closed=False, k=4) + np.array([0, 0.08 * mw])
    cv.multiply(cv.stroke_mask(under, 0.08 * mw, soft + 0.05 * mw), 0.8)


def occlude(rng: np.random.Generator, cv: Canvas, box) -> None:
    """Paint one partial occluder (textured ellipse or rectangle) over part of the face box."""
    left, top, side, _ = box
    size = side * rng.uniform(0.12, 0.3)
    c = np.array([left + side * rng.uniform(0, 1), top + side * rng.choice([rng.uniform(0, 0.25), rng.uniform(0.75, 1.0)])])
    if rng.random() < 0.5:
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        poly = c + np.column_stack([size * portable.cos(t), size * rng.uniform(0.4, 1) * portable.sin(t)])
    else:
        a = rng.uniform(0, np.pi)
        rot = np.array([[portable.cos(a), -portable.sin(a)], [portable.sin(a), portable.cos(a)]])
        poly = c + portable.matmul((np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]]) * size), rot.T)
    mm = cv.poly_mask(poly, 0.8)
    if mm is None:
        return
    tex = background(rng, *mm[0].shape)
    cv.blend(mm, tex * rng.uniform(0.5, 1.2, 3).astype(np.float32))
