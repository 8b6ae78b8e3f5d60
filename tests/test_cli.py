"""facemarks.cli, facemarks.serving.predict and facemarks.evaluation.testset on real inputs: the astronaut photo through the cascade
and a real (untrained, seeded) HeatmapNet, the no-face exit, `compare` on a real sqlite MLflow store, `preset`, `ui`,
train-run lookup."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facemarks import cli
from facemarks.serving.detect import detect
from facemarks.serving.predict import predict_image
from facemarks.core.io import box_iou
from facemarks.training.model import build_model

ROOT = Path(__file__).resolve().parents[1]
# dlib's HOG detector box on scikit-image's astronaut photo, and the centre of dlib's 68 points inside it
# (points span x 179-272, y 87-178): measured once with facemarks.evaluation.peers.Dlib68.
ASTRONAUT_FACE = (175.0, 76.0, 91.0, 91.0)
ASTRONAUT_CENTRE = (225.0, 132.0)
SIZE = 64


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(build_model(head_width=8).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real sqlite MLflow store for the module (creating its tables takes seconds); tests use own experiments."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def test_cascade_finds_the_astronaut_face():
    from skimage.data import astronaut

    boxes = [d.box for d in detect(astronaut(), "cascade")]
    assert len(boxes) == 1
    left, top, w, h = boxes[0]
    assert box_iou(boxes[0], ASTRONAUT_FACE) > 0.8
    assert left < ASTRONAUT_CENTRE[0] < left + w and top < ASTRONAUT_CENTRE[1] < top + h
    assert detect(np.full((200, 200), 128, np.uint8), "cascade") == []


def test_predict_image_returns_68_points_around_the_face(model_file):
    from skimage.data import astronaut

    from facemarks.training.model import load_model

    faces = predict_image(load_model(model_file), astronaut(), "bce", size=SIZE, margin=0.25, sigma=1.5,
                          detector="cascade")
    assert len(faces) == 1 and faces[0]["detector"] == "cascade" and faces[0]["score"] is None
    pts, box = faces[0]["points"], faces[0]["box"]
    assert pts.shape == (68, 2) and np.isfinite(pts).all()
    assert faces[0]["confidence"].shape == (68,)
    left, top, w, h = box
    pad = 0.25 * w + 1  # the crop: box plus margin on every side
    assert (pts[:, 0] > left - pad).all() and (pts[:, 0] < left + w + pad).all()
    assert (pts[:, 1] > top - pad).all() and (pts[:, 1] < top + h + pad).all()
    given = predict_image(load_model(model_file), astronaut(), "bce", box=ASTRONAUT_FACE, size=SIZE)
    assert given[0]["box"] == list(ASTRONAUT_FACE) and given[0]["detector"] == "given"


def test_cli_predict_astronaut_writes_json_and_overlay(tmp_path, model_file, capsys):
    out = tmp_path / "out"
    rc = cli.main(["predict", "--astronaut", "--model", str(model_file), "--loss", "mse", "--size", str(SIZE),
                   "--out", str(out), "--params", str(tmp_path / "absent.yaml")])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "astronaut.json").read_text())
    assert doc["loss"] == "mse" and doc["model_choice"] == "--model and --loss given" and len(doc["faces"]) >= 1
    assert max(box_iou(f["box"], ASTRONAUT_FACE) for f in doc["faces"]) > 0.7  # the astronaut's face is found
    assert doc["detector"] == "auto" and all(f["detector"] == "hog" and f["rotation"] == 0 for f in doc["faces"])
    for f in doc["faces"]:  # each face carries the model's landmark confidence: the mean of its 68 point confidences
        assert np.isclose(f["landmark_confidence"], np.mean(f["confidence"]), atol=1e-4)
    rank = [np.sqrt(f["box"][2] * f["box"][3]) * f["landmark_confidence"] for f in doc["faces"]]
    assert rank == sorted(rank, reverse=True)  # the documented order: box side x landmark confidence
    assert np.asarray(doc["faces"][0]["points"]).shape == (68, 2)
    assert len(doc["faces"][0]["confidence"]) == 68
    import imageio.v3 as iio

    assert iio.imread(out / "astronaut.png").shape[0] > 100


def test_cli_predict_no_face_exits_1_with_a_message(tmp_path, model_file, capsys):
    from facemarks.core.io import write_image

    blank = tmp_path / "blank.png"
    write_image(blank, np.full((120, 160), 200, np.uint8))
    rc = cli.main(["predict", str(blank), "--model", str(model_file), "--loss", "bce", "--size", str(SIZE),
                   "--out", str(tmp_path)])
    assert rc == 1
    assert "blank.png: no face found" in capsys.readouterr().err
    assert cli.main(["predict", str(blank), "--model", str(tmp_path / "missing.pt"), "--loss", "mse"]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["predict", str(blank), "--box", "1,2,3"])


def test_cli_predict_box_with_negative_coordinates(tmp_path, model_file, capsys):
    """``--box -3,50,200,200`` (a box starting left of the image) is taken as the box, not as an option; so is a
    negative value of the other numeric options (``--size``, ``--port``) is joined to its option the same way."""
    out = tmp_path / "out"
    rc = cli.main(["predict", "--astronaut", "--box", "-3,50,200,200", "--model", str(model_file), "--loss", "mse",
                   "--size", str(SIZE), "--out", str(out), "--no-overlay", "--params", str(tmp_path / "absent.yaml")])
    assert rc == 0, capsys.readouterr().err
    face = json.loads((out / "astronaut.json").read_text())["faces"][0]
    assert face["box"] == [-3.0, 50.0, 200.0, 200.0] and face["detector"] == "given"
    assert np.asarray(face["points"]).shape == (68, 2) and np.isfinite(face["points"]).all()
    assert cli.join_numeric_values(["predict", "x.png", "--box", "-3.5,-2,10,10", "--size", "-64", "--out", "-d"]) == [
        "predict", "x.png", "--box=-3.5,-2,10,10", "--size=-64", "--out", "-d"]
    assert cli.build_parser().parse_args(cli.join_numeric_values(["predict", "--box", "-3,-5,20,20"])).box == (
        -3.0, -5.0, 20.0, 20.0)
    with pytest.raises(SystemExit):  # w, h > 0 is still required
        cli.main(["predict", "x.png", "--box", "-3,50,-200,200"])
    assert "expected x,y,w,h with w, h > 0" in capsys.readouterr().err


def log_run(name: str, loss: str | None, stage: str, metrics: dict, experiment: str = "cmp") -> str:
    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags({"dvc.stage": stage, **({"loss": loss} if loss else {})})
        mlflow.log_metrics(metrics)
    return run.info.run_id


def test_compare_prints_the_table_from_the_store(store, capsys):
    import mlflow

    mlflow.set_tracking_uri(store)
    log_run("mse", "mse", "train@mse", {"test_nme": 9.0, "best_val_nme": 8.0})  # older mse run, superseded
    log_run("mse", "mse", "train@mse", {"test_nme": 6.5, "best_val_nme": 6.0, "test_auc": 0.3})
    log_run("bce", "bce", "train@bce", {"test_nme": 5.25, "best_val_nme": 5.0, "test_auc": 0.4})
    log_run("evaluate", None, "evaluate", {"test_nme": 1.0})
    assert cli.main(["compare", "--experiment", "cmp"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[1:] == ["bce", "mse"]
    nme_row = next(line for line in out.splitlines() if line.startswith("test_nme "))
    assert nme_row.split()[1:] == ["5.2500", "6.5000"]
    assert "lower test_nme in these two runs: bce (one seed each, no interval" in out and "winner" not in out
    assert "no MSE/BCE pairs of evaluated train runs" in out  # these runs carry no evaluate_run tag
    assert cli.main(["compare", "--experiment", "nothing-here"]) == 1


def test_train_run_id_prefers_metrics_file_then_tags(store, tmp_path):
    import mlflow

    from facemarks.evaluation.testset import train_run_id

    mlflow.set_tracking_uri(store)
    old = log_run("bce", "bce", "train@bce", {}, "runs")
    new = log_run("bce", "bce", "train@bce", {}, "runs")
    assert train_run_id("bce", tmp_path, "runs") == new
    (tmp_path / "train_bce.json").write_text(json.dumps({"run_id": old}))
    assert train_run_id("bce", tmp_path, "runs") == old
    (tmp_path / "train_bce.json").write_text(json.dumps({"run_id": "0" * 32}))
    assert train_run_id("bce", tmp_path, "runs") == new
    assert train_run_id("mse", tmp_path, "runs") is None


def test_preset_and_ui(tmp_path, monkeypatch, store, capsys):
    from facemarks.core.params import load_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["preset", "tiny"]) == 0
    assert load_params(tmp_path / "params.yaml").augment.size == 32
    assert "augment.size = 32" in capsys.readouterr().out
    assert cli.main(["preset", "nope"]) == 1
    assert cli.main(["ui"]) == 0
    assert f"mlflow ui --backend-store-uri {store} --host 127.0.0.1" in capsys.readouterr().out


def test_astronaut_summary_comes_from_the_real_photo_protocol(model_file):
    """The astronaut figure's box, reference and NME are her face's row of the real-photo protocol: one number."""
    from facemarks.evaluation import peers, real_photos
    from facemarks.evaluation.testset import astronaut
    from facemarks.training.model import load_model

    if not peers.available():
        pytest.skip(f"the astronaut's reference needs the peers extra: {peers.unavailable_reason()}")
    model = load_model(model_file)
    portraits = real_photos.photo_set(None)
    points = real_photos.predict_faces(model, "bce", portraits, size=SIZE, margin=0.25, sigma=1.5, decoder="subpixel")
    summary, arrays = astronaut(portraits, points, "bce")
    face = portraits.faces[portraits.index("astronaut.png")]
    assert summary["found"] and summary["box"] == list(face.box) and summary["loss"] == "bce"
    assert summary["nme_vs_dlib"] == pytest.approx(real_photos.face_nme(points, portraits.faces)[0])
    np.testing.assert_array_equal(arrays["astro_dlib"], face.points)
    assert arrays["astro_ours"].shape == (68, 2)
    left, top, w, h = summary["box"]
    theirs = arrays["astro_dlib"]
    assert ((theirs >= (left - 0.15 * w, top - 0.15 * h)) & (theirs <= (left + 1.15 * w, top + 1.15 * h))).all()
    empty = real_photos.PhotoSet("", [], {}, 0, [])
    assert astronaut(empty, np.zeros((0, 68, 2)), "bce") == ({"found": False}, {})
