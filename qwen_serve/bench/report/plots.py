"""PNG plots of one run, an overlay of runs, or a sweep (matplotlib, Agg backend, no display needed).

Called by :func:`qwen_serve.bench.report.render` through :func:`write_plots`; each plotting function
writes one PNG (100 dpi) to ``path``, closes its figure and returns ``path``. Inputs are the plain
dicts of ``result.json`` / ``requests.jsonl`` (so re-rendering saved runs draws the same thing);
missing keys, ``None`` values and empty series are drawn as "no data", never raised on.

* :func:`latency_cdfs`: empirical CDFs of TTFT, TPOT, ITL and E2EL per label; only ok rows
  (``error`` is ``None``, status 200) that are not warm-up requests count.
* :func:`timeline`: per-second completed req/s, output tokens/s, in-flight requests and schedule lag.
* :func:`sweep_curve` / :func:`sweep_curves`: p99 TTFT and p99 TPOT against achieved throughput,
  one marker per point; points whose ``client.bound`` is set get a distinct "client/cap-bound" marker
  (their numbers describe the load generator, not the server).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen_serve.bench.report.files import get_path as _get

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

__all__ = [
    "CDF_PNG",
    "SWEEP_PNG",
    "TIMELINE_PNG",
    "latency_cdfs",
    "ok_rows",
    "sweep_curve",
    "sweep_curves",
    "timeline",
    "unique_labels",
    "write_plots",
]

CDF_PNG = "latency_cdf.png"
TIMELINE_PNG = "timeline.png"
SWEEP_PNG = "sweep.png"
DPI = 100
LOG_RATIO = 100.0
"""A latency axis becomes logarithmic when its largest positive value exceeds the smallest this many times."""

Rows = Sequence[Mapping[str, Any]]
Points = Sequence[Mapping[str, Any]]


def _color(i: int) -> str:
    return f"C{i % 10}"


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    f = float(x)
    return f if math.isfinite(f) else None



def ok_rows(rows: Rows) -> list[Mapping[str, Any]]:
    """The rows that count for latency: no ``error``, HTTP 200 (when recorded), not warm-up."""
    return [r for r in rows if r.get("error") is None and r.get("status", 200) == 200 and not r.get("warmup")]


def unique_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` with repeats made distinct (``a``, ``a #2``, ...); empty labels become ``run N``."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for i, label in enumerate(labels, 1):
        base = label or f"run {i}"
        n = seen.get(base, 0) + 1
        seen[base] = n
        out.append(base if n == 1 else f"{base} #{n}")
    return out


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(p, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return p


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")


def _maybe_log(ax: Axes, values: Sequence[float], axis: str = "x") -> None:
    pos = [v for v in values if v > 0]
    if pos and max(pos) > LOG_RATIO * min(pos):
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


_CDF_PANELS = (
    ("ttft_ms", "TTFT: time to first token (ms)"),
    ("tpot_ms", "TPOT: time per output token (ms)"),
    ("itl_ms", "ITL: inter-token latency (ms)"),
    ("e2el_ms", "E2EL: end-to-end latency (ms)"),
)


def _values(rows: Rows, key: str) -> list[float]:
    out: list[float] = []
    for r in rows:
        v = r.get(key)
        items = v if isinstance(v, list) else [v]
        out.extend(f for f in map(_finite, items) if f is not None)
    return out


def latency_cdfs(rows_by_label: Mapping[str, Rows], path: str | os.PathLike[str]) -> Path:
    """Write a 2×2 figure of empirical latency CDFs (TTFT, TPOT, ITL, E2EL), one line per label."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    filtered = {label: ok_rows(rows) for label, rows in rows_by_label.items()}
    for ax, (key, title) in zip(axes.flat, _CDF_PANELS):
        drawn: list[float] = []
        for i, (label, rows) in enumerate(filtered.items()):
            vals = sorted(_values(rows, key))
            if not vals:
                continue
            n = len(vals)
            ax.step(vals, [(j + 1) / n for j in range(n)], where="post", color=_color(i), label=f"{label} (n={n})")
            drawn.extend((vals[0], vals[-1]))
        ax.set_title(title)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests ≤ x" if key != "itl_ms" else "fraction of tokens ≤ x")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            _maybe_log(ax, drawn)
            ax.legend(fontsize="small", loc="lower right")
        else:
            _no_data(ax)
    fig.suptitle("Latency distributions (ok requests, warm-up excluded)")
    fig.tight_layout()
    return _save(fig, path)


_TIMELINE_PANELS = (
    ("completed_rps", "completed requests (req/s)"),
    ("output_tps", "output tokens (tok/s)"),
    ("in_flight", "in-flight requests"),
    ("schedule_lag_ms", "schedule lag (ms)"),
)


def _series(ts: Any, key: str) -> tuple[list[float], list[float]]:
    t = _get(ts, "t_s")
    y = _get(ts, key)
    if not isinstance(t, list) or not isinstance(y, list):
        return [], []
    xs: list[float] = []
    ys: list[float] = []
    for a, b in zip(t, y):
        fa = _finite(a)
        if fa is None:
            continue
        fb = _finite(b)
        xs.append(fa)
        ys.append(math.nan if fb is None else fb)
    return xs, ys


