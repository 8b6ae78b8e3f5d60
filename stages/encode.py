"""Stage encode: keypoints -> Gaussian heatmap targets, plus the codec round-trip table.

Reads data/augmented/{train,val,test}/; writes data/heatmaps/{split}.npy (N, 68, S/4, S/4) in encode.dtype,
data/heatmaps/{split}_weights.npy (N, 68) float32 and data/heatmaps/meta.json (the folder appears whole), and
metrics/roundtrip.json (uniform random points and the test split's visible points, float32 and as stored);
logs the table to an MLflow run named "encode".
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from facemarks.heatmaps import codec
from facemarks.core.atomic import atomic_write_json
from facemarks.core.io import DataError
from facemarks.training.model import STRIDE
from facemarks.core.params import load_params
from facemarks.core.runner import run
from facemarks.core.store import read_split
from facemarks.core.tracking import start_run

SPLITS = ("train", "val", "test")
OUT = Path("data/heatmaps")
ROUNDTRIP = Path("metrics/roundtrip.json")


def main() -> None:
    params = load_params()
    enc = params.encode
    splits = {name: read_split(Path("data/augmented") / name) for name in SPLITS}
    size = int(splits["train"].meta["size"])
    if size % STRIDE:
        raise DataError(f"data/augmented/train/meta.json: size {size} is not a multiple of the model stride {STRIDE}")
    hm = codec.HeatmapCodec(size, size // STRIDE, enc.sigma)
    counts = codec.write_heatmaps(splits, hm, enc.dtype, OUT)

    dtypes = tuple(dict.fromkeys(("float32", enc.dtype)))
    rng = np.random.default_rng(params.base.seed)
    uniform = codec.uniform_points(rng, enc.roundtrip_points, size, k=1)
    test = splits["test"]
    table = {
        "stored_dtype": enc.dtype,
        "decoder": enc.decoder,
        "uniform": codec.roundtrip_table(uniform, np.ones(uniform.shape[:2], bool), hm, dtypes),
        "dataset": codec.roundtrip_table(np.asarray(test.points), np.asarray(test.visible), hm, dtypes),
    }
    atomic_write_json(ROUNDTRIP, table)

    import mlflow

    run_params = {"encode": dataclasses.asdict(enc), "base": dataclasses.asdict(params.base)}
    with start_run("encode", run_name="encode", params=run_params):
        mlflow.log_metrics(codec.flatten_roundtrip(table, prefix="roundtrip"))
        mlflow.log_artifact(str(ROUNDTRIP))
    best = table["uniform"]["dtypes"][enc.dtype][enc.decoder]["input_px"]
    print(f"encode: {sum(c['n'] for c in counts.values())} faces -> {OUT}/ ({hm.heatmap_size}x{hm.heatmap_size}, "
          f"sigma {enc.sigma}, {enc.dtype}); round trip {enc.decoder} as stored: mean {best['mean']:.2e} px, "
          f"max {best['max']:.2e} px (input px)")


if __name__ == "__main__":
    run(main)
