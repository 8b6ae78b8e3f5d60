"""Report figures (matplotlib, Agg) and the markdown summary of the trained losses (``train.losses``).

Shapes: crops uint8 ``(N, S, S)``, points ``(N, K, 2)`` crop px, heatmaps ``(K, h, w)`` with stride ``S / w``,
per-face NME ``(N,)`` fraction. Every ``*_figure`` returns a ``matplotlib.figure.Figure``; :func:`save_figure`
writes it atomically and closes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from facemarks.core.atomic import atomic_path  # noqa: E402
from facemarks.core.landmarks import REGIONS  # noqa: E402

GT_STYLE = {"c": "lime", "s": 6, "marker": "o", "label": "ground truth"}
PRED_STYLE = {"c": "red", "s": 6, "marker": "x", "label": "predicted", "linewidths": 0.8}


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, cols: int = 4, cell: float = 2.4) -> tuple[Any, np.ndarray]:
    cols = max(1, min(cols, n))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes.ravel()


def keypoints_figure(images: np.ndarray, gt: np.ndarray, pred: np.ndarray, title: str,
                     nme: np.ndarray | None = None) -> Any:
    """Crops ``(n, S, S)`` with ground truth ``(n, K, 2)`` (green dots) and predictions ``(n, K, 2)`` (red crosses);
    ``nme (n,)`` fraction shown per panel when given."""
    fig, axes = _grid(len(images))
    for i, ax in enumerate(axes[:len(images)]):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.scatter(*np.asarray(gt[i]).T, **GT_STYLE)
        ax.scatter(*np.asarray(pred[i]).T, **PRED_STYLE)
        if nme is not None:
            ax.set_title(f"NME {100 * nme[i]:.2f} %", fontsize=8)
    axes[0].legend(loc="lower left", fontsize=6, framealpha=0.6)
    fig.suptitle(title)
    return fig


def heatmaps_figure(image: np.ndarray, predicted: np.ndarray, target: np.ndarray, indices: list[int],
                    title: str = "") -> Any:
    """One face ``(S, S)``: per keypoint in ``indices``, predicted (top row) and target (bottom) maps ``(K, h, w)``
    overlaid on the face (map pixel centres aligned with the input convention, extent ``[-0.5, S - 0.5]``)."""
    s = image.shape[-1]
    extent = (-0.5, s - 0.5, s - 0.5, -0.5)
    fig, axes = plt.subplots(2, len(indices), figsize=(2.4 * len(indices), 5.2), squeeze=False)
    for col, k in enumerate(indices):
        for row, (maps, name) in enumerate(((predicted, "predicted"), (target, "target"))):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=extent)
            ax.imshow(maps[k], cmap="inferno", alpha=0.55, extent=extent, interpolation="bilinear")
            ax.set_title(f"{name} · point {k}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    return fig


def best_worst_figure(images: np.ndarray, gt: np.ndarray, pred: np.ndarray, nme: np.ndarray, n: int,
                      title: str) -> Any:
    """The ``n`` best and ``n`` worst faces by NME ``(N,)`` (top row best, bottom row worst), values in titles."""
    order = np.argsort(np.nan_to_num(nme, nan=np.inf))
    n = max(1, min(n, len(order) // 2 or 1))
    picks = np.concatenate([order[:n], order[::-1][:n]])
    fig = keypoints_figure(images[picks], gt[picks], pred[picks], title, nme[picks])
    for ax, label in zip(fig.axes[:len(picks)], ["best"] * n + ["worst"] * n):
        ax.set_title(f"{label}: {ax.get_title()}", fontsize=8)
    return fig


def report_losses(report: dict[str, Any]) -> list[str]:
    """The losses an ``eval.json`` report scored: its ``losses`` list (``train.losses``), ``[mse, bce]`` for a report
    from before the list."""
    return list(report.get("losses") or ("mse", "bce"))


def regions_figure(report: dict[str, Any], names: tuple[str, ...] | None = None) -> Any:
    """Grouped bars of per-region NME (%) for each predictor present in the ``eval.json`` report (default: its losses,
    then dlib68 and the mean shape)."""
    rows = []
    for name in names or (*report_losses(report), "dlib68", "mean_shape"):
        entry = report.get(name)
        if not entry:
            continue
        row = entry[entry["best_decoder"]] if "best_decoder" in entry else entry
        rows.append((name, row["regions"]))
    regions = list(REGIONS)
    x = np.arange(len(regions))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (name, values) in enumerate(rows):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [values[r] for r in regions], width, label=name)
    ax.set_xticks(x, regions)
    ax.set_ylabel("NME (%, inter-ocular)")
    ax.set_title("Per-region NME on the test set")
    ax.legend(fontsize=8)
    return fig


def astronaut_figure(image: np.ndarray, box: np.ndarray, ours: np.ndarray, dlib: np.ndarray | None,
                     label: str, nme_vs_dlib: float | None = None) -> Any:
    """The astronaut photo ``(H, W, 3)`` zoomed on the face ``box (4,)`` with our points ``(68, 2)`` and dlib's."""
    left, top, w, h = box
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(image)
    ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), w, h, fill=False, color="yellow", lw=1))
    ax.scatter(*np.asarray(ours).T, c="red", s=10, marker="x", label=f"facemarks ({label})")
    if dlib is not None and np.isfinite(dlib).all():
        ax.scatter(*np.asarray(dlib).T, c="cyan", s=8, marker="o", label="dlib 68")
    pad = 0.35 * max(w, h)
    ax.set_xlim(left - pad, left + w + pad)
    ax.set_ylim(top + h + pad, top - pad)
    ax.legend(loc="lower left", fontsize=7)
    extra = f" · NME vs dlib {nme_vs_dlib:.2f} %" if nme_vs_dlib is not None else ""
    ax.set_title(f"Astronaut{extra}", fontsize=9)
    ax.axis("off")
    return fig


