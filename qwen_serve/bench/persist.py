"""One finished run to disk: ``result.json``, ``requests.jsonl``/``.csv`` and (optionally) the report.

:func:`save_run` is what ``bench run`` does after :func:`~qwen_serve.bench.run.execute`, and what every
sweep point and compare round does for its own directory. It returns the ``result.json`` object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen_serve.bench.ceiling import load_cached
from qwen_serve.bench.report import render, write_records, write_result
from qwen_serve.bench.result import build_result
from qwen_serve.bench.run import RunOutcome

__all__ = ["save_run"]


def save_run(outcome: RunOutcome, directory: str | Path, *, report: bool = True,
             title: str = "qwen-serve bench run") -> dict[str, Any]:
    """Write the run's files into ``directory`` (created) and return its result."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    result = build_result(outcome, ceiling=load_cached())
    write_result(out, result)
    write_records(out, [*outcome.warmup, *outcome.records])
    if report:
        rows = [r.to_row() for r in outcome.records]
        render(out, [result], {result["label"]: rows}, title=title)
    return result
