"""A-Eval's data-usage protocols 2-4 (DESIGN §7) as plans of training rounds.

- ``pseudo_label``: teacher on the labelled set, pseudo-labels for the unlabelled pool, retrain.
- ``multimodal``: AMOS CT, MR or CT+MR (per-image z-score whenever MR is present).
- ``joint``: FLARE22+AMOS+TotalSegmentator, then WORD completed by that model, then the unlabelled pool; or
  one round on every labelled set with the marginal partial-label loss.

Each protocol module turns a config into a :class:`ProtocolPlan`; :mod:`aeval.protocols.rounds` runs plans
(content-keyed, resumable) and :mod:`aeval.protocols.run` is the entry point (one protocol, or Table 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ProtocolPlan", "PseudoLabelled", "Round"]


@dataclass(frozen=True)
class PseudoLabelled:
    """A dataset labelled by the model of round ``teacher`` (0-based); ``mode`` is ``all`` (an unlabelled
    pool) or ``fill_missing`` (a partially annotated set), see :mod:`aeval.protocols.pseudo_label`."""

    source: str
    mode: str
    teacher: int


@dataclass(frozen=True)
class Round:
    """One training run: its datasets and the config values it sets (dotted keys)."""

    name: str
    train_sets: tuple[str | PseudoLabelled, ...]
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass
class ProtocolPlan:
    """What a protocol trains (its rounds) and how its cells are keyed (protocol, train) and tested."""

    protocol: str
    train: str
    rounds: list[Round]
    test_sets: list[str]
