"""Parameters: params.yaml validated against workflow/schemas/params.schema.yaml, defaults filled in.

Snakemake validates the same file with the same schema before any job runs; the ``mmasr`` commands
validate again, so a command run by DVC or by hand sees exactly the same defaults.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_NAME = "params.schema.yaml"


class ParamsError(ValueError):
    """A parameter file or value that does not match the schema."""


def schema_path() -> Path:
    """The schema in the source tree (editable install) or packaged beside this module (wheel)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "workflow" / "schemas" / SCHEMA_NAME, here.parent / SCHEMA_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"cannot find {SCHEMA_NAME} beside {here}")


def _with_defaults(validator_class):
    """A validator that fills in ``default`` values while validating (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _key_of(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return ".".join(filter(None, [path, *unknown[:1]]))
    return path or "<top level>"


def validate(params: dict[str, Any], source: str = "params") -> dict[str, Any]:
    """Return a validated copy of ``params`` with every default filled in; raise ParamsError naming the key."""
    schema = yaml.safe_load(schema_path().read_text())
    cls = _with_defaults(jsonschema.validators.validator_for(schema))
    filled = copy.deepcopy(params)
    errors = sorted(cls(schema).iter_errors(filled), key=lambda e: list(e.absolute_path))
    lines = [f"{source}: key '{_key_of(e)}': {e.message}" for e in errors]
    if not errors:
        lines = [f"{source}: {problem}" for problem in cross_field_problems(filled)]
    if lines:
        raise ParamsError("invalid parameters\n  " + "\n  ".join(lines))
    return filled


def cross_field_problems(p: dict[str, Any]) -> list[str]:
    """Constraints a JSON schema cannot express, each naming its keys."""
    problems = []
    fusion = p["fusion"]
    if fusion["alpha_stop"] < fusion["alpha_start"]:
        problems.append(f"key 'fusion.alpha_stop': {fusion['alpha_stop']} is below fusion.alpha_start="
                        f"{fusion['alpha_start']} (the alpha grid would be empty)")
    if p["nbest"]["num_return_sequences"] > p["nbest"]["num_beams"]:
        problems.append("key 'nbest.num_return_sequences': cannot exceed nbest.num_beams")
    if p["nbest"]["keep"] > p["nbest"]["num_return_sequences"]:
        problems.append("key 'nbest.keep': cannot exceed nbest.num_return_sequences (the beams returned)")
    if p["split"]["dev_fraction"] + p["split"]["test_fraction"] >= 1:
        problems.append("key 'split.test_fraction': dev_fraction + test_fraction must leave speakers for training")
    return problems


def schema_defaults() -> dict[str, Any]:
    """Every parameter's default, read from the schema: the one place defaults are written down."""
    return validate({}, "schema defaults")


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, recursing into nested dicts (as Snakemake merges configs)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(params_file: str | Path | Sequence[str | Path] | None = None, cfg_json: str | None = None) -> dict[str, Any]:
    """Parameters from YAML files and/or a JSON object of sections (as Snakemake rules pass them). Several
    files are merged in order, each over the ones before (as ``snakemake --configfile`` merges them over
    params.yaml); the JSON goes over them all."""
    params: dict[str, Any] = {}
    sources = []
    files = [] if params_file is None else [params_file] if isinstance(params_file, (str, Path)) else list(params_file)
    for item in files:
        path = Path(item)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise ParamsError(f"{path}: no such parameter file") from exc
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: the top level must be a mapping of sections")
        params = deep_merge(params, data)
        sources.append(str(path))
    source = " + ".join(sources) or "params"
    if cfg_json:
        params = deep_merge(params, json.loads(cfg_json))
        source = f"{source} + --cfg"
    return validate(params, source)
