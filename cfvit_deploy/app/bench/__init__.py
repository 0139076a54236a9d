"""`cfvit bench`: latency, throughput and per-stage cost of the gated pipeline next to the plain ViT.

Modules, one concern each: :mod:`.schema` (cells, rows, results and their JSON/CSV), :mod:`.plan`
(argument checks, cells, variants, input pool), :mod:`.worker` (timing loop, one cell, per-cell
process isolation), :mod:`.machine` (machine description, GEMM peak, load of other processes),
:mod:`.results` (rows, speedups, table), :mod:`.plots` (latency and throughput plots),
:mod:`.timing` (the timing loop and the η for a fine fraction), :mod:`.torch_cells` (the only one importing torch),
:mod:`.runner` (:func:`run_bench`).
"""

from .plots import plot
from .results import render_table
from .runner import run_bench
from .schema import ROW_FIELDS, BenchResult, BenchRow, Cell, NothingMeasuredError

__all__ = ["run_bench", "render_table", "plot", "BenchResult", "BenchRow", "Cell", "ROW_FIELDS", "NothingMeasuredError"]
