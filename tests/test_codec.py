"""facemarks.heatmaps.codec: coordinates, encode, the seven decoders, round-trip bounds (issue 4), file writing, stage."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import THREADS

from facemarks.heatmaps import codec
from facemarks.heatmaps.codec import DECODERS, HeatmapCodec, decode, encode, in_map, to_input, to_map

ROOT = Path(__file__).resolve().parents[1]
H = W = 56  # the reference map size
PROPERTY = settings(max_examples=15, derandomize=True, deadline=None)


def _points(seed: int, n: int, k: int, lo: float, hi: float) -> np.ndarray:
    """Uniform map-px points ``(n, k, 2)`` in ``[lo, hi]^2``."""
    return np.random.default_rng(seed).uniform(lo, hi, size=(n, k, 2))


def _border_points(seed: int, n: int) -> np.ndarray:
    """``(n, 1, 2)`` points on the 56x56 map with one coordinate within 1 px of an edge (-0.5 or 55.5)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-0.5, W - 0.5, size=(n, 1, 2))
    depth = rng.uniform(0, 1, size=n)  # distance from the edge
    axis = rng.integers(0, 2, size=n)  # 0: left / right edge, 1: top / bottom edge
    low = rng.integers(0, 2, size=n).astype(bool)
    pts[np.arange(n), 0, axis] = np.where(low, -0.5 + depth, W - 0.5 - depth)
    return pts


def _err(points: np.ndarray, sigma: float, method: str, dtype: str = "float32", **kw) -> np.ndarray:
    """Euclidean round-trip error (map px) of in-map points ``(N, K, 2)`` on a 56x56 map."""
    heat, weights = encode(points, np.ones(points.shape[:2], bool), (H, W), sigma, dtype)
    assert weights.min() == 1
    pred, _ = decode(heat, method, **kw)
    return np.linalg.norm(pred - points, axis=-1)


# ------------------------------------------------------------------------------------------------ coordinates
def test_to_map_and_to_input_are_inverse_and_align_pixel_edges():
    x = np.array([-0.5, 0.0, 1.5, 223.5])
    u = to_map(x, 4.0)
    np.testing.assert_allclose(u, [-0.5, -0.375, 0.0, 55.5])  # image edge -> map edge
    np.testing.assert_allclose(to_input(u, 4.0), x)
    assert torch.allclose(to_input(to_map(torch.tensor(x), 4.0), 4.0), torch.tensor(x, dtype=torch.float64))


def test_in_map_bounds_are_inclusive_pixel_edges_and_reject_nan():
    pts = np.array([[[-0.5, 0], [55.5, 55.5], [-0.51, 3], [3, 55.51], [np.nan, 2]]])
    assert in_map(pts, (H, W)).tolist() == [[True, True, False, False, False]]


# ------------------------------------------------------------------------------------------------ encode
@pytest.mark.parametrize("dtype", ["float16", "float32", torch.float32, np.float64])
def test_encode_shapes_and_dtypes_numpy_and_torch(dtype):
    want = {"float16": np.float16, "float32": np.float32, torch.float32: np.float32, np.float64: np.float64}[dtype]
    pts = _points(0, 3, 68, 0, 30)
    vis = np.ones((3, 68), bool)
    heat, weights = encode(pts, vis, (32, 40), 1.5, dtype)
    assert isinstance(heat, np.ndarray) and heat.shape == (3, 68, 32, 40) and heat.dtype == want
    assert isinstance(weights, np.ndarray) and weights.shape == (3, 68) and weights.dtype == np.float32
    theat, tweights = encode(torch.from_numpy(pts), torch.from_numpy(vis), (32, 40), 1.5, dtype)
    assert isinstance(theat, torch.Tensor) and theat.shape == (3, 68, 32, 40) and tweights.dtype == torch.float32
    np.testing.assert_array_equal(theat.numpy(), heat)
    np.testing.assert_array_equal(tweights.numpy(), weights)


def test_encode_is_the_exact_untruncated_gaussian_with_peak_one():
    pts = np.array([[[10.0, 20.0], [0.3, 55.2], [-0.5, -0.5]]])
    sigma = 2.0
    heat, _ = encode(pts, np.ones((1, 3), bool), (H, W), sigma, "float64")
    rows, cols = np.mgrid[0:H, 0:W]
    for j, (x, y) in enumerate(pts[0]):
        want = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))
        np.testing.assert_allclose(heat[0, j], want, rtol=1e-12, atol=1e-300)
    assert heat[0, 0, 20, 10] == 1.0
    assert heat[0, 0].min() > 0  # the whole map carries the (tiny) tail: no truncation window


def test_float16_maps_equal_float32_maps_rounded_once():
    pts = _points(1, 4, 68, -0.5, W - 0.5)
    vis = np.ones((4, 68), bool)
    h32, _ = encode(pts, vis, (H, W), 1.7, "float32")
    h16, _ = encode(pts, vis, (H, W), 1.7, "float16")
    np.testing.assert_array_equal(h16, h32.astype(np.float16))


