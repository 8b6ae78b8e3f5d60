"""facemarks.reporting.plots: every figure is written as a PNG that reads back; the summary states the paired verdict."""
from __future__ import annotations

import numpy as np
import pytest

from facemarks.reporting import plots
from facemarks.heatmaps.codec import HeatmapCodec
from facemarks.core.landmarks import REGIONS


def read_png(path):
    import imageio.v3 as iio

    img = iio.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img[..., :3].std() > 5  # something drawn, not a blank canvas
    return img


@pytest.fixture
def faces():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(6, 32, 32), dtype=np.uint8)
    gt = rng.uniform(4, 28, size=(6, 68, 2))
    pred = gt + rng.normal(0, 1, gt.shape)
    return images, gt, pred, rng.uniform(0.01, 0.2, 6)


def row(value: float) -> dict:
    return {"nme_io": value, "nme_ip": 1.4 * value, "nme_box": 0.4 * value, "auc": 0.5, "fr": 0.1,
            "regions": {r: value + i for i, r in enumerate(REGIONS)}}


REPORT = {
    "mse": {"subpixel": row(5.0), "best_decoder": "subpixel", "nme_io": 5.0, "ms_per_face_b1": 3.0,
            "ms_per_face_batched": 1.0},
    "bce": {"dark": row(4.0), "best_decoder": "dark", "nme_io": 4.0, "ms_per_face_b1": 3.1, "ms_per_face_batched": 1.1},
    "mean_shape": row(9.0),
    "dlib68": {**row(3.5), "ms_per_face": 1.3},
    "winner": "bce", "leader": "bce",
    "roundtrip": {"subpixel": 0.001, "subpixel_max": 0.01},
    "astronaut": {"found": True, "loss": "bce", "box": [175, 76, 91, 91], "nme_vs_dlib": 7.5},
}


def test_keypoint_and_best_worst_figures(tmp_path, faces):
    images, gt, pred, err = faces
    path = plots.save_figure(plots.keypoints_figure(images[:4], gt[:4], pred[:4], "val", err[:4]), tmp_path / "k.png")
    read_png(path)
    fig = plots.best_worst_figure(images, gt, pred, err, 2, "best/worst")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    order = np.argsort(err)
    assert titles[0] == f"best: NME {100 * err[order[0]]:.2f} %"
    assert titles[2] == f"worst: NME {100 * err[order[-1]]:.2f} %"
    read_png(plots.save_figure(fig, tmp_path / "bw.png", dpi=60))


def test_heatmaps_regions_astronaut_figures(tmp_path, faces):
    images, gt, _, _ = faces
    codec = HeatmapCodec(32, 8, 1.0)
    target, _ = codec.encode(gt[:1], np.ones((1, 68), bool))
    idx = plots.heatmap_indices(3)
    assert idx == [36, 45, 30] and len(set(plots.heatmap_indices(68))) == 68
    read_png(plots.save_figure(plots.heatmaps_figure(images[0], target[0] * 0.5, target[0], idx), tmp_path / "h.png"))
    fig = plots.regions_figure(REPORT)
    assert len(fig.axes[0].patches) == 4 * len(REGIONS)  # mse, bce, dlib68, mean shape
    read_png(plots.save_figure(fig, tmp_path / "r.png"))
    from skimage.data import astronaut

    ours = np.random.default_rng(1).uniform(180, 260, (68, 2))
    fig = plots.astronaut_figure(astronaut(), np.array([175, 76, 91, 91.0]), ours, ours + 2, "bce", 7.5)
    read_png(plots.save_figure(fig, tmp_path / "a.png"))


def comparison(shift: float) -> dict:
    """A real ``comparison`` block (facemarks.evaluation.stats) for BCE = MSE + ``shift`` NME points plus noise."""
    from facemarks.evaluation.stats import loss_comparison

    rng = np.random.default_rng(0)
    mse = rng.gamma(4.0, 0.0125, 300)
    bce = mse + shift / 100 + rng.normal(0, 0.005, 300)
    return loss_comparison({"mse": {"subpixel": mse, "dark": mse}, "bce": {"subpixel": bce, "dark": bce}},
                           {"mse": "subpixel", "bce": "dark"}, seed=0)


REPORT["comparison"] = comparison(-1.0)


def test_summary_states_the_paired_verdict_in_plain_words():
    text = plots.summary_markdown(REPORT)
    best = REPORT["comparison"]["best"]
    assert f"**BCE better by {-best['mean_delta']:.3f} NME points [95 % CI " in text and ", p = " in text
    assert "Headline: each loss at its own best decoder (MSE: subpixel, BCE: dark)" in text
    assert text.count("| BCE better |") == 3  # headline + two decoders
    tie = plots.summary_markdown({**REPORT, "winner": None, "comparison": comparison(0.0)})
    assert "**Not distinguishable at this budget: BCE − MSE = " in tie and "| not distinguishable |" in tie
    assert "BCE better" not in tie
    assert "| dlib68 |" in text and "| mean_shape |" in text
    assert "NME vs dlib's points 7.50 %" in text
    no_dlib = {k: v for k, v in REPORT.items() if k != "dlib68"}
    assert "dlib68 row absent" in plots.summary_markdown(no_dlib)


def test_summary_lists_the_real_photos_per_loss():
    photos = {"folder": "bundled portraits (astronaut, grace_hopper)", "n_faces": 2, "n_images": 2,
              "references": {"dlib": 2}, "false_faces_dropped": 1,
              "mse": {"median": 7.1, "mean": 8.2, "share_above_10": 0.0},
              "bce": {"median": 8.0, "mean": 8.5, "share_above_10": 0.5}}
    text = plots.summary_markdown({**REPORT, "photos": photos})
    assert "| model | median | mean | above 10 % |" in text and "1 of dlib's detections dropped as not faces" in text
    assert "| mse | 7.10 | 8.20 | 0.000 |" in text and "| bce | 8.00 | 8.50 | 0.500 |" in text
    assert "above 10 %" not in plots.summary_markdown(REPORT)


def test_summary_and_regions_follow_the_losses_list(tmp_path):
    """Three losses: a row and a keypoints figure per loss, one table per pair, the overall verdict on top."""
    from facemarks.evaluation.stats import loss_comparison

    rng = np.random.default_rng(0)
    mse = rng.gamma(4.0, 0.0125, 300)
    per_face = {"mse": {"dark": mse}, "bce": {"dark": mse + 0.01 + rng.normal(0, 0.002, 300)},
                "awing": {"dark": mse - 0.01 + rng.normal(0, 0.002, 300)}}
    report = {**REPORT, "losses": ["mse", "bce", "awing"], "awing": REPORT["mse"], "winner": "awing",
              "comparison": loss_comparison(per_face, {k: "dark" for k in per_face})}
    text = plots.summary_markdown(report)
    assert text.count("on the same test faces") == 3 and "## MSE vs AWING on the same test faces" in text
    assert "## BCE vs AWING on the same test faces" in text and "| AWING better |" in text
    assert "**AWING better than every other loss (" in text and "| awing |" in text
    assert "`keypoints_awing.png`" in text
    fig = plots.regions_figure(report)
    assert len(fig.axes[0].patches) == 5 * len(REGIONS)  # mse, bce, awing, dlib68, mean shape
    read_png(plots.save_figure(fig, tmp_path / "r.png"))
