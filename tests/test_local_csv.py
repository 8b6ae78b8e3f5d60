"""The keypoints-CSV layout of the ``local`` source, person-group splits in download and augment, the box rule."""
from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DVC, clone_repo, sh
from facemarks.core import landmarks
from facemarks.data import groups, local, sources
from facemarks.augmentation.augment import run_augment
from facemarks.core.io import DataError, read_dlib_xml, write_image
from facemarks.core.params import Augment, Data, Local, ParamsError, compile_rule, load_params

REAL_FACES = Path(__file__).resolve().parents[2] / "shared" / "real-faces"
PERSON = r"^(.+)_\d+$"


def face_points(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """68 whole-pixel points on a jittered spiral inside a ``w`` x ``h`` image: (68, 2), all inside it."""
    angles = np.linspace(0, 4 * np.pi, 68, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.linspace(0.4, 1.0, 68)[:, None]
    return np.round(np.array([w / 2, h / 2]) + ring * min(w, h) * 0.3 + rng.uniform(-1, 1, (68, 2)))


def write_csv_folder(folder: Path, people: int = 6, frames: int = 3, header: bool = True, sub: str = "training",
                     seed: int = 0) -> dict[str, np.ndarray]:
    """``people`` x ``frames`` images ``<Person_k>_<frame>.jpg`` under ``folder/sub`` and ``folder/keypoints.csv``
    naming them (bare file names, as the course set does); returns file name → points (68, 2)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for p in range(people):
        for f in range(frames):
            name = f"Person_{p}_{f:02d}.jpg"
            write_image(folder / sub / name, rng.integers(0, 255, (60, 50), dtype=np.uint8))
            pts = face_points(rng, 50, 60)
            truth[name] = pts
            rows.append([name] + [f"{v:.1f}" for v in pts.reshape(-1)])
    with open(folder / "keypoints.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow([""] + [str(i) for i in range(136)])
        w.writerows(rows)
    return truth


def data(path: Path, on_bad: str = "error", **kw) -> Data:
    return Data(source="local", on_bad=on_bad, local=Local(path=str(path), **kw))


@pytest.mark.parametrize("header", [True, False])
def test_csv_rows_are_read_with_or_without_header_and_points_kept(tmp_path, header):
    truth = write_csv_folder(tmp_path / "src", header=header)
    summary = sources.fetch(data(tmp_path / "src", test_fraction=0.34), 0, tmp_path / "raw")
    assert summary["n_train_faces"] + summary["n_test_faces"] == len(truth)
    assert summary["n_skipped"] == 0
    for split in ("train", "test"):
        for rec in read_dlib_xml(tmp_path / "raw" / f"{split}.xml"):
            assert (tmp_path / "raw" / rec.file).is_file()
            np.testing.assert_allclose(rec.faces[0].points, truth[Path(rec.file).name], atol=1e-3)


def bad_row(case: str, row: list[str]) -> list[str]:
    if case == "wrong_column_count":
        return row[:-2]
    if case == "not_a_number":
        return row[:5] + ["abc"] + row[6:]
    if case == "missing_image":
        return ["Nobody_01.jpg"] + row[1:]
    raise ValueError(case)


@pytest.mark.parametrize("case", ["wrong_column_count", "not_a_number", "missing_image"])
def test_a_bad_csv_row_is_one_line_naming_file_and_row_or_skipped_and_counted(tmp_path, case):
    write_csv_folder(tmp_path / "src", header=True)
    path = tmp_path / "src" / "keypoints.csv"
    rows = list(csv.reader(open(path, newline="")))
    rows[3] = bad_row(case, rows[3])  # spreadsheet row 4
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(DataError) as err:
        sources.fetch(data(tmp_path / "src"), 0, tmp_path / "raw")
    message = str(err.value)
    assert "keypoints.csv" in message and "row 4" in message and "\n" not in message
    assert not (tmp_path / "raw").exists()  # nothing half-written
    summary = sources.fetch(data(tmp_path / "src", on_bad="skip"), 0, tmp_path / "raw")
    assert summary["skipped"] == {case: 1}
    assert summary["n_train_faces"] + summary["n_test_faces"] == 6 * 3 - 1


def test_download_and_augment_keep_every_person_on_one_side(tmp_path):
    write_csv_folder(tmp_path / "src", people=10, frames=3)
    summary = sources.fetch(data(tmp_path / "src", test_fraction=0.3, group=PERSON), 4, tmp_path / "raw")
    person = {s: {Path(r.file).stem.rsplit("_", 1)[0] for r in read_dlib_xml(tmp_path / "raw" / f"{s}.xml")}
              for s in ("train", "test")}
    assert person["train"] and person["test"] and not person["train"] & person["test"]
    assert summary["groups"] == {"rule": PERSON, "train": len(person["train"]), "test": len(person["test"]),
                                 "overlap": 0}
    table = json.loads((tmp_path / "raw" / groups.GROUPS_FILE).read_text())["groups"]
    assert set(table.values()) == person["train"] | person["test"]

    out = run_augment(tmp_path / "raw", tmp_path / "aug", Augment(size=32, copies=1, val_fraction=0.3, workers=1), 4)
    assert out["groups"]["overlap"] == 0 and out["groups"]["val"] >= 1 and out["groups"]["train"] >= 1
    meta = {s: json.loads((tmp_path / "aug" / s / "meta.json").read_text()) for s in ("train", "val")}
    seen = {s: {table[f] for f in meta[s]["files"]} for s in meta}
    assert seen["val"] and not seen["train"] & seen["val"]
    assert out["counts"]["val"] == 3 * len(seen["val"])  # every frame of a validation person, crop only


def test_without_a_rule_every_file_is_its_own_group(tmp_path):
    write_csv_folder(tmp_path / "src", people=4, frames=3)
    summary = sources.fetch(data(tmp_path / "src", test_fraction=0.25), 0, tmp_path / "raw")
    assert summary["groups"]["rule"] == "file" and summary["groups"]["overlap"] == 0
    assert summary["groups"]["train"] + summary["groups"]["test"] == 12
    assert not (tmp_path / "raw" / groups.GROUPS_FILE).exists()


def test_group_split_takes_whole_groups_and_matches_the_per_image_split():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    names = [f"p{i // 4}" for i in range(40)]
    held = groups.group_split(names, 0.25, rng())
    held_groups = {names[i] for i in held}
    assert all(names[i] not in held_groups for i in set(range(40)) - set(held.tolist()))
    assert 10 <= len(held) < 14
    singles = [str(i) for i in range(40)]
    np.testing.assert_array_equal(groups.group_split(singles, 0.25, rng()), np.sort(rng().permutation(40)[:10]))
    assert groups.group_split(["a"] * 5, 0.5, rng()).size == 0  # one group: nothing can be held out


def test_a_file_outside_the_rule_and_a_rule_without_group_are_refused(tmp_path):
    write_csv_folder(tmp_path / "src", people=2, frames=2)
    with pytest.raises(DataError, match="data.local.group"):
        sources.fetch(data(tmp_path / "src", group=r"^(\d+)$"), 0, tmp_path / "raw")
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  local:\n    group: '^.+_\\d+$'\n")
    with pytest.raises(ParamsError, match="data.local.group"):
        load_params(params)


def test_points_only_faces_get_the_training_box_rule_or_the_tight_box():
    pts = face_points(np.random.default_rng(1), 200, 240)
    assert local.points_box(pts) == landmarks.face_box(pts)
    left, top, w, h = local.points_box(pts, "tight")
    assert (left, top) == (pts[:, 0].min(), pts[:, 1].min()) and (w, h) == tuple(np.ptp(pts, axis=0) + 1)


@pytest.mark.skipif(not REAL_FACES.is_dir(), reason="../shared/real-faces is not beside the repository")
def test_the_shared_real_faces_read_whole_and_split_by_person(tmp_path):
    skipped: collections.Counter = collections.Counter()
    items = local.read_keypoints_csv(REAL_FACES / "training_frames_keypoints.csv", "error", skipped)
    assert len(items) == 3452 and not skipped
    split = local.seeded_split(items, 0.2, 0, compile_rule(PERSON))
    people = {s: {groups.group_of(p.name, compile_rule(PERSON)) for p, _ in split[s]} for s in split}
    assert not people["train"] & people["test"] and 0.15 < len(split["test"]) / 3452 < 0.25


@pytest.mark.slow  # a dvc exp run of the tiny preset: download, augment, encode, both trainings, export, evaluate
def test_exp_run_on_a_csv_folder_splits_by_person_trains_and_evaluates(tiny_repo, tmp_path):
    """What a user types: `dvc exp run -S data.source=local -S data.local.path=<folder> -S data.local.group=...`."""
    folder = tmp_path / "faces"
    write_csv_folder(folder, people=10, frames=3)
    repo = tmp_path / "csv-exp"
    clone_repo(tiny_repo, repo)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny reproduction", check=False)
    proc = sh(repo, *DVC, "exp", "run", "-n", "csv-faces", "-S", "data.source=local",
              "-S", f"data.local.path={folder}", "-S", f"data.local.group='{PERSON}'", "-S", "data.local.test_fraction=0.3",
              "-S", "augment.val_fraction=0.3")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    download = json.loads((repo / "metrics/download.json").read_text())
    augmented = json.loads((repo / "metrics/augment.json").read_text())
    assert download["source"] == "local" and download["groups"]["overlap"] == 0 and download["groups"]["test"] >= 1
    assert augmented["groups"]["rule"] == "groups.json" and augmented["groups"]["overlap"] == 0
    assert augmented["groups"]["val"] >= 1
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert ev["mse"]["nme_io"] > 0 and ev["bce"]["nme_io"] > 0
