"""Running a trained heatmap model on face crops: crops → heatmaps → points, and its speed per face.

Face detection lives in :mod:`facemarks.serving.detect`, whole-image prediction in :mod:`facemarks.serving.predict`, test-set
scoring and evaluate's MLflow logging in :mod:`facemarks.evaluation.testset`.

Shapes: ``N`` crops, ``K = 68`` keypoints, crops uint8 ``(N, S, S)``, heatmaps float32 ``(N, K, h, w)`` with
``h = w = S / 4``, points ``(N, K, 2)`` in crop px, confidence ``(N, K)``.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from facemarks.heatmaps.codec import HeatmapCodec
from facemarks.core.landmarks import MIRROR
from facemarks.training.model import STRIDE, images_to_tensor, outputs_to_heatmaps
from facemarks.serving.runtime import OnnxHeatmaps

def predict_heatmaps(model: torch.nn.Module | OnnxHeatmaps, images: np.ndarray, loss: str, batch_size: int = 64,
                     device: str | torch.device = "cpu", flip: bool = False) -> np.ndarray:
    """uint8 crops ``(N, S, S)`` → heatmaps float32 ``(N, K, S/4, S/4)`` in target units (sigmoid for ``bce``).

    ``model`` is a torch module, or an exported model on onnxruntime (:class:`facemarks.serving.runtime.OnnxHeatmaps`: its
    graph already ends in the ``bce`` sigmoid; ``device`` does not apply). Everything built on this function
    (:func:`predict_crops`, :func:`time_per_face`, :mod:`facemarks.serving.predict`) takes either.

    ``flip``: flip test-time augmentation — the maps of each crop and of its mirror image, the mirror's maps flipped
    back and their channels permuted with the 68-point mirror permutation (:func:`unflip_heatmaps`), averaged
    (twice the network cost).
    """
    heat = _heatmaps(model, images, loss, batch_size, device)
    if flip:
        mirrored = _heatmaps(model, np.ascontiguousarray(np.asarray(images)[:, :, ::-1]), loss, batch_size, device)
        heat = 0.5 * (heat + unflip_heatmaps(mirrored))
    return heat


def unflip_heatmaps(heatmaps: np.ndarray) -> np.ndarray:
    """Maps ``(N, K, h, w)`` predicted on mirrored crops → maps of the original crops: channel ``j`` is the mirror's
    channel ``MIRROR[j]`` flipped left-right (the map grid is centre-aligned with the crop, so an array flip is the
    exact mirror ``x → S − 1 − x``; :mod:`facemarks.heatmaps.codec`)."""
    return np.ascontiguousarray(np.asarray(heatmaps)[:, MIRROR, :, ::-1])


@torch.inference_mode()
def _heatmaps(model: torch.nn.Module | OnnxHeatmaps, images: np.ndarray, loss: str, batch_size: int,
              device: str | torch.device) -> np.ndarray:
    if isinstance(model, OnnxHeatmaps):
        if model.loss not in (None, loss):
            raise ValueError(f"predict_heatmaps: {model.path} was exported for loss {model.loss!r}, not {loss!r}")
        return model(images, batch_size)
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images_to_tensor(np.array(images[i:i + batch_size])).to(device)
        out.append(outputs_to_heatmaps(model(x), loss).float().cpu().numpy())
    if not out:
        raise ValueError("predict_heatmaps: no images given")
    return np.concatenate(out)


def make_codec(input_size: int, sigma: float) -> HeatmapCodec:
    """The codec for a model with input side ``input_size`` (maps are ``input_size / STRIDE``)."""
    return HeatmapCodec(input_size, input_size // STRIDE, sigma)


def predict_crops(model: torch.nn.Module | OnnxHeatmaps, images: np.ndarray, loss: str, sigma: float,
                  decoder: str = "subpixel", batch_size: int = 64,
                  device: str | torch.device = "cpu", flip: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 crops ``(N, S, S)`` → points ``(N, K, 2)`` crop px, confidence ``(N, K)``, heatmaps ``(N, K, h, w)``
    (``flip``: flip test-time augmentation, :func:`predict_heatmaps`)."""
    heat = predict_heatmaps(model, images, loss, batch_size, device, flip)
    points, conf = make_codec(images.shape[-1], sigma).decode(heat, decoder)
    return np.asarray(points, np.float64), np.asarray(conf, np.float32), heat


def time_per_face(model: torch.nn.Module | OnnxHeatmaps, images: np.ndarray, loss: str, sigma: float, decoder: str,
                  batch_size: int, device: str | torch.device = "cpu", repeats: int = 3) -> float:
    """Milliseconds per face of :func:`predict_crops` (forward + decode) at ``batch_size``: one warm-up batch, then
    the best of ``repeats`` passes over ``images`` (the least disturbed by other load on the machine)."""
    predict_crops(model, images[:batch_size], loss, sigma, decoder, batch_size, device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict_crops(model, images, loss, sigma, decoder, batch_size, device)
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / len(images)
