"""Results at a glance: the small table the README shows, written from ``metrics/eval.json`` and never copied by hand.

One row per loss of the evaluation (synthetic test NME mean and median, AUC and FR at ``evaluate.threshold``, and the
real-photo median NME from the ``photos`` block: a folder of photos or the bundled portraits), then dlib's
68-point predictor and the mean shape; under the table the folder and faces of the real-photo set and the verdicts of
the paired comparisons. :func:`refresh` writes it to ``reports/summary.md`` and between the markers
:data:`BEGIN` / :data:`END` of ``README.md`` (``facemarks summary``); ``check=True`` only says which file is stale
(``facemarks summary --check``, and ``tests/test_docs.py`` on the committed metrics).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from facemarks.core.atomic import atomic_write_text
from facemarks.core.params import LOSS_NAMES, Params, load_params

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
EVAL_PATH = "metrics/eval.json"
SUMMARY_PATH = "reports/summary.md"
README_PATH = "README.md"

#: How a reference kind of the ``photos`` block (``facemarks.evaluation.real_photos.REFERENCES``) is named under the table.
REFERENCE_LABELS = {"human": "human markup", "dlib": "dlib's 68 points"}
#: How a loss is named in the table.
LOSS_LABELS = {"mse": "MSE", "bce": "BCE / logistic", "awing": "Adaptive Wing"}


class SummaryError(RuntimeError):
    """The evaluation file or the README cannot give the table: one line saying which file and why."""


def losses_of(report: dict[str, Any]) -> list[str]:
    """The losses of ``report`` (``metrics/eval.json``): its ``losses`` list, else every known loss with a block."""
    if isinstance(report.get("losses"), list):
        return [str(loss) for loss in report["losses"]]
    return [loss for loss in LOSS_NAMES if isinstance(report.get(loss), dict) and "nme_io" in report[loss]]


def _num(value: Any, digits: int) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def _synthetic_cells(block: dict[str, Any], median: Any) -> list[str]:
    return [f"{_num(block.get('nme_io'), 2)} ({_num(median, 2)})", _num(block.get("auc"), 3), _num(block.get("fr"), 3)]


def _photo_column(report: dict[str, Any]) -> tuple[str | None, dict[str, str], list[str]]:
    """(header, cell per row name, notes) of the real-photo column: the ``photos`` block when it scored faces, else
    no column (header None)."""
    photos = report.get("photos")
    if isinstance(photos, dict) and photos.get("n_faces"):
        cells = {name: _num((photos.get(name) or {}).get("median"), 2)
                 for name in (*losses_of(report), "dlib68") if isinstance(photos.get(name), dict)}
        refs = photos.get("references") or {}
        if "dlib68" not in cells and refs.get("dlib"):
            cells["dlib68"] = "reference" if not refs.get("human") else "reference (dlib-marked faces)"
        kinds = ", ".join(f"{REFERENCE_LABELS.get(k, k)} {n}" for k, n in refs.items())
        notes = [f"Real photos: `{photos.get('folder', '?')}`, {photos['n_faces']} faces in "
                 f"{photos.get('n_images', '?')} images (reference: {kinds or '?'}); median of the per-face NME, "
                 f"each loss at its best decoder; {photos.get('false_faces_dropped', 0)} of dlib's detections were not "
                 f"faces and are not scored."]
        for pair in (photos.get("comparison") or {}).values():
            if isinstance(pair, dict) and pair.get("verdict"):
                notes.append(f"On these photos (paired per face, mean NME): {pair['verdict']}.")
        return f"real photos: median NME % ({photos['n_faces']} faces)", cells, notes
    return None, {}, []


def results_table(report: dict[str, Any], threshold: float = 0.08) -> str:
    """The results-at-a-glance Markdown (table + notes, no title) of ``report`` (the parsed ``metrics/eval.json``)."""
    losses = losses_of(report)
    if not losses:
        raise SummaryError(f"{EVAL_PATH}: no loss block (expected `losses` or one of {', '.join(LOSS_NAMES)})")
    photo_head, photo_cells, photo_notes = _photo_column(report)
    head = ["model", "synthetic test NME % (median)", f"AUC@{threshold:g}", f"FR@{threshold:g}"]
    rows: list[list[str]] = []
    winner = report.get("winner")
    for loss in losses:
        block = report.get(loss)
        if not isinstance(block, dict):
            raise SummaryError(f"{EVAL_PATH}: `losses` names {loss!r} but the file has no {loss!r} block")
        decoder = block.get("best_decoder", "?")
        median = (block.get(decoder) or {}).get("nme_io_median") if isinstance(block.get(decoder), dict) else None
        label = f"ResNet18 heatmaps, {LOSS_LABELS.get(loss, loss)} ({decoder} decoder)"
        rows.append([f"**{label}**" if loss == winner else label, *_synthetic_cells(block, median),
                     photo_cells.get(loss, "—")])
    for name, label in (("dlib68", "dlib 68-point predictor (true box)"), ("mean_shape", "mean shape (collapse baseline)")):
        if isinstance(report.get(name), dict):
            block = report[name]
            rows.append([label, *_synthetic_cells(block, block.get("nme_io_median")), photo_cells.get(name, "—")])
    if photo_head is None:
        rows = [r[:-1] for r in rows]
    else:
        head.append(photo_head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    n_test = (report.get("comparison") or {}).get("best", {}).get("n")
    notes = [f"Synthetic test: {n_test or 'the'} synthetic test faces, true boxes; mean NME (median in brackets). "
             f"Winner in bold: {'**' + LOSS_LABELS.get(winner, winner) + '**' if winner else 'none (no loss beats every other with a 95 % interval excluding 0)'}."]
    verdict = (report.get("comparison") or {}).get("verdict")
    if verdict:
        notes.append(f"Paired on the synthetic test faces (one training seed): {verdict}.")
    notes += photo_notes
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def summary_markdown(table: str) -> str:
    """``reports/summary.md``: a title, where it comes from, the table."""
    return ("# Results at a glance\n\n"
            f"Written by `facemarks summary` from `{EVAL_PATH}` (and `evaluate.threshold` of `params.yaml`); do not edit "
            "by hand: rerun the command after `dvc repro`. The same block is embedded in `README.md`.\n\n" + table)


def embed(text: str, table: str, where: str = README_PATH) -> str:
    """``text`` with everything between :data:`BEGIN` and :data:`END` replaced by ``table``; :class:`SummaryError`
    naming ``where`` when the markers are missing, repeated or out of order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SummaryError(f"{where}: needs exactly one {BEGIN} ... {END} pair, in that order")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + table + text[stop:]


