"""The `auto` detector cascade keeps looking after HOG's sure faces (issue 32): scenes built from real bundled photos
(scikit-image's astronaut portrait pasted into its coffee photo), where dlib's HOG misses a large face turned by 50°
while it finds smaller upright ones; the cascade's pure parts (candidates, the turned-copy rule, the order); the
split of the real-photo folder into halves and the marked-face report."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.data import astronaut, coffee

from facemarks.serving import detect as D
from facemarks.evaluation.detect_eval import SETTINGS, marked_face_report, marked_faces, photo_halves
from facemarks.core.io import box_iou

ROOT = Path(__file__).resolve().parents[1]
needs_cnn = pytest.mark.skipif(not D.cnn_available(), reason="dlib or its CNN model file (the peers extra) is absent")


def resized(image: np.ndarray, w: int, h: int | None = None) -> np.ndarray:
    """``image`` ``(H, W, 3)`` resized (bilinear) to ``(h or w, w, 3)``."""
    return np.asarray(Image.fromarray(image).resize((w, h or w), Image.Resampling.BILINEAR))


HEAD = (slice(20, 260), slice(110, 350))  # rows, columns of a square crop about the astronaut's face


def head(side: int) -> np.ndarray:
    """The astronaut's head and shoulders, ``(side, side, 3)`` (her face is about 0.38 x side)."""
    return resized(astronaut()[HEAD], side)


def turned_face_box(side: int, angle: float, at: tuple[int, int]) -> tuple:
    """Where HOG's face box of the upright ``head(side)`` lands when the head is turned by ``angle`` and its turned
    copy pasted with its top-left corner at ``at`` = ``(x, y)``: the box centre moved by the same turn, same side."""
    upright = D.detect(head(side), "hog")[0].box
    _, A = D.rotate_image(head(side), angle)
    to_turned = np.linalg.inv(np.vstack([A, [0.0, 0.0, 1.0]]))[:2]
    centre = np.array(upright[:2]) + (upright[2] - 1) / 2
    cx, cy = to_turned[:, :2] @ centre + to_turned[:, 2] + np.array(at)
    s = upright[2]
    return (cx - (s - 1) / 2, cy - (s - 1) / 2, s, s)


def paste(canvas: np.ndarray, image: np.ndarray, x: int, y: int) -> None:
    canvas[y:y + image.shape[0], x:x + image.shape[1]] = image


def small_and_large() -> tuple[np.ndarray, tuple]:
    """``(400, 600, 3)``: the astronaut's head turned by 50° (face about 114 px; HOG misses it) over the coffee photo,
    and her upright head downscaled (face about 63 px: sure for HOG, and ≥ 0.15 x the shorter side, where the
    earlier cascade stopped). Returns the scene and where the large face is."""
    canvas = resized(coffee(), 600, 400).copy()
    paste(canvas, D.rotate_image(head(260), 50.0)[0], 0, 16)
    paste(canvas, head(170), 410, 215)
    return canvas, turned_face_box(260, 50.0, (0, 16))


def group() -> tuple[np.ndarray, tuple]:
    """``(420, 800, 3)``: three upright heads (faces about 53 px) in a row and a larger one turned by 50° (face about
    136 px) that HOG misses. Returns the scene and where the turned face is."""
    canvas = resized(coffee(), 800, 420).copy()
    for x, side in ((10, 140), (160, 150), (320, 130)):
        paste(canvas, head(side), x, 200)
    paste(canvas, D.rotate_image(head(270), 50.0)[0], 415, 20)
    return canvas, turned_face_box(270, 50.0, (415, 20))


@needs_cnn
def test_a_sure_small_face_does_not_stop_the_search_and_the_large_face_comes_first():
    """HOG finds only the small face (sure: margin > 1); the cascade still checks HOG's near misses with the CNN,
    finds the large turned face at its place and orders it first; each face says which detector, scale and rotation
    found it."""
    scene, where = small_and_large()
    hog = D.detect(scene, "hog")
    assert len(hog) == 1 and hog[0].score > 1.0 and D.box_side(hog[0].box) < 70, hog
    auto = D.detect(scene, "auto")
    assert len(auto) == 2, auto
    large, small = auto
    assert box_iou(large.box, where) > 0.5 and D.box_side(large.box) > 1.5 * D.box_side(small.box), (large, where)
    assert large.detector == "cnn" and large.rotation == 0 and 0 < large.scale < 1  # the CNN on a downscaled crop
    assert small.box == hog[0].box and (small.detector, small.scale, small.rotation) == ("hog", 1.0, 0.0)
    assert D.is_sure(small) and D.is_sure(large)


@needs_cnn
def test_group_photo_the_face_hog_misses_is_found_and_ordered_first():
    scene, where = group()
    hog = D.detect(scene, "hog")
    assert len(hog) == 3 and not any(box_iou(d.box, where) > 0.1 for d in hog), hog
    auto = D.detect(scene, "auto")
    assert len(auto) == 4, auto
    assert box_iou(auto[0].box, where) > 0.5 and auto[0].detector == "cnn", (auto[0], where)
    assert sorted(d.box for d in auto[1:]) == sorted(d.box for d in hog)  # HOG's faces kept as HOG found them
    assert [D.box_side(d.box) for d in auto] == sorted((D.box_side(d.box) for d in auto), reverse=True)
    assert D.detect(scene, "auto") == auto  # deterministic


