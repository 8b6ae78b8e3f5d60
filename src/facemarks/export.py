"""ONNX export of a trained :class:`facemarks.model.HeatmapNet`, its parity check against torch, MLflow logging.

Note:
    N: crops, K: keypoints (68), S: model input side (fixed at export), h = w = S / 4: map side.

The exported graph is the network plus :func:`facemarks.model.outputs_to_heatmaps`: input ``images`` float32
``(N, 1, S, S)`` grey in [0, 1] (:func:`facemarks.model.images_to_tensor`: uint8 / 255), output ``heatmaps`` float32
``(N, K, h, w)`` in target units (sigmoid applied for ``bce``), ``N`` dynamic. Decoding stays in
:mod:`facemarks.codec`; :class:`facemarks.runtime.OnnxHeatmaps` runs the file without torch.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter (it needs ``onnxscript``).
torch 2.14 still has the TorchScript exporter (``dynamo=False``) but warns that it will be removed; the
``torch.export`` one is the maintained path, declares the batch axis with ``torch.export.Dim`` and, with
``optimize=True``, folds every BatchNorm into the convolution before it (the model is exported in eval mode).
Opset :data:`OPSET` (torch 2.14's default for this exporter; onnxruntime 1.32 runs it natively). The file is a single
``.onnx`` (weights inline, no external data) carrying metadata ``loss``, ``input_size``, ``num_keypoints``, ``stride``
and ``source_sha256`` (of the ``model.pt`` it was exported from).
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facemarks.atomic import atomic_path
from facemarks.model import LOSSES, STRIDE, HeatmapNet, outputs_to_heatmaps
from facemarks.runtime import INPUT_NAME, OUTPUT_NAME, OnnxHeatmaps

OPSET = 20
HEATMAP_TOLERANCE = 1e-4  # max |onnxruntime - torch| over every heatmap value
POINT_TOLERANCE_PX = 1e-3  # max distance (input px) between the points decoded from either backend's heatmaps
MLFLOW_NAME = "onnx_model"  # the ONNX model's name in the train run, beside the PyTorch ``model``
# Points are compared only on peaked maps (:func:`peaked`): on a flat map (an untrained or collapsed model) every
# decoder is ill-conditioned, and two backends whose heatmaps agree to 1e-7 can decode points pixels apart.
PEAK_CONTRAST = 0.1  # max - median of the map, in target units (targets peak at 1)
PEAK_MARGIN = 10 * HEATMAP_TOLERANCE  # the max beats every value outside its 3 x 3 neighbourhood by this


class ParityError(RuntimeError):
    """The exported model's heatmaps or decoded points differ from torch's by more than the tolerances."""


class HeatmapsModule(nn.Module):
    """``model`` followed by :func:`facemarks.model.outputs_to_heatmaps` for ``loss``: the graph that is exported."""

    def __init__(self, model: HeatmapNet, loss: str):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"HeatmapsModule: unknown loss {loss!r}; allowed: {LOSSES}")
        self.model, self.loss = model, loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1, S, S)`` grey in [0, 1] → heatmaps ``(N, K, S/4, S/4)``."""
        return outputs_to_heatmaps(self.model(images), self.loss)


def export_onnx(model: HeatmapNet, loss: str, path: str | Path, input_size: int,
                source: str | Path | None = None) -> Path:
    """Write ``model`` (trained with ``loss``, input side ``input_size``) to ``path`` as ONNX; returns ``path``.

    The model is exported in eval mode on the CPU (its own mode and device are restored); the file is checked with
    ``onnx.checker`` and written atomically. ``source``: the ``model.pt`` it came from, whose SHA-256 goes into the
    metadata as ``source_sha256`` (``facemarks predict`` uses the ONNX twin only when it matches).
    """
    import onnx

    if input_size % 32:
        raise ValueError(f"export_onnx: input_size must be a multiple of 32, got {input_size}")
    was_training, device = model.training, next(model.parameters()).device
    module = HeatmapsModule(model.to("cpu").eval(), loss).eval()
    example = torch.rand(2, 1, input_size, input_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("N", min=1, max=65536)
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per optimiser pass otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"images": {0: batch}}, optimize=True, external_data=False)
        proto = program.model_proto
    finally:
        model.to(device).train(was_training)
    meta = {"loss": loss, "input_size": str(input_size), "num_keypoints": str(model.num_keypoints),
            "stride": str(STRIDE), "producer": f"facemarks / torch {torch.__version__.split('+')[0]}"}
    if source is not None:
        from facemarks.sources import file_sha256

        meta["source_sha256"] = file_sha256(Path(source))
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(path)


