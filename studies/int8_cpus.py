"""The int8 accuracy guard on CPUs with and without VNNI (issue 31), measured by emulating a CPU without VNNI.

    python studies/int8_cpus.py --workspace /path/to/a/clone/where/dvc/repro/ran [--cpus native EPYC-Rome]

Without VNNI, onnxruntime's u8 x s8 int8 kernels add pairs of products in 16 bits with saturation (``vpmaddubsw``),
so full-range 8-bit weights can overflow; 7-bit weights (``reduce_range``) cannot
(:func:`facemarks.serving.export.weight_range`). For each loss of the workspace (``exports/<loss>/model.onnx``) and each
weight range (``full``, ``reduced``), the fp32 model is quantised into a temporary folder with exactly the export
stage's settings (``export.format``, ``export.calibration``, ``export.calibration_faces``, ``export.seed``, crops of
``data/augmented/train`` drawn by :func:`facemarks.serving.export.calibration_sample`), and the stage's guard
(:func:`~facemarks.serving.export.int8_accuracy` on the test split, :func:`~facemarks.serving.export.photo_accuracy` on the
real-photo faces of ``stages/export.py``'s ``photo_items``, :func:`~facemarks.serving.export.int8_verdict`) runs with both the
fp32 and the int8 heatmaps computed on one CPU:

- ``native``: this machine, in this process;
- an emulated CPU (e.g. ``EPYC-Rome``): a worker process (this script, ``--worker``; numpy, onnxruntime and
  :mod:`facemarks.serving.runtime` only, no torch) under ``--emulator`` (default ``qemu-x86_64 -cpu {cpu}``, QEMU user
  mode): the crops go to an ``.npy``, the worker runs :class:`facemarks.serving.runtime.OnnxHeatmaps` and writes the
  heatmaps back. onnxruntime chooses its kernels from the CPUID instruction, which QEMU answers for the emulated
  model; the worker executes CPUID and XGETBV itself and records what they say (``/proc/cpuinfo`` is the host's
  under QEMU user mode, so :mod:`facemarks.core.cpuinfo` cannot tell).

Writes ``metrics/int8_cpus.json`` (atomically; no timings) and prints one row per CPU x loss x weights.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "metrics" / "int8_cpus.json"
CPUS = ("native", "EPYC-Rome")
NATIVE = "native"
EMULATOR = "qemu-x86_64 -cpu {cpu}"
RANGES = ("full", "reduced")
DECODER = "dark"  # the decoder `facemarks predict` uses for both losses
QEMU_WARNING = "qemu-x86_64: warning"
THREADS = 1  # one intra-op thread on every CPU: the same kernels' partitioning everywhere, and a shared machine

# ------------------------------------------------------------------------------------------------ CPUID
# x86-64 System V machine code, executed through ctypes from an executable page:
#   cpuid(leaf, subleaf, uint32 out[4]): push rbx; mov eax, edi; mov ecx, esi; mov r8, rdx; cpuid;
#                                         mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
#   xgetbv0() -> uint64:                  xor ecx, ecx; xgetbv; shl rdx, 32; or rax, rdx; ret
_CPUID = "53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3"
_XGETBV = "31c9 0f01d0 48c1e220 4809d0 c3"
#: (name, leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3, bit): the features onnxruntime's MLAS dispatch reads
CPUID_BITS = (("avx", 1, 0, 2, 28), ("fma", 1, 0, 2, 12), ("osxsave", 1, 0, 2, 27), ("avx2", 7, 0, 1, 5),
              ("avx512f", 7, 0, 1, 16), ("avx512bw", 7, 0, 1, 30), ("avx512_vnni", 7, 0, 2, 11),
              ("avx_vnni", 7, 1, 0, 4), ("amx_int8", 7, 0, 3, 25))


def cpuid_features() -> dict[str, object]:
    """What the CPUID instruction says to this process (under QEMU: the emulated model's answer): ``{feature: bool}``
    for :data:`CPUID_BITS`, ``ymm_enabled`` (XCR0 bits 1 and 2: the OS saves AVX state, which onnxruntime checks
    before using AVX2) and ``vnni`` (any of avx512_vnni, avx_vnni, amx_int8). x86-64 Linux only."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code_cpuid, code_xgetbv = bytes.fromhex(_CPUID.replace(" ", "")), bytes.fromhex(_XGETBV.replace(" ", ""))
    page.write(code_cpuid + code_xgetbv)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(base)
    xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + len(code_cpuid))

    def regs(leaf: int, sub: int) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        cpuid(leaf, sub, out)
        return tuple(out)

    top = regs(0, 0)[0]
    out: dict[str, object] = {name: leaf <= top and bool(regs(leaf, sub)[reg] >> bit & 1)
                              for name, leaf, sub, reg, bit in CPUID_BITS}
    out["ymm_enabled"] = bool(out["osxsave"]) and (xgetbv() & 0b110) == 0b110
    out["vnni"] = any(out[f] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return out


# ------------------------------------------------------------------------------------------------ runners
def worker(model: str, crops: str, out: str, batch_size: int, threads: int, emulated_as: str) -> int:
    """The ``--worker`` mode: heatmaps of the crops ``.npy`` by ``model`` into ``out``; prints one JSON line saying
    what the CPU reported (CPUID), the onnxruntime version and whether torch was imported (it must not be)."""
    from facemarks.serving.runtime import OnnxHeatmaps

    import onnxruntime

    runtime = OnnxHeatmaps(model, threads=threads, spinning=False)
    np.save(out, runtime(np.load(crops), batch_size), allow_pickle=False)
    # "ort": a metrics key may not contain "time" (timings stay out of metrics files), so not "onnxruntime"
    print(json.dumps({"emulated_as": emulated_as, "features_reported": cpuid_features(),
                      "ort_version": onnxruntime.__version__, "torch_imported": "torch" in sys.modules}))
    return 0


def digest(images: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes."""
    images = np.ascontiguousarray(images)
    return hashlib.sha256(f"{images.shape}{images.dtype}".encode() + images.tobytes()).hexdigest()


def wait_while(path: Path | None) -> None:
    """Sleep while ``path`` exists (a machine shared with timed benchmarks: they hold it while they time)."""
    told = False
    while path is not None and path.exists():
        if not told:
            print(f"int8_cpus: waiting while {path} exists", flush=True)
            told = True
        time.sleep(30)


class _Memo:
    """Heatmaps of the same crops are computed once per model (the guard asks for the fp32 ones once per int8 file)."""

    def __init__(self, pause_while: Path | None = None):
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self.pause_while = pause_while

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        images = np.ascontiguousarray(images)
        key = (digest(images), int(batch_size))
        if key not in self._cache:
            self._cache[key] = self.compute(images, int(batch_size))
        return self._cache[key]

    def compute(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        raise NotImplementedError


class NativeHeatmaps(_Memo):
    """:class:`facemarks.serving.runtime.OnnxHeatmaps` on this machine (``threads`` intra-op threads, no spinning)."""

    def __init__(self, path: str | Path, threads: int = THREADS, pause_while: Path | None = None):
        from facemarks.serving.runtime import OnnxHeatmaps

        super().__init__(pause_while)
        self.runtime = OnnxHeatmaps(path, threads=threads, spinning=False)
        self.path, self.input_size, self.reported = Path(path), self.runtime.input_size, None

    def compute(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        wait_while(self.pause_while)
        return self.runtime(images, batch_size)


class EmulatedHeatmaps(_Memo):
    """The :class:`facemarks.serving.runtime.OnnxHeatmaps` call interface (``__call__(crops, batch_size)``,
    ``input_size``), computed by worker processes under ``emulator`` (its ``{cpu}`` filled with ``cpu``), one per
    ``chunk`` crops (all at once when None; onnxruntime's heatmaps do not depend on how the crops are batched, checked
    bit for bit on the study's models), each started once ``pause_while`` is absent. ``cache``: a folder keeping each
    chunk's heatmaps by CPU, model file SHA-256 and crops, so that an interrupted study resumes. ``reported``: the
    worker's JSON line (:func:`worker`)."""

    def __init__(self, path: str | Path, cpu: str, emulator: str = EMULATOR, threads: int = THREADS,
                 python: str = sys.executable, chunk: int | None = None, pause_while: Path | None = None,
                 cache: Path | None = None):
        from facemarks.core.hashing import file_sha256
        from facemarks.serving.export import read_metadata

        super().__init__(pause_while)
        self.path, self.cpu, self.threads, self.python = Path(path), cpu, int(threads), python
        self.prefix = shlex.split(emulator.format(cpu=cpu))
        self.input_size = int(read_metadata(self.path)["input_size"])
        self.chunk, self.cache = chunk, None if cache is None else Path(cache)
        self.model_sha = file_sha256(self.path)
        self.reported: dict | None = None

    def compute(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        step = self.chunk or len(images)
        return np.concatenate([self._chunk(images[i:i + step], batch_size) for i in range(0, len(images), step)])

    def _chunk(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        stored = None
        if self.cache is not None:
            stored = self.cache / f"{self.cpu}-{self.model_sha[:20]}-{digest(images)[:20]}-b{batch_size}.npy"
            if stored.is_file() and stored.with_suffix(".json").is_file():
                self.reported = json.loads(stored.with_suffix(".json").read_text(encoding="utf-8"))
                return np.load(stored)
        wait_while(self.pause_while)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
        with tempfile.TemporaryDirectory(prefix="int8-cpus-") as tmp:
            crops, out = Path(tmp) / "crops.npy", Path(tmp) / "heatmaps.npy"
            np.save(crops, images, allow_pickle=False)
            cmd = [*self.prefix, self.python, str(Path(__file__).resolve()), "--worker", str(self.path), str(crops),
                   str(out), "--batch-size", str(batch_size), "--threads", str(self.threads), "--emulated-as", self.cpu]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith(QEMU_WARNING))
            if proc.returncode != 0:
                raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {err[-2000:]}")
            self.reported = json.loads(proc.stdout.strip().splitlines()[-1])
            heat = np.load(out)
        if stored is not None:
            from facemarks.core.atomic import atomic_save_npy, atomic_write_json

            stored.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(stored, heat)
            atomic_write_json(stored.with_suffix(".json"), self.reported)
        return heat


def runner(path: str | Path, cpu: str, emulator: str = EMULATOR, threads: int = THREADS, **options):
    """The heatmap runner of ``path`` on ``cpu``: :class:`NativeHeatmaps` for ``native``, else
    :class:`EmulatedHeatmaps` (``options``: its ``chunk``, ``pause_while``, ``cache``)."""
    if cpu == NATIVE:
        return NativeHeatmaps(path, threads, options.get("pause_while"))
    return EmulatedHeatmaps(path, cpu, emulator, threads, **options)


# ------------------------------------------------------------------------------------------------ the study
def photo_items(workspace: Path, params) -> tuple[list | None, str]:
    """The export stage's real-photo items (``stages/export.py`` ``photo_items``), resolved in ``workspace`` (its
    ``evaluate.photos`` and its dlib reference cache, as the stage ran there)."""
    spec = importlib.util.spec_from_file_location("_export_stage", ROOT / "stages" / "export.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    with contextlib.chdir(workspace):
        return stage.photo_items(params)


def git_head(workspace: Path) -> tuple[str, list[str]]:
    """The workspace's commit and its modified tracked files."""
    head = subprocess.run(["git", "-C", str(workspace), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(workspace), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return head, sorted(line[3:] for line in status if line.strip())


def exports_md5(workspace: Path) -> str | None:
    """The md5 DVC records for the workspace's ``exports`` folder (``dvc.lock``, stage ``export``)."""
    import yaml

    lock = workspace / "dvc.lock"
    if not lock.is_file():
        return None
    outs = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}).get("export", {}).get("outs", [])
    return next((o.get("md5") for o in outs if o.get("path") == "exports"), None)


def stage_agreement(workspace: Path, rows: list[dict]) -> dict[str, dict]:
    """Per loss, the native row of the weight range the workspace's export stage chose, against that stage's own guard
    (``metrics/export.json`` ``<loss>.int8``): the largest difference of any ``nme_delta`` (check x decoder), which is
    0 when this study quantises and checks as the stage did. Only checks over the same faces compare (a ``--faces``
    subset of the test split is a different mean); the others are listed under ``skipped`` with both face counts."""
    path = workspace / "metrics" / "export.json"
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    out = {}
    for r in rows:
        q = report.get(r["loss"], {}).get("int8")
        if r["machine"] != NATIVE or not q or q.get("weights") != r["weights"]:
            continue
        shared = [c for c in q["checks"] if c in r["checks"]]
        same = [c for c in shared if q["checks"][c].get("n_faces") == r["checks"][c].get("n_faces")]
        diffs = [abs(r["checks"][c]["nme_delta"][d] - v) for c in same for d, v in q["checks"][c]["nme_delta"].items()]
        out[r["loss"]] = {"weights": r["weights"], "checks": same,
                          "max_abs_difference": max(diffs) if diffs else None,
                          "skipped": {c: {"study_faces": r["checks"][c].get("n_faces"),
                                          "stage_faces": q["checks"][c].get("n_faces")}
                                      for c in shared if c not in same}}
    return out


def row(machine: str, loss: str, weights: str, checks: dict, verdict: dict) -> dict:
    return {"machine": machine, "loss": loss, "weights": weights,
            "test_delta_dark": checks["test"]["nme_delta"][DECODER],
            "photos_delta_dark": checks["photos"]["nme_delta"][DECODER] if "photos" in checks else None,
            "max_delta": verdict["max_nme_delta"], "decoders_passed": verdict["decoders_passed"],
            "ok": verdict["ok"], "dark_passed": DECODER in verdict["decoders_passed"], "checks": checks}


def table(rows: list[dict], n_decoders: int) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:+.4f}"  # noqa: E731
    lines = ["| CPU | loss | weights | test Δ DARK | photos Δ DARK | max Δ (any decoder) | decoders within "
             "tolerance | guard |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['machine']} | {r['loss']} | {r['weights']} | {fmt(r['test_delta_dark'])} | "
                     f"{fmt(r['photos_delta_dark'])} | {fmt(r['max_delta'])} | {len(r['decoders_passed'])} of "
                     f"{n_decoders} | {'passed' if r['ok'] else 'failed'} (DARK {'in' if r['dark_passed'] else 'out'})"
                     " |")
    return "\n".join(lines)


def measure(workspace: Path, cpus: tuple[str, ...], emulator: str, losses: tuple[str, ...] | None = None,
            faces: int | None = None, threads: int = THREADS, fp32_native: bool = False, **options) -> dict:
    """Every CPU x loss x weight range of the study (see the module docstring); returns the ``metrics`` document.
    ``fp32_native``: the fp32 reference of an emulated CPU is computed on this machine (fp32 rounding differs between
    CPUs by ~1e-6 of a heatmap, far below int8's effects, while QEMU emulates AVX2 floating point at ~15 s per face).
    ``options``: :func:`runner`'s (``chunk``, ``pause_while``, ``cache``)."""
    import onnxruntime

    from facemarks.core import cpuinfo
    from facemarks.core.hashing import file_sha256
    from facemarks.core.params import load_params
    from facemarks.core.store import read_split
    from facemarks.heatmaps.codec import DECODERS
    from facemarks.serving import export

    head, dirty = git_head(workspace)
    params = load_params(workspace / "params.yaml")
    cfg, sigma, margin = params.export, params.encode.sigma, params.augment.margin
    test = read_split(workspace / "data" / "augmented" / "test")
    n = len(test) if faces is None else min(int(faces), len(test))
    crops, transforms = np.array(test.images[:n]), np.array(test.transform[:n])
    reference = np.array(test.orig_points[:n])
    calibration = export.calibration_sample(read_split(workspace / "data" / "augmented" / "train").images,
                                            cfg.calibration_faces, cfg.seed)
    photos, photo_desc = photo_items(workspace, params)
    print(f"int8_cpus: {n} test faces and {photo_desc}; CPUs {', '.join(cpus)}", flush=True)
    rows, models, reported, vs_native = [], {}, {}, []
    with tempfile.TemporaryDirectory(prefix="int8-cpus-") as tmp:
        for loss in losses or params.train.losses:
            fp32 = Path(tmp) / f"{loss}-fp32.onnx"  # a snapshot: a rerun of the workspace's export must not mix in
            shutil.copyfile(workspace / "exports" / loss / "model.onnx", fp32)
            files = {"fp32": fp32}
            for weights in RANGES:
                files[weights] = export.quantize_int8(fp32, Path(tmp) / f"{loss}-{weights}.onnx", calibration,
                                                      fmt=cfg.format, method=cfg.calibration, seed=cfg.seed,
                                                      weights=weights)
            models[loss] = {"fp32_sha256": file_sha256(fp32), **{f"int8_{w}_sha256": file_sha256(files[w])
                                                                  for w in RANGES}}
            heat = {}
            for cpu in cpus:
                run = {name: runner(path, NATIVE if fp32_native and name == "fp32" else cpu, emulator, threads,
                                    **options) for name, path in files.items()}
                for weights in RANGES:
                    checks = {"test": export.int8_accuracy(run["fp32"], run[weights], crops, transforms, reference,
                                                           sigma)}
                    if photos:
                        checks["photos"] = export.photo_accuracy(run["fp32"], run[weights], photos, margin=margin,
                                                                 sigma=sigma)
                    rows.append(row(cpu, loss, weights, checks, export.int8_verdict(checks, cfg.tolerance_nme)))
                    r = rows[-1]
                    print(f"int8_cpus: {cpu} {loss} {weights}: DARK test {r['test_delta_dark']:+.4f}, photos "
                          f"{r['photos_delta_dark'] if r['photos_delta_dark'] is None else round(r['photos_delta_dark'], 4)}"
                          f", max {r['max_delta']:+.4f}", flush=True)
                heat[cpu] = {name: r(crops, 64) for name, r in run.items()}
                if run["fp32"].reported is not None:
                    reported[cpu] = run["fp32"].reported
            for cpu in cpus:
                if cpu != NATIVE and NATIVE in heat:
                    for name in (n for n in files if not (fp32_native and n == "fp32")):
                        diff = np.abs(heat[cpu][name].astype(np.float64) - heat[NATIVE][name].astype(np.float64))
                        vs_native.append({"machine": cpu, "loss": loss, "model": name,
                                          "max_abs_heatmap_diff": float(diff.max()),
                                          "share_of_values_differing": float((diff > 0).mean())})
    stage = stage_agreement(workspace, rows)
    changed = [loss for loss, m in models.items()
               if file_sha256(workspace / "exports" / loss / "model.onnx") != m["fp32_sha256"]]
    if git_head(workspace) != (head, dirty) or changed:
        raise RuntimeError(f"{workspace} changed while the study ran (commit, tracked files or the fp32 models of "
                           f"{changed}): rerun it on a workspace nobody reproduces meanwhile")
    return {
        "question": "the int8 guard (<= export.tolerance_nme NME points on the test split and the real photos) on "
                    "CPUs with and without VNNI; int8 heatmaps computed on each CPU, the fp32 reference "
                    + ("on this machine" if fp32_native else "on the same CPU"),
        "fp32_reference": "native" if fp32_native else "same CPU",
        "workspace_commit": head, "workspace_modified": dirty, "workspace_exports_md5": exports_md5(workspace),
        "models": models,
        "host_processor": cpuinfo.describe(), "host_features_reported": cpuid_features(),
        "emulated": {name: {"emulator": emulator.format(cpu=name), **reported.get(name, {})}
                     for name in cpus if name != NATIVE},
        "ort_version": onnxruntime.__version__, "intra_op_threads": int(threads),
        "quantisation": {"quant_format": cfg.format, "calibration_method": cfg.calibration,
                         "calibration_faces": int(len(calibration)), "calibration_seed": int(cfg.seed),
                         "calibration_crops": "data/augmented/train"},
        "test_faces": int(n), "photos": photo_desc, "tolerance_nme": float(cfg.tolerance_nme), "decoder": DECODER,
        "decoders": list(DECODERS), "rows": rows, "heatmaps_vs_native": vs_native, "stage_agreement": stage,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, help="a clone of the repository where `dvc repro` ran")
    ap.add_argument("--cpus", nargs="+", default=list(CPUS), help=f"'{NATIVE}' and emulated CPU models (default: %(default)s)")
    ap.add_argument("--emulator", default=EMULATOR, help="command prefix of an emulated CPU; {cpu} is its name")
    ap.add_argument("--losses", nargs="+", help="default: the workspace's train.losses")
    ap.add_argument("--faces", type=int, help="only the first N test faces (default: all)")
    ap.add_argument("--threads", type=int, default=THREADS, help="onnxruntime intra-op threads (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT, help="default: metrics/int8_cpus.json")
    ap.add_argument("--chunk", type=int, default=16, help="crops per emulated worker (default: %(default)s)")
    ap.add_argument("--pause-while", type=Path, help="start no computation while this file exists (a machine shared "
                    "with timed benchmarks)")
    ap.add_argument("--fp32-native", action="store_true", help="compute every fp32 reference on this machine "
                    "(emulated AVX2 floating point is ~15 s per face)")
    ap.add_argument("--cache", type=Path, help="keep the emulated heatmaps here, to resume an interrupted study")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "CROPS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--emulated-as", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker, args.batch_size, args.threads, args.emulated_as)
    if args.workspace is None:
        ap.error("--workspace is required")
    emulated = [c for c in args.cpus if c != NATIVE]
    tool = shlex.split(args.emulator.format(cpu="x"))[0] if emulated else None
    if tool and shutil.which(tool) is None:
        print(f"int8_cpus: {tool} not found (apt-get install qemu-user), needed for {', '.join(emulated)}",
              file=sys.stderr)
        return 2
    from facemarks.core.atomic import atomic_write_json
    from facemarks.heatmaps.codec import DECODERS

    doc = measure(args.workspace.resolve(), tuple(args.cpus), args.emulator, args.losses and tuple(args.losses),
                  args.faces, args.threads, fp32_native=args.fp32_native, chunk=args.chunk,
                  pause_while=args.pause_while, cache=args.cache)
    print(table(doc["rows"], len(DECODERS)))
    for d in doc["heatmaps_vs_native"]:
        print(f"{d['machine']} vs native, {d['loss']} {d['model']}: max |heatmap diff| {d['max_abs_heatmap_diff']:.3g}, "
              f"{100 * d['share_of_values_differing']:.1f} % of values differ")
    for loss, a in doc["stage_agreement"].items():
        same = (f"largest NME-delta difference {a['max_abs_difference']:.3g} ({', '.join(a['checks'])})"
                if a["checks"] else "no check over the same faces")
        skipped = "".join(f"; {c} not compared ({s['study_faces']} faces here, {s['stage_faces']} in the stage)"
                          for c, s in a["skipped"].items())
        print(f"native {loss} {a['weights']} vs the export stage's own guard (metrics/export.json): {same}{skipped}")
    atomic_write_json(args.out, doc)
    print(f"int8_cpus: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
