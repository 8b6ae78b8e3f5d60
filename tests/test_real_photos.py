"""The bundled real portraits and dlib's reference points (the real-photo signal of the realism study)."""
from __future__ import annotations

import numpy as np
import pytest

from facemarks import peers, real_photos
from facemarks.landmarks import inter_ocular


def test_bundled_portraits_load_as_rgb():
    for name in real_photos.PORTRAITS:
        img = real_photos.load_portrait(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
    with pytest.raises(ValueError, match="unknown portrait"):
        real_photos.load_portrait("nobody")


@pytest.mark.skipif(not peers.available(), reason="the peers extra (dlib) is not installed")
def test_dlib_references_and_scoring():
    refs = real_photos.dlib_references()
    assert [r.name for r in refs] == list(real_photos.PORTRAITS)
    for r in refs:
        left, top, w, h = r.box
        assert r.points.shape == (68, 2) and w > 50 and h > 50
        inside = (r.points[:, 0] >= left - 0.2 * w) & (r.points[:, 0] <= left + 1.2 * w)
        assert inside.all()
    exact = real_photos.score(lambda image, box: next(r.points for r in refs if r.box == box), refs)
    assert exact == {**{r.name: 0.0 for r in refs}, "mean": 0.0}
    # every point 10 % of the inter-ocular distance off → NME 10 %
    shifted = real_photos.score(
        lambda image, box: next(r.points + [0.1 * inter_ocular(r.points[None])[0], 0.0] for r in refs if r.box == box),
        refs)
    for r in refs:
        assert shifted[r.name] == pytest.approx(10.0, rel=1e-6)
