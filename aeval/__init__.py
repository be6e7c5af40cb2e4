"""aeval: the A-Eval benchmark (cross-dataset abdominal multi-organ segmentation) with STU-Net."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${join:${train_sets}}` names runs trained on several datasets, e.g. flare22+amos_ct+totalseg.
if not OmegaConf.has_resolver("join"):
    OmegaConf.register_new_resolver("join", lambda items: "+".join(map(str, items)))
