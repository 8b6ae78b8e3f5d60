"""Shared fixtures: a throwaway copy of this repository on the tiny preset, with its own git, DVC and MLflow store."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore")


def project_files() -> list[str]:
    """Files of the working tree that git tracks or would track (not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    keep = []
    for f in out:
        if not f or not (ROOT / f).is_file():
            continue
        top = f.split("/")[0]
        if top in ("stages", "src", "presets", ".dvc") or f in STAGE_FILES:
            keep.append(f)
    return keep


def pipeline_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT / "src")
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "facemarks-tests"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "tests@facemarks.invalid"
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return env


def sh(repo: Path, *cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in the temp repo; on failure show its output."""
    proc = subprocess.run(list(cmd), cwd=repo, env=pipeline_env(repo), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_repo(dest: Path, preset: str | None = "tiny") -> Path:
    """Copy the project into ``dest`` (a fresh git + DVC repo) and apply ``preset``."""
    from facemarks.params import apply_preset

    for f in project_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    if preset:
        apply_preset(ROOT / "presets" / f"{preset}.yaml", dest / "params.yaml")
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "init")
    return dest


DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A temp repo on the tiny preset where ``dvc repro`` has run once (shared by the pipeline tests)."""
    repo = make_repo(tmp_path_factory.mktemp("repo"))
    proc = sh(repo, *DVC, "repro")
    (repo / ".first_repro.log").write_text(proc.stdout + proc.stderr)
    shutil.copytree(repo / "metrics", tmp_path_factory.getbasetemp() / "first_metrics")
    return repo
