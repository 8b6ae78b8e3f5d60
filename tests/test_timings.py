"""Timings side outputs (facemarks.core.timings): written apart from the DVC metrics, merged, split off a report."""
from __future__ import annotations

import json

from facemarks.core.timings import read_timings, split_timings, timings_path, write_timings


def test_write_read_and_merge(tmp_path):
    assert read_timings("train_mse", tmp_path) == {}
    path = write_timings("train_mse", {"seconds": 1.5, "images_per_s": 40.0}, tmp_path)
    assert path == tmp_path / "timings" / "train_mse.json" == timings_path("train_mse", tmp_path)
    write_timings("train_mse", {"seconds": 2.5, "epochs": [{"epoch": 1, "seconds": 2.5}]}, tmp_path)
    assert read_timings("train_mse", tmp_path) == {"seconds": 2.5, "images_per_s": 40.0,
                                                    "epochs": [{"epoch": 1, "seconds": 2.5}]}
    write_timings("train_mse", {"seconds": 3.0}, tmp_path, merge=False)  # a stage's rerun replaces its own file
    assert json.loads(path.read_text()) == {"seconds": 3.0}
    assert [p.name for p in path.parent.iterdir()] == ["train_mse.json"]  # no temporaries left behind


def test_split_moves_nested_keys_and_leaves_the_report_alone():
    report = {"mse": {"nme_io": 5.0, "ms_per_face_b1": 13.0, "dark": {"nme_io": 5.0}},
              "dlib68": {"nme_io": 5.5, "ms_per_face": 3.7}, "winner": "mse", "seconds": 9.0}
    keys = ["mse.ms_per_face_b1", "bce.ms_per_face_b1", "dlib68.ms_per_face", "seconds", "winner.x", "mse.dark.none"]
    quality, timing = split_timings(report, keys)
    assert quality == {"mse": {"nme_io": 5.0, "dark": {"nme_io": 5.0}}, "dlib68": {"nme_io": 5.5}, "winner": "mse"}
    assert timing == {"mse.ms_per_face_b1": 13.0, "dlib68.ms_per_face": 3.7, "seconds": 9.0}
    assert report["mse"]["ms_per_face_b1"] == 13.0 and report["seconds"] == 9.0  # the input is not modified
    quality["mse"]["dark"]["nme_io"] = 0.0
    assert report["mse"]["dark"]["nme_io"] == 5.0  # a deep copy
