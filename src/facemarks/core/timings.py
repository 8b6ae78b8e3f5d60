"""Timings (seconds, images/s, ms per face) kept apart from the quality metrics.

DVC metrics files hold only quantities that a reproduction of the same commit reproduces exactly, so that
``dvc metrics diff`` between two reproductions is empty and ``dvc.lock`` does not change from machine to machine.
Wall-clock numbers go to ``timings/<name>.json`` instead: a side output that neither DVC nor git tracks
(``timings/`` is gitignored), written atomically and merged, so several writers (stages, benchmarks) can share it.
Stages also log the same numbers to their MLflow run.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

from facemarks.core.atomic import atomic_write_json

TIMINGS_DIR = Path("timings")


def timings_path(name: str, root: str | Path | None = None) -> Path:
    """``<root>/timings/<name>.json`` (root: the current directory, which is the repo root for DVC stages)."""
    return (Path(root) if root is not None else Path(".")) / TIMINGS_DIR / f"{name}.json"


def read_timings(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """The timings recorded under ``name``, or ``{}`` when none were written yet."""
    path = timings_path(name, root)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def write_timings(name: str, values: dict[str, Any], root: str | Path | None = None, merge: bool = True) -> Path:
    """Record ``values`` under ``timings/<name>.json`` (merged over what is there unless ``merge`` is false)."""
    current = read_timings(name, root) if merge else {}
    current.update(values)
    path = timings_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, current)
    return path


def split_timings(report: dict[str, Any], keys: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(report without keys, {key: value})``: ``keys`` are dotted paths into nested dicts (``"mse.ms_per_face_b1"``);
    paths that are absent are skipped. ``report`` itself is left unchanged (the first item is a deep copy).

    Stages use it to write the quality part to their DVC metrics file and the wall-clock part with
    :func:`write_timings`.
    """
    kept = copy.deepcopy(report)
    removed: dict[str, Any] = {}
    for key in keys:
        *parents, last = key.split(".")
        node: Any = kept
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            removed[key] = node.pop(last)
    return kept, removed
