"""Working as a team, each part with the real component started by the tests: an MLflow tracking server on 127.0.0.1
(SQLite backend, served artifacts, Model Registry), a DVC remote in a local folder with a fresh clone, and the DVC
experiment queue. One tiny pipeline run (``team_repo`` in conftest, its stages logging over HTTP to ``mlflow_server``)
serves every case, and the determinism test of test_pipeline.py."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import DVC
from conftest import run_logged as run

pytestmark = pytest.mark.slow

QUEUED = {"q-lr-2e-3": "0.002", "q-lr-5e-3": "0.005"}


@pytest.fixture(scope="module")
def server(mlflow_server) -> str:
    """The session's MLflow server URI (conftest.mlflow_server)."""
    return mlflow_server


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def test_server_holds_the_runs_epochs_artifacts_and_the_champion(server, team_repo, tmp_path, monkeypatch):
    import mlflow
    import torch

    from facemarks.core import tracking

    from facemarks.serving import registry
    from facemarks.training.model import load_model

    client = _client(server)
    exp = client.get_experiment_by_name("facemarks")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = [r for r in client.search_runs([exp.experiment_id]) if "dvc.exp_name" not in r.data.tags]
    by_name = {r.info.run_name: r for r in runs}
    assert {"download", "encode", "mse", "bce", "evaluate"} <= set(by_name), sorted(by_name)
    assert len(runs) == len(by_name)  # one run per stage; the figures went to the evaluate run, not a plot run
    pids = {r.data.tags.get(tracking.PIPELINE_TAG) for r in runs}
    assert len(pids) == 1 and None not in pids, pids  # one reproduction, one pipeline id

    for loss in ("mse", "bce"):
        r = by_name[loss]
        with open(team_repo / f"metrics/train_{loss}_epochs.csv") as f:
            rows = f.read().splitlines()[1:]
        history = client.get_metric_history(r.info.run_id, "val_nme")
        assert [m.step for m in history] == [int(row.split(",")[0]) for row in rows]
        assert [m.value for m in history] == pytest.approx([float(row.split(",")[3]) for row in rows])
        assert {"train_loss", "images_per_s", "train_seconds", "test_nme"} <= set(r.data.metrics)
        assert f"loss_curves_{loss}.png" in {a.path for a in client.list_artifacts(r.info.run_id)}
        assert r.data.tags[tracking.MODEL_HASH_TAG] == tracking.file_md5(team_repo / f"models/{loss}/model.pt")

    ev = by_name["evaluate"]
    figures = {Path(a.path).name for a in client.list_artifacts(ev.info.run_id, "reports/eval")}
    assert {p.name for p in (team_repo / "reports/eval").glob("*.png")} <= figures
    got = mlflow.artifacts.download_artifacts(run_id=ev.info.run_id, artifact_path="reports/eval/regions.png",
                                              dst_path=str(tmp_path), tracking_uri=server)
    assert Path(got).read_bytes() == (team_repo / "reports/eval/regions.png").read_bytes()  # served over HTTP
    assert ev.data.tags[tracking.EVAL_HASH_TAG] == tracking.file_md5(team_repo / "metrics/eval.json")

    report = json.loads((team_repo / "metrics/eval.json").read_text())
    winner = report.get("winner") or "mse"
    version = client.get_model_version_by_alias("facemarks", "champion")
    assert version.run_id == by_name[winner].info.run_id and version.tags["loss"] == winner
    assert version.tags["decoder"] == report[winner]["best_decoder"]
    assert ev.data.tags["registered"] == f"facemarks/{version.version}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    info = mlflow.models.get_model_info("models:/facemarks@champion")
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 32, 32) and info.saved_input_example_info
    loaded = registry.load_registered_model("models:/facemarks@champion")
    assert (loaded.loss, loaded.input_size, loaded.sigma, loaded.decoder) == \
        (winner, 32, 1.0, report[winner]["best_decoder"])
    local = load_model(team_repo / f"models/{winner}/model.pt")
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), local(x))
    # the CLI loads it from the registry, over HTTP
    out = tmp_path / "pred"
    proc = run(team_repo, sys.executable, "-m", "facemarks.cli", "predict", "--model", "models:/facemarks@champion",
               "--astronaut", "--box", "175,76,91,91", "--no-overlay", "--out", str(out), uri=server)
    pred = json.loads((out / "astronaut.json").read_text())
    assert pred["loss"] == winner and pred["model"] == "models:/facemarks@champion", proc.stdout
    assert pred["decoder"] == report[winner]["best_decoder"] and len(pred["faces"][0]["points"]) == 68
    assert f"Model Registry version {version.version}" in pred["model_choice"]


