"""``report.html``: one self-contained page summarising one run, an overlay of runs, or a sweep.

Called by :func:`qwen_serve.bench.report.render`; :func:`write_html` writes ``DIR/report.html`` and
returns its path. The page makes no network request of any kind: the PNGs are embedded as
``data:image/png;base64`` URIs, the CSS is an inline ``<style>``, there is no script at all, and a
``Content-Security-Policy`` meta tag forbids anything else. Every string that comes from a result
(labels, config values, error codes and examples, warnings) is HTML-escaped.

Sections, in order: title; a warnings box (client warnings, client-/cap-bound runs, failures; a
saturated load generator must never be read as a slow server); the summary table, one column per
result; errors by HTTP status and by error code; the plots; each run's config in a ``<details>``.
Missing or ``null`` values are shown as "–".
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from qwen_serve.bench.report.files import get_path as _get

__all__ = ["HTML_NAME", "write_html"]

HTML_NAME = "report.html"
_DASH = "–"
_MAX_EXAMPLES = 5
_MAX_EXAMPLE_CHARS = 300

_CAPTIONS = {
    "latency_cdf.png": "Latency CDFs (ok requests, warm-up excluded)",
    "timeline.png": "Throughput, in-flight requests and schedule lag over time",
    "sweep.png": "p99 latency vs achieved throughput",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
tr.group td { background: #fafafa; font-weight: 600; text-align: left; }
td.sub { padding-left: 1.6em; }
th.bound { background: #fde2e1; color: #9b1c1c; }
.badge { display: inline-block; font-size: .75em; padding: 0 .4em; border-radius: .3em; background: #c62828;
         color: #fff; margin-left: .3em; }
.warnings { border: 2px solid #c62828; background: #fff4f4; padding: .6em 1em; border-radius: .3em; }
.warnings h2 { margin-top: 0; border: none; color: #c62828; }
.clean { border: 1px solid #2e7d32; background: #f1f8f1; padding: .4em 1em; border-radius: .3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
details { margin: .4em 0; }
summary { cursor: pointer; font-weight: 600; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .88em; white-space: pre-wrap;
            word-break: break-all; }
.muted { color: #666; }
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _esc(x: Any) -> str:
    return escape(x if isinstance(x, str) else str(x), quote=True)



def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _fmt(x: Any, digits: int = 1) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    v = _num(x)
    if v is None:
        return _DASH if x is None or isinstance(x, float) else str(x)
    return f"{v:,.{digits}f}"


def _pct(x: Any, digits: int = 1) -> str:
    """A 0..1 fraction as a percentage."""
    v = _num(x)
    return _DASH if v is None else f"{v * 100:.{digits}f}%"


def _label(result: Mapping[str, Any], i: int) -> str:
    return str(result.get("label") or f"run {i + 1}")


def _bound(result: Mapping[str, Any]) -> str | None:
    b = _get(result, "client", "bound")
    return str(b) if b else None


# --- summary table -------------------------------------------------------------------------------

Cell = Callable[[Mapping[str, Any]], str]
_STATS = ("mean", "p50", "p90", "p95", "p99", "max")
_LATENCIES = (
    ("ttft_ms", "TTFT (ms, from scheduled time)"),
    ("ttft_from_send_ms", "TTFT from send (ms)"),
    ("tpot_ms", "TPOT (ms)"),
    ("itl_ms", "ITL (ms)"),
    ("e2el_ms", "E2EL (ms)"),
    ("schedule_lag_ms", "Schedule lag (ms)"),
)


def _field(*keys: str, digits: int = 1) -> Cell:
    """A measured quantity: always ``digits`` decimals, even when the JSON holds an integer."""

    def cell(r: Mapping[str, Any]) -> str:
        v = _get(r, *keys)
        return _fmt(float(v) if isinstance(v, int) and not isinstance(v, bool) else v, digits)

    return cell


def _count(*keys: str) -> Cell:
    """A count: shown as an integer."""

    def cell(r: Mapping[str, Any]) -> str:
        v = _get(r, *keys)
        return _fmt(int(v) if isinstance(v, float) and v.is_integer() else v)

    return cell


def _percent(*keys: str) -> Cell:
    return lambda r: _pct(_get(r, *keys))


def _ok_failed(r: Mapping[str, Any]) -> str:
    return f"{_fmt(r.get('requests_completed'))} / {_fmt(r.get('requests_failed'))}"


def _goodput(r: Mapping[str, Any]) -> str:
    g = _num(r.get("goodput_rps"))
    return f"{_DASH} (no SLO)" if g is None else _fmt(g, 2)


def _concurrency(r: Mapping[str, Any]) -> str:
    asked = _get(r, "concurrency", "asked")
    achieved = _fmt(_get(r, "concurrency", "achieved_mean"), 1)
    return f"{achieved} / {'unlimited' if asked is None else _fmt(asked)}"


def _client_bound(r: Mapping[str, Any]) -> str:
    b = _bound(r)
    return {"client": "CLIENT-BOUND", "cap": "CAP-BOUND", None: "no"}.get(b, str(b).upper())


def _guided(r: Mapping[str, Any]) -> str:
    g = r.get("guided")
    if not isinstance(g, Mapping):
        return _DASH
    valid, invalid = _num(g.get("valid")), _num(g.get("invalid"))
    counts = f" ({_fmt(g.get('valid'))}/{_fmt(int(valid + invalid))})" if valid is not None and invalid is not None else ""
    return _pct(g.get("validity_rate")) + counts


def _mismatch(r: Mapping[str, Any]) -> str:
    v = _num(_get(r, "tokens", "client_estimate_mismatch_pct"))
    return _DASH if v is None else f"{v:.1f}%"


def _text(*keys: str) -> Cell:
    return lambda r: _DASH if _get(r, *keys) is None else str(_get(r, *keys))


def _summary_rows() -> list[tuple[str, Cell] | str]:
    """Table rows: ``(name, cell)``, or a bare string for a group heading."""
    rows: list[tuple[str, Cell] | str] = [
        "Throughput",
        ("Requests ok / failed", _ok_failed),
        ("Duration (s)", _field("duration_s")),
        ("Request throughput (req/s)", _field("request_throughput", digits=2)),
        ("Goodput (req/s within SLO)", _goodput),
        ("Output tokens/s", _field("output_token_throughput")),
        ("Input tokens/s", _field("input_token_throughput")),
        ("Total tokens/s", _field("total_token_throughput")),
    ]
    for key, title in _LATENCIES:
        rows.append(title)
        rows.extend((stat, _field(key, stat, digits=1)) for stat in _STATS)
        rows.append(("n", _count(key, "n")))
    rows += [
        "Load generator",
        ("Concurrency achieved (mean) / asked", _concurrency),
        ("Concurrency peak", _count("concurrency", "peak")),
        ("Client CPU (of one core)", _percent("client", "cpu_util")),
        ("Client- / cap-bound", _client_bound),
        "Engine",
        ("KV cache usage peak", _percent("engine", "kv_cache_usage_peak")),
        ("Prefix cache hit rate", _percent("engine", "prefix_cache_hit_rate")),
        ("Preemptions", _count("engine", "preemptions")),
        ("Queue peak (waiting requests)", _count("engine", "queue_peak")),
        "Tokens",
        ("Token counts from", _text("tokens", "source")),
        ("Input tokens total", _count("tokens", "input_total")),
        ("Output tokens total", _count("tokens", "output_total")),
        ("Output tokens targeted", _count("tokens", "output_target_total")),
        ("Output length misses", _count("tokens", "output_length_misses")),
        ("Client estimate total", _count("tokens", "client_output_estimate_total")),
        ("Client estimate mismatch", _mismatch),
        "Structured output",
        ("Guided JSON validity", _guided),
    ]
    return rows


def _header(results: Sequence[Mapping[str, Any]], first: str) -> str:
    cells = [f"<th>{_esc(first)}</th>"]
    for i, r in enumerate(results):
        b = _bound(r)
        if b:
            cells.append(f'<th class="bound">{_esc(_label(r, i))}<span class="badge">{_esc(b)}-bound</span></th>')
        else:
            cells.append(f"<th>{_esc(_label(r, i))}</th>")
    return "<thead><tr>" + "".join(cells) + "</tr></thead>"


def _summary(results: Sequence[Mapping[str, Any]]) -> str:
    body: list[str] = []
    width = len(results) + 1
    for row in _summary_rows():
        if isinstance(row, str):
            body.append(f'<tr class="group"><td colspan="{width}">{_esc(row)}</td></tr>')
            continue
        name, cell = row
        sub = ' class="sub"' if name in _STATS or name == "n" else ""
        cells = "".join(f"<td>{_esc(cell(r))}</td>" for r in results)
        body.append(f"<tr><td{sub}>{_esc(name)}</td>{cells}</tr>")
    return f'<table class="summary">{_header(results, "metric")}<tbody>{"".join(body)}</tbody></table>'


# --- warnings and errors ---------------------------------------------------------------------------


def _warnings(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain-text warnings (escaped by the caller), most important first."""
    out: list[str] = []
    for i, r in enumerate(results):
        label = _label(r, i)
        b = _bound(r)
        cpu = _pct(_get(r, "client", "cpu_util"), 0)
        if b == "client":
            out.append(
                f"{label}: CLIENT-BOUND — the load generator saturated its CPU ({cpu} of one core) and could "
                "not send or read on time. Its latency and throughput describe the client, NOT the server."
            )
        elif b == "cap":
            out.append(
                f"{label}: CAP-BOUND — requests waited for a free slot under the client's concurrency cap; "
                "that wait (schedule lag) is included in TTFT and E2EL and throughput is limited by the cap."
            )
        elif b:
            out.append(f"{label}: bound by {b} — its numbers do not describe the server alone.")
        warnings = _get(r, "client", "warnings")
        if isinstance(warnings, list):
            out.extend(f"{label}: {w}" for w in warnings)
        failed = _num(r.get("requests_failed"))
        if failed:
            out.append(f"{label}: {_fmt(r.get('requests_failed'))} request(s) failed (see Errors).")
        if _get(r, "tokens", "source") == "client-estimate":
            out.append(f"{label}: the server sent no usage; token counts are the client's estimate.")
    return out


