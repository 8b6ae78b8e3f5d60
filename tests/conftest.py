"""Shared fixtures: a throwaway copy of this repository on the tiny preset, with its own git, DVC and MLflow store."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The suite runs on 2 pytest-xdist workers (``addopts`` in pyproject.toml), one core each: torch / OpenMP get one
#: thread per test process there (two would make every parallel region wait for a core the other worker holds);
#: two threads when the suite runs in one process (``-n 0``).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = 1 if WORKERS > 1 else 2

# Keys that would differ between two reproductions of the same commit (wall clock, machine load, MLflow ids, the CPU):
# they belong in timings/<stage>.json, benchmark files and MLflow, never in a DVC metrics or plots file.
VOLATILE = re.compile(r"(seconds|per_s\b|_per_s|per_cpu|ms_per|_ms\b|speed|time|duration|load|run_id|cpu)", re.I)


def json_keys(obj, prefix: str = ""):
    """Every key of a JSON document, dotted (``"mse.ms_per_face"``), inside lists too."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}{k}"
            yield from json_keys(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for v in obj:
            yield from json_keys(v, prefix)
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # before anything imports torch in this process
#: Tests sharing a session fixture run on one worker, so each such fixture is built once: the groups below, heaviest
#: first (the scheduler hands them out in this order); every other test stays with its module (module fixtures).
SHARED_GROUPS = (("team", {"team_repo", "mlflow_server"}), ("tiny", {"tiny_repo"}))
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
    env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def sh(repo: Path, *cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in the temp repo; on failure show its output."""
    proc = subprocess.run(list(cmd), cwd=repo, env=pipeline_env(repo), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_repo(dest: Path, preset: str | None = "tiny") -> Path:
    """Copy the project into ``dest`` (a fresh git + DVC repo) and apply ``preset``."""
    from facemarks.core.params import apply_preset

    for f in project_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    if preset:
        apply_preset(ROOT / "presets" / f"{preset}.yaml", dest / "params.yaml")
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "init")
    return dest


#: Folders of a reproduced repo whose files are written once and never in place: DVC's content-addressed cache, the
#: MLflow artifact store, and the stage outputs and checkpoints, which the stages replace atomically (a new file
#: renamed over the old). :func:`clone_repo` hard-links their files instead of copying them (DVC's run cache, beside
#: ``files``, is copied).
WRITE_ONCE = (".dvc/cache/files", "mlruns", "checkpoints", "models", "exports")


def clone_repo(src: Path, dest: Path) -> Path:
    """A working copy of the reproduced repo ``src`` at ``dest`` for one test to change: every file copied, except
    those under :data:`WRITE_ONCE`, which are hard-linked (a tiny repo after a few experiments holds 2 GB of weights,
    ONNX files and MLflow artifacts; copied once per test they filled the disk of a CI runner). A writer there
    replaces the link, so ``src`` keeps its bytes: :func:`tiny_repo` checks its cache (:func:`corrupt_cache_objects`)
    after the last test that cloned it."""
    def copy(s: str, d: str) -> str:
        rel = Path(s).relative_to(src).as_posix()
        if any(rel.startswith(f"{top}/") for top in WRITE_ONCE):
            os.link(s, d)
            return d
        return shutil.copy2(s, d)

    shutil.copytree(src, dest, symlinks=True, copy_function=copy)
    return dest


def xdist_group(item: pytest.Item) -> str:
    """The work unit of ``item`` for ``--dist loadgroup``: the first of :data:`SHARED_GROUPS` whose fixtures it uses
    (directly or through another fixture), else its module."""
    used = set(getattr(item, "fixturenames", ()))
    return next((name for name, fixtures in SHARED_GROUPS if used & fixtures), item.nodeid.split("::")[0])


def pytest_itemcollected(item):
    """Mark every test with its :func:`xdist_group` as it is collected, before any ``collection_modifyitems`` hook
    (xdist's turns the mark into the work unit there)."""
    item.add_marker(pytest.mark.xdist_group(xdist_group(item)))


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which renames each test to ``<id>@<group>``
def pytest_collection_modifyitems(config, items):
    """Put the shared groups first, in :data:`SHARED_GROUPS` order (the longest units start first; the order of the
    tests within a module is kept). On an xdist worker, stop at once when xdist's rename did not take (it did not
    under pytest 9): the groups would be ignored and a shared fixture built, and a module's state split, twice."""
    rank = {name: i for i, (name, _) in enumerate(SHARED_GROUPS)}
    items.sort(key=lambda item: rank.get(item.get_closest_marker("xdist_group").args[0], len(rank)))
    if getattr(config.option, "loadgroup", False):
        lost = [item.nodeid for item in items if "@" not in item.nodeid.rpartition("]")[2]]
        if lost:
            raise pytest.UsageError(f"pytest-xdist --dist loadgroup did not group {len(lost)} tests (e.g. {lost[0]}): "
                                    "this pytest version keeps test ids where xdist cannot rename them")


@pytest.fixture(autouse=True)
def _no_mlflow_uri_leaks_between_tests():
    """``mlflow.set_tracking_uri`` (facemarks.core.tracking calls it in-process) sets a process-wide URI *and* the
    ``MLFLOW_TRACKING_URI`` variable, which outlive ``monkeypatch``: restore both after every test, so that one test's
    store never answers for the next (the suite's order must not matter)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # unsets the global URI and the variable
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


DVC = [sys.executable, "-m", "dvc"]


def corrupt_cache_objects(repo: Path) -> list[str]:
    """The objects of ``repo``'s DVC cache whose bytes no longer hash to their name (``files/md5/ab/cdef…``)."""
    bad = []
    for obj in sorted((repo / ".dvc/cache/files/md5").glob("*/*")):
        with open(obj, "rb") as f:
            digest = hashlib.file_digest(f, "md5").hexdigest()
        if digest != obj.parent.name + obj.name.removesuffix(".dir"):
            bad.append(str(obj.relative_to(repo)))
    return bad


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A temp repo on the tiny preset where ``dvc repro`` has run once (shared by the pipeline tests, which change
    only their own :func:`clone_repo`). At the end of the session its cache must still be intact: a clone's
    hard-linked object written in place would show there."""
    repo = make_repo(tmp_path_factory.mktemp("repo"))
    proc = sh(repo, *DVC, "repro")
    (repo / ".first_repro.log").write_text(proc.stdout + proc.stderr)
    shutil.copytree(repo / "metrics", tmp_path_factory.getbasetemp() / "first_metrics")
    yield repo
    bad = corrupt_cache_objects(repo)
    assert not bad, f"tiny_repo's DVC cache changed under its clones: {bad[:5]}"


# ------------------------------------------------------------------------------------------------ a team's setup
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real ``mlflow server`` on a free loopback port (SQLite backend, served artifacts) for the session; its whole
    process group is stopped at the end, also when a test failed."""
    import signal
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers (GenAI jobs): 2 cores are shared
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue


def run_logged(repo: Path, *cmd: str, uri: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """:func:`sh` with the stages logging to the MLflow server at ``uri``."""
    env = pipeline_env(repo)
    env["MLFLOW_TRACKING_URI"] = uri
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n"
                             f"--- stderr\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def team_repo(tmp_path_factory, mlflow_server) -> Path:
    """A second tiny-preset repo where ``dvc repro`` ran once, logging to :func:`mlflow_server`, committed as a
    colleague would. It is also the second reproduction that the determinism test compares with ``tiny_repo``."""
    repo = make_repo(tmp_path_factory.mktemp("team"))
    run_logged(repo, *DVC, "repro", uri=mlflow_server)
    run_logged(repo, "git", "add", "-A", uri=mlflow_server)
    run_logged(repo, "git", "commit", "-qm", "tiny reproduction", uri=mlflow_server)
    return repo
