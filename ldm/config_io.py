"""Strict reading of configs: YAML files, and dataclasses built from plain dicts (YAML, JSON).

The one place where config text becomes Python values. ``read_yaml`` turns a missing file or
invalid YAML into a one-line :class:`ConfigError`; ``strict_from_dict`` refuses unknown keys, so a
typo never falls back to a default, and wrongly typed values (``steps: abc``, ``lr: .nan``), naming
the offending dotted key and the expected type, and coerces YAML's values to the fields' types
(``1e-4`` -> float, lists -> tuples). This module is
a leaf: it imports nothing else of the package but the error class, so every subpackage (and
``autoencoder``) may use it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from ldm.errors import ConfigError

T = TypeVar("T")


def strict_from_dict(cls: type[T], values: Mapping[str, Any], *, source: str | None = None, key: str = "") -> T:
    """``cls(**values)`` for a config dataclass ``cls``, refusing unknown keys and wrongly typed values.

    Every value is checked against its field's annotation and converted where YAML leaves no doubt
    (see :func:`coerce_value`): ``1e-4`` (YAML 1.1 reads it as a string) -> float, an integral float
    -> int, a list -> tuple. NaN and infinity are refused for every float field.

    Without ``source`` (a config class's own ``from_dict``): an unknown key or a wrongly typed value
    is a ``ValueError`` naming the key (``model_channels must be an integer, got 'abc'``).

    With ``source`` (a section of a config file; ``key`` is its dotted path, e.g. ``training.lora``,
    ``""`` for the top level): a non-mapping, an unknown key or a wrongly typed value is a
    :class:`ConfigError` naming the dotted key (``run.yaml: unknown key 'training.lora.rnak'``,
    ``run.yaml: training.steps must be an integer, got 'abc'``), and a ``ValueError`` of ``cls``
    itself becomes ``ConfigError('{source}: {key}: ...')``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if source is None:
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(fields))})")
        return cls(**{name: coerce_value(value, str(fields[name].type), name) for name, value in values.items()})
    check_keys(values, fields, source=source, key=key)
    try:
        coerced = {name: coerce_value(value, str(fields[name].type), _dotted(key, name))
                   for name, value in values.items()}
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    try:
        return cls(**coerced)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: {key or 'top level'}: {error}") from None


def check_types(cls: type, values: Mapping[str, Any], *, source: str, key: str = "") -> None:
    """Check a partial section (some of ``cls``'s fields, merged into a full config later) now:
    unknown keys and wrongly typed values are a :class:`ConfigError` naming the dotted key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, fields, source=source, key=key)
    try:
        for name, value in values.items():
            coerce_value(value, str(fields[name].type), _dotted(key, name))
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def check_keys(values: Any, known: Iterable[str], *, source: str, key: str = "") -> None:
    """Raise :class:`ConfigError` unless ``values`` is a mapping with only ``known`` keys; the message
    names ``source`` and the dotted path of the (first) unknown key under ``key``."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {key or 'top level'} must be a mapping")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{_dotted(key, unknown[0])}'")


_NOT_CONVERTED = object()  # _convert's answer for a value that does not have the asked type
_EXPECTED = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false",
             "dict": "a mapping"}
_ELEMENTS = {"int": "integers", "float": "finite numbers", "str": "strings"}
_CHECKED = ("int", "float", "str", "bool", "tuple", "dict", "None")


def coerce_value(value: Any, annotation: str, path: str) -> Any:
    """``value`` as the type of a dataclass field annotated ``annotation`` (the annotation's text, e.g.
    ``"float | None"``, ``"tuple[int, ...]"``).

    Accepted: ``None`` when the annotation allows it; int for int (an integral float, e.g. ``1e4``, is
    converted); int, float or a numeric string for float (finite only); str for str (a YAML number
    becomes its text); bool for bool; a list or tuple of such for ``tuple[X, ...]`` (-> tuple); a mapping
    for dict. Other annotations (``Literal``, nested config classes) are left to the class to check.

    Raises:
        ValueError: ``'{path} must be {expected}, got {value!r}'``.
    """
    options = [option.strip() for option in annotation.split("|")]  # no nested unions in config classes
    if value is None and "None" in options:
        return None
    for option in options:
        converted = _convert(value, option)
        if converted is not _NOT_CONVERTED:
            return converted
    expected = " or ".join(_expected(option) for option in options)
    raise ValueError(f"{path} must be {expected}, got {value!r}")


def _convert(value: Any, option: str) -> Any:
    """``value`` as the one type ``option`` (``"int"``, ``"tuple[str, ...]"``, ...), or ``_NOT_CONVERTED``."""
    base, _, rest = option.partition("[")
    if base not in _CHECKED:
        return value  # Literal[...], a nested config class, Any: the class checks its own values
    if value is None or isinstance(value, bool) != (base == "bool"):
        return _NOT_CONVERTED  # true/false is neither a number nor text, and a number is not true/false
    if base == "bool":
        return value
    if base == "int":
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        return int(value) if integral else _NOT_CONVERTED
    if base == "float":
        return _finite_float(value)
    if base == "str":
        return value if isinstance(value, str) else str(value) if isinstance(value, (int, float)) else _NOT_CONVERTED
    if base == "tuple":
        if not isinstance(value, (list, tuple)):
            return _NOT_CONVERTED
        items = [_convert(item, rest.partition(",")[0]) for item in value]
        return _NOT_CONVERTED if any(item is _NOT_CONVERTED for item in items) else tuple(items)
    if base == "dict":
        return value if isinstance(value, Mapping) else _NOT_CONVERTED
    return _NOT_CONVERTED  # "None": a value that is not None


def _finite_float(value: Any) -> Any:
    """An int, float or numeric string as a finite float, else ``_NOT_CONVERTED`` (NaN and inf too)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return _NOT_CONVERTED
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return _NOT_CONVERTED
    return float(value)


def _expected(option: str) -> str:
    """What an annotation option asks for, in words: ``"tuple[int, ...]"`` -> ``"a list of integers"``."""
    base, _, rest = option.partition("[")
    if option == "None":
        return "null"
    if base == "tuple":
        return f"a list of {_ELEMENTS.get(rest.partition(',')[0], 'values')}"
    return _EXPECTED.get(base, option)


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
