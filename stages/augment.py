"""Stage augment: face crops + seeded augmentation from data/raw into data/augmented/{train,val,test}/.

Writes the split folders (facemarks.core.store), metrics/augment.json (counts per split, visible fractions),
timings/augment.json (seconds, crops/s; untracked) and reports/augment_contact_sheet.png (augmented training crops;
right eye red, left eye blue).
"""
from __future__ import annotations

from pathlib import Path

from facemarks.core.atomic import atomic_write_json
from facemarks.augmentation.augment import run_augment, write_contact_sheet
from facemarks.core.params import load_params
from facemarks.core.runner import run
from facemarks.core.timings import split_timings, write_timings

# wall clock: timings/augment.json (untracked), not metrics/augment.json
AUGMENT_TIMINGS = ("seconds", "build_seconds", "images_per_s", "cpu_seconds", "images_per_cpu_s")


def main() -> None:
    params = load_params()
    out = Path("data/augmented")
    summary = run_augment(Path("data/raw"), out, params.augment, params.base.seed)
    summary["contact_sheet_samples"] = write_contact_sheet(Path("reports/augment_contact_sheet.png"), out / "train")
    quality, timing = split_timings(summary, AUGMENT_TIMINGS)
    atomic_write_json("metrics/augment.json", quality)
    write_timings("augment", timing, merge=False)
    c = summary["counts"]
    print(f"augment: train {c['train']}, val {c['val']}, test {c['test']} crops in {summary['seconds']:.1f} s "
          f"({summary['images_per_s']:.0f} crops/s, {summary['workers']} workers)")


if __name__ == "__main__":
    run(main)
