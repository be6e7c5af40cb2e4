"""The report: the paper's tables and figures from result cells, one module per job.

- :mod:`.cells`: cells as the report reads them (names, orders, a CSV's rows).
- :mod:`.tables`: Table 3 / Table 9 per model, the model-size and per-organ tables (Markdown, LaTeX, CSV).
- :mod:`.figures`: heatmaps, per-case box plots, the model-size chart.
- :mod:`.paper`: the paper's published cells beside ours.
- :mod:`.build`: one report folder from a set of cells (what ``aeval-report`` and the grid write).
"""

__all__ = ["build", "cells", "figures", "paper", "tables"]
