"""Copy the deploy/ observability files into the Helm chart (Helm cannot read files outside the chart).

    python helm/sync_files.py           # copy deploy/ originals over the chart copies
    python helm/sync_files.py --check   # exit 1 and name the files that differ (what the unit test checks)

The originals are owned elsewhere: deploy/grafana/*.json (dashboards) and deploy/prometheus/rules.yaml
(recording rules and alerts). The chart embeds its copies under helm/qwen-serve/files/;
tests/unit/test_helm.py fails while a copy differs from its original, byte for byte.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART_FILES = ROOT / "helm" / "qwen-serve" / "files"

__all__ = ["pairs", "stale"]


def pairs() -> list[tuple[Path, Path]]:
    """``(original, chart copy)`` for every file the chart embeds, originals that exist or copies that do."""
    out = [(ROOT / "deploy" / "prometheus" / "rules.yaml", CHART_FILES / "prometheus" / "rules.yaml")]
    names = {p.name for p in (ROOT / "deploy" / "grafana").glob("*.json")}
    names |= {p.name for p in (CHART_FILES / "dashboards").glob("*.json")}
    out += [(ROOT / "deploy" / "grafana" / n, CHART_FILES / "dashboards" / n) for n in sorted(names)]
    return out


def stale() -> list[str]:
    """One line per pair whose copy is missing, orphaned or not byte-identical to its original."""
    problems = []
    for original, copy in pairs():
        if not original.exists() and not copy.exists():
            continue
        if not original.exists():
            problems.append(f"{copy.relative_to(ROOT)}: its original {original.relative_to(ROOT)} is gone")
        elif not copy.exists():
            problems.append(f"{copy.relative_to(ROOT)}: missing copy of {original.relative_to(ROOT)}")
        elif original.read_bytes() != copy.read_bytes():
            problems.append(f"{copy.relative_to(ROOT)}: differs from {original.relative_to(ROOT)}")
    return problems


def main(argv: list[str]) -> int:
    if "--check" in argv:
        problems = stale()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    for original, copy in pairs():
        if original.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, copy)
            print(f"copied {original.relative_to(ROOT)} -> {copy.relative_to(ROOT)}")
        elif copy.exists():
            copy.unlink()
            print(f"removed {copy.relative_to(ROOT)} (original gone)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
