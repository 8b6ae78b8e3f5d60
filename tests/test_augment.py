"""Tests for facemarks.augmentation.augment: crop geometry and skimage convention, flips, visibility, determinism, splits."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk

from conftest import THREADS

from facemarks.augmentation.augment import (augment_matrix, build_splits, contact_sheet, make_sample, make_samples, run_augment,
                               sample_rng, split_val, write_contact_sheet)
from facemarks.augmentation.crops import apply_transform, crop_transform, face_crop, invert_points, warp_gray
from facemarks.core.io import Face, ImageRecord, read_image, write_dlib_xml, write_image
from facemarks.core.landmarks import LEFT_EYE, MIRROR, RIGHT_EYE
from facemarks.core.params import Augment
from facemarks.core.store import read_split

ROOT = Path(__file__).resolve().parents[1]
ISSUE_PAIRS = ([(i, 16 - i) for i in range(8)] + [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22)]
               + [(31, 35), (32, 34)] + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
               + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])
# Dot intensity per landmark: right eye bright, left eye dim, the rest medium (a flip bug swaps eye intensities).
DOT_LEVEL = np.full(68, 170.0)
DOT_LEVEL[RIGHT_EYE] = 250.0
DOT_LEVEL[LEFT_EYE] = 100.0
NO_DOMAIN_RANDOMISATION = dict(jpeg_prob=0.0, motion_blur_prob=0.0, lowres_prob=0.0, colour_cast=0.0, sharpen_prob=0.0)
QUIET = dict(brightness=0.0, contrast=0.0, gamma=0.0, blur_prob=0.0, noise_std=0.0, **NO_DOMAIN_RANDOMISATION)


def frontal_template() -> np.ndarray:
    """A frontal 68-point face in the unit box ``[0, 1]²`` (subject's right eye at image-left) → ``(68, 2)``."""
    p = np.zeros((68, 2))
    t = np.linspace(np.pi, 0, 17)
    p[0:17] = np.c_[0.5 + 0.48 * np.cos(t), 0.35 + 0.6 * np.sin(t)]  # jaw, image-left to image-right
    p[17:22] = np.c_[np.linspace(0.12, 0.42, 5), np.full(5, 0.22)]
    p[22:27] = np.c_[np.linspace(0.58, 0.88, 5), np.full(5, 0.22)]
    p[27:31] = np.c_[np.full(4, 0.5), np.linspace(0.35, 0.58, 4)]
    p[31:36] = np.c_[np.linspace(0.38, 0.62, 5), np.full(5, 0.64)]
    for start, cx in ((36, 0.30), (42, 0.70)):  # 36 and 45 are the outer corners
        a = np.linspace(np.pi, -np.pi, 7)[:6] if start == 36 else np.linspace(0, 2 * np.pi, 7)[:6]
        p[start:start + 6] = np.c_[cx + 0.1 * np.cos(a), 0.36 + 0.04 * np.sin(a)]
    a = np.linspace(np.pi, -np.pi, 13)[:12]
    p[48:60] = np.c_[0.5 + 0.18 * np.cos(a), 0.8 + 0.06 * np.sin(a)]
    a = np.linspace(np.pi, -np.pi, 9)[:8]
    p[60:68] = np.c_[0.5 + 0.12 * np.cos(a), 0.8 + 0.03 * np.sin(a)]
    return p


def face_points(box) -> np.ndarray:
    left, top, w, h = box
    return frontal_template() * [w - 1, h - 1] + [left, top]


def draw_face(img: np.ndarray, pts: np.ndarray, radius: float) -> None:
    for (x, y), level in zip(pts, DOT_LEVEL):
        rr, cc = disk((y, x), radius, shape=img.shape[:2])
        img[rr, cc] = level


def make_raw(root: Path, n_train: int = 6, n_test: int = 2, seed: int = 0) -> Path:
    """A tiny raw dataset: PNGs (gray and RGB) with 1–2 dotted faces each, plus train.xml / test.xml."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        records = []
        for i in range(n):
            h, w = int(rng.integers(110, 140)), int(rng.integers(150, 190))
            img = np.full((h, w), 20, np.uint8)
            faces = []
            boxes = [(8.0, 10.0, 60.0, 64.0)] + ([(w - 72.0, 30.0, 62.0, 62.0)] if i % 2 else [])
            for box in boxes:
                pts = face_points(box)
                draw_face(img, pts, 2.6)
                faces.append(Face(box=box, points=np.round(pts)))
            if i % 3 == 1:
                faces[0].points[5] = np.nan  # one unlabelled point
            rel = f"images/{split}_{i}.png"
            write_image(root / rel, np.dstack([img] * 3) if i % 2 else img)
            records.append(ImageRecord(file=rel, faces=faces))
        write_dlib_xml(root / f"{split}.xml", records)
    return root


def sample_at(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear sample ``img (H, W)`` at ``pts (n, 2)`` (pixel centres at integers) → ``(n,)``."""
    from scipy.ndimage import map_coordinates

    return map_coordinates(img.astype(np.float64), [pts[:, 1], pts[:, 0]], order=1, mode="constant")


# ----------------------------------------------------------------------------------------------- geometry
def test_warp_convention_single_bright_pixel():
    img = np.zeros((20, 30), np.uint8)
    img[7, 11] = 255
    shifted = warp_gray(img, np.array([[1.0, 0, 3], [0, 1, -2], [0, 0, 1]]), 24)
    assert shifted[5, 14] == pytest.approx(255.0) and np.count_nonzero(shifted > 1e-9) == 1
    # 2x upsampling with pixel-centre convention: x' = 2x + 0.5, so pixel 11 spreads evenly onto 22 and 23
    up = warp_gray(img, np.array([[2.0, 0, 0.5], [0, 2, 0.5], [0, 0, 1]]), 40)
    assert up[14, 22] == pytest.approx(up[14, 23]) == pytest.approx(up[15, 22]) == pytest.approx(0.75 ** 2 * 255)
    assert up[14, 21] < up[14, 22] and up[14, 24] < up[14, 23] and up[13, 22] < up[14, 22]


def test_crop_transform_maps_box_to_crop():
    box, size, margin = (10.0, 20.0, 40.0, 30.0), 64, 0.25
    T = crop_transform(box, size, margin)
    side = 40 * 1.5
    centre = (10 + 19.5, 20 + 14.5)
    edges = np.array([[centre[0] - side / 2, centre[1] - side / 2], [centre[0] + side / 2, centre[1] + side / 2]])
    np.testing.assert_allclose(apply_transform(edges, T), [[-0.5, -0.5], [size - 0.5, size - 0.5]], atol=1e-12)
    img = np.zeros((80, 90, 3), np.uint8)
    img[..., 1] = 200
    crop, T2 = face_crop(img, box, size, margin)
    assert crop.dtype == np.uint8 and crop.shape == (size, size)
    np.testing.assert_array_equal(T2, T)
    assert abs(int(crop[32, 32]) - round(0.7154 * 200)) <= 1  # luma of pure green


@pytest.mark.parametrize("size", [64, 128, 400])
def test_plain_crop_equals_skimage_resize(size):
    """Box = whole image, no margin: the crop is skimage's anti-aliased bilinear resize (up to uint8 rounding)."""
    from skimage.filters import gaussian
    from skimage.transform import resize

    rng = np.random.default_rng(0)
    img = gaussian(rng.uniform(0, 255, (300, 300)), 3, preserve_range=True)
    img = np.clip((img - img.mean()) * 8 + 128, 0, 255).astype(np.uint8)
    crop, _ = face_crop(img, (0.0, 0.0, 300.0, 300.0), size, 0.0)
    ref = resize(img.astype(np.float64), (size, size), order=1, anti_aliasing=True, preserve_range=True, mode="edge")
    diff = np.abs(crop[2:-2, 2:-2] - ref[2:-2, 2:-2])  # borders: our outside is black, resize's is 'edge'
    assert diff.max() <= 0.5 + 1e-6 and img.std() > 40


def test_forward_then_inverse_is_exact():
    rng = np.random.default_rng(1)
    for _ in range(200):
        box = (rng.uniform(-50, 300), rng.uniform(-50, 300), rng.uniform(5, 400), rng.uniform(5, 400))
        size = int(rng.choice([32, 64, 128, 224]))
        T = augment_matrix(size, rng.uniform(-180, 180), rng.uniform(0.5, 2), tuple(rng.uniform(-20, 20, 2)),
                           bool(rng.random() < 0.5)) @ crop_transform(box, size, rng.uniform(0, 1))
        pts = rng.uniform(-500, 1000, (68, 2))
        np.testing.assert_allclose(invert_points(apply_transform(pts, T), T), pts, atol=1e-4, rtol=0)


def test_mirror_is_the_issue_permutation_and_an_involution():
    expected = np.arange(68)
    for a, b in ISSUE_PAIRS:
        expected[a], expected[b] = b, a
    np.testing.assert_array_equal(MIRROR, expected)
    np.testing.assert_array_equal(MIRROR[MIRROR], np.arange(68))
    flip = augment_matrix(64, 0.0, 1.0, (0.0, 0.0), True)
    np.testing.assert_allclose(flip @ flip, np.eye(3), atol=1e-12)
    pts = np.random.default_rng(0).uniform(0, 63, (68, 2))
    once = apply_transform(pts, flip)[MIRROR]
    np.testing.assert_allclose(apply_transform(once, flip)[MIRROR], pts, atol=1e-12)
    np.testing.assert_allclose(once[:, 0], 63 - pts[MIRROR, 0])


def test_flip_keeps_left_right_semantics(tmp_path):
    box = (20.0, 20.0, 80.0, 80.0)
    pts = face_points(box)
    img = np.zeros((130, 130), np.uint8)
    draw_face(img, pts, 3.0)
    cfg = Augment(size=64, rotation=10.0, flip_prob=1.0, **QUIET)
    s = make_sample(img, box, pts, cfg, sample_rng(0, "train", 0, 1))
    assert s["flip"]
    assert s["points"][36, 0] < s["points"][45, 0]  # subject's right outer eye corner still at image-left
    assert s["points"][RIGHT_EYE, 0].mean() < s["points"][LEFT_EYE, 0].mean()
    # each point sits on its mirror partner's dot: the dim (original left) eye is now the image-left, right eye
    levels = sample_at(s["image"], s["points"].astype(np.float64))
    np.testing.assert_allclose(levels, DOT_LEVEL[MIRROR], atol=25)
    plain = make_sample(img, box, pts, dataclasses.replace(cfg, flip_prob=0.0), sample_rng(0, "train", 0, 1))
    assert not plain["flip"] and plain["points"][36, 0] < plain["points"][45, 0]
    np.testing.assert_allclose(sample_at(plain["image"], plain["points"].astype(np.float64)), DOT_LEVEL, atol=25)
    np.testing.assert_allclose(invert_points(s["points"], s["transform"]), s["orig_points"], atol=1e-3)
    np.testing.assert_array_equal(s["orig_points"], pts[MIRROR])


def test_out_of_crop_points_are_invisible_not_clipped():
    box = (40.0, 40.0, 50.0, 50.0)
    pts = face_points(box)
    pts[3] = (-200.0, 60.0)  # far left of the crop
    pts[7] = np.nan
    img = np.zeros((150, 150), np.uint8)
    s = make_sample(img, box, pts, Augment(size=32), None)
    expect = apply_transform(pts, crop_transform(box, 32, 0.25))
    assert not s["visible"][3] and not s["visible"][7]
    assert s["points"][3, 0] == pytest.approx(expect[3, 0], rel=1e-6) and s["points"][3, 0] < -0.5
    assert s["visible"][np.setdiff1d(np.arange(68), [3, 7])].all()
    assert s["image"].shape == (32, 32) and s["image"].dtype == np.uint8


def test_augmented_landmarks_stay_on_drawn_features(tmp_path):
    raw = make_raw(tmp_path / "raw", n_train=4, n_test=1)
    cfg = Augment(size=64, copies=3, val_fraction=0.0, workers=1, rotation=30.0, translate=0.1, **NO_DOMAIN_RANDOMISATION)
    train = build_splits(raw, cfg, seed=3)["train"]
    arr, copy = train["arrays"], np.array(train["meta"]["copy"])
    assert (copy > 0).sum() == 3 * (copy == 0).sum() and np.array(train["meta"]["flip"]).any()
    rng = np.random.default_rng(0)
    for i in np.flatnonzero(copy > 0):
        vis = arr["visible"][i]
        on = sample_at(arr["images"][i], arr["points"][i][vis].astype(np.float64)).mean()
        off = sample_at(arr["images"][i], rng.uniform(0, 63, (200, 2))).mean()
        assert on > 2.0 * off, f"sample {i}: landmark intensity {on:.0f} vs background {off:.0f}"
        np.testing.assert_allclose(invert_points(arr["points"][i], arr["transform"][i])[vis],
                                   arr["orig_points"][i][vis], atol=1e-3)


def test_synthetic_faces_keep_feature_energy_after_augmentation(tmp_path):
    """Landmarks still lie on the generator's drawn features: gradient energy at the points stays high,
    and clearly above the same points shifted by 6 px."""
    from facemarks.core.params import Synthetic
    from facemarks.data.synthetic import feature_energy, generate_split

    # full-strength features, no occluders: this checks where the points land, not how realistic faces are
    syn = Synthetic(min_size=96, max_size=128, workers=1, occluder_prob=0.0, glasses_prob=0.0, hand_prob=0.0,
                    strand_prob=0.0, photo_texture=0.0, feature_contrast_min=1.0)
    for split, n in (("train", 6), ("test", 1)):
        write_dlib_xml(tmp_path / f"{split}.xml", generate_split(tmp_path, split, n, 0, syn))
    cfg = Augment(size=64, copies=3, val_fraction=0.0, workers=1, **NO_DOMAIN_RANDOMISATION)
    train = build_splits(tmp_path, cfg, seed=0)["train"]
    arr, copy = train["arrays"], np.array(train["meta"]["copy"])
    true, shifted = [], []
    for i in np.flatnonzero(copy > 0):
        pts = arr["points"][i][arr["visible"][i]].astype(np.float64)
        true.append(feature_energy(arr["images"][i], pts))
        shifted.append(feature_energy(arr["images"][i], pts + [6.0, 0.0]))
    true, shifted = np.array(true), np.array(shifted)
    assert true.min() > 1.05 and np.median(true) > 1.4, true
    assert true.mean() > shifted.mean() + 0.25, (true.mean(), shifted.mean())


# ----------------------------------------------------------------------------------------------- splits
def test_val_split_is_seeded_and_disjoint_by_image(tmp_path):
    raw = make_raw(tmp_path / "raw", n_train=10, n_test=2)
    cfg = Augment(size=32, copies=1, val_fraction=0.3, workers=1)
    out = build_splits(raw, cfg, seed=5)
    files = {k: set(v["meta"]["files"]) for k, v in out.items()}
    assert len(files["val"]) == 3 and not files["val"] & files["train"]
    assert len(files["val"] | files["train"]) == 10 and all(f.startswith("images/test") for f in files["test"])
    assert set(out["val"]["meta"]["copy"]) == {0} and set(out["test"]["meta"]["copy"]) == {0}
    np.testing.assert_array_equal(split_val(10, 0.3, 5), split_val(10, 0.3, 5))
    assert any(not np.array_equal(split_val(10, 0.3, 5), split_val(10, 0.3, s)) for s in range(6, 10))
    # faces per image: odd images carry two boxes; both land in the same split
    n_faces = {f: 2 if int(f.split("_")[1][:-4]) % 2 else 1 for f in files["train"]}
    assert len(out["train"]["meta"]["files"]) == 2 * sum(n_faces.values())


def test_run_augment_is_byte_identical_for_any_worker_count(tmp_path):
    raw = make_raw(tmp_path / "raw", n_train=6, n_test=2)
    cfg = Augment(size=32, copies=2, val_fraction=0.2, workers=1)
    s1 = run_augment(raw, tmp_path / "w1", cfg, seed=11)
    s2 = run_augment(raw, tmp_path / "w2", dataclasses.replace(cfg, workers=2), seed=11)
    assert s1["counts"] == s2["counts"] and s1["counts"]["test"] == 3
    for split in ("train", "val", "test"):
        for f in sorted((tmp_path / "w1" / split).iterdir()):
            other = (tmp_path / "w2" / split / f.name).read_bytes()
            if f.name == "meta.json":
                a, b = json.loads(f.read_text()), json.loads(other)
                a["augment"].pop("workers"), b["augment"].pop("workers")
                assert a == b
            else:
                assert f.read_bytes() == other, f"{split}/{f.name} differs between 1 and 2 workers"
    split = read_split(tmp_path / "w1" / "train")
    assert split.images.dtype == np.uint8 and split.points.dtype == np.float32 and split.transform.shape[1:] == (3, 3)
    no_val = dataclasses.replace(cfg, val_fraction=0.0)
    a, b = (build_splits(raw, no_val, seed=sd)["train"] for sd in (11, 12))
    aug = np.array(a["meta"]["copy"]) > 0
    np.testing.assert_array_equal(a["arrays"]["images"][~aug], b["arrays"]["images"][~aug])  # crop-only copies
    assert all(not np.array_equal(x, y) for x, y in zip(a["arrays"]["images"][aug], b["arrays"]["images"][aug]))


def test_contact_sheet_marks_eyes(tmp_path):
    raw = make_raw(tmp_path / "raw", n_train=3, n_test=1)
    cfg = Augment(size=32, copies=2, val_fraction=0.0, workers=1)
    run_augment(raw, tmp_path / "aug", cfg, seed=0)
    n = write_contact_sheet(tmp_path / "sheet.png", tmp_path / "aug" / "train", n=6, cols=3)
    sheet = read_image(tmp_path / "sheet.png")
    assert n == 6 and sheet.shape == (2 * 160, 3 * 160, 3)
    red = (sheet[..., 0] == 255) & (sheet[..., 1] == 40) & (sheet[..., 2] == 40)
    blue = (sheet[..., 0] == 40) & (sheet[..., 1] == 120) & (sheet[..., 2] == 255)
    assert red.sum() > 50 and blue.sum() > 50
    with pytest.raises(ValueError):
        contact_sheet(np.zeros((1, 8, 8), np.uint8), np.zeros((1, 68, 2)), np.zeros((1, 67), bool))


def test_stage_script_writes_outputs(tmp_path):
    make_raw(tmp_path / "data" / "raw", n_train=4, n_test=2)
    params = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("  size: 128", "  size: 32"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "augment.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics" / "augment.json").read_text())
    assert metrics["counts"]["test"] == 3 and "crops/s" in proc.stdout
    assert not {"seconds", "images_per_s", "cpu_seconds"} & set(metrics)  # wall clock: timings/, not DVC metrics
    assert json.loads((tmp_path / "timings" / "augment.json").read_text())["images_per_s"] > 0
    assert (tmp_path / "reports" / "augment_contact_sheet.png").is_file()
    assert len(read_split(tmp_path / "data" / "augmented" / "val")) >= 1