def _warnings_box(results: Sequence[Mapping[str, Any]]) -> str:
    items = _warnings(results)
    if not items:
        return '<p class="clean">No client-side warnings: the load generator kept up in every run.</p>'
    lis = "".join(f"<li>{_esc(w)}</li>" for w in items)
    return f'<div class="warnings"><h2>Warnings</h2><ul>{lis}</ul></div>'


def _count_table(results: Sequence[Mapping[str, Any]], key: str, first: str) -> str:
    names: list[str] = []
    for r in results:
        counts = _get(r, "errors", key)
        if isinstance(counts, Mapping):
            names.extend(str(k) for k in counts if str(k) not in names)
    if not names:
        return ""
    body = []
    for name in sorted(names):
        cells = "".join(f"<td>{_esc(_fmt(_get(r, 'errors', key, name) or 0))}</td>" for r in results)
        body.append(f"<tr><td>{_esc(name)}</td>{cells}</tr>")
    return f"<table>{_header(results, first)}<tbody>{''.join(body)}</tbody></table>"


def _errors(results: Sequence[Mapping[str, Any]]) -> str:
    parts = [_count_table(results, "by_status", "HTTP status"), _count_table(results, "by_code", "error code")]
    for i, r in enumerate(results):
        examples = _get(r, "errors", "examples")
        if isinstance(examples, list) and examples:
            lis = "".join(
                f"<li><code>{_esc(_clip(str(e)))}</code></li>" for e in examples[:_MAX_EXAMPLES]
            )
            more = f'<p class="muted">… and {len(examples) - _MAX_EXAMPLES} more</p>' if len(examples) > _MAX_EXAMPLES else ""
            parts.append(f"<h3>Examples: {_esc(_label(r, i))}</h3><ul>{lis}</ul>{more}")
    body = "".join(p for p in parts if p)
    return body or '<p class="muted">No errors.</p>'