def timeline(result_by_label: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write four stacked panels over run time (1 s bins from ``result["timeseries"]``), one line per label."""
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    for ax, (key, ylabel) in zip(axes, _TIMELINE_PANELS):
        drawn = False
        for i, (label, result) in enumerate(result_by_label.items()):
            xs, ys = _series(result.get("timeseries"), key)
            if not xs:
                continue
            marker = "." if len(xs) <= 120 else None  # a value between gaps stays visible
            ax.plot(xs, ys, color=_color(i), label=label, linewidth=1.2, marker=marker, markersize=4)
            drawn = True
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.set_ylim(bottom=0)
        else:
            _no_data(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes[1:]:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    if handles:
        axes[0].legend(handles, labels, fontsize="small", loc="upper right")
    axes[-1].set_xlabel("time since start of run (s)")
    fig.suptitle("Throughput, concurrency and schedule lag over time")
    fig.tight_layout()
    return _save(fig, path)


_X_KEYS = {
    "request_throughput": "achieved request throughput (req/s)",
    "output_token_throughput": "achieved output token throughput (tok/s)",
}


def sweep_curves(
    series: Mapping[str, Points], path: str | os.PathLike[str], *, x: str = "request_throughput"
) -> Path:
    """Like :func:`sweep_curve` for several sweeps (label → points), one colour per sweep."""
    if x not in _X_KEYS:
        raise ValueError(f"x must be one of {sorted(_X_KEYS)}, not {x!r}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    any_bound = False
    for ax, metric, title in zip(axes, ("ttft_ms", "tpot_ms"), ("p99 TTFT (ms)", "p99 TPOT (ms)")):
        ys_all: list[float] = []
        for i, (name, points) in enumerate(series.items()):
            xs: list[float] = []
            ys: list[float] = []
            for j, p in enumerate(points):
                px, py = _finite(p.get(x)), _finite(_get(p, metric, "p99"))
                if px is None or py is None:
                    continue
                bound = bool(_get(p, "client", "bound"))
                any_bound |= bound
                xs.append(px)
                ys.append(py)
                ax.plot(
                    [px], [py], linestyle="none", color="red" if bound else _color(i),
                    marker="X" if bound else "o", markersize=9 if bound else 6,
                )
                ax.annotate(
                    str(p.get("label") or f"#{j + 1}"), (px, py), textcoords="offset points",
                    xytext=(4, 4), fontsize="x-small",
                )
            if xs:
                ax.plot(xs, ys, color=_color(i), linewidth=1, alpha=0.7, label=name if len(series) > 1 else None)
                ys_all.extend(ys)
        ax.set_xlabel(_X_KEYS[x])
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs load")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(0.12)  # room for the point labels
        if ys_all:
            _maybe_log(ax, ys_all, axis="y")
        else:
            _no_data(ax)
    handles = [Line2D([], [], linestyle="none", marker="o", color="0.3", label="point")]
    if any_bound:
        handles.append(Line2D([], [], linestyle="none", marker="X", color="red", markersize=9, label="client/cap-bound"))
    if len(series) > 1:
        handles.extend(Line2D([], [], color=_color(i), label=name) for i, name in enumerate(series))
    axes[0].legend(handles=handles, fontsize="small", loc="upper left")
    fig.suptitle("Latency vs achieved throughput (red ✕: limited by the client or its concurrency cap)")
    fig.tight_layout()
    return _save(fig, path)


def sweep_curve(points: Points, path: str | os.PathLike[str], *, x: str = "request_throughput") -> Path:
    """Write p99 TTFT and p99 TPOT (two panels) against achieved ``x`` (``request_throughput`` or
    ``output_token_throughput``), one annotated marker per point in the given (load) order."""
    return sweep_curves({"sweep": points}, path, x=x)


def write_plots(
    directory: str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]],
    rows_by_label: Mapping[str, Rows],
    sweep: Points | Mapping[str, Points] | None = None,
) -> list[Path]:
    """Write the PNGs that have something to show into ``directory`` and return their paths:

    ``latency_cdf.png`` when some row is ok, ``timeline.png`` when some result has a timeseries,
    ``sweep.png`` when ``sweep`` (a list of points, or label → points to overlay sweeps) has ≥ 2
    points, or, without ``sweep``, when ``results`` has ≥ 2 (an overlay of runs).
    """
    d = Path(directory)
    out: list[Path] = []
    if any(ok_rows(rows) for rows in rows_by_label.values()):
        out.append(latency_cdfs(rows_by_label, d / CDF_PNG))
    labels = unique_labels([str(r.get("label") or "") for r in results])
    by_label = dict(zip(labels, results))
    if any(_series(r.get("timeseries"), key)[0] for r in results for key, _ in _TIMELINE_PANELS):
        out.append(timeline(by_label, d / TIMELINE_PNG))
    if sweep is None:
        series: Mapping[str, Points] = {"runs": results}
    elif isinstance(sweep, Mapping):
        series = sweep
    else:
        series = {"sweep": sweep}
    if sum(len(points) for points in series.values()) >= 2:
        out.append(sweep_curves(series, d / SWEEP_PNG))
    return out
