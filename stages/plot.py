"""Stage plot: report figures and summary for the losses of `train.losses` into reports/eval/ (keypoints, heatmaps,
best/worst, per-region NME, astronaut overlay, README.md), logged to MLflow as artifacts of the `evaluate` run that
wrote metrics/eval.json (into the `plot` run itself when the store has none)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facemarks.reporting import plots
from facemarks.core.atomic import atomic_dir
from facemarks.serving.inference import make_codec, predict_crops
from facemarks.evaluation.metrics import nme, normaliser
from facemarks.training.model import load_model
from facemarks.core.params import load_params
from facemarks.core.runner import run
from facemarks.core.store import read_split
from facemarks.core.tracking import EVAL_HASH_TAG, file_md5, find_run, start_run, tracking_uri

OUT = Path("reports/eval")


def main() -> None:
    params = load_params()
    p, losses = params.plot, params.train.losses
    report = json.loads(Path("metrics/eval.json").read_text(encoding="utf-8"))
    with np.load("data/eval/predictions.npz", allow_pickle=False) as f:
        pred = dict(f)
    val, test = read_split("data/augmented/val"), read_split("data/augmented/test")
    # figures show the winner, or (no winner: the interval includes 0) the loss with the lower mean NME
    sigma, shown, n = float(pred["sigma"]), report["winner"] or report["leader"], min(p.n_examples, len(val))
    images, gt, vis = np.array(val.images[:n]), np.asarray(val.points[:n], np.float64), np.asarray(val.visible[:n])
    with atomic_dir(OUT) as tmp:
        for loss in losses:
            points, _, heat = predict_crops(load_model(Path("models") / loss / "model.pt"), images, loss, sigma,
                                            report[loss]["best_decoder"])
            err = nme(points, gt, normaliser(gt, "io"), vis)
            plots.save_figure(plots.keypoints_figure(images, gt, points, f"{loss.upper()}: validation faces", err),
                              tmp / f"keypoints_{loss}.png", p.dpi)
            if loss == shown:
                target, _ = make_codec(images.shape[-1], sigma).encode(gt[:1], vis[:1])
                fig = plots.heatmaps_figure(images[0], heat[0], target[0], plots.heatmap_indices(p.n_heatmap_points),
                                            f"{loss.upper()}: predicted vs target heatmaps")
                plots.save_figure(fig, tmp / "heatmaps.png", p.dpi)
        fig = plots.best_worst_figure(np.asarray(test.images), np.asarray(test.points), pred[f"crop_points_{shown}"],
                                      pred[f"nme_{shown}"], max(1, p.n_examples // 2),
                                      f"{shown.upper()}: best and worst test faces (inter-ocular NME)")
        plots.save_figure(fig, tmp / "best_worst.png", p.dpi)
        plots.save_figure(plots.regions_figure(report), tmp / "regions.png", p.dpi)
        plots.save_figure(astronaut(report, pred), tmp / "astronaut.png", p.dpi)
        if "photos_crops" in pred:  # the real-photo evaluation's worst faces (evaluate.photos)
            fig = plots.photos_sheet_figure(pred["photos_crops"], pred["photos_ref"], pred["photos_pred"],
                                            pred["photos_nme"], pred["photos_label"],
                                            f"{str(pred['photos_worst_loss']).upper()}: worst real-photo faces "
                                            "(green: reference, red: predicted)")
            plots.save_figure(fig, tmp / "photos_worst.png", p.dpi)
        (tmp / "README.md").write_text(plots.summary_markdown(report), encoding="utf-8")
    with start_run("plot", "plot", tags={"winner": report["winner"] or "none"}):
        active_log_artifacts(OUT)
    print(f"plot: wrote {len(list(OUT.iterdir()))} files to {OUT}/")


def astronaut(report: dict, pred: dict):
    """The astronaut overlay; a notice figure when the real-photo protocol has no reference for her face (no dlib)."""
    from skimage.data import astronaut as photo

    info = report.get("astronaut", {})
    if not info.get("found"):
        fig = plots.plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no reference for the astronaut photo (dlib not installed)", ha="center")
        return fig
    dlib = pred.get("astro_dlib")
    return plots.astronaut_figure(photo(), pred["astro_box"], pred["astro_ours"], dlib, info["loss"],
                                  info.get("nme_vs_dlib"))


def evaluate_run() -> str | None:
    """The MLflow evaluate run that wrote this ``metrics/eval.json`` (its ``facemarks.eval_md5`` tag): the figures go
    there, beside the numbers they show; None when the store has no such run."""
    return find_run({EVAL_HASH_TAG: file_md5("metrics/eval.json")})


def active_log_artifacts(folder: Path) -> None:
    """The figures go to the evaluate run (:func:`evaluate_run`), tagged ``evaluate_run`` on the active plot run;
    into the plot run itself only when the store has no such evaluate run."""
    import mlflow

    target = evaluate_run()
    if target is None:
        mlflow.log_artifacts(str(folder), artifact_path="reports/eval")
    else:
        mlflow.MlflowClient(tracking_uri()).log_artifacts(target, str(folder), artifact_path="reports/eval")
        mlflow.set_tag("evaluate_run", target)


if __name__ == "__main__":
    run(main)
