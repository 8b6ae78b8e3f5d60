"""MLflow tracking: where the store is, and runs tagged with the pipeline context.

Default store: ``sqlite:///<repo root>/mlflow.db`` (also when DVC runs a stage inside a temporary
experiment workspace under ``.dvc/tmp/exps/``: the root is then the outer repository). The
``MLFLOW_TRACKING_URI`` environment variable overrides it.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterator

from facemarks.params import flatten

STORE_NAME = "mlflow.db"


def numeric_leaves(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of a nested dict as ``{"a.b.c": value}`` (MLflow metrics); bools are left out."""
    return {k: float(v) for k, v in flatten(report, prefix).items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}


def repo_root(start: str | Path | None = None) -> Path:
    """The project root: the outer repository when inside a DVC temporary experiment workspace."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (path, *path.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return path


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / STORE_NAME}"


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit hash, or ``"unknown"`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def context_tags(stage: str) -> dict[str, str]:
    """Tags every run carries: DVC stage, DVC experiment name (when DVC sets one), git commit, and ``study``
    (``base.study``) when it is set."""
    tags = {"dvc.stage": stage, "mlflow.source.git.commit": git_commit(), "git.commit": git_commit()}
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        tags["dvc.exp_name"] = exp
    study = _study_from_params()
    if study:
        tags["study"] = study  # base.study: groups the runs of a seed / budget study (studies/)
    return tags


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_LOGGED_MODEL_CREATION", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    warnings.filterwarnings("ignore", module="mlflow")
    import logging

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def start_run(stage: str, run_name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
              run_id: str | None = None, experiment: str | None = None) -> Iterator[Any]:
    """Open an MLflow run (new, or ``run_id`` to continue one) with context tags and flattened params.

    ``experiment`` defaults to ``base.experiment`` from ``params.yaml`` (or ``"facemarks"``).
    Yields the active ``mlflow.ActiveRun``.
    """
    _quiet_mlflow()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if run_id is None:
        if experiment is None:
            experiment = _experiment_from_params()
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        all_tags = context_tags(stage) if run_id is None else {}
        all_tags.update(tags or {})
        if all_tags:
            mlflow.set_tags(all_tags)
        if params:
            flat = {k: str(v)[:500] for k, v in flatten(params).items()}
            existing = run.data.params
            mlflow.log_params({k: v for k, v in flat.items() if k not in existing})
        yield run


def _experiment_from_params() -> str:
    try:
        from facemarks.params import load_params

        return load_params().base.experiment
    except Exception:
        return "facemarks"


def _study_from_params() -> str:
    """``base.study`` from ``params.yaml`` in the working directory; empty without a readable params file."""
    try:
        from facemarks.params import load_params

        return load_params().base.study
    except Exception:
        return ""
