"""The geometry of a synthetic face: a 3-D 68-point template, a random identity, expression and pose, the projection.

The template is a 300-W-like mean shape with per-point depth, made symmetric; :func:`pose_geometry` gives it a random
identity and expression, a frontal-heavy head pose (yaw, pitch, roll within ``data.synthetic``'s limits) and a
perspective camera (the far side compresses), moves the jaw points onto the turned head's silhouette (like 300-W
contour points) and returns the projected landmarks with the outlines :mod:`facemarks.data.face_paint` paints from
(hair, forehead, neck, ears), in template units. All randomness comes from the generator passed in, in a fixed order.

Shape legend: ``K = 68`` landmarks; ``points (K, 2)`` ``(x, y)``, x right, y down; 3-D points ``(K, 3)``, z toward
the camera.
"""
from __future__ import annotations

import numpy as np

from facemarks.core.params import Synthetic
from facemarks.data import portable

# ----------------------------------------------------------------------------------------------- template
# A 300-W-like frontal mean shape (x right, y down; jaw width ≈ 0.9 units), symmetrised below.
_MEAN_2D = np.array([
    (0.0792, 0.3392), (0.0829, 0.4570), (0.0968, 0.5756), (0.1221, 0.6919), (0.1687, 0.8003),
    (0.2398, 0.8957), (0.3257, 0.9771), (0.4223, 1.0433), (0.5318, 1.0608), (0.6413, 1.0398),
    (0.7381, 0.9723), (0.8244, 0.8896), (0.8948, 0.7925), (0.9394, 0.6815), (0.9611, 0.5622),
    (0.9706, 0.4418), (0.9712, 0.3221), (0.1638, 0.2492), (0.2178, 0.2043), (0.2913, 0.1924),
    (0.3675, 0.2036), (0.4393, 0.2331), (0.5864, 0.2281), (0.6602, 0.1959), (0.7375, 0.1824),
    (0.8132, 0.1928), (0.8708, 0.2353), (0.5153, 0.3186), (0.5162, 0.3962), (0.5171, 0.4738),
    (0.5182, 0.5532), (0.4337, 0.6041), (0.4755, 0.6208), (0.5207, 0.6343), (0.5659, 0.6188),
    (0.6071, 0.6016), (0.2524, 0.3311), (0.2987, 0.3026), (0.3557, 0.3030), (0.4037, 0.3387),
    (0.3525, 0.3500), (0.2968, 0.3505), (0.6313, 0.3341), (0.6791, 0.2965), (0.7360, 0.2947),
    (0.7829, 0.3213), (0.7403, 0.3418), (0.6850, 0.3437), (0.3532, 0.7462), (0.4146, 0.7191),
    (0.4777, 0.7068), (0.5227, 0.7171), (0.5698, 0.7054), (0.6352, 0.7157), (0.6995, 0.7394),
    (0.6394, 0.8052), (0.5764, 0.8354), (0.5254, 0.8417), (0.4764, 0.8375), (0.4138, 0.8100),
    (0.3801, 0.7500), (0.4780, 0.7451), (0.5234, 0.7489), (0.5711, 0.7433), (0.6724, 0.7442),
    (0.5725, 0.7766), (0.5240, 0.7834), (0.4776, 0.7820),
])

