"""Hydra configs shipped inside the package (found as ``pkg://aeval/conf``, so wheel installs work)."""
