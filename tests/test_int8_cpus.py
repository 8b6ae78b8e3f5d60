"""studies/int8_cpus.py: the int8 guard measured with fp32 and int8 heatmaps computed on an emulated CPU without VNNI
(a worker process under ``qemu-x86_64 -cpu EPYC-Rome``), on a tiny three-layer network exported and quantised as the stage does."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import VOLATILE, json_keys
from facemarks.core.store import write_split
from facemarks.serving import export

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (apt-get install qemu-user) is not installed")


def load_study():
    spec = importlib.util.spec_from_file_location("int8_cpus", ROOT / "studies" / "int8_cpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_study()


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)


class TinyNet(nn.Module):
    """Three convolutions, 64 px crops -> 68 maps of 16 x 16 (stride 4), the interface :func:`export.export_onnx`
    needs (``num_keypoints``). Not the ResNet18 HeatmapNet: under QEMU its fp32 convolutions run in emulated
    floating point at about 17 s per 96 px face, and these tests must take seconds. The first layer's weights are all
    positive (the largest tap of each filter quantises to 127, the others to at least 64) and random crops are bright
    half the time, so neighbouring u8 x s8 products of 8-bit weights exceed 32767 in pairs (255 x 127 + 255 x 64):
    a saturating kernel changes them, while 7-bit weights stay below it (255 x 63 x 2 = 32130)."""

    num_keypoints = 68

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.final = nn.Conv2d(16, 68, 1)
        with torch.no_grad():
            self.conv1.weight.uniform_(0.5, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(torch.relu(self.conv2(torch.relu(self.conv1(x - 0.5)))))


@pytest.fixture(scope="module")
def models(tmp_path_factory, crops) -> dict[str, Path]:
    """The seeded :class:`TinyNet` exported to ``exports/mse/model.onnx``, with its int8 twins (``full`` and
    ``reduced`` weights, calibrated on ``crops``) beside it."""
    root = tmp_path_factory.mktemp("int8cpus")
    torch.manual_seed(0)
    fp32 = export.export_onnx(TinyNet().eval(), "mse", root / "exports" / "mse" / "model.onnx", SIZE)
    out = {"root": root, "fp32": fp32}
    for weights in ("full", "reduced"):
        out[weights] = export.quantize_int8(fp32, root / f"{weights}.onnx", crops, seed=0, weights=weights)
    return out


def test_the_emulated_runner_returns_the_native_heatmaps_under_a_plain_prefix(models, crops):
    """With ``env`` in place of the emulator the worker runs natively: the same heatmaps, bit for bit, as onnxruntime
    in this process (same file, same thread count), computed without torch, and computed once per crops."""
    for name in ("fp32", "full", "reduced"):
        native = study.runner(models[name], "native")
        plain = study.runner(models[name], "plain", emulator="env")
        assert isinstance(plain, study.EmulatedHeatmaps) and plain.input_size == native.input_size == SIZE
        a, b = native(crops, 4), plain(crops, 4)
        assert b.shape == (6, 68, SIZE // 4, SIZE // 4) and b.dtype == np.float32
        assert np.array_equal(a, b), name
        assert plain.reported["emulated_as"] == "plain" and plain.reported["torch_imported"] is False
        assert plain.reported["features_reported"] == study.cpuid_features()  # the host's own CPUID
        assert plain(crops, 4) is b  # memoised: the guard asks for the fp32 maps once per int8 file


def test_a_failing_worker_raises_with_its_command(models, crops):
    with pytest.raises(RuntimeError, match="false .*exited 1"):
        study.runner(models["fp32"], "x", emulator="false")(crops)


def test_cpuid_sees_the_flags_of_proc_cpuinfo():
    """The worker's CPUID check agrees with /proc/cpuinfo on this (unemulated) machine."""
    from facemarks.core import cpuinfo

    got = study.cpuid_features()
    flags = cpuinfo.flags()
    for name in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"):
        assert got[name] == (name in flags), name
    assert got["vnni"] == cpuinfo.has_vnni()


@needs_qemu
def test_under_epyc_rome_7_bit_weights_give_the_native_heatmaps(models, crops):
    """EPYC-Rome (AVX2 + FMA, no AVX-512, no VNNI) through CPUID, so onnxruntime takes its AVX2 u8 x s8 kernels
    (``vpmaddubsw``). With 7-bit weights no pair of products saturates (255 x 64 x 2 < 32767): the integer
    accumulators equal the VNNI ones, and what follows (requantisation, dequantisation) is elementwise float
    arithmetic, correctly rounded on either ISA; the maps may differ only by float rounding (1e-6 of a peak of about
    1). The fp32 model differs by float rounding too (other summation order of the AVX2 and AVX-512 kernels: the
    export's parity tolerance, 1e-4). 8-bit weights differ more: their pairs saturate."""
    emulated = {name: study.runner(models[name], "EPYC-Rome") for name in ("fp32", "full", "reduced")}
    native = {name: study.runner(models[name], "native") for name in emulated}
    diff = {name: float(np.abs(emulated[name](crops) - native[name](crops)).max()) for name in emulated}
    seen = emulated["reduced"].reported
    assert seen["emulated_as"] == "EPYC-Rome" and seen["torch_imported"] is False
    features = seen["features_reported"]
    assert features["avx2"] and features["fma"] and features["ymm_enabled"]
    assert not (features["avx512f"] or features["vnni"])
    assert diff["reduced"] <= 1e-6, diff
    assert diff["fp32"] <= export.HEATMAP_TOLERANCE, diff
    assert diff["full"] > 10 * max(diff["reduced"], 1e-7), diff


