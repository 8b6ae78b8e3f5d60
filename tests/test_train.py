"""Training: loader, overfitting, resume equivalence, collapse detection, the stage with MLflow, DDP under torchrun.

Every case builds its own tiny data in ``tmp_path``: blob images drawn at jittered copies of one 68-point
template, written with :func:`facemarks.core.store.write_split`, targets from :class:`facemarks.heatmaps.codec.HeatmapCodec`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import THREADS

from facemarks.training import train as T
from facemarks.training import validation as V
from facemarks.training.checkpoint import load_checkpoint
from facemarks.training.data import BatchDataset, SplitArrays, TrainData, load_data, make_loader
from facemarks.training.model import build_model, load_model
from facemarks.training.outputs import VOLATILE_KEYS, write_outputs
from facemarks.heatmaps.codec import HeatmapCodec
from facemarks.core.store import write_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


# ------------------------------------------------------------------------------------------------ tiny data
def _template(size: int) -> np.ndarray:
    """(68, 2) points in a ``size`` crop, outer eye corners 36 / 45 level and apart."""
    t = np.random.default_rng(123).uniform(0.3, 0.7, (68, 2))
    t[36], t[45] = (0.32, 0.4), (0.68, 0.4)
    return t * size


def _write_split(path: Path, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A split of ``n`` blob images (N, S, S) with points (N, 68, 2) and visibility (N, 68)."""
    rng = np.random.default_rng(seed)
    c = size / 2
    scale = rng.uniform(0.85, 1.15, (n, 1, 1))
    shift = rng.uniform(-0.08, 0.08, (n, 1, 2)) * size
    points = ((_template(size) - c) * scale + c + shift).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    d2 = (xx[None, None] - points[..., 0, None, None]) ** 2 + (yy[None, None] - points[..., 1, None, None]) ** 2
    blobs = np.exp(-d2 / 2.0).max(1)  # (N, S, S)
    images = np.clip(blobs * 200 + rng.normal(20, 5, blobs.shape), 0, 255).astype(np.uint8)
    visible = np.ones((n, 68), bool)
    visible[:, 0] = rng.random(n) > 0.3  # some invisible jaw points exercise the mask
    arrays = {"images": images, "points": points, "visible": visible, "transform": np.tile(np.eye(3), (n, 1, 1)),
              "orig_points": points.astype(np.float64), "boxes": np.tile([0.0, 0.0, size, size], (n, 1))}
    write_split(path, arrays, {"files": [f"f{i}.png" for i in range(n)], "source_index": list(range(n)), "size": size})
    return points, visible


