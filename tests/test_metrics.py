"""facemarks.evaluation.metrics and the evaluation helpers of facemarks.evaluation.testset: hand-computed NME / AUC / FR / CED cases,
the crop → original mapping, the mean-shape baseline, decoding a split end to end."""
from __future__ import annotations

import numpy as np
import pytest

from facemarks.augmentation.crops import apply_transform, crop_transform, face_crop, invert_points
from facemarks.core.landmarks import REGIONS
from facemarks.evaluation.metrics import (auc_fr, ced, ced_csv, crop_to_original, face_metrics, mean_shape,
                               mean_shape_predictions, nme, normaliser, region_nme)


def face(d_io: float = 40.0, seed: int = 0) -> np.ndarray:
    """A (68, 2) face with outer eye corners 36 at (100, 100) and 45 at (100 + d_io, 100); other points random."""
    pts = np.random.default_rng(seed).uniform(80, 160, size=(68, 2))
    pts[36] = (100.0, 100.0)
    pts[45] = (100.0 + d_io, 100.0)
    return pts


def test_identical_points_give_zero_for_every_normaliser():
    gt = np.stack([face(seed=s) for s in range(3)])
    boxes = np.tile([70.0, 70.0, 100.0, 100.0], (3, 1))
    for kind in ("io", "ip", "box"):
        assert np.all(nme(gt, gt, normaliser(gt, kind, boxes)) == 0.0)
    row = face_metrics(gt, gt, boxes)
    assert row["nme_io"] == row["nme_ip"] == row["nme_box"] == 0.0
    assert row["auc"] == 1.0 and row["fr"] == 0.0


@pytest.mark.parametrize("d, D", [(2.0, 40.0), (3.0, 60.0), (0.5, 25.0)])
def test_known_shift_gives_shift_over_inter_ocular(d, D):
    gt = face(D)[None]
    angle = 0.7  # any direction: every point moves by d
    pred = gt + d * np.array([np.cos(angle), np.sin(angle)])
    assert nme(pred, gt, normaliser(gt, "io"))[0] == pytest.approx(d / D)
    assert face_metrics(pred, gt, np.array([[0, 0, 30.0, 40.0]]))["nme_box"] == pytest.approx(100 * d / 50.0)


def test_normalisers_by_hand():
    gt = np.zeros((1, 68, 2))
    gt[0, 36:42] = (10.0, 20.0)  # right eye collapsed to its pupil
    gt[0, 42:48] = (40.0, 60.0)
    gt[0, 36] = (10.0, 20.0)
    gt[0, 45] = (40.0, 60.0)
    assert normaliser(gt, "io")[0] == pytest.approx(50.0)
    assert normaliser(gt, "ip")[0] == pytest.approx(50.0)
    assert normaliser(gt, "box", np.array([[0, 0, 6.0, 8.0]]))[0] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="box"):
        normaliser(gt, "box")
    with pytest.raises(ValueError, match="unknown kind"):
        normaliser(gt, "diag")


def test_visibility_mask_and_regions():
    gt = face(50.0)[None]
    pred = gt.copy()
    pred[0, REGIONS["mouth"]] += (5.0, 0.0)  # only the mouth moves
    visible = np.ones((1, 68), bool)
    visible[0, REGIONS["mouth"]] = False
    assert nme(pred, gt, normaliser(gt, "io"), visible)[0] == 0.0
    assert nme(pred, gt, normaliser(gt, "io"))[0] == pytest.approx(5.0 * 20 / 68 / 50.0)
    regions = region_nme(pred, gt, normaliser(gt, "io"))
    assert regions["mouth"] == pytest.approx(0.1)
    assert all(regions[r] == 0.0 for r in REGIONS if r != "mouth")
    none_visible = np.zeros((1, 68), bool)
    assert np.isnan(nme(pred, gt, normaliser(gt, "io"), none_visible)[0])


def test_auc_fr_and_ced_by_hand():
    assert auc_fr(np.zeros(5)) == (1.0, 0.0)
    errors = np.array([0.04, 0.10, 0.0, 0.08])
    auc, fr = auc_fr(errors, 0.08)
    assert auc == pytest.approx((0.04 + 0.0 + 0.08 + 0.0) / 4 / 0.08)  # 0.375
    assert fr == pytest.approx(0.25)  # 0.08 is not a failure, 0.10 is
    x, y = ced(errors, 0.08, n_bins=5)
    assert np.allclose(x, [0, 0.02, 0.04, 0.06, 0.08])
    assert np.allclose(y, [0.25, 0.25, 0.5, 0.5, 0.75])
    xs, ys = ced(errors, 0.08, n_bins=20001)
    assert np.trapezoid(ys, xs) / 0.08 == pytest.approx(auc, abs=1e-3)
    with pytest.raises(ValueError):
        auc_fr(np.array([]))


