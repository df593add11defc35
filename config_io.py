"""What every config dataclass shares: field help for the editor and the CLI, and a JSON
round trip that rejects unknown keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar, TypeVar

T = TypeVar("T", bound="ConfigIO")

# LightLM keeps four switches in both ModelConfig and TrainerConfig. Here each lives in one
# config (the model's shape in ModelConfig, how training runs in TrainerConfig); the other
# name keeps working wherever a user types it (overrides, the editor, config files and
# every run.json written before) and means the same setting.
ALIASES = {"model.use_flash": "trainer.use_flash",
           "model.gradient_checkpointing": "trainer.gradient_checkpointing",
           "trainer.use_moe": "model.use_moe",
           "trainer.use_lossfreebalance": "model.use_lossfreebalance"}


def resolve_alias(section: str, name: str) -> tuple[str, str]:
    """Where `section.name` lives: itself, or the home of a LightLM alias."""
    home = ALIASES.get(f"{section}.{name}")
    return tuple(home.split(".", 1)) if home else (section, name)


def move_aliases(sections: dict) -> dict:
    """Sections read from a file with aliased keys moved to their home section. Where a file
    names both (run.json files kept both sides), the home value wins: it is the one
    training applied."""
    moved = {section: dict(values) if isinstance(values, dict) else values for section, values in sections.items()}
    for alias, home in ALIASES.items():
        section, name = alias.split(".", 1)
        home_section, home_name = home.split(".", 1)
        values = moved.get(section)
        if not isinstance(values, dict) or name not in values:
            continue
        value = values.pop(name)
        target = moved.setdefault(home_section, {})
        if isinstance(target, dict):
            target.setdefault(home_name, value)
    return moved


def described(default, help: str, **extra):
    """A dataclass field with a default and a help text (plus e.g. `choices`) in its metadata."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


class ConfigIO:
    """Mixin for config dataclasses: to_dict / from_dict / to_json / from_json. `section`
    is the config's name in files and overrides (`model`, `trainer`, ...)."""

    section: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[T], values: dict) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {name: value for name, value in values.items() if f"{cls.section}.{name}" not in ALIASES}
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
