"""Validated, frozen parameter dataclasses: the one place config values are checked.

Env and agent configs subclass ``Config``. Fields declared with ``bounded(default, low, high)``
carry their allowed range; construction checks types and ranges and raises a ``ValueError``
that names the class, the field and what is allowed, so a bad Hydra override fails before
anything compiles.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

import numpy as np
import yaml

__all__ = ["Config", "bounded", "range_violation"]


def bounded(default: Any, low: float | None = None, high: float | None = None, doc: str = "") -> Any:
    """A dataclass field with an allowed closed range ``[low, high]`` (either end may be open)."""
    return dataclasses.field(default=default, metadata={"range": (low, high), "doc": doc})


def range_violation(f: dataclasses.Field, value: Any) -> str | None:
    """"is out of range: allowed [low, high]" when ``value`` (or an element of a tuple value) lies
    outside the range ``bounded`` gave field ``f``; None when it is inside or the field has none."""
    low, high = f.metadata.get("range", (None, None))
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if v is None or isinstance(v, (str, bool, np.bool_)):
            continue
        if (low is not None and v < low) or (high is not None and v > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            return f"is out of range: allowed [{lo}, {hi}]"
    return None


def _check_type(cls_name: str, name: str, hint: Any, value: Any) -> Any:
    """Return ``value`` converted to the field's type, or raise naming the field."""
    origin = typing.get_origin(hint)
    where = f"{cls_name}.{name}"
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{where} must be a bool, got {value!r}")
    if hint is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{where} must be an int, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{where} must be a sequence, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_check_type(cls_name, name, inner, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(cls_name, name, arg, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of lunarl's parameter dataclasses (env and agent configs). Subclasses add fields, most declared with ``bounded``.

    Construction validates: types are checked (an int where a float is expected is accepted and
    converted) and every ``bounded`` field must lie in its range. Subclasses with constraints
    between fields override ``check`` and raise ``ValueError`` naming the field.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        name_of_cls = type(self).__name__
        for f in dataclasses.fields(self):
            value = _check_type(name_of_cls, f.name, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            problem = range_violation(f, value)
            if problem:
                raise ValueError(f"{name_of_cls}.{f.name}={value!r} {problem}")
        self.check()

    def check(self) -> None:
        """Cross-field constraints; override in subclasses."""

    @classmethod
    def build(cls, **overrides: Any) -> Config:
        """The defaults with ``overrides`` applied; unknown names raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**overrides)

    @classmethod
    def parse_overrides(cls, items: Iterable[str]) -> dict[str, Any]:
        """Command-line ``FIELD=VALUE`` strings as keyword overrides for ``build``.

        Values are read as YAML (``true``, ``3``, ``0.1``, ``[64, 64]``); a tuple field also takes
        ``64,64``. Types and ranges are checked by ``build``, like any other override.
        """
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or key not in known:
                raise ValueError(
                    f"{cls.__name__}: {item!r} is not FIELD=VALUE with a known field; known fields: {sorted(known)}"
                )
            hint = hints[key]
            if typing.get_origin(hint) is tuple and not text.lstrip().startswith("["):
                text = f"[{text}]"
            value = yaml.safe_load(text)
            if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
                try:
                    value = float(value)
                except ValueError:
                    pass  # left for build to reject, naming the field
            out[key] = value
        return out

    def replace(self, **overrides: Any) -> Config:
        return type(self).build(**{**dataclasses.asdict(self), **overrides})
