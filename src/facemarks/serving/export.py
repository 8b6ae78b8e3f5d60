"""ONNX export of a trained :class:`facemarks.training.model.HeatmapNet`, its parity check against torch, MLflow logging.

Note:
    N: crops, K: keypoints (68), S: model input side (fixed at export), h = w = S / 4: map side.

The exported graph is the network plus :func:`facemarks.training.model.outputs_to_heatmaps`: input ``images`` float32
``(N, 1, S, S)`` grey in [0, 1] (:func:`facemarks.training.model.images_to_tensor`: uint8 / 255), output ``heatmaps`` float32
``(N, K, h, w)`` in target units (sigmoid applied for ``bce``), ``N`` dynamic. Decoding stays in
:mod:`facemarks.heatmaps.codec`; :class:`facemarks.serving.runtime.OnnxHeatmaps` runs the file without torch.

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

from facemarks.core import cpuinfo, extras

from facemarks.evaluation import metrics
from facemarks.core.atomic import atomic_path
from facemarks.augmentation.crops import face_crop, invert_points
from facemarks.heatmaps.codec import DECODERS, HeatmapCodec
from facemarks.core.hashing import file_sha256
from facemarks.serving.inference import make_codec, predict_heatmaps
from facemarks.training.model import LOSSES, STRIDE, HeatmapNet, outputs_to_heatmaps
from facemarks.serving.runtime import INPUT_NAME, OUTPUT_NAME, OnnxHeatmaps

OPSET = 20
HEATMAP_TOLERANCE = 1e-4  # max |onnxruntime - torch| over every heatmap value
# max distance (input px) between the points decoded from either backend's heatmaps. The decoders amplify heatmap
# rounding: DARK's log-Taylor step divides by small tail values, and float32 kernels differ by CPU (AVX2 / AVX-512,
# with or without VNNI): 3e-6 heatmap differences gave 0.0048 px on an AVX2 EPYC. A hundredth of an input pixel is
# 0.025 NME points at a 40 px inter-ocular distance: far below any accuracy that matters, far above rounding.
POINT_TOLERANCE_PX = 1e-2
MLFLOW_NAME = "onnx_model"  # the ONNX model's name in the train run, beside the PyTorch ``model``
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"  # node metadata of torch's dynamo exporter: absolute source paths
# Points are compared only on peaked maps (:func:`peaked`): on a flat map (an untrained or collapsed model) every
# decoder is ill-conditioned, and two backends whose heatmaps agree to 1e-7 can decode points pixels apart.
PEAK_CONTRAST = 0.1  # max - median of the map, in target units (targets peak at 1)
PEAK_MARGIN = 10 * HEATMAP_TOLERANCE  # the max beats every other value (its neighbours too) by this


class ParityError(RuntimeError):
    """The exported model's heatmaps or decoded points differ from torch's by more than the tolerances."""


class HeatmapsModule(nn.Module):
    """``model`` followed by :func:`facemarks.training.model.outputs_to_heatmaps` for ``loss``: the graph that is exported."""

    def __init__(self, model: HeatmapNet, loss: str):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"HeatmapsModule: unknown loss {loss!r}; allowed: {LOSSES}")
        self.model, self.loss = model, loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1, S, S)`` grey in [0, 1] → heatmaps ``(N, K, S/4, S/4)``."""
        return outputs_to_heatmaps(self.model(images), self.loss)


def drop_stack_traces(graph) -> None:
    """Remove the exporter's per-node :data:`STACK_TRACE_KEY` entries from ``graph`` and its subgraphs, in place:
    they name the absolute paths of the source files that traced the model, so the same model exported from two
    clones (or two machines) would give two files, and a shipped file would carry the exporting machine's paths."""
    for node in graph.node:
        keep = [(m.key, m.value) for m in node.metadata_props if m.key != STACK_TRACE_KEY]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            for key, value in keep:
                node.metadata_props.add(key=key, value=value)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                drop_stack_traces(sub)


