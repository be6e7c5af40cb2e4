"""aeval: the A-Eval benchmark (cross-dataset abdominal multi-organ segmentation) with STU-Net."""

from aeval.resolvers import register

__all__ = ["__version__"]
__version__ = "0.1.0"

register()
