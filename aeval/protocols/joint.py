"""Protocol 4 (joint training), the paper's rounds or one round with the marginal partial-label loss.

``partial_labels=none`` (the paper): round 1 on the fully annotated sets in FLARE22 space
(FLARE22, AMOS CT and MR, TotalSegmentator) -> its model completes the partially annotated sets (WORD: aorta
and IVC filled in WORD's background, WORD's merged adrenal split into right and left) -> round 2 adds them ->
its model pseudo-labels the unlabelled pool -> round 3 on everything. Without ``fill_missing`` or
``unlabeled`` the corresponding round is left out.

``partial_labels=marginal``: one round on every labelled set at once, no pseudo-labels; each voxel's target
is the set of classes its label stands for (aeval.marginal_loss). Cells are keyed
``joint_marginal / joint`` so both variants sit side by side in a report.
"""

from __future__ import annotations

from omegaconf import DictConfig

from aeval.protocols import ProtocolPlan, PseudoLabelled, Round

# What `loss=marginal` sets (aeval/conf/loss/marginal.yaml), applied to the round's config.
MARGINAL_SETTINGS = (("loss", {"_target_": "aeval.marginal_loss.MarginalDiceCELoss"}), ("data.target_codes", True))


def plan(cfg: DictConfig) -> ProtocolPlan:
    """Rounds of ``protocol=joint``: the paper's three rounds, or one round with the marginal loss."""
    protocol = cfg.protocol
    labelled = tuple(str(name) for name in protocol.labelled)
    partial = tuple(str(name) for name in protocol.get("fill_missing") or ())
    tests = [str(t) for t in protocol.test_sets]
    mode = str(protocol.get("partial_labels") or "none")
    if mode == "marginal":
        return ProtocolPlan(f"{protocol.name}_marginal", "joint", [Round("marginal", labelled + partial,
                                                                         MARGINAL_SETTINGS)], tests)
    if mode != "none":
        raise ValueError(f"unknown partial_labels {mode!r}; known: none, marginal")
    rounds = [Round("labelled", labelled)]
    current = labelled
    if partial:
        current = current + tuple(PseudoLabelled(name, "fill_missing", len(rounds) - 1) for name in partial)
        rounds.append(Round("completed", current))
    if protocol.get("unlabeled"):
        current = current + (PseudoLabelled(str(protocol.unlabeled), "all", len(rounds) - 1),)
        rounds.append(Round("pseudo_labelled", current))
    return ProtocolPlan(protocol.name, "joint", rounds, tests)
