"""The files a finished run leaves in its directory, and reading them back for ``bench report``.

Written by ``bench run`` / ``bench sweep`` (through :func:`qwen_serve.bench.report.render`'s callers),
read by :func:`qwen_serve.bench.report.render_from_dirs`:

* ``result.json`` (:func:`write_result` / :func:`load_result`): the run's summary dict, indented,
  **strict** JSON: NaN and ±inf become ``null`` (also inside lists and nested dicts), numpy-like
  scalars become plain numbers, tuples/sets lists, paths strings.
* ``requests.jsonl`` (:func:`write_records` / :func:`load_rows`): one :meth:`RequestRecord.to_row`
  per line, same strictness.
* ``requests.csv`` (:func:`write_records`): the same rows for spreadsheets; the ``itl_ms`` list is
  replaced by ``itl_ms_mean``; columns are in ``to_row()`` order (stable, header written even with
  no records); ``None`` is an empty cell.
* ``sweep.json`` (:func:`write_sweep` / :func:`load_sweep`): the sweep's point results in load
  order, without their ``timeseries``.

Every writer creates the directory, writes through a temporary file + rename (a reader never sees a
half-written file) and returns the path(s) written. Loaders raise :class:`FileNotFoundError` when the
file is absent and :class:`ValueError` when it does not hold what it should.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen_serve.bench.records import RequestRecord

__all__ = [
    "get_path",
    "CSV_NAME",
    "JSONL_NAME",
    "RESULT_NAME",
    "SWEEP_NAME",
    "csv_columns",
    "load_result",
    "load_rows",
    "load_sweep",
    "strict_json",
    "write_records",
    "write_result",
    "write_sweep",
]

RESULT_NAME = "result.json"
JSONL_NAME = "requests.jsonl"
CSV_NAME = "requests.csv"
SWEEP_NAME = "sweep.json"


def strict_json(obj: Any) -> Any:
    """A copy of ``obj`` that :func:`json.dumps` accepts with ``allow_nan=False``.

    Non-finite floats become ``None``; mappings get string keys; tuples, lists and sets become lists;
    objects with ``.item()`` (numpy scalars) their Python value; anything else unknown its ``str``.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [strict_json(v) for v in sorted(obj, key=str)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return strict_json(item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def _dumps(obj: Any, *, indent: int | None = None) -> str:
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_result(directory: str | os.PathLike[str], result: Mapping[str, Any]) -> Path:
    """Write ``DIR/result.json`` (indent 2, strict JSON) and return its path."""
    return _write_text(Path(directory) / RESULT_NAME, _dumps(result, indent=2) + "\n")


def csv_columns() -> list[str]:
    """The CSV header: ``RequestRecord.to_row()`` keys in order, ``itl_ms`` as ``itl_ms_mean``."""
    keys = RequestRecord(index=0, spec_index=0, scheduled=0.0).to_row().keys()
    return ["itl_ms_mean" if k == "itl_ms" else k for k in keys]


def _csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in strict_json(row).items() if k != "itl_ms"}
    itl = [x for x in (row.get("itl_ms") or []) if isinstance(x, (int, float)) and math.isfinite(x)]
    out["itl_ms_mean"] = round(sum(itl) / len(itl), 3) if itl else None
    return {k: "" if v is None else v for k, v in out.items()}


def write_records(directory: str | os.PathLike[str], records: Iterable[RequestRecord]) -> tuple[Path, Path]:
    """Write ``DIR/requests.jsonl`` and ``DIR/requests.csv``; return ``(jsonl_path, csv_path)``."""
    d = Path(directory)
    rows = [r.to_row() for r in records]
    jsonl = _write_text(d / JSONL_NAME, "".join(_dumps(row) + "\n" for row in rows))
    csv_path = d / CSV_NAME
    tmp = csv_path.with_name(f".{CSV_NAME}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(), extrasaction="ignore", restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(_csv_row(row))
    os.replace(tmp, csv_path)
    return jsonl, csv_path


def write_sweep(directory: str | os.PathLike[str], results: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``DIR/sweep.json``: the points' result dicts (load order) without ``timeseries``."""
    points = [{k: v for k, v in r.items() if k != "timeseries"} for r in results]
    return _write_text(Path(directory) / SWEEP_NAME, _dumps(points, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_result(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``DIR/result.json``; :class:`ValueError` unless it holds a JSON object."""
    path = Path(directory) / RESULT_NAME
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_rows(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``DIR/requests.jsonl`` (blank lines skipped); :class:`ValueError` on a bad line."""
    path = Path(directory) / JSONL_NAME
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object")
            rows.append(row)
    return rows


def load_sweep(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``DIR/sweep.json``; :class:`ValueError` unless it is a list of objects."""
    path = Path(directory) / SWEEP_NAME
    data = _read_json(path)
    if not isinstance(data, list) or not all(isinstance(p, dict) for p in data):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return data


def get_path(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or None as soon as a level is missing or not a mapping (result.json readers)."""
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d
