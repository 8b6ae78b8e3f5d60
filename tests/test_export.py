"""facemarks.serving.export and facemarks.serving.runtime: real ONNX export of a real HeatmapNet, onnxruntime vs torch parity, the
torch-free runtime, and the `export` stage's outputs in the tiny pipeline (ONNX files, metrics, MLflow onnx flavour)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from facemarks.core import cpuinfo

from facemarks.serving import export
from facemarks.serving.inference import make_codec
from facemarks.training.model import GREY_MEAN, GREY_STD, build_model, images_to_tensor
from facemarks.serving.runtime import OnnxHeatmaps

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # the default input size (params.yaml augment.size)
SIGMA = 1.5


def fitted_model(loss: str, images: np.ndarray) -> nn.Module:
    """A seeded HeatmapNet of the default size (head width 64) whose maps look trained: BatchNorm statistics taken
    from ``images``, then the last 1x1 layer solved by least squares so that the maps approximate Gaussians
    (sigma 1.5 map px; logits of them for ``bce``) at random points. An untrained model's maps are flat, and on flat
    maps every decoder turns float rounding into pixels (``export.peaked``), so it would not test parity."""
    torch.manual_seed(0)
    model = build_model(68, head_width=64, prior=0.02 if loss == "bce" else None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
    x = images_to_tensor(images)
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    n, size = len(images), images.shape[-1]
    points = torch.from_numpy(np.random.default_rng(1).uniform(0.25 * size, 0.75 * size, (n, 68, 2))).float()
    heat, _ = make_codec(size, SIGMA).encode(points, torch.ones(n, 68, dtype=torch.bool))  # (N, K, h, w)
    with torch.no_grad():
        feats = model.head(model.backbone((x - GREY_MEAN) / GREY_STD))  # (N, C, h, w)
        a = torch.cat([feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), torch.ones(feats[:, 0].numel(), 1)], 1)
        b = heat.permute(0, 2, 3, 1).reshape(-1, 68)
        b = torch.logit(b.clamp(1e-3, 1 - 1e-3)) if loss == "bce" else b
        sol = torch.linalg.lstsq(a.double(), b.double()).solution.float()  # (C + 1, K)
        model.final.weight.copy_(sol[:-1].T[:, :, None, None])
        model.final.bias.copy_(sol[-1])
    return model


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, crops) -> dict[str, tuple[nn.Module, Path]]:
    """Per loss: the model and its ONNX file, laid out as the pipeline does (``models/<loss>/model.pt`` and
    ``exports/<loss>/model.onnx`` exported from it) under one folder, ``path.parents[2]``."""
    out = tmp_path_factory.mktemp("layout")
    models = {}
    for loss in ("mse", "bce"):
        model = fitted_model(loss, crops)
        pt = out / "models" / loss / "model.pt"
        pt.parent.mkdir(parents=True)
        torch.save(model.state_dict(), pt)
        models[loss] = (model, export.export_onnx(model, loss, out / "exports" / loss / "model.onnx", SIZE, source=pt))
    return models


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_onnxruntime_matches_torch_heatmaps_and_decoded_points(exported, crops, loss):
    model, path = exported[loss]
    runtime = OnnxHeatmaps(path)
    assert (runtime.input_size, runtime.num_keypoints, runtime.loss) == (SIZE, 68, loss)
    result = export.parity(model, loss, runtime, crops, sigma=SIGMA)
    assert result["max_abs_heatmap_diff"] <= 1e-4, result
    assert result["max_point_diff_px_any"] <= export.POINT_TOLERANCE_PX, result
    assert set(result["max_point_diff_px"]) == {"argmax", "argmax_quarter", "weighted_average",
                                                "local_weighted_average", "soft_argmax", "dark", "subpixel"}
    assert result["n_points_compared"] >= 0.4 * result["n_points"], "too few peaked maps: the check is vacuous"
    assert result["ok"]
    export.check_parity(result, str(path))
    heat = runtime(crops)
    assert heat.shape == (6, 68, SIZE // 4, SIZE // 4) and heat.dtype == np.float32
    if loss == "bce":
        assert heat.min() >= 0 and heat.max() <= 1  # the sigmoid is in the graph


def test_exported_files_name_no_path_of_the_machine_that_exported_them(exported, int8_layout):
    """torch's exporter records a stack trace per node with the absolute paths of the source files; they are dropped,
    so a clone anywhere exports the same bytes (DVC's hash of exports/ too) and a shipped file names no local path."""
    import onnx

    for path in (exported["mse"][1], exported["bce"][1], int8_layout["int8"]):
        data = path.read_bytes()
        assert str(ROOT).encode() not in data and b"facemarks/training/model.py" not in data, path
        keys = {m.key for n in onnx.load(str(path)).graph.node for m in n.metadata_props}
        assert export.STACK_TRACE_KEY not in keys, (path, keys)
    assert "pkg.torch.onnx.name_scopes" in {m.key for n in onnx.load(str(exported["mse"][1])).graph.node
                                            for m in n.metadata_props}  # the rest of the exporter's notes stay


def test_batch_axis_is_dynamic_and_batching_changes_nothing(exported, crops):
    runtime = OnnxHeatmaps(exported["mse"][1])
    whole = runtime(crops, batch_size=64)
    one_by_one = runtime(crops, batch_size=1)
    odd = runtime(crops, batch_size=4)  # batches of 4 and 2
    assert np.abs(whole - one_by_one).max() <= 1e-5 and np.abs(whole - odd).max() <= 1e-5


def test_a_wrong_export_fails_parity(tmp_path, exported, crops):
    """The check can fail: a BCE model exported without its sigmoid (as if it were MSE) is refused."""
    model = exported["bce"][0]
    path = export.export_onnx(model, "mse", tmp_path / "wrong.onnx", SIZE)
    result = export.parity(model, "bce", OnnxHeatmaps(path), crops, sigma=SIGMA)
    assert not result["ok"] and result["max_abs_heatmap_diff"] > 1e-4
    with pytest.raises(export.ParityError, match="wrong.onnx"):
        export.check_parity(result, str(path))


def test_peaked_flags_flat_and_tied_maps():
    maps = np.zeros((1, 5, 8, 8), np.float32)
    maps[0, 0, 3, 4] = 1.0  # one clear peak, leaning right and down: an unambiguous quarter-pixel step
    maps[0, 0, 3, 5] = maps[0, 0, 4, 4] = 0.5
    maps[0, 1] = 0.3  # flat
    maps[0, 2, 1, 1] = maps[0, 2, 6, 6] = 1.0  # two equal peaks far apart
    maps[0, 3, 3, 4] = 1.0  # a peak whose left and right neighbours tie: argmax_quarter's step flips on rounding
    maps[0, 3, 4, 4] = 0.5
    # a max tied with a (diagonal) neighbour: argmax, and DARK or sub-pixel from it, moves a whole cell on rounding
    # (seen: 0.850703 beside 0.850703 turned 4 px of argmax between torch and onnxruntime, at 5e-7 heatmap difference)
    maps[0, 4, 3, 4], maps[0, 4, 4, 5] = 1.0, 1.0 - 1e-7
    maps[0, 4, 3, 5] = maps[0, 4, 4, 4] = 0.6  # the quarter-pixel steps are clear: right over left, down over up
    maps[0, 4, 3, 3] = maps[0, 4, 2, 4] = 0.4
    assert export.peaked(maps).tolist() == [[True, False, False, False, False]]


def test_runtime_runs_without_torch(exported, crops, tmp_path):
    """facemarks.serving.runtime imports neither torch nor the training stack: a deployment needs onnxruntime only."""
    np.save(tmp_path / "crops.npy", crops)
    code = ("import sys, numpy as np\nfrom facemarks.serving.runtime import OnnxHeatmaps\n"
            f"rt = OnnxHeatmaps({str(exported['bce'][1])!r}, threads=1)\n"
            f"h = rt(np.load({str(tmp_path / 'crops.npy')!r}))\n"
            "bad = sorted(m for m in ('torch', 'mlflow', 'dvc', 'matplotlib') if m in sys.modules)\n"
            "print(h.shape, rt.threads, bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"(6, 68, {SIZE // 4}, {SIZE // 4}) 1 []"


def test_runtime_threads_default_to_the_available_cores(exported):
    from facemarks.serving.runtime import available_cores

    runtime = OnnxHeatmaps(exported["mse"][1])
    assert runtime.threads == available_cores() >= 1
    assert runtime.options.inter_op_num_threads == 1
    with pytest.raises(FileNotFoundError, match="export"):
        OnnxHeatmaps(Path("no/such/model.onnx"))


@pytest.mark.slow
def test_export_stage_writes_onnx_parity_metrics_and_logs_the_onnx_flavour(tiny_repo):
    import mlflow

    report = json.loads((tiny_repo / "metrics/export.json").read_text())
    size = yaml.safe_load((tiny_repo / "params.yaml").read_text())["augment"]["size"]
    assert report["opset"] == export.OPSET
    for loss in ("mse", "bce"):
        r = report[loss]
        assert r["ok"] and r["max_abs_heatmap_diff"] <= 1e-4 and r["max_point_diff_px_any"] <= 1e-3, r
        assert r["n_faces"] > 0 and r["n_points"] == 68 * r["n_faces"]
        runtime = OnnxHeatmaps(tiny_repo / f"exports/{loss}/model.onnx")
        assert (runtime.loss, runtime.input_size) == (loss, size)
        q, int8 = r["int8"], OnnxHeatmaps(tiny_repo / f"exports/{loss}/model.int8.onnx")  # the int8 twin
        assert int8.precision == "int8" and int8.metadata["source_sha256"] == runtime.metadata["source_sha256"]
        assert "test" in q["checks"] and q["checks"]["test"]["n_faces"] == r["n_faces"]
        assert int8.metadata["int8_check"] == ("passed" if q["ok"] else "failed")  # the verdict travels in the file
        assert q["ok"] == (q["max_nme_delta"] <= q["tolerance_nme"]) and not any("ms" in k for k in q)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("facemarks")
    train_runs = {r.data.tags["loss"]: r.info.run_id for r in client.search_runs(
        [exp.experiment_id], "tags.`dvc.stage` LIKE 'train%'")}
    mlflow.set_tracking_uri(f"sqlite:///{tiny_repo / 'mlflow.db'}")
    for loss, rid in train_runs.items():
        models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list",
                                             filter_string=f"source_run_id = '{rid}'")
        flavours = {m.name: set(mlflow.models.get_model_info(f"models:/{m.model_id}").flavors) for m in models}
        assert "onnx" in flavours.get(export.MLFLOW_NAME, set()), (loss, flavours)
        assert "pytorch" in flavours.get("model", set()), (loss, flavours)


def test_predict_uses_the_onnx_twin_only_when_it_was_exported_from_the_chosen_model(tmp_path, exported):
    from facemarks.serving.predict import ModelChoice, load_predictor

    model, twin = exported["mse"]
    root = twin.parents[2]
    choice, exports = ModelChoice(root / "models/mse/model.pt", "mse", "test"), root / "exports"
    predictor, backend, _ = load_predictor(choice, "auto", exports)
    assert backend == "onnx" and isinstance(predictor, OnnxHeatmaps) and predictor.path == twin
    assert load_predictor(choice, "torch", exports)[1] == "torch"
    assert load_predictor(ModelChoice(twin, "mse", "test"), "auto", exports)[1] == "onnx"
    with pytest.raises(ValueError, match="needs a model.pt"):
        load_predictor(ModelChoice(twin, "mse", "test"), "torch", exports)
    predictor, backend, why = load_predictor(choice, "auto", tmp_path / "exports")  # nothing exported there
    assert backend == "torch" and isinstance(predictor, nn.Module) and "no exported model" in why
    with pytest.raises(FileNotFoundError, match="dvc repro export"):
        load_predictor(choice, "onnx", tmp_path / "exports")
    retrained = tmp_path / "models/mse/model.pt"  # another model.pt: the twin was not exported from it
    retrained.parent.mkdir(parents=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}, retrained)
    predictor, backend, why = load_predictor(ModelChoice(retrained, "mse", "test"), "auto", exports)
    assert backend == "torch" and "dvc repro export" in why


def test_whole_image_prediction_is_the_same_on_either_backend(exported):
    from skimage.data import astronaut

    from facemarks.serving.predict import predict_image

    model, path = exported["bce"]
    box = (175.0, 76.0, 91.0, 91.0)  # dlib's box on the astronaut photo (tests/test_cli.py)
    faces = {name: predict_image(net, astronaut(), "bce", box, size=SIZE, sigma=SIGMA, decoder="dark")
             for name, net in (("torch", model), ("onnx", OnnxHeatmaps(path)))}
    assert np.abs(faces["torch"][0]["points"] - faces["onnx"][0]["points"]).max() <= 1e-2
    with pytest.raises(ValueError, match="exported for loss 'bce'"):
        predict_image(OnnxHeatmaps(path), astronaut(), "mse", box, size=SIZE)


def test_cli_predict_runs_on_onnxruntime_by_default_when_the_export_matches(tmp_path, monkeypatch, exported, capsys):
    from facemarks import cli

    monkeypatch.chdir(exported["mse"][1].parents[2])  # models/mse/model.pt and its exports/mse/model.onnx
    docs = {}
    for backend in ("auto", "torch"):
        out = tmp_path / backend
        rc = cli.main(["predict", "--astronaut", "--box", "175,76,91,91", "--loss", "mse", "--backend", backend,
                       "--no-overlay", "--out", str(out), "--params", "absent.yaml", "--size", str(SIZE)])
        assert rc == 0, capsys.readouterr().err
        docs[backend] = json.loads((out / "astronaut.json").read_text())
    assert docs["auto"]["backend"] == "onnx" and docs["torch"]["backend"] == "torch"
    points = [np.asarray(docs[b]["faces"][0]["points"]) for b in ("auto", "torch")]
    assert np.abs(points[0] - points[1]).max() <= 0.01
    rc = cli.main(["predict", "--astronaut", "--loss", "mse", "--backend", "onnx", "--size", "32", "--params",
                   "absent.yaml", "--no-overlay", "--out", str(tmp_path / "x")])
    assert rc == 2 and "takes 64 px" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ int8 (issue 23)
@pytest.fixture(scope="module")
def int8_layout(tmp_path_factory, exported, crops) -> dict[str, Path]:
    """A copy of the mse layout (``models/mse/model.pt``, ``exports/mse/model.onnx``) plus its int8 twin
    ``exports/mse/model.int8.onnx`` (QOperator, calibrated on the 6 crops), as the export stage lays them out."""
    import shutil

    root = tmp_path_factory.mktemp("int8")
    src = exported["mse"][1].parents[2]
    for rel in ("models/mse/model.pt", "exports/mse/model.onnx"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, root / rel)
    fp32 = root / "exports/mse/model.onnx"
    int8 = export.quantize_int8(fp32, fp32.with_name(export.INT8_FILE), crops, fmt="qoperator", seed=3,
                                weights=export.weight_range())  # as the stage does on this CPU
    return {"root": root, "pt": root / "models/mse/model.pt", "fp32": fp32, "int8": int8}


def reference_points(n: int) -> np.ndarray:
    """The points :func:`fitted_model` fitted its maps to ``(n, 68, 2)`` crop px (its ``default_rng(1)`` draw)."""
    return np.random.default_rng(1).uniform(0.25 * SIZE, 0.75 * SIZE, (n, 68, 2))


def test_int8_export_is_a_smaller_quantised_graph_that_runs_and_carries_its_provenance(int8_layout, crops):
    import onnx

    fp32, int8 = OnnxHeatmaps(int8_layout["fp32"]), OnnxHeatmaps(int8_layout["int8"])
    assert int8.path.parent == fp32.path.parent and int8.path.name == "model.int8.onnx"
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    assert (int8.input_size, int8.num_keypoints, int8.loss) == (SIZE, 68, "mse")
    meta = int8.metadata
    assert meta["source_sha256"] == fp32.metadata["source_sha256"]  # the model.pt it comes from, as the fp32 twin
    from facemarks.data.sources import file_sha256

    assert meta["fp32_sha256"] == file_sha256(int8_layout["fp32"])
    assert (meta["quant_format"], meta["calibration_method"], meta["calibration_faces"],
            meta["calibration_seed"]) == ("qoperator", "minmax", "6", "3")
    assert "int8_check" not in meta and not int8.int8_passed  # not checked yet: not passed
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops, ops
    assert int8.path.stat().st_size < 0.4 * fp32.path.stat().st_size  # int8 weights: about a quarter
    h32, h8 = fp32(crops), int8(crops, batch_size=4)
    assert h8.shape == h32.shape and h8.dtype == np.float32
    assert 0 < np.abs(h8 - h32).mean() < 0.02  # quantised, and close


def test_qdq_format_and_calibration_arguments_are_checked(tmp_path, int8_layout, crops):
    import onnx

    path = export.quantize_int8(int8_layout["fp32"], tmp_path / "qdq.onnx", crops[:2], fmt="qdq")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "QLinearConv" not in ops
    assert OnnxHeatmaps(path)(crops).shape == (6, 68, SIZE // 4, SIZE // 4)
    with pytest.raises(ValueError, match="fmt"):
        export.quantize_int8(int8_layout["fp32"], tmp_path / "x.onnx", crops, fmt="int4")
    with pytest.raises(ValueError, match="method"):
        export.quantize_int8(int8_layout["fp32"], tmp_path / "x.onnx", crops, method="mse")
    sample = export.calibration_sample(np.arange(100)[:, None, None] * np.ones((1, 2, 2), np.uint8), 10, seed=0)
    again = export.calibration_sample(np.arange(100)[:, None, None] * np.ones((1, 2, 2), np.uint8), 10, seed=0)
    assert len(sample) == 10 and len(set(sample[:, 0, 0])) == 10 and (sample == again).all()


@pytest.mark.parametrize("weights", ["reduced", "full"])
def test_both_weight_ranges_stay_close_to_fp32_where_they_run_without_saturation(tmp_path, int8_layout, crops,
                                                                                   weights, monkeypatch):
    """7-bit weights run without saturation on every x86-64 CPU; 8-bit ones only with VNNI (skipped elsewhere). Both
    are recorded in the file; ``auto`` resolves from the CPU flags."""
    if weights == "full" and not cpuinfo.has_vnni():
        pytest.skip("8-bit weights saturate u8 x s8 products on a CPU without VNNI: not what auto picks here")
    path = export.quantize_int8(int8_layout["fp32"], tmp_path / f"{weights}.onnx", crops, weights=weights)
    fp32, int8 = OnnxHeatmaps(int8_layout["fp32"]), OnnxHeatmaps(path)
    assert int8.metadata["weights"] == weights
    assert 0 < np.abs(int8(crops) - fp32(crops)).mean() < 0.02
    monkeypatch.setattr(cpuinfo, "flags", lambda: frozenset({"avx2", "fma"}))
    assert export.weight_range("auto") == "reduced" and export.weight_range("full") == "full"
    monkeypatch.setattr(cpuinfo, "flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert export.weight_range("auto") == "full"
    with pytest.raises(ValueError, match="weights"):
        export.quantize_int8(int8_layout["fp32"], tmp_path / "x.onnx", crops, weights="auto")


def test_int8_accuracy_detects_a_damaged_quantisation(tmp_path, int8_layout, crops):
    """The NME guard can fail: the same model calibrated on black crops (activation ranges of nothing) loses many NME
    points against its fp32 twin, the properly calibrated one far fewer; both are measured on the same faces."""
    fp32 = OnnxHeatmaps(int8_layout["fp32"])
    damaged = export.quantize_int8(int8_layout["fp32"], tmp_path / "damaged.onnx", np.zeros_like(crops),
                                   weights=export.weight_range())
    identity = np.repeat(np.eye(3)[None], len(crops), 0)
    ref = reference_points(len(crops))
    good = export.int8_accuracy(fp32, OnnxHeatmaps(int8_layout["int8"]), crops, identity, ref, SIGMA)
    bad = export.int8_accuracy(fp32, OnnxHeatmaps(damaged), crops, identity, ref, SIGMA)
    assert set(good["nme_delta"]) == {"argmax", "argmax_quarter", "weighted_average", "local_weighted_average",
                                      "soft_argmax", "dark", "subpixel"}
    for name, delta in good["nme_delta"].items():
        assert delta == pytest.approx(good["nme_int8"][name] - good["nme_fp32"][name])
    assert good["nme_fp32"] == bad["nme_fp32"]  # the same fp32 reference run
    assert bad["max_nme_delta"] > 2.0 and bad["max_nme_delta"] > 4 * max(good["max_nme_delta"], 0.05), (good, bad)
    assert bad["mean_abs_heatmap_diff"] > 2 * good["mean_abs_heatmap_diff"]
    # a tolerance between the two: on 6 random crops of a fitted random model the good twin itself moves by a few
    # points with 7-bit weights (the range CPUs without VNNI get), 0.3 with 8-bit; the damaged one by 20+
    verdict = export.int8_verdict({"test": good, "photos": bad},
                                  tolerance=(good["max_nme_delta"] + bad["max_nme_delta"]) / 2)
    assert not verdict["ok"] and verdict["failed"] == ["photos"] and verdict["max_nme_delta"] == bad["max_nme_delta"]
    assert export.int8_verdict({"test": good}, tolerance=good["max_nme_delta"])["ok"]
    assert not export.int8_verdict({"test": good}, tolerance=-1)["ok"]
    assert not export.int8_verdict({}, tolerance=100)["ok"]  # nothing checked: not passed


def test_photo_accuracy_crops_whole_photos_as_predict_does(int8_layout):
    """On whole photos (image, box, reference points): the same numbers as cropping them by hand."""
    from skimage.data import astronaut

    from facemarks.augmentation.crops import face_crop

    fp32, int8 = OnnxHeatmaps(int8_layout["fp32"]), OnnxHeatmaps(int8_layout["int8"])
    image, box = astronaut(), (175.0, 76.0, 91.0, 91.0)
    crop, T = face_crop(image, box, SIZE, 0.25)
    ref = np.linalg.inv(T) @ np.c_[reference_points(1)[0], np.ones(68)].T  # crop px -> image px
    ref = ref[:2].T
    by_photo = export.photo_accuracy(fp32, int8, [(image, box, ref)], margin=0.25, sigma=SIGMA)
    by_hand = export.int8_accuracy(fp32, int8, crop[None], T[None], ref[None], SIGMA)
    assert by_photo["n_faces"] == 1 and by_photo["nme_delta"] == pytest.approx(by_hand["nme_delta"])
    with pytest.raises(ValueError, match="no photos"):
        export.photo_accuracy(fp32, int8, [], margin=0.25, sigma=SIGMA)


def test_auto_backend_takes_int8_only_when_its_guard_passed_and_it_matches_the_model(tmp_path, int8_layout):
    """The backend choice: int8 by default only with a passed guard in its own metadata (a failed one, a forced
    failure with tolerance -1, an unchecked one, or one exported from another model.pt falls back to fp32)."""
    import shutil

    from facemarks.serving.predict import ModelChoice, load_predictor

    root = tmp_path / "layout"
    shutil.copytree(int8_layout["root"], root)
    exports, int8 = root / "exports", root / "exports/mse/model.int8.onnx"
    choice = ModelChoice(root / "models/mse/model.pt", "mse", "test")
    model, backend, why = load_predictor(choice, "auto", exports)
    assert backend == "onnx" and model.precision == "fp32" and "did not pass" in why  # unchecked
    export.record_int8_check(int8, export.int8_verdict({"test": {"max_nme_delta": 0.02}}, tolerance=0.1))
    model, backend, why = load_predictor(choice, "auto", exports)
    assert backend == "onnx-int8" and model.path == int8 and model.int8_passed and "guard passed" in why
    assert export.read_metadata(int8)["int8_max_nme_delta"] == "0.02"
    model, backend, _ = load_predictor(choice, "onnx", exports)
    assert backend == "onnx" and model.precision == "fp32"
    assert load_predictor(choice, "torch", exports)[1] == "torch"
    # a copied int8 file carries its verdict: given as --model it reports it
    copied = tmp_path / "elsewhere.onnx"
    shutil.copy(int8, copied)
    model, backend, why = load_predictor(ModelChoice(copied, "mse", "test"), "auto", exports)
    assert backend == "onnx-int8" and "guard passed" in why
    with pytest.raises(ValueError, match="not an int8 model"):
        load_predictor(ModelChoice(root / "exports/mse/model.onnx", "mse", "test"), "onnx-int8", exports)
    # the forced failing guard: tolerance -1 -> failed -> auto keeps fp32; --backend onnx-int8 still runs it, saying so
    export.record_int8_check(int8, export.int8_verdict({"test": {"max_nme_delta": 0.02}}, tolerance=-1))
    model, backend, why = load_predictor(choice, "auto", exports)
    assert backend == "onnx" and model.precision == "fp32" and "did not pass its accuracy guard" in why
    model, backend, why = load_predictor(choice, "onnx-int8", exports)
    assert backend == "onnx-int8" and model.precision == "int8" and "did NOT pass" in why
    # passed, but exported from another model.pt: fp32 twin? also not from it -> torch
    export.record_int8_check(int8, export.int8_verdict({"test": {"max_nme_delta": 0.0}}, tolerance=0.1))
    other = tmp_path / "other/models/mse/model.pt"
    other.parent.mkdir(parents=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(
        choice.path, weights_only=True).items()}, other)
    predictor, backend, why = load_predictor(ModelChoice(other, "mse", "test"), "auto", exports)
    assert backend == "torch" and "model.int8.onnx was not exported from" in why
    # passed for some decoders only (argmax's grid steps moved, DARK's points did not): int8 serves DARK alone
    checks = {"test": {"max_nme_delta": 0.3, "nme_delta": {"argmax": 0.3, "dark": 0.02}},
              "photos": {"max_nme_delta": 0.05, "nme_delta": {"argmax": -0.1, "dark": 0.05}}}
    verdict = export.int8_verdict(checks, tolerance=0.1)
    assert not verdict["ok"] and verdict["decoders_passed"] == ["dark"]
    assert export.used_by_predict(verdict).startswith("int8 with the dark decoders")
    export.record_int8_check(int8, verdict)
    assert load_predictor(choice, "auto", exports, decoder="dark")[1] == "onnx-int8"
    assert "for the dark decoder" in load_predictor(choice, "auto", exports, decoder="dark")[2]
    assert load_predictor(choice, "auto", exports, decoder="argmax")[1] == "onnx"
    assert load_predictor(choice, "auto", exports)[1] == "onnx"  # no decoder named: every decoder must pass
    with pytest.raises(FileNotFoundError, match="dvc repro export"):
        load_predictor(choice, "onnx-int8", tmp_path / "nothing")
    with pytest.raises(ValueError, match="onnx-int8"):
        load_predictor(choice, "int8", exports)


def test_int8_with_8_bit_weights_is_not_served_on_a_cpu_without_vnni(tmp_path, int8_layout, crops, monkeypatch):
    """An int8 file's guard holds where its products do not saturate: 8-bit weights exported on a VNNI CPU (a
    colleague's export, pulled from the DVC remote) fall back to fp32 on a CPU without VNNI; 7-bit weights are
    served on both."""
    import shutil

    from facemarks.serving.predict import ModelChoice, load_predictor

    root = tmp_path / "layout"
    shutil.copytree(int8_layout["root"], root)
    exports, int8 = root / "exports", root / "exports/mse/model.int8.onnx"
    choice = ModelChoice(root / "models/mse/model.pt", "mse", "test")
    vnni, plain = frozenset({"avx2", "fma", "avx512_vnni"}), frozenset({"avx2", "fma"})
    for weights, served_without_vnni in (("full", False), ("reduced", True)):
        monkeypatch.setattr(cpuinfo, "flags", lambda: vnni)  # quantised and checked on a VNNI CPU
        export.quantize_int8(root / "exports/mse/model.onnx", int8, crops, weights=weights)
        export.record_int8_check(int8, export.int8_verdict({"test": {"max_nme_delta": 0.0}}, tolerance=0.1))
        assert load_predictor(choice, "auto", exports, decoder="dark")[1] == "onnx-int8"
        monkeypatch.setattr(cpuinfo, "flags", lambda: plain)  # the same files on a CPU without VNNI
        _, backend, why = load_predictor(choice, "auto", exports, decoder="dark")
        assert OnnxHeatmaps(int8).saturates_here is not served_without_vnni
        assert OnnxHeatmaps(int8).int8_passed_for("dark") is served_without_vnni
        assert backend == ("onnx-int8" if served_without_vnni else "onnx"), why
        if not served_without_vnni:
            assert "8-bit weights, which saturate on this CPU without VNNI" in why


def test_cli_predict_backend_onnx_int8(tmp_path, monkeypatch, int8_layout, capsys):
    import shutil

    from facemarks import cli

    root = tmp_path / "layout"
    shutil.copytree(int8_layout["root"], root)
    export.record_int8_check(root / "exports/mse/model.int8.onnx",
                             export.int8_verdict({"test": {"max_nme_delta": 0.0}}, tolerance=0.1))
    monkeypatch.chdir(root)
    docs = {}
    for backend in ("onnx-int8", "auto", "onnx"):
        rc = cli.main(["predict", "--astronaut", "--box", "175,76,91,91", "--loss", "mse", "--backend", backend,
                       "--no-overlay", "--out", str(tmp_path / backend), "--params", "absent.yaml"])
        assert rc == 0, capsys.readouterr().err
        docs[backend] = json.loads((tmp_path / backend / "astronaut.json").read_text())
    assert [docs[b]["backend"] for b in ("onnx-int8", "auto", "onnx")] == ["onnx-int8", "onnx-int8", "onnx"]
    points = [np.asarray(docs[b]["faces"][0]["points"]) for b in ("onnx-int8", "auto", "onnx")]
    assert all(p.shape == (68, 2) and np.isfinite(p).all() for p in points)
    assert (points[0] == points[1]).all() and (points[0] != points[2]).any()  # auto ran the int8 file, not fp32


def test_the_onednn_isa_cap_turns_native_bf16_off_and_narrows_the_peak(monkeypatch):
    """Under ``ONEDNN_MAX_CPU_ISA=AVX2`` a CPU with AMX trains as an AVX2 CPU would: no bf16 autocast, an 8-lane fp32
    peak, and the cap recorded beside any number measured under it; int8's VNNI follows the hardware."""
    from facemarks.training.precision import amp_active

    monkeypatch.setattr(cpuinfo, "flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                             "amx_bf16", "amx_int8"}))
    for var in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    assert cpuinfo.has_native_bf16() and amp_active(torch.device("cpu"), True) and "isa_cap" not in cpuinfo.describe()
    assert cpuinfo.peak_gflops(2, 2.0) == 2 * 2.0 * 64 and cpuinfo.peak_gflops(2, 2.0, bf16_amx=True) == 2 * 2.0 * 2048
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert not cpuinfo.has_native_bf16() and not amp_active(torch.device("cpu"), True) and cpuinfo.has_vnni()
    assert cpuinfo.peak_gflops(2, 2.0) == cpuinfo.peak_gflops(2, 2.0, bf16_amx=True) == 2 * 2.0 * 32
    assert cpuinfo.describe()["isa_cap"] == {"onednn": "AVX2", "aten": "avx2"}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # AVX-512 without its bf16 instructions
    assert not cpuinfo.has_native_bf16() and cpuinfo.peak_gflops(2, 2.0) == 2 * 2.0 * 64
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert cpuinfo.has_native_bf16()
