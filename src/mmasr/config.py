"""Parameters: params.yaml validated against workflow/schemas/params.schema.yaml, defaults filled in.

Snakemake validates the same file with the same schema before any job runs; the ``mmasr`` commands
validate again, so a command run by DVC or by hand sees exactly the same defaults.

The schema is the one source of truth for every parameter's type, range and default: code that takes
one section of the parameters on its own (the demo corpus and model builders) validates it with
:func:`validate_section` against that section's part of the schema. Hand-written checks exist only for
what a schema cannot say, the rules that relate two keys (:func:`cross_field_problems`).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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


def _is_integer(checker, instance) -> bool:
    """An integer is an int (numpy's too), never a bool and never a float such as 3.0 (YAML's 3.0 is a float)."""
    return isinstance(instance, numbers.Integral) and not isinstance(instance, bool)


def _is_number(checker, instance) -> bool:
    """A number is finite (JSON has no NaN or infinity; YAML's .nan and .inf are rejected)."""
    return isinstance(instance, numbers.Real) and not isinstance(instance, bool) and math.isfinite(instance)


def _is_array(checker, instance) -> bool:
    return isinstance(instance, (list, tuple))


def _with_defaults(validator_class):
    """A validator that fills in ``default`` values while validating (the jsonschema FAQ recipe), with
    strict integers, finite numbers, and tuples as arrays."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    types = validator_class.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number, "array": _is_array})
    return jsonschema.validators.extend(validator_class, {"properties": set_defaults}, type_checker=types)


@functools.lru_cache(maxsize=None)
def _validator_class(dialect: str):
    return _with_defaults(jsonschema.validators.validator_for({"$schema": dialect} if dialect else {}))


@functools.lru_cache(maxsize=4)
def _load_schema(path: str, mtime_ns: int) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def schema() -> dict[str, Any]:
    """The parameter schema (parsed once per file version; do not modify it, :func:`section_schema` gives copies)."""
    path = schema_path()
    return _load_schema(str(path), path.stat().st_mtime_ns)


def section_schema(path: str) -> dict[str, Any]:
    """A copy of the part of the schema for the section at dotted ``path`` (``"demo"``, ``"pretrain.lm"``)."""
    sub = schema()
    for part in path.split("."):
        props = sub.get("properties", {})
        if part not in props:
            raise KeyError(f"the parameter schema has no section {path!r}")
        sub = props[part]
    return copy.deepcopy(sub)


def _key_of(error: jsonschema.ValidationError, prefix: str = "") -> str:
    path = ".".join([prefix] * bool(prefix) + [str(p) for p in error.absolute_path])
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return ".".join(filter(None, [path, *unknown[:1]]))
    return path or "<top level>"


def _problems(sub_schema: dict[str, Any], instance: Any, path: str) -> list[str]:
    """Fill ``instance``'s defaults in place; its schema violations, else its cross-field problems."""
    cls = _validator_class(schema().get("$schema", ""))
    errors = sorted(cls(sub_schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        return [f"key '{_key_of(e, path)}': {e.message}" for e in errors]
    return cross_field_problems(instance, path)


def _raise_if(problems: list[str], source: str) -> None:
    if problems:
        raise ParamsError("invalid parameters\n  " + "\n  ".join(f"{source}: {p}" for p in problems))


def validate(params: dict[str, Any], source: str = "params") -> dict[str, Any]:
    """Return a validated copy of ``params`` with every default filled in; raise ParamsError naming the key."""
    filled = copy.deepcopy(params)
    _raise_if(_problems(schema(), filled, ""), source)
    return filled


def validate_section(path: str, section: Any = None, source: str | None = None) -> Any:
    """One section of the parameters on its own, e.g. ``validate_section("demo", {"utts_per_speaker": 3})``.

    ``path`` names the section (dotted for nested ones: ``"demo_models.whisper"``, ``"pretrain.lm"``; a
    single key such as ``"seed"`` works too, with its value as ``section``); a section that is a mapping
    may be given partial or as None (= ``{}``). Returns a validated copy with every default of the
    schema filled in, exactly as :func:`validate` fills that section of a whole parameter file, after the
    same checks: the schema's types and ranges, then the cross-field rules of the section and of the
    sections inside it. Raises ParamsError (a ValueError) naming each offending key by its full path
    (``key 'demo.scene_objects': ...``).
    """
    sub = section_schema(path)
    if section is None and sub.get("type") == "object":
        section = {}
    filled = copy.deepcopy(dict(section) if isinstance(section, Mapping) else section)
    _raise_if(_problems(sub, filled, path), source or path)
    return _in_schema_order(filled, sub)


def _in_schema_order(instance: Any, sub_schema: dict[str, Any]) -> Any:
    """``instance`` with the keys of every object in the schema's order (a section's keys in the order
    params.yaml documents them, however the caller ordered them)."""
    props = sub_schema.get("properties")
    if not isinstance(instance, dict) or not props:
        return instance
    ordered = {k: _in_schema_order(instance[k], props[k]) for k in props if k in instance}
    return {**ordered, **{k: v for k, v in instance.items() if k not in props}}


# --------------------------------------------------------------------------------------------
# Cross-field rules: what a JSON schema cannot say. Each rule takes its (schema-valid, filled) section
# and yields (key within the section, why); the dotted path it is registered under names the section.
# --------------------------------------------------------------------------------------------

Rule = Callable[[dict[str, Any]], Iterator[tuple[str, str]]]


def _fusion_rules(f: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if f["alpha_stop"] < f["alpha_start"]:
        yield "alpha_stop", (f"{f['alpha_stop']} is below fusion.alpha_start={f['alpha_start']} "
                             "(the alpha grid would be empty)")
    if f["lambda_stop"] < f["lambda_start"]:
        yield "lambda_stop", (f"{f['lambda_stop']} is below fusion.lambda_start={f['lambda_start']} "
                              "(the log-linear lambda grid would run backwards)")


def _nbest_rules(n: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if n["num_return_sequences"] > n["num_beams"]:
        yield "num_return_sequences", "cannot exceed nbest.num_beams"
    if n["keep"] > n["num_return_sequences"]:
        yield "keep", "cannot exceed nbest.num_return_sequences (the beams returned)"


def _split_rules(s: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if s["dev_fraction"] + s["test_fraction"] >= 1:
        yield "test_fraction", "dev_fraction + test_fraction must leave speakers for training"


def _demo_rules(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if d["n_impaired_speakers"] + d["n_control_speakers"] < 1:
        yield "n_impaired_speakers", "n_impaired_speakers + n_control_speakers must be at least 1 (no speaker at all)"
    lo, hi = d["impaired_voicing_blur"]
    if lo > hi:
        yield "impaired_voicing_blur", f"{list(d['impaired_voicing_blur'])} must be [lo, hi] with lo <= hi"
    lo, hi = d["scene_objects"]
    if lo > hi:
        yield "scene_objects", f"{list(d['scene_objects'])} must be [min, max] with min <= max"


def _divisible(section: dict[str, Any], where: str, key: str, by: str) -> Iterator[tuple[str, str]]:
    if section[key] % section[by]:
        yield key, f"{section[key]} must be divisible by {where}.{by}={section[by]}"


def _demo_whisper_rules(w: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield from _divisible(w, "demo_models.whisper", "d_model", "attention_heads")


def _demo_clip_rules(c: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield from _divisible(c, "demo_models.clip", "hidden_size", "attention_heads")
    if c["image_size"] % c["patch_size"]:
        yield "image_size", f"{c['image_size']} must be a multiple of demo_models.clip.patch_size={c['patch_size']}"


def _demo_lm_rules(lm: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield from _divisible(lm, "pretrain.lm", "hidden_size", "heads")
    yield from _divisible(lm, "pretrain.lm", "heads", "kv_heads")
    if not lm["hidden_size"] % lm["heads"] and (lm["hidden_size"] // lm["heads"]) % 2:
        yield "hidden_size", (f"the head size hidden_size / heads = {lm['hidden_size'] // lm['heads']} must be even "
                              "(rotary embeddings)")


def _demo_text_encoder_rules(te: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield from _divisible(te, "pretrain.text_encoder", "hidden_size", "heads")


CROSS_FIELD_RULES: dict[str, Rule] = {
    "fusion": _fusion_rules,
    "nbest": _nbest_rules,
    "split": _split_rules,
    "demo": _demo_rules,
    "demo_models.whisper": _demo_whisper_rules,
    "demo_models.clip": _demo_clip_rules,
    "pretrain.lm": _demo_lm_rules,
    "pretrain.text_encoder": _demo_text_encoder_rules,
}


def cross_field_problems(p: dict[str, Any], path: str = "") -> list[str]:
    """Constraints a JSON schema cannot express, each naming its key by its full dotted path.

    ``p`` is the whole (schema-valid, filled) parameters, or with ``path`` the section at that path;
    the rules of that section and of the sections inside it apply.
    """
    problems = []
    for rule_path, rule in CROSS_FIELD_RULES.items():
        if path and rule_path != path and not rule_path.startswith(path + "."):
            continue
        section = p
        for part in filter(None, rule_path[len(path):].split(".")):
            section = section[part]
        problems += [f"key '{rule_path}.{key}': {why}" for key, why in rule(section)]
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
