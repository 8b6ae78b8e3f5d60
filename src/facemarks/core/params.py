"""Typed, validated parameters: one frozen dataclass per ``params.yaml`` section.

Every stage calls :func:`load_params` once, before any work. An unknown key, a wrong type or an
out-of-range value raises :class:`ParamsError` with one line naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from facemarks.core.atomic import atomic_path

DEFAULT_PATH = "params.yaml"


class ParamsError(ValueError):
    """A bad parameter value; ``str(err)`` is one line naming the key."""


def compile_rule(pattern: str, key: str = "data.local.group") -> re.Pattern | None:
    """A person-group rule (``data.local.group``) compiled, ``None`` for the empty rule; an invalid pattern or one
    without a capture group is a one-line :class:`ParamsError` naming ``key`` (:mod:`facemarks.data.groups` uses it)."""
    if not pattern:
        return None
    try:
        rule = re.compile(pattern)
    except re.error as exc:
        raise ParamsError(f"{key} = {pattern!r}: not a regular expression ({exc})") from None
    if rule.groups < 1:
        raise ParamsError(f"{key} = {pattern!r}: needs a capture group naming the person, e.g. '^(.+)_\\d+$'")
    return rule


def _p(default: Any, lo: float | None = None, hi: float | None = None, *, choices: tuple | None = None,
       lo_open: bool = False, pattern: str | None = None, doc: str = "") -> Any:
    """A field with validation metadata: inclusive range ``[lo, hi]`` (``lo_open`` → ``(lo, hi]``) or ``choices``."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "pattern": pattern, "doc": doc}
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Base:
    seed: int = _p(0, 0, 2**31 - 1, doc="data seed: faces, augmentation, splits (training: train.seed)")
    experiment: str = _p("facemarks", pattern=r"^[\w.\- ]+$", doc="MLflow experiment name")
    study: str = _p("", pattern=r"^[A-Za-z0-9_.-]*$", doc="MLflow tag study=<name> on every run (empty: none)")


@dataclass(frozen=True)
class Synthetic:
    n_train: int = _p(1500, 1, 1_000_000)
    n_test: int = _p(300, 1, 1_000_000)
    min_size: int = _p(160, 32, 4096)
    max_size: int = _p(400, 32, 4096)
    max_yaw: float = _p(60.0, 0, 89)
    max_pitch: float = _p(20.0, 0, 89)
    max_roll: float = _p(30.0, 0, 180)
    occluder_prob: float = _p(0.2, 0, 1)
    blur_prob: float = _p(0.2, 0, 1)
    noise_std: float = _p(4.0, 0, 64)
    glasses_prob: float = _p(0.15, 0, 1, doc="eyeglasses over the eyes (points stay labelled)")
    hand_prob: float = _p(0.08, 0, 1, doc="a hand over the chin, mouth or cheek (points stay labelled)")
    strand_prob: float = _p(0.3, 0, 1, doc="hair strands / fringe over the forehead, brows and temples")
    ears: bool = _p(True, doc="ears beside the jaw (hidden by long hair)")
    photo_texture: float = _p(0.08, 0, 1, doc="max strength of a bundled photo blended into skin (0: flat skin)")
    feature_contrast_min: float = _p(0.35, 0, 1, doc="lowest per-face strength of brows, lashes, lips (1: always full)")
    workers: int = _p(2, 1, 64)


@dataclass(frozen=True)
class Ibug300w:
    url: str = _p("http://dlib.net/files/data/ibug_300W_large_face_landmark_dataset.tar.gz", pattern=r"^(https?|file)://\S+$")
    sha256: str = _p("", pattern=r"^([0-9a-f]{64})?$", doc="expected SHA-256 (empty: record on first download)")
    cache_dir: str = _p("data/cache", pattern=r"^[^/\\~][^~]*$", doc="relative folder for the tarball")
    timeout_s: float = _p(30.0, 0, 3600, lo_open=True)


@dataclass(frozen=True)
class Local:
    path: str = _p("", doc="folder with dlib XML, images with .pts files, or a keypoints CSV and its images")
    test_fraction: float = _p(0.2, 0, 1, lo_open=True)
    group: str = _p("", doc="regex whose first group names the person in a file name (empty: every file its own "
                            "group); the test and validation splits keep a group on one side (facemarks.data.groups)")
    box: str = _p("training", choices=("training", "tight"),
                  doc="face box of points-only faces (CSV, .pts): the training-box rule, or the points' tight box")


