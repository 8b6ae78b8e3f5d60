"""Flip test-time augmentation: the maps of a mirrored crop, flipped back and permuted, are the maps of the crop."""
from __future__ import annotations

import numpy as np
import torch

from facemarks.serving.inference import make_codec, predict_heatmaps, unflip_heatmaps
from facemarks.core.landmarks import MIRROR


def test_unflipped_targets_of_the_mirror_are_the_targets_of_the_crop():
    rng = np.random.default_rng(0)
    size, codec = 64, make_codec(64, 1.5)
    points = rng.uniform(8, 56, size=(3, 68, 2))  # crop px, pixel centres at integer coordinates
    mirrored = points[:, MIRROR].copy()
    mirrored[..., 0] = size - 1 - mirrored[..., 0]  # x -> S - 1 - x, left and right points swapped
    visible = np.ones((3, 68), bool)
    maps, _ = codec.encode(points, visible)
    mirror_maps, _ = codec.encode(mirrored, visible)
    np.testing.assert_allclose(unflip_heatmaps(np.asarray(mirror_maps)), np.asarray(maps), atol=1e-6)


class MirrorSymmetric(torch.nn.Module):
    """A 'network' whose maps are a fixed function of the crop (column means, broadcast) - not mirror-equivariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, s, _ = x.shape
        col = x.mean(dim=2, keepdim=True)[..., ::4][:, :, :, : s // 4]  # (N, 1, 1, S/4)
        ramp = torch.arange(68, dtype=x.dtype).view(1, 68, 1, 1) / 68
        return (col + ramp).expand(n, 68, s // 4, s // 4).contiguous()


def test_flip_averages_the_crop_and_its_mirror():
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, size=(2, 32, 32), dtype=np.uint8)
    net = MirrorSymmetric()
    plain = predict_heatmaps(net, crops, "mse")
    mirror = predict_heatmaps(net, np.ascontiguousarray(crops[:, :, ::-1]), "mse")
    both = predict_heatmaps(net, crops, "mse", flip=True)
    np.testing.assert_allclose(both, 0.5 * (plain + unflip_heatmaps(mirror)), rtol=1e-6)
    assert not np.allclose(both, plain)  # the mirror really contributes
