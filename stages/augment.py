"""Stage augment: face crops + seeded augmentation from data/raw into data/augmented/{train,val,test}/.

Writes the split folders (facemarks.store), metrics/augment.json (counts per split, crops/s, seconds) and
reports/augment_contact_sheet.png (augmented training crops; right eye red, left eye blue).
"""
from __future__ import annotations

from pathlib import Path

from facemarks.atomic import atomic_write_json
from facemarks.augment import run_augment, write_contact_sheet
from facemarks.params import load_params
from facemarks.runner import run


def main() -> None:
    params = load_params()
    out = Path("data/augmented")
    summary = run_augment(Path("data/raw"), out, params.augment, params.base.seed)
    summary["contact_sheet_samples"] = write_contact_sheet(Path("reports/augment_contact_sheet.png"), out / "train")
    atomic_write_json("metrics/augment.json", summary)
    c = summary["counts"]
    print(f"augment: train {c['train']}, val {c['val']}, test {c['test']} crops in {summary['seconds']:.1f} s "
          f"({summary['images_per_s']:.0f} crops/s, {summary['workers']} workers)")


if __name__ == "__main__":
    run(main)
