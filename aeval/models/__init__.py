"""Networks (STU-Net) and loading of released checkpoints.

Names are imported on first use, so that scripts that need only the network do not import the checkpoint
loader's dependencies.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"STUNET_SIZES": "stunet", "STUNet": "stunet", "build_stunet": "stunet",
            "LoadReport": "pretrained", "load_pretrained": "pretrained"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
