"""The marginal Dice+CE loss: MONAI's DiceCELoss when every class is annotated, hand-computed set
probabilities when not, and no gradient for distinctions a set-valued label does not make."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from aeval.data.label_codes import LABEL_SETS
from aeval.labels import annotated_classes
from aeval.marginal_loss import MarginalDiceCELoss
from aeval.module import STUNetModule

C = 14
ADRENAL_SET = next(code for code, classes in LABEL_SETS.items() if classes == frozenset({7, 8}))
WORD_ANNOTATED = torch.tensor([c == 0 or c in annotated_classes("word") for c in range(C)])


@pytest.fixture(autouse=True)
def seeded():
    """Fixed draws; one thread (tiny tensors on a shared 2-core machine run faster without OpenMP)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def monai_dice_ce() -> DiceCELoss:
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5,
                      smooth_dr=1e-5)


@pytest.mark.parametrize("present", [list(range(C)), [0, 1, 3, 9, 13]])
def test_equals_monai_dice_ce_when_every_class_is_annotated(present):
    logits = torch.randn(2, C, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor(present)[torch.randint(len(present), (2, 1, 6, 5, 4))]
    ours = MarginalDiceCELoss()(logits, target, torch.ones(2, C, dtype=torch.bool))
    (ours_grad,) = torch.autograd.grad(ours, logits)
    reference = monai_dice_ce()(logits, target.double())
    (reference_grad,) = torch.autograd.grad(reference, logits)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(ours_grad, reference_grad, atol=1e-12)


def test_partial_targets_against_hand_computed_terms():
    """One WORD-like sample (no aorta/IVC; a merged adrenal voxel) and three voxels: background, liver,
    adrenal. CE is -log of the target set's probability; Dice has the classes whose voxels all decide them
    (every class but aorta, IVC and the adrenals) and one adrenal-set channel."""
    logits = torch.randn(1, C, 3, 1, 1, dtype=torch.float64)
    codes = torch.tensor([0, 1, ADRENAL_SET]).view(1, 1, 3, 1, 1)
    loss = MarginalDiceCELoss(smooth_nr=0.0, smooth_dr=1e-12)(logits, codes, WORD_ANNOTATED[None])
    p = torch.softmax(logits[0, :, :, 0, 0], 0)  # (C, 3)
    ce = -(torch.log(p[[0, 5, 6], 0].sum()) + torch.log(p[1, 1]) + torch.log(p[[7, 8], 2].sum())) / 3
    channels = [1 - 2 * p[1, 1] / (p[1].sum() + 1)]
    channels += [torch.tensor(1.0, dtype=torch.float64) for k in (2, 3, 4, 9, 10, 11, 12, 13)]  # no truth
    channels += [1 - 2 * p[[7, 8], 2].sum() / (p[[7, 8]].sum() + 1)]
    expected = ce + torch.stack(channels).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def lse_preserving(p: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Per voxel, the logit direction (p_j, -p_i) on classes i, j: it changes their ratio and nothing else."""
    direction = torch.zeros_like(p)
    direction[:, i], direction[:, j] = p[:, j], -p[:, i]
    return direction


def test_no_gradient_inside_a_set_valued_label():
    """A WORD sample with adrenal-set voxels and a fully labelled sample: on the WORD sample the loss sees
    classes 7/8 only through p7 + p8 and 0/5/6 only through p0 + p5 + p6, so moving logits against each other
    inside a set (keeping the set's logsumexp) changes nothing: d loss / d (z7 - z8) = 0 there."""
    shape = (2, C, 6, 6, 4)
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, C, (2, 1, 6, 6, 4))
    codes[0] = torch.tensor([0, 1, 2, 3, 11, ADRENAL_SET])[torch.randint(6, (1, 6, 6, 4))]
    annotated = torch.stack([WORD_ANNOTATED, torch.ones(C, dtype=torch.bool)])
    loss_fn = MarginalDiceCELoss()
    loss = loss_fn(logits, codes, annotated)
    (grad,) = torch.autograd.grad(loss, logits)
    p = torch.softmax(logits.detach(), 1)
    word = slice(0, 1)
    for i, j in ((7, 8), (0, 5), (5, 6)):
        along = (grad * lse_preserving(p, i, j))[word].sum(1)
        assert along.abs().max() < 1e-12, (i, j)
    assert (grad * lse_preserving(p, 7, 8))[1].sum(0).abs().max() > 1e-6  # fully labelled: it does
    # a finite move of z7 against z8 on the WORD sample keeping logsumexp(z7, z8): same loss
    moved = logits.detach().clone()
    z7, z8 = moved[0, 7].clone(), moved[0, 8].clone()
    total = torch.logaddexp(z7, z8)
    share = torch.rand_like(z7) * 0.9 + 0.05  # the new p7 / (p7 + p8)
    moved[0, 7], moved[0, 8] = total + torch.log(share), total + torch.log1p(-share)
    assert torch.allclose(torch.logaddexp(moved[0, 7], moved[0, 8]), total)
    assert not torch.allclose(moved[0, 7] - moved[0, 8], z7 - z8)
    assert loss_fn(moved, codes, annotated).item() == pytest.approx(loss.item(), rel=1e-12)


def test_equal_logits_inside_the_set_move_together():
    """With z7 = z8 everywhere the literal statement holds: d loss / d(z7 - z8) = (g7 - g8) / 2 = 0 on the
    sample with merged adrenal voxels; plain Dice+CE with the adrenal as class 7 would separate them."""
    logits = torch.randn(1, C, 5, 5, 5, dtype=torch.float64)
    logits[:, 8] = logits[:, 7]
    logits.requires_grad_(True)
    codes = torch.tensor([0, 1, 3, ADRENAL_SET])[torch.randint(4, (1, 1, 5, 5, 5))]
    (grad,) = torch.autograd.grad(MarginalDiceCELoss()(logits, codes, WORD_ANNOTATED[None]), logits)
    assert (grad[:, 7] - grad[:, 8]).abs().max() < 1e-14
    hard = codes.masked_fill(codes == ADRENAL_SET, 7).double()
    (plain,) = torch.autograd.grad(monai_dice_ce()(logits, hard), logits)
    assert (plain[:, 7] - plain[:, 8]).abs().max() > 1e-6


def test_module_trains_with_set_valued_targets():
    """The LightningModule variant: one deep-supervised step on set-valued codes gives a finite loss equal to
    the weighted marginal losses, and gradients reach the network."""
    plan = {"pool_op_kernel_sizes": [[2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]}
    module = STUNetModule(model={"size": "tiny"}, plan=plan, max_epochs=1,
                          loss={"_target_": "aeval.marginal_loss.MarginalDiceCELoss"})
    image = torch.randn(2, 1, 16, 16, 16)
    codes = torch.randint(0, C, (2, 1, 16, 16, 16))
    codes[0, 0, :4] = ADRENAL_SET
    batch = {"image": image, "target": codes, "annotated": torch.stack([WORD_ANNOTATED, torch.ones(C, dtype=bool)])}
    outputs = module.net(image)
    targets = module._targets(batch, outputs)
    module._annotated = batch["annotated"]
    expected = sum(w * module.loss(o.float(), t, batch["annotated"])
                   for w, o, t in zip(module.ds_weights, outputs, targets, strict=False) if w)
    loss = module.compute_loss(outputs, targets)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())


def test_loss_marginal_is_one_switch_for_the_loss_and_the_label_codes():
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        plain, marginal = (compose("train", overrides=o) for o in ([], ["loss=marginal"]))
    assert plain.loss._target_ == "monai.losses.DiceCELoss" and plain.data.target_codes is False
    assert marginal.loss._target_ == "aeval.marginal_loss.MarginalDiceCELoss" and marginal.data.target_codes is True
