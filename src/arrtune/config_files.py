"""Reading a run's configuration from YAML files and ``key=value`` overrides into a :class:`TrainConfig`.

* :func:`load_config`: a YAML file (optional) and overrides, applied last, into a validated config;
* :func:`build_config`: ``TrainConfig(**values)``, with transformers' own refusals as ``ArrtuneError``;
* :func:`read_yaml_mapping`: a YAML file that must hold a mapping, refusing a key given twice;
* :func:`parse_override`: ``key=value``, the value read as YAML; :func:`_coerce` and :func:`_check_key` turn
  a value into its field's type and refuse an unknown key with a "did you mean";
* :func:`dump_yaml_atomic`: the YAML a run directory records, written atomically.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from arrtune.atomic import write_atomic
from arrtune.config import TrainConfig
from arrtune.errors import ArrtuneError

#: transformers 5.25 renamed ``gradient_checkpointing*`` to ``activation_checkpointing*`` (the old names go in
#: v6). arrtune accepts both on every version: on an older transformers the new names are given the old ones.
CHECKPOINTING_NAMES = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


def _field_names() -> set[str]:
    """The names of ``TrainConfig``'s fields."""
    return {f.name for f in dataclasses.fields(TrainConfig)}


def _key(key: str) -> str:
    """A config key as this transformers version names it (the checkpointing fields' new or old names)."""
    if key in CHECKPOINTING_NAMES and key not in _field_names():
        return CHECKPOINTING_NAMES[key]
    return key


def _field_types() -> dict[str, Any]:
    """``TrainConfig``'s field name -> type hint."""
    return get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error naming the key."""
    hint = _field_types()[key]
    args = get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ArrtuneError(f"{where}: {key} cannot be empty")
    union = get_origin(hint) in (Union, UnionType)
    kinds = [a for a in args if a is not type(None)] if union else [hint]
    for kind in kinds:
        base = get_origin(kind) or kind
        if base is bool and isinstance(value, bool):
            return value
        if (
            base is bool
            and isinstance(value, str)
            and value.lower() in ("true", "false", "1", "0", "yes", "no")
        ):
            return value.lower() in ("true", "1", "yes")
        if base is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
        if base is float and not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError, OverflowError):
                pass
        if base is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if base is list and isinstance(value, str) and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if base is dict and isinstance(value, dict):
            return value
        if (
            base not in (bool, int, float, list, str, dict)
            and isinstance(base, type)
            and isinstance(value, base)
        ):
            return value
    raise ArrtuneError(f"{where}: {key}={value!r} has the wrong type (expected {hint})")


def _check_key(key: str, where: str) -> None:
    """Raise ``ArrtuneError`` (naming ``where``) unless ``key`` is a ``TrainConfig`` field, with a "did you mean"."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ArrtuneError(f"{where}: unknown config key '{key}'{hint}")


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML (so ``0.1``, ``true``, ``[a, b]`` work)."""
    if "=" not in item:
        raise ArrtuneError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class _DuplicateKey(Exception):
    """(key, line, first line) of a key given twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if first is not None:
                raise _DuplicateKey(key, line, first)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike, kind: str, expected: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (empty file = ``{}``); errors name the file and line.

    ``kind`` names the file in errors ("config", "grid", ...); ``expected`` describes the mapping.
    """
    p = Path(path)
    if p.is_dir():
        raise ArrtuneError(f"{p}: {kind} file expected, this is a directory")
    if not p.is_file():
        raise ArrtuneError(f"{p}: {kind} file not found")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)  # noqa: S506 (safe)
    except OSError as exc:
        raise ArrtuneError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    except _DuplicateKey as exc:
        raise ArrtuneError(
            f"{p}:{exc.args[1]}: duplicate key '{exc.args[0]}' (first at line {exc.args[2]})"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ArrtuneError(f"{p}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    except UnicodeDecodeError as exc:
        raise ArrtuneError(f"{p}: not valid UTF-8") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ArrtuneError(f"{p}: expected {expected}")
    return loaded


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Build a validated config from a YAML file (optional) and ``key=value`` overrides (applied last)."""
    values: dict[str, Any] = {}
    if path is not None:
        for key, value in read_yaml_mapping(path, "config", "a mapping of config keys").items():
            key = _key(str(key))
            _check_key(key, str(path))
            values[key] = _coerce(key, value, str(path))
    for item in overrides:
        key, value = parse_override(item)
        key = _key(key)
        _check_key(key, "override")
        values[key] = _coerce(key, value, "override")
    return build_config(values, "config")


def build_config(values: dict[str, Any], where: str) -> TrainConfig:
    """``TrainConfig(**values)``, validated (by its ``__post_init__``); ``TrainingArguments``' own refusals
    become ``ArrtuneError``."""
    try:
        return TrainConfig(**values)
    except ArrtuneError:
        raise
    except Exception as exc:  # TrainingArguments.__post_init__ raises ValueError, TypeError, ImportError, ...
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ArrtuneError(f"{where}: {message}") from exc


def dump_yaml_atomic(data: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``data`` as YAML to ``path`` via a temporary file and an atomic rename."""
    write_atomic(path, yaml.safe_dump(data, sort_keys=False))
