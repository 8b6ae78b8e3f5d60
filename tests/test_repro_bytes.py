"""The data stages write the same bytes on any x86-64 CPU (issue 22).

A driver (this file run as a script) runs what the stages ``download``, ``augment`` and ``encode`` run
(``sources.fetch``, ``augment.run_augment`` and ``codec.write_heatmaps``) on the tiny preset with
every random effect made frequent, and lists the MD5 of every file written. It runs in subprocesses under the
CPU-emulation switches that exist: numpy's SIMD dispatch (``NPY_DISABLE_CPU_FEATURES``), OpenBLAS's kernel
(``OPENBLAS_CORETYPE``), glibc's libm variants (``GLIBC_TUNABLES`` hwcaps), libjpeg-turbo's SIMD
(``JSIMD_FORCENONE``) and ATen's (``ATEN_CPU_CAPABILITY``). The file bytes must be identical; a canary
(numpy's float32 ``exp``, a BLAS product) shows that the switches did change what those libraries compute.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: tiny preset, with every random effect of the renderer and the domain randomisation made frequent
OVERRIDES = {
    "data": {"synthetic": {"n_train": 10, "n_test": 4, "min_size": 96, "max_size": 140, "workers": 1,
                           "blur_prob": 0.5, "occluder_prob": 0.5, "glasses_prob": 0.5, "strand_prob": 0.5,
                           "hand_prob": 0.3}},
    "augment": {"size": 32, "copies": 3, "workers": 1, "blur_prob": 0.5, "jpeg_prob": 0.6, "motion_blur_prob": 0.5,
                "lowres_prob": 0.5, "sharpen_prob": 0.5},
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def settings() -> dict[str, dict[str, str]]:
    """Emulated CPUs: each caps what a library may pick at run time (a kernel the CPU lacks is never forced)."""
    flags = _cpu_flags()
    out = {
        "numpy_sse_glibc_nofma_jpeg_c_aten_default": {
            "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
            "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-FMA4,-AVX512F,-AVX512VL,-AVX512DQ,-AVX512BW",
            "JSIMD_FORCENONE": "1", "ATEN_CPU_CAPABILITY": "default"},
        "numpy_avx2": {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
        "openblas_prescott": {"OPENBLAS_CORETYPE": "Prescott"},
    }
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        out["openblas_skylakex"] = {"OPENBLAS_CORETYPE": "SkylakeX"}
    elif {"avx2", "fma"} <= flags:
        out["openblas_haswell"] = {"OPENBLAS_CORETYPE": "Haswell"}
    return out


def run_driver(out: Path, extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NPY_DISABLE", "OPENBLAS_CORETYPE", "GLIBC_TUNABLES", "JSIMD_", "ATEN_CPU"))}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT / "src")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"driver under {extra} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("repro_bytes")
    result = {"reference": run_driver(base / "reference", {})}
    for name, extra in settings().items():
        result[name] = run_driver(base / name, extra)
    return result


@pytest.mark.slow  # the data stages in subprocesses under every CPU emulation
def test_data_stage_files_are_byte_identical_under_every_cpu_emulation(runs):
    ref = runs["reference"]["files"]
    assert len([f for f in ref if f.startswith("raw/images/")]) == 14
    assert {"augmented/train/images.npy", "augmented/train/transform.npy", "heatmaps/train.npy",
            "heatmaps/meta.json", "raw/train.xml"} <= set(ref)
    for name, run in runs.items():
        differ = sorted(f for f in set(ref) | set(run["files"]) if ref.get(f) != run["files"].get(f))
        assert not differ, f"{name}: {len(differ)} files differ from the reference, e.g. {differ[:5]}"


@pytest.mark.slow  # the data stages in subprocesses under every CPU emulation
def test_the_switches_change_what_numpy_and_blas_compute(runs):
    """Without this the test above could pass because a switch did nothing."""
    ref = runs["reference"]
    sse = runs["numpy_sse_glibc_nofma_jpeg_c_aten_default"]
    assert sse["numpy_features"]["X86_V3"] is False and sse["numpy_features"]["X86_V4"] is False
    if ref["numpy_features"]["X86_V3"]:  # numpy's AVX2 float32 exp is not its baseline one
        assert sse["canary"]["np_exp_f32"] != ref["canary"]["np_exp_f32"]
    blas = {n: r["canary"]["blas_dgemm"] for n, r in runs.items() if n.startswith("openblas_") or n == "reference"}
    assert len(set(blas.values())) > 1, f"no OpenBLAS kernel change was observable: {blas}"


def test_png_bytes_round_trip_and_depend_on_the_pixels_only(tmp_path):
    from facemarks.core.io import png_bytes, read_image, write_image

    rng = np.random.default_rng(3)
    for shape in ((1, 1), (7, 300, 3), (130, 200), (160, 150, 3)):  # 130x200 gray and 160x150 RGB span >1 block
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        path = tmp_path / f"{'x'.join(map(str, shape))}.png"
        write_image(path, img, portable=True)
        assert path.read_bytes() == png_bytes(img)
        assert np.array_equal(read_image(path), img)
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            assert np.array_equal(np.asarray(im), img)
    with pytest.raises(ValueError):
        png_bytes(np.zeros((4, 4, 4), np.uint8))


def test_portable_kernels_agree_with_numpy_to_a_few_ulp():
    from facemarks.data import portable

    rng = np.random.default_rng(0)

    def ulps(a, b):
        return float(np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(b), 1e-300))))

    x = rng.uniform(-60, 60, 50_000)
    assert ulps(portable.exp(x), np.exp(x)) <= 2
    y = rng.uniform(1e-8, 1e4, 50_000)
    assert ulps(portable.log(y), np.log(y)) <= 2
    z = rng.uniform(-7, 7, 50_000)
    assert np.max(np.abs(portable.sin(z) - np.sin(z))) < 4e-16 and np.max(np.abs(portable.cos(z) - np.cos(z))) < 4e-16
    f = rng.uniform(0, 1, 50_000).astype(np.float32)
    assert portable.power(f, 0.8).dtype == np.float32
    ref32 = (f.astype(np.float64) ** 0.8).astype(np.float32)
    assert np.max(np.abs(portable.power(f, 0.8) - ref32) / np.spacing(ref32)) <= 1  # float32 ulps
    assert portable.exp(np.array([-np.inf, -800.0, 0.0]))[[0, 1]].tolist() == [0.0, 0.0]
    a, b = rng.standard_normal((5, 68, 3)), rng.standard_normal((5, 3, 3))
    np.testing.assert_allclose(portable.matmul(a, b), a @ b, rtol=0, atol=1e-14)
    m = rng.standard_normal((20, 3, 3)) + 3 * np.eye(3)
    np.testing.assert_allclose(portable.inv3(m), np.linalg.inv(m), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(portable.det2(m), np.linalg.det(m[:, :2, :2]), rtol=1e-13)
    np.testing.assert_allclose(portable.norm(a), np.linalg.norm(a, axis=-1), rtol=1e-15)
    img = rng.uniform(0, 255, (40, 40)).astype(np.float32)
    from skimage.filters import gaussian
    from skimage.transform import resize

    np.testing.assert_allclose(portable.gaussian_filter(img, 1.3), gaussian(img, sigma=1.3, mode="nearest",
                                                                            preserve_range=True), atol=1e-4)
    np.testing.assert_allclose(portable.resize(img, (17, 17), anti_aliasing=True),
                               resize(img, (17, 17), order=1, anti_aliasing=True, preserve_range=True), atol=1e-4)


# ------------------------------------------------------------------------------------------------ the driver
def _driver(out: Path) -> None:
    """Run the data stages' library code into ``out`` and print one JSON line (file MD5s, features, canary)."""
    import shutil
    import tempfile

    import yaml

    from facemarks.data import sources

    from facemarks.heatmaps import codec
    from facemarks.augmentation.augment import run_augment
    from facemarks.training.model import STRIDE
    from facemarks.core.params import apply_preset, load_params
    from facemarks.core.store import read_split

    with tempfile.TemporaryDirectory() as tmp:
        params_path = Path(tmp) / "params.yaml"
        shutil.copy(ROOT / "params.yaml", params_path)
        apply_preset(ROOT / "presets" / "tiny.yaml", params_path)
        (Path(tmp) / "over.yaml").write_text(yaml.safe_dump(OVERRIDES))
        apply_preset(Path(tmp) / "over.yaml", params_path)
        p = load_params(params_path)
    sources.fetch(p.data, p.base.seed, out / "raw", progress=False)
    run_augment(out / "raw", out / "augmented", p.augment, p.base.seed)
    splits = {n: read_split(out / "augmented" / n) for n in ("train", "val", "test")}
    size = int(splits["train"].meta["size"])
    codec.write_heatmaps(splits, codec.HeatmapCodec(size, size // STRIDE, p.encode.sigma), p.encode.dtype,
                         out / "heatmaps")
    files = {str(f.relative_to(out)): hashlib.md5(f.read_bytes()).hexdigest()
             for f in sorted(out.rglob("*")) if f.is_file()}
    from numpy._core._multiarray_umath import __cpu_features__

    rng = np.random.default_rng(0)
    x32 = rng.uniform(-10, 0, 4096).astype(np.float32)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    canary = {"np_exp_f32": hashlib.md5(np.exp(x32).tobytes()).hexdigest(),
              "blas_dgemm": hashlib.md5((a @ b).tobytes()).hexdigest()}
    print(json.dumps({"files": files, "numpy_features": {k: bool(v) for k, v in __cpu_features__.items()},
                      "canary": canary}))


if __name__ == "__main__":
    _driver(Path(sys.argv[1]))
