"""The user documentation: README size and links, and the configuration reference generated from the schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kidney_seg.config import load_schema
from kidney_seg.schema_docs import (
    DEFAULT_OUTPUT,
    anchor,
    describe_type,
    format_value,
    iter_keys,
    main,
    render_config_reference,
    resolve_ref,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 10240  # bytes: the README is for users; reference material lives in docs/

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def markdown_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def links_of(text: str) -> list[str]:
    """The link and image targets of Markdown text, outside code blocks and code spans."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def anchors_of(text: str) -> set[str]:
    """The GitHub heading anchors of Markdown text (duplicates numbered -1, -2...)."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", text)):
        base = anchor(title.replace("`", ""))[1:]
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def table_row(text: str, key: str) -> list[str]:
    """The cells of the reference table row of ``key``."""
    for line in text.splitlines():
        if line.startswith(f"| `{key}` |"):
            return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
    raise AssertionError(f"no table row for {key}")


def test_configuration_reference_is_current():
    """docs/configuration.md is exactly what the schema generates."""
    written = (ROOT / DEFAULT_OUTPUT).read_text(encoding="utf-8")
    assert written == render_config_reference(load_schema()), (
        f"{DEFAULT_OUTPUT} differs from kidney_seg/schemas/config.schema.yaml: run `make docs`"
    )


def test_reference_documents_every_schema_key_with_its_default():
    """Every key of the schema has a row; a key with a default shows it, a required key says so."""
    schema = load_schema()
    text = render_config_reference(schema)
    keys = list(iter_keys(schema))
    assert len(keys) == len(set(keys)) > 50
    for key in keys:
        *parents, name = key.split(".")
        parent = schema
        for part in parents:
            parent = resolve_ref(parent["properties"][part], schema)
        node = resolve_ref(parent["properties"][name], schema)
        key_cell, type_cell, default_cell, description_cell = table_row(text, key)
        assert type_cell, key
        if "properties" in node:
            assert f"]({anchor(key)})" in type_cell, key
        elif "default" in node:
            assert default_cell == format_value(node["default"]), key
        elif name in parent.get("required", ()):
            assert default_cell == "required", key
        if node.get("description"):
            assert description_cell.split()[0].lstrip("\\") in node["description"], key


def test_reference_rendering_of_a_small_schema():
    """Types, bounds, enums, alternatives, $ref, nesting, required keys and cell escaping."""
    schema = {
        "title": "toy",
        "type": "object",
        "additionalProperties": False,
        "required": ["part"],
        "properties": {
            "mode": {"type": "string", "enum": ["a", "b"], "default": "a", "description": "Pick a | b."},
            "part": {
                "type": "object",
                "description": "A section.",
                "required": ["size"],
                "properties": {
                    "size": {"$ref": "#/$defs/pair", "description": "Two\n  numbers, *any* <size>."},
                    "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.5},
                    "ids": {
                        "anyOf": [{"type": "null"}, {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/x"}}]
                    },
                },
            },
        },
        "$defs": {
            "pair": {"type": "array", "items": {"type": "integer", "minimum": 2}, "minItems": 2, "maxItems": 2},
            "x": {"type": "string", "pattern": "^x$"},
        },
    }
    text = render_config_reference(schema)
    assert list(iter_keys(schema)) == ["mode", "part", "part.size", "part.rate", "part.ids"]
    assert table_row(text, "mode") == ["`mode`", "one of `a`, `b`", "`a`", "Pick a \\| b."]
    assert table_row(text, "part")[1] == "section, see [part](#part)"
    assert table_row(text, "part")[2] == "required"
    size_row = ["`part.size`", "list of 2 integers ≥ 2", "required", "Two numbers, \\*any\\* \\<size>."]
    assert table_row(text, "part.size") == size_row
    assert table_row(text, "part.rate")[1:3] == ["number in (0, 1]", "`0.5`"]
    assert table_row(text, "part.ids")[1:3] == ["`null`; non-empty list of strings matching `^x$`", "–"]
    assert "## part\n\nA section.\n" in text
    assert "Unknown keys are refused." in text
    assert describe_type({"type": ["string", "null"]}, schema) == "string or `null`"


def test_resolve_ref_refuses_remote_and_missing_targets():
    """Only local $ref values that exist are resolved; anything else is a clear error."""
    with pytest.raises(ValueError, match="only local"):
        resolve_ref({"$ref": "https://example.org/s.json"}, {})
    with pytest.raises(ValueError, match="unresolvable"):
        resolve_ref({"$ref": "#/$defs/missing"}, {"$defs": {}})


def test_write_entry_point_writes_the_reference(tmp_path, capsys):
    """`python -m kidney_seg.schema_docs --write PATH` writes what the generator renders; without it, prints it."""
    target = tmp_path / "configuration.md"
    assert main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render_config_reference(load_schema())
    assert main([]) == 0
    assert capsys.readouterr().out == target.read_text(encoding="utf-8")


def test_readme_is_short():
    """The README stays a user's page: at most 10 KB (reference material belongs in docs/)."""
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move reference material to docs/"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    """Every relative link of README.md and docs/*.md names an existing file (and heading, for #anchors)."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in links_of(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(target)
        elif fragment and destination.suffix == ".md" and fragment not in anchors_of(destination.read_text("utf-8")):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_links_every_docs_page():
    """No page of docs/ is an orphan: the README links each one."""
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links_of(README.read_text(encoding="utf-8"))}
    orphans = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"