def tiny_workspace(root: Path, crops: np.ndarray, fp32: Path) -> Path:
    """A workspace as the study reads it: params.yaml (no real photos: ``evaluate.peers: false``), the train and
    test splits, ``exports/mse/model.onnx``, one git commit."""
    ws = root / "ws"
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["evaluate"]["peers"] = False
    params["export"]["calibration_faces"] = 4
    (ws / "exports" / "mse").mkdir(parents=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    shutil.copy(fp32, ws / "exports" / "mse" / "model.onnx")
    n = len(crops)
    points = np.random.default_rng(1).uniform(0.25 * SIZE, 0.75 * SIZE, (n, 68, 2))
    arrays = {"images": crops, "points": points.astype(np.float32), "visible": np.ones((n, 68), bool),
              "transform": np.repeat(np.eye(3)[None], n, 0), "orig_points": points,
              "boxes": np.tile([0.0, 0.0, SIZE, SIZE], (n, 1))}
    for split in ("train", "test"):
        write_split(ws / "data" / "augmented" / split, arrays, {"size": SIZE})
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t.invalid", "PATH": "/usr/bin:/bin"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "ws"]):
        subprocess.run(["git", "-C", str(ws), *cmd], check=True, env=env, capture_output=True)
    return ws


@needs_qemu
def test_the_study_runs_end_to_end_on_native_and_epyc_rome(tmp_path, models, crops, capsys):
    ws = tiny_workspace(tmp_path, crops, models["fp32"])
    out = tmp_path / "int8_cpus.json"
    assert study.main(["--workspace", str(ws), "--losses", "mse", "--faces", "4", "--out", str(out)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    head = subprocess.run(["git", "-C", str(ws), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert doc["workspace_commit"] == head and doc["workspace_modified"] == []
    assert doc["test_faces"] == 4 and doc["photos"].startswith("no real photos")
    rows = {(r["machine"], r["weights"]): r for r in doc["rows"]}
    assert set(rows) == {(m, w) for m in ("native", "EPYC-Rome") for w in ("full", "reduced")}
    assert rows["native", "reduced"]["checks"]["test"]["n_faces"] == 4
    for key in ("test_delta_dark", "max_delta"):  # integer arithmetic is exact on either CPU: the same NME
        assert rows["EPYC-Rome", "reduced"][key] == pytest.approx(rows["native", "reduced"][key], abs=1e-6)
    assert doc["emulated"]["EPYC-Rome"]["emulator"] == "qemu-x86_64 -cpu EPYC-Rome"
    assert not doc["emulated"]["EPYC-Rome"]["features_reported"]["vnni"]
    assert doc["host_processor"]["model"] and doc["ort_version"] == doc["emulated"]["EPYC-Rome"]["ort_version"]
    assert not [k for k in json_keys(doc) if VOLATILE.search(k)]  # a metrics file: no timings
    printed = capsys.readouterr().out
    assert "| EPYC-Rome | mse | reduced |" in printed and "wrote" in printed
    assert list(ws.glob("exports/mse/*")) == [ws / "exports" / "mse" / "model.onnx"]  # nothing written there


def test_a_missing_emulator_is_one_line(tmp_path, capsys):
    assert study.main(["--workspace", str(tmp_path), "--emulator", "no-such-emulator-xyz -cpu {cpu}"]) == 2
    assert "no-such-emulator-xyz not found" in capsys.readouterr().err


def test_the_worker_mode_is_runnable_as_a_script(models, crops, tmp_path):
    """``python studies/int8_cpus.py --worker ...`` (what the emulator runs) writes the heatmaps and one JSON line."""
    np.save(tmp_path / "c.npy", crops[:2])
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / "int8_cpus.py"), "--worker", str(models["reduced"]),
                           str(tmp_path / "c.npy"), str(tmp_path / "h.npy"), "--emulated-as", "x"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["emulated_as"] == "x"
    assert np.load(tmp_path / "h.npy").shape == (2, 68, SIZE // 4, SIZE // 4)


def test_stage_agreement_compares_only_checks_over_the_same_faces(tmp_path):
    """A ``--faces`` subset of the test split is another mean than the stage's full split: not compared, listed."""
    def check(n, delta):
        return {"n_faces": n, "nme_delta": {"dark": delta, "argmax": 2 * delta}}

    (tmp_path / "metrics").mkdir()
    stage = {"mse": {"int8": {"weights": "full", "checks": {"test": check(300, 0.02), "photos": check(2, 0.05)}}}}
    (tmp_path / "metrics" / "export.json").write_text(json.dumps(stage), encoding="utf-8")
    rows = [{"machine": "native", "loss": "mse", "weights": "full", "checks": {"test": check(64, 0.09),
                                                                              "photos": check(2, 0.04)}},
            {"machine": "native", "loss": "mse", "weights": "reduced", "checks": {"test": check(300, 0.5)}},
            {"machine": "EPYC-Rome", "loss": "mse", "weights": "full", "checks": {"test": check(300, 0.5)}}]
    got = study.stage_agreement(tmp_path, rows)
    assert set(got) == {"mse"} and got["mse"]["checks"] == ["photos"]
    assert got["mse"]["max_abs_difference"] == pytest.approx(0.02)  # argmax: |0.08 - 0.10|
    assert got["mse"]["skipped"] == {"test": {"study_faces": 64, "stage_faces": 300}}
    rows[0]["checks"]["photos"] = check(3, 0.04)
    assert study.stage_agreement(tmp_path, rows)["mse"]["max_abs_difference"] is None
