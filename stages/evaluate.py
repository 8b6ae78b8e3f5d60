"""Stage evaluate: score models/<loss> for each loss of `train.losses` on data/augmented/test (every decoder, original
px) against the mean shape and dlib, every pair of losses compared on the same faces, the real photos
(`evaluate.photos`, else the bundled portraits) and the face detectors (:func:`facemarks.evaluation.evaluate.evaluate`);
write metrics/eval.json, metrics/ced.csv, metrics/photos.csv, metrics/detect.json, data/eval/predictions.npz and
timings/evaluate.json, timings/detect.json (untracked); log to MLflow and register the winner."""
from __future__ import annotations

import numpy as np

from facemarks.core.atomic import atomic_dir, atomic_write_json, atomic_write_text, save_npz_stable
from facemarks.core.device import resolve_device
from facemarks.core.params import load_params
from facemarks.core.runner import run
from facemarks.core.timings import write_timings
from facemarks.evaluation import testset
from facemarks.evaluation.evaluate import evaluate, preflight, summary_lines
from facemarks.serving import registry


def main() -> None:
    params = load_params()
    preflight(params.evaluate)  # a bad photo folder or a training photo among them: one line, before any work
    out = evaluate(params, resolve_device("auto"))
    with atomic_dir("data/eval") as tmp:
        save_npz_stable(tmp / "predictions.npz", {k: np.asarray(v) for k, v in out.arrays.items()})
    atomic_write_text("metrics/ced.csv", out.ced)
    atomic_write_text("metrics/photos.csv", out.photos_csv)
    atomic_write_json("metrics/detect.json", out.detection)
    atomic_write_json("metrics/eval.json", out.quality)
    write_timings("detect", out.detect_timing)
    write_timings("evaluate", out.timing)
    testset.log_detect_mlflow(out.detection, out.detect_timing)
    testset.log_eval_mlflow(out.report, params.train.losses)
    registry.register_winner(out.quality)
    print("\n".join(summary_lines(out)))


if __name__ == "__main__":
    run(main)
