"""The data stages, one module per job.

- :mod:`.registry`: a dataset's raw layout and settings (``conf/dataset/*.yaml``).
- :mod:`.convert`: a raw download -> the unified layout (:mod:`aeval.dataset`); :mod:`.prepare` runs it for every
  configured dataset.
- :mod:`.synthetic`: the synthetic A-Eval-mini in every raw layout.
- :mod:`.planner`: fingerprint and plan (nnU-Net v2 style) -> :class:`aeval.plan.Plan`; :mod:`.intensity`: the CT
  foreground samples as nnU-Net draws them.
- :mod:`.preprocess` (with :mod:`.geometry`, :mod:`.label_codes`): the plan applied to a case; :mod:`.cache`:
  the preprocessing cache; :mod:`.restore`: the way back to the original geometry.
- :mod:`.augment`, :mod:`.datamodule`: training patches and their augmentation (Lightning DataModule).
- :mod:`.nnunet_plans`, :mod:`.nnunet_preprocess`, :mod:`.nnunet_export`: nnU-Net's own plans and preprocessing
  for official checkpoints, and unified datasets written as nnU-Net raw datasets.
"""

__all__ = ["augment", "cache", "convert", "datamodule", "geometry", "intensity", "label_codes", "nnunet_export",
           "nnunet_plans", "nnunet_preprocess", "planner", "prepare", "preprocess", "registry", "restore", "synthetic"]
