"""The configuration reference (docs/configuration.md), generated from the config schema.

``python -m kidney_seg.schema_docs`` prints the Markdown; ``--write docs/configuration.md``
writes it atomically (``make docs``). The schema stays the only home of every key, type,
default and description: the reference is rendered from it, never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence

from kidney_seg.atomic import write_text_atomic
from kidney_seg.config import SCHEMA_PATH, load_schema

#: Where ``make docs`` writes the reference, relative to the repository root.
DEFAULT_OUTPUT = "docs/configuration.md"
_TOP_LEVEL = "Top-level keys"


def resolve_ref(node: dict, root: dict) -> dict:
    """``node`` with a local ``$ref`` (``#/$defs/...``) merged in; the node's own keys win."""
    ref = node.get("$ref")
    if ref is None:
        return node
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref values are supported, got {ref!r}")
    target: object = root
    for part in ref[2:].split("/"):
        if not isinstance(target, dict) or part not in target:
            raise ValueError(f"unresolvable $ref {ref!r}")
        target = target[part]
    merged = {**resolve_ref(target, root), **node}
    del merged["$ref"]
    return merged


def iter_keys(schema: dict, root: dict | None = None, prefix: str = "") -> Iterator[str]:
    """Every key of the schema as a dotted path (``dataset.phantom.n_cases``), depth first."""
    root = schema if root is None else root
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path
        yield from iter_keys(resolve_ref(sub, root), root, f"{path}.")


def is_section(node: dict) -> bool:
    """Whether a schema node is an object with its own keys (rendered as its own table)."""
    return "properties" in node


def anchor(title: str) -> str:
    """The GitHub anchor of a Markdown heading (lower case, punctuation but - and _ dropped)."""
    kept = (ch for ch in title.lower().replace(" ", "-") if ch.isalnum() or ch in "-_")
    return "#" + "".join(kept)


def escape_cell(text: str) -> str:
    """Text made safe inside a Markdown table cell: one line, no column breaks, no stray markup."""
    text = " ".join(text.split())
    for char in ("\\", "|", "*", "<"):
        text = text.replace(char, "\\" + char)
    return text


def format_value(value: object) -> str:
    """A schema value as YAML flow text in backticks (strings unquoted, as a config file writes them)."""
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _bounds(node: dict) -> str:
    """The numeric bounds of a number or integer node: ``≥ 0``, ``< 1`` or an interval ``(0, 1]``."""
    low = next(((key, node[key]) for key in ("minimum", "exclusiveMinimum") if key in node), None)
    high = next(((key, node[key]) for key in ("maximum", "exclusiveMaximum") if key in node), None)
    if low and high:
        opening = "[" if low[0] == "minimum" else "("
        closing = "]" if high[0] == "maximum" else ")"
        return f"in {opening}{low[1]}, {high[1]}{closing}"
    if low:
        return f"{'≥' if low[0] == 'minimum' else '>'} {low[1]}"
    if high:
        return f"{'≤' if high[0] == 'maximum' else '<'} {high[1]}"
    return ""


def _array_type(node: dict, root: dict) -> str:
    """An array node in words: length, item type, uniqueness."""
    lo, hi = node.get("minItems"), node.get("maxItems")
    items = resolve_ref(node.get("items", {}), root)
    item = describe_type(items, root, plural=True) if items else "values"
    if lo is not None and lo == hi:
        text = f"list of {lo} {item if lo != 1 else describe_type(items, root)}"
    elif lo is not None and hi is not None:
        text = f"list of {lo} to {hi} {item}"
    elif lo == 1:
        text = f"non-empty list of {item}"
    elif lo is not None:
        text = f"list of at least {lo} {item}"
    elif hi is not None:
        text = f"list of at most {hi} {item}"
    else:
        text = f"list of {item}"
    return text + (", unique" if node.get("uniqueItems") else "")


def describe_type(node: dict, root: dict, plural: bool = False) -> str:
    """The type and allowed values of a schema node, in words (``integer ≥ 0``, one of `a`, `b`)."""
    node = resolve_ref(node, root)
    if "const" in node:
        return format_value(node["const"])
    if "enum" in node:
        return "one of " + ", ".join(format_value(value) for value in node["enum"])
    for combinator in ("oneOf", "anyOf"):
        if combinator in node:
            return "; ".join(describe_type(option, root) for option in node[combinator])
    kinds = node.get("type")
    if isinstance(kinds, list):
        return " or ".join(describe_type({**node, "type": kind}, root, plural) for kind in kinds)
    if kinds == "array":
        return _array_type(node, root)
    if kinds == "object":
        noun = "section" if is_section(node) else "mapping"
        return noun + "s" if plural else noun
    if kinds is None:
        return "any value"
    words = {"null": "`null`", "boolean": "boolean", "string": "string", "integer": "integer", "number": "number"}
    text = words.get(kinds, kinds)
    if plural and kinds not in ("null", "boolean"):
        text += "s"
    if kinds in ("integer", "number"):
        text = f"{text} {_bounds(node)}".rstrip()
    if kinds == "string" and "pattern" in node:
        text += f" matching `{node['pattern']}`"
    return text


def describe_default(name: str, node: dict, parent: dict) -> str:
    """The default of a key: its value, 'required' when the config must give it, else a dash."""
    if "default" in node and not is_section(node):
        return format_value(node["default"])
    if name in parent.get("required", ()):
        return "required"
    return "–"


def _section_title(path: str) -> str:
    """The heading of a section: its dotted path."""
    return path or _TOP_LEVEL


def _section_link(path: str) -> str:
    """A Markdown link to a section of the reference."""
    title = _section_title(path)
    return f"[{title}]({anchor(title)})"


def _row(path: str, name: str, node: dict, parent: dict, root: dict) -> str:
    """One table row: key, type or allowed values, default, description."""
    node = resolve_ref(node, root)
    kind = describe_type(node, root)
    if is_section(node):
        kind = f"section, see {_section_link(path)}"
    description = escape_cell(node.get("description", ""))
    return f"| `{path}` | {kind} | {describe_default(name, node, parent)} | {description} |"


def _iter_sections(node: dict, root: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every object node with its own keys, as (dotted path, node), parents before children."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        sub = resolve_ref(sub, root)
        if is_section(sub):
            yield from _iter_sections(sub, root, f"{path}.{name}" if path else name)


def render_section(path: str, node: dict, root: dict) -> str:
    """One section of the reference: its heading, description and the table of its keys."""
    lines = [f"## {_section_title(path)}", ""]
    if path and node.get("description"):
        lines += [" ".join(node["description"].split()), ""]
    keys = node.get("properties", {})
    if path and "default" in node and all("default" in resolve_ref(sub, root) for sub in keys.values()):
        lines += ["The section may be left out: every key has a default.", ""]
    lines += ["| key | type / allowed values | default | description |", "|---|---|---|---|"]
    prefix = f"{path}." if path else ""
    for name, sub in keys.items():
        lines.append(_row(prefix + name, name, sub, node, root))
    return "\n".join(lines) + "\n"


def render_config_reference(schema: dict) -> str:
    """The Markdown configuration reference of a config schema: one table per section."""
    title = schema.get("title", "Configuration")
    lines = [
        f"# Configuration reference: {title}",
        "",
        "<!-- Generated from kidney_seg/schemas/config.schema.yaml by `make docs`"
        " (python -m kidney_seg.schema_docs --write docs/configuration.md). Do not edit by hand. -->",
        "",
    ]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    lines += [
        "The workflow validates the merged config (`config.yaml`, then every `--configfile`) against",
        "the schema [`kidney_seg/schemas/config.schema.yaml`](../kidney_seg/schemas/config.schema.yaml)"
        " (JSON Schema 2020-12) before it runs, and fills in the defaults listed here."
        + (" Unknown keys are refused." if schema.get("additionalProperties") is False else ""),
        "Alternatives are separated by semicolons. *required* marks a key without a default"
        " (`config.yaml` gives it); a dash, an optional key without a default in the schema.",
        "",
        "Sections: " + ", ".join(_section_link(path) for path, _ in _iter_sections(schema, schema)) + ".",
        "",
    ]
    sections = [render_section(path, node, schema) for path, node in _iter_sections(schema, schema)]
    return "\n".join(lines) + "\n" + "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the configuration reference, or write it atomically with ``--write PATH``."""
    parser = argparse.ArgumentParser(prog="python -m kidney_seg.schema_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help=f"write the reference to PATH (make docs: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    text = render_config_reference(load_schema())
    if args.write:
        write_text_atomic(args.write, text)
        print(f"wrote {args.write} from {SCHEMA_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
