"""Stage export: models/<loss>/model.pt → exports/<loss>/model.onnx for each loss of `train.losses` (ONNX, dynamic batch, heatmaps
out), checked against torch on data/augmented/test (metrics/export.json; the stage fails when parity is missed) and
logged to each train@<loss> MLflow run with the onnx flavour, beside the PyTorch model."""
from __future__ import annotations

import numpy as np

from facemarks import export
from facemarks.atomic import atomic_write_json
from facemarks.evaluation import train_run_id
from facemarks.model import load_model
from facemarks.params import load_params
from facemarks.runner import run
from facemarks.runtime import OnnxHeatmaps
from facemarks.store import read_split


def main() -> None:
    params = load_params()
    test = read_split("data/augmented/test")
    images, size = np.asarray(test.images), int(test.meta["size"])
    report, paths = {"opset": export.OPSET}, {}
    losses = params.train.losses
    for loss in losses:
        source = f"models/{loss}/model.pt"
        model = load_model(source)
        paths[loss] = export.export_onnx(model, loss, f"exports/{loss}/model.onnx", size, source=source)
        report[loss] = export.parity(model, loss, OnnxHeatmaps(paths[loss]), images, params.encode.sigma)
        export.check_parity(report[loss], str(paths[loss]))
        r = report[loss]
        print(f"export: {paths[loss]}: max |heatmap diff| {r['max_abs_heatmap_diff']:.2g}, max point diff "
              f"{r['max_point_diff_px_any']:.2g} px over {r['n_points_compared']} of {r['n_points']} peaked maps")
    atomic_write_json("metrics/export.json", report)

    import mlflow

    from facemarks.tracking import start_run

    for loss in losses:  # into the train run; a fresh `<loss>-export` run only when that run is gone
        with start_run("export", f"{loss}-export", run_id=train_run_id(loss), tags={"loss": loss}):
            export.log_onnx_mlflow(paths[loss], size)
            mlflow.log_metrics({"onnx_max_abs_heatmap_diff": report[loss]["max_abs_heatmap_diff"],
                                "onnx_max_point_diff_px": report[loss]["max_point_diff_px_any"]})


if __name__ == "__main__":
    run(main)
