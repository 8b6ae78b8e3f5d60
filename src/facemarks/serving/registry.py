"""The MLflow Model Registry: the evaluated winner as ``models:/facemarks@champion``, and loading it back.

``evaluate`` registers the winner (:func:`register_winner`, through :func:`register_champion`); ``facemarks predict
--model models:/facemarks@champion`` loads it (:func:`load_registered_model`). MLflow is imported on use: importing
this module costs nothing of it. Store and run helpers: :mod:`facemarks.core.tracking`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from facemarks.core import tracking
from facemarks.training.model import load_model
from facemarks.serving.predict import fallback_loss
from facemarks.core.tracking import quiet_mlflow, tracking_uri

REGISTERED_MODEL = "facemarks"  # Model Registry name of the evaluated winner ...
CHAMPION_ALIAS = "champion"  # ... and its alias: models:/facemarks@champion


def register_champion(run_id: str, tags: dict[str, str] | None = None, name: str = REGISTERED_MODEL,
                      alias: str | None = CHAMPION_ALIAS, model_name: str = "model") -> Any:
    """Register the PyTorch model (``model_name``, as :func:`facemarks.training.mlflow_log.log_mlflow` names it) logged by train run
    ``run_id`` as a new version of ``name`` and point ``alias`` at it (None: leave the aliases alone).

    ``tags`` go on the model version (the evaluate stage puts the loss, the best decoder and the test NME there).
    Returns the ``ModelVersion``.
    """
    quiet_mlflow()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient(tracking_uri())
    run = client.get_run(run_id)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    logged = [m for m in logged if m.name == model_name]  # not the ONNX export the run may also carry
    if not logged:
        raise RuntimeError(f"MLflow run {run_id} has no logged model {model_name!r} to register")
    latest = max(logged, key=lambda m: m.creation_timestamp)
    version = mlflow.register_model(f"models:/{latest.model_id}", name, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


@dataclass(frozen=True)
class RegisteredModel:
    """What ``facemarks predict`` needs from the Model Registry: the network and how it was trained."""

    model: Any  # facemarks.training.model.HeatmapNet in eval mode
    loss: str  # mse | bce
    input_size: int  # crop side (px)
    sigma: float  # heatmap Gaussian sigma (map px)
    decoder: str  # the best decoder on the test set (model version tag), else the training one
    uri: str  # models:/<name>@<alias> or models:/<name>/<version>
    version: str


def load_registered_model(uri: str, device: str = "cpu") -> RegisteredModel:
    """Load ``models:/facemarks@champion`` (any ``models:/`` URI of a model logged by the train stage).

    The weights come from the state dict stored inside the logged model (``extra_files/model.pt``, loaded with
    ``weights_only=True``), the loss / input size / sigma from its metadata, the decoder from the version's tags.
    """
    quiet_mlflow()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    try:
        info = mlflow.models.get_model_info(uri)
    except mlflow.exceptions.MlflowException as exc:  # no such model or alias: one line, not a traceback
        raise RuntimeError(f"{uri} not found at {tracking_uri()}: {exc.message}") from exc
    meta = (info.metadata or {}).get("facemarks")
    if not meta:
        raise RuntimeError(f"{uri} was not logged by the facemarks train stage (no facemarks metadata)")
    client = mlflow.MlflowClient(tracking_uri())
    name, _, ref = uri[len("models:/"):].partition("@")
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number) if number.isdigit() else None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/extra_files/model.pt",
                                                   dst_path=tmp)
        model = load_model(path, device)
    tags = version.tags if version is not None else {}
    return RegisteredModel(model=model, loss=meta["loss"], input_size=int(meta["input_size"]),
                           sigma=float(meta["sigma"]), decoder=tags.get("decoder", meta["decoder"]), uri=uri,
                           version=str(version.version) if version is not None else "")


def register_winner(report: dict) -> None:
    """Register the evaluated winner (when the comparison names none: MSE, or the first loss of a list without MSE,
    :func:`facemarks.serving.predict.fallback_loss`) as a new version of ``facemarks``: the model
    that the train run tagged with ``models/<loss>/model.pt``'s md5 logged. ``dvc repro`` moves the alias
    ``champion`` to it; a DVC experiment (``dvc exp run``, the queue) only registers its version, tagged with its
    name, and leaves ``champion`` alone. Tags the evaluate run with the md5 of ``metrics/eval.json`` (the plot stage
    logs the figures to that run). Without that train run in the store (another store, a deleted run) it says so in
    one line and registers nothing."""
    loss = report.get("winner") or fallback_loss(report.get("losses") or ("mse",))
    experiment = os.environ.get("DVC_EXP_NAME", "")
    eval_run = tracking.opened_run_id("evaluate")
    client_tags = {tracking.EVAL_HASH_TAG: tracking.file_md5("metrics/eval.json")}
    train_run = tracking.find_run({tracking.MODEL_HASH_TAG: tracking.file_md5(f"models/{loss}/model.pt")})
    if train_run is None:
        print(f"evaluate: not registered: no MLflow train run logged models/{loss}/model.pt "
              f"in {tracking.tracking_uri()}")
    else:
        version = register_champion(train_run, tags={
            "loss": loss, "decoder": report[loss]["best_decoder"], "test_nme": f"{report[loss]['nme_io']:.4f}",
            "winner": str(report.get("winner")), tracking.PIPELINE_TAG: tracking.pipeline_id(),
            **({"dvc.exp_name": experiment} if experiment else {})},
            alias=None if experiment else CHAMPION_ALIAS)
        client_tags["registered"] = f"{version.name}/{version.version}"
        where = f"experiment {experiment}: champion unchanged" if experiment else f"@{CHAMPION_ALIAS}"
        print(f"evaluate: registered {loss} as models:/{version.name}/{version.version} ({where}; run {train_run})")
    if eval_run is not None:
        import mlflow

        client = mlflow.MlflowClient(tracking.tracking_uri())
        for key, value in client_tags.items():
            client.set_tag(eval_run, key, value)


__all__ = ["REGISTERED_MODEL", "CHAMPION_ALIAS", "register_champion", "RegisteredModel", "load_registered_model",
           "register_winner"]
