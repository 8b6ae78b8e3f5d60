"""Seeds and budgets from a real SQLite MLflow store: pairing, the seed aggregate of `facemarks compare`, and the
study report (studies/study_report.py). Runs are logged with the MLflow API the way the pipeline logs them: train runs
tagged dvc.stage/loss/seed/study/evaluate_run with their params, an evaluate run holding comparison.best.*."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from facemarks import cli

from facemarks.evaluation import aggregate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real sqlite store filled once for the module (creating its tables takes seconds)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("facemarks")
        # study "s1", budget 64 px 2+1 epochs: MSE lower on all three seeds (deltas 0.5, 0.4, 0.6)
        log_pair(0, 5.0, 5.9, study="s1", face=(0.9, 0.5, 1.3))  # older rerun of seed 0: superseded below
        log_pair(0, 5.0, 5.5, study="s1", face=(0.5, 0.2, 0.8))
        log_pair(1, 5.2, 5.6, study="s1", face=(0.4, -0.1, 0.9))
        log_pair(2, 5.4, 6.0, study="s1", face=(0.6, 0.3, 0.9))
        # same study, budget 128 px 2+1 epochs: BCE lower on one seed, MSE on the other
        log_pair(0, 4.0, 3.8, study="s1", size=128)
        log_pair(1, 4.1, 4.2, study="s1", size=128)
        log_run("bce", 2, 4.0, study="s1", size=128, evaluate_run="0" * 32)  # no MSE partner: unpaired
        # another study and an untagged pipeline run: filtered out by --study
        log_pair(0, 9.0, 1.0, study="other")
        log_pair(0, 7.0, 7.0, study="")
        yield uri


def log_run(loss: str, seed: int, nme: float, *, study: str, size: int = 64, epochs=(2, 1), evaluate_run: str = "",
            exp_name: str = "") -> str:
    import mlflow

    with mlflow.start_run(run_name=loss) as run:
        tags = {"dvc.stage": f"train@{loss}", "loss": loss, "seed": str(seed)}
        tags.update({"study": study} if study else {})
        tags.update({"evaluate_run": evaluate_run} if evaluate_run else {})
        tags.update({"dvc.exp_name": exp_name} if exp_name else {})
        mlflow.set_tags(tags)
        mlflow.log_params({"loss": loss, "input_size": size, "train.seed": seed, "train.epochs_phase1": epochs[0],
                           "train.epochs_phase2": epochs[1]})
        mlflow.log_metrics({"test_nme": nme, "val_nme": nme + 1})
    time.sleep(0.005)  # distinct start times: the later rerun must win
    return run.info.run_id


def log_pair(seed: int, mse: float, bce: float, *, study: str, size: int = 64, face=None) -> str:
    """An evaluate run (with the face-level comparison when ``face`` = (mean, low, high)) and its two train runs."""
    import mlflow

    with mlflow.start_run(run_name="evaluate") as ev:
        mlflow.set_tags({"dvc.stage": "evaluate", **({"study": study} if study else {})})
        if face:
            mlflow.log_metrics({"comparison.best.mean_delta": face[0], "comparison.best.ci_low": face[1],
                                "comparison.best.ci_high": face[2], "comparison.best.p_wilcoxon": 0.01,
                                "comparison.best.n": 300})
    for loss, value in (("mse", mse), ("bce", bce)):
        log_run(loss, seed, value, study=study, size=size, evaluate_run=ev.info.run_id)
    return ev.info.run_id


def test_pairs_keep_the_latest_rerun_and_read_the_face_level_comparison(store):
    pairs, counts = aggregate.pair_runs(aggregate.search_train_runs("facemarks", "s1"))
    assert counts == {"runs": 13, "pairs": 5, "unpaired": 1, "superseded": 1}
    first = next(p for p in pairs if p.budget == (64, 2, 1) and p.seed == 0)
    assert first.nme == {"mse": 5.0, "bce": 5.5} and first.delta == pytest.approx(0.5)
    assert first.face["ci_low"] == 0.2 and first.face["n"] == 300 and first.study == "s1"
    assert not next(p for p in pairs if p.budget == (128, 2, 1)).face  # that evaluate run logged no comparison


def test_runs_without_evaluate_tag_pair_by_experiment_name_and_seed(store):
    import mlflow

    mlflow.set_experiment("legacy")
    for loss, value in (("mse", 6.0), ("bce", 6.5)):
        log_run(loss, 4, value, study="", exp_name="tidy-fish")
    log_run("mse", 5, 6.0, study="")  # neither tag: cannot be paired
    pairs, counts = aggregate.pair_runs(aggregate.search_train_runs("legacy"))
    assert [(p.exp_name, p.seed, p.delta) for p in pairs] == [("tidy-fish", 4, pytest.approx(0.5))]
    assert counts["unpaired"] == 1


def test_summary_per_budget_over_seeds(store):
    pairs, _ = aggregate.pair_runs(aggregate.search_train_runs("facemarks", "s1"))
    small, large = aggregate.summarise(pairs)
    assert small["label"] == "64 px (16×16 maps), 2+1 epochs" and small["seeds"] == [0, 1, 2]
    assert small["mse"]["mean"] == pytest.approx(5.2) and small["mse"]["sd"] == pytest.approx(0.2)
    assert small["bce"]["values"] == [5.5, 5.6, 6.0]
    assert small["wins"] == {"mse": 3, "bce": 0, "tie": 0}
    half = 4.302652729911275 * 0.1 / np.sqrt(3)
    d = small["delta"]
    assert (d["mean"], d["ci_low"], d["ci_high"]) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    assert small["winner"] == "mse" and small["verdict"].startswith("MSE better by 0.500 NME points [95 % CI 0.252")
    assert "(n = 3 seeds)" in small["verdict"]
    assert large["wins"] == {"mse": 1, "bce": 1, "tie": 0} and large["winner"] is None
    assert large["verdict"].startswith("not distinguishable at this budget")


def test_compare_prints_the_seed_aggregate(store, capsys):
    assert cli.main(["compare", "--experiment", "facemarks", "--study", "s1"]) == 0
    out = capsys.readouterr().out
    assert "budget 64 px (16×16 maps), 2+1 epochs: seeds 0, 1, 2" in out
    mse = next(line for line in out.splitlines() if line.strip().startswith("mse ") and "5.200 ± 0.200" in line)
    assert mse.split()[4:6] == ["3", "3"]  # n seeds, seeds won
    assert "paired BCE − MSE over seeds: +0.500 NME points" in out
    assert "verdict: MSE better by 0.500" in out and "verdict: not distinguishable at this budget" in out
    assert "5 pairs from 13 evaluated train runs; 1 unpaired, 1 superseded" in out
    assert "9.000" not in out  # the other study is filtered out
    assert cli.main(["compare", "--experiment", "facemarks", "--study", "nothing"]) == 1


def load_script(name: str):
    """A script under studies/ as a module (its main() runs in this process, on the store of the fixture)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_report_writes_runs_table_and_figure_from_the_store(store, tmp_path, capsys):
    report = load_script("study_report")
    out = tmp_path / "study"
    assert report.main(["--study", "s1", "--experiment", "facemarks", "--out", str(out)]) == 0
    md = (out / "s1/table.md").read_text()
    assert "| 64 px (16×16 maps), 2+1 epochs | mse | 3 | 5.200 ± 0.200 | — |" in md
    assert "| 64 px (16×16 maps), 2+1 epochs | bce | 3 | 5.700 ± 0.265 | — |" in md
    assert "MSE better by 0.500 NME points" in md and "not distinguishable at this budget" in md
    assert "11 runs (0 scored on real photos); 2 superseded reruns left out" in md
    with open(out / "s1/runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and {r["study"] for r in rows} == {"s1"}  # one row per train run, reruns included
    seed1 = next(r for r in rows if r["input_size"] == "64" and r["seed"] == "1" and r["loss"] == "mse")
    assert float(seed1["test_nme"]) == 5.2 and seed1["run_id"] and seed1["evaluate_run"]
    import imageio.v3 as iio

    img = iio.imread(out / "s1/nme_vs_budget.png")
    assert img.shape[0] > 100 and img[..., :3].std() > 5
    capsys.readouterr()
    assert report.main(["--study", "nothing", "--out", str(tmp_path / "none")]) == 1
    assert "no rows for study nothing" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_study_rows_survive_without_the_store_and_merge_with_it(store, tmp_path):
    """A study run over several sittings: the committed rows alone rebuild the report; a later call adds the store's
    new runs, updates the rows of the same run id and keeps their real-photo columns."""
    report = load_script("study_report")
    out = tmp_path / "study"
    assert report.main(["--study", "s1", "--out", str(out)]) == 0
    path = out / "s1/runs.csv"
    rows = report.read_rows(path)
    for r in rows:  # as if another sitting had scored them on real photos
        r["photos_median"], r["photos_faces"] = 8.0 + (r["loss"] == "bce"), 210
    kept = [r for r in rows if r["input_size"] == 64]  # the 128 px rows are gone from this copy of the rows
    path.write_text(report.rows_csv(kept))
    assert report.main(["--study", "s1", "--out", str(out), "--no-store"]) == 0
    md = (out / "s1/table.md").read_text()
    assert "128 px" not in md and "| 64 px (16×16 maps), 2+1 epochs | mse | 3 | 5.200 ± 0.200 | 8.000 ± 0.000 |" in md
    assert "MSE better by 1.000 NME points" in md  # real photos: BCE − MSE = +1 on every seed
    assert report.main(["--study", "s1", "--out", str(out)]) == 0  # the store adds the 128 px runs back
    merged = report.read_rows(path)
    assert len(merged) == 13 and sum(r["photos_median"] is not None for r in merged) == len(kept)


def test_study_report_scores_models_from_the_dvc_cache_on_real_photos(store, tmp_path, monkeypatch):
    """``--score-photos``: a row whose model.pt md5 is in a DVC cache is scored with the real-photo evaluation and
    the median goes into the row and into its MLflow run."""
    pytest.importorskip("dlib")
    import hashlib

    import mlflow
    import torch

    from facemarks.evaluation import real_photos
    from facemarks.core.io import write_image
    from facemarks.training.model import build_model

    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(photos / "astronaut.jpg", real_photos.load_portrait("astronaut"))
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    torch.save(build_model(head_width=16).state_dict(), model)  # models/<loss>/model.pt is a plain state dict
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    (cache / "files/md5" / md5[:2]).mkdir(parents=True)
    (cache / "files/md5" / md5[:2] / md5[2:]).write_bytes(model.read_bytes())
    run_id = log_run("mse", 7, 6.0, study="s2", size=32)
    mlflow.MlflowClient().set_tag(run_id, "facemarks.model_md5", md5)
    mlflow.MlflowClient().set_tag(run_id, "test_best_decoder", "subpixel")
    report = load_script("study_report")
    monkeypatch.chdir(tmp_path)  # the dlib reference cache (data/cache/photo_refs) goes to the temp folder
    assert report.main(["--study", "s2", "--out", str(tmp_path / "study"), "--score-photos", "--photos",
                        str(photos), "--pattern", "*.jpg", "--dvc-cache", str(cache)]) == 0
    row = report.read_rows(tmp_path / "study/s2/runs.csv")[0]
    assert row["photos_faces"] >= 1 and row["photos_median"] > 0 and row["photos_decoder"] == "subpixel"
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert logged["photos_median"] == pytest.approx(row["photos_median"])


def test_budget_study_queues_budgets_times_seeds_then_starts_the_queue(capsys):
    study = load_script("budget_study")
    assert study.main(["--study", "b1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    queued = [line for line in lines if line.startswith("dvc exp run --queue")]
    assert len(queued) == 9 and lines[len(queued)] == "dvc queue start -j 1"
    assert queued[0] == "dvc exp run --queue -n b1-default-s0 -S base.study=b1 -S train.seed=0"
    assert ("dvc exp run --queue -n b1-epochs3x-s2 -S base.study=b1 -S train.seed=2 -S train.epochs_phase1=6 "
            "-S train.epochs_phase2=3") in queued
    assert "dvc exp run --queue -n b1-size128-s1 -S base.study=b1 -S train.seed=1 -S augment.size=128" in queued
    assert study.main(["--study", "b1", "--budgets", "size96:augment.size=96", "--seeds", "4", "--no-start",
                       "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "dvc exp run --queue -n b1-size96-s4 -S base.study=b1 -S train.seed=4 -S augment.size=96",
        "then: python studies/study_report.py --study b1"]
    # a loss added to a study later: only that loss trains, and the report reads the budget back from the name
    assert study.main(["--study", "b1", "--budgets", "size96:augment.size=96", "--seeds", "0", "--losses", "awing",
                       "--no-start", "--dry-run"]) == 0
    (line, _) = capsys.readouterr().out.splitlines()
    assert line == ("dvc exp run --queue -n b1-size96-awing-s0 -S base.study=b1 -S train.seed=0 "
                    "-S train.losses=[awing] -S augment.size=96")
    report = load_script("study_report")
    assert report.budget_name("b1-size96-awing-s0", "b1", 0) == "size96"
    assert report.budget_name("b1-size96-s0", "b1", 0) == "size96"
    assert report.budget_name("b1-awing-s0", "b1", 0) == "awing"  # a budget may itself be named like a loss
    assert report.budget_name("other-size96-s0", "b1", 0) == ""
    for bad in (["--study", "off"], ["--study", "b1", "--budgets", "huge"], ["--study", "b 1"],
                ["--study", "b1", "--seeds", "1", "1"], ["--study", "b1", "--losses", "l1"],
                ["--study", "b1", "--losses", "mse", "mse"]):
        with pytest.raises(SystemExit):
            study.main([*bad, "--dry-run"])


def test_three_losses_pair_every_loss_over_seeds(store):
    """Three losses scored by one evaluate (train.losses = [mse, bce, awing]): every pair over the seeds, the
    overall winner only when it beats both others, the BCE − MSE keys as with two losses."""
    import mlflow

    mlflow.set_experiment("three")
    for seed, (mse, bce, awing) in enumerate([(5.0, 5.5, 4.5), (5.2, 5.6, 4.8), (5.4, 6.0, 5.1)]):
        with mlflow.start_run(run_name="evaluate") as ev:
            mlflow.set_tags({"dvc.stage": "evaluate", "study": "s3"})
            mlflow.log_metrics({"comparison.best.ci_low": 0.2, "comparison.pairs.awing-mse.best.ci_low": -0.7,
                                "comparison.pairs.awing-mse.best.n": 300})
        for loss, value in (("mse", mse), ("bce", bce), ("awing", awing)):
            log_run(loss, seed, value, study="s3", evaluate_run=ev.info.run_id)
    pairs, counts = aggregate.pair_runs(aggregate.search_train_runs("three", "s3"))
    assert counts == {"runs": 9, "pairs": 3, "unpaired": 0, "superseded": 0}
    assert pairs[0].losses == ["mse", "bce", "awing"] and pairs[0].diff("awing", "mse") == pytest.approx(-0.5)
    assert pairs[0].faces["awing-mse"] == {"ci_low": -0.7, "n": 300} and pairs[0].face["ci_low"] == 0.2
    (entry,) = aggregate.summarise(pairs)
    assert list(entry["comparisons"]) == ["bce-mse", "awing-mse", "awing-bce"]
    aw = entry["comparisons"]["awing-mse"]
    assert aw["delta"]["mean"] == pytest.approx((-0.5 - 0.4 - 0.3) / 3) and aw["winner"] == "awing"
    assert aw["wins"] == {"mse": 0, "awing": 3, "tie": 0}
    assert entry["overall"] == "awing" and entry["winner"] == "mse" and entry["delta"]["mean"] == pytest.approx(0.5)
    text = aggregate.seeds_text([entry])
    assert "paired AWING − MSE over seeds: -0.400 NME points" in text
    assert "better than every other loss: AWING" in text
    awing_row = next(line for line in text.splitlines() if line.strip().startswith("awing "))
    assert awing_row.split()[4:6] == ["3", "3"]  # n seeds, seeds won against both others


def test_photos_study_gain_pairs_each_setting_with_the_synthetic_default():
    """The photos study's gain table: per-seed medians against N = 0's, per-face differences, and the slope per
    10 photos from every seed's point; a setting scored on other faces is not paired."""
    study = load_script("photos_study")
    files = ["a.jpg", "a.jpg", "b.jpg", "c.jpg"]

    def row(n: int, seed: int, faces: list[float], val_files=files) -> dict:
        return {"n_photos": n, "train_seed": seed, "measured": {
            "val_nme_per_face": faces, "val_files": val_files, "val_nme_median": float(np.median(faces))}}

    by_n = {0: [row(0, 0, [10, 12, 14, 16]), row(0, 1, [11, 13, 15, 17])],
            20: [row(20, 0, [8, 10, 12, 14]), row(20, 1, [10, 12, 14, 16])],
            40: [row(40, 0, [9, 9, 9, 9], ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])]}
    lines = study.gain_lines(by_n)
    (n20,) = [line for line in lines if line.startswith("| 20 |")]
    # medians: N=0 13, 14; N=20 11, 13 -> per-seed -2, -1 (mean -1.5); per face: (9,11,13,15) - (10.5,...) = -1.5
    assert n20.startswith("| 20 | 2 | -1.50 [") and "| -1.50 [-1.50, -1.50] (n = 4 faces) |" in n20
    assert any(line.startswith("| 40 | – | other validation faces") for line in lines)
    slope = np.polyfit([0, 0, 20, 20, 40], [13, 14, 11, 13, 9], 1)[0]
    assert f"**{10 * slope:+.2f} NME points per 10 photos**" in lines[-1]
    assert study.gain_lines({0: by_n[0]}) == []
