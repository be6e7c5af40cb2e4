"""``python -m aeval.grid`` / ``aeval-grid``: the A-Eval grid (train on each set, test on every set, report).

    aeval-grid model=stu_l trainer=gpu                         # every row in turn, in this process
    aeval-grid -m experiment=grid hydra/launcher=slurm         # one SLURM job per row; report at the end
    aeval-grid -m model=stu_s,stu_b,stu_l,stu_h                # the model-size study (Figure 3)
    aeval-grid experiment=protocols                            # Table 9: one row per protocol
"""

from __future__ import annotations

from aeval.entry import hydra_entry
from aeval.orchestration.grid import grid_job

main = hydra_entry("grid", grid_job)

if __name__ == "__main__":
    main()
