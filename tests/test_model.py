"""ResNet18 heatmap network: output resolution, init against collapse, ImageNet stem, masked losses."""
from __future__ import annotations

import logging
import math
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from conftest import THREADS

from facemarks.training import model as M


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


@pytest.mark.parametrize("size", [32, 64, 96, 128, 224])
def test_output_is_one_map_per_keypoint_at_quarter_resolution(size):
    net = M.build_model(68, head_width=16).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, size, size))
    assert out.shape == (2, 68, size // M.STRIDE, size // M.STRIDE)
    assert torch.isfinite(out).all()


def test_input_side_not_multiple_of_32_is_refused():
    net = M.build_model(68, head_width=8).eval()
    with pytest.raises(AssertionError, match="multiple of 32"):
        net(torch.rand(1, 1, 48, 48))
    with pytest.raises(AssertionError, match=r"\(N, 1, S, S\)"):
        net(torch.rand(1, 3, 64, 64))


def test_init_kaiming_convs_small_final_layer_and_live_features():
    net = M.build_model(68, head_width=32)
    conv = net.backbone[4][0].conv1  # layer1, block 0
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.15)
    assert net.final.weight.std().item() < 2e-3
    assert torch.all(net.final.bias == 0)
    net.eval()
    with torch.no_grad():
        feats = net.head(net.backbone(torch.rand(4, 1, 64, 64)))
    # ReLU features neither dead nor exploding at init: the head sees a signal from the input.
    assert 0.05 < (feats > 0).float().mean().item() < 0.95
    assert 0.01 < feats.std().item() < 100


def test_bce_bias_starts_at_the_target_prior():
    prior = 0.02
    net = M.build_model(68, head_width=16, prior=prior).eval()
    assert net.final.bias[0].item() == pytest.approx(math.log(prior / (1 - prior)))
    with torch.no_grad():
        heat = M.outputs_to_heatmaps(net(torch.rand(2, 1, 64, 64)), "bce")
    assert heat.mean().item() == pytest.approx(prior, rel=0.05)


def _fake_imagenet(weights=None):
    """What torchvision would return with the weights downloaded: a ResNet18 with a known RGB stem."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    net = resnet18(weights=None)
    with torch.no_grad():
        net.conv1.weight[:, 0] = 1.0
        net.conv1.weight[:, 1] = 2.0
        net.conv1.weight[:, 2] = 6.0
    return net


def test_pretrained_stem_is_rgb_average_times_three_and_backbone_kept(monkeypatch):
    monkeypatch.setattr(M, "resnet18", lambda weights=None: _fake_imagenet() if weights else _real_resnet18())
    net = M.build_model(68, head_width=16, pretrained=True)
    assert net.backbone[0].weight.shape == (64, 1, 7, 7)
    assert torch.allclose(net.backbone[0].weight, torch.full((64, 1, 7, 7), 9.0))
    ref = _fake_imagenet()
    assert torch.equal(net.backbone[4][0].conv1.weight, ref.layer1[0].conv1.weight)  # not re-initialised


def test_resnet18_matches_torchvision_draw_for_draw():
    """facemarks' torchvision-free ResNet18: for the same seed, the same parameters, buffers and names as
    torchvision's resnet18(weights=None), the same RNG state afterwards, and the same features."""
    torch.manual_seed(7)
    ours = M.ResNet18()
    after_ours = torch.rand(3)
    torch.manual_seed(7)
    ref = _real_resnet18()
    assert torch.equal(after_ours, torch.rand(3))
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 64, 64)
    stem = lambda n: n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x))))))))  # noqa: E731
    with torch.no_grad():
        assert torch.equal(stem(ours.eval()), stem(ref.eval()))


def test_load_model_restores_the_saved_network(tmp_path):
    torch.manual_seed(3)
    net = M.build_model(68, head_width=16, dropout=0.1)
    with torch.no_grad():
        net(torch.rand(4, 1, 64, 64))  # BatchNorm running statistics move away from their init
    torch.save(net.state_dict(), tmp_path / "model.pt")
    loaded = M.load_model(tmp_path / "model.pt")
    saved, got = net.state_dict(), loaded.state_dict()
    assert list(saved) == list(got) and all(torch.equal(saved[k], got[k]) for k in saved)
    assert not loaded.training and all(p.device.type == "cpu" for p in loaded.parameters())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))


