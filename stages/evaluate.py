"""Stage evaluate: score models/<loss> for each loss of `train.losses` on data/augmented/test (every decoder, original
px) against the mean shape and dlib, every pair of losses compared on the same faces; write metrics/eval.json,
metrics/ced.csv, data/eval/predictions.npz and timings/evaluate.json (ms per face, untracked); log test_* metrics to
each train run. Face detectors on the test images and the astronaut: metrics/detect.json (quality),
timings/detect.json (ms per image)."""
from __future__ import annotations

import numpy as np

from facemarks.evaluation import detect_eval, peers, real_photos, testset

from facemarks.serving import detect, registry
from facemarks.core.atomic import atomic_dir, atomic_write_json, atomic_write_text, save_npz_stable
from facemarks.heatmaps.codec import DECODERS
from facemarks.core.device import resolve_device
from facemarks.serving.inference import time_per_face
from facemarks.core.io import photo_files, read_dlib_xml
from facemarks.evaluation.metrics import ced_csv
from facemarks.training.model import load_model
from facemarks.core.params import load_params
from facemarks.serving.predict import fallback_loss
from facemarks.core.runner import run
from facemarks.serving.runtime import OnnxHeatmaps
from facemarks.evaluation.stats import loss_comparison
from facemarks.core.store import read_split
from facemarks.data.teacher import check_no_overlap, teacher_mask, training_photo_hashes
from facemarks.core.timings import split_timings, write_timings

# wall clock, per model row: timings/evaluate.json (untracked) and MLflow, not metrics/eval.json
EVAL_TIMINGS = ("ms_per_face_b1", "ms_per_face_batched", "ms_per_face",
                "onnx_ms_per_face_b1", "onnx_ms_per_face_batched")


def peers_notice(wanted: bool) -> str | None:
    """None when the dlib row can run, else the one-line reason it is skipped."""
    if not wanted:
        return "evaluate.peers is false"
    return None if peers.available() else peers.unavailable_reason()


