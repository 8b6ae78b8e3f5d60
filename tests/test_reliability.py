"""Reliability guarantees that hold across the code base: fail-fast params in every stage, no pickles, no secrets."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, make_repo, pipeline_env

STAGE_BAD_PARAM = {
    # stage command -> (dotted key, bad value) in the section that stage reads
    "python stages/download.py": ("data.synthetic.n_train", -3),
    "python stages/augment.py": ("augment.rotation", "lots"),
    "python stages/encode.py": ("encode.sigma", 99.0),
    "python stages/train.py --loss mse": ("train.no_such_key", 1),
    "python stages/export.py": ("encode.sigma", 99.0),
    "python stages/evaluate.py": ("evaluate.threshold", 0),
    "python stages/plot.py": ("plot.dpi", 1),
}


def _commands() -> list[str]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    cmds = []
    for stage in dvc["stages"].values():
        if "foreach" in stage:  # `${train.losses}`: the first loss of params.yaml's list
            items = stage["foreach"]
            if isinstance(items, str):
                items = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["losses"]
            cmds.append(stage["do"]["cmd"].replace("${item}", items[0]))
        else:
            cmds.append(stage["cmd"])
    return cmds


def test_every_stage_has_a_bad_param_case():
    assert sorted(_commands()) == sorted(STAGE_BAD_PARAM)


@pytest.fixture(scope="module")
def bare_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("bad-params"))


@pytest.mark.slow  # one stage subprocess per stage
@pytest.mark.parametrize("cmd", sorted(STAGE_BAD_PARAM))
def test_stage_fails_fast_on_bad_param_with_one_line(bare_repo, cmd):
    key, value = STAGE_BAD_PARAM[cmd]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = params
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    (bare_repo / "params.yaml").write_text(yaml.safe_dump(params))
    before = sorted(p.relative_to(bare_repo) for p in bare_repo.rglob("*") if ".git" not in p.parts)
    argv = cmd.split()
    argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=bare_repo, env=pipeline_env(bare_repo), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    after = sorted(p.relative_to(bare_repo) for p in bare_repo.rglob("*") if ".git" not in p.parts)
    assert after == before, "a stage with a bad parameter wrote files"


SOURCES = [p for p in (ROOT / "src").rglob("*.py")] + list((ROOT / "stages").glob("*.py")) + list(
    (ROOT / "benchmarks").glob("*.py"))


def test_no_pickle_loading_anywhere():
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path.name}: torch.load without weights_only=True"
        assert "allow_pickle=True" not in text, f"{path.name} allows pickles"
        assert not re.search(r"^\s*import pickle|pickle\.load", text, re.M), f"{path.name} uses pickle"


def test_params_hold_no_absolute_paths_or_secrets():
    text = (ROOT / "params.yaml").read_text()
    values = re.findall(r":\s*([^#\n]+)", text)
    for v in values:
        v = v.strip().strip("'\"")
        assert not v.startswith("/"), f"absolute path in params.yaml: {v}"
        assert not re.search(r"(?i)(token|password|secret|api[_-]?key)", v), v


def test_mlflow_ui_documented_on_loopback_only():
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if "mlflow ui" in line and "--host" in line:
            assert "--host 127.0.0.1" in line, line
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1" in readme