@dataclass(frozen=True)
class Photos:
    path: str = _p("", doc="folder of unlabelled photos; dlib's predictor labels them (facemarks.data.teacher)")
    synthetic: int = _p(1500, 0, 1_000_000, doc="synthetic training faces that stay beside the photos")
    repeat: int = _p(4, 1, 1000, doc="times each training photo is listed in train.xml (its draws per epoch)")
    test_fraction: float = _p(0.2, 0, 0.9, doc="photos (by file) that go to the test split; 0: all train")
    upsample: int = _p(1, 0, 3, doc="dlib HOG detector upsampling (1: faces down to about 40 px)")
    min_score: float = _p(0.0, 0, 10, doc="dlib detections below this SVM score are skipped (0: dlib's threshold)")
    cache_dir: str = _p("data/cache/teacher", pattern=r"^[^~]+$", doc="teacher labels cached by image SHA-256")


@dataclass(frozen=True)
class Data:
    source: str = _p("synthetic", choices=("synthetic", "ibug300w", "local", "photos"))
    on_bad: str = _p("error", choices=("error", "skip"))
    synthetic: Synthetic = field(default_factory=Synthetic)
    ibug300w: Ibug300w = field(default_factory=Ibug300w)
    local: Local = field(default_factory=Local)
    photos: Photos = field(default_factory=Photos)


@dataclass(frozen=True)
class Augment:
    size: int = _p(64, 16, 1024, doc="model input size (px), a multiple of 32")
    margin: float = _p(0.25, 0, 2, doc="crop margin around the box, fraction of the box size")
    copies: int = _p(2, 0, 100, doc="augmented copies per training image")
    val_fraction: float = _p(0.1, 0, 0.9)
    rotation: float = _p(20.0, 0, 180, doc="max |rotation| degrees")
    scale_min: float = _p(0.9, 0.1, 10, lo_open=True)
    scale_max: float = _p(1.1, 0.1, 10, lo_open=True)
    translate: float = _p(0.05, 0, 0.5, doc="max shift, fraction of the crop size")
    flip_prob: float = _p(0.5, 0, 1)
    brightness: float = _p(0.2, 0, 1)
    contrast: float = _p(0.2, 0, 1)
    gamma: float = _p(0.2, 0, 1)
    blur_prob: float = _p(0.2, 0, 1)
    blur_sigma: float = _p(1.0, 0, 10)
    noise_std: float = _p(3.0, 0, 64)
    jpeg_prob: float = _p(0.3, 0, 1, doc="domain randomisation: JPEG re-encoding of the crop")
    jpeg_quality: int = _p(20, 1, 95, doc="lowest JPEG quality (drawn up to 90)")
    motion_blur_prob: float = _p(0.15, 0, 1, doc="linear motion blur, 2-5 px at a random angle")
    lowres_prob: float = _p(0.2, 0, 1, doc="downscale by 1.5-lowres_factor, then upscale back")
    lowres_factor: float = _p(3.0, 1, 8)
    colour_cast: float = _p(0.3, 0, 1, doc="per-face random RGB weights of the gray conversion (augmented copies)")
    sharpen_prob: float = _p(0.1, 0, 1, doc="unsharp masking (camera-style sharpening)")
    workers: int = _p(2, 1, 64)


#: the heatmap decoders (``facemarks.heatmaps.codec.DECODERS`` is this tuple; kept here so that params never imports torch)
DECODER_NAMES = ("argmax", "argmax_quarter", "weighted_average", "local_weighted_average", "soft_argmax", "dark",
                 "subpixel")


@dataclass(frozen=True)
class Encode:
    sigma: float = _p(1.5, 0.25, 10, doc="Gaussian sigma in heatmap pixels")
    dtype: str = _p("float16", choices=("float16", "float32"))
    decoder: str = _p("subpixel", choices=DECODER_NAMES)
    roundtrip_points: int = _p(2000, 1, 10_000_000)


LOSS_NAMES = ("mse", "bce", "awing")  # facemarks.training.model.LOSSES (kept here so that params never imports torch)


