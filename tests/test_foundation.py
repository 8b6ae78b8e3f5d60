"""Atomic writes, split folders, landmark tables and MLflow store location."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facemarks.core import atomic, landmarks, store, tracking


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    atomic.atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir_replaces_whole_or_nothing(tmp_path):
    d = tmp_path / "split"
    with atomic.atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic.atomic_dir(d) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]
    with atomic.atomic_dir(d) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def _arrays(n=3, s=8):
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 255, (n, s, s), dtype=np.uint8),
        "points": rng.random((n, 68, 2), dtype=np.float32) * s,
        "visible": np.ones((n, 68), bool),
        "transform": np.tile(np.eye(3), (n, 1, 1)),
        "orig_points": rng.random((n, 68, 2)) * 100,
        "boxes": rng.random((n, 4)) * 50,
    }


def test_npz_bytes_do_not_depend_on_the_clock_and_load_back(tmp_path):
    import time

    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, 2], np.int64)}
    atomic.save_npz_stable(tmp_path / "one.npz", arrays)
    time.sleep(2.1)  # zip timestamps have a 2 s resolution: np.savez files written now would differ
    atomic.save_npz_stable(tmp_path / "two.npz", dict(reversed(arrays.items())))
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    with np.load(tmp_path / "one.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["a", "b"]
        np.testing.assert_array_equal(f["b"], arrays["b"])
        assert f["a"].dtype == np.int64


def test_split_round_trip_is_memory_mapped(tmp_path):
    arrays = _arrays()
    store.write_split(tmp_path / "train", arrays, {"size": 8, "files": ["a", "b", "c"]})
    split = store.read_split(tmp_path / "train")
    assert len(split) == 3 and split.meta["size"] == 8
    assert isinstance(split.images, np.memmap)
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(split, key), value)


def test_split_rejects_inconsistent_arrays(tmp_path):
    arrays = _arrays()
    arrays["boxes"] = arrays["boxes"][:2]
    with pytest.raises(ValueError, match="disagree"):
        store.write_split(tmp_path / "x", arrays, {})
    assert not (tmp_path / "x").exists()


def test_mirror_is_an_involution_swapping_sides():
    m = landmarks.MIRROR
    np.testing.assert_array_equal(m[m], np.arange(68))
    assert m[36] == 45 and m[0] == 16 and m[8] == 8 and m[30] == 30 and m[62] == 62 and m[65] == 67
    assert sorted(m) == list(range(68))


def test_normalisers():
    pts = np.zeros((68, 2))
    pts[36] = (10, 0)
    pts[45] = (40, 0)
    assert landmarks.inter_ocular(pts) == 30
    pts[36:42] = (10, 5)
    pts[42:48] = (50, 5)
    assert landmarks.inter_pupil(pts) == 40


def test_tracking_root_inside_dvc_temp_workspace(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    ws = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    ws.mkdir(parents=True)
    (ws / "dvc.yaml").write_text("stages: {}\n")
    assert tracking.repo_root(ws) == tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ws)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_uri() == "sqlite:///elsewhere.db"


def test_tracking_run_has_tags_and_params(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("DVC_EXP_NAME", "probe")
    with tracking.start_run("encode", "encode", params={"encode": {"sigma": 1.5}}, experiment="t") as run:
        mlflow.log_metric("x", 2.0)
    got = mlflow.MlflowClient().get_run(run.info.run_id)
    assert got.data.params == {"encode.sigma": "1.5"}
    assert got.data.tags["dvc.stage"] == "encode" and got.data.tags["dvc.exp_name"] == "probe"
    assert got.data.metrics == {"x": 2.0}


def test_dlib_xml_round_trip(tmp_path):
    from facemarks.core.io import Face, ImageRecord, read_dlib_xml, write_dlib_xml

    rng = np.random.default_rng(0)
    pts = rng.uniform(-20, 300, (68, 2)).round(3)
    pts[5] = np.nan  # unlabelled part: omitted on write, NaN on read
    records = [ImageRecord("helen/a b&c'd.jpg", [Face((-12.0, 30.0, 150.0, 151.0), pts)]),
               ImageRecord("two_faces.png", [Face((1.0, 2.0, 3.0, 4.0), np.arange(136.0).reshape(68, 2)),
                                             Face((10.5, 20.25, 30.0, 40.0), pts[::-1].copy())])]
    write_dlib_xml(tmp_path / "l.xml", records)
    back = read_dlib_xml(tmp_path / "l.xml")
    assert [r.file for r in back] == [r.file for r in records]
    for rec, got in zip(records, back):
        assert len(got.faces) == len(rec.faces)
        for f, g in zip(rec.faces, got.faces):
            assert tuple(g.box) == pytest.approx(f.box)
            np.testing.assert_allclose(g.points, f.points, atol=5e-4, equal_nan=True)


def test_pts_round_trip_is_one_indexed_on_disk(tmp_path):
    from facemarks.core.io import read_pts, write_pts

    pts = np.random.default_rng(1).uniform(0, 500, (68, 2)).round(3)
    write_pts(tmp_path / "a.pts", pts)
    text = (tmp_path / "a.pts").read_text()
    assert text.startswith("version: 1\nn_points:  68\n{\n") and text.rstrip().endswith("}")
    first = [float(v) for v in text.splitlines()[3].split()]
    assert first == pytest.approx(pts[0] + 1.0)  # MATLAB 1-indexed on disk
    np.testing.assert_allclose(read_pts(tmp_path / "a.pts"), pts, atol=1e-9)
