"""Load, merge and validate the workflow configuration against its JSON schema."""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(str(resources.files("kidney_seg") / "schemas" / "config.schema.yaml"))


def load_schema() -> dict:
    """The config schema (JSON Schema 2020-12) as a dict: a fresh copy, the file's text parsed once."""
    return copy.deepcopy(_parsed_schema(SCHEMA_PATH.read_text()))


@functools.lru_cache(maxsize=2)
def _parsed_schema(text: str) -> dict:
    """The schema's YAML parsed: ~60 ms, which every with_defaults and validate_config call would spend again."""
    return yaml.safe_load(text)


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base`` (as Snakemake's --configfile does)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _with_defaults(validator_class):
    """A validator class that fills in schema defaults while validating."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _validate(schema: dict, instance: dict, where: str) -> dict:
    """A copy of ``instance`` with the schema's defaults filled in; ValueError listing every error."""
    out = copy.deepcopy(instance)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(out), key=lambda e: list(e.path))
    if errors:
        lines = [f"{'.'.join(str(p) for p in (where, *e.path) if p != '') or '<root>'}: {e.message}" for e in errors]
        raise ValueError("invalid config:\n  " + "\n  ".join(lines))
    return out


def with_defaults(section: str, values: dict) -> dict:
    """One validated config section (e.g. ``"training"``) with the schema's defaults filled in.

    For callers that hold part of a config (tests, the command line): the defaults come
    from the schema, never from the caller.
    """
    schema = load_schema()
    if section not in schema["properties"]:
        raise ValueError(f"unknown config section {section!r} (expected one of {sorted(schema['properties'])})")
    sub = {**schema["properties"][section], "$defs": schema.get("$defs", {})}
    return _validate(sub, values, section)


def validate_config(config: dict) -> dict:
    """Validate a config, returning a copy with defaults filled in; raise ValueError on errors."""
    out = _validate(load_schema(), config, "")
    check_consistency(out)
    return out


def check_consistency(config: dict) -> None:
    """Checks that a schema cannot express (sums, divisibility)."""
    fractions = config["split"]["fractions"]
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split.fractions must sum to 1, got {fractions}")
    divisor = 2 ** (config["model"]["levels"] - 1)
    for size in config["training"]["patch_size"]:
        if size % divisor:
            raise ValueError(f"training.patch_size {size} is not divisible by 2^(levels-1) = {divisor}")
    if config["model"]["deep_supervision"] and config["model"]["levels"] < 4:
        raise ValueError("model.deep_supervision needs model.levels >= 4 (a decoder stage to supervise)")
    if config["training"]["foreground_per_batch"] > config["training"]["batch_size"]:
        raise ValueError("training.foreground_per_batch exceeds training.batch_size")
    if config["training"]["tumor_per_batch"] > config["training"]["foreground_per_batch"]:
        raise ValueError("training.tumor_per_batch exceeds training.foreground_per_batch")
    dataset = config["dataset"]
    if dataset["source"] == "local" and not (dataset["root"] or dataset["manifest"]):
        raise ValueError("dataset.root or dataset.manifest is required when dataset.source is 'local'")


def load_config(*paths: str | Path) -> dict:
    """Read and merge YAML files left to right, then validate."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = deep_merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    return validate_config(merged)
