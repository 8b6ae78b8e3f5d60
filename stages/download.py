"""Stage download: build data/raw (images + train.xml/test.xml in dlib XML) from data.source.

Writes data/raw/, metrics/download.json (counts, skipped items by reason, sha256 for ibug300w),
reports/download_contact_sheet.png (16 test faces with their landmarks) and metrics/realism.json (dlib's
68-point predictor on the test faces when the `peers` extra is installed, else {"skipped": reason}; photos the
teacher labelled are left out of it); its speed and, for data.source = photos, the teacher's cache hits and dlib
calls go to timings/download.json (untracked) and the MLflow run. data/raw/teacher.json: facemarks.data.teacher.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from facemarks.data import sources, synthetic, teacher

from facemarks.evaluation import peers
from facemarks.core.atomic import atomic_write_json
from facemarks.core.io import read_dlib_xml
from facemarks.core.params import load_params
from facemarks.core.runner import run
from facemarks.core.timings import split_timings, write_timings
from facemarks.core.tracking import numeric_leaves, start_run

RAW = Path("data/raw")
REALISM_TIMINGS = ("dlib_ms_per_face",)  # wall clock: timings/download.json and MLflow, not metrics/realism.json


def main() -> None:
    params = load_params()
    fetched = sources.fetch(params.data, params.base.seed, RAW)
    # photos: the teacher's cache hits and dlib calls differ between a first run and a rerun: run facts, not metrics
    summary, run_facts = split_timings(fetched, ("run",))
    atomic_write_json("metrics/download.json", summary)
    test_records = read_dlib_xml(RAW / "test.xml")
    synthetic.contact_sheet(test_records, RAW, Path("reports/download_contact_sheet.png"), n=16)
    taught = teacher.teacher_files(RAW)  # photos labelled by dlib itself: scoring dlib on them would say nothing
    test_records = [r for r in test_records if r.file not in taught]
    if peers.available() and test_records:
        realism = peers.realism(test_records, RAW, max_faces=300)
    else:
        realism = {"skipped": peers.unavailable_reason() or "no test face that the teacher did not label"}
        print(f"download: realism check skipped ({realism['skipped']})")
    quality, timing = split_timings(realism, REALISM_TIMINGS)
    atomic_write_json("metrics/realism.json", quality)
    write_timings("download", {**timing, **run_facts.get("run", {})}, merge=False)

    import mlflow

    run_params = {"base": dataclasses.asdict(params.base), "data": dataclasses.asdict(params.data)}
    with start_run("download", run_name="download", params=run_params):
        mlflow.log_metrics(numeric_leaves(summary))
        mlflow.log_metrics(numeric_leaves(realism, "realism"))
        mlflow.log_metrics(numeric_leaves(run_facts))
    print(f"download ({summary['source']}): train {summary['n_train_images']} images / {summary['n_train_faces']} "
          f"faces, test {summary['n_test_images']} / {summary['n_test_faces']}, skipped {summary['n_skipped']}")


if __name__ == "__main__":
    run(main)