def test_off_map_and_invisible_points_get_weight_zero_and_an_empty_map_never_snapped():
    pts = np.array([[[-0.6, 10], [10, 55.7], [80, 80], [np.nan, 3], [10, 10], [55.5, -0.5]]])
    vis = np.array([[True, True, True, True, False, True]])
    heat, weights = encode(pts, vis, (H, W), 1.5)
    assert weights.tolist() == [[0, 0, 0, 0, 0, 1]]
    assert not heat[0, :5].any()
    assert heat[0, 5].max() == pytest.approx(np.exp(-0.5 / (2 * 1.5**2)))  # the corner point on the edge is kept
    # a point 0.1 px outside must not leave a Gaussian next to the border (which a clamp would do)
    table = codec.roundtrip_table(to_input(pts, 4.0), vis, HeatmapCodec(224, 56, 1.5), decoders=("subpixel",))
    assert table["n_visible"] == 5 and table["n_encoded"] == 1 and table["n_off_map"] == 4


def test_encode_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        encode(np.zeros((1, 1, 2)), np.ones((1, 1), bool), (8, 8), 0.0)
    with pytest.raises(ValueError, match="visible"):
        encode(np.zeros((1, 2, 2)), np.ones((1, 3), bool), (8, 8), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        encode(np.zeros((1, 1, 2)), np.ones((1, 1), bool), (8, 8), 1.0, "int8")


# ------------------------------------------------------------------------------------------------ round-trip bounds (issue 4)
@PROPERTY
@given(seed=st.integers(0, 2**16), sigma=st.floats(1.0, 3.0))
def test_subpixel_roundtrip_in_frame_mean_1e3_max_1e2(seed, sigma):
    err = _err(_points(seed, 4, 68, -0.5, W - 0.5), sigma, "subpixel")
    assert err.mean() <= 1e-3 and err.max() <= 1e-2, (err.mean(), err.max())


@PROPERTY
@given(seed=st.integers(0, 2**16), sigma=st.floats(1.0, 3.0))
def test_subpixel_roundtrip_within_one_pixel_of_the_border(seed, sigma):
    err = _err(_border_points(seed, 150), sigma, "subpixel")
    assert err.max() <= 0.05, err.max()


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_subpixel_roundtrip_for_float16_targets_as_stored(sigma):
    """float16 storage: the error measured on the maps exactly as stored stays well under the model's error."""
    err = _err(_points(7, 8, 68, -0.5, W - 0.5), sigma, "subpixel", "float16")
    assert err.mean() <= 1.5e-3 and err.max() <= 1e-2, (err.mean(), err.max())
    assert err.mean() > 20 * _err(_points(7, 8, 68, -0.5, W - 0.5), sigma, "subpixel").mean()  # measurably lossy


@pytest.mark.parametrize("method", ["argmax", "argmax_quarter"])
def test_argmax_decoders_are_exact_on_integer_points(method):
    pts = np.random.default_rng(3).integers(0, W, size=(5, 68, 2)).astype(np.float64)
    assert _err(pts, 1.5, method).max() == 0.0


@pytest.mark.parametrize("method", ["subpixel", "local_weighted_average", "dark"])
def test_refining_decoders_keep_interior_integer_points(method):
    """Away from the border (DARK's zero-padded blur shifts points within ~3 sigma of it) integers stay put."""
    pts = np.random.default_rng(3).integers(8, W - 8, size=(5, 68, 2)).astype(np.float64)
    assert _err(pts, 1.5, method, **({"blur_sigma": 1.5} if method == "dark" else {})).max() <= 1e-4


@pytest.mark.parametrize("method", DECODERS)
def test_flipping_the_map_mirrors_the_decoded_point(method):
    pts = _points(5, 3, 68, -0.5, W - 0.5)
    heat, _ = encode(pts, np.ones((3, 68), bool), (H, W), 1.5, "float64")  # float64: no summation-order noise
    p, _ = decode(heat, method)
    q, _ = decode(heat[..., ::-1].copy(), method)
    np.testing.assert_allclose(q[..., 0], W - 1 - p[..., 0], atol=1e-8)
    np.testing.assert_allclose(q[..., 1], p[..., 1], atol=1e-8)


def test_weighted_average_border_bias_is_measured_and_larger_than_subpixel():
    """The reference write-up's global weighted average is pulled toward the map centre near borders."""
    hm = HeatmapCodec(224, 56, 2.0)
    pts = to_input(_border_points(11, 300), hm.stride)
    table = codec.roundtrip_table(pts, np.ones(pts.shape[:2], bool), hm, ("float32",),
                                  ("weighted_average", "subpixel"))
    wa = table["dtypes"]["float32"]["weighted_average"]["border_map_px"]
    sp = table["dtypes"]["float32"]["subpixel"]["border_map_px"]
    assert table["n_border"] == 300
    assert wa["mean"] > 0.1 and wa["mean"] > 100 * sp["mean"], (wa, sp)
    # the bias points inward: the decoded point is nearer the centre than the truth
    heat, _ = hm.encode(pts, np.ones(pts.shape[:2], bool))
    pred, _ = hm.decode(heat, "weighted_average")
    centre = (hm.input_size - 1) / 2
    assert (np.abs(pred - centre).max(-1) < np.abs(pts - centre).max(-1)).mean() > 0.95


# ------------------------------------------------------------------------------------------------ decoders: batching, numpy / torch
@pytest.mark.parametrize("method", DECODERS)
def test_every_decoder_runs_batched_on_numpy_and_torch_and_agrees(method):
    pts = _points(9, 2, 68, 2, W - 3)
    heat, _ = encode(pts, np.ones((2, 68), bool), (H, W), 1.5)
    p, c = decode(heat, method)
    assert isinstance(p, np.ndarray) and p.shape == (2, 68, 2) and c.shape == (2, 68)
    tp, tc = decode(torch.from_numpy(heat).to(torch.float16), method)
    assert isinstance(tp, torch.Tensor) and tp.shape == (2, 68, 2) and tc.shape == (2, 68)
    np.testing.assert_allclose(tp.numpy(), p, atol=0.05)
    np.testing.assert_allclose(c, 1.0, atol=0.2)  # confidence = the map's maximum
    single, _ = decode(heat[0, 0], method)  # unbatched (h, w) -> (2,)
    np.testing.assert_allclose(single, p[0, 0], atol=1e-6)


def test_every_decoder_handles_empty_and_non_finite_maps():
    heat = np.zeros((1, 2, 16, 16), np.float32)
    heat[0, 1, 3, 4] = np.nan
    for method in DECODERS:
        p, c = decode(heat, method)
        assert np.isfinite(p).all() and (c == 0).all(), method


def test_encode_follows_the_device_of_its_inputs():
    """No hard-coded device: points on torch's shape-only "meta" device give maps and weights there."""
    pts = torch.zeros(2, 68, 2, dtype=torch.float64, device="meta")
    heat, weights = encode(pts, torch.ones(2, 68, dtype=torch.bool, device="meta"), (H, W), 2.0, "float16")
    assert heat.device.type == "meta" and heat.shape == (2, 68, H, W) and heat.dtype == torch.float16
    assert weights.device.type == "meta" and weights.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_and_decode_stay_on_the_gpu():
    dev = torch.device("cuda")
    pts = torch.from_numpy(_points(2, 4, 68, -0.5, W - 0.5)).to(dev)
    heat, weights = encode(pts, torch.ones(4, 68, dtype=torch.bool, device=dev), (H, W), 2.0)
    assert heat.device.type == "cuda" and weights.device.type == "cuda"
    for method in DECODERS:
        p, c = decode(heat, method)
        assert p.device.type == "cuda" and c.device.type == "cuda"
    p, _ = decode(heat, "subpixel")
    assert (p - pts).norm(dim=-1).max().item() <= 1e-2


def test_unknown_decoder_is_a_value_error_naming_the_allowed_set():
    with pytest.raises(ValueError, match="unknown method 'median'.*argmax.*subpixel"):
        decode(np.zeros((1, 1, 8, 8)), "median")
    with pytest.raises(ValueError, match="allowed: argmax"):
        codec.roundtrip_table(np.zeros((1, 1, 2)), np.ones((1, 1), bool), HeatmapCodec(32, 8, 1.0), decoders=("x",))


# ------------------------------------------------------------------------------------------------ codec in input px, table
def test_heatmap_codec_round_trip_in_input_pixels():
    hm = HeatmapCodec(128, 32, 1.5)
    assert hm.stride == 4.0 and hm.size == (32, 32)
    pts = codec.uniform_points(np.random.default_rng(4), 3, 128)
    assert pts.min() >= -0.5 and pts.max() <= 127.5
    heat, weights = hm.encode(pts, np.ones((3, 68), bool), "float16")
    assert heat.dtype == np.float16 and heat.shape == (3, 68, 32, 32) and weights.min() == 1
    back, conf = hm.decode(heat.astype(np.float32))
    assert np.abs(back - pts).max() < 0.5 and conf.min() > 0.9
    with pytest.raises(ValueError, match="heatmap_size"):
        HeatmapCodec(32, 64, 1.0)


def test_roundtrip_table_keys_and_float16_column():
    hm = HeatmapCodec(224, 56, 1.5)
    pts = codec.uniform_points(np.random.default_rng(6), 20, 224, k=5)
    table = codec.roundtrip_table(pts, np.ones((20, 5), bool), hm)
    assert {"input_size", "heatmap_size", "sigma", "stride", "n_points", "n_visible", "n_encoded", "n_off_map",
            "n_border", "dtypes"} <= set(table)
    assert set(table["dtypes"]) == {"float32", "float16"} and set(table["dtypes"]["float32"]) == set(DECODERS)
    cell = table["dtypes"]["float16"]["subpixel"]
    assert set(cell) == {"map_px", "input_px", "border_map_px", "border_input_px"}
    assert set(cell["map_px"]) == {"mean", "median", "p99", "max"}
    assert cell["input_px"]["mean"] == pytest.approx(cell["map_px"]["mean"] * 4)
    sp32 = table["dtypes"]["float32"]["subpixel"]["map_px"]
    assert sp32["max"] < 1e-2 and cell["map_px"]["mean"] > sp32["mean"]  # float16 storage costs accuracy
    assert table["subpixel_targets"]["float32"] == {"mean_map_px": True, "max_map_px": True, "border_max_map_px": True}
    flat = codec.flatten_roundtrip({"uniform": table, "stored_dtype": "float16"})
    assert "roundtrip_uniform_subpixel_float32_input_px_mean" in flat and all(np.isfinite(list(flat.values())))
    json.dumps(table)  # JSON-able


def test_encode_to_npy_writes_chunks_equal_to_one_shot_encode(tmp_path):
    hm = HeatmapCodec(64, 16, 1.0)
    pts = codec.uniform_points(np.random.default_rng(8), 10, 64)
    pts[0, 0] = [-3, 5]
    vis = np.ones((10, 68), bool)
    weights = codec.encode_to_npy(tmp_path / "h.npy", pts, vis, hm, "float16", chunk=3)
    got = np.load(tmp_path / "h.npy", mmap_mode="r", allow_pickle=False)
    want, want_w = hm.encode(pts, vis, "float16")
    assert got.dtype == np.float16 and got.shape == (10, 68, 16, 16)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(weights, want_w)
    assert weights[0, 0] == 0 and weights.dtype == np.float32
    empty = codec.encode_to_npy(tmp_path / "e.npy", pts[:0], vis[:0], hm, "float32")
    assert empty.shape == (0, 68) and np.load(tmp_path / "e.npy").shape == (0, 68, 16, 16)


# ------------------------------------------------------------------------------------------------ stage
def _fake_augmented(root: Path, size: int) -> None:
    from facemarks.core.store import write_split

    rng = np.random.default_rng(0)
    for name, n in (("train", 5), ("val", 2), ("test", 3)):
        pts = rng.uniform(-0.5, size - 0.5, size=(n, 68, 2)).astype(np.float32)
        vis = np.ones((n, 68), bool)
        vis[0, :3] = False
        arrays = {"images": np.zeros((n, size, size), np.uint8), "points": pts, "visible": vis,
                  "transform": np.tile(np.eye(3), (n, 1, 1)), "orig_points": pts.astype(np.float64),
                  "boxes": np.zeros((n, 4))}
        write_split(root / "data" / "augmented" / name, arrays, {"files": [], "source_index": [], "size": size})


@pytest.mark.slow  # ~45 s, most of it creating the MLflow sqlite store
def test_encode_stage_writes_heatmaps_roundtrip_json_and_an_mlflow_run(tmp_path):
    import mlflow

    size = 32
    _fake_augmented(tmp_path, size)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["encode"].update({"sigma": 1.25, "dtype": "float16", "roundtrip_points": 150})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "stages" / "encode.py", tmp_path / "encode.py")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, "encode.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "data" / "heatmaps"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json"] + [f"{s}{x}.npy" for s in ("train", "val", "test") for x in ("", "_weights")])
    heat = np.load(out / "train.npy", mmap_mode="r", allow_pickle=False)
    assert heat.shape == (5, 68, 8, 8) and heat.dtype == np.float16
    weights = np.load(out / "train_weights.npy", allow_pickle=False)
    assert weights.dtype == np.float32 and weights[0, :3].tolist() == [0, 0, 0] and not heat[0, :3].any()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sigma"] == 1.25 and meta["heatmap_size"] == 8 and meta["dtype"] == "float16"

    table = json.loads((tmp_path / "metrics" / "roundtrip.json").read_text())
    assert table["stored_dtype"] == "float16"
    assert table["uniform"]["n_points"] == 150 and table["dataset"]["n_visible"] == 3 * 68 - 3
    assert set(table["uniform"]["dtypes"]) == {"float32", "float16"}

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if r.info.run_name == "encode"]
    assert run.data.tags["dvc.stage"] == "encode" and run.data.params["encode.sigma"] == "1.25"
    assert "roundtrip_uniform_subpixel_float32_input_px_mean" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["roundtrip.json"]