def test_bad_box_and_missing_image_name_the_file(tmp_path):
    from facemarks.core.io import DataError

    raw = make_raw(tmp_path / "raw", n_train=2, n_test=1)
    (raw / "images" / "test_0.png").unlink()
    with pytest.raises(DataError, match="test_0.png"):
        build_splits(raw, Augment(size=32, workers=1), seed=0)
    flat = Face(box=(5.0, 5.0, 0.0, 20.0), points=np.zeros((68, 2)))
    records = [ImageRecord(file="images/train_0.png", faces=[flat])]
    write_dlib_xml(raw / "train.xml", records)
    with pytest.raises(DataError, match=r"train\.xml \[images/train_0\.png\].*no area"):
        build_splits(raw, Augment(size=32, workers=1), seed=0)


# ----------------------------------------------------------------------------------------------- domain randomisation
def test_motion_kernel_is_a_normalised_line_along_its_angle():
    from facemarks.augmentation.augment import motion_kernel

    flat = motion_kernel(4.0, 0.0)
    assert flat.sum() == pytest.approx(1.0) and flat.shape == (5, 5)
    assert np.count_nonzero(flat[2]) == 5 and np.count_nonzero(flat) == 5  # one horizontal row
    upright = motion_kernel(4.0, np.pi / 2)
    assert np.count_nonzero(upright[:, 2]) == 5 and np.count_nonzero(upright) == 5


