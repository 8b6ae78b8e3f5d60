"""How much of a training result depends on the CPU kernels and the thread count (issue 22).

Builds one data set with the real stages (download → augment → encode, ``--preset``, tiny by default) in a
temporary copy of this repository, then trains ``train@<loss>`` from it once per setting, each in a fresh copy
(no checkpoint), in a subprocess with the setting's environment. A setting emulates another CPU by capping the
kernels that torch picks at run time: ``ATEN_CPU_CAPABILITY`` (ATen's vectorised ops: default | avx2 | avx512),
``ONEDNN_MAX_CPU_ISA`` (oneDNN convolutions: SSE41 | AVX2 | AVX512_CORE ...), ``MKL_ENABLE_INSTRUCTIONS`` and
``MKL_CBWR`` (MKL's GEMM paths and its conditional numerical reproducibility), and the thread count
(``OMP_NUM_THREADS``). Per setting it records the trained weights' SHA-256 (every tensor of the saved state dict),
best / final validation NME and the stage's wall seconds; the table says which settings give bit-identical weights
and how far the NME moves. Writes ``metrics/bench_repro.json`` (timings belong to a benchmark file, never to the
pipeline's metrics).

    PYTHONPATH=src python benchmarks/bench_repro.py [--preset tiny] [--loss mse] [--set train.epochs_phase1=2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the pinned-kernel recipe (README "Reproducibility"): lowest common kernels everywhere, one thread
PINNED = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
          "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
SETTINGS: dict[str, dict[str, str]] = {
    "reference": {},
    "reference_again": {},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
    "onednn_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "threads_1": {"OMP_NUM_THREADS": "1"},
    "pinned": PINNED,
    "pinned_again": PINNED,
    "pinned_threads_2": {**PINNED, "OMP_NUM_THREADS": "2"},
    "pinned_numpy_openblas_low": {**PINNED, "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL",
                                  "OPENBLAS_CORETYPE": "Prescott"},
}


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    keep = ("dvc.yaml", "params.yaml", "pyproject.toml")
    return [f for f in out if f and (ROOT / f).is_file() and (f.split("/")[0] in ("stages", "src", "presets") or f in keep)]


def base_env() -> dict[str, str]:
    drop = ("MLFLOW_", "DVC_", "ATEN_", "ONEDNN_", "MKL_", "NPY_", "OMP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def stage(repo: Path, script: str, *args: str, extra: dict[str, str] | None = None) -> float:
    env = base_env() | (extra or {})
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, f"stages/{script}.py", *args], cwd=repo, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def weights_sha(path: Path) -> str:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if hasattr(value, "numpy"):
            h.update(key.encode())
            h.update(value.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--set", action="append", default=[], help="params override key=value (YAML value)")
    ap.add_argument("--only", nargs="*", help="settings to run (default: all)")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench_repro.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import yaml

    from facemarks.core import cpuinfo
    from facemarks.core.params import apply_preset, load_params

    with tempfile.TemporaryDirectory(prefix="bench_repro_") as tmp:
        data_repo = Path(tmp) / "data_repo"
        for f in project_files():
            (data_repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, data_repo / f)
        if a.preset:
            apply_preset(ROOT / "presets" / f"{a.preset}.yaml", data_repo / "params.yaml")
        if a.set:
            over: dict = {}
            for item in a.set:
                key, _, value = item.partition("=")
                node = over
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = yaml.safe_load(value)
            (Path(tmp) / "over.yaml").write_text(yaml.safe_dump(over))
            apply_preset(Path(tmp) / "over.yaml", data_repo / "params.yaml")
        params = load_params(data_repo / "params.yaml")
        for s in ("download", "augment", "encode"):
            stage(data_repo, s)
        rows = {}
        for name, extra in SETTINGS.items():
            if a.only and name not in a.only:
                continue
            run_repo = Path(tmp) / f"run_{name}"
            shutil.copytree(data_repo, run_repo, ignore=shutil.ignore_patterns("checkpoints", "mlruns", "mlflow.db"))
            seconds = stage(run_repo, "train", "--loss", a.loss, extra=extra)
            summary = json.loads((run_repo / "metrics" / f"train_{a.loss}.json").read_text())
            rows[name] = {"env": extra, "weights_sha256": weights_sha(run_repo / "models" / a.loss / "model.pt"),
                          "best_val_nme": summary.get("best_val_nme"), "final_val_nme": summary.get("final_val_nme"),
                          "stage_seconds": round(seconds, 2)}
            shutil.rmtree(run_repo)
            r = rows[name]
            print(f"{name:28s} {r['weights_sha256'][:12]}  best {r['best_val_nme']:.6f}  final {r['final_val_nme']:.6f}  "
                  f"{seconds:6.1f} s", flush=True)
    ref = rows.get("reference", {}).get("weights_sha256")
    pinned = rows.get("pinned", {}).get("weights_sha256")
    for r in rows.values():
        r["same_weights_as_reference"] = r["weights_sha256"] == ref
        r["same_weights_as_pinned"] = r["weights_sha256"] == pinned
    result = {"preset": a.preset, "overrides": a.set, "loss": a.loss, "epochs": params.train.epochs_phase1 + params.train.epochs_phase2,
              "input_size": params.augment.size, "machine": {"cpu": platform.processor() or platform.machine(),
                                                             "processor": cpuinfo.describe(),
                                                             "cores": os.cpu_count(),
                                                             "load_avg_1min": round(os.getloadavg()[0], 2)},
              "settings": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
