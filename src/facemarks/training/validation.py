"""Per-epoch validation: heatmap loss and inter-ocular NME on the val split, and the two failure checks.

Note:
    N: samples, K: keypoints (68), h = S / 4: heatmap side.

The failure checks, recorded per epoch beside the NME: mean-shape collapse (:func:`is_collapse`: the net predicts
about the average face) and weak peaks (:func:`weak_peaks`: near-flat predicted maps, the decoder reads points off
noise). Under DDP each process scores its own share of the val split and the sums are added up.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from facemarks.evaluation import metrics
from facemarks.heatmaps.codec import HeatmapCodec
from facemarks.training.data import BatchDataset, SplitArrays, TrainData
from facemarks.training.distributed import all_reduce, rank_world
from facemarks.training.model import heatmap_loss, outputs_to_heatmaps
from facemarks.training.precision import autocast

COLLAPSE_RATIO = 0.9  # val NME >= 0.9 x mean-shape NME counts as mean-shape collapse
WEAK_PEAK_RATIO = 0.5  # predicted map peak < 0.5 x the target's peak counts as a weak peak (see weak_peaks)


def nme_per_sample(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Inter-ocular NME (%) per sample over visible points: pred, gt (N, K, 2), visible (N, K) -> (N,)."""
    return 100.0 * metrics.nme(pred, gt, metrics.normaliser(gt, "io"), visible)


def mean_shape_nme(data: TrainData) -> float:
    """Val NME (%) of a predictor that outputs the mean training shape (crop px) for every face."""
    shape = metrics.mean_shape(data.train.points, data.train.visible)
    gt = np.asarray(data.val.points, np.float64)
    return float(np.nanmean(nme_per_sample(np.broadcast_to(shape, gt.shape), gt, np.asarray(data.val.visible))))


def is_collapse(val_nme: float, mean_shape: float) -> bool:
    """Mean-shape collapse: val NME at least :data:`COLLAPSE_RATIO` x the mean-shape predictor's NME."""
    return bool(val_nme >= COLLAPSE_RATIO * mean_shape)


@torch.no_grad()
def evaluate(model: nn.Module, split: SplitArrays, loss: str, codec: HeatmapCodec, decoder: str,
             device: torch.device, batch_size: int = 64, amp: bool = False) -> tuple[float, float]:
    """Mean heatmap loss and mean NME (%) on ``split`` -> (val_loss, val_nme); see :func:`validate`."""
    row = validate(model, split, loss, codec, decoder, device, batch_size, amp)
    return row["val_loss"], row["val_nme"]


@torch.no_grad()
def validate(model: nn.Module, split: SplitArrays, loss: str, codec: HeatmapCodec, decoder: str,
             device: torch.device, batch_size: int = 64, amp: bool = False) -> dict[str, float]:
    """``{"val_loss", "val_nme" (%), "val_weak_peak_share"}`` on ``split`` (:func:`weak_peaks`); shards and sums
    under DDP."""
    rank, world = rank_world()
    was_training = model.training
    model.eval()
    dataset = BatchDataset(split)
    own = np.arange(rank, len(split), world)
    sums = torch.zeros(5, dtype=torch.float64)  # loss * batch, nme sum, samples, weak peaks, weighted points
    for i in range(0, len(own), batch_size):
        idx = own[i:i + batch_size]
        images, targets, weights = (t.to(device) for t in dataset[idx])
        with autocast(device, amp):
            outputs = model(images)
        sums[0] += float(heatmap_loss(outputs, targets, weights, loss)) * len(idx)
        heat = outputs_to_heatmaps(outputs.float(), loss)
        points, _ = codec.decode(heat, decoder)
        gt = np.asarray(split.points[idx], np.float64)
        nme = nme_per_sample(points.cpu().double().numpy(), gt, np.asarray(split.visible[idx]))
        sums[1] += float(np.nansum(nme))  # a face with no visible point has no NME
        sums[2] += len(idx)
        sums[3:5] += torch.tensor(weak_peaks(heat, targets, weights), dtype=torch.float64)
    if world > 1:
        sums = all_reduce(sums, device)
    model.train(was_training)
    n = max(float(sums[2]), 1.0)
    share = float(sums[3] / sums[4]) if float(sums[4]) > 0 else float("nan")
    return {"val_loss": float(sums[0]) / n, "val_nme": float(sums[1]) / n, "val_weak_peak_share": share}


def weak_peaks(predicted: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
               weights: torch.Tensor | np.ndarray, ratio: float | None = None) -> tuple[int, int]:
    """Count the keypoints whose predicted map has a weak peak -> ``(weak, counted)``.

    predicted, target ``(N, K, h, w)`` in target units (after the sigmoid for ``bce``, see
    :func:`facemarks.training.model.outputs_to_heatmaps`); weights ``(N, K)``: only points with weight > 0 (visible, on the
    map) are counted. A peak is weak when ``max(predicted map) < ratio x max(target map)`` (default
    :data:`WEAK_PEAK_RATIO`): the target's own sampled peak, just under 1 for a sub-pixel Gaussian centre. This is
    the write-up's "predicts zeros / organised but wrong" symptom: the net outputs near-flat maps and the decoder
    reads points off noise. An all-zero prediction counts every point, the exact target none.
    """
    ratio = WEAK_PEAK_RATIO if ratio is None else ratio
    pred_max = torch.as_tensor(predicted).float().flatten(-2).amax(-1)
    target_max = torch.as_tensor(target).float().to(pred_max.device).flatten(-2).amax(-1)
    counted = torch.as_tensor(weights).to(pred_max.device) > 0
    weak = (pred_max < ratio * target_max) & counted
    return int(weak.sum()), int(counted.sum())
