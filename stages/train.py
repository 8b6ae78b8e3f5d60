"""Stage train@<loss>: train the ResNet18 heatmap network with one loss of `train.losses` (mse | bce | awing).

Reads data/augmented/{train,val}/ and data/heatmaps/{train,val}.npy; writes models/<loss>/model.pt,
metrics/train_<loss>.json, metrics/train_<loss>_epochs.csv, timings/train_<loss>.json (seconds, img/s; untracked)
and checkpoints/<loss>/last.pt (resumed when the params and data match). Under `torchrun --nproc_per_node=N` it trains with DDP; rank 0 logs and writes.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch.distributed as dist

from facemarks.training import train
from facemarks.training.checkpoint import load_checkpoint
from facemarks.training.data import load_data
from facemarks.training.distributed import init_distributed
from facemarks.training.mlflow_log import existing_run_id, log_mlflow, mlflow_epoch_logger
from facemarks.training.outputs import timings, write_outputs
from facemarks.core.device import resolve_device
from facemarks.training.model import LOSSES
from facemarks.core.params import load_params
from facemarks.core.runner import run
from facemarks.core.timings import write_timings
from facemarks.core.tracking import start_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", required=True, choices=LOSSES)
    args = parser.parse_args()
    loss = args.loss

    params = load_params()
    if loss not in params.train.losses:
        raise SystemExit(f"train@{loss}: {loss} is not in train.losses = {list(params.train.losses)}")
    cfg = train.TrainConfig.from_params(params.train, params.base, params.encode)
    device = resolve_device(params.train.device)
    rank, world = init_distributed(device)
    data = load_data("data/augmented", "data/heatmaps")
    checkpoint_dir = Path("checkpoints") / loss

    if rank != 0:
        train.fit(cfg, data, loss, checkpoint_dir, device)
    else:
        previous = load_checkpoint(checkpoint_dir, train.fingerprint(cfg, data, loss))
        run_params = {"loss": loss, "base": dataclasses.asdict(params.base), "train": train_params(params.train),
                      "encode": {"sigma": cfg.sigma, "decoder": cfg.decoder}, "world_size": world,
                      "device": str(device), "input_size": data.input_size}
        run_id = existing_run_id(previous["run_id"]) if previous else None
        with start_run(f"train@{loss}", run_name=loss, params=run_params, tags={"loss": loss, "seed": str(cfg.seed)},
                       run_id=run_id) as active:
            result = train.fit(cfg, data, loss, checkpoint_dir, device,
                               on_epoch=mlflow_epoch_logger(), run_id=active.info.run_id)
            log_mlflow(result)
        write_outputs(result, Path("models") / loss / "model.pt", Path("metrics") / f"train_{loss}.json",
                      Path("metrics") / f"train_{loss}_epochs.csv")
        write_timings(f"train_{loss}", timings(result), merge=False)
        s = result.summary
        print(f"train@{loss}: val NME {s['final_val_nme']:.3f}% (best {s['best_val_nme']:.3f}% at epoch "
              f"{s['best_epoch']}, mean shape {s['mean_shape_nme']:.3f}%), {s['images_per_s']:.1f} img/s, "
              f"run {s['run_id']}")
    if world > 1:
        dist.destroy_process_group()


def train_params(section) -> dict:
    """The ``train`` section as logged to the train run: without ``losses`` (which other losses train beside this one
    changes nothing in this run; runs from before the list have the same params)."""
    return {k: v for k, v in dataclasses.asdict(section).items() if k != "losses"}


if __name__ == "__main__":
    run(main)
