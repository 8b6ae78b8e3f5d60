"""The `photos` source: dlib's predictor labels a folder of real photos (facemarks.data.teacher), on real images.

The tiny folder: scikit-image's astronaut and matplotlib's Grace Hopper written as JPEG, scikit-image's coffee cup
(no face), and — where ``../shared/real-photos`` is present — a few of its files (those tests skip otherwise).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DVC, clone_repo, make_repo, pipeline_env, sh
from facemarks.data import sources, teacher
from facemarks.core.io import DataError, read_dlib_xml, read_image, write_image
from facemarks.core.params import ParamsError, parse_params

pytest.importorskip("dlib")
from facemarks.evaluation.peers import Dlib68, available  # noqa: E402

if not available():
    pytest.skip("the peers extra (dlib's 68-point model) is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "real-photos"


def _photos(folder: Path) -> Path:
    from skimage import data

    from facemarks.evaluation.real_photos import load_portrait

    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "astronaut.jpg", load_portrait("astronaut"))
    write_image(folder / "grace_hopper.jpg", load_portrait("grace_hopper"))
    write_image(folder / "coffee.jpg", data.coffee())  # a cup: no face
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _photos(tmp_path_factory.mktemp("photos"))


def _data(folder: Path, cache: Path, **photos):
    cfg = {"path": str(folder), "synthetic": 3, "repeat": 3, "test_fraction": 0.34, "cache_dir": str(cache), **photos}
    return parse_params({"data": {"source": "photos", "photos": cfg,
                                  "synthetic": {"n_test": 2, "workers": 1}}}).data


def _seed_with_a_portrait_in_each_split(folder: Path, test_fraction: float) -> int:
    """The first base seed whose split by file puts a portrait (not the cup) in train and in test."""
    from facemarks.core.io import list_images

    for seed in range(100):
        split = teacher.split_by_file(list_images(folder), test_fraction, seed)
        if all(any(p.name != "coffee.jpg" for p in split[s]) for s in ("train", "test")):
            return seed
    raise AssertionError("no seed below 100 splits the portraits")


@pytest.fixture(scope="module")
def fetched(folder, tmp_path_factory):
    """One photos fetch and a rerun on the same cache: ``(raw_dir, first summary, rerun summary, cache dir)``."""
    tmp = tmp_path_factory.mktemp("fetch")
    data = _data(folder, tmp / "cache")
    seed = _seed_with_a_portrait_in_each_split(folder, data.photos.test_fraction)
    first = sources.fetch(data, seed, tmp / "raw")
    xml = {n: (tmp / "raw" / n).read_bytes() for n in ("train.xml", "test.xml", teacher.RECORD)}
    rerun = sources.fetch(data, seed, tmp / "raw")
    rerun["same_bytes"] = all((tmp / "raw" / n).read_bytes() == b for n, b in xml.items())
    return tmp / "raw", first, rerun, tmp / "cache"


def test_every_face_is_labelled_by_dlib_in_its_own_box_and_written_in_the_training_convention(fetched, folder):
    from facemarks.serving.detect import dlib_boxes, map_box

    raw, summary, _, _ = fetched
    record = teacher.read_record(raw)
    model = Dlib68()
    by_source = {rec["source"]: (file, rec) for file, rec in record["images"].items()}
    assert set(by_source) == {"astronaut.jpg", "grace_hopper.jpg"}  # the cup has no face
    xml = {r.file: r for split in ("train", "test") for r in read_dlib_xml(raw / f"{split}.xml")}
    for name, (file, rec) in by_source.items():
        image = read_image(folder / name)
        found = dlib_boxes(image, 1)
        assert len(rec["faces"]) == len(found) >= 1
        assert rec["sha256"] == teacher.file_sha256(folder / name) == teacher.file_sha256(raw / file)
        for face, xml_face, (box, score, comp) in zip(rec["faces"], xml[file].faces, found):
            assert face["teacher"] == teacher.TEACHER and face["detector_box"] == list(box)
            assert face["component"] == comp and face["score"] == pytest.approx(score, abs=1e-6)
            np.testing.assert_allclose(xml_face.box, map_box(box, "hog", comp), atol=1e-3)  # predict's box
            np.testing.assert_array_equal(xml_face.points, model.predict(image, box))  # dlib's points, its own box
    assert summary["teacher"]["n_photos"] == 3 and summary["teacher"]["n_photos_without_faces"] == 1
    assert summary["teacher"]["n_faces_labelled"] == sum(len(r["faces"]) for r in record["images"].values())


def test_mixing_keeps_the_synthetic_faces_and_lists_each_training_photo_repeat_times(fetched):
    raw, summary, _, _ = fetched
    record = teacher.read_record(raw)
    train, test = read_dlib_xml(raw / "train.xml"), read_dlib_xml(raw / "test.xml")
    photo_train = [f for f, r in record["images"].items() if r["split"] == "train"]
    photo_test = [f for f, r in record["images"].items() if r["split"] == "test"]
    assert photo_train and photo_test  # 3 files, test_fraction 0.34: one to test (the cup or a portrait)
    synth_train = [r for r in train if r.file not in record["images"]]
    assert len(synth_train) == 3 and all(r.file.startswith("images/train/") for r in synth_train)  # data.photos.synthetic
    assert [r.file for r in train[:3]] == [r.file for r in synth_train]  # synthetic first, then the photos
    for f in photo_train:
        assert [r.file for r in train].count(f) == 3  # data.photos.repeat
    assert len([r for r in test if r.file not in record["images"]]) == 2  # data.synthetic.n_test
    assert all([r.file for r in test].count(f) == 1 for f in photo_test)
    assert summary["teacher"]["n_photo_train_listings"] == 3 * sum(len(record["images"][f]["faces"]) for f in photo_train)
    assert teacher.teacher_files(raw, "test") == {f: "dlib68" for f in photo_test}
    mask = teacher.teacher_mask(raw, [r.file for r in test for _ in r.faces])  # one entry per test face
    assert mask.tolist() == [r.file in photo_test for r in test for _ in r.faces] and 0 < mask.sum() < len(mask)


def test_a_rerun_reads_the_cache_and_never_calls_dlib(fetched):
    raw, first, rerun, cache = fetched
    n_images = first["teacher"]["n_photos"]
    assert first["run"]["teacher_cache_misses"] == n_images and first["run"]["teacher_predictor_calls"] >= 3
    assert rerun["run"] == {"teacher_detector_calls": 0, "teacher_predictor_calls": 0, "teacher_cache_hits": n_images,
                            "teacher_cache_misses": 0}
    assert rerun["same_bytes"]  # same XML and teacher record from the cache
    assert len(list(cache.glob("*.json"))) == n_images
    # another teacher id (upsample 0) does not take the upsample-1 entries
    other = teacher.Teacher(cache, upsample=0)
    other.label(sorted(raw.glob("images/photos/*/*.jpg"))[0])
    assert other.cache_misses == 1 and other.detector_calls == 1


def test_faces_the_teacher_cannot_label_are_counted_and_skipped(tmp_path):
    from facemarks.serving.detect import dlib_boxes
    from facemarks.evaluation.real_photos import load_portrait

    image = load_portrait("astronaut")
    box = dlib_boxes(image, 1)[0][0]
    cut = np.ascontiguousarray(image[:, int(box[0] + 0.3 * box[2]):])  # the left third of her face cut off
    write_image(tmp_path / "cut.png", cut)  # PNG: the exact pixels
    t = teacher.Teacher(tmp_path / "cache")
    labels = t.label(tmp_path / "cut.png")
    assert t.predictor_calls >= 1 and labels.skipped.get("outside_image", 0) >= 1
    assert all((~_inside(f.points, cut)).sum() <= teacher.MAX_OUTSIDE for f in labels.faces)
    strict = teacher.Teacher(tmp_path / "cache", min_score=5.0).label(tmp_path / "cut.png")
    assert not strict.faces and sum(strict.skipped.values()) == len(labels.faces) + sum(labels.skipped.values())
    assert strict.skipped["below_min_score"] >= 1


def _inside(points, image):
    from facemarks.core.io import in_image

    return in_image(points, image.shape[1], image.shape[0])


def test_split_is_by_file_seeded_by_name_and_identical_files_count_once(folder, tmp_path):
    names = [Path(f"p{i:03d}.jpg") for i in range(40)]
    a = teacher.split_by_file(names, 0.25, 0)
    assert len(a["test"]) == 10 and not set(a["train"]) & set(a["test"])
    assert a == teacher.split_by_file(list(reversed(names)), 0.25, 0)  # order of the listing does not matter
    assert a["test"] != teacher.split_by_file(names, 0.25, 1)["test"]  # the seed does
    b = teacher.split_by_file(names + [Path("zz_new.jpg")], 0.25, 0)  # one more photo moves at most the cut
    assert len(set(a["test"]) ^ set(b["test"])) <= 2
    assert teacher.split_by_file(names, 0.0, 0)["test"] == []
    # the same photo under two names: one entry, never in both splits
    twin = tmp_path / "twins"
    shutil.copytree(folder, twin)
    shutil.copyfile(twin / "astronaut.jpg", twin / "astronaut_copy.jpg")
    summary = sources.fetch(_data(twin, tmp_path / "cache", test_fraction=0.5), 0, tmp_path / "raw")
    record = teacher.read_record(tmp_path / "raw")
    assert summary["teacher"]["n_photos_identical_dropped"] == 1
    hashes = [r["sha256"] for r in record["images"].values()]
    assert len(hashes) == len(set(hashes))


def test_overlap_check_refuses_a_training_photo_by_hash(fetched, folder, tmp_path):
    raw = fetched[0]
    record = teacher.read_record(raw)
    hashes = teacher.training_photo_hashes(raw)
    train_src = [folder / r["source"] for r in record["images"].values() if r["split"] == "train"]
    assert hashes == {teacher.file_sha256(p) for p in train_src}
    renamed = tmp_path / "renamed.jpg"
    shutil.copyfile(train_src[0], renamed)  # a renamed copy is still the same photo
    with pytest.raises(DataError) as err:
        teacher.check_no_overlap([folder / "coffee.jpg", renamed], hashes)
    assert "evaluate.photos" in str(err.value) and "\n" not in str(err.value) and "renamed.jpg" in str(err.value)
    other = tmp_path / "other.png"
    write_image(other, read_image(train_src[0])[::2, ::2])  # a different file is no overlap
    teacher.check_no_overlap([other], hashes)
    assert teacher.training_photo_hashes(tmp_path) == set()  # no teacher record: nothing to refuse


def test_bad_folders_and_a_missing_peers_extra_fail_first_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    for path, words in ((empty, "no image files"), (tmp_path / "missing", "not a folder")):
        with pytest.raises(DataError) as err:
            sources.fetch(_data(path, tmp_path / "cache"), 0, tmp_path / "raw")
        assert str(err.value).startswith("data.photos.path") and words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(ParamsError, match="^data.photos.path is empty"):
        parse_params({"data": {"source": "photos"}})
    with pytest.raises(ParamsError, match="data.photos.repeat"):
        parse_params({"data": {"photos": {"repeat": 0}}})
    # without dlib (the peers extra): an import of dlib fails in this subprocess
    folder = _photos(tmp_path / "photos")
    code = ("import sys; sys.modules['dlib'] = None\n"
            "from pathlib import Path\nfrom facemarks.data import sources\nfrom facemarks.core.params import parse_params\n"
            f"d = parse_params({{'data': {{'source': 'photos', 'photos': {{'path': {str(folder)!r}, "
            f"'cache_dir': {str(tmp_path / 'cache')!r}}}}}}}).data\n"
            f"sources.fetch(d, 0, Path({str(tmp_path / 'raw')!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.source = photos" in last and "dlib" in last
    assert not (tmp_path / "raw").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/real-photos is absent")
def test_real_photos_with_several_faces_and_none(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    names = ("faceapi_bbt3.jpg", "deca_image00181.jpg", "deepface_img15.jpg")
    for name in names:
        if not (SHARED / name).is_file():
            pytest.skip(f"{name} not in ../shared/real-photos")
        shutil.copyfile(SHARED / name, folder / name)
    summary = sources.fetch(_data(folder, tmp_path / "cache", test_fraction=0.0), 0, tmp_path / "raw")
    record = teacher.read_record(tmp_path / "raw")
    faces = {r["source"]: len(r["faces"]) for r in record["images"].values()}
    assert faces.get("faceapi_bbt3.jpg", 0) >= 3 and "deca_image00181.jpg" not in faces  # a group photo; no face found
    assert summary["teacher"]["n_photos_train"] == 3 and summary["teacher"]["n_photos_test"] == 0
    assert summary["teacher"]["n_photos_without_faces"] == 1


@pytest.mark.slow
def test_download_stage_with_the_photos_source(folder, tmp_path):
    repo = make_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="photos", photos={"path": str(folder), "synthetic": 4, "repeat": 2,
                                                   "test_fraction": 0.34})
    params["data"]["synthetic"].update(n_test=3, workers=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = pipeline_env(repo)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "stages/download.py"], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((json.loads((repo / "metrics/download.json").read_text()),
                     json.loads((repo / "timings/download.json").read_text()),
                     json.loads((repo / "metrics/realism.json").read_text())))
    (m1, t1, r1), (m2, t2, r2) = runs
    assert m1 == m2 and "run" not in m1 and m1["source"] == "photos"  # run facts stay out of the DVC metrics
    assert t1["teacher_cache_misses"] == 3 and t2["teacher_cache_hits"] == 3 and t2["teacher_predictor_calls"] == 0
    assert len(list((repo / "data/cache/teacher").glob("*.json"))) == 3
    assert r1 == r2 and r1["n_faces"] == 3  # dlib's realism check scores the synthetic test faces, not its own labels
    assert (repo / "data/raw" / teacher.RECORD).is_file()


def test_exp_run_with_the_photos_source_labels_mixes_trains_and_evaluates(folder, tiny_repo, tmp_path):
    """What a user types: `dvc exp run -S data.source=photos -S data.photos.path=<folder>` on the tiny preset labels
    the photos, mixes them with the synthetic faces, trains both losses and evaluates, the test faces from the photos
    counted as teacher-scored; pointing `evaluate.photos` at the training photos is then refused by image hash."""
    repo = tmp_path / "photos-exp"
    clone_repo(tiny_repo, repo)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny reproduction", check=False)
    seed = _seed_with_a_portrait_in_each_split(folder, 0.34)
    proc = sh(repo, *DVC, "exp", "run", "-n", "own-photos", "-S", "data.source=photos",
              "-S", f"data.photos.path={folder}", "-S", "data.photos.test_fraction=0.34",
              "-S", f"base.seed={seed}", "-S", "data.photos.synthetic=6", "-S", "data.photos.repeat=2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    download = json.loads((repo / "metrics/download.json").read_text())
    assert download["source"] == "photos" and download["teacher"]["n_faces_labelled"] >= 2
    record = json.loads((repo / "data/raw" / teacher.RECORD).read_text())
    assert {e["split"] for e in record["images"].values()} == {"train", "test"}
    assert {f["teacher"] for e in record["images"].values() for f in e["faces"]} == {"dlib68"}
    train = read_dlib_xml(repo / "data/raw/train.xml")
    photo_items = [item for item in train if item.file.startswith("images/photos/")]
    assert len(train) - len(photo_items) == 6 and photo_items and len(photo_items) % 2 == 0  # repeat 2
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert ev["test_reference"]["teacher"] >= 1 and ev["mse"]["nme_io"] > 0 and ev["bce"]["nme_io"] > 0
    # the real-photo evaluation must not contain a training photo: refused before any work, one line naming the key
    proc = sh(repo, *DVC, "exp", "run", "-n", "cheat", "-S", f"evaluate.photos={folder}", check=False)
    assert proc.returncode != 0 and "evaluate.photos" in proc.stdout + proc.stderr
