"""The LightningModule's pieces against independent references: the Dice+CE loss with deep-supervision
weights (numpy), the poly learning rate, the per-organ validation Dice (numpy), the CPU memory format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aeval.module import (
    PolyLR,
    STUNetModule,
    deep_supervision_weights,
    dice_from_counts,
    organ_dice_counts,
    overlay_panels,
    poly_factor,
)

POOLS_16 = [[2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]  # the plan's pools for a 16^3 patch


def _module(**kwargs) -> STUNetModule:
    torch.manual_seed(0)
    return STUNetModule(model={"size": "tiny"}, plan={"pool_op_kernel_sizes": POOLS_16}, **kwargs)


def _reference_dice_ce(logits: np.ndarray, target: np.ndarray, smooth: float = 1e-5) -> float:
    """nnU-Net's loss written out: batch soft Dice over the foreground classes (1 - mean Dice) + mean CE."""
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    p = np.exp(log_p)
    onehot = np.stack([target == c for c in range(logits.shape[1])], 1).astype(np.float64)
    dice = []
    for c in range(1, logits.shape[1]):
        inter = (p[:, c] * onehot[:, c]).sum()
        denom = p[:, c].sum() + onehot[:, c].sum()
        dice.append((2 * inter + smooth) / (denom + smooth))
    ce = -(log_p * onehot).sum(1).mean()
    return float(1 - np.mean(dice) + ce)


def test_deep_supervision_weights_halve_and_switch_off_the_lowest():
    expected = np.array([1, 1 / 2, 1 / 4, 1 / 8, 0]) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    np.testing.assert_allclose(deep_supervision_weights(5), expected, rtol=1e-12)
    assert deep_supervision_weights(1) == [1.0]
    np.testing.assert_allclose(_module().ds_weights, expected, rtol=1e-12)


def test_loss_is_weighted_dice_plus_ce_over_the_deep_supervision_outputs():
    module = _module()
    rng = np.random.default_rng(3)
    shapes = [(16, 16, 16), (8, 8, 8), (4, 4, 4), (4, 4, 4), (4, 4, 4)]
    logits = [rng.normal(0, 2, (2, 14, *s)) for s in shapes]
    targets = [rng.integers(0, 14, (2, 1, *s)) for s in shapes]
    targets[0][:, :, :4] = 0  # some structure: not every class everywhere
    got = module.compute_loss([torch.tensor(x, dtype=torch.float32) for x in logits],
                              [torch.tensor(t) for t in targets])
    weights = np.array([1, 1 / 2, 1 / 4, 1 / 8, 0]) / 1.875
    expected = sum(w * _reference_dice_ce(x, t[:, 0]) for w, x, t in zip(weights, logits, targets, strict=True))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # the switched-off head contributes nothing, whatever its logits
    logits[-1] *= 100
    again = module.compute_loss([torch.tensor(x, dtype=torch.float32) for x in logits],
                                [torch.tensor(t) for t in targets])
    assert float(again) == pytest.approx(float(got), rel=1e-6)


def test_poly_learning_rate_per_epoch():
    epochs, lr = 10, 0.01
    assert [poly_factor(e, epochs) for e in range(epochs)] == pytest.approx(
        [(1 - e / epochs) ** 0.9 for e in range(epochs)], rel=1e-12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.99, nesterov=True)
    scheduler = PolyLR(optimizer, epochs)
    seen = []
    for _ in range(epochs + 2):  # two epochs past the end keep the last value
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr * (1 - min(e, epochs - 1) / epochs) ** 0.9 for e in range(epochs + 2)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[-1] > 0


def test_poly_scheduler_state_restores_the_rate_of_its_epoch():
    """Restoring re-applies the closed-form rate, also when the run is resumed with a longer schedule."""
    def fresh(max_epochs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.99)
        return optimizer, PolyLR(optimizer, max_epochs)

    optimizer, scheduler = fresh(4)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert "max_epochs" not in state and state["last_epoch"] == 3
    same_optimizer, same = fresh(4)
    same.load_state_dict(state)
    assert same_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 3 / 4) ** 0.9, rel=1e-12)
    longer_optimizer, longer = fresh(8)
    longer_optimizer.param_groups[0]["lr"] = 123.0  # a stale rate from an optimizer checkpoint
    longer.load_state_dict(state)
    assert longer_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 3 / 8) ** 0.9, rel=1e-12)


def test_configured_optimizer_is_sgd_nesterov_with_poly_schedule():
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        optim = compose("train", overrides=["optim.lr=0.02", "optim.weight_decay=1e-3"]).optim
    module = _module(optim=OmegaConf.to_container(optim), max_epochs=5)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD) and group["nesterov"] and group["momentum"] == 0.99
    assert group["weight_decay"] == 1e-3 and group["lr"] == 0.02
    assert isinstance(scheduler, PolyLR) and scheduler.max_epochs == 5
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_organ_dice_against_numpy():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 6, (3, 10, 9, 8))
    prediction = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 8, target.shape))
    target[target == 4] = 0  # organ 4 absent from the ground truth (but predicted): not scored
    prediction[prediction == 2] = 0  # organ 2 never predicted: Dice 0
    counts = organ_dice_counts(torch.tensor(prediction), torch.tensor(target), num_classes=14)
    assert counts.shape == (3, 13)
    dice = dice_from_counts(counts).numpy()
    for c in range(1, 14):
        p, g = prediction == c, target == c
        if not g.any():
            assert np.isnan(dice[c - 1]), c
        else:
            assert dice[c - 1] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()), rel=1e-12), c
    assert dice[1] == 0 and np.isnan(dice[3])
    # counts add over batches: the Dice of two halves' summed counts is the Dice of the whole
    halves = organ_dice_counts(torch.tensor(prediction[:1]), torch.tensor(target[:1]), 14) + organ_dice_counts(
        torch.tensor(prediction[1:]), torch.tensor(target[1:]), 14)
    np.testing.assert_array_equal(halves.numpy(), counts.numpy())


def test_cpu_memory_format_is_channels_last_and_gives_the_same_output():
    module = _module()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = module.net(x)[0]
    module.setup("fit")  # no trainer: the CPU
    conv = module.net.conv_blocks_context[1][0].conv2.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    with torch.no_grad():
        out = module.net(module._input({"image": x}))[0]
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    off = _module(channels_last=False)
    off.setup("fit")
    assert off.net.conv_blocks_context[1][0].conv2.weight.is_contiguous()


def test_overlay_shows_image_labels_and_prediction_side_by_side():
    image = np.linspace(-1, 1, 20 * 12).reshape(20, 12)
    labels = np.zeros((20, 12), int)
    labels[5:10, 3:6] = 1
    picture = overlay_panels(image, labels, np.zeros_like(labels))
    assert picture.shape == (12, 60, 3) and picture.dtype == np.uint8
    gt_panel, prediction_panel = picture[:, 20:40], picture[:, 40:]
    assert (gt_panel != prediction_panel).any()  # the label tint shows in the middle panel only
    np.testing.assert_array_equal(prediction_panel, picture[:, :20])
