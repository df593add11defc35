"""Listing, parsing, validating and setting config fields.

Everything is derived from the dataclasses' fields, types and metadata, so a new config
field is settable from the command line (`trainer.learning_rate=3e-4`) without changes
here. The interactive table editor lands with the wizard issue.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Union


class ConfigError(ValueError):
    """A config value or override the user has to fix."""


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(kind) -> tuple[Any, bool]:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
    return kind, False


def parse_value(cls: type, name: str, text: str) -> Any:
    """`text` as a value of field `name` of dataclass `cls`, by the field's type; a clear
    ConfigError naming the field and what is allowed otherwise."""
    hints = field_types(cls)
    if name not in hints:
        raise ConfigError(f"{cls.__name__} has no field {name!r}; fields: {', '.join(hints)}")
    kind, optional = _unwrap_optional(hints[name])
    raw = text.strip()
    where = f"{cls.__name__}.{name}"
    if optional and raw.lower() in ("", "none", "null"):
        return None
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("true", "yes", "y", "1", "on"):
            return True
        if lowered in ("false", "no", "n", "0", "off"):
            return False
        raise ConfigError(f"{where}={raw!r}: expected yes/no (true/false)")
    if kind is int:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r}: expected an integer") from None
        if not value.is_integer():
            raise ConfigError(f"{where}={raw!r}: expected an integer")
        return int(value)
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r}: expected a number (e.g. 3e-4)") from None
    if kind is str:
        return raw
    origin = typing.get_origin(kind)
    if origin is tuple:
        parts = [p.strip().strip("'\"") for p in raw.strip("()[] ").split(",") if p.strip()]
        item_types = typing.get_args(kind)
        if len(item_types) == 2 and item_types[1] is Ellipsis:  # tuple[X, ...]: any number of items
            item_types = (item_types[0],) * len(parts)
        if not parts or len(parts) != len(item_types):
            raise ConfigError(f"{where}={raw!r}: expected {len(item_types)} comma-separated values")
        try:
            return tuple(t(p) for t, p in zip(item_types, parts))
        except ValueError:
            raise ConfigError(f"{where}={raw!r}: expected {len(item_types)} numbers") from None
    if kind is dict or origin is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}={raw!r}: expected a JSON object") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={raw!r}: expected a JSON object")
        return value
    raise ConfigError(f"{where}: fields of type {kind} cannot be set from text")


def apply_overrides(configs: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """New configs with `section.field=value` overrides applied, e.g. {"model": ModelConfig,
    "trainer": TrainerConfig} and ["trainer.learning_rate=3e-4"]. Each section is
    validated once, after all of its overrides."""
    changes: dict[str, dict[str, Any]] = {}
    for override in overrides:
        key, separator, value = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not separator or not dot or not name:
            raise ConfigError(f"cannot read override {override!r}; write SECTION.FIELD=VALUE, "
                              f"e.g. trainer.learning_rate=3e-4 (sections: {', '.join(configs)})")
        if section not in configs:
            raise ConfigError(f"unknown section {section!r} in {override!r}; sections: {', '.join(configs)}")
        changes.setdefault(section, {})[name] = parse_value(type(configs[section]), name, value)
    updated = dict(configs)
    for section, values in changes.items():
        try:
            updated[section] = dataclasses.replace(configs[section], **values)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return updated
