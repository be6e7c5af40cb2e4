"""Evidence beyond the paper's one mean per cell, from the per-case tables of the cells on disk (nothing is
re-predicted): ``python -m aeval.report results=DIR evidence.ci=true compare=model ...``. One module per job:

* ``cases.csv`` (and ``cases.parquet`` with pyarrow): one tidy row per scored (run, test set, case, organ) with
  DSC, NSD (%), the metric mode and the empty flags.
* Bootstrap intervals for every cell mean and every row, column, CT and overall mean of the paper's grid
  (cases resampled within each test set, one draw per test set shared by every cell on it; :mod:`aeval.stats`).
* Paired comparisons of runs on the same cases: mean difference, paired bootstrap interval, Wilcoxon p, Holm
  over the family asked for; a table and a forest plot.
* Empty-case accounting: the share of both-empty pairs per cell (the rules score them 1) and, on request, the
  grid with those pairs dropped (TotalSegmentator's and Touchstone's rule) beside the published one.
* Rank-then-aggregate (FLARE, challengeR) with bootstrap rank stability, for model sizes and training sets.
* Worst-case galleries: the k worst cases of every off-diagonal cell as overlays, also to W&B when a run is on.
"""


from aeval.evidence.bootstrap import Bootstrap
from aeval.evidence.build import Evidence, EvidenceOptions, build_evidence, evidence_from_config
from aeval.evidence.cases import CASE_COLUMNS, RULES, CaseTable, load_case_table, write_case_table
from aeval.evidence.comparisons import Comparison, compare_runs, parse_selectors
from aeval.evidence.gallery import worst_case_gallery, worst_cases
from aeval.evidence.ranks import rank_studies, rank_study
from aeval.evidence.tables import fmt_interval, grid_cells, interval_tables

__all__ = ["CASE_COLUMNS", "RULES", "Bootstrap", "CaseTable", "Comparison", "Evidence", "EvidenceOptions",
           "build_evidence", "compare_runs", "evidence_from_config", "fmt_interval", "grid_cells", "interval_tables",
           "load_case_table", "parse_selectors", "rank_studies", "rank_study", "worst_case_gallery", "worst_cases",
           "write_case_table"]