def _real_resnet18():
    from torchvision.models import resnet18

    return resnet18(weights=None)


def test_pretrained_offline_warns_once_and_trains_from_scratch(monkeypatch, caplog):
    def offline(weights=None):
        if weights is not None:
            raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")
        return _real_resnet18()

    monkeypatch.setattr(M, "resnet18", offline)
    with caplog.at_level(logging.WARNING, logger="facemarks.training.model"):
        net = M.build_model(68, head_width=16, pretrained=True)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "unavailable" in lines[0] and "from scratch" in lines[0]
    assert net.backbone[0].weight.shape == (64, 1, 7, 7)


@pytest.mark.parametrize("loss", M.LOSSES)
def test_loss_is_masked_per_keypoint(loss):
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(2, 5, 8, 8, generator=g, requires_grad=True)
    targets = torch.rand(2, 5, 8, 8, generator=g)
    weights = torch.ones(2, 5)
    weights[0, 3] = 0.0
    weights[1, 0] = 0.0
    value = M.heatmap_loss(outputs, targets, weights, loss)
    value.backward()
    assert torch.all(outputs.grad[0, 3] == 0) and torch.all(outputs.grad[1, 0] == 0)
    assert torch.all(outputs.grad[0, 0] != 0) and torch.all(outputs.grad[1, 3] != 0)
    # a masked map may hold anything: the loss does not change
    changed = outputs.detach().clone()
    changed[0, 3] += 100.0
    assert M.heatmap_loss(changed, targets, weights, loss).item() == pytest.approx(value.item(), rel=1e-6)


def test_mse_loss_value_is_mean_over_visible_maps():
    outputs = torch.zeros(1, 2, 4, 4)
    targets = torch.zeros(1, 2, 4, 4)
    targets[0, 0] = 1.0  # squared error 1 on map 0
    targets[0, 1] = 3.0  # squared error 9 on map 1
    assert M.heatmap_loss(outputs, targets, torch.tensor([[1.0, 1.0]]), "mse").item() == pytest.approx(5.0)
    assert M.heatmap_loss(outputs, targets, torch.tensor([[1.0, 0.0]]), "mse").item() == pytest.approx(1.0)
    assert M.heatmap_loss(outputs, targets, torch.zeros(1, 2), "mse").item() == 0.0


def test_bce_loss_matches_torch_on_visible_maps():
    g = torch.Generator().manual_seed(3)
    outputs, targets = torch.randn(3, 4, 6, 6, generator=g), torch.rand(3, 4, 6, 6, generator=g)
    expect = nn.functional.binary_cross_entropy_with_logits(outputs, targets)
    assert M.heatmap_loss(outputs, targets, torch.ones(3, 4), "bce").item() == pytest.approx(expect.item(), rel=1e-5)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        M.heatmap_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1), "l1")
    with pytest.raises(ValueError, match="unknown loss"):
        M.outputs_to_heatmaps(torch.zeros(1), "l1")


