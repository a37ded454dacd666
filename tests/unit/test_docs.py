"""The generated reference docs match the code they are generated from (``make docs`` regenerates them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from qwen_serve import docgen
from qwen_serve.config import Config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", [docgen.CONFIG_DOC, docgen.DEPLOY_DOC])
def test_generated_doc_is_current(rel: Path) -> None:
    wanted = docgen.generated_files(ROOT)[rel]
    assert (ROOT / rel).read_text(encoding="utf-8") == wanted, f"{rel} is stale: run `make docs`"


def _config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        tp = field.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            keys += _config_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_config_key_has_a_row_with_type_default_meaning_and_example() -> None:
    text = docgen.render_configuration()
    for key in _config_keys(Config):
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 5 and all(cells), row


def test_types_defaults_and_examples_read_like_yaml() -> None:
    text = docgen.render_configuration()
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    assert "| auto or integer (> 0) | `auto` |" in rows["engine.tensor_parallel_size"]
    assert "| integer (≥ 1, ≤ 65535) or null | `null` |" in rows["gateway.metrics_port"]
    assert "`8388608` (8 MiB)" in rows["gateway.max_request_bytes"]
    assert rows["engine.restart"].endswith("| `restart: never` |")  # the other choice when no example is given
    assert "`extra_args: [--max-num-seqs, '128']`" in rows["engine.extra_args"]
    assert "  gpus: 4\n" in text  # the full file of defaults at the top


class _Undocumented(BaseModel):
    documented: int = Field(1, description="has a meaning")
    # a comment above is a meaning too
    commented: int = 2
    bare: int = 3


def test_a_key_without_a_meaning_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^x\.bare: no description"):
        docgen._section_keys("x", _Undocumented)


VALUES = """\
# Header comment, not a value.
# -- The image.
image:
  # -- Repository; continued on the next line,
  # and `# --timeout` inside a comment does not start a new one:
  # --timeout stays part of this description.
  repository: qwen-serve
  undocumented: 1
nested:
  deeper:
    # -- A list default.
    items:
      - a
      - b
    # -- After a list.
    after: {x: 1}
"""


def test_helm_values_parser_reads_dotted_keys_defaults_and_descriptions() -> None:
    docs = {d.key: d for d in docgen.helm_values(VALUES)}
    assert list(docs) == ["image", "image.repository", "nested.deeper.items", "nested.deeper.after"]
    assert docs["image.repository"].description.endswith("--timeout stays part of this description.")
    assert docs["nested.deeper.items"].default == ["a", "b"] and docs["nested.deeper.items"].type == "list"
    assert docs["nested.deeper.after"].type == "object"


def test_check_reports_a_stale_file_and_make_docs_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for rel in (docgen.CONFIG_DOC, docgen.DEPLOY_DOC, docgen.HELM_VALUES):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / docgen.HELM_VALUES).write_text(VALUES)
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert "docs/deploy.md is stale: run `make docs`" in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.stale_files(tmp_path) == []
    assert "| `nested.deeper.after` | object | `{\"x\": 1}` | After a list. |" in (tmp_path / docgen.DEPLOY_DOC).read_text()


def test_deploy_doc_without_markers_is_an_error() -> None:
    with pytest.raises(ValueError, match="markers"):
        docgen.render_deploy("# no markers\n", VALUES)


OWN_DOCS = ["README.md", "docs/api.md", "docs/benchmarks.md", "docs/configuration.md", "docs/deploy.md",
            "docs/keys-and-limits.md", "docs/metrics.md"]


@pytest.mark.parametrize("rel", OWN_DOCS)
def test_relative_links_point_at_files_in_the_repository(rel: str) -> None:
    import re

    doc = ROOT / rel
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        assert (doc.parent / target).resolve().exists(), f"{rel} links to {target}, which does not exist"
        assert (doc.parent / target).resolve().is_relative_to(ROOT), f"{rel} links outside the repository: {target}"