def test_remote_push_then_a_fresh_clone_pulls_without_rerunning(team_repo, server, tmp_path):
    remote = tmp_path / "remote"
    run(team_repo, *DVC, "remote", "add", "-d", "storage", str(remote), uri=server)
    run(team_repo, "git", "commit", "-qm", "storage remote", "--", ".dvc/config", uri=server)
    run(team_repo, *DVC, "push", uri=server)
    pushed = {p.parent.name + p.name for p in (remote / "files" / "md5").rglob("*") if p.is_file()}
    assert tracking_md5(team_repo / "models/mse/model.pt") in pushed
    for ckpt in (team_repo / "checkpoints").rglob("*.pt"):  # resume state: persist-only, never pushed
        assert tracking_md5(ckpt) not in pushed, ckpt

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(team_repo), str(clone), uri=server)
    assert not (clone / "models").exists()
    run(clone, *DVC, "pull", uri=server)
    for path in ("models/mse/model.pt", "models/bce/model.pt", "data/heatmaps/train.npy", "metrics/eval.json"):
        assert (clone / path).read_bytes() == (team_repo / path).read_bytes(), path
    status = json.loads(run(clone, *DVC, "status", "--json", uri=server).stdout or "{}")
    assert status == {}, status  # nothing to rerun: a colleague has models and metrics without retraining


def tracking_md5(path: Path) -> str:
    from facemarks.core.tracking import file_md5

    return file_md5(path)


def _experiments(shown) -> dict[str, dict]:
    """``{experiment name: its data}`` from ``dvc exp show --json`` (a tree of baselines and experiments)."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") in QUEUED and isinstance(node.get("data"), dict):
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return found


def test_queued_experiments_run_and_tag_their_mlflow_runs(team_repo, server):
    for name, lr in QUEUED.items():
        run(team_repo, *DVC, "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", uri=server)
    run(team_repo, *DVC, "queue", "start", uri=server)
    try:
        deadline = time.monotonic() + 900
        while True:
            status = run(team_repo, *DVC, "queue", "status", uri=server).stdout
            if not any(word in status for word in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, f"queue still busy after 900 s:\n{status}"
            time.sleep(3)
    finally:
        run(team_repo, *DVC, "queue", "stop", uri=server, check=False)
    assert status.count("Success") >= len(QUEUED), status

    shown = _experiments(json.loads(run(team_repo, *DVC, "exp", "show", "--json", uri=server).stdout))
    assert set(shown) == set(QUEUED), shown.keys()
    client = _client(server)
    exp = client.get_experiment_by_name("facemarks")
    pids = set()
    for name, lr in QUEUED.items():
        data = shown[name]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == float(lr)
        ev = data["metrics"]["metrics/eval.json"]["data"]
        assert {"mse", "bce"} <= set(ev) and ev["mse"]["nme_io"] > 0
        tagged = client.search_runs([exp.experiment_id], f"tags.`dvc.exp_name` = '{name}'")
        assert {"mse", "bce", "evaluate"} <= {r.info.run_name for r in tagged}, [r.info.run_name for r in tagged]
        assert {r.data.params.get("train.lr") for r in tagged if r.info.run_name in ("mse", "bce")} == {lr}
        pids |= {r.data.tags["facemarks.pipeline_id"] for r in tagged}
        (registered,) = client.search_model_versions(f"name = 'facemarks' and tags.`dvc.exp_name` = '{name}'")
        assert registered.run_id in {r.info.run_id for r in tagged}
    assert len(pids) == len(QUEUED)  # each experiment is its own reproduction
    # experiments register versions, but only a `dvc repro` of the workspace moves the champion
    assert client.get_model_version_by_alias("facemarks", "champion").tags.get("dvc.exp_name") is None