def test_images_to_tensor_and_outputs_to_heatmaps():
    images = np.array([[[0, 255], [51, 102]]], np.uint8)
    t = M.images_to_tensor(images)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert torch.allclose(t[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    logits = torch.tensor([0.0, 2.0])
    assert torch.equal(M.outputs_to_heatmaps(logits, "mse"), logits)
    assert torch.allclose(M.outputs_to_heatmaps(logits, "bce"), torch.sigmoid(logits))


def _awing_by_hand(y: float, yhat: float) -> float:
    """Adaptive Wing (Wang, Bo and Fuxin 2019, eq. 7) for one pixel with the paper's omega=14, theta=0.5, epsilon=1,
    alpha=2.1, written out from the paper with the math module."""
    omega, theta, eps, alpha = 14.0, 0.5, 1.0, 2.1
    d, p = abs(y - yhat), alpha - y
    if d < theta:
        return omega * math.log(1 + (d / eps) ** p)
    a = omega * (1 / (1 + (theta / eps) ** p)) * p * (theta / eps) ** (p - 1) * (1 / eps)
    c = theta * a - omega * math.log(1 + (theta / eps) ** p)
    return a * d - c


def test_awing_loss_matches_the_paper_formula_computed_by_hand():
    # one 4x4 map: target peak 0.9 at (1, 1) and 0.3 at (1, 2) (both > 0.2: the mask M), 0.1 elsewhere
    y = torch.full((1, 1, 4, 4), 0.1)
    y[0, 0, 1, 1], y[0, 0, 1, 2] = 0.9, 0.3
    yhat = torch.zeros(1, 1, 4, 4)
    yhat[0, 0, 1, 1] = 0.2   # |d| = 0.7 >= theta: linear branch, weight W + 1 = 11
    yhat[0, 0, 1, 2] = 0.5   # |d| = 0.2 < theta: log branch, weight 11
    yhat[0, 0, 3, 3] = 1.0   # |d| = 0.9 >= theta at y = 0.1, outside the dilated mask: weight 1
    yhat[0, 0, 0, 0] = 0.1   # |d| = 0 : zero loss (inside the dilation of (1, 1): weight 11)
    # dilation of the mask {(1,1), (1,2)} by 3x3: rows 0-2, columns 0-3 -> 12 pixels weigh 11, the 4 of row 3 weigh 1
    weights = [[11.0] * 4] * 3 + [[1.0] * 4]
    expect = sum(weights[i][j] * _awing_by_hand(float(y[0, 0, i, j]), float(yhat[0, 0, i, j]))
                 for i in range(4) for j in range(4)) / 16
    # the two branches by hand at the chosen pixels (a check of the helper itself against the paper's numbers)
    assert _awing_by_hand(0.3, 0.5) == pytest.approx(14 * math.log(1 + 0.2 ** 1.8))
    assert _awing_by_hand(0.9, 0.9) == 0.0
    assert M.awing_weight_map(y)[0, 0].tolist() == weights
    got = M.heatmap_loss(yhat, y, torch.ones(1, 1), "awing")
    assert got.item() == pytest.approx(expect, rel=1e-6)
    per_pixel = M.awing_per_pixel(yhat, y)[0, 0]
    for i, j in [(1, 1), (1, 2), (3, 3), (0, 0), (2, 2)]:
        assert per_pixel[i, j].item() == pytest.approx(_awing_by_hand(float(y[0, 0, i, j]), float(yhat[0, 0, i, j])),
                                                       rel=1e-6, abs=1e-9), (i, j)


def test_awing_branches_meet_at_theta_and_the_gradient_is_finite():
    y = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 3, 1, 1)
    below = M.awing_per_pixel(y - (0.5 - 1e-6), y)
    above = M.awing_per_pixel(y - (0.5 + 1e-6), y)
    assert torch.allclose(below, above, atol=1e-4)  # continuous at |d| = theta (A and C are chosen for it)
    # gradient: finite at d = 0 (targets hit exactly), at theta, far away, on a real map with the weight map
    g = torch.Generator().manual_seed(1)
    targets = torch.rand(2, 3, 8, 8, generator=g)
    outputs = targets.clone()
    outputs[0, 0, :4] += 0.5
    outputs[1, 2] += torch.randn(8, 8, generator=g) * 5
    outputs.requires_grad_(True)
    M.heatmap_loss(outputs, targets, torch.ones(2, 3), "awing").backward()
    assert torch.isfinite(outputs.grad).all()
    assert torch.all(outputs.grad[0, 1] == 0)  # exact targets: zero gradient, not NaN
    assert torch.all(outputs.grad[1, 2] != 0)


def test_awing_outputs_are_heatmaps_as_is():
    raw = torch.tensor([-0.2, 0.4, 1.3])
    assert torch.equal(M.outputs_to_heatmaps(raw, "awing"), raw)
