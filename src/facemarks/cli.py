"""``facemarks`` console script: ``predict``, ``compare``, ``preset``, ``ui``.

    facemarks predict IMAGE... [--model PATH] [--loss {mse,bce,awing}] [--detector {auto,hog,hog-rotate,cnn,cascade,dlib}]
                               [--box x,y,w,h]
                               [--backend {auto,onnx-int8,onnx,torch}] [--out DIR] [--no-overlay] [--astronaut]
    facemarks compare [--experiment NAME] [--study NAME]
    facemarks preset NAME [--params params.yaml]
    facemarks ui [--launch]
    facemarks summary [--check]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from facemarks.evaluation import aggregate
from facemarks.core.atomic import atomic_path, atomic_write_json
from facemarks.serving.detect import DETECTORS, describe, resolve
from facemarks.core.io import DataError, read_image
from facemarks.core.params import LOSS_NAMES, Params, ParamsError, apply_preset, load_params
from facemarks.serving.predict import ModelChoice, best_decoder, choose_model, face_to_json, load_predictor, predict_image
from facemarks.reporting.summary import refresh
from facemarks.serving.registry import load_registered_model
from facemarks.core.tracking import tracking_uri

COMPARE_METRICS = ("test_nme", "test_nme_ip", "test_auc", "test_fr", "test_roundtrip_px", "best_val_nme",
                   "final_val_loss", "test_ms_per_face_b1")


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected x,y,w,h with w, h > 0 (pixels)")
    return values  # type: ignore[return-value]


#: Options whose value is one number or a comma-separated list of numbers: a value starting with "-" (a negative
#: coordinate, ``--box -3,50,200,200``) is joined to its option (``--box=-3,50,200,200``) before argparse sees it,
#: which would otherwise take it for an option and stop with "expected one argument" (:func:`join_numeric_values`).
NUMERIC_OPTIONS = ("--box", "--size", "--port")
_NUMBERS = re.compile(r"-[0-9.][0-9.eE+-]*(,[+-]?[0-9.][0-9.eE+-]*)*")


def join_numeric_values(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``OPTION VALUE`` of :data:`NUMERIC_OPTIONS` whose VALUE is negative numbers written as
    ``OPTION=VALUE``; everything else unchanged."""
    out, args, i = [], list(argv), 0
    while i < len(args):
        if args[i] in NUMERIC_OPTIONS and i + 1 < len(args) and _NUMBERS.fullmatch(args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def _defaults(params_path: str) -> dict[str, Any]:
    """Model input size, crop margin, sigma and decoder from ``params.yaml`` when present, else built-in defaults."""
    p = load_params(params_path) if Path(params_path).is_file() else Params()
    return {"size": p.augment.size, "margin": p.augment.margin, "sigma": p.encode.sigma, "decoder": p.encode.decoder,
            "flip": p.evaluate.flip_test}


def write_overlay(image: Any, faces: list[dict[str, Any]], title: str, path: Path) -> None:
    """The image with each face's box and 68 points (colour = confidence), written atomically as PNG to ``path``.

    matplotlib is imported here, on the overlay path only (not through :mod:`facemarks.reporting.plots`, which loads it at
    import): ``facemarks predict --no-overlay`` runs without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / image.shape[1]))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    for face in faces:
        left, top, w, h = face["box"]
        ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), w, h, fill=False, color="yellow", lw=1))
        ax.scatter(*face["points"].T, c=face["confidence"], cmap="autumn", s=8, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every face of each image; JSON (+ overlay PNG unless ``--no-overlay``) per image in ``--out``.
    1 when an image has no face. Imports nothing of MLflow, DVC or the training loop (matplotlib only for overlays)."""
    if not args.images and not args.astronaut:
        print("facemarks predict: give at least one IMAGE or --astronaut", file=sys.stderr)
        return 2
    registered = None
    if args.model and args.model.startswith("models:/"):  # the Model Registry: MLflow is imported on this path only
        registered = load_registered_model(args.model)
    try:
        choice = (ModelChoice(Path(args.model), registered.loss, f"Model Registry version {registered.version}")
                  if registered else choose_model(args.loss, args.model))
    except ValueError as exc:
        print(f"facemarks predict: {exc}", file=sys.stderr)
        return 2
    model_path, loss = choice.path, choice.loss
    if registered is None and not model_path.is_file():
        print(f"facemarks predict: model file {model_path} not found (train first: dvc repro, or pass --model)",
              file=sys.stderr)
        return 1
    detector = resolve(args.detector) if args.box is None else "given"
    print(f"model: {model_path} ({loss}; {choice.why}); faces: {'--box' if args.box else describe(args.detector)}")
    cfg = _defaults(args.params)
    if registered is not None:  # how the registered model was trained, not this folder's params.yaml
        cfg.update(size=registered.input_size, sigma=registered.sigma)
    size = args.size or cfg["size"]
    decoder = args.decoder or (registered.decoder if registered else best_decoder(loss, cfg["decoder"]))
    try:
        if registered is not None:
            model, backend, why = registered.model, "torch", "a registered PyTorch model"
        else:
            model, backend, why = load_predictor(choice, args.backend, decoder=decoder)
    except ValueError as exc:
        print(f"facemarks predict: {exc}", file=sys.stderr)
        return 2
    if backend in ("onnx", "onnx-int8"):  # the exported graph fixes the input size
        if args.size and args.size != model.input_size:
            print(f"facemarks predict: --size {args.size}, but {model.path} takes {model.input_size} px",
                  file=sys.stderr)
            return 2
        size = model.input_size
    print(f"backend: {backend} ({why})")
    sources: list[tuple[str, Any]] = [(p, None) for p in args.images]
    if args.astronaut:
        from skimage.data import astronaut

        sources.append(("astronaut", astronaut()))
    status, out = 0, Path(args.out)
    for name, image in sources:
        image = read_image(name) if image is None else image
        faces = predict_image(model, image, loss, args.box, size=size, margin=cfg["margin"], sigma=cfg["sigma"],
                              decoder=decoder, detector=args.detector, flip=cfg["flip"])
        stem = Path(name).stem
        if not faces:
            print(f"facemarks predict: {name}: no face found by {detector} (try --box x,y,w,h)", file=sys.stderr)
            status = 1
            continue
        atomic_write_json(out / f"{stem}.json", {"image": str(name), "model": str(model_path), "loss": loss,
                                                  "model_choice": choice.why, "backend": backend, "decoder": decoder,
                                                  "flip_test": cfg["flip"],
                                                  "detector": detector, "faces": [face_to_json(f) for f in faces]})
        found = ", ".join(f"{f['detector']}" + (f"@{f['rotation']:g}" if f["rotation"] else "")
                          + ("" if f["score"] is None else f" {f['score']:.2f}")
                          + f" conf {f['landmark_confidence']:.2f}" for f in faces)
        print(f"{name}: {len(faces)} face(s) [{found}] -> {out / stem}.json")
        if not args.no_overlay:
            write_overlay(image, faces, f"{stem}: {len(faces)} face(s), {loss}", out / f"{stem}.png")
            print(f"{name}: overlay -> {out / stem}.png")
    return status


def compare_table(experiment: str, study: str | None = None) -> str:
    """The MSE vs BCE table of the latest train run per loss in ``experiment`` (MLflow store of
    :func:`facemarks.core.tracking.tracking_uri`; only runs tagged ``study = <study>`` when given), as aligned text."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    query = "tags.`dvc.stage` LIKE 'train%'" + (f" and tags.study = '{study}'" if study else "")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query,
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        where = f"MLflow experiment {experiment!r}" + (f", study {study!r}," if study else "")
        raise RuntimeError(f"no train runs in {where} at {tracking_uri()}")
    latest = runs.drop_duplicates("tags.loss")
    header = f"{'metric':22s}" + "".join(f"{loss:>14s}" for loss in latest["tags.loss"])
    lines = [header, "-" * len(header)]
    for metric in COMPARE_METRICS:
        col = f"metrics.{metric}"
        if col in latest:
            lines.append(f"{metric:22s}" + "".join(f"{v:14.4f}" for v in latest[col].astype(float)))
    lines.append(f"{'run_id':22s}" + "".join(f"{rid[:12]:>14s}" for rid in latest["run_id"]))
    if "metrics.test_nme" in latest and latest["metrics.test_nme"].notna().all() and len(latest) > 1:
        best = latest.loc[latest["metrics.test_nme"].astype(float).idxmin(), "tags.loss"]
        lines.append(f"lower test_nme in these two runs: {best} (one seed each, no interval: see the seeds below)")
    return "\n".join(lines)


def seeds_table(experiment: str, study: str | None = None) -> str:
    """The seed aggregate (:mod:`facemarks.evaluation.aggregate`): per budget and loss, test NME mean ± sd over training seeds,
    seeds won, and the paired BCE − MSE difference over seeds with its interval."""
    pairs, counts = aggregate.pair_runs(aggregate.search_train_runs(experiment, study))
    return aggregate.seeds_text(aggregate.summarise(pairs), counts)


def cmd_compare(args: argparse.Namespace) -> int:
    experiment = args.experiment or _experiment(args.params)
    print(compare_table(experiment, args.study))
    print("\nAcross training seeds (MSE and BCE runs paired by the evaluate run that scored both):\n")
    print(seeds_table(experiment, args.study))
    return 0


def _experiment(params_path: str) -> str:
    return load_params(params_path).base.experiment if Path(params_path).is_file() else "facemarks"


def cmd_preset(args: argparse.Namespace) -> int:
    preset = Path(args.name) if args.name.endswith((".yaml", ".yml")) else Path("presets") / f"{args.name}.yaml"
    if not preset.is_file():
        raise FileNotFoundError(f"preset {preset} not found")
    changed = apply_preset(preset, args.params)
    for key, value in changed.items():
        print(f"{key} = {value}")
    print(f"applied {preset} to {args.params}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    cmd = ["mlflow", "ui", "--backend-store-uri", tracking_uri(), "--host", "127.0.0.1", "--port", str(args.port)]
    print(" ".join(cmd))
    if args.launch:
        return subprocess.call(cmd)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Write the results-at-a-glance table from metrics/eval.json into reports/summary.md and README.md
    (:func:`facemarks.reporting.summary.refresh`); ``--check``: write nothing, 1 when either file is stale."""
    stale = refresh(args.root, check=args.check, params=args.params)
    if args.check:
        for path in stale:
            print(f"facemarks summary: {path} is stale (run: facemarks summary)", file=sys.stderr)
        return 1 if stale else 0
    print(f"facemarks summary: wrote {', '.join(stale)}" if stale else "facemarks summary: up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facemarks", description="68-point facial keypoints by heatmaps")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", parents=[common], help="predict 68 points on images (JSON + overlay PNG)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--model", help="model.pt, or a registered model such as models:/facemarks@champion "
                   "(default: models/<loss>/model.pt)")
    p.add_argument("--loss", choices=LOSS_NAMES,
                   help="loss the model was trained with (default: the winner in metrics/eval.json, else mse)")
    p.add_argument("--detector", default="auto", choices=DETECTORS,
                   help="face detector (default auto: dlib's HOG detector, then its CNN detector and HOG on copies "
                   "turned by ±30° when HOG finds no sure face; scikit-image's LBP cascade without dlib; dlib = hog)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnx-int8", "onnx", "torch"),
                   help="auto (default): onnxruntime with exports/<loss>/model.int8.onnx when it was exported from "
                   "the chosen model.pt and passed its accuracy guard, else exports/<loss>/model.onnx when it was "
                   "exported from it, else torch")
    p.add_argument("--box", type=_box, help="face box x,y,w,h (px) instead of a detector")
    p.add_argument("--no-overlay", action="store_true", help="write only the JSON, no overlay PNG")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--size", type=int, help="model input size (default: augment.size in params.yaml)")
    p.add_argument("--decoder", help="heatmap decoder (default: best in metrics/eval.json, else encode.decoder)")
    p.add_argument("--astronaut", action="store_true", help="also run on scikit-image's astronaut photo")
    p.set_defaults(func=cmd_predict)
    c = sub.add_parser("compare", parents=[common], help="print the MSE vs BCE table from the MLflow store")
    c.add_argument("--experiment", help="MLflow experiment (default: base.experiment)")
    c.add_argument("--study", help="only runs tagged study=NAME (base.study)")
    c.set_defaults(func=cmd_compare)
    s = sub.add_parser("preset", parents=[common], help="merge presets/NAME.yaml into params.yaml")
    s.add_argument("name")
    s.set_defaults(func=cmd_preset)
    u = sub.add_parser("ui", parents=[common], help="print (or --launch) the loopback mlflow ui command")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--launch", action="store_true")
    u.set_defaults(func=cmd_ui)
    m = sub.add_parser("summary", parents=[common], help="write the results table of metrics/eval.json into "
                       "reports/summary.md and README.md")
    m.add_argument("--check", action="store_true", help="write nothing; exit 1 when either file is stale")
    m.add_argument("--root", default=".", help="repository root (default: the current folder)")
    m.set_defaults(func=cmd_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; expected failures print one line and return non-zero."""
    args = build_parser().parse_args(join_numeric_values(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args))
    except ParamsError as exc:
        print(f"facemarks: bad parameter: {exc}", file=sys.stderr)
        return 2
    except (DataError, RuntimeError, FileNotFoundError) as exc:
        print(f"facemarks: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
