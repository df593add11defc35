"""What every config dataclass shares, with no terminal code: field help for the editor
and the CLI, a JSON round trip that rejects unknown keys, parsing values from text,
`SECTION.FIELD=VALUE` overrides, LightLM's aliases, and JSON/YAML config files."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

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


# ---- values from text, overrides and files ----------------------------------------------------
class ConfigError(ValueError):
    """A config value or override the user has to fix."""


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(kind) -> tuple[Any, bool]:
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
    kind, optional = unwrap_optional(hints[name])
    raw = text.strip()
    where = f"{cls.__name__}.{name}"
    if optional and raw.lower() in ("", "none", "null", "-"):  # "-" is how format_value shows None
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
    validated once, after all of its overrides; LightLM's aliases (`model.use_flash`, ...)
    set their home field."""
    changes: dict[str, dict[str, Any]] = {}
    for override in overrides:
        key, separator, value = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not separator or not dot or not name:
            raise ConfigError(f"cannot read override {override!r}; write SECTION.FIELD=VALUE, "
                              f"e.g. trainer.learning_rate=3e-4 (sections: {', '.join(configs)})")
        section, name = resolve_alias(section, name)
        if section not in configs:
            raise ConfigError(f"unknown section {section!r} in {override!r}; sections: {', '.join(configs)}")
        parsed = parse_value(type(configs[section]), name, value)
        previous = changes.setdefault(section, {}).get(name, parsed)
        if previous != parsed:
            raise ConfigError(f"{section}.{name} is given two values ({format_value(previous)} and "
                              f"{format_value(parsed)}, one of them through a LightLM alias); give it one")
        changes[section][name] = parsed
    updated = dict(configs)
    for section, values in changes.items():
        try:
            updated[section] = dataclasses.replace(configs[section], **values)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return updated



def format_value(value: Any) -> str:
    """A config value as the editor shows it and as `parse_value` reads it back: yes/no,
    compact floats (0.0003, 1e-05), "0.9, 0.95" for tuples, "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value)
    if value == "":
        return '""'
    return str(value)


def fields_of(config: Any) -> list[dataclasses.Field]:
    """The fields of a config dataclass (class or instance) in declaration order."""
    return list(dataclasses.fields(config))


# ---- load / save ----------------------------------------------------------------------------
BOOKKEEPING_KEYS = ("created", "torch", "finetune")  # top-level keys of a run's run.json that are not configs


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _yaml(path: Path):
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: YAML needs PyYAML (pip install pyyaml); or use a .json file") from None
    return yaml


def save_configs(path: str | Path, configs: dict[str, ConfigIO]) -> Path:
    """Write `configs` as one section per key ({"model": {...}, "trainer": {...}}): JSON for
    .json, YAML for .yaml/.yml. Written to a temporary file and renamed into place; sections
    that are None are left out."""
    path = Path(path).expanduser()
    data = {section: config.to_dict() for section, config in configs.items() if config is not None}
    if _is_yaml(path):
        text = _yaml(path).safe_dump(data, sort_keys=False, default_flow_style=False)
    elif path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ConfigError(f"{path}: name the file .json, .yaml or .yml")
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _read_sections(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if _is_yaml(path):
        yaml = _yaml(path)
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected sections such as model: {{...}}, trainer: {{...}}; "
                          f"found {type(values).__name__}")
    return values


def _coerce(cls: type, name: str, value: Any) -> Any:
    """A value read from a file, as field `name` of `cls` expects it: text through
    parse_value (a YAML 3e-4 is a string), lists as tuples, whole floats as ints."""
    kind, optional = unwrap_optional(field_types(cls)[name])
    if value is None:
        return value
    if isinstance(value, str) and kind is not str:
        return parse_value(cls, name, value)
    if isinstance(value, list) and typing.get_origin(kind) is tuple:
        return tuple(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    expected = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(kind)
    if expected and (not isinstance(value, expected) or (kind is not bool and isinstance(value, bool))):
        raise ConfigError(f"{cls.__name__}.{name}={value!r}: expected {kind.__name__}")
    return value


def load_configs(path: str | Path, configs: dict[str, ConfigIO]) -> tuple[dict[str, ConfigIO], list[str]]:
    """The configs with each known section of the JSON/YAML file at `path` merged over them,
    and the sorted keys of the file that were ignored ("section" for an unknown section,
    "section.field" for an unknown field). A missing or broken file, or invalid values,
    raise ConfigError naming the file and the reason."""
    path = Path(path).expanduser()
    values = move_aliases(_read_sections(path))
    updated = dict(configs)
    ignored = []
    for section, section_values in values.items():
        if section in BOOKKEEPING_KEYS or (section in configs and section_values is None):
            continue
        current = configs.get(section)
        if current is None:
            ignored.append(section)
            continue
        if not isinstance(section_values, dict):
            raise ConfigError(f"{path}: section {section!r} must hold field: value pairs, "
                              f"found {type(section_values).__name__}")
        cls = type(current)
        names = {field.name for field in fields_of(cls)}
        ignored += [f"{section}.{name}" for name in section_values if name not in names]
        try:
            known = {name: _coerce(cls, name, value) for name, value in section_values.items() if name in names}
            updated[section] = cls.from_dict({**current.to_dict(), **known})
        except (ConfigError, ValueError, TypeError) as error:
            raise ConfigError(f"{path}: {error}") from None
    return updated, sorted(ignored)
