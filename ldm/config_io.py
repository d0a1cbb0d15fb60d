"""Strict construction of config dataclasses from plain dicts (YAML, JSON)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """``cls(**values)``, but an unknown key is a ``ValueError`` naming it (a typo never falls back
    to a default). The ``autoencoder`` package keeps its own copy: it must not import ``ldm``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**dict(values))
