"""Stage export: models/<loss>/model.pt → exports/<loss>/model.onnx for each loss of `train.losses` (ONNX, dynamic
batch, heatmaps out), checked against torch on data/augmented/test (metrics/export.json; the stage fails when parity
is missed) and logged to each train@<loss> MLflow run with the onnx flavour, beside the PyTorch model.

With `export.int8` (default), also exports/<loss>/model.int8.onnx: static int8 calibrated on a seeded sample of
data/augmented/train crops, its NME checked against the fp32 file on the test split and on the real photos of
`evaluate.photos` (the bundled portraits when empty; dlib needed, else the test split only); the verdict goes into
the file's metadata (what `facemarks predict` reads) and metrics/export.json (`<loss>.int8`); a missed tolerance does
not fail the stage, predict then keeps fp32."""
from __future__ import annotations

import numpy as np

from facemarks.evaluation import peers, real_photos

from facemarks.serving import export
from facemarks.core.atomic import atomic_write_json
from facemarks.evaluation.testset import train_run_id
from facemarks.training.model import load_model
from facemarks.core.params import load_params
from facemarks.core.runner import run
from facemarks.serving.runtime import OnnxHeatmaps
from facemarks.core.store import read_split
from facemarks.core.tracking import start_run


def photo_items(params) -> tuple[list | None, str]:
    """``(image, box, reference points)`` of every face of ``evaluate.photos`` (:func:`facemarks.evaluation.real_photos.photo_set`)
    for the int8 guard, and a one-line description; None when dlib is not there to give boxes and references."""
    ev = params.evaluate
    if (why := peers.notice(ev.peers)) is not None:
        return None, f"no real photos ({why})"
    photos = real_photos.photo_set(ev.photos, ev.photos_glob, cache=real_photos.PHOTO_CACHE)
    items = [(photos.images[f.file], f.box, f.points) for f in photos.faces]
    return items or None, f"{len(items)} real-photo faces of {ev.photos or 'the bundled portraits'}"


def main() -> None:
    params = load_params()
    test = read_split("data/augmented/test")
    images, size = np.asarray(test.images), int(test.meta["size"])
    report, paths = {"opset": export.OPSET}, {}
    losses = params.train.losses
    cfg = params.export
    if cfg.int8:
        train_images = read_split("data/augmented/train").images  # (N, S, S) uint8, memory-mapped
        photos, photo_desc = photo_items(params)
        print(f"export: int8 guard on the test split and {photo_desc}")
    for loss in losses:
        source = f"models/{loss}/model.pt"
        model = load_model(source)
        paths[loss] = export.export_onnx(model, loss, f"exports/{loss}/model.onnx", size, source=source)
        report[loss] = export.parity(model, loss, OnnxHeatmaps(paths[loss]), images, params.encode.sigma)
        export.check_parity(report[loss], str(paths[loss]))
        r = report[loss]
        print(f"export: {paths[loss]}: max |heatmap diff| {r['max_abs_heatmap_diff']:.2g}, max point diff "
              f"{r['max_point_diff_px_any']:.2g} px over {r['n_points_compared']} of {r['n_points']} peaked maps")
        int8_path = paths[loss].with_name(export.INT8_FILE)
        if not cfg.int8:
            int8_path.unlink(missing_ok=True)  # no stale int8 twin for predict to find
            continue
        q = report[loss]["int8"] = export.quantize_and_check(
            paths[loss], train_images, test, sigma=params.encode.sigma, margin=params.augment.margin,
            fmt=cfg.format, method=cfg.calibration, calibration_faces=cfg.calibration_faces, seed=cfg.seed,
            tolerance=cfg.tolerance_nme, weights=cfg.weights, photos=photos)
        deltas = ", ".join(f"{name} {c['max_nme_delta']:+.3f}" for name, c in q["checks"].items())
        print(f"export: {int8_path}: int8 ({cfg.format}, {q['weights']} weights, {cfg.calibration}, "
              f"{q['calibration_faces']} crops) NME "
              f"points lost vs fp32: {deltas} (tolerance {cfg.tolerance_nme:g}): "
              + ("passed" if q["ok"] else f"FAILED; predict runs {q['used_by_predict']}"))
    atomic_write_json("metrics/export.json", report)

    import mlflow

    for loss in losses:  # into the train run; a fresh `<loss>-export` run only when that run is gone
        with start_run("export", f"{loss}-export", run_id=train_run_id(loss), tags={"loss": loss}):
            export.log_onnx_mlflow(paths[loss], size)
            mlflow.log_metrics({"onnx_max_abs_heatmap_diff": report[loss]["max_abs_heatmap_diff"],
                                "onnx_max_point_diff_px": report[loss]["max_point_diff_px_any"]})
            if "int8" in report[loss]:
                q = report[loss]["int8"]
                mlflow.log_metrics({"int8_max_nme_delta": q["max_nme_delta"], "int8_ok": float(q["ok"]),
                                    **{f"int8_{name}_nme_delta": c["max_nme_delta"]
                                       for name, c in q["checks"].items()}})


if __name__ == "__main__":
    run(main)
