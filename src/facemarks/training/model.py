"""ResNet18 heatmap network: grayscale stem, deconvolution head, one map per keypoint.

Note:
    N: batch, K: keypoints (68), S: input side (a multiple of 32), h = w = S / 4: map side.

Input is a float tensor (N, 1, S, S) with grey values in [0, 1] (see :func:`images_to_tensor`);
the network normalises it itself, so callers never handle normalisation constants. The output is
(N, K, S/4, S/4): heatmaps for the ``mse`` and ``awing`` losses, logits for ``bce`` (:func:`outputs_to_heatmaps`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

LOSSES = ("mse", "bce", "awing")  # every loss the library can train; params `train.losses` picks the trained ones
# Adaptive Wing loss (Wang, Bo and Fuxin, ICCV 2019), the paper's values: omega, theta, epsilon, alpha, and the
# weighted loss map: pixels within a 3x3 grey dilation of (target > AWING_MASK_THRESHOLD) weigh AWING_W + 1, others 1
AWING_OMEGA = 14.0
AWING_THETA = 0.5
AWING_EPSILON = 1.0
AWING_ALPHA = 2.1
AWING_W = 10.0
AWING_MASK_THRESHOLD = 0.2
STRIDE = 4  # input pixels per heatmap cell
# ImageNet RGB statistics averaged to one grey channel.
GREY_MEAN = 0.449
GREY_STD = 0.226

log = logging.getLogger("facemarks.training.model")


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` (same submodule names, order and arithmetic)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """``torchvision.models.resnet18(weights=None)`` rebuilt without importing torchvision (its import pulls in
    ``torch._dynamo``: about 1.5 s CPU of ``facemarks predict``'s start). Same modules, parameter names, construction
    order and initialisation, hence the same random draws and weights for a given seed (``tests/test_model.py``).
    Only the parts :class:`HeatmapNet` uses are called; ``avgpool`` / ``fc`` exist to keep the draws identical."""

    def __init__(self) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        first = BasicBlock(self.inplanes, planes, stride, downsample)
        self.inplanes = planes
        return nn.Sequential(first, BasicBlock(planes, planes))


def resnet18(weights=None) -> nn.Module:
    """torchvision's ``resnet18`` (imported here, on first use: only the ImageNet weights path needs torchvision)."""
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(weights=weights)


class HeatmapNet(nn.Module):
    """ResNet18 backbone (stride 32) + 3 x [ConvTranspose2d k4 s2 p1, BN, ReLU] + 1x1 conv.

    Args:
        num_keypoints: K, number of output maps.
        head_width: channels of each deconvolution layer.
        dropout: dropout probability before the final 1x1 conv (0 = none).
    """

    def __init__(self, num_keypoints: int = 68, head_width: int = 256, dropout: float = 0.0):
        super().__init__()
        if head_width < 1:
            raise ValueError(f"HeatmapNet: head_width must be >= 1, got {head_width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"HeatmapNet: dropout must be in [0, 1), got {dropout}")
        net = ResNet18()
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.backbone = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        layers: list[nn.Module] = []
        in_ch = 512
        for _ in range(3):
            layers += [
                nn.ConvTranspose2d(in_ch, head_width, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(head_width),
                nn.ReLU(inplace=True),
            ]
            in_ch = head_width
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.head = nn.Sequential(*layers)
        self.final = nn.Conv2d(head_width, num_keypoints, kernel_size=1)
        self.num_keypoints = num_keypoints
        self.init_weights()

    def init_weights(self, prior: float | None = None, backbone: bool = True) -> None:
        """Kaiming-normal convs, unit BatchNorm, small-normal last layer.

        Args:
            prior: mean target value; when given, the last bias is ``logit(prior)`` so that BCE
                starts at the target prior instead of 0.5 (else the bias is 0).
            backbone: also re-initialise the backbone (False keeps pretrained weights).
        """
        modules = list(self.head.modules()) + (list(self.backbone.modules()) if backbone else [])
        for m in modules:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.final.weight, std=1e-3)
        bias = 0.0 if prior is None else math.log(prior / (1.0 - prior))
        nn.init.constant_(self.final.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) grey in [0, 1] -> (N, K, S/4, S/4) raw outputs."""
        assert x.ndim == 4 and x.shape[1] == 1, f"expected (N, 1, S, S), got {tuple(x.shape)}"
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0, (
            f"input side must be a multiple of 32, got {tuple(x.shape[-2:])}"
        )
        x = (x - GREY_MEAN) / GREY_STD
        return self.final(self.head(self.backbone(x)))


def build_model(
    num_keypoints: int = 68,
    head_width: int = 256,
    dropout: float = 0.0,
    pretrained: bool = False,
    prior: float | None = None,
) -> HeatmapNet:
    """Build and initialise a :class:`HeatmapNet`.

    Args:
        pretrained: start the backbone from torchvision's ImageNet ResNet18 (RGB stem averaged to one
            channel, see :func:`load_imagenet_backbone`). When the weights cannot be had (offline), logs
            one warning line and continues from scratch.
        prior: BCE target prior for the last bias (see :meth:`HeatmapNet.init_weights`).
    """
    model = HeatmapNet(num_keypoints, head_width, dropout)
    loaded = pretrained and load_imagenet_backbone(model)
    model.init_weights(prior=prior, backbone=not loaded)
    return model


def load_imagenet_backbone(model: HeatmapNet) -> bool:
    """Copy ImageNet ResNet18 weights into ``model.backbone``; False (one warning line) if unavailable.

    The RGB stem (64, 3, 7, 7) is averaged over its colour channels and scaled by 3 -> (64, 1, 7, 7): the grey
    image then gives the same first-layer response as a grey image copied to R, G and B.
    """
    try:
        from torchvision.models import ResNet18_Weights

        ref = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
    except Exception as err:  # offline: URLError / OSError / RuntimeError from the hub download
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        log.warning("train.pretrained: ImageNet ResNet18 weights unavailable (%s); training from scratch", reason)
        return False
    ref.conv1.weight.data = 3.0 * ref.conv1.weight.data.mean(dim=1, keepdim=True)
    src = nn.Sequential(ref.conv1, ref.bn1, ref.relu, ref.maxpool,
                        ref.layer1, ref.layer2, ref.layer3, ref.layer4)
    model.backbone.load_state_dict(src.state_dict())
    return True


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 crops (N, S, S) -> float32 tensor (N, 1, S, S) in [0, 1]."""
    assert images.ndim == 3, f"expected (N, S, S) images, got {images.shape}"
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


def outputs_to_heatmaps(outputs: torch.Tensor, loss: str) -> torch.Tensor:
    """Network outputs -> heatmaps in target units: sigmoid for ``bce`` logits, as-is for ``mse`` and ``awing``.

    ``awing`` regresses the heatmap itself, like ``mse``: the Adaptive Wing loss is defined on the predicted value
    ``yhat`` in target units (its exponent ``alpha - y`` reads the target in [0, 1]), and the paper applies it to the
    raw output of the network. A sigmoid would saturate exactly where the loss wants its large gradients (near the
    peak, ``yhat`` close to 1) and would add an activation the exported graph and the decoders do not need."""
    if loss == "bce":
        return torch.sigmoid(outputs)
    if loss in ("mse", "awing"):
        return outputs
    raise ValueError(f"outputs_to_heatmaps: unknown loss {loss!r}; allowed: {LOSSES}")


def heatmap_loss(
    outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, loss: str
) -> torch.Tensor:
    """Per-keypoint weighted heatmap loss.

    Args:
        outputs: (N, K, h, w) network outputs (logits for ``bce``; heatmaps in target units for ``mse``, ``awing``).
        targets: (N, K, h, w) target heatmaps in [0, 1].
        weights: (N, K) per-keypoint weights (visibility); 0 drops a keypoint.
        loss: ``mse`` (squared error), ``bce`` (binary cross-entropy with logits) or ``awing`` (Adaptive Wing with
            the paper's weighted loss map, :func:`awing_per_pixel`).

    Returns:
        Scalar: sum_nk weights * mean_pixels(loss) / max(sum_nk weights, 1).
    """
    outputs = outputs.float()
    targets = targets.float()
    if loss == "mse":
        per_pixel = (outputs - targets).square()
    elif loss == "bce":
        per_pixel = nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
    elif loss == "awing":
        per_pixel = awing_per_pixel(outputs, targets) * awing_weight_map(targets)
    else:
        raise ValueError(f"heatmap_loss: unknown loss {loss!r}; allowed: {LOSSES}")
    per_kp = per_pixel.mean(dim=(-2, -1))
    weights = weights.to(per_kp.dtype)
    return (per_kp * weights).sum() / weights.sum().clamp_min(1.0)


def awing_per_pixel(predicted: torch.Tensor, targets: torch.Tensor, omega: float = AWING_OMEGA,
                    theta: float = AWING_THETA, epsilon: float = AWING_EPSILON,
                    alpha: float = AWING_ALPHA) -> torch.Tensor:
    """Adaptive Wing loss per pixel (Wang, Bo and Fuxin, ICCV 2019, eq. 7), unweighted.

    ``predicted`` yhat and ``targets`` y are (N, K, h, w) in target units; with ``d = |y - yhat|`` and
    ``p = alpha - y``:

        ``omega * ln(1 + (d / epsilon) ** p)``   if ``d < theta``
        ``A * d - C``                             otherwise,

    ``A = omega / (1 + (theta / epsilon) ** p) * p * (theta / epsilon) ** (p - 1) / epsilon`` and
    ``C = theta * A - omega * ln(1 + (theta / epsilon) ** p)``, which make the two branches meet with the same value
    and slope at ``d = theta``. The gradient is finite everywhere (``p >= alpha - 1 > 1`` for y in [0, 1])."""
    diff = (targets - predicted).abs()
    power = alpha - targets
    ratio = theta / epsilon
    a = omega / (1.0 + ratio ** power) * power * ratio ** (power - 1.0) / epsilon
    c = theta * a - omega * torch.log1p(ratio ** power)
    small = omega * torch.log1p((diff / epsilon) ** power)
    return torch.where(diff < theta, small, a * diff - c)


def awing_weight_map(targets: torch.Tensor, w: float = AWING_W,
                     threshold: float = AWING_MASK_THRESHOLD) -> torch.Tensor:
    """The paper's loss weight ``W * M + 1`` (N, K, h, w): ``M`` the 3x3 grey dilation of ``targets > threshold`` on
    each map (a 3x3 max filter of the binary mask, the map's border not extended)."""
    mask = (targets > threshold).to(targets.dtype)
    dilated = nn.functional.max_pool2d(mask.flatten(0, -3).unsqueeze(1), kernel_size=3, stride=1, padding=1)
    return w * dilated.reshape(targets.shape) + 1.0


def load_model(path: str | Path, device: str | torch.device = "cpu") -> HeatmapNet:
    """Rebuild a :class:`HeatmapNet` from a ``model.pt`` state_dict (K and head width read from it), in eval mode.

    Built on the CPU, not on the ``meta`` device: initialising meta tensors goes through ``torch._refs`` and imports
    ``torch._dynamo`` (about 2 s), more than the random init the loaded weights overwrite."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    k, width = state["final.weight"].shape[:2]
    model = HeatmapNet(num_keypoints=int(k), head_width=int(width))
    model.load_state_dict(state)
    return model.to(device).eval()
