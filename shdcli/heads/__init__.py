"""`shd inspect-heads`: how alike a model's heads attend, and what squeezing them to K heads costs.

  measure.py  the numbers: per layer, head-by-head JS similarity, redundancy, squeeze weights and errors,
              into a plain HeadsReport (inspect_heads)
  run.py      the command's loading: a model (HF folder, .gguf, pkg://) and its samples, then measure
              (run_inspect)
  report.py   the terminal (rich table, heat strip) and the files (heads.json, the PNGs of plots.py)
  plots.py    the PNGs (matplotlib: the `plot` extra)

Each reads only the modules above it in this list. The package imports attention/, models/, tasks/ and
the core modules; the CLI imports it.
"""

from shdcli.heads.measure import (
    MODES,
    HeadsReport,
    default_heads,
    gram_error,
    groups_per_layer_grouper,
    inspect_heads,
    pairwise_js,
    redundancy_score,
)
from shdcli.heads.report import heads_table, heat_strip, table_rows, write_outputs
from shdcli.heads.run import GROUPINGS, InspectOptions, run_inspect, text_batches

__all__ = ["GROUPINGS", "MODES", "HeadsReport", "InspectOptions", "default_heads", "gram_error",
           "groups_per_layer_grouper", "heads_table", "heat_strip", "inspect_heads", "pairwise_js",
           "redundancy_score", "run_inspect", "table_rows", "text_batches", "write_outputs"]