@needs_cnn
def test_the_cnn_check_on_a_crop_maps_its_box_back_onto_the_image():
    """The CNN on the crop about HOG's astronaut face (scaled so the face is CHECK_SIDE px) gives the box that the CNN
    gives on the whole image at the same scale, shifted back to image pixels."""
    image = resized(astronaut(), 400)
    face = D.detect(image, "hog")[0]
    boxes, scale = D.check_boxes(image, face.raw_box)
    assert np.isclose(scale, D.CHECK_SIDE / D.box_side(face.raw_box))
    whole = D.cnn_boxes(image, max_side=round(400 * scale))
    assert len(boxes) == 1 and len(whole) == 1
    assert box_iou(boxes[0][0], whole[0][0]) > 0.8, (boxes, whole)
    x0, y0, x1, y1 = D.check_region(face.raw_box, image.shape)
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 400
    assert np.isclose(x1 - x0, D.CHECK_CONTEXT * D.box_side(face.raw_box))  # the face is not near an edge


def det(box: tuple, score: float, detector: str = "hog", merged: tuple = ()) -> D.Detection:
    return D.Detection(tuple(map(float, box)), score, detector, tuple(map(float, box)), merged=merged)


def test_candidates_slow_stage_rule_and_order():
    faces = [det((100, 100, 80, 80), 1.2)]
    weak = [det((102, 98, 78, 78), -0.1),   # HOG's face again: not a candidate
            det((300, 100, 90, 90), -0.2), det((305, 102, 88, 88), -0.3),  # one place: the better one only
            det((500, 100, 40, 40), -0.25),  # too small
            *(det((100 * i, 400, 70, 70), -0.5) for i in range(6))]
    got = D.candidates(weak, faces)
    assert [d.box[:2] for d in got] == [(300.0, 100.0), (0.0, 400.0), (100.0, 400.0), (200.0, 400.0)]
    assert len(D.candidates(weak, faces, limit=2)) == 2 and D.candidates(weak, faces, min_side=100) == []

    cnn_there = det((98, 104, 84, 84), 0.9, "cnn")
    cnn_elsewhere = det((600, 300, 120, 120), 0.9, "cnn")
    assert not D.needs_slow({"hog": faces, "check": [], "cnn-fast": [cnn_there]})  # they agree
    assert D.needs_slow({"hog": faces, "check": [cnn_elsewhere], "cnn-fast": []})  # the CNN sees a face HOG misses
    assert not D.needs_slow({"hog": faces, "cnn-fast": [det((600, 300, 120, 120), 0.3, "cnn")]})  # a faint one
    assert D.stages_for("auto", {"hog": faces, "cnn-fast": [cnn_elsewhere]}, cnn=True)[-2:] == ("turned", "cnn")
    assert D.needs_slow({"hog": [det((100, 100, 80, 80), 0.1)]})  # nothing sure found
    assert D.stages_for("auto", {"hog": faces}, cnn=False) == ("hog", "turned")
    assert D.stages_for("hog-rotate", {}) == ("hog", "turned")

    faint_large = det((0, 0, 200, 200), 0.1)
    agreed_faint = det((0, 300, 150, 150), 0.1, merged=("cnn",))
    small_sure = det((400, 0, 50, 50), 2.0)
    large_cnn = det((400, 300, 120, 120), 0.8, "cnn")
    order = D.by_size([small_sure, faint_large, large_cnn, agreed_faint])
    assert order == [agreed_faint, large_cnn, small_sure, faint_large]


def test_photo_halves_alternate_by_sorted_file_name():
    names = ["b.jpg", "a.jpg", "d.png", "c.jpg", "e.jpg"]
    halves = photo_halves(names)
    assert halves == {"a.jpg": "tuning", "b.jpg": "reporting", "c.jpg": "tuning", "d.png": "reporting",
                      "e.jpg": "tuning"}
    assert photo_halves(list(reversed(names))) == halves


FACES = ROOT.parent / "shared" / "real-faces"


@needs_cnn
@pytest.mark.skipif(not (FACES / "training_frames_keypoints.csv").is_file(), reason="../shared/real-faces is absent")
def test_marked_face_report_on_three_real_faces(tmp_path):
    """Two frames of one person and one of another (copied into a temp folder with their CSV rows): one face per
    person is scored, each setting's share is a share of those, and HOG finds these clear frontal faces."""
    with open(FACES / "training_frames_keypoints.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], sorted(rows[1:], key=lambda r: r[0])
    person = body[0][0].rsplit("_", 1)[0]
    mine = [r for r in body if r[0].startswith(person + "_")][:2]
    other = next(r for r in body if not r[0].startswith(person + "_"))
    (tmp_path / "training").mkdir()
    for r in (*mine, other):
        shutil.copy(FACES / "training" / r[0], tmp_path / "training" / r[0])
    with open(tmp_path / "training_frames_keypoints.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *mine, other])
    assert [p.name for p, _ in marked_faces(tmp_path)] == sorted([mine[0][0], other[0]])
    report = marked_face_report(tmp_path)
    assert report["n_faces"] == 2 and set(report["settings"]) == set(SETTINGS)
    assert all(r["found"] in (0.0, 0.5, 1.0) for r in report["settings"].values())
    assert report["settings"]["hog"]["found"] == 1.0 and report["settings"]["auto"]["found"] == 1.0