def save_with_metadata(proto, meta: dict[str, str], path: str | Path) -> Path:
    """Replace the ONNX model's metadata with ``meta``, drop the exporter's stack traces (:func:`drop_stack_traces`),
    check the model and write it to ``path`` atomically."""
    import onnx

    drop_stack_traces(proto.graph)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(path)


def export_onnx(model: HeatmapNet, loss: str, path: str | Path, input_size: int,
                source: str | Path | None = None) -> Path:
    """Write ``model`` (trained with ``loss``, input side ``input_size``) to ``path`` as ONNX; returns ``path``.

    The model is exported in eval mode on the CPU (its own mode and device are restored); the file is checked with
    ``onnx.checker`` and written atomically. ``source``: the ``model.pt`` it came from, whose SHA-256 goes into the
    metadata as ``source_sha256`` (``facemarks predict`` uses the ONNX twin only when it matches).
    """
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
        meta["source_sha256"] = file_sha256(Path(source))
    return save_with_metadata(proto, meta, path)


def peaked(heatmaps: np.ndarray) -> np.ndarray:
    """bool ``(N, K)``: the map ``(h, w)`` has one clear peak, i.e. ``max - median >= PEAK_CONTRAST``, the max
    exceeds every other value, its 8 neighbours included, by at least :data:`PEAK_MARGIN` (a max tied with a
    neighbour moves argmax, and every decoder that starts from it, by a whole map cell on rounding alone), and its
    right / left and down / up neighbours differ by at least :data:`PEAK_MARGIN` (the direction of a quarter-pixel
    step)."""
    n, k, h, w = heatmaps.shape
    flat = np.asarray(heatmaps, np.float64).reshape(n, k, h * w)
    top = flat.max(-1)
    contrast = top - np.median(flat, -1)
    iy, ix = np.divmod(flat.argmax(-1), w)  # (N, K)
    yy, xx = np.divmod(np.arange(h * w), w)  # (h*w,)
    second = np.where((yy == iy[..., None]) & (xx == ix[..., None]), -np.inf, flat).max(-1)  # (N, K): any other value
    # the quarter-pixel step of argmax_quarter goes toward the higher neighbour: a near tie (right vs left, down vs
    # up) flips it by half a map cell on rounding alone, so such a map has no unambiguous discrete answer
    grid = np.pad(np.asarray(heatmaps, np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    at = lambda dy, dx: np.take_along_axis(  # noqa: E731
        grid.reshape(n, k, -1), ((iy + 1 + dy) * (w + 2) + ix + 1 + dx)[..., None], -1)[..., 0]
    steps = [(at(0, 1), at(0, -1)), (at(1, 0), at(-1, 0))]
    clear = np.ones((n, k), bool)
    for a, b in steps:
        with np.errstate(invalid="ignore"):
            clear &= ~np.isfinite(a - b) | (np.abs(a - b) >= PEAK_MARGIN)
    return (contrast >= PEAK_CONTRAST) & (top - second >= PEAK_MARGIN) & clear


def parity(model: HeatmapNet, loss: str, runtime: OnnxHeatmaps, images: np.ndarray, sigma: float,
           decoders: tuple[str, ...] | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Compare ``runtime`` (the exported model) with ``model`` on uint8 crops ``images`` ``(N, S, S)``.

    Returns ``{"n_faces", "max_abs_heatmap_diff", "max_point_diff_px": {decoder: px}, "max_point_diff_px_any",
    "n_points", "n_points_compared", "heatmap_tolerance", "point_tolerance_px", "ok"}``: the largest absolute heatmap
    difference over all ``N x K x h x w`` values, and per decoder (every one of :data:`facemarks.heatmaps.codec.DECODERS` unless
    ``decoders`` is given) the largest distance in input px between the points decoded from either backend's
    heatmaps, over the ``n_points_compared`` of ``N x K`` maps that torch predicts :func:`peaked` (0 px when none).
    """
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

    onnxruntime = extras.onnxruntime()
    example = np.zeros((1, 1, input_size, input_size), np.float32)
    reqs = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"]
    info = mlflow.onnx.log_model(onnx.load(str(path)), name=MLFLOW_NAME, input_example=example,
                                 pip_requirements=reqs, save_as_external_data=False,
                                 onnx_execution_providers=["CPUExecutionProvider"])
    return info.model_uri


# ------------------------------------------------------------------------------------------------ int8
# Static int8 quantisation with onnxruntime's own tooling, and its accuracy guard (issue 23).
INT8_FILE = "model.int8.onnx"  # written beside the fp32 ``model.onnx``
QUANT_FORMATS = ("qoperator", "qdq")
WEIGHT_RANGES = ("auto", "reduced", "full")


def weight_range(setting: str = "auto") -> str:
    """The int8 weight range ``export.weights`` resolves to: ``reduced`` (7-bit weights, onnxruntime's
    ``reduce_range``) or ``full`` (8 bit). ``auto``: ``full`` only where the CPU has VNNI
    (:func:`facemarks.core.cpuinfo.has_vnni`). Without VNNI, onnxruntime's u8 x s8 kernels add pairs of products in 16 bits
    with saturation (255 x 128 x 2 > 32767), which full-range weights overflow; 7-bit weights cannot
    (255 x 64 x 2 = 32640)."""
    if setting not in WEIGHT_RANGES:
        raise ValueError(f"weight_range: {setting!r} is not one of {WEIGHT_RANGES}")
    if setting != "auto":
        return setting
    return "full" if cpuinfo.has_vnni() else "reduced"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
NME_TOLERANCE = 0.1  # NME points (%) int8 may lose against fp32 (params.yaml export.tolerance_nme)
#: Metadata keys of the int8 file beyond the fp32 ones (which it keeps, ``source_sha256`` included).
#: ``int8_check`` is ``passed`` | ``failed``; a file without it (interrupted stage) counts as not passed.
INT8_KEYS = ("precision", "quant_format", "calibration_method", "calibration_faces", "calibration_seed",
             "fp32_sha256", "int8_check", "int8_max_nme_delta", "int8_tolerance_nme")


@contextlib.contextmanager
def _quiet_logging():
    """Raise the root logger to ERROR for the duration (``quant_pre_process`` / ``quantize_static`` log through it at
    INFO and WARNING), then put its level back."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class CropReader:
    """:class:`onnxruntime.quantization.CalibrationDataReader` over uint8 crops ``(N, S, S)``: batches of
    ``batch_size`` as the graph's input (float32 ``(B, 1, S, S)`` in [0, 1], as :class:`OnnxHeatmaps` feeds it)."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.images, self.batch_size, self._next = np.asarray(images), int(batch_size), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next:self._next + self.batch_size]
        self._next += self.batch_size
        return {INPUT_NAME: batch[:, None].astype(np.float32) / np.float32(255.0)}

    def rewind(self) -> None:
        self._next = 0


def calibration_sample(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``min(n, N)`` crops of ``images`` ``(N, S, S)`` drawn without replacement with ``seed`` (sorted indices)."""
    images = np.asarray(images)
    if n < 1 or len(images) == 0:
        raise ValueError(f"calibration_sample: need n >= 1 and at least one image, got n={n}, N={len(images)}")
    idx = np.sort(np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False))
    return np.asarray(images[idx])


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (the weights are not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def write_metadata(path: str | Path, updates: dict[str, Any]) -> None:
    """Set ``updates`` (values as strings) in the ``metadata_props`` of the ONNX file ``path``, atomically."""
    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update({k: str(v) for k, v in updates.items()})
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))


def quantize_int8(fp32_path: str | Path, path: str | Path, calibration: np.ndarray, *, fmt: str = "qoperator",
                  method: str = "minmax", seed: int | None = None, batch_size: int = 16,
                  weights: str = "full") -> Path:
    """Static int8 quantisation of the exported fp32 model ``fp32_path`` into ``path``; returns ``path``.

    onnxruntime's own tooling: ``quant_pre_process`` (shape inference and graph optimisation, the step its docs
    ask for before quantising), then ``quantize_static`` with per-channel int8 weights (symmetric) and uint8
    activations (asymmetric, ranges from ``method`` over the calibration crops ``calibration`` uint8 ``(N, S, S)``
    fed by :class:`CropReader`), weights in the ``weights`` range (``full`` 8 bit or ``reduced`` 7 bit,
    :func:`weight_range`), in ``fmt``: ``qoperator`` (QLinearConv etc.) or ``qdq`` (QuantizeLinear /
    DequantizeLinear pairs that onnxruntime fuses at load). The graph keeps the fp32 interface (float32 in, float32
    heatmaps out). The file keeps the fp32 metadata (``source_sha256`` included) and adds ``precision=int8``,
    ``quant_format``, ``calibration_method``, ``calibration_faces``, ``calibration_seed`` and ``fp32_sha256``;
    ``int8_check`` is added by :func:`record_int8_check` once the accuracy guard has run.
    """
    import tempfile

    import onnx
    q = extras.optional("onnxruntime.quantization")

    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quantize_int8: fmt must be one of {QUANT_FORMATS}, got {fmt!r}")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"quantize_int8: method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if weights not in ("full", "reduced"):
        raise ValueError(f"quantize_int8: weights must be full or reduced (resolve auto: weight_range), got {weights!r}")
    calibration = np.asarray(calibration)
    if calibration.ndim != 3 or len(calibration) == 0:
        raise ValueError(f"quantize_int8: calibration must be uint8 (N, S, S) crops, got {calibration.shape}")
    meta = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory(prefix="facemarks-int8-") as tmp, _quiet_logging(), \
            contextlib.redirect_stdout(io.StringIO()):  # the entropy / percentile calibrators print their progress
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        q.quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        method_enum = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                       "percentile": q.CalibrationMethod.Percentile}[method]
        q.quantize_static(str(pre), str(out), CropReader(calibration, batch_size),
                        quant_format=q.QuantFormat.QOperator if fmt == "qoperator" else q.QuantFormat.QDQ,
                        per_channel=True, reduce_range=weights == "reduced", activation_type=q.QuantType.QUInt8,
                        weight_type=q.QuantType.QInt8, calibrate_method=method_enum,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        proto = onnx.load(str(out))
    meta.update({"precision": "int8", "quant_format": fmt, "calibration_method": method, "weights": weights,
                 "calibration_faces": str(len(calibration)), "calibration_seed": "" if seed is None else str(seed),
                 "fp32_sha256": file_sha256(Path(fp32_path))})
    return save_with_metadata(proto, meta, path)


def int8_accuracy(fp32: OnnxHeatmaps, int8: OnnxHeatmaps, crops: np.ndarray, transforms: np.ndarray,
                  reference: np.ndarray, sigma: float, decoders: tuple[str, ...] | None = None,
                  batch_size: int = 64) -> dict[str, Any]:
    """NME of the int8 model against its fp32 twin on uint8 crops ``(N, S, S)`` whose original→crop transforms are
    ``transforms`` ``(N, 3, 3)`` and reference points ``reference`` ``(N, K, 2)`` original px (NaN: unlabelled).

    Points are decoded with each decoder (every one of :data:`facemarks.heatmaps.codec.DECODERS` unless ``decoders``), mapped
    to original px and scored with the inter-ocular NME (%) of the reference. Returns ``{"n_faces",
    "nme_fp32": {decoder: %}, "nme_int8": {decoder: %}, "nme_delta": {decoder: int8 − fp32 NME points},
    "max_nme_delta", "nme_int8_vs_fp32": {decoder: % of the int8 points from the fp32 points},
    "max_abs_heatmap_diff", "mean_abs_heatmap_diff"}``. A positive delta is accuracy int8 loses.
    """
    crops, transforms = np.asarray(crops), np.asarray(transforms, np.float64)
    ref = np.asarray(reference, np.float64)
    if not (len(crops) == len(transforms) == len(ref) > 0):
        raise ValueError(f"int8_accuracy: crops {crops.shape}, transforms {transforms.shape} and reference "
                         f"{ref.shape} must be non-empty with the same N")
    h32, h8 = fp32(crops, batch_size), int8(crops, batch_size)
    side = crops.shape[-1]
    codec = HeatmapCodec(side, h32.shape[-1], sigma)
    visible = np.isfinite(ref).all(-1)
    norm = metrics.normaliser(ref, "io")
    out: dict[str, Any] = {"n_faces": int(len(crops)), "nme_fp32": {}, "nme_int8": {}, "nme_delta": {},
                           "nme_int8_vs_fp32": {}}
    for name in decoders or DECODERS:
        p32 = invert_points(np.asarray(codec.decode(h32, name)[0], np.float64), transforms)
        p8 = invert_points(np.asarray(codec.decode(h8, name)[0], np.float64), transforms)
        e32 = 100 * float(np.nanmean(metrics.nme(p32, ref, norm, visible)))
        e8 = 100 * float(np.nanmean(metrics.nme(p8, ref, norm, visible)))
        out["nme_fp32"][name], out["nme_int8"][name], out["nme_delta"][name] = e32, e8, e8 - e32
        out["nme_int8_vs_fp32"][name] = 100 * float(np.nanmean(metrics.nme(p8, p32, norm, visible)))
    diff = np.abs(h8.astype(np.float64) - h32.astype(np.float64))
    out.update(max_nme_delta=max(out["nme_delta"].values()), max_abs_heatmap_diff=float(diff.max()),
               mean_abs_heatmap_diff=float(diff.mean()))
    return out


def photo_accuracy(fp32: OnnxHeatmaps, int8: OnnxHeatmaps, items: list[tuple[np.ndarray, Any, np.ndarray]], *,
                   margin: float, sigma: float, decoders: tuple[str, ...] | None = None) -> dict[str, Any]:
    """:func:`int8_accuracy` on whole photos: ``items`` are ``(image (H, W[, 3]) uint8, box (l, t, w, h),
    reference points (K, 2) image px)``; each face is cropped as ``predict`` does
    (:func:`facemarks.augmentation.augment.face_crop` at the model's input size with ``margin``). For a real-photo folder:
    ``[(s.images[f.file], f.box, f.points) for f in s.faces]`` of :func:`facemarks.evaluation.real_photos.photo_set` (dlib's
    detector box mapped as predict maps it, dlib's or human points as reference)."""
    if not items:
        raise ValueError("photo_accuracy: no photos given")
    crops, transforms = zip(*(face_crop(image, tuple(float(v) for v in box), fp32.input_size, margin)
                              for image, box, _ in items))
    ref = np.stack([np.asarray(points, np.float64) for _, _, points in items])
    return int8_accuracy(fp32, int8, np.stack(crops), np.stack(transforms), ref, sigma, decoders)


def int8_verdict(checks: dict[str, dict[str, Any]], tolerance: float = NME_TOLERANCE) -> dict[str, Any]:
    """The accuracy guard over named :func:`int8_accuracy` results (``test``, ``photos``, ...): passed when every
    ``max_nme_delta`` ≤ ``tolerance`` NME points (every decoder). Returns ``{"ok", "tolerance_nme", "max_nme_delta",
    "failed": [names], "checked": [names], "decoders_passed": [decoders]}``; ``decoders_passed`` are the decoders
    whose ``nme_delta`` is ≤ ``tolerance`` in every check (``predict`` decodes with one decoder, the loss's best:
    int8 serves it when that decoder passed). No check at all does not pass."""
    worst = max((c["max_nme_delta"] for c in checks.values()), default=float("inf"))
    failed = [name for name, c in checks.items() if not c["max_nme_delta"] <= tolerance]
    deltas = [c.get("nme_delta") for c in checks.values()]
    decoders = [] if not checks or any(d is None for d in deltas) else [
        name for name in deltas[0] if all(d.get(name, float("inf")) <= tolerance for d in deltas)]
    return {"ok": bool(checks) and not failed, "tolerance_nme": float(tolerance), "max_nme_delta": float(worst),
            "failed": failed, "checked": list(checks), "decoders_passed": decoders}


def record_int8_check(path: str | Path, verdict: dict[str, Any]) -> None:
    """Write the guard's verdict into the int8 file's metadata (``int8_check`` passed | failed, over every decoder;
    ``int8_decoders_passed``, comma-separated; ``int8_max_nme_delta``, ``int8_tolerance_nme``): a copied file
    carries it, and ``predict`` reads it there."""
    write_metadata(path, {"int8_check": "passed" if verdict["ok"] else "failed",
                          "int8_decoders_passed": ",".join(verdict.get("decoders_passed", [])),
                          "int8_max_nme_delta": f"{verdict['max_nme_delta']:.6g}",
                          "int8_tolerance_nme": f"{verdict['tolerance_nme']:g}"})


def used_by_predict(verdict: dict[str, Any]) -> str:
    """What ``facemarks predict`` runs by default given the guard's ``verdict`` (metrics/export.json)."""
    if verdict["ok"]:
        return "int8"
    if verdict.get("decoders_passed"):
        return f"int8 with the {', '.join(verdict['decoders_passed'])} decoders; fp32 with the others"
    return "fp32 (int8 missed the NME tolerance)"


def quantize_and_check(fp32_path: str | Path, train_images: np.ndarray, test: Any, *, sigma: float, margin: float,
                       fmt: str = "qoperator", method: str = "minmax", calibration_faces: int = 64, seed: int = 0,
                       tolerance: float = NME_TOLERANCE, weights: str = "auto",
                       photos: list[tuple[np.ndarray, Any, np.ndarray]] | None = None) -> dict[str, Any]:
    """The export stage's int8 step for one loss: quantise ``fp32_path`` into :data:`INT8_FILE` beside it
    (:func:`quantize_int8`, calibrated on :func:`calibration_sample` of the training crops ``train_images``
    ``(N, S, S)``), run the accuracy guard on the ``test`` split (a :class:`facemarks.core.store.Split`: crops,
    transforms, original-px points) and, when given, on ``photos`` (:func:`photo_accuracy` items), and record the
    verdict in the file (:func:`record_int8_check`). ``weights``: ``export.weights`` (:func:`weight_range`). Returns
    the ``metrics/export.json`` entry: ``path``, ``quant_format``, ``weights`` (resolved), ``processor`` (model and flags of
    the CPU the guard ran on: int8 numerics depend on VNNI), ``calibration_method``, ``calibration_faces``, ``calibration_seed``, ``checks`` (name →
    :func:`int8_accuracy` result), ``ok``, ``tolerance_nme``, ``max_nme_delta``, ``failed``, ``decoders_passed``,
    ``used_by_predict``. No
    timings (they go to ``benchmarks/bench_infer.py``)."""
    fp32_path = Path(fp32_path)
    calibration = calibration_sample(train_images, calibration_faces, seed)
    resolved = weight_range(weights)
    path = quantize_int8(fp32_path, fp32_path.with_name(INT8_FILE), calibration, fmt=fmt, method=method, seed=seed,
                         weights=resolved)
    ref32, ref8 = OnnxHeatmaps(fp32_path), OnnxHeatmaps(path)
    checks = {"test": int8_accuracy(ref32, ref8, np.asarray(test.images), np.asarray(test.transform),
                                    np.asarray(test.orig_points), sigma)}
    if photos:
        checks["photos"] = photo_accuracy(ref32, ref8, photos, margin=margin, sigma=sigma)
    verdict = int8_verdict(checks, tolerance)
    record_int8_check(path, verdict)
    return {"path": str(path), "quant_format": fmt, "weights": resolved, "processor": cpuinfo.describe(),
            "calibration_method": method,
            "calibration_faces": int(len(calibration)), "calibration_seed": int(seed), "checks": checks,
            **{k: verdict[k] for k in ("ok", "tolerance_nme", "max_nme_delta", "failed", "decoders_passed")},
            "used_by_predict": used_by_predict(verdict)}
