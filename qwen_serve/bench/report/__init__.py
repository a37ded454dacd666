"""Report of a ``bench`` run: files (``result.json``, ``requests.jsonl``/``.csv``, ``sweep.json``), PNG plots
and a self-contained ``report.html``.

* ``bench run`` / ``bench sweep`` write the data files (:mod:`.files`), then call :func:`render` with the
  results (one per run or sweep point), the request rows per label and, for a sweep, its points.
* ``bench report DIR...`` calls :func:`render_from_dirs`, which re-renders one saved directory or
  overlays several.

:func:`render` and :func:`render_from_dirs` return the path of ``report.html``; they raise
:class:`OSError` on I/O failures and (``render_from_dirs``) :class:`FileNotFoundError` for a
directory with neither ``result.json`` nor ``sweep.json``, :class:`ValueError` for unreadable files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen_serve.bench.report.files import (
    JSONL_NAME,
    RESULT_NAME,
    SWEEP_NAME,
    load_result,
    load_rows,
    load_sweep,
    strict_json,
    write_records,
    write_result,
    write_sweep,
)
from qwen_serve.bench.report.html import write_html
from qwen_serve.bench.report.plots import (
    latency_cdfs,
    sweep_curve,
    sweep_curves,
    timeline,
    unique_labels,
    write_plots,
)

__all__ = [
    "DEFAULT_TITLE",
    "latency_cdfs",
    "load_result",
    "load_rows",
    "load_sweep",
    "render",
    "render_from_dirs",
    "strict_json",
    "sweep_curve",
    "sweep_curves",
    "timeline",
    "write_html",
    "write_plots",
    "write_records",
    "write_result",
    "write_sweep",
]

DEFAULT_TITLE = "qwen-serve bench report"

Rows = Sequence[Mapping[str, Any]]
Points = Sequence[Mapping[str, Any]]


def render(
    directory: str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]],
    rows_by_label: Mapping[str, Rows],
    sweep: Points | Mapping[str, Points] | None = None,
    title: str = DEFAULT_TITLE,
) -> Path:
    """Write the plots and ``report.html`` into ``directory``; return the HTML's path.

    ``results`` are the table columns (in order); ``rows_by_label`` the request rows keyed by the
    results' labels; ``sweep`` the sweep's points in load order (or label → points to overlay sweeps).
    """
    pngs = write_plots(directory, results, rows_by_label, sweep)
    return write_html(directory, results, pngs, title)


def _point_dirs(d: Path) -> dict[str, Path]:
    """Sub-directories of a sweep directory holding a point's ``result.json``, by the point's label."""
    out: dict[str, Path] = {}
    for sub in sorted(p for p in d.iterdir() if (p / RESULT_NAME).is_file()):
        label = load_result(sub).get("label")
        out.setdefault(str(label or sub.name), sub)
    return out


def _load_dir(d: Path) -> tuple[list[tuple[dict[str, Any], list[dict[str, Any]]]], list[dict[str, Any]] | None]:
    """``([(result, rows), ...], sweep points or None)`` for one saved directory."""
    sweep = load_sweep(d) if (d / SWEEP_NAME).is_file() else None
    if (d / RESULT_NAME).is_file():
        rows = load_rows(d) if (d / JSONL_NAME).is_file() else []
        return [(load_result(d), rows)], sweep
    if sweep is None:
        raise FileNotFoundError(f"{d}: neither {RESULT_NAME} nor {SWEEP_NAME} found")
    # A sweep directory alone: its points are the columns; a point's own sub-directory, when there is
    # one, supplies its timeseries and request rows.
    subs = _point_dirs(d)
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for point in sweep:
        sub = subs.get(str(point.get("label") or ""))
        if sub is None:
            runs.append((dict(point), []))
        else:
            runs.append((load_result(sub), load_rows(sub) if (sub / JSONL_NAME).is_file() else []))
    return runs, sweep


def render_from_dirs(
    out_dir: str | os.PathLike[str], dirs: Sequence[str | os.PathLike[str]], title: str | None = None
) -> Path:
    """Load each saved run directory (``result.json`` + ``requests.jsonl``, or ``sweep.json``) and write
    one report overlaying them into ``out_dir``; return the HTML's path.

    Each run is labelled by its ``label``, else its directory name (repeats made distinct). A
    directory with ``sweep.json`` contributes its points to the sweep curve (one curve per sweep
    directory).
    """
    paths = [Path(p) for p in dirs]
    if not paths:
        raise ValueError("render_from_dirs needs at least one directory")
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    base_labels: list[str] = []
    sweeps: dict[str, list[dict[str, Any]]] = {}
    dir_labels = unique_labels([p.resolve().name for p in paths])
    for d, dir_label in zip(paths, dir_labels):
        loaded, sweep = _load_dir(d)
        single = len(loaded) == 1
        for result, rows in loaded:
            runs.append((result, rows))
            base_labels.append(str(result.get("label") or (dir_label if single else "")))
        if sweep:
            name = str(loaded[0][0].get("label") or dir_label) if single else dir_label
            sweeps[name] = sweep
    labels = unique_labels(base_labels)
    results = [{**result, "label": label} for (result, _), label in zip(runs, labels)]
    rows_by_label = {label: rows for (_, rows), label in zip(runs, labels)}
    sweep_arg: Points | Mapping[str, Points] | None
    if not sweeps:
        sweep_arg = None
    elif len(sweeps) == 1:
        sweep_arg = next(iter(sweeps.values()))
    else:
        sweep_arg = sweeps
    if title is None:
        title = DEFAULT_TITLE + (f": {labels[0]}" if len(labels) == 1 else f" ({len(labels)} runs)")
    return render(out_dir, results, rows_by_label, sweep_arg, title)
