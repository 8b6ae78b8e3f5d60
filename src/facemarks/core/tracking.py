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

from facemarks.core.params import flatten, load_params

STORE_NAME = "mlflow.db"
# What a team sees in the MLflow UI (README "Working as a team"):
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on the training runs
PIPELINE_TAG = "facemarks.pipeline_id"  # shared by the stage runs of one reproduction (:func:`pipeline_id`)
PIPELINE_ENV = "FACEMARKS_PIPELINE_ID"  # set it to force one id (a driver script, a multi-node launch)
MODEL_HASH_TAG = "facemarks.model_md5"  # on a train run: md5 of the model.pt it wrote (finds "the run of this file")
EVAL_HASH_TAG = "facemarks.eval_md5"  # on the evaluate run: md5 of the metrics/eval.json it wrote
_OPENED: dict[str, str] = {}  # run name -> id of the run :func:`start_run` last opened in this process


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
    tags[PIPELINE_TAG] = pipeline_id()
    study = _study_from_params()
    if study:
        tags["study"] = study  # base.study: groups the runs of a seed / budget study (studies/)
    return tags


def quiet_mlflow() -> None:
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
    quiet_mlflow()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if run_id is None:
        if experiment is None:
            experiment = _experiment_from_params()
        exp = mlflow.set_experiment(experiment)
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                mlflow.set_experiment_tag(key, value)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        _OPENED[run_name] = run.info.run_id
        all_tags = context_tags(stage) if run_id is None else {}
        all_tags.update(tags or {})
        if all_tags:
            mlflow.set_tags(all_tags)
        if params:
            flat = {k: str(v)[:500] for k, v in flatten(params).items()}
            existing = run.data.params
            mlflow.log_params({k: v for k, v in flat.items() if k not in existing})
        yield run


def pipeline_id(root: str | Path | None = None) -> str:
    """The id every stage run of one reproduction shares (tag :data:`PIPELINE_TAG`): 12 hex digits of the SHA-256 of
    the git commit (``DVC_EXP_BASELINE_REV`` inside ``dvc exp run``), the DVC experiment name (``DVC_EXP_NAME``, empty
    for ``dvc repro``) and the parsed ``params.yaml`` of ``root`` (default: ``DVC_ROOT``, else the current directory).

    Stages run as separate processes and DVC hands them no id of the invocation, so the id is derived from what
    every stage of one reproduction sees alike; ``$FACEMARKS_PIPELINE_ID`` overrides it. Limits: two ``dvc repro``
    of the same commit and params share the id (they give the same metrics; the runs' start times tell them apart);
    uncommitted code edits do not change it; a stage rerun alone after a params edit gets a new id, while the stages
    DVC skipped keep their runs under the old one.
    """
    forced = os.environ.get(PIPELINE_ENV)
    if forced:
        return forced
    import hashlib
    import json

    import yaml

    base = Path(root or os.environ.get("DVC_ROOT") or os.getcwd())
    try:
        params = yaml.safe_load((base / "params.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        params = None
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(base)
    key = json.dumps([commit, os.environ.get("DVC_EXP_NAME", ""), params], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def opened_run_id(run_name: str) -> str | None:
    """The id of the run named ``run_name`` that :func:`start_run` last opened in this process, or None."""
    return _OPENED.get(run_name)


def file_md5(path: str | Path) -> str:
    """MD5 hex digest of a file's bytes (the hash DVC records in ``dvc.lock``)."""
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_run(tags: dict[str, str], experiment: str | None = None) -> str | None:
    """The latest run (of ``experiment``, default ``base.experiment``) carrying all ``tags``; None when none does."""
    quiet_mlflow()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment or _experiment_from_params())
    if exp is None:
        return None
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _experiment_from_params() -> str:
    try:
        return load_params().base.experiment
    except Exception:
        return "facemarks"


def _study_from_params() -> str:
    """``base.study`` from ``params.yaml`` in the working directory; empty without a readable params file."""
    try:
        return load_params().base.study
    except Exception:
        return ""