@dataclass(frozen=True)
class Train:
    losses: tuple[str, ...] = _p(("mse", "bce"), choices=LOSS_NAMES,
                                 doc="the losses the pipeline trains, exports, evaluates and compares (a list)")
    epochs_phase1: int = _p(2, 1, 1000)
    epochs_phase2: int = _p(1, 0, 1000)
    lr: float = _p(1e-3, 0, 10, lo_open=True)
    lr_drop: float = _p(0.1, 0, 1, lo_open=True)
    batch_size: int = _p(32, 1, 65536)
    weight_decay: float = _p(1e-5, 0, 1)
    grad_clip: float = _p(5.0, 0, 1e6)
    head_width: int = _p(64, 8, 4096)
    dropout: float = _p(0.1, 0, 0.9)
    pretrained: bool = _p(False)
    device: str = _p("auto", choices=("auto", "cpu", "cuda"))
    workers: int = _p(0, 0, 64)
    amp: bool = _p(True, doc="bf16 autocast on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16); fp32 elsewhere")
    seed: int = _p(0, 0, 2**31 - 1, doc="weight init, data order, dropout (data: base.seed)")


@dataclass(frozen=True)
class Export:
    int8: bool = _p(True, doc="also write exports/<loss>/model.int8.onnx (static int8) with its accuracy guard")
    format: str = _p("qoperator", choices=("qoperator", "qdq"), doc="int8 graph: QLinear* operators or QDQ pairs")
    calibration: str = _p("minmax", choices=("minmax", "entropy", "percentile"),
                          doc="activation-range calibration method (onnxruntime.quantization)")
    calibration_faces: int = _p(64, 1, 100_000, doc="training crops drawn (seeded) to calibrate the activations")
    seed: int = _p(0, 0, 2**31 - 1, doc="seed of the calibration draw")
    weights: str = _p("auto", choices=("auto", "reduced", "full"),
                      doc="int8 weight range: reduced (7 bit, no u8 x s8 saturation on CPUs without VNNI), full "
                          "(8 bit), auto (facemarks.serving.export.weight_range: chosen from the CPU flags)")
    tolerance_nme: float = _p(0.1, 0, 100, doc="NME points int8 may lose vs fp32; above: predict keeps fp32")


@dataclass(frozen=True)
class Evaluate:
    threshold: float = _p(0.08, 0, 1, lo_open=True, doc="FR/AUC threshold on NME (fraction)")
    batch_size: int = _p(64, 1, 65536)
    speed_faces: int = _p(32, 1, 100000, doc="faces timed for the ms/face speed rows")
    peers: bool = _p(True, doc="add the dlib68 row when the peers extra is installed")
    detect_images: int = _p(300, 1, 1_000_000, doc="test images scored for face detection (metrics/detect.json)")
    photos: str = _p("", doc="folder of real photos scored per loss (the photos block of metrics/eval.json); "
                             "empty: the two bundled portraits")
    photos_glob: str = _p("", doc="file-name glob narrowing the photos of evaluate.photos (e.g. '*.jpg'); empty: all")
    flip_test: bool = _p(True, doc="flip test-time augmentation (a crop and its mirror, maps averaged) in evaluate "
                                    "and facemarks predict")


@dataclass(frozen=True)
class Plot:
    n_examples: int = _p(8, 1, 64)
    n_heatmap_points: int = _p(4, 1, 68)
    dpi: int = _p(100, 30, 600)


@dataclass(frozen=True)
class Params:
    base: Base = field(default_factory=Base)
    data: Data = field(default_factory=Data)
    augment: Augment = field(default_factory=Augment)
    encode: Encode = field(default_factory=Encode)
    train: Train = field(default_factory=Train)
    export: Export = field(default_factory=Export)
    evaluate: Evaluate = field(default_factory=Evaluate)
    plot: Plot = field(default_factory=Plot)

    def check(self) -> None:
        """Cross-field rules."""
        s = self.data.synthetic
        if s.max_size < s.min_size:
            raise ParamsError(f"data.synthetic.max_size = {s.max_size} must be ≥ data.synthetic.min_size = {s.min_size}")
        a = self.augment
        if a.scale_max < a.scale_min:
            raise ParamsError(f"augment.scale_max = {a.scale_max} must be ≥ augment.scale_min = {a.scale_min}")
        if a.size % 32:
            raise ParamsError(f"augment.size = {a.size} must be a multiple of 32 (the ResNet18 backbone has stride 32; "
                              "heatmaps are 1/4 of the input)")
        compile_rule(self.data.local.group)
        if self.data.source == "local" and not self.data.local.path:
            raise ParamsError("data.local.path is empty: set it to a folder when data.source = local")
        if self.data.source == "photos" and not self.data.photos.path:
            raise ParamsError("data.photos.path is empty: set it to a folder of photos when data.source = photos")