def test_jpeg_roundtrip_adds_block_artefacts_that_grow_as_quality_drops():
    from facemarks.augmentation.augment import jpeg_roundtrip

    rng = np.random.default_rng(0)
    img = np.clip(128 + 40 * rng.standard_normal((64, 64)), 0, 255).astype(np.float32)
    err = {q: float(np.abs(jpeg_roundtrip(img, q) - img).mean()) for q in (90, 50, 15)}
    assert 0 < err[90] < err[50] < err[15]
    np.testing.assert_array_equal(jpeg_roundtrip(img, 50), jpeg_roundtrip(img, 50))


def test_colour_cast_changes_only_augmented_copies(tmp_path):
    from facemarks.augmentation.augment import colour_cast_weights

    w = colour_cast_weights(np.random.default_rng(1), 0.3)
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()
    box = (20.0, 20.0, 80.0, 80.0)
    pts = face_points(box)
    rgb = np.zeros((130, 130, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 60, 30  # strongly coloured: a cast changes its gray level
    quiet = Augment(size=32, rotation=0.0, scale_min=1.0, scale_max=1.0, translate=0.0, flip_prob=0.0, **QUIET)
    cast = dataclasses.replace(quiet, colour_cast=0.5)
    plain_q, aug_q = make_samples(rgb, box, pts, quiet, [None, sample_rng(0, "train", 0, 1)])
    plain_c, aug_c = make_samples(rgb, box, pts, cast, [None, sample_rng(0, "train", 0, 1)])
    np.testing.assert_array_equal(plain_q["image"], plain_c["image"])  # plain crops (val / test) keep luma
    assert np.abs(aug_c["image"].astype(int) - aug_q["image"].astype(int)).max() >= 3


@pytest.mark.parametrize("knob", ["jpeg_prob", "motion_blur_prob", "lowres_prob", "sharpen_prob"])
def test_each_domain_randomisation_changes_the_crop_and_keeps_the_points(knob):
    box = (20.0, 20.0, 80.0, 80.0)
    pts = face_points(box)
    img = np.zeros((130, 130), np.uint8)
    draw_face(img, pts, 3.0)
    quiet = Augment(size=64, **QUIET)
    on = dataclasses.replace(quiet, **{knob: 1.0})
    a = make_sample(img, box, pts, quiet, sample_rng(0, "train", 0, 1))
    b = make_sample(img, box, pts, on, sample_rng(0, "train", 0, 1))
    c = make_sample(img, box, pts, on, sample_rng(0, "train", 0, 1))
    np.testing.assert_array_equal(b["image"], c["image"])  # seeded
    assert (a["image"] != b["image"]).mean() > 0.02
    np.testing.assert_array_equal(a["points"], b["points"])  # photometric only: the geometry is untouched