def _clip(s: str) -> str:
    return s if len(s) <= _MAX_EXAMPLE_CHARS else s[: _MAX_EXAMPLE_CHARS - 1] + "…"


# --- plots and config ----------------------------------------------------------------------------


def _figure(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    caption = _CAPTIONS.get(png.name, png.stem)
    return (
        f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, ensure_ascii=False, default=str)
    except ValueError:
        return str(v)


def _configs(results: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for i, r in enumerate(results):
        config = r.get("config")
        rows = ""
        if isinstance(config, Mapping):
            rows = "".join(
                f"<tr><td>{_esc(k)}</td><td><code>{_esc(_value(v))}</code></td></tr>" for k, v in config.items()
            )
        started = r.get("started_at")
        meta = f' <span class="muted">started {_esc(started)}</span>' if started else ""
        table = f"<table>{rows}</table>" if rows else '<p class="muted">No config recorded.</p>'
        parts.append(f"<details><summary>{_esc(_label(r, i))}{meta}</summary>{table}</details>")
    return "".join(parts)


def write_html(
    directory: str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]],
    pngs: Sequence[str | os.PathLike[str]],
    title: str = "qwen-serve bench report",
) -> Path:
    """Write ``DIR/report.html`` for ``results`` (one table column each) embedding ``pngs``; return its path.

    Raises :class:`OSError` when a PNG cannot be read or the file cannot be written.
    """
    figures = "".join(_figure(Path(p)) for p in pngs) or '<p class="muted">No plots.</p>'
    html = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{_esc(title)}</h1>\n"
        f'<p class="muted">{len(results)} run(s). Latencies are measured from each request\'s scheduled send '
        "time, so client-side delays are included (schedule lag shows how much).</p>\n"
        f"{_warnings_box(results)}\n"
        f"<h2>Summary</h2>\n{_summary(results)}\n"
        f"<h2>Errors</h2>\n{_errors(results)}\n"
        f"<h2>Plots</h2>\n{figures}\n"
        f"<h2>Configuration</h2>\n{_configs(results)}\n"
        "</body></html>\n"
    )
    path = Path(directory) / HTML_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{HTML_NAME}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path
