"""Strict reading of configs: YAML files, and dataclasses built from plain dicts (YAML, JSON).

The one place where config text becomes Python values. ``read_yaml`` turns a missing file or
invalid YAML into a one-line :class:`ConfigError`; ``strict_from_dict`` refuses unknown keys, so a
typo never falls back to a default, and for a section of a YAML file names the offending dotted key
and coerces YAML's values to the fields' types (``1e-4`` -> float, lists -> tuples). This module is
a leaf: it imports nothing else of the package but the error class, so every subpackage (and
``autoencoder``) may use it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from ldm.errors import ConfigError

T = TypeVar("T")


def strict_from_dict(cls: type[T], values: Mapping[str, Any], *, source: str | None = None, key: str = "") -> T:
    """``cls(**values)`` for a config dataclass ``cls``, refusing unknown keys.

    Without ``source`` (a config class's own ``from_dict``): an unknown key is a ``ValueError``
    listing the unknown and the known keys; values are passed on as given.

    With ``source`` (a section of a config file; ``key`` is its dotted path, e.g. ``training.lora``,
    ``""`` for the top level): a non-mapping or an unknown key is a :class:`ConfigError` naming the
    dotted key (``run.yaml: unknown key 'training.lora.rnak'``), and YAML's values are coerced to the
    fields' types: a string for a float field becomes a float (YAML 1.1 reads ``1e-4`` as a string;
    ``'{source}: {key}.{name} must be a number, got ...'`` when it is none), a list for a tuple field
    a tuple. A ``ValueError`` of ``cls`` itself becomes ``ConfigError('{source}: {key}: ...')``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if source is None:
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(fields))})")
        return cls(**dict(values))
    check_keys(values, fields, source=source, key=key)
    coerced = {name: _coerce(value, str(fields[name].type), source, _dotted(key, name))
               for name, value in values.items()}
    try:
        return cls(**coerced)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: {key or 'top level'}: {error}") from None


def check_keys(values: Any, known: Iterable[str], *, source: str, key: str = "") -> None:
    """Raise :class:`ConfigError` unless ``values`` is a mapping with only ``known`` keys; the message
    names ``source`` and the dotted path of the (first) unknown key under ``key``."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {key or 'top level'} must be a mapping")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{_dotted(key, unknown[0])}'")


def _coerce(value: Any, field_type: str, source: str, path: str) -> Any:
    """YAML value -> the field's type: str -> float for float fields, list -> tuple for tuple fields."""
    if isinstance(value, str) and "float" in field_type:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{source}: {path} must be a number, got {value!r}") from None
    if isinstance(value, list) and "tuple" in field_type:
        return tuple(value)
    return value


def _dotted(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def parse_yaml_value(text: str) -> Any:
    """One YAML value (a ``key=value`` override), with ``1e-4`` read as a number (YAML 1.1 wants
    ``1.0e-4``); empty text is ``None``."""
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_yaml(path: str | Path, *, what: str = "config file") -> Any:
    """The parsed YAML document at ``path`` (``None`` for an empty file).

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8 or not valid YAML (one line).
    """
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read ({error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


def write_yaml(data: Any, path: str | Path) -> None:
    """Write plain data (tuples become lists) as YAML, keys in their given order."""
    Path(path).write_text(yaml.safe_dump(plain_data(data), sort_keys=False), encoding="utf-8")


def plain_data(value: Any) -> Any:
    """Tuples -> lists, recursively, so YAML and JSON writers emit plain data."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value