def test_ced_csv_columns_and_values():
    text = ced_csv({"mse": np.array([0.0, 0.05]), "bce": np.array([0.01, 0.2])}, 0.08, n_bins=3)
    lines = text.strip().split("\n")
    assert lines[0] == "nme,mse,bce"
    assert [float(v) for v in lines[2].split(",")] == [4.0, 0.5, 0.5]
    assert [float(v) for v in lines[3].split(",")] == [8.0, 1.0, 0.5]


def test_crop_to_original_inverts_augment_crop():
    rng = np.random.default_rng(1)
    boxes = [(30.0, 20.0, 90.0, 90.0), (-10.0, 5.0, 60.0, 70.0)]
    transforms = np.stack([crop_transform(b, 64, 0.25) for b in boxes])
    orig = rng.uniform(0, 120, size=(2, 68, 2))
    crop = apply_transform(orig, transforms)
    back = crop_to_original(crop, transforms)
    assert np.allclose(back, orig, atol=1e-9)
    for i in range(2):
        assert np.allclose(invert_points(crop[i], transforms[i]), back[i], atol=1e-9)


def test_face_crop_point_lands_on_its_pixel_and_maps_back():
    image = np.zeros((100, 120), np.uint8)
    image[40, 70] = 255  # one bright pixel at x = 70, y = 40
    crop, T = face_crop(image, (50.0, 20.0, 40.0, 40.0), size=40, margin=0.0)  # 1:1 scale
    iy, ix = np.unravel_index(np.argmax(crop), crop.shape)
    assert crop.max() > 200
    assert np.allclose(crop_to_original(np.array([[[ix, iy]]], float), T[None])[0, 0], (70, 40), atol=1e-6)


def test_mean_shape_baseline_is_exact_when_every_face_is_the_mean():
    rng = np.random.default_rng(2)
    shape = rng.uniform(5, 60, size=(68, 2))
    train = np.stack([shape + rng.normal(0, 1, (68, 2)) for _ in range(50)])
    visible = np.ones((50, 68), bool)
    visible[0, 0] = False
    ms = mean_shape(train, visible)
    assert np.allclose(ms[0], train[1:, 0].mean(0))
    transforms = np.stack([crop_transform((10.0 * i, 5.0, 80.0, 80.0), 64, 0.25) for i in range(3)])
    orig = crop_to_original(np.broadcast_to(ms, (3, 68, 2)), transforms)
    pred = mean_shape_predictions(ms, transforms)
    assert np.allclose(pred, orig)
    assert np.allclose(nme(pred, orig, normaliser(orig, "io")), 0.0)


def test_evaluate_decoders_on_perfect_heatmaps():
    from facemarks.evaluation.testset import evaluate_decoders
    from facemarks.serving.inference import make_codec

    rng = np.random.default_rng(3)
    size = 64
    codec = make_codec(size, 1.5)
    boxes = np.array([[20.0, 30.0, 100.0, 100.0], [0.0, 0.0, 80.0, 80.0]])
    transforms = np.stack([crop_transform(b, size, 0.25) for b in boxes])
    crop_pts = rng.uniform(12, 52, size=(2, 68, 2))
    gt = crop_to_original(crop_pts, transforms)
    heat, _ = codec.encode(crop_pts, np.ones((2, 68), bool))
    rows, points = evaluate_decoders(heat, transforms, gt, boxes, np.ones((2, 68), bool), 1.5, 0.08)
    assert rows["subpixel"]["nme_io"] < 0.05  # percent: exact decoder on exact maps
    assert rows["argmax"]["nme_io"] > rows["subpixel"]["nme_io"]
    assert points["subpixel"].shape == (2, 68, 2)
    assert set(rows["subpixel"]["regions"]) == set(REGIONS)


def test_raw_sources_from_meta_or_by_box():
    from facemarks.evaluation.testset import raw_sources
    from facemarks.core.io import Face, ImageRecord

    boxes = np.array([[10.0, 10.0, 50.0, 50.0], [0.0, 5.0, 20.0, 20.0]])
    assert raw_sources({"files": ["a.png", "b.png"]}, boxes, []) == ["a.png", "b.png"]
    records = [ImageRecord("x.png", [Face((0.0, 5.0, 20.0, 20.0), np.zeros((68, 2)))]),
               ImageRecord("y.png", [Face((10.0, 10.0, 50.0, 50.0), np.zeros((68, 2)))])]
    assert raw_sources({}, boxes, records) == ["y.png", "x.png"]
    with pytest.raises(ValueError, match="no face with box"):
        raw_sources({}, boxes + 30, records)