# Depth toward the camera (same units): jaw from the temples (-0.34) to the chin, nose tip +0.22.
_DEPTH = np.concatenate([
    -0.34 + 0.28 * portable.sin(np.pi * np.arange(17) / 16),                      # jaw 0-16
    [-0.12, -0.05, -0.01, 0.0, 0.0, 0.0, 0.0, -0.01, -0.05, -0.12],          # brows 17-26
    [0.0, 0.07, 0.14, 0.22, 0.04, 0.08, 0.11, 0.08, 0.04],                   # nose 27-35
    [-0.1, -0.05, -0.04, -0.05, -0.05, -0.07],                               # right eye 36-41
    [-0.05, -0.04, -0.05, -0.1, -0.07, -0.05],                               # left eye 42-47
    [-0.04, 0.02, 0.06, 0.07, 0.06, 0.02, -0.04, 0.01, 0.04, 0.05, 0.04, 0.01],  # outer lip 48-59
    [-0.02, 0.04, 0.05, 0.04, -0.02, 0.03, 0.04, 0.03],                      # inner lip 60-67
])
_MIRROR_PAIRS = np.array(
    [(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)
_CENTRE_LINE = np.array([8, 27, 28, 29, 30, 33, 51, 57, 62, 66])


def _template() -> np.ndarray:
    """Symmetric 3-D mean shape ``(68, 3)``, x centred on the face midline, y down, z toward the camera."""
    p = _MEAN_2D.copy()
    cx = p[_CENTRE_LINE, 0].mean()
    p[:, 0] -= cx
    q = p.copy()
    for a, b in _MIRROR_PAIRS:
        q[a] = ((p[a, 0] - p[b, 0]) / 2, (p[a, 1] + p[b, 1]) / 2)
        q[b] = (-q[a, 0], q[a, 1])
    q[_CENTRE_LINE, 0] = 0.0
    q[:, 1] -= 0.55
    return np.column_stack([q, _DEPTH])


TEMPLATE = _template()

# ----------------------------------------------------------------------------------------------- geometry
def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``(3, 3)`` rotation (degrees): yaw > 0 turns the nose toward image right, pitch > 0 down, roll > 0 clockwise."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[portable.cos(y), 0, portable.sin(y)], [0, 1, 0], [-portable.sin(y), 0, portable.cos(y)]])
    rx = np.array([[1, 0, 0], [0, portable.cos(p), portable.sin(p)], [0, -portable.sin(p), portable.cos(p)]])
    rz = np.array([[portable.cos(r), -portable.sin(r), 0], [portable.sin(r), portable.cos(r), 0], [0, 0, 1]])
    return portable.matmul(portable.matmul(rz, rx), ry)


def _identity_expression(rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Random identity and expression applied to the template → ``(68, 3)`` and expression facts."""
    p = TEMPLATE.copy()
    eyes, brows, nose, mouth, jaw = (np.arange(36, 48), np.arange(17, 27), np.arange(27, 36),
                                     np.arange(48, 68), np.arange(0, 17))
    p[:, 0] *= rng.uniform(0.9, 1.1)                      # face width
    p[:, 1] *= rng.uniform(0.92, 1.1)                     # face length
    p[eyes, 0] *= rng.uniform(0.92, 1.08)                 # eye spacing
    for side in (np.arange(36, 42), np.arange(42, 48)):   # eye size / opening
        c = p[side].mean(axis=0)
        p[side, 1] = c[1] + (p[side, 1] - c[1]) * rng.uniform(0.7, 1.35)
    p[brows, 1] += rng.uniform(-0.03, 0.02)
    p[nose[1:], 1] += rng.uniform(-0.03, 0.04) * np.linspace(0.3, 1, 8)  # nose length
    p[nose[4:], 0] *= rng.uniform(0.85, 1.2)              # nose width
    p[nose, 2] *= rng.uniform(0.8, 1.2)
    p[mouth, 0] *= rng.uniform(0.85, 1.15)
    p[mouth, 1] += rng.uniform(-0.03, 0.03)
    p[jaw[3:14], 0] *= rng.uniform(0.92, 1.06)            # jaw shape
    p += rng.normal(0, 0.006, p.shape) * np.array([1, 1, 0.5])
    # expression
    brow_raise = rng.uniform(-0.02, 0.05) if rng.random() < 0.5 else 0.0
    p[brows, 1] -= brow_raise
    smile = rng.uniform(0, 0.08) if rng.random() < 0.5 else 0.0  # up to a broad, open smile
    for i, s in ((48, -1), (54, 1), (60, -1), (64, 1)):
        p[i, 1] -= smile
        p[i, 0] += s * smile * 1.1
    p[[49, 53], 0] += np.array([-1, 1]) * smile * 0.5
    p[[55, 56, 57, 58, 59], 1] += smile * np.array([0.3, 0.7, 0.8, 0.7, 0.3])  # the lower lip bows down
    opening = rng.uniform(0.01, 0.14) if rng.random() < (0.35 + 4 * smile) else 0.0
    lower = np.array([55, 56, 57, 58, 59, 65, 66, 67])
    p[lower, 1] += opening * np.array([0.6, 0.9, 1, 0.9, 0.6, 0.9, 1, 0.9])
    p[jaw[4:13], 1] += opening * 0.6 * portable.sin(np.pi * np.arange(1, 10) / 10)
    if opening == 0.0:  # closed: inner lips meet
        for a, b in ((61, 67), (62, 66), (63, 65)):
            m = (p[a, 1] + p[b, 1]) / 2
            p[a, 1] = p[b, 1] = m
    return p, {"opening": opening, "smile": smile}


def _jaw_silhouette(p: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Move jaw points 0–16 onto the rotated head's silhouette (like 300-W contour points) → ``(17, 3)`` rotated."""
    jaw = p[:17]
    out2d = jaw[:, :2] - np.array([0.0, 0.05])
    n = out2d / portable.norm(out2d, axis=1)[:, None]
    radius = 0.22
    phi = np.radians(np.linspace(-70, 70, 15))
    n3 = np.column_stack([n, np.zeros(17)])
    centre = jaw - radius * n3
    cand = centre[:, None, :] + radius * (portable.cos(phi)[None, :, None] * n3[:, None, :]
                                          + portable.sin(phi)[None, :, None] * np.array([0, 0, 1.0]))
    rc = portable.matmul(cand, rot.T)                                     # (17, 15, 3)
    n_img = portable.matmul(n3, rot.T)
    n_img[:, 2] = 0
    score = portable.weighted_sum(rc, n_img[:, None, :])  # (17, 15): rc[k, c] . n_img[k]
    best = score.argmax(axis=1)
    return rc[np.arange(17), best]


def _project(pts: np.ndarray, dist: float) -> np.ndarray:
    """Perspective projection of rotated points ``(N, 3)`` at camera distance ``dist`` → ``(N, 2)`` (scale 1 at z=0)."""
    return pts[:, :2] * (dist / (dist - pts[:, 2:3]))


def _ellipsoid_points(centre, radii, y_max: float | None = None, n: int = 24) -> np.ndarray:
    """Surface samples ``(M, 3)`` of an axis-aligned ellipsoid, optionally only where y ≤ ``y_max``."""
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, n, endpoint=False), np.linspace(0.02, np.pi - 0.02, n // 2))
    pts = np.stack([portable.sin(v) * portable.cos(u), -portable.cos(v), portable.sin(v) * portable.sin(u)], -1).reshape(-1, 3)
    pts = pts * np.asarray(radii) + np.asarray(centre)
    if y_max is not None:
        pts = pts[pts[:, 1] <= y_max]
    return pts


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull polygon ``(M, 2)`` of 2-D points."""
    from scipy.spatial import ConvexHull

    return points[ConvexHull(points).vertices]


# ----------------------------------------------------------------------------------------------- pose
def _pose_angle(rng: np.random.Generator, limit: float, spread: float) -> float:
    """A pose angle in degrees: normal with σ = limit / spread, truncated to ±limit (frontal-heavy, like real photos)."""
    if limit <= 0:
        return 0.0
    while True:
        a = rng.normal(0.0, limit / spread)
        if abs(a) <= limit:
            return float(a)


def pose_geometry(rng: np.random.Generator, cfg: Synthetic):
    """Sample shape, pose and camera → projected landmarks and helper outlines in template units."""
    p, expr = _identity_expression(rng)
    yaw = _pose_angle(rng, cfg.max_yaw, 2.5)     # defaults: σ 16°, 8°, 7.5° (300-W-like spread)
    pitch = _pose_angle(rng, cfg.max_pitch, 2.5)
    roll = _pose_angle(rng, cfg.max_roll, 4.0)
    rot = _rotation(yaw, pitch, roll)
    dist = rng.uniform(3.0, 10.0)
    rp = portable.matmul(p, rot.T)
    rp[:17] = _jaw_silhouette(p, rot)
    pts = _project(rp, dist)
    # head (hair) outline: upper part of a head ellipsoid; face skin: jaw + hairline arc; neck cylinder
    hair_len = rng.choice([-0.15, 0.1, 0.6], p=[0.5, 0.3, 0.2])
    head = _ellipsoid_points((0, -0.3, -0.42), (0.56 * rng.uniform(1.0, 1.12), 0.7, 0.62), y_max=hair_len)
    hair_poly = _hull(_project(portable.matmul(head, rot.T), dist))
    # forehead: half ellipse from jaw point 16 over the hairline to jaw point 0 (consistent with the jaw)
    hairline = _project(portable.matmul(np.array([[0.0, rng.uniform(-0.9, -0.72), -0.08]]), rot.T), dist)[0]
    c = (pts[0] + pts[16]) / 2
    t = np.linspace(0, np.pi, 13)[1:-1, None]
    forehead = c + portable.cos(t) * (pts[16] - c) + portable.sin(t) * (hairline - c)
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    neck3 = [np.column_stack([0.28 * portable.cos(ang), np.full(16, y), -0.35 + 0.25 * portable.sin(ang)]) for y in (0.3, 1.6)]
    neck_poly = _hull(_project(portable.matmul(np.vstack(neck3), rot.T), dist))
    head_centre = _project(portable.matmul(np.array([[0, 0.05, -0.35]]), rot.T), dist)[0]
    ears = []
    t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    for side in (-1.0, 1.0):  # an ear beside jaw points 0-3 / 13-16, in a plane facing sideways
        if -portable.sin(np.radians(yaw)) * side < -0.35:  # the far ear of a strongly turned head is hidden
            continue
        jaw_top = p[0] if side < 0 else p[16]
        c = np.array([jaw_top[0] + side * 0.02, jaw_top[1] + 0.07, jaw_top[2] - 0.08])
        e3 = c + np.column_stack([side * 0.03 * (1 + portable.cos(t)), 0.14 * portable.sin(t), 0.07 * portable.cos(t)])
        ears.append(_project(portable.matmul(e3, rot.T), dist))
    return {"points": pts, "hair": hair_poly, "forehead": forehead, "neck": neck_poly, "ears": ears,
            "centre": head_centre, "yaw": yaw, "pitch": pitch, "roll": roll, "expr": expr, "short_hair": hair_len < 0}
