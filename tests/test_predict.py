"""facemarks.serving.predict: which model `facemarks predict` uses (eval.json winner bce / null / missing, --loss, --model), the
CLI saying so in its JSON, and a light start (no MLflow, DVC, matplotlib or training loop on the predict path)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from facemarks import cli
from facemarks.training.model import build_model
from facemarks.serving.predict import DEFAULT_LOSS, choose_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """``models/{mse,bce}/model.pt``: real (untrained, seeded, narrow) networks."""
    root = tmp_path_factory.mktemp("project")
    for seed, loss in enumerate(("mse", "bce")):
        torch.manual_seed(seed)
        (root / "models" / loss).mkdir(parents=True)
        torch.save(build_model(head_width=8).state_dict(), root / "models" / loss / "model.pt")
    return root


def write_eval(root: Path, doc: dict | None) -> Path:
    path = root / "metrics" / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if doc is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(doc))
    return path


def test_model_choice_follows_the_eval_winner_else_mse(tmp_path):
    ev = write_eval(tmp_path, {"winner": "bce", "winner_margin_nme": 0.4, "bce": {"best_decoder": "dark"}})
    c = choose_model(eval_json=ev, models_dir=tmp_path / "models")
    assert (c.loss, c.path) == ("bce", tmp_path / "models" / "bce" / "model.pt")
    assert c.why.startswith("winner in") and "0.40" in c.why
    write_eval(tmp_path, {"winner": None, "leader": "bce"})
    c = choose_model(eval_json=ev, models_dir=tmp_path / "models")
    assert c.loss == DEFAULT_LOSS == "mse" and "no winner" in c.why
    write_eval(tmp_path, None)
    c = choose_model(eval_json=ev, models_dir=tmp_path / "models")
    assert c.loss == "mse" and "evaluate has not run" in c.why
    write_eval(tmp_path, {"winner": "bce"})
    assert choose_model("mse", eval_json=ev).loss == "mse"  # --loss wins over the eval winner
    assert choose_model(model="x/bce/model.pt", eval_json=ev).loss == "bce"  # loss from the models/<loss>/ folder
    assert choose_model("mse", model="x/model.pt", eval_json=ev).why == "--model and --loss given"
    with pytest.raises(ValueError, match="cannot tell which loss"):
        choose_model(model="x/model.pt", eval_json=ev)


def test_model_choice_follows_the_losses_list(tmp_path):
    """The winner may be any loss of the list (awing); with no winner and no mse in the list, the list's first loss."""
    ev = write_eval(tmp_path, {"winner": "awing", "losses": ["mse", "bce", "awing"]})
    c = choose_model(eval_json=ev, models_dir=tmp_path / "models")
    assert (c.loss, c.path) == ("awing", tmp_path / "models" / "awing" / "model.pt")
    write_eval(tmp_path, {"winner": None, "losses": ["mse", "bce", "awing"]})
    assert choose_model(eval_json=ev, models_dir=tmp_path / "models").loss == "mse"
    write_eval(tmp_path, {"winner": None, "losses": ["awing", "bce"]})
    c = choose_model(eval_json=ev, models_dir=tmp_path / "models")
    assert c.loss == "awing" and "no winner" in c.why and c.path.parent.name == "awing"
    assert choose_model(model="x/awing/model.pt", eval_json=ev).loss == "awing"


@pytest.mark.parametrize("winner, expected", [("bce", "bce"), (None, "mse")])
def test_cli_predict_uses_and_reports_the_chosen_model(models_dir, monkeypatch, capsys, winner, expected):
    write_eval(models_dir, {"winner": winner})
    monkeypatch.chdir(models_dir)
    out = models_dir / f"out-{winner}"
    rc = cli.main(["predict", "--astronaut", "--size", str(SIZE), "--out", str(out), "--no-overlay",
                   "--detector", "cascade", "--params", "absent.yaml"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "astronaut.json").read_text())
    assert doc["loss"] == expected and doc["model"] == str(Path("models") / expected / "model.pt")
    assert doc["model_choice"] == choose_model().why and doc["detector"] == "cascade"
    assert doc["faces"][0]["detector"] == "cascade" and doc["faces"][0]["score"] is None
    assert not (out / "astronaut.png").exists()  # --no-overlay
    assert f"({expected}; {doc['model_choice']})" in capsys.readouterr().out


def test_predict_path_imports_no_mlflow_dvc_matplotlib_or_train(models_dir, tmp_path):
    """A real `facemarks predict --astronaut --no-overlay` in a fresh interpreter, then a look at sys.modules (also no
    torchvision and no torch._dynamo: about 1.5-2 s of start each, see facemarks.training.model.ResNet18 / load_model;
    of facemarks.training only the network, facemarks.training.model: not the loop, its data, checkpoints or logging)."""
    code = textwrap.dedent(f"""
        import json, sys
        from facemarks import cli
        rc = cli.main(["predict", "--astronaut", "--model", {str(models_dir / 'models/mse/model.pt')!r},
                       "--size", "{SIZE}", "--out", {str(tmp_path)!r}, "--no-overlay", "--params", "absent.yaml"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "dvc", "matplotlib")
                       or m.startswith("facemarks.training.") and m != "facemarks.training.model"
                       or m in ("torchvision", "torch._dynamo"))
        print(json.dumps({{"rc": rc, "heavy": heavy}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["rc"] == 0 and (tmp_path / "astronaut.json").is_file()
    assert result["heavy"] == [], result["heavy"]
