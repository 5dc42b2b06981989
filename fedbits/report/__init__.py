"""Reports on finished runs: ``report.md`` with plots for one run, a table for several.

Everything reads the run directory the runtime wrote (config.toml, metrics.jsonl,
ledger.jsonl) and nothing else, so a report can be made long after the run, on another
machine, without the model.
"""

from fedbits.report.compare import COMPARE_METRICS, compare_runs
from fedbits.report.fmt import format_bytes
from fedbits.report.markdown import write_report
from fedbits.report.run import EVAL_METRICS, Run, load_run

__all__ = [
    "COMPARE_METRICS",
    "EVAL_METRICS",
    "Run",
    "compare_runs",
    "format_bytes",
    "load_run",
    "write_report",
]
