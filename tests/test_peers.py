"""dlib yardstick: wrapper on a real photo, realism metric on a few synthetic faces, graceful absence."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from facemarks.evaluation import peers
from facemarks.core.params import Synthetic
from facemarks.core.landmarks import face_box
from facemarks.data.synthetic import generate_split
from facemarks.serving.detect import dlib_boxes


def test_unavailable_without_dlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    assert peers.available() is False
    assert "dlib" in peers.unavailable_reason()
    assert peers.notice() == peers.unavailable_reason() and peers.notice(False) == "evaluate.peers is false"
    with pytest.raises(RuntimeError, match="unavailable"):
        peers.Dlib68()


@pytest.fixture(scope="module")
def dlib68():
    pytest.importorskip("dlib")
    if not peers.available():
        pytest.skip(peers.unavailable_reason())
    return peers.Dlib68()


def test_dlib_on_astronaut(dlib68):
    from skimage import data

    img = data.astronaut()
    dets = [box for box, _, _ in dlib_boxes(img, 1)]
    assert dets, "dlib found no face on the astronaut photo"
    left, top, w, h = max(dets, key=lambda d: d[2] * d[3])
    assert 150 < left + w / 2 < 300 and 50 < top + h / 2 < 200  # her face, upper middle of the 512² photo
    pts = dlib68.predict(img, (left, top, w, h))
    assert pts.shape == (68, 2) and pts.dtype == np.float64
    m = 0.15 * w
    assert (pts[:, 0] > left - m).all() and (pts[:, 0] < left + w + m).all()
    assert (pts[:, 1] > top - m).all() and (pts[:, 1] < top + h + m).all()
    assert pts[36, 0] < pts[45, 0] and pts[27, 1] < pts[33, 1] < pts[57, 1]  # eyes, nose, mouth in order
    gray = dlib68.predict(img.mean(axis=2).astype(np.uint8), (left, top, w, h))
    assert np.abs(gray - pts).mean() < 3.0
    # the realism hit rule is the project's same-face rule on mapped boxes: her face, not a box beside it
    assert peers.detected(img, face_box(pts))
    assert not peers.detected(img, (400.0, 400.0, 80.0, 80.0))
    assert peers.dlib68() is peers.dlib68()  # the shape model is read once per process


def test_realism_on_a_few_synthetic_faces(dlib68, tmp_path):
    recs = generate_split(tmp_path, "test", 8, seed=0, cfg=Synthetic(min_size=160, max_size=240, workers=1))
    r = peers.realism(recs, tmp_path)
    assert r["n_faces"] == 8
    assert 0 < r["dlib_nme_mean"] < 30 and 0 < r["dlib_nme_median"] < 30
    assert 0 < r["mean_shape_nme_mean"] < 60
    assert 0.0 <= r["detector_hit_rate"] <= 1.0
    assert r["dlib_ms_per_face"] > 0
    assert peers.realism(recs, tmp_path, max_faces=2)["n_faces"] == 2
