"""Synthetic face generator: determinism, geometry, pose, drawn features, XML round trip, contact sheet."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from facemarks.core.io import read_dlib_xml, read_image, write_dlib_xml
from facemarks.core.params import Synthetic
from facemarks.data.face_geometry import pose_geometry
from facemarks.data.synthetic import contact_sheet, feature_energy, generate_split, render_face

CFG = Synthetic(min_size=120, max_size=200, workers=1)


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path):
    a = generate_split(tmp_path / "a", "train", 4, seed=3, cfg=CFG)
    b = generate_split(tmp_path / "b", "train", 4, seed=3, cfg=dataclasses.replace(CFG, workers=2))
    c = generate_split(tmp_path / "c", "train", 4, seed=4, cfg=CFG)
    assert [r.file for r in a] == [f"images/train/{i:05d}.png" for i in range(4)]
    for ra, rb, rc in zip(a, b, c):
        assert (tmp_path / "a" / ra.file).read_bytes() == (tmp_path / "b" / rb.file).read_bytes()
        assert (tmp_path / "a" / ra.file).read_bytes() != (tmp_path / "c" / rc.file).read_bytes()
        np.testing.assert_array_equal(ra.faces[0].points, rb.faces[0].points)
        assert ra.faces[0].box == rb.faces[0].box


def test_shapes_points_inside_image_and_box():
    for i in range(12):
        img, face = render_face(np.random.default_rng(i), CFG)
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert CFG.min_size <= h <= CFG.max_size and CFG.min_size <= w <= CFG.max_size
        assert face.points.shape == (68, 2) and face.points.dtype == np.float64
        x, y = face.points.T
        assert (x >= -0.5).all() and (x <= w - 0.5).all() and (y >= -0.5).all() and (y <= h - 0.5).all()
        assert face.in_box().mean() >= 0.8
        left, top, bw, bh = face.box
        assert bw == bh > 0


def test_pose_ranges_and_yaw_moves_nose_toward_its_side():
    cfg = dataclasses.replace(CFG, max_yaw=30.0, max_pitch=10.0, max_roll=5.0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        g = pose_geometry(rng, cfg)
        assert abs(g["yaw"]) <= 30 and abs(g["pitch"]) <= 10 and abs(g["roll"]) <= 5
        p = g["points"]
        # nose tip relative to the jaw's horizontal middle, in units of face width
        rel = (p[30, 0] - (p[0, 0] + p[16, 0]) / 2) / (p[16, 0] - p[0, 0])
        if abs(g["yaw"]) > 8:
            assert np.sign(rel) == np.sign(g["yaw"])
        # the far side compresses: the eye on the far side is narrower
        if g["yaw"] > 15:
            assert np.linalg.norm(p[45] - p[42]) < np.linalg.norm(p[39] - p[36])
    frontal = pose_geometry(np.random.default_rng(1), dataclasses.replace(cfg, max_yaw=0.0, max_pitch=0.0, max_roll=0.0))
    assert frontal["yaw"] == frontal["pitch"] == frontal["roll"] == 0.0


def test_landmarks_lie_on_drawn_features():
    cfg = dataclasses.replace(CFG, occluder_prob=0.0, blur_prob=0.0)
    ratios = []
    for i in range(6):
        img, face = render_face(np.random.default_rng(100 + i), cfg)
        ratios.append(feature_energy(img, face.points, face.box))
    assert np.median(ratios) > 1.8, ratios
    # a control: points shuffled to random places of a face image have no such excess
    img, face = render_face(np.random.default_rng(7), cfg)
    rnd = np.random.default_rng(0).uniform(face.box[:2], np.add(face.box[:2], face.box[2:]), size=(68, 2))
    assert feature_energy(img, rnd, face.box) < 1.4


def test_xml_round_trip_and_contact_sheet(tmp_path):
    recs = generate_split(tmp_path, "test", 3, seed=1, cfg=CFG)
    write_dlib_xml(tmp_path / "test.xml", recs)
    back = read_dlib_xml(tmp_path / "test.xml")
    assert [r.file for r in back] == [r.file for r in recs]
    for r, b in zip(recs, back):
        np.testing.assert_allclose(b.faces[0].points, r.faces[0].points, atol=1e-3)
        assert b.faces[0].box == r.faces[0].box
    sheet = tmp_path / "reports" / "sheet.png"
    contact_sheet(back, tmp_path, sheet, n=16)
    img = read_image(sheet)
    assert img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError):
        contact_sheet([], tmp_path, tmp_path / "none.png")