def make_data(root: Path, size: int = 32, n_train: int = 8, n_val: int = 4, sigma: float = 1.0) -> Path:
    """``root/data/augmented/{train,val}/`` and ``root/data/heatmaps/{train,val}.npy`` (float16)."""
    codec = HeatmapCodec(size, size // 4, sigma)
    (root / "data/heatmaps").mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        points, visible = _write_split(root / "data/augmented" / name, n, size, seed)
        heat, _ = codec.encode(points, visible)
        np.save(root / "data/heatmaps" / f"{name}.npy", heat.astype(np.float16))
    return root


def load(root: Path) -> TrainData:
    return load_data(root / "data/augmented", root / "data/heatmaps")


TINY = T.TrainConfig(epochs_phase1=2, epochs_phase2=1, lr=5e-3, lr_drop=0.1, batch_size=4, head_width=8,
                     dropout=0.1, seed=3, sigma=1.0)


# ------------------------------------------------------------------------------------------------ loader
def test_loader_yields_whole_shuffled_batches_with_visibility_weights(tmp_path):
    data = load(make_data(tmp_path, n_train=10))
    loader = make_loader(data.train, batch_size=4, seed=0)
    loader.sampler.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2  # 10 samples, batch 4, drop_last
    images, targets, weights = batches[0]
    assert images.shape == (4, 1, 32, 32) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert targets.shape == (4, 68, 8, 8) and targets.dtype == torch.float32
    assert weights.shape == (4, 68)
    loader.sampler.sampler.set_epoch(1)
    again = list(loader)
    assert not torch.equal(batches[0][0], again[0][0]), "epoch 1 draws another order"
    w = BatchDataset(data.train).weights
    assert np.array_equal(w[:, 1:], np.ones_like(w[:, 1:])) and np.array_equal(w[:, 0], data.train.visible[:, 0])


def test_split_shapes_are_checked(tmp_path):
    data = load(make_data(tmp_path))
    with pytest.raises(AssertionError, match="heatmaps"):
        SplitArrays(data.train.images, data.train.heatmaps[:, :, :4], data.train.points, data.train.visible)


def test_fingerprint_follows_config_loss_and_data_but_not_workers(tmp_path):
    data = load(make_data(tmp_path))
    fp = T.fingerprint(TINY, data, "mse")
    assert T.fingerprint(dataclasses.replace(TINY, workers=2), data, "mse") == fp
    assert T.fingerprint(dataclasses.replace(TINY, lr=1e-3), data, "mse") != fp
    assert T.fingerprint(TINY, data, "bce") != fp
    other = TrainData(data.train, SplitArrays(data.val.images[::-1], data.val.heatmaps, data.val.points,
                                              data.val.visible))
    assert T.fingerprint(TINY, other, "mse") != fp


def test_lr_drops_at_the_phase_boundary():
    assert [TINY.lr_at(e) for e in range(3)] == pytest.approx([5e-3, 5e-3, 5e-4])


def test_progress_prints_plain_lines_with_loss_and_eta_off_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="facemarks.training.train"):
        progress = T._Progress(3, "mse epoch 1/2", enabled=True, every_s=0.0)
        for value in (0.5, 0.25, 0.125):
            progress.update(value)
        progress.close()
        silent = T._Progress(3, "rank 1", enabled=False, every_s=0.0)
        silent.update(1.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[-1].startswith("mse epoch 1/2 batch 3/3 loss 0.125 eta 0s")


# ------------------------------------------------------------------------------------------------ learning
def test_tiny_model_overfits_eight_samples(tmp_path):
    """40 steps on 8 faces at 64 px: the loss falls > 5x and the decoded points beat the mean shape by far."""
    data = load(make_data(tmp_path, size=64, n_train=8, n_val=4))
    same = TrainData(data.train, data.train)
    codec = HeatmapCodec(64, 16, 1.0)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    net = build_model(68, head_width=32, dropout=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    loader = make_loader(data.train, batch_size=8, seed=0)
    _, nme_before = V.evaluate(net, data.train, "mse", codec, "subpixel", cpu, 8)
    losses = []
    for epoch in range(40):
        loader.sampler.sampler.set_epoch(epoch)
        total, count, _ = T.train_one_epoch(net, loader, optimizer, "mse", cpu, grad_clip=5.0)
        losses.append(total / count)
    _, nme_after = V.evaluate(net, data.train, "mse", codec, "subpixel", cpu, 8)
    mean_shape = V.mean_shape_nme(same)
    assert losses[-1] < losses[0] / 5, losses
    assert nme_after < 0.6 * mean_shape and nme_after < nme_before / 5, (nme_before, nme_after, mean_shape)


class _Interrupt(Exception):
    pass


def _stop_after(k: int):
    def on_epoch(row):
        if row["epoch"] == k:
            raise KeyboardInterrupt  # what a killed run leaves behind: the checkpoint of epoch k, nothing else

    return on_epoch


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in rows]


def test_killed_run_resumes_to_the_same_weights_and_metrics(tmp_path):
    data = load(make_data(tmp_path))
    full = T.fit(TINY, data, "mse", tmp_path / "ckpt_full")
    with pytest.raises(KeyboardInterrupt):
        T.fit(TINY, data, "mse", tmp_path / "ckpt_killed", on_epoch=_stop_after(2), run_id="abc")
    ckpt = load_checkpoint(tmp_path / "ckpt_killed", T.fingerprint(TINY, data, "mse"))
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2 and ckpt["run_id"] == "abc"
    assert set(ckpt) == {"model", "optimizer", "scheduler", "epoch", "config", "loss", "fingerprint", "history",
                         "run_id"}  # the format of facemarks.training.checkpoint
    resumed = T.fit(TINY, data, "mse", tmp_path / "ckpt_killed")
    assert _stable(resumed.history) == _stable(full.history)
    assert [r["lr"] for r in full.history] == pytest.approx([5e-3, 5e-3, 5e-4])
    drop = ("images_per_s", "seconds", "run_id")
    assert {k: v for k, v in resumed.summary.items() if k not in drop} == \
        {k: v for k, v in full.summary.items() if k not in drop}
    assert resumed.summary["run_id"] == "abc"
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other params: the stale checkpoint is not resumed
    other = T.fit(dataclasses.replace(TINY, epochs_phase1=1, epochs_phase2=0), data, "mse", tmp_path / "ckpt_killed")
    assert len(other.history) == 1


# ------------------------------------------------------------------------------------------------ collapse
class _MeanShapeNet(nn.Module):
    """Outputs the target maps of one fixed shape for every input: the mean-shape predictor."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.register_buffer("maps", maps)

    def forward(self, x):
        return self.maps.expand(len(x), -1, -1, -1)


def test_mean_shape_predictor_is_flagged_as_collapse(tmp_path):
    data = load(make_data(tmp_path, n_train=16, n_val=8))
    codec = HeatmapCodec(32, 8, 1.0)
    mean_shape = np.asarray(data.train.points).mean(0, keepdims=True)
    maps, _ = codec.encode(torch.from_numpy(mean_shape), torch.ones(1, 68, dtype=torch.bool))
    _, nme = V.evaluate(_MeanShapeNet(maps.float()), data.val, "mse", codec, "subpixel", torch.device("cpu"))
    msn = V.mean_shape_nme(data)
    assert nme == pytest.approx(msn, rel=0.1)
    assert V.is_collapse(nme, msn)
    assert not V.is_collapse(0.5 * msn, msn)


def test_fit_warns_and_flags_collapse(tmp_path, caplog):
    data = load(make_data(tmp_path))
    cfg = dataclasses.replace(TINY, epochs_phase1=1, epochs_phase2=0, lr=1e-9)  # learns nothing
    with caplog.at_level(logging.WARNING, logger="facemarks.training.train"):
        result = T.fit(cfg, data, "bce", tmp_path / "ckpt")
    assert result.summary["collapse"] is True
    assert any("MEAN-SHAPE COLLAPSE" in r.getMessage() for r in caplog.records)
    assert result.summary["mean_shape_nme"] == pytest.approx(V.mean_shape_nme(data))


# ------------------------------------------------------------------------------------------------ the stage
def _stage_repo(tmp_path: Path, epochs: tuple[int, int] = (1, 1), batch: int = 4, n_train: int = 8) -> Path:
    """A working dir with data, params.yaml (tiny preset) and the stage script."""
    from facemarks.core.params import apply_preset

    repo = make_data(tmp_path / "repo", n_train=n_train)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    apply_preset(ROOT / "presets" / "tiny.yaml", repo / "params.yaml")
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["train"].update(epochs_phase1=epochs[0], epochs_phase2=epochs[1], batch_size=batch, head_width=8, lr=5e-3)
    (repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (repo / "dvc.yaml").write_text("stages: {}\n")  # marks the repo root for facemarks.core.tracking
    return repo


def test_stage_writes_outputs_and_one_mlflow_run_per_loss(tmp_path, monkeypatch):
    import mlflow

    repo = _stage_repo(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "probe")
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["stages/train.py", "--loss", "bce"])
    runpy.run_path(str(ROOT / "stages" / "train.py"), run_name="__main__")

    summary = json.loads((repo / "metrics/train_bce.json").read_text())
    for key in ("final_val_nme", "best_val_nme", "mean_shape_nme", "collapse"):
        assert key in summary
    assert not set(VOLATILE_KEYS) & set(summary)  # timings and run id: timings/train_bce.json and MLflow
    timing = json.loads((repo / "timings/train_bce.json").read_text())
    assert timing["seconds"] > 0 and [r["epoch"] for r in timing["epochs"]] == [1, 2]
    with open(repo / "metrics/train_bce_epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(T.EPOCH_COLUMNS) and [r["epoch"] for r in rows] == ["1", "2"]
    model = load_model(repo / "models/bce/model.pt")
    assert not model.training and model(torch.rand(1, 1, 32, 32)).shape == (1, 68, 8, 8)
    assert (repo / "checkpoints/bce/last.pt").is_file()

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("facemarks").experiment_id])
    assert run.info.run_name == "bce" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.005" and run.data.params["loss"] == "bce"
    assert run.data.params["train.epochs_phase2"] == "1" and run.data.params["encode.sigma"] == "1.0"
    tags = run.data.tags
    assert tags["loss"] == "bce" and tags["dvc.stage"] == "train@bce" and tags["dvc.exp_name"] == "probe"
    assert "git.commit" in tags
    history = client.get_metric_history(run.info.run_id, "val_nme")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([float(r["val_nme"]) for r in rows])
    assert run.data.metrics["collapse"] in (0.0, 1.0) and "mean_shape_nme" in run.data.metrics
    assert run.data.metrics["images_per_s"] > 0 and run.data.metrics["train_seconds"] > 0
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "loss_curves_bce.png" in artifacts
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run.info.run_id]
    loaded = mlflow.pytorch.load_model(f"models:/{logged[0].model_id}")
    with torch.no_grad():
        assert torch.allclose(loaded(torch.zeros(1, 1, 32, 32)), model(torch.zeros(1, 1, 32, 32)), atol=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_nodes_meet_at_a_c10d_rendezvous_and_only_rank0_writes(tmp_path):
    """Two torchrun agents, as on two machines (``--nnodes=2``, one process each), meet at an explicit c10d
    rendezvous endpoint on 127.0.0.1 (the README's multi-node command, not the ``--standalone`` shortcut) and train
    one DDP model over gloo; only global rank 0 logs and writes."""
    repo = _stage_repo(tmp_path, epochs=(1, 1), batch=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    logs, port = tmp_path / "logs", _free_port()
    agents = []
    for node in (0, 1):  # node 0 hosts the rendezvous store, as the machine named in --rdzv-endpoint would
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=facemarks-test",
               f"--rdzv-conf=is_host={int(node == 0)}", "--local-addr=127.0.0.1", "--max-restarts=0",
               "--log-dir", str(logs / f"node{node}"), "--redirects", "3",
               str(ROOT / "stages" / "train.py"), "--loss", "mse"]
        agents.append(subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True))
    try:
        results = [(a.communicate(timeout=300), a.returncode) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    out = {node: "".join(p.read_text() for p in (logs / f"node{node}").rglob("std*.log")) for node in (0, 1)}
    assert all(rc == 0 for _, rc in results), ([err[-3000:] for (_, err), _ in results], out)
    rank0 = [text for text in out.values() if "train@mse: val NME" in text]
    assert len(rank0) == 1 and "mse epoch 2/2" in rank0[0], out  # exactly one global rank 0, on either node
    rank1 = next(text for text in out.values() if "train@mse: val NME" not in text)
    assert "epoch" not in rank1 and "val NME" not in rank1
    assert (repo / "models/mse/model.pt").is_file() and (repo / "metrics/train_mse.json").is_file()
    assert sorted(p.name for p in (repo / "checkpoints/mse").iterdir()) == ["last.pt"]
    import mlflow

    runs = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("facemarks").experiment_id])
    assert [r.info.run_name for r in runs] == ["mse"] and runs[0].data.params["world_size"] == "2"
    summary = json.loads((repo / "metrics/train_mse.json").read_text())
    assert summary["n_train"] == 8 and summary["epochs"] == 2


# ------------------------------------------------------------------------------------------------ seeds, weak peaks
def test_training_seed_comes_from_train_seed_not_the_data_seed():
    from facemarks.core.params import parse_params

    p = parse_params({"base": {"seed": 5}, "train": {"seed": 11}})
    assert T.TrainConfig.from_params(p.train, p.base, p.encode).seed == 11


def test_weak_peaks_on_synthetic_maps():
    codec = HeatmapCodec(32, 8, 1.0)
    points = torch.from_numpy(np.random.default_rng(0).uniform(1, 30, (3, 68, 2)))
    target, _ = codec.encode(points, torch.ones(3, 68, dtype=torch.bool))
    weights = torch.ones(3, 68)
    weights[0, :10] = 0  # not counted
    assert V.weak_peaks(torch.zeros_like(target), target, weights) == (194, 194)  # predicts zeros: share 1.0
    assert V.weak_peaks(target, target, weights) == (0, 194)  # the exact target: share 0.0
    half = target.clone()
    half[1] *= 0.45  # face 1: peaks below half the target's
    half[2] *= 0.55  # face 2: above
    assert V.weak_peaks(half, target, weights) == (68, 194)
    wrong_place = torch.roll(target, shifts=3, dims=-1)  # a strong peak in the wrong place is not weak
    assert V.weak_peaks(wrong_place, target, weights)[0] < 194


def test_fit_records_weak_peak_share_and_collapse_per_epoch(tmp_path):
    data = load(make_data(tmp_path))
    result = T.fit(dataclasses.replace(TINY, epochs_phase1=1, epochs_phase2=0, lr=1e-9), data, "bce", tmp_path / "c")
    row = result.history[-1]
    assert 0.0 <= row["val_weak_peak_share"] <= 1.0 and row["val_collapse"] == 1.0
    # an untrained BCE net starts at the target prior (sigmoid ~ mean target): every peak is weak
    assert row["val_weak_peak_share"] == 1.0 == result.summary["final_weak_peak_share"]
    write_outputs(result, tmp_path / "m.pt", tmp_path / "s.json", tmp_path / "e.csv")
    with open(tmp_path / "e.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["val_weak_peak_share"]) == 1.0 and float(rows[-1]["val_collapse"]) == 1.0
    assert json.loads((tmp_path / "s.json").read_text())["final_weak_peak_share"] == 1.0
