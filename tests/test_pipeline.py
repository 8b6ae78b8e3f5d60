"""The whole pipeline in a temporary copy of the repo on the tiny preset: outputs, reruns, experiments, MLflow."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DVC, VOLATILE, clone_repo, json_keys, pipeline_env, sh

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

STAGES = ["download", "augment", "encode", "train@mse", "train@bce", "export", "evaluate", "plot"]


def ran(output: str) -> list[str]:
    """Stages ``dvc repro`` executed, from its log."""
    return re.findall(r"Running stage '([^']+)'", output)


def stale(repo) -> set[str]:
    """Stages ``dvc status`` reports as changed."""
    out = sh(repo, *DVC, "status", "--json").stdout
    return set(json.loads(out or "{}"))


def set_param(repo, dotted: str, value) -> None:
    path = repo / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    node = doc
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_first_repro_runs_every_stage_and_writes_every_output(tiny_repo):
    log = (tiny_repo / ".first_repro.log").read_text()
    assert ran(log) == STAGES
    dvc = yaml.safe_load((tiny_repo / "dvc.yaml").read_text())
    losses = yaml.safe_load((tiny_repo / "params.yaml").read_text())["train"]["losses"]
    assert losses == ["mse", "bce"]  # the default list: the mission's pair
    declared = []
    for name, stage in dvc["stages"].items():
        items = ({"${train.losses}": losses}[stage["foreach"]]) if "foreach" in stage else [None]
        body = stage.get("do", stage)
        for item in items:
            for kind in ("outs", "metrics", "plots"):
                for entry in body.get(kind, []):
                    path = entry if isinstance(entry, str) else next(iter(entry))
                    declared.append(path.replace("${item}", item or ""))
    for path in declared:
        assert (tiny_repo / path).exists(), f"declared output missing: {path}"
    ev = json.loads((tiny_repo / "metrics/eval.json").read_text())
    assert {"mse", "bce"} <= set(ev) and ev["losses"] == ["mse", "bce"] and "awing" not in ev
    assert sorted(p.name for p in (tiny_repo / "exports").iterdir()) == ["bce", "mse"]


def test_second_repro_runs_nothing(tiny_repo):
    proc = sh(tiny_repo, *DVC, "repro")
    assert ran(proc.stdout + proc.stderr) == []
    assert stale(tiny_repo) == set()


def test_sigma_change_reruns_encode_and_downstream_only(tiny_repo):
    set_param(tiny_repo, "encode.sigma", 1.25)
    # stages reading encode.sigma are stale at once; plot follows because its inputs then change
    assert stale(tiny_repo) == {"encode", "train@mse", "train@bce", "export", "evaluate"}
    proc = sh(tiny_repo, *DVC, "repro")
    assert ran(proc.stdout + proc.stderr) == ["encode", "train@mse", "train@bce", "export", "evaluate", "plot"]


def test_plot_param_change_reruns_plot_only(tiny_repo):
    set_param(tiny_repo, "plot.dpi", 60)
    assert stale(tiny_repo) == {"plot"}
    proc = sh(tiny_repo, *DVC, "repro")
    assert ran(proc.stdout + proc.stderr) == ["plot"]


def test_train_seed_edit_reruns_training_only_and_study_adds_evaluate(tiny_repo):
    """train.seed feeds only the train stages (evaluate and plot follow through their model deps: no data stage);
    base.study also reruns evaluate, so that a study's runs are logged under its tag instead of restored from the
    run-cache."""
    path = tiny_repo / "params.yaml"
    before = path.read_text()
    try:
        set_param(tiny_repo, "train.seed", 1)
        assert stale(tiny_repo) == {"train@mse", "train@bce"}
        set_param(tiny_repo, "base.study", "probe")
        assert stale(tiny_repo) == {"train@mse", "train@bce", "evaluate"}
    finally:
        path.write_text(before)
    assert stale(tiny_repo) == set()


def test_eval_json_names_a_winner_only_when_the_interval_excludes_zero(tiny_repo):
    ev = json.loads((tiny_repo / "metrics/eval.json").read_text())
    c = ev["comparison"]
    assert c["delta"] == "bce - mse" and c["n_boot"] >= 2000 and c["headline"] == "best_decoder"
    assert set(c["decoders"]) >= {"argmax", "dark", "subpixel"}
    for row in (c["best"], *c["decoders"].values()):
        assert row["ci_low"] <= row["mean_delta"] <= row["ci_high"] and 0 <= row["p_wilcoxon"] <= 1
        excludes = row["ci_low"] > 0 or row["ci_high"] < 0
        assert (row["winner"] is not None) == excludes
    assert ev["winner"] == c["best"]["winner"] and ev["leader"] in ("mse", "bce")
    best = (c["best"]["decoder_mse"], c["best"]["decoder_bce"])
    assert best == (ev["mse"]["best_decoder"], ev["bce"]["best_decoder"])
    readme = (tiny_repo / "reports/eval/README.md").read_text()
    assert c["verdict"][1:] in readme and "| best (headline) |" in readme


def test_dvc_plots_render(tiny_repo):
    proc = sh(tiny_repo, *DVC, "plots", "show", "--json")
    data = json.loads(proc.stdout)
    assert "errors" not in json.dumps(data.get("errors", {})) or not data.get("errors")


def test_mlflow_store_has_both_runs_side_by_side(tiny_repo):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("facemarks")
    runs = client.search_runs([exp.experiment_id])
    by_name = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, r)
    assert {"mse", "bce", "encode"} <= set(by_name)
    for loss in ("mse", "bce"):
        r = by_name[loss]
        assert r.data.tags["dvc.stage"].startswith("train")
        assert len(r.data.tags["git.commit"]) == 40
        assert "val_nme" in r.data.metrics and "train_loss" in r.data.metrics
        assert any(k.startswith("test_") for k in r.data.metrics), sorted(r.data.metrics)
    assert any("roundtrip" in k for k in by_name["encode"].data.metrics)


def test_exp_run_creates_run_tagged_with_experiment_name(tiny_repo):
    import mlflow

    sh(tiny_repo, "git", "add", "-A")
    sh(tiny_repo, "git", "commit", "-qm", "after reruns", check=False)
    sh(tiny_repo, *DVC, "exp", "run", "-n", "lr-probe", "-S", "train.lr=0.002", "-S", "train.seed=1",
       "-S", "base.study=probe")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("facemarks")
    tagged = client.search_runs([exp.experiment_id], filter_string="tags.`dvc.exp_name` = 'lr-probe'")
    assert {r.info.run_name for r in tagged} >= {"mse", "bce"}
    # the study tag on every run of the experiment, the training seed on the train runs, paired by evaluate
    by_name = {r.info.run_name: r for r in tagged}
    assert all(r.data.tags.get("study") == "probe" for r in tagged)
    train_runs = [by_name["mse"], by_name["bce"]]
    assert [r.data.tags["dvc.stage"] for r in train_runs] == ["train@mse", "train@bce"]
    assert [r.data.tags["seed"] for r in train_runs] == ["1", "1"]
    assert {r.data.tags["evaluate_run"] for r in train_runs} == {by_name["evaluate"].info.run_id}
    assert "comparison.best.ci_low" in by_name["evaluate"].data.metrics
    assert by_name["mse"].data.metrics["val_weak_peak_share"] >= 0  # per epoch, beside val_collapse
    # `facemarks compare --study` aggregates the seed; the study report reads the same store
    out = sh(tiny_repo, sys.executable, "-m", "facemarks.cli", "compare", "--study", "probe").stdout
    assert "budget 32 px (8×8 maps), 1+0 epochs: seeds 1" in out and "1 pairs from 2 evaluated train runs" in out
    report = sh(tiny_repo, sys.executable, str(ROOT / "studies/study_report.py"), "--study", "probe")
    assert report.returncode == 0
    table = (tiny_repo / "reports/study/probe/table.md").read_text()  # written where the study report is run
    assert "| 32 px (8×8 maps), 1+0 epochs | mse | 1 |" in table and "| bce − mse |" in table
    with open(tiny_repo / "reports/study/probe/runs.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert {(r["loss"], r["exp_name"], r["seed"]) for r in rows} == {("mse", "lr-probe", "1"), ("bce", "lr-probe", "1")}
    assert all(r["model_md5"] and r["evaluate_run"] for r in rows)  # what --score-photos needs to find each model
    assert (tiny_repo / "reports/study/probe/nme_vs_budget.png").stat().st_size > 0


def test_same_params_and_seed_give_identical_metrics_and_an_empty_metrics_diff(tiny_repo, team_repo, tmp_path,
                                                                             tmp_path_factory):
    """Two reproductions of one commit (in two directories, one logging to SQLite, one to an MLflow server) write
    byte-identical DVC metrics and plots files: ``dvc metrics diff`` between them is empty; the timings went to the
    untracked timings/ files instead."""
    first = tmp_path_factory.getbasetemp() / "first_metrics"  # snapshot of tiny_repo's first run
    again = team_repo  # conftest: the same project files, reproduced in another directory (shared with test_team.py)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in (again / "metrics").iterdir())
    differ = [n for n in names if (first / n).read_bytes() != (again / "metrics" / n).read_bytes()]
    assert not differ, f"metrics files differ between two identical runs: {differ}"
    for name in names:
        if name.endswith(".json"):
            volatile = [k for k in json_keys(json.loads((first / name).read_text())) if VOLATILE.search(k)]
            assert not volatile, f"metrics/{name} holds timing-like keys: {volatile}"
        else:
            header = (first / name).read_text().splitlines()[0].split(",")
            assert not [c for c in header if VOLATILE.search(c)], f"metrics/{name} columns: {header}"
    # the diff as DVC sees it: a clone holds the second reproduction committed, the first one's files in its workspace
    clone = tmp_path / "diff"
    sh(tmp_path, "git", "clone", "-q", str(again), str(clone))
    for name in names:
        (clone / "metrics" / name).write_bytes((first / name).read_bytes())
    diff = json.loads(sh(clone, *DVC, "metrics", "diff", "--json").stdout or "{}")
    assert not any(diff.values()), diff
    # the timings are still measured, apart from the metrics
    for stage in ("augment", "train_mse", "train_bce", "evaluate"):
        timing = json.loads((again / "timings" / f"{stage}.json").read_text())
        assert timing and all(v > 0 for v in timing.values() if isinstance(v, float)), (stage, timing)


def test_evaluate_runs_without_the_peers_extra(tiny_repo, tmp_path):
    """With dlib unimportable the evaluate stage still runs; the dlib68 row is skipped with a one-line notice."""
    repo = tmp_path / "no-peers"
    clone_repo(tiny_repo, repo)
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['dlib'] = None  # as if the extra were absent\n")
    env = pipeline_env(repo)
    env["PYTHONPATH"] = f"{block}:{env['PYTHONPATH']}"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "stages/evaluate.py"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert "dlib68" not in ev and {"mse", "bce"} <= set(ev)
    notices = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "dlib" in ln.lower()]
    assert len(notices) == 1, notices
    assert "dlib68" not in (repo / "metrics/ced.csv").read_text().splitlines()[0]
    detect = json.loads((repo / "metrics/detect.json").read_text())  # the detection rows fall back to the cascade
    assert set(detect["synthetic_test"]) == {"cascade"} and "skipped" in detect["astronaut"]


def test_adding_awing_to_the_losses_list_trains_only_awing_and_scores_three_losses(tiny_repo, tmp_path):
    """train.losses [mse, bce] -> [mse, bce, awing] (what `dvc exp run -S 'train.losses=[mse,bce,awing]'` writes):
    train@mse and train@bce stay cached (their params list every train.* key but `losses`); train@awing, export,
    evaluate and plot run, and every output covers the three losses, each pair compared on the same faces."""
    import mlflow

    repo = tmp_path / "three"
    clone_repo(tiny_repo, repo)
    assert stale(repo) == set()
    set_param(repo, "train.losses", ["mse", "bce", "awing"])
    assert stale(repo) == {"train@awing", "export", "evaluate", "plot"}
    proc = sh(repo, *DVC, "repro")
    assert ran(proc.stdout + proc.stderr) == ["train@awing", "export", "evaluate", "plot"]
    assert stale(repo) == set()
    for loss in ("mse", "bce", "awing"):
        for path in (f"models/{loss}/model.pt", f"exports/{loss}/model.onnx", f"metrics/train_{loss}_epochs.csv",
                     f"reports/eval/keypoints_{loss}.png"):
            assert (repo / path).stat().st_size > 0, path
    # mse and bce were not retrained: the very same model bytes as the two-loss reproduction
    for loss in ("mse", "bce"):
        assert (repo / f"models/{loss}/model.pt").read_bytes() == (tiny_repo / f"models/{loss}/model.pt").read_bytes()
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert ev["losses"] == ["mse", "bce", "awing"] and ev["awing"]["nme_io"] > 0
    c = ev["comparison"]
    assert set(c["pairs"]) == {"bce-mse", "awing-mse", "awing-bce"} and c["delta"] == "bce - mse"
    for key, pair in c["pairs"].items():
        assert key == f"{pair['a']}-{pair['b']}" and pair["best"]["ci_low"] <= pair["best"]["mean_delta"] <= \
            pair["best"]["ci_high"]
    assert c["best"] == c["pairs"]["bce-mse"]["best"]
    assert ev["winner"] is None or all(ev["winner"] == p["winner"] for p in c["pairs"].values() if ev["winner"]
                                       in (p["a"], p["b"]))
    assert json.loads((repo / "metrics/export.json").read_text()).keys() >= {"mse", "bce", "awing"}
    assert (repo / "metrics/ced.csv").read_text().splitlines()[0].startswith("nme,mse,bce,awing")
    readme = (repo / "reports/eval/README.md").read_text()
    assert "## MSE vs AWING on the same test faces" in readme and "| awing |" in readme
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("facemarks")
    awing = client.search_runs([exp.experiment_id], filter_string="tags.`dvc.stage` = 'train@awing'")
    assert len(awing) == 1 and "test_nme" in awing[0].data.metrics and "train.losses" not in awing[0].data.params
    evaluate = client.get_run(awing[0].data.tags["evaluate_run"])
    assert "comparison.pairs.awing-mse.best.ci_low" in evaluate.data.metrics
    # `facemarks compare` pairs the three train runs that evaluate scored together
    out = sh(repo, sys.executable, "-m", "facemarks.cli", "compare").stdout
    assert "paired AWING − MSE over seeds" in out and "better than every other loss" in out
    # back to the pair: the trained models are all still cached, only the list's consumers are stale
    set_param(repo, "train.losses", ["mse", "bce"])
    assert stale(repo) == {"export", "evaluate", "plot"}


def _evaluate(repo, **params):
    """Set ``evaluate.*`` params in ``repo`` and run the evaluate stage script there (no DVC: the stage alone)."""
    import subprocess

    for key, value in params.items():
        set_param(repo, f"evaluate.{key}", value)
    return subprocess.run([sys.executable, "stages/evaluate.py"], cwd=repo, env=pipeline_env(repo),
                          capture_output=True, text=True, timeout=900)


def test_evaluate_photos_bad_folder_fails_before_any_work_naming_the_key(tiny_repo, tmp_path):
    repo = tmp_path / "bad-photos"
    clone_repo(tiny_repo, repo)
    before = {p: (repo / p).read_bytes() for p in ("metrics/eval.json", "metrics/photos.csv", "metrics/detect.json")}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos")
    for folder, message in ((tmp_path / "nowhere", "is not a folder"), (empty, "holds no image")):
        proc = _evaluate(repo, photos=str(folder))
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert "evaluate.photos: " in last and message in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "evaluate: mse" not in proc.stdout  # nothing was scored
        assert {p: (repo / p).read_bytes() for p in before} == before  # the last good outputs are untouched


@pytest.mark.skipif(not __import__("facemarks.evaluation.peers", fromlist=["available"]).available(),
                    reason="the peers extra (dlib) is not installed")
def test_evaluate_photos_scores_a_folder_with_and_without_markup(tiny_repo, tmp_path):
    """A user's folder: one photo with 300-W markup beside it (scored against it), one without (scored against
    dlib's points); the photos block, the per-face CSV, the MLflow run and the plot stage's contact sheet."""
    import subprocess

    import mlflow

    from facemarks.evaluation import real_photos
    from facemarks.core.io import write_image, write_pts

    repo = tmp_path / "photos"
    clone_repo(tiny_repo, repo)
    folder = tmp_path / "my photos"
    folder.mkdir()
    portraits = real_photos.photo_set(None)
    for name in real_photos.PORTRAITS:
        write_image(folder / f"{name}.jpg", real_photos.load_portrait(name))
    hopper = portraits.faces[portraits.index("grace_hopper.png")]
    write_pts(folder / "grace_hopper.pts", hopper.points + 1.5)  # "human" markup
    proc = _evaluate(repo, photos=str(folder), photos_glob="*.jpg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    block = json.loads((repo / "metrics/eval.json").read_text())["photos"]
    assert block["folder"] == str(folder) and block["n_images"] == 2 and block["references"]["human"] == 1
    assert block["references"]["dlib"] >= 1 and set(block["comparison"]) == {"bce_vs_mse"}
    for loss in ("mse", "bce"):
        row = block[loss]
        assert row["n_faces"] == block["n_faces"] and row["median"] > 0 and 0 <= row["share_above_10"] <= 1
        assert set(row["by_reference"]) == {"human", "dlib"}
    detect = json.loads((repo / "metrics/detect.json").read_text())["photos"]  # the detector settings on the folder
    assert set(detect["settings"]) >= {"hog", "cnn", "auto"} if "settings" in detect else "skipped" in detect
    lines = (repo / "metrics/photos.csv").read_text().splitlines()
    assert lines[0] == "file,face,reference,box_source,nme_mse,nme_bce" and len(lines) == 1 + block["n_faces"]
    assert any(line.startswith("grace_hopper.jpg,0,human,dlib,") for line in lines)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("facemarks")
    run = client.search_runs([exp.experiment_id], "tags.`dvc.stage` = 'evaluate' and attributes.run_name = 'evaluate'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.data.metrics["photos.mse.median"] == pytest.approx(block["mse"]["median"])
    plot = subprocess.run([sys.executable, "stages/plot.py"], cwd=repo, env=pipeline_env(repo), capture_output=True,
                          text=True, timeout=600)
    assert plot.returncode == 0, plot.stderr[-3000:]
    import imageio.v3 as iio

    sheet = iio.imread(repo / "reports/eval/photos_worst.png")
    assert sheet.shape[0] > 100 and sheet[..., :3].std() > 5