def embedded(text: str, where: str = README_PATH) -> str:
    """The block between the markers of ``text`` (what :func:`embed` put there)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SummaryError(f"{where}: needs exactly one {BEGIN} ... {END} pair, in that order")
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].removeprefix("\n")


def load_report(path: str | Path) -> dict[str, Any]:
    """The parsed evaluation file, or :class:`SummaryError` naming it (run ``dvc repro`` first)."""
    path = Path(path)
    if not path.is_file():
        raise SummaryError(f"{path}: not found (run `dvc repro` first)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(report, dict):
        raise SummaryError(f"{path}: expected a JSON object")
    return report


def threshold_of(params_path: str | Path) -> float:
    """``evaluate.threshold`` of ``params_path`` when it exists, else the default."""
    return (load_params(params_path) if Path(params_path).is_file() else Params()).evaluate.threshold


def refresh(root: str | Path = ".", check: bool = False, eval_path: str = EVAL_PATH, readme: str = README_PATH,
            out: str = SUMMARY_PATH, params: str = "params.yaml") -> list[str]:
    """Write the table of ``root/eval_path`` to ``root/out`` and into ``root/readme`` (between the markers); with
    ``check`` write nothing. Returns the paths (relative to ``root``) whose content differed (were, or would be,
    rewritten)."""
    root = Path(root)
    table = results_table(load_report(root / eval_path), threshold_of(root / params))
    readme_path = root / readme
    if not readme_path.is_file():
        raise SummaryError(f"{readme_path}: not found")
    old_readme = readme_path.read_text(encoding="utf-8")
    wanted = {out: summary_markdown(table), readme: embed(old_readme, table, readme)}
    stale = []
    for rel, text in wanted.items():
        path = root / rel
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            stale.append(rel)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, text)
    return stale
