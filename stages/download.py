"""Stage download: build data/raw (images + train.xml/test.xml in dlib XML) from data.source.

Writes data/raw/, metrics/download.json (counts, skipped items by reason, sha256 for ibug300w),
reports/download_contact_sheet.png (16 test faces with their landmarks) and metrics/realism.json (dlib's
68-point predictor on the test faces when the `peers` extra is installed, else {"skipped": reason}); its speed
goes to timings/download.json (untracked) and the MLflow run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from facemarks import peers, sources, synthetic
from facemarks.atomic import atomic_write_json
from facemarks.io import read_dlib_xml
from facemarks.params import load_params
from facemarks.runner import run
from facemarks.timings import split_timings, write_timings

RAW = Path("data/raw")
REALISM_TIMINGS = ("dlib_ms_per_face",)  # wall clock: timings/download.json and MLflow, not metrics/realism.json


def main() -> None:
    params = load_params()
    summary = sources.fetch(params.data, params.base.seed, RAW)
    atomic_write_json("metrics/download.json", summary)
    test_records = read_dlib_xml(RAW / "test.xml")
    synthetic.contact_sheet(test_records, RAW, Path("reports/download_contact_sheet.png"), n=16)
    if peers.available():
        realism = peers.realism(test_records, RAW, max_faces=300)
    else:
        realism = {"skipped": peers.unavailable_reason()}
        print(f"download: realism check skipped ({realism['skipped']})")
    quality, timing = split_timings(realism, REALISM_TIMINGS)
    atomic_write_json("metrics/realism.json", quality)
    write_timings("download", timing, merge=False)

    from facemarks.tracking import numeric_leaves, start_run
    import mlflow

    run_params = {"base": dataclasses.asdict(params.base), "data": dataclasses.asdict(params.data)}
    with start_run("download", run_name="download", params=run_params):
        mlflow.log_metrics(numeric_leaves(summary))
        mlflow.log_metrics(numeric_leaves(realism, "realism"))
    print(f"download ({summary['source']}): train {summary['n_train_images']} images / {summary['n_train_faces']} "
          f"faces, test {summary['n_test_images']} / {summary['n_test_faces']}, skipped {summary['n_skipped']}")


if __name__ == "__main__":
    run(main)
