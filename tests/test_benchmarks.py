"""Benchmarks name the CPU they measured on: a time in ``metrics/bench_*.json`` is read beside the processor's model,
its SIMD flags and any ISA cap (:func:`facemarks.core.cpuinfo.describe`). Two benchmarks are run for real, small."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facemarks.core import cpuinfo

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, out: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script, args", [("bench_codec.py", ("--faces", "8", "--batch", "4", "--repeats", "1")),
                                          ("bench_synthetic.py", ("--n", "4"))])
def test_a_benchmark_file_names_the_cpu_it_ran_on(tmp_path, script, args):
    doc = run_bench(script, tmp_path / "bench.json", *args)
    assert doc["processor"] == cpuinfo.describe()  # this process's CPU, flags and any ISA cap of its environment
    assert {"model", "flags", "vnni", "native_bf16", "cores"} <= set(doc["processor"])


def test_a_benchmark_under_an_isa_cap_says_so(tmp_path):
    doc = run_bench("bench_codec.py", tmp_path / "bench.json", "--faces", "8", "--batch", "4", "--repeats", "1",
                    env={"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert doc["processor"]["isa_cap"] == {"onednn": "AVX2", "aten": "avx2"}
    assert doc["processor"]["native_bf16"] is False  # bf16 autocast is off under the cap
