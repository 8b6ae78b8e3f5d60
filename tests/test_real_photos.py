"""The bundled real portraits and dlib's reference points (the real-photo signal of the realism study)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facemarks.core import io

from facemarks.evaluation import peers, real_photos
from facemarks.core.landmarks import inter_ocular


def test_bundled_portraits_load_as_rgb():
    for name in real_photos.PORTRAITS:
        img = real_photos.load_portrait(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
    with pytest.raises(ValueError, match="unknown portrait"):
        real_photos.load_portrait("nobody")


@pytest.mark.skipif(not peers.available(), reason="the peers extra (dlib) is not installed")
def test_bundled_portraits_give_one_reference_per_face_and_drop_the_mission_patch():
    """The default real photos: dlib's HOG finds two boxes on the astronaut, her face and the mission patch on her
    suit (a weak detection dlib's CNN does not confirm); the face rule keeps the face and counts the patch."""
    photos = real_photos.photo_set(None)
    assert [f.file for f in photos.faces] == ["astronaut.png", "grace_hopper.png"]
    assert len(photos.dropped) == 1 and photos.dropped[0].startswith("astronaut.png@")
    astro = photos.faces[photos.index("astronaut.png")]
    left, top, w, h = astro.box
    assert 150 < left + w / 2 < 300 and 50 < top + h / 2 < 200  # her face, upper middle of the 512² photo
    for face in photos.faces:
        assert face.reference == "dlib" and face.points.shape == (68, 2)
        np.testing.assert_allclose(real_photos.face_nme(face.points[None], [face]), 0.0)
        # every point 10 % of the inter-ocular distance off → NME 10 %
        off = face.points + [0.1 * inter_ocular(face.points[None])[0], 0.0]
        np.testing.assert_allclose(real_photos.face_nme(off[None], [face]), 10.0, rtol=1e-9)
    report = real_photos.photos_report(photos, {"mse": np.array([3.0, 5.0])}, {"mse": "dark"})
    assert report["false_faces_dropped"] == 1 and "is_face" in report["face_rule"]


# ------------------------------------------------------------------------- the real-photo evaluation of a folder
needs_dlib = pytest.mark.skipif(not peers.available(), reason="the peers extra (dlib) is not installed")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "real-photos"


def _write_portraits(folder: Path) -> dict[str, np.ndarray]:
    """The two bundled portraits written as JPEG files (read back below, as a user's photos would be)."""
    from facemarks.core.io import read_image, write_image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in real_photos.PORTRAITS:
        write_image(folder / f"{name}.jpg", real_photos.load_portrait(name))
        out[f"{name}.jpg"] = read_image(folder / f"{name}.jpg")
    return out


def test_a_missing_or_imageless_folder_fails_naming_the_key(tmp_path):
    with pytest.raises(io.PhotosError, match=r"^evaluate\.photos: .*nowhere is not a folder"):
        io.photo_files(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("no photos here")
    with pytest.raises(io.PhotosError, match=r"^evaluate\.photos: .* holds no image"):
        io.photo_files(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(io.PhotosError, match=r"holds no image matching '\*\.jpg'"):
        io.photo_files(tmp_path, "*.jpg")
    assert [p.name for p in io.photo_files(tmp_path)] == ["a.png"]


@needs_dlib
def test_unlabelled_folder_is_scored_against_dlib_and_counts_images_without_a_face(tmp_path):
    from facemarks.serving.detect import dlib_boxes, is_face, map_box
    from facemarks.core.io import write_image

    images = _write_portraits(tmp_path)
    write_image(tmp_path / "wall.png", np.full((200, 300, 3), 128, np.uint8))  # no face
    cache = tmp_path / "cache"
    photos = real_photos.photo_set(tmp_path, cache=cache)
    assert photos.n_images == 3 and photos.no_face == ["wall.png"]
    dlib, dropped = peers.dlib68(), 0
    for name, image in images.items():  # every face dlib's detector finds that is a face, left to right
        every = dlib_boxes(image)
        found = sorted([d for d in every if is_face(image, *d)], key=lambda d: map_box(d[0], "dlib", d[2])[0])
        dropped += len(every) - len(found)
        faces = [f for f in photos.faces if f.file == name]
        assert len(faces) == len(found) >= 1 and [f.index for f in faces] == list(range(len(found)))
        for face, (raw, _, k) in zip(faces, found):
            assert face.reference == "dlib" and face.box_source == "dlib" and face.detector_box == raw
            assert face.box == pytest.approx(map_box(raw, "dlib", k))
            np.testing.assert_allclose(face.points, dlib.predict(image, raw))
    assert len(photos.dropped) == dropped >= 1  # the astronaut's mission patch
    # the cache holds dlib's answer per image; a rerun reads it back to the same references
    assert len(list(cache.glob("*.json"))) == 3
    again = real_photos.photo_set(tmp_path, cache=cache)
    for a, b in zip(photos.faces, again.faces):
        assert a.box == b.box and np.array_equal(a.points, b.points)
    # a prediction off by 10 % of the inter-ocular distance scores 10 %; the summary counts it above 10 % or not
    refs = np.stack([f.points for f in photos.faces])
    off = refs + np.array([0.1, 0.0]) * inter_ocular(refs)[:, None, None]
    nme = real_photos.face_nme(off, photos.faces)
    np.testing.assert_allclose(nme, 10.0, rtol=1e-9)
    summary = real_photos.loss_summary(np.linspace(5.0, 15.0, len(photos.faces)), photos.faces)
    assert summary["median"] == 10.0 and summary["share_above_10"] == pytest.approx(0.5 if len(photos.faces) % 2 == 0
                                                                                     else 1 / 3)
    assert summary["by_reference"] == {"dlib": {k: summary[k] for k in ("n_faces", "median", "mean", "share_above_10")}}


@needs_dlib
def test_labelled_folder_is_scored_against_the_human_markup(tmp_path):
    from facemarks.core.io import ImageRecord, Face, write_dlib_xml, write_pts
    from facemarks.core.landmarks import face_box

    images = _write_portraits(tmp_path)
    portraits = real_photos.photo_set(None)
    # "human" markup: dlib's points moved by 2 px, one photo as a .pts file, the other in a dlib XML list
    marks = {f"{n}.jpg": portraits.faces[portraits.index(f"{n}.png")].points + 2.0 for n in real_photos.PORTRAITS}
    write_pts(tmp_path / "astronaut.pts", marks["astronaut.jpg"])
    pts = marks["grace_hopper.jpg"]
    write_dlib_xml(tmp_path / "labels.xml", [ImageRecord("grace_hopper.jpg", [Face(face_box(pts), pts)])])
    photos = real_photos.photo_set(tmp_path)
    assert [(f.file, f.reference, f.box_source) for f in photos.faces] == [
        ("astronaut.jpg", "human", "dlib"), ("grace_hopper.jpg", "human", "dlib")]
    for face in photos.faces:
        np.testing.assert_allclose(face.points, marks[face.file], atol=1e-3)
    report = real_photos.photos_report(photos, {"mse": np.array([3.0, 5.0]), "bce": np.array([4.0, 7.0])},
                                       {"mse": "dark", "bce": "dark"})
    assert report["references"] == {"human": 2} and report["n_faces"] == 2
    assert report["mse"]["median"] == 4.0 and report["bce"]["mean"] == 5.5
    assert report["comparison"]["bce_vs_mse"]["mean_delta"] == pytest.approx(1.5)
    # a marked face that dlib cannot see keeps its markup box
    blank = np.full_like(images["astronaut.jpg"], 90)
    from facemarks.core.io import write_image

    write_image(tmp_path / "blank.png", blank)
    write_pts(tmp_path / "blank.pts", marks["astronaut.jpg"])
    face = next(f for f in real_photos.photo_set(tmp_path).faces if f.file == "blank.png")
    assert face.box_source == "markup" and face.detector_box is None
    assert face.box == face_box(marks["astronaut.jpg"])


@pytest.mark.skipif(not SHARED.is_dir() or not peers.available(), reason="../shared/real-photos or dlib absent")
def test_the_shared_real_photos_give_their_faces_from_the_cache(tmp_path):
    photos = real_photos.photo_set(SHARED, "*.jpg", cache=ROOT_CACHE)
    assert photos.n_images == 100 and len(photos.faces) >= 200 and all(f.reference == "dlib" for f in photos.faces)


ROOT_CACHE = Path(__file__).resolve().parents[1] / "data" / "cache" / "photo_refs"
