"""What every config dataclass shares: field help for the editor and the CLI, and a JSON
round trip that rejects unknown keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

T = TypeVar("T", bound="ConfigIO")


def described(default, help: str, **extra):
    """A dataclass field with a default and a help text (plus e.g. `choices`) in its metadata."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


class ConfigIO:
    """Mixin for config dataclasses: to_dict / from_dict / to_json / from_json."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[T], values: dict) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**values)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def choices(self, name: str) -> tuple:
        return next(f for f in dataclasses.fields(self) if f.name == name).metadata["choices"]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