def summary_markdown(report: dict[str, Any]) -> str:
    """``reports/eval/README.md``: a table of each loss (and dlib68, mean shape) and the paired comparisons
    (:func:`comparison_markdown`)."""
    lines = ["# Evaluation summary (test set)", "",
             "NME in % (inter-ocular = 300-W convention; inter-pupil; box diagonal), AUC and FR at the threshold "
             "in `params.yaml` (`evaluate.threshold`). Speed (ms per face) depends on the machine: it is in "
             "`timings/evaluate.json` and the MLflow `evaluate` run, not here.", "",
             "| model | decoder | NME io % | NME ip % | NME box % | AUC | FR |",
             "|---|---|---|---|---|---|---|"]
    losses = report_losses(report)
    for name in (*losses, "dlib68", "mean_shape"):
        e = report.get(name)
        if not e:
            continue
        dec = e.get("best_decoder", "—")
        row = e[dec] if dec in e else e
        lines.append(f"| {name} | {dec} | {row['nme_io']:.3f} | {row['nme_ip']:.3f} | {row['nme_box']:.3f} | "
                     f"{row['auc']:.3f} | {row['fr']:.3f} |")
    lines += ["", *comparison_markdown(report["comparison"])]
    if "dlib68" not in report:
        lines += ["dlib68 row absent: the `peers` extra is not installed (or `evaluate.peers` is false).", ""]
    astro = report.get("astronaut", {})
    if astro.get("found"):
        vs = astro.get("nme_vs_dlib")
        lines += [f"Astronaut photo ({astro['loss']} model): " + (f"NME vs dlib's points {vs:.2f} %." if vs is not None
                  else "dlib not available, overlay only.") + " See `astronaut.png`.", ""]
    photos = report.get("photos", {})
    if photos.get("n_faces"):
        lines += [f"Real photos ({photos.get('folder', '?')}: {photos['n_faces']} faces in {photos.get('n_images', '?')} "
                  f"images, references {photos.get('references', {})}; {photos.get('false_faces_dropped', 0)} of "
                  "dlib's detections dropped as not faces), NME %:", "",
                  "| model | median | mean | above 10 % |", "|---|---|---|---|"]
        lines += [f"| {loss} | {photos[loss]['median']:.2f} | {photos[loss]['mean']:.2f} | "
                  f"{photos[loss]['share_above_10']:.3f} |" for loss in losses
                  if isinstance(photos.get(loss), dict) and photos[loss].get("median") is not None]
        lines.append("")
    rt = report.get("roundtrip", {})
    if rt:
        lines += [f"Round-trip error of the test targets (subpixel decoder): mean {rt['subpixel']:.2e} px, "
                  f"max {rt['subpixel_max']:.2e} px.", ""]
    lines += ["Figures: " + ", ".join(f"`keypoints_{loss}.png`" for loss in losses) + ", `heatmaps.png`, "
              "`best_worst.png`, `regions.png`, `astronaut.png`.", ""]
    return "\n".join(lines)