def main() -> None:
    params = load_params()
    ev, sigma, device, losses = params.evaluate, params.encode.sigma, resolve_device("auto"), params.train.losses
    # before any work: the real-photo folder exists, holds images, and none of them is a training photo
    photo_paths = photo_files(ev.photos, ev.photos_glob) if ev.photos else []
    check_no_overlap(photo_paths, training_photo_hashes("data/raw"))
    test, train = read_split("data/augmented/test"), read_split("data/augmented/train")
    report, models = {"losses": list(losses)}, {}
    arrays = {"gt": np.asarray(test.orig_points), "sigma": np.float64(sigma)}
    for loss in losses:
        models[loss] = load_model(f"models/{loss}/model.pt", device)
        report[loss], out = testset.evaluate_loss(models[loss], test, loss, sigma, ev.threshold, ev.batch_size,
                                                     ev.speed_faces, device, flip=ev.flip_test)
        arrays.update({f"{k}_{loss}": v for k, v in out.items()})
        # the same crops and decoder on onnxruntime (stage export's file), timed next to torch (timings only)
        onnx, best = OnnxHeatmaps(f"exports/{loss}/model.onnx"), report[loss]["best_decoder"]
        timed = np.asarray(test.images[:ev.speed_faces])
        report[loss].update(onnx_ms_per_face_b1=time_per_face(onnx, timed, loss, sigma, best, 1),
                            onnx_ms_per_face_batched=time_per_face(onnx, timed, loss, sigma, best, ev.batch_size))
    report["mean_shape"], arrays["nme_mean_shape"] = testset.baseline_rows(train, test, ev.threshold)
    notice = peers_notice(ev.peers)
    if notice is None:
        report["dlib68"], arrays["points_dlib68"], arrays["nme_dlib68"] = testset.dlib_row(test, "data/raw",
                                                                                              ev.threshold)
    else:
        print(f"evaluate: no dlib68 row: {notice}")
    report["roundtrip"] = testset.roundtrip_summary(test, sigma)
    # every pair of losses per test face, every decoder; headline: each loss at its best decoder (facemarks.evaluation.stats)
    report["comparison"] = loss_comparison(
        {loss: {d: arrays[f"nme_{d}_{loss}"] for d in DECODERS} for loss in losses},
        {loss: report[loss]["best_decoder"] for loss in losses}, seed=params.base.seed)
    # a loss only when it beats every other with 95 % intervals excluding 0, else None (JSON null)
    winner = report["comparison"]["winner"]
    leader = winner or min(losses, key=lambda name: report[name]["nme_io"])  # lower mean NME: shown in the figures
    report.update(winner=winner, leader=leader)
    meta_aug = test.meta.get("augment", {})
    report["astronaut"], astro = testset.astronaut(
        models[leader], leader, size=int(test.meta["size"]), margin=float(meta_aug.get("margin", 0.25)), sigma=sigma,
        decoder=report[leader]["best_decoder"], use_dlib=notice is None)
    arrays.update(astro)
    if notice is None:  # real portraits bundled with the installed packages, in dlib's box, NME from dlib's points
        report["real_photos"] = testset.real_photo_rows(models, report, size=int(test.meta["size"]),
                                                           margin=float(meta_aug.get("margin", 0.25)), sigma=sigma)

    report["photos"], photos_csv = photos_block(models, report, ev, size=int(test.meta["size"]),
                                                margin=float(meta_aug.get("margin", 0.25)), sigma=sigma,
                                                seed=params.base.seed, notice=notice, arrays=arrays)
    report["test_reference"] = test_references(test)

    # face detection quality per detector (metrics/detect.json), with the model `facemarks predict` uses by default
    chosen = report["winner"] or fallback_loss(losses)
    detection, detect_timing = testset.detection_report(
        models[chosen], chosen, read_dlib_xml("data/raw/test.xml"), "data/raw", size=int(test.meta["size"]),
        margin=float(meta_aug.get("margin", 0.25)), sigma=sigma, decoder=report[chosen]["best_decoder"],
        max_images=ev.detect_images, use_peers=notice is None)
    if ev.photos:  # every detector setting of `facemarks predict` on the real-photo folder (detect_eval)
        detection["photos"], photo_timing = detect_photos(
            ev.photos, models[chosen], chosen, size=int(test.meta["size"]), margin=float(meta_aug.get("margin", 0.25)),
            sigma=sigma, decoder=report[chosen]["best_decoder"])
        detect_timing.update({f"photos.{k}": v for k, v in photo_timing.items()})
    atomic_write_json("metrics/detect.json", detection)
    write_timings("detect", detect_timing)
    testset.log_detect_mlflow(detection, detect_timing)
    for name, row in detection["synthetic_test"].items():
        print(f"evaluate: detector {name:8s} hits {row['hit_rate']:.3f} (IoU >= {detection['hit_iou']}), FP/image "
              f"{row['fp_per_image']:.3f}, mean IoU {row['mean_iou']:.3f}; NME own / true box "
              f"{row.get('nme_own_box', float('nan')):.2f} / {row.get('nme_true_box', float('nan')):.2f} %")

    errors = {name: arrays[f"nme_{name}"] for name in (*losses, "dlib68") if f"nme_{name}" in arrays}
    with atomic_dir("data/eval") as tmp:
        save_npz_stable(tmp / "predictions.npz", {k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_text("metrics/ced.csv", ced_csv(errors, ev.threshold))
    atomic_write_text("metrics/photos.csv", photos_csv)
    quality, timing = split_timings(report, [f"{name}.{key}" for name in (*losses, "dlib68") for key in EVAL_TIMINGS])
    atomic_write_json("metrics/eval.json", quality)
    write_timings("evaluate", timing)
    testset.log_eval_mlflow(report, losses)
    registry.register_winner(quality)
    for name in (*losses, "mean_shape", "dlib68"):
        if name in report:
            r = report[name]
            print(f"evaluate: {name:10s} NME {r['nme_io']:.3f}% (io)  AUC {r['auc']:.3f}  FR {r['fr']:.3f}")
    print(f"evaluate: {report['comparison']['verdict']}; astronaut {report['astronaut']}")


def photos_block(models: dict, report: dict, ev, *, size: int, margin: float, sigma: float, seed: int,
                 notice: str | None, arrays: dict) -> tuple[dict, str]:
    """The real-photo evaluation (``evaluate.photos``; empty: the bundled portraits) of every loss at its best test
    decoder: the ``photos`` block of ``metrics/eval.json`` and the per-face CSV (``metrics/photos.csv``); the
    per-face arrays and the worst faces go into ``arrays`` (``data/eval/predictions.npz``, the plot stage's contact
    sheet). Needs dlib (the boxes, and the reference where a photo has no markup): else the block says why not."""
    if notice is not None:  # the dlib notice was printed once already
        return {"skipped": notice}, "file,face,reference,box_source\n"
    photos = real_photos.photo_set(ev.photos, ev.photos_glob, cache=real_photos.PHOTO_CACHE)
    block, csv_text, photo_arrays = real_photos.evaluate_photos(
        models, {loss: report[loss]["best_decoder"] for loss in models}, photos, size=size, margin=margin,
        sigma=sigma, flip=ev.flip_test, seed=seed)
    arrays.update(photo_arrays)
    for loss in models:
        r = block[loss]
        print(f"evaluate: photos {loss:6s} median {r['median']:.2f} %  mean {r['mean']:.2f} %  above 10 % "
              f"{r['share_above_10']:.3f} ({block['n_faces']} faces of {block['n_images']} images, "
              f"references {block['references']})")
    return block, csv_text


def detect_photos(folder: str, model, loss: str, **kw) -> tuple[dict, dict]:
    """The ``photos`` block of ``metrics/detect.json`` (:func:`facemarks.evaluation.detect_eval.photo_report`: per detector
    setting, faces found, missed against the union of the others, likely false positives) and its timings; without
    dlib's CNN model (the peers extra) a one-line ``skipped``."""
    if not detect.cnn_available():
        print("evaluate: no photos block in metrics/detect.json: dlib's CNN face detector is not installed")
        return {"skipped": "dlib's CNN face detector (peers extra) is not installed"}, {}
    return detect_eval.photo_report(folder, model, loss, **kw)


def test_references(test) -> dict[str, int]:
    """How many test faces carry which reference: ``teacher`` (dlib's points, data.source = photos: their NME is
    "from dlib's points") and ``ground_truth`` (markup or the synthetic generator's exact points)."""
    files = test.meta.get("files", [])
    taught = int(teacher_mask("data/raw", files).sum()) if len(files) == len(test.boxes) else 0
    return {"teacher": taught, "ground_truth": int(len(test.boxes)) - taught}


if __name__ == "__main__":
    run(main)
