"""Datasets: registry, raw-layout converters, synthetic A-Eval-mini, planning, preprocessing, loading."""
