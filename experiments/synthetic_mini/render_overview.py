"""Write the synthetic A-Eval-mini and its overview picture (``experiments/synthetic_mini/overview.png``).

    PYTHONPATH=. .venv/bin/python experiments/synthetic_mini/render_overview.py /tmp/mini_raw \\
        [--png experiments/synthetic_mini/overview.png]

The mini's settings are ``aeval/conf/mini/default.yaml``'s (what ``aeval-prepare synthetic=true`` writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from aeval.data.synthetic import generate_mini, render_overview


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_root", type=Path)
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("overview.png"))
    args = parser.parse_args()
    with initialize_config_module("aeval.conf", version_base=None):
        cfg = compose("prepare", overrides=["synthetic=true"])
    summary = generate_mini(args.raw_root, OmegaConf.to_container(cfg.mini, resolve=True))
    print(f"wrote {summary['files']} files under {summary['raw_root']} in {summary['seconds']} s")
    print(f"overview: {render_overview(args.raw_root, args.png)}")


if __name__ == "__main__":
    main()