# ----------------------------------------------------------------------------------------------- validation
def _describe(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None:
        return f"in {'(' if m.get('lo_open') else '['}{lo}, {hi}]"
    if m.get("pattern"):
        return f"a string matching {m['pattern']}"
    return f"a {_type_name(f.type)}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, f: dataclasses.Field, tp: type, value: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if typing.get_origin(tp) is tuple:
        return _coerce_names(key, f, value)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ParamsError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}, {_describe(f)}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(f"{key} = {value!r} must be finite ({_describe(f)})")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ParamsError(f"{key} = {value!r} is not allowed: expected {_describe(f)}")
    lo, hi = m.get("lo"), m.get("hi")
    if tp in (int, float) and lo is not None:
        if value < lo or (m.get("lo_open") and value == lo) or (hi is not None and value > hi):
            raise ParamsError(f"{key} = {value!r} is out of range: allowed {_describe(f)}")
    if tp is str and m.get("pattern") and not re.match(m["pattern"], value):
        raise ParamsError(f"{key} = {value!r} is not allowed: expected {_describe(f)}")
    return value


def _coerce_names(key: str, f: dataclasses.Field, value: Any) -> tuple[str, ...]:
    """A list of names (``train.losses``): non-empty, no repeats, each one of the field's ``choices``."""
    allowed = ", ".join(f.metadata["choices"])
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ParamsError(f"{key} = {value!r} has the wrong type: expected a list of names, each one of {allowed}")
    if not value:
        raise ParamsError(f"{key} is empty: list at least one of {allowed}")
    unknown = [v for v in value if v not in f.metadata["choices"]]
    if unknown:
        raise ParamsError(f"{key} = {list(value)!r}: {', '.join(map(repr, unknown))} not allowed: each one of {allowed}")
    repeated = sorted({v for v in value if list(value).count(v) > 1})
    if repeated:
        raise ParamsError(f"{key} = {list(value)!r} lists {', '.join(map(repr, repeated))} more than once")
    return tuple(value)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            name = f"{prefix}.{key}" if prefix else str(key)
            raise ParamsError(f"unknown key {name} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(key, fields[name], hints[name], value)
    return cls(**kwargs)


def parse_params(raw: Any) -> Params:
    """Validate a parsed ``params.yaml`` mapping into :class:`Params`."""
    params = _build(Params, raw, "")
    params.check()
    return params


def load_params(path: str | Path = DEFAULT_PATH) -> Params:
    """Read and validate ``params.yaml``; raises :class:`ParamsError` (one line) on any bad value."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_params(raw)


def load_section(name: str, path: str | Path = DEFAULT_PATH) -> Any:
    """Validate the whole file, return one section's dataclass."""
    return getattr(load_params(path), name)


def as_dict(section: Any) -> dict[str, Any]:
    """A section dataclass as a plain nested dict (for logging)."""
    return dataclasses.asdict(section)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _merge(dst: Any, src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def apply_preset(preset: str | Path, path: str | Path = DEFAULT_PATH) -> dict[str, Any]:
    """Merge the overrides in ``preset`` (a YAML file) into ``params.yaml``, keeping its comments.

    The result is validated before it is written; on error the file is left untouched.
    Returns the flattened overrides.
    """
    from ruamel.yaml import YAML

    ry = YAML()
    ry.preserve_quotes = True
    # ruamel keeps each scalar's spelling (e.g. ``1.0e-05``) so the result stays valid YAML 1.1 for PyYAML readers.
    overrides = ry.load(Path(preset).read_text(encoding="utf-8")) or {}
    path = Path(path)
    doc = ry.load(path.read_text(encoding="utf-8"))
    _merge(doc, overrides)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            ry.dump(doc, f)
        load_params(tmp)  # validate before replacing
    return flatten(yaml.safe_load(Path(preset).read_text(encoding="utf-8")) or {})