def peaked(heatmaps: np.ndarray) -> np.ndarray:
    """bool ``(N, K)``: the map ``(h, w)`` has one clear peak, i.e. ``max - median >= PEAK_CONTRAST`` and the max
    exceeds every value outside its 3 x 3 neighbourhood by at least :data:`PEAK_MARGIN`."""
    n, k, h, w = heatmaps.shape
    flat = np.asarray(heatmaps, np.float64).reshape(n, k, h * w)
    top = flat.max(-1)
    contrast = top - np.median(flat, -1)
    iy, ix = np.divmod(flat.argmax(-1), w)  # (N, K)
    yy, xx = np.divmod(np.arange(h * w), w)  # (h*w,)
    near = (np.abs(yy - iy[..., None]) <= 1) & (np.abs(xx - ix[..., None]) <= 1)  # (N, K, h*w)
    rival = np.where(near, -np.inf, flat).max(-1)
    return (contrast >= PEAK_CONTRAST) & (top - rival >= PEAK_MARGIN)


def parity(model: HeatmapNet, loss: str, runtime: OnnxHeatmaps, images: np.ndarray, sigma: float,
           decoders: tuple[str, ...] | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Compare ``runtime`` (the exported model) with ``model`` on uint8 crops ``images`` ``(N, S, S)``.

    Returns ``{"n_faces", "max_abs_heatmap_diff", "max_point_diff_px": {decoder: px}, "max_point_diff_px_any",
    "n_points", "n_points_compared", "heatmap_tolerance", "point_tolerance_px", "ok"}``: the largest absolute heatmap
    difference over all ``N x K x h x w`` values, and per decoder (every one of :data:`facemarks.codec.DECODERS` unless
    ``decoders`` is given) the largest distance in input px between the points decoded from either backend's
    heatmaps, over the ``n_points_compared`` of ``N x K`` maps that torch predicts :func:`peaked` (0 px when none).
    """
    from facemarks.codec import DECODERS
    from facemarks.inference import make_codec, predict_heatmaps

    images = np.asarray(images)
    ours = runtime(images, batch_size)
    ref = predict_heatmaps(model, images, loss, batch_size)
    codec = make_codec(images.shape[-1], sigma)
    compared = peaked(ref)
    points = {}
    for name in decoders or DECODERS:
        a = np.asarray(codec.decode(ours, name)[0], np.float64)
        b = np.asarray(codec.decode(ref, name)[0], np.float64)
        dist = np.linalg.norm(a - b, axis=-1)
        dist[np.isnan(a).any(-1) & np.isnan(b).any(-1)] = 0.0  # both undecodable: the same answer
        points[name] = float(np.nan_to_num(dist[compared], nan=np.inf).max(initial=0.0))
    heat = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    worst = max(points.values())
    return {"n_faces": int(len(images)), "max_abs_heatmap_diff": heat, "max_point_diff_px": points,
            "max_point_diff_px_any": worst, "n_points": int(compared.size),
            "n_points_compared": int(compared.sum()), "heatmap_tolerance": HEATMAP_TOLERANCE,
            "point_tolerance_px": POINT_TOLERANCE_PX, "ok": heat <= HEATMAP_TOLERANCE and worst <= POINT_TOLERANCE_PX}


def check_parity(result: dict[str, Any], name: str) -> None:
    """Raise :class:`ParityError` (one line naming ``name`` and the worst difference) unless ``result["ok"]``."""
    if not result["ok"]:
        worst = max(result["max_point_diff_px"], key=result["max_point_diff_px"].get)
        raise ParityError(f"{name}: onnxruntime vs torch: max |heatmap diff| {result['max_abs_heatmap_diff']:.3g} "
                          f"(tolerance {HEATMAP_TOLERANCE:g}), max point diff {result['max_point_diff_px_any']:.3g} px "
                          f"with decoder {worst} (tolerance {POINT_TOLERANCE_PX:g} px)")


def log_onnx_mlflow(path: str | Path, input_size: int) -> str:
    """Log the ONNX file to the active MLflow run with the ``onnx`` flavour as :data:`MLFLOW_NAME` (one
    ``(1, 1, S, S)`` input example, onnxruntime pinned in its requirements); returns the model URI."""
    import mlflow.onnx
    import onnx
    import onnxruntime

    example = np.zeros((1, 1, input_size, input_size), np.float32)
    reqs = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"]
    info = mlflow.onnx.log_model(onnx.load(str(path)), name=MLFLOW_NAME, input_example=example,
                                 pip_requirements=reqs, save_as_external_data=False,
                                 onnx_execution_providers=["CPUExecutionProvider"])
    return info.model_uri
