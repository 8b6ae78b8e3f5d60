"""Interruptions: a stage killed at any moment leaves either no output or a complete one, never a half-written one.

Each stage is run once to completion for a reference, then killed with SIGKILL at several points of its run,
with and without a previous output in place. After every kill the output is absent or byte-identical to the
reference (the stages are deterministic), and a rerun completes and clears the killed run's temporaries.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_repo, pipeline_env, sh

pytestmark = pytest.mark.slow

# (stage script, its output) in pipeline order; each needs the previous one's output.
STAGES = [("download", "data/raw"), ("augment", "data/augmented"), ("encode", "data/heatmaps")]
KILL_AT = (0.15, 0.4, 0.65, 0.9)  # fractions of the stage's uninterrupted wall time


def run_stage(repo: Path, name: str) -> float:
    start = time.perf_counter()
    sh(repo, sys.executable, f"stages/{name}.py")
    return time.perf_counter() - start


def kill_stage_after(repo: Path, name: str, seconds: float) -> None:
    proc = subprocess.Popen([sys.executable, f"stages/{name}.py"], cwd=repo, env=pipeline_env(repo),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and any worker processes it started
        proc.wait()


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("interrupt"))


@pytest.mark.parametrize("name,out", STAGES)
def test_killed_stage_leaves_no_partial_output(repo, name, out):
    out = repo / out
    elapsed = run_stage(repo, name)
    reference = repo.parent / f"reference_{name}"
    shutil.copytree(out, reference)
    for frac in KILL_AT:
        for previous in (False, True):
            if previous and not out.exists():
                shutil.copytree(reference, out)  # the previous round's kill may have left none
            elif not previous and out.exists():
                shutil.rmtree(out)
            kill_stage_after(repo, name, max(elapsed * frac, 0.05))
            if previous or out.exists():
                assert out.is_dir() and same_tree(out, reference), (
                    f"{name} killed at {frac:.0%} (previous output: {previous}) left a partial {out.name}")
    run_stage(repo, name)
    assert same_tree(out, reference), f"{name}: rerun after the kills differs from the reference"
    assert leftovers(out) == [], f"{name}: temporaries of killed runs were not cleared: {leftovers(out)}"


def _train_metrics(repo: Path) -> tuple[dict, list[str]]:
    import json

    summary = json.loads((repo / "metrics/train_mse.json").read_text())
    summary = {k: v for k, v in summary.items() if k not in ("seconds", "images_per_s", "run_id")}
    rows = (repo / "metrics/train_mse_epochs.csv").read_text().splitlines()
    return summary, [",".join(r.split(",")[:5]) for r in rows]  # without the images/s column


def test_training_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL train@mse during its second epoch, rerun it: same final metrics as an uninterrupted run."""
    from test_train import _stage_repo

    def stage(repo: Path) -> subprocess.Popen:
        env = pipeline_env(repo)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "stages/train.py"),
                                 "--loss", "mse"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    full = _stage_repo(tmp_path / "full", epochs=(2, 1), n_train=64)
    proc = stage(full)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    killed = _stage_repo(tmp_path / "killed", epochs=(2, 1), n_train=64)
    proc = stage(killed)
    checkpoint = killed / "checkpoints/mse/last.pt"
    deadline = time.time() + 600
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the second epoch
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the training finished before it could be killed; use more data"
    assert not (killed / "models/mse/model.pt").exists()

    proc = stage(killed)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    log = proc.stderr.read()
    assert "resuming from" in log and "after epoch 1/3" in log, log[-3000:]  # resumed, not restarted
    assert _train_metrics(killed) == _train_metrics(full)