def comparison_markdown(comparison: dict[str, Any]) -> list[str]:
    """The ``comparison`` block of ``eval.json`` (:func:`facemarks.evaluation.stats.loss_comparison`) in plain words: the
    headline verdict ("MSE better by X [95 % CI a, b], p = …", "AWING better than every other loss (…)" or "not
    distinguishable at this budget") and, per pair of losses, one row per decoder. A block from before the loss list
    (no ``pairs``) is its BCE − MSE pair."""
    pairs = comparison.get("pairs")
    if pairs is None:
        pairs = {"bce-mse": {"a": "bce", "b": "mse", **comparison}}
    verdict = comparison["verdict"]
    lines = [f"**{verdict[0].upper()}{verdict[1:]}.**", "",
             "Per test face ΔNME = NME(A) − NME(B) in NME points (%) for each pair of losses: its mean, a "
             f"percentile bootstrap {100 * comparison['level']:.0f} % interval ({comparison['n_boot']} resamples of the faces, "
             f"seed {comparison['seed']}) and the Wilcoxon signed-rank p-value. A loss is named the winner only when "
             "it is better than every other loss with each interval excluding 0 (`winner` in `metrics/eval.json`, "
             "else null). One training seed: the seed-to-seed spread is not in this interval (`facemarks compare`, "
             "`studies/`).", ""]
    for pair in pairs.values():
        a, b = pair["a"], pair["b"]
        best = pair["best"]
        head = (f"each loss at its own best decoder ({b.upper()}: {best[f'decoder_{b}']}, {a.upper()}: "
                f"{best[f'decoder_{a}']})" if comparison["headline"] == "best_decoder" else comparison["headline"])
        lines += [f"## {b.upper()} vs {a.upper()} on the same test faces", "",
                  f"{pair['verdict'][0].upper()}{pair['verdict'][1:]}. Headline: {head}.", "",
                  f"| decoder | {b.upper()} NME % | {a.upper()} NME % | Δ {a.upper()} − {b.upper()} | 95 % CI | "
                  "Wilcoxon p | verdict |", "|---|---|---|---|---|---|---|"]
        for name, r in [("best (headline)", best), *pair["decoders"].items()]:
            verdict = f"{r['winner'].upper()} better" if r["winner"] else "not distinguishable"
            lines.append(f"| {name} | {r[f'mean_{b}']:.3f} | {r[f'mean_{a}']:.3f} | {r['mean_delta']:+.3f} | "
                         f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p_wilcoxon']:.2g} | {verdict} |")
        lines.append("")
    return lines


def heatmap_indices(n: int) -> list[int]:
    """``n`` keypoints spread over the face for the heatmap figure: eye corners, nose tip, mouth corners, then more."""
    preferred = [36, 45, 30, 48, 54, 8, 19, 24, 39, 42, 51, 57, 0, 16]
    rest = [k for k in range(68) if k not in preferred]
    return (preferred + rest)[:n]


def photos_sheet_figure(crops: np.ndarray, ref: np.ndarray, pred: np.ndarray, nme_pct: np.ndarray, labels: Any,
                        title: str, cols: int = 4) -> Any:
    """Contact sheet of the worst real-photo faces: grey crops ``(M, S, S)`` with the reference ``(M, K, 2)`` (green)
    and the prediction ``(M, K, 2)`` (red) in crop px, each titled with its file, reference kind and NME (%)."""
    if len(crops) == 0:
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no real-photo faces scored", ha="center")
        return fig
    fig, axes = _grid(len(crops), cols, cell=2.6)
    for ax, img, r, p, e, label in zip(axes, crops, ref, pred, nme_pct, labels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.scatter(*np.asarray(r).T, **{**GT_STYLE, "label": "reference"})
        ax.scatter(*np.asarray(p).T, **PRED_STYLE)
        ax.set_title(f"{str(label)[:34]}\nNME {float(e):.1f} %", fontsize=7)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
