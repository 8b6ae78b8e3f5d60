"""dlib yardstick: wrapper on a real photo, realism metric on a few synthetic faces, graceful absence."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from facemarks.evaluation import peers
from facemarks.core.params import Synthetic
from facemarks.data.synthetic import generate_split


def test_unavailable_without_dlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    assert peers.available() is False
    assert "dlib" in peers.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        peers.Dlib68()


def test_detection_hit_rule():
    assert peers.detection_hit((10, 10, 100, 100), [(15, 20, 90, 90)])
    assert peers.detection_hit((10, 10, 100, 100), [(40, 40, 100, 100)])  # IoU 0.32, centre inside
    assert not peers.detection_hit((10, 10, 100, 100), [(200, 200, 50, 50)])
    assert not peers.detection_hit((10, 10, 100, 100), [])


@pytest.fixture(scope="module")
def dlib68():
    pytest.importorskip("dlib")
    if not peers.available():
        pytest.skip(peers.unavailable_reason())
    return peers.Dlib68()


def test_dlib_on_astronaut(dlib68):
    from skimage import data

    img = data.astronaut()
    dets = dlib68.detect(img, 1)
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


def test_realism_on_a_few_synthetic_faces(dlib68, tmp_path):
    recs = generate_split(tmp_path, "test", 8, seed=0, cfg=Synthetic(min_size=160, max_size=240, workers=1))
    r = peers.realism(recs, tmp_path)
    assert r["n_faces"] == 8
    assert 0 < r["dlib_nme_mean"] < 30 and 0 < r["dlib_nme_median"] < 30
    assert 0 < r["mean_shape_nme_mean"] < 60
    assert 0.0 <= r["detector_hit_rate"] <= 1.0
    assert r["dlib_ms_per_face"] > 0
    assert peers.realism(recs, tmp_path, max_faces=2)["n_faces"] == 2
