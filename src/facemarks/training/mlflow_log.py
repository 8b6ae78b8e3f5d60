"""The train run in MLflow: per-epoch metrics, the summary metrics, the loss-curve figure and the logged model.

:func:`mlflow_epoch_logger` is :func:`facemarks.training.train.fit`'s ``on_epoch`` callback; :func:`log_mlflow` logs a
finished :class:`facemarks.training.train.FitResult`; :func:`existing_run_id` says whether a checkpoint's run can be
continued. MLflow and matplotlib are imported on first use (``import facemarks.training.mlflow_log`` stays light).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from facemarks.core.tracking import MODEL_HASH_TAG, file_md5, tracking_uri
from facemarks.training.outputs import save_state_dict
from facemarks.training.train import FitResult


def loss_figure(history: list[dict[str, float]], loss: str):
    """Matplotlib figure: train/val loss (left) and val NME (right) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel=f"{loss} loss", title=f"{loss} loss", yscale="log")
    ax1.legend()
    ax2.plot(epochs, [r["val_nme"] for r in history], "o-", color="C2")
    ax2.set(xlabel="epoch", ylabel="val NME (%)", title="validation NME (inter-ocular)")
    fig.tight_layout()
    return fig


def mlflow_epoch_logger() -> Callable[[dict[str, float]], None]:
    """An ``on_epoch`` callback logging ``train_loss``, ``val_loss``, ``val_nme``, ``lr``, the failure checks
    ``val_collapse`` and ``val_weak_peak_share``, and ``images_per_s`` to the active run."""
    import mlflow

    keys = ("train_loss", "val_loss", "val_nme", "lr", "val_collapse", "val_weak_peak_share", "images_per_s")

    def log_row(row: dict[str, float]) -> None:
        mlflow.log_metrics({k: row[k] for k in keys if k in row and math.isfinite(row[k])}, step=int(row["epoch"]))

    return log_row


def log_mlflow(result: FitResult) -> None:
    """Log summary metrics, the loss-curve figure and the model to the active run.

    The model is logged with a ``(2, 1, S, S)`` input example (signature with a free batch axis), the state dict as
    ``extra_files/model.pt`` (byte-identical to ``models/<loss>/model.pt``, tag ``facemarks.model_md5``) and the
    ``facemarks`` metadata a loader needs (loss, input size, sigma, decoder): see
    :func:`facemarks.serving.registry.load_registered_model`."""
    import matplotlib.pyplot as plt
    import mlflow
    import mlflow.pytorch

    s = result.summary
    mlflow.log_metrics({
        "final_val_nme": s["final_val_nme"], "best_val_nme": s["best_val_nme"], "final_val_loss": s["final_val_loss"],
        "mean_shape_nme": s["mean_shape_nme"], "collapse": float(s["collapse"]), "images_per_s": s["images_per_s"],
        **({"final_weak_peak_share": s["final_weak_peak_share"]} if math.isfinite(s["final_weak_peak_share"]) else {}),
        "train_seconds": s["seconds"],
    })
    fig = loss_figure(result.history, result.loss)
    mlflow.log_figure(fig, f"loss_curves_{result.loss}.png")
    plt.close(fig)

    model = result.model.to("cpu", memory_format=torch.contiguous_format).eval()  # as saved: no training layout
    example = np.zeros((2, 1, s["input_size"], s["input_size"]), np.float32)  # batch 2: the batch axis stays free
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    meta = {"facemarks": {"loss": result.loss, "input_size": s["input_size"], "heatmap_size": s["heatmap_size"],
                          "sigma": result.config.sigma, "decoder": result.config.decoder}}
    with tempfile.TemporaryDirectory() as tmp:
        state_path = save_state_dict(model, Path(tmp) / "model.pt")
        mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=reqs,
                                 extra_files=[str(state_path)], metadata=meta)
        mlflow.set_tag(MODEL_HASH_TAG, file_md5(state_path))
    result.model.train()


def existing_run_id(run_id: str | None) -> str | None:
    """``run_id`` if the current MLflow store (:func:`facemarks.core.tracking.tracking_uri`) holds that run, else None."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException:
        return None
    return run_id
