"""Inference-side levers on real photos: decoder, flip test-time augmentation, the box given to the model.

    python studies/photo_levers.py --name default-s0 --model mse=models/mse/model.pt --model bce=models/bce/model.pt \
        [--folder ../shared/real-photos --pattern '*.jpg'] [--params params.yaml]

For each model, every decoder x flip TTA on/off x box (dlib's box mapped to the training convention, as
``facemarks predict``; or dlib's raw box) is scored on the real-photo set of :func:`facemarks.evaluation.real_photos.photo_set`
(NME % from the reference: human markup where present, else dlib's points). No training: the models are given.
One row per run: ``reports/realism/levers/<name>.json``; ``--table`` rebuilds ``reports/realism/levers.md`` from
the rows (median over faces per setting, mean and spread over the rows' training seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "reports" / "realism" / "levers"
CACHE = ROOT / "data" / "cache" / "photo_refs"


def raw_boxes(photos):
    """The same photo set with dlib's own detector box given to the model (markup boxes stay)."""
    faces = [dataclasses.replace(f, box=f.detector_box) if f.detector_box is not None else f for f in photos.faces]
    return dataclasses.replace(photos, faces=faces)


def score(model_path: str, loss: str, photos, size: int, margin: float, sigma: float) -> dict[str, dict]:
    from facemarks.heatmaps.codec import DECODERS
    from facemarks.training.model import load_model
    from facemarks.evaluation.real_photos import face_nme, loss_summary, predict_faces

    model = load_model(model_path)
    out = {}
    for box_name, ps in (("mapped", photos), ("raw", raw_boxes(photos))):
        for flip in (False, True):
            for decoder in DECODERS:
                pts = predict_faces(model, loss, ps, size=size, margin=margin, sigma=sigma, decoder=decoder, flip=flip)
                s = loss_summary(face_nme(pts, ps.faces), ps.faces)
                out[f"{box_name}|{'flip' if flip else 'noflip'}|{decoder}"] = {k: s[k] for k in
                                                                             ("n_faces", "median", "mean",
                                                                              "share_above_10")}
    return out


def table(rows_dir: Path = ROWS) -> str:
    """Markdown: per (loss, setting), the median NME over faces, mean ± sd over the runs (seeds) that have it."""
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    by: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        for loss, settings in r["losses"].items():
            for setting, s in settings.items():
                by.setdefault((r.get("group", r["name"]), loss, setting), []).append(s["median"])
    lines = ["# Inference levers on real photos", "",
             "Median NME % over the faces of the real-photo set (reference: human markup where present, else dlib's "
             "points); per group, mean ± sd over its runs (training seeds). Box: `mapped` = dlib's box mapped to the "
             "training convention (what `facemarks predict` uses), `raw` = dlib's own box. Rebuilt by "
             "`python studies/photo_levers.py --table`.", "",
             "| group | loss | box | flip TTA | decoder | runs | median NME % (mean ± sd over runs) |",
             "|---|---|---|---|---|---|---|"]
    for (group, loss, setting), vals in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], np.mean(kv[1]))):
        box, flip, dec = setting.split("|")
        sd = f" ± {np.std(vals, ddof=1):.2f}" if len(vals) > 1 else ""
        lines.append(f"| {group} | {loss} | {box} | {flip} | {dec} | {len(vals)} | {np.mean(vals):.2f}{sd} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name")
    p.add_argument("--group", help="rows of one setting over seeds share a group (default: the name)")
    p.add_argument("--model", action="append", default=[], metavar="LOSS=PATH")
    p.add_argument("--folder", default=str(ROOT.parent / "shared" / "real-photos"))
    p.add_argument("--pattern", default="*.jpg")
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="size, margin, sigma of the models")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    if args.table:
        (ROWS.parent / "levers.md").write_text(table(), encoding="utf-8")
        print(table())
        return 0
    from facemarks.core.params import load_params
    from facemarks.evaluation.real_photos import photo_set

    prm = load_params(args.params)
    photos = photo_set(args.folder, args.pattern, cache=CACHE)
    row = {"name": args.name, "group": args.group or args.name, "folder": Path(args.folder).name,
           "n_images": photos.n_images, "n_faces": len(photos.faces), "size": prm.augment.size,
           "sigma": prm.encode.sigma, "losses": {}}
    for item in args.model:
        loss, _, path = item.partition("=")
        row["losses"][loss] = score(path, loss, photos, prm.augment.size, prm.augment.margin, prm.encode.sigma)
        best = min(row["losses"][loss].items(), key=lambda kv: kv[1]["median"])
        print(f"{args.name} {loss}: mapped|noflip|dark {row['losses'][loss]['mapped|noflip|dark']['median']:.2f} %, "
              f"best {best[0]} {best[1]['median']:.2f} %", flush=True)
    ROWS.mkdir(parents=True, exist_ok=True)
    (ROWS / f"{args.name}.json").write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
