"""A real-photo signal that needs no download: the portraits bundled with installed packages, dlib's points as reference.

scikit-image's ``astronaut`` (Eileen Collins) and matplotlib's ``grace_hopper`` sample are real photographs that
every install of this project has. Neither is used for training (the synthetic generator's backgrounds are other
bundled pictures). dlib's 68-point predictor (the ``peers`` extra) gives the reference points inside dlib's own
detector box, and the model is scored with that same box, so the number is "NME (%) from dlib's points"; dlib
itself is about 3-4 % from human markup on such portraits, so values below that are not meaningful.

Shapes: images uint8 ``(H, W, 3)``; boxes ``(left, top, width, height)`` px; points ``(68, 2)`` px with pixel
centres at integer coordinates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from facemarks import metrics

#: name -> loader of a bundled portrait (uint8 RGB).
PORTRAITS = ("astronaut", "grace_hopper")


def load_portrait(name: str) -> np.ndarray:
    """The bundled portrait ``name`` as uint8 ``(H, W, 3)``."""
    if name == "astronaut":
        from skimage import data

        return np.asarray(data.astronaut())
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        return np.asarray(Image.open(path).convert("RGB"))
    raise ValueError(f"unknown portrait {name!r}; known: {', '.join(PORTRAITS)}")


@dataclass
class Reference:
    """One portrait with dlib's detector box (the largest face) and dlib's 68 points in it."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    box: tuple[float, float, float, float]
    points: np.ndarray  # (68, 2) float64


def dlib_references(names: tuple[str, ...] = PORTRAITS) -> list[Reference]:
    """dlib's box and points on each bundled portrait (needs the ``peers`` extra)."""
    from facemarks.peers import Dlib68

    dlib = Dlib68()
    out = []
    for name in names:
        image = load_portrait(name)
        boxes = dlib.detect(image, 1)
        if not boxes:
            continue
        box = max(boxes, key=lambda b: b[2] * b[3])
        out.append(Reference(name, image, tuple(float(v) for v in box), dlib.predict(image, box)))
    return out


def score(predict: Callable[[np.ndarray, tuple], np.ndarray], refs: list[Reference]) -> dict[str, float]:
    """NME (%, inter-ocular of dlib's points) of ``predict(image, box) -> (68, 2)`` on each reference, and the mean."""
    out = {}
    for ref in refs:
        pred = np.asarray(predict(ref.image, ref.box), np.float64)[None]
        gt = ref.points[None]
        out[ref.name] = float(100 * metrics.nme(pred, gt, metrics.normaliser(gt, "io"))[0])
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out
