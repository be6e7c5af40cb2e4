"""The marginal Dice+CE loss for partially labelled training: ``loss=marginal`` (which also makes the batches carry
label codes, ``data.target_codes=true``), as the joint protocol's ``partial_labels=marginal`` round does.

Every voxel's target is a SET of FLARE22 classes: a single class where the source labels it, the set a
merged label stands for (WORD's adrenal = {right, left adrenal}), and for unlabelled voxels the background
set of the voxel's dataset = background plus every class that dataset does not annotate (WORD: aorta, IVC).
The network still predicts the 14 FLARE22 classes; the loss only asks for what the label knows:

- CE: ``-log q`` with ``q`` = the summed softmax probability of the target set (``logsumexp`` of the set's
  logits minus ``logsumexp`` of all logits).
- Dice (batch Dice, no background, as nnU-Net): one channel per FLARE22 class over the samples in which every
  voxel's set decides whether it is that class (WORD samples leave out aorta and IVC, and the adrenals where
  a merged adrenal voxel is present), plus one channel per merged label over the samples that contain it
  (prediction = the set's summed probability).

With every class annotated this is exactly MONAI's ``DiceCELoss(include_background=False, to_onehot_y=True,
softmax=True, batch=True)``. Inside a set the loss sees the classes only through their summed probability,
so it never pushes one member against another (the gradient along the logit directions that keep the
set's ``logsumexp`` fixed is zero).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from aeval.data.label_codes import LABEL_SETS, NUM_CLASSES


class MarginalDiceCELoss(nn.Module):
    """Dice + CE against set-valued targets (see the module docstring).

    ``label_sets`` maps each label code to the classes it stands for (codes ``< num_classes`` are single
    classes; :data:`aeval.data.label_codes.LABEL_SETS` by default). Code 0 means "unlabelled": its set is the
    sample's background set, background plus the classes its ``annotated`` row marks False.
    """

    uses_annotations = True  # the LightningModule passes each sample's annotated classes

    def __init__(self, label_sets: Mapping[int, Iterable[int]] = LABEL_SETS, num_classes: int = NUM_CLASSES,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0) -> None:
        super().__init__()
        n_codes = max(label_sets) + 1
        table = torch.zeros(n_codes, num_classes, dtype=torch.bool)
        for code, classes in label_sets.items():
            table[code, list(classes)] = True
        if any(set(label_sets.get(c, {c})) != {c} for c in range(num_classes)):
            raise ValueError("codes below num_classes must stand for their own class")
        self.register_buffer("table", table, persistent=False)
        self.merged_codes = [c for c in range(num_classes, n_codes) if table[c].sum() > 1]
        self.num_classes = num_classes
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def membership(self, codes: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) bool: class k belongs to the voxel's target set."""
        codes = codes.long()
        members = self.table[codes].movedim(-1, 1)
        background = ~annotated.bool()
        background[:, 0] = True
        view = (codes.shape[0], self.num_classes) + (1,) * (codes.dim() - 1)
        return torch.where((codes == 0).unsqueeze(1), background.view(view), members)

    def forward(self, logits: torch.Tensor, codes: torch.Tensor, annotated: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``logits`` (B, C, *spatial); ``codes`` (B, 1, *spatial) or (B, *spatial) label codes;
        ``annotated`` (B, C) bool, the classes each sample's dataset annotates (None: all of them)."""
        if codes.dim() == logits.dim():
            codes = codes[:, 0]
        if annotated is None:
            annotated = torch.ones(logits.shape[0], self.num_classes, dtype=torch.bool, device=logits.device)
        members = self.membership(codes, annotated.to(logits.device))
        log_all = torch.logsumexp(logits, dim=1)
        log_set = torch.logsumexp(logits.masked_fill(~members, float("-inf")), dim=1)
        ce = (log_all - log_set).mean()
        dice = self._dice(torch.softmax(logits, dim=1), members, codes)
        return self.lambda_dice * dice + self.lambda_ce * ce

    def _dice(self, probs: torch.Tensor, members: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(1, codes.dim()))
        set_size = members.sum(1)
        single = members & (set_size == 1).unsqueeze(1)
        ambiguous = (members & (set_size > 1).unsqueeze(1)).flatten(2).any(-1)  # (B, C)
        included = ~ambiguous[:, 1:].T                                           # (C-1, B)
        preds = probs[:, 1:].movedim(1, 0)                                       # (C-1, B, *spatial)
        targets = single[:, 1:].movedim(1, 0).to(probs.dtype)
        weights = included.to(probs.dtype).view(included.shape + (1,) * len(spatial))
        channels = [((weights * preds * targets).flatten(1).sum(1), (weights * preds).flatten(1).sum(1),
                     (weights * targets).flatten(1).sum(1), included.any(1))]
        for code in self.merged_codes:
            in_set = self.table[code].to(members.device)
            overlap = (members & in_set.view(1, -1, *(1,) * len(spatial))).any(1)
            inside = ~(members & ~in_set.view(1, -1, *(1,) * len(spatial))).any(1)
            present = (codes == code).flatten(1).any(1)
            partial = (overlap & ~inside).flatten(1).any(1)
            use = (present & ~partial).to(probs.dtype).view(-1, *(1,) * len(spatial))
            pred = probs[:, in_set].sum(1)
            target = (overlap & inside).to(probs.dtype)
            channels.append(((use * pred * target).sum().view(1), (use * pred).sum().view(1),
                             (use * target).sum().view(1), (use.sum() > 0).view(1)))
        intersection, predicted, truth, valid = (torch.cat(parts) for parts in zip(*channels, strict=True))
        loss = 1 - (2 * intersection + self.smooth_nr) / (predicted + truth + self.smooth_dr)
        return loss[valid].mean() if valid.any() else probs.sum() * 0
