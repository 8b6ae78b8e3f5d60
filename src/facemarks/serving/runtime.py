"""onnxruntime inference of an exported heatmap model (``facemarks.serving.export``), without torch.

Note:
    N: crops, K: keypoints (68), S: model input side, h = w = S / 4: map side.

The ONNX graph takes ``images`` float32 ``(N, 1, S, S)`` grey in [0, 1] and returns ``heatmaps`` float32
``(N, K, h, w)`` in target units (sigmoid already applied for a ``bce`` model): exactly what
:func:`facemarks.serving.inference.predict_heatmaps` returns, so decoding stays in :mod:`facemarks.heatmaps.codec`. ``N`` is dynamic,
``S`` fixed at export (read back from the graph). This module imports numpy and onnxruntime only (onnxruntime on
first use, through :mod:`facemarks.core.extras`), so that a
deployment (or a future torch-free ``facemarks predict``) needs neither torch nor the training stack.

An int8 file (:func:`facemarks.serving.export.quantize_int8`, ``exports/<loss>/model.int8.onnx``) has the same interface
(float32 in, float32 heatmaps out; the quantise / dequantise steps are inside the graph) and runs through the same
class; :attr:`OnnxHeatmaps.precision` and :attr:`OnnxHeatmaps.int8_passed` read its metadata.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facemarks.core import cpuinfo, extras

INPUT_NAME = "images"
OUTPUT_NAME = "heatmaps"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, optimization: str = "all", spinning: bool = True):
    """The :class:`onnxruntime.SessionOptions` :class:`OnnxHeatmaps` uses (see its docstring for the why)."""
    ort = extras.onnxruntime()
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"session_options: optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads) if threads else available_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3  # errors only
    return opts


class OnnxHeatmaps:
    """An exported heatmap model on onnxruntime's CPU execution provider: uint8 crops → heatmaps.

    Threads, set deliberately: ``intra_op_num_threads`` = ``threads`` or, by default, the cores this process may
    use (:func:`available_cores`): one face is one chain of convolutions, and onnxruntime splits each convolution
    over that many threads. ``inter_op_num_threads = 1`` with sequential execution: the graph is a single chain, so
    running operators side by side has nothing to overlap and would only compete with the intra-op threads.
    Graph optimisation ``all`` (constant folding, Conv + activation fusion, NCHWc layouts where the CPU has
    them; BatchNorm is already folded into the convolutions at export). ``spinning``: intra-op threads busy-wait
    between operators (onnxruntime's default, lowest latency); pass False on a machine shared with other work.

    Args:
        path: the ``.onnx`` file written by :func:`facemarks.serving.export.export_onnx`.
        threads: intra-op threads (None: :func:`available_cores`).
        optimization: ``disable`` | ``basic`` | ``extended`` | ``all``.
        spinning: let intra-op threads spin between operators.
    """

    def __init__(self, path: str | Path, threads: int | None = None, optimization: str = "all",
                 spinning: bool = True):
        ort = extras.onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} not found (run `dvc repro export`)")
        self.options = session_options(threads, optimization, spinning)
        self.session = ort.InferenceSession(str(self.path), self.options, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        if inp.name != INPUT_NAME or out.name != OUTPUT_NAME:
            raise ValueError(f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                             f"got {inp.name!r} and {out.name!r}")
        side = inp.shape[-1]
        if not isinstance(side, int):
            raise ValueError(f"{self.path}: input side must be fixed at export, got shape {inp.shape}")
        self.input_size = side
        self.num_keypoints = out.shape[1]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.loss = self.metadata.get("loss")
        self.threads = self.options.intra_op_num_threads

    @property
    def precision(self) -> str:
        """``int8`` for a statically quantised file (metadata ``precision``), else ``fp32``."""
        return "int8" if self.metadata.get("precision") == "int8" else "fp32"

    @property
    def saturates_here(self) -> bool:
        """True for an int8 file with full-range 8-bit weights (metadata ``weights`` = ``full``) on a CPU without VNNI
        (:func:`facemarks.core.cpuinfo.has_vnni`): its u8 x s8 products saturate here, so a guard that passed on the
        exporting CPU says nothing about this one (``docs/deploy.md``). 7-bit weights never saturate."""
        return self.precision == "int8" and self.metadata.get("weights") == "full" and not cpuinfo.has_vnni()

    @property
    def int8_passed(self) -> bool:
        """True for an int8 file whose accuracy guard passed (metadata ``int8_check`` = ``passed``, written by the
        export stage after comparing it with its fp32 twin) and that runs here as it ran there (not
        :attr:`saturates_here`); False for fp32 files, failed or unchecked int8 ones."""
        return self.precision == "int8" and self.metadata.get("int8_check") == "passed" and not self.saturates_here

    def int8_passed_for(self, decoder: str | None = None) -> bool:
        """:attr:`int8_passed`, or — for one ``decoder`` — True when the guard passed for that decoder (metadata
        ``int8_decoders_passed``: the decoders int8 kept within the tolerance on every check)."""
        if self.int8_passed or decoder is None or self.precision != "int8" or self.saturates_here:
            return self.int8_passed
        return decoder in self.metadata.get("int8_decoders_passed", "").split(",")

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(N, 1, S, S)`` in [0, 1] → heatmaps float32 ``(N, K, h, w)``."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 crops ``(N, S, S)`` → heatmaps float32 ``(N, K, h, w)``, ``batch_size`` crops per call.

        Scaling to [0, 1] matches :func:`facemarks.training.model.images_to_tensor` (``/ 255`` in float32).
        """
        images = np.asarray(images)
        assert images.ndim == 3 and images.shape[1:] == (self.input_size, self.input_size), (
            f"expected (N, {self.input_size}, {self.input_size}) crops, got {images.shape}")
        if len(images) == 0:
            raise ValueError("OnnxHeatmaps: no images given")
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size, None].astype(np.float32) / np.float32(255.0)
            out.append(self.run(x))
        return np.concatenate(out)
