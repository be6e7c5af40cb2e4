"""Protocol 3 (multi-modal AMOS): one model on AMOS CT, MR or CT+MR.

``protocol.modality=ct|mr|ct_mr`` picks the training sets; the plan over their union normalises per image (z-score)
whenever MR is present (aeval.data.planner). Cells are keyed ``multimodal / amos_{modality}``, and AMOS MR
validation joins the test sets.
"""

from __future__ import annotations

from omegaconf import DictConfig

from aeval.protocols import ProtocolPlan, Round


def plan(cfg: DictConfig) -> ProtocolPlan:
    """One round on the datasets of ``protocol.modality``."""
    protocol = cfg.protocol
    modality = str(protocol.modality)
    if modality not in protocol.datasets:
        raise ValueError(f"unknown modality {modality!r}; known: {', '.join(protocol.datasets)}")
    datasets = tuple(str(name) for name in protocol.datasets[modality])
    return ProtocolPlan(protocol.name, f"amos_{modality}", [Round(modality, datasets)],
                        [str(t) for t in protocol.test_sets])
