"""The `download` stage script end to end in a temporary copy of the repo: outputs, MLflow run, bad local data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_repo, pipeline_env
from facemarks.core.io import Face, ImageRecord, read_dlib_xml, write_dlib_xml, write_image

pytestmark = pytest.mark.slow  # two stage subprocesses + a fresh MLflow store: about a minute on 2 cores


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("download-stage"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow SQLite store for the module (creating one runs its migrations: seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def run_stage(repo: Path, store: Path) -> subprocess.CompletedProcess:
    env = pipeline_env(repo)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    return subprocess.run([sys.executable, "stages/download.py"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)


def set_data(repo: Path, **data) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(data)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def local_folder(folder: Path, n: int = 6) -> None:
    rng = np.random.default_rng(3)
    records = []
    for i in range(n):
        write_image(folder / f"f{i}.png", rng.integers(0, 255, (50, 60), dtype=np.uint8))
        t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        pts = np.round(np.stack([30 + 15 * np.cos(t), 25 + 12 * np.sin(t)], axis=1))
        records.append(ImageRecord(file=f"f{i}.png", faces=[Face(box=(12.0, 10.0, 36.0, 30.0), points=pts)]))
    write_dlib_xml(folder / "labels.xml", records)


def test_synthetic_stage_writes_outputs_and_logs_to_mlflow(repo, store):
    proc = run_stage(repo, store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((repo / "metrics" / "download.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())["data"]["synthetic"]
    assert summary["source"] == "synthetic"
    assert (summary["n_train_images"], summary["n_test_images"]) == (params["n_train"], params["n_test"])
    assert len(read_dlib_xml(repo / "data" / "raw" / "test.xml")) == params["n_test"]
    assert (repo / "reports" / "download_contact_sheet.png").stat().st_size > 1000
    realism = json.loads((repo / "metrics" / "realism.json").read_text())
    assert realism and ("skipped" in realism or all(isinstance(v, (int, float, str)) for v in realism.values()))

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=["facemarks"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["dvc.stage"] == "download" and run.data.params["data.source"] == "synthetic"
    assert run.data.metrics["n_train_images"] == params["n_train"]


def test_local_stage_skips_or_stops_on_a_bad_image(repo, store, tmp_path):
    src = tmp_path / "faces"
    local_folder(src)
    (src / "f2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    set_data(repo, source="local", on_bad="error", local={"path": str(src), "test_fraction": 0.3})
    proc = run_stage(repo, store)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("facemarks:")]
    assert proc.returncode == 1 and len(lines) == 1 and "f2.png" in lines[0] and "on_bad" in lines[0], proc.stderr

    set_data(repo, on_bad="skip")
    proc = run_stage(repo, store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((repo / "metrics" / "download.json").read_text())
    assert summary["skipped"] == {"bad_image": 1}
    assert summary["n_train_images"] + summary["n_test_images"] == 5
    assert "f2.png" in proc.stderr  # the warning line names the skipped file
    files = [r.file for r in read_dlib_xml(repo / "data" / "raw" / "train.xml")]
    assert all((repo / "data" / "raw" / f).is_file() for f in files)  # self-contained copies
