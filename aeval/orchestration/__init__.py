"""Orchestration above the stages: the grid's rows as jobs (:mod:`.grid`) and what happens when a multirun of
them ends (:mod:`.multirun`). Protocol rounds live in :mod:`aeval.protocols`."""

__all__ = ["grid", "multirun"]
