"""The config screens: the rich table editor (`ConfigEditor`, `render_table`) and the
prompt helpers `ask` / `choose` / `confirm` the wizard shares.

Everything is derived from the dataclasses' fields, types and metadata (parsing, files and
overrides live in config_io.py), so a new config field is listed and editable in the
table without changes here. Prompts take an injected `console` and input `stream` so the
screens are tested with `io.StringIO`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Callable, Optional, Sequence, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config_io import ConfigError, ConfigIO, field_types, fields_of, format_value, load_configs, parse_value, \
    resolve_alias, save_configs, unwrap_optional


# ---- input helpers (shared with the wizard) -------------------------------------------------
class EndOfInput(Exception):
    """The input ended (Ctrl-D / closed stdin)."""


def ask(console: Console, prompt: str, stream: Optional[TextIO] = None, default: Optional[str] = None) -> str:
    """One line of input after `prompt` (rich markup allowed), stripped; `default` when the
    line is empty and a default is given. Reads `stream` when given (echoing the answer, so
    a captured transcript reads like the screen), else the terminal. Raises EndOfInput when
    the input has ended."""
    shown = prompt + (f" [dim]{escape(f'[{default}]')}[/dim]" if default is not None else "") + ": "
    if stream is None:
        try:
            line = console.input(shown)
        except EOFError:
            console.print()
            raise EndOfInput() from None
    else:
        console.print(shown, end="")
        line = stream.readline()
        if not line:
            console.print()
            raise EndOfInput()
        console.print(escape(line.strip()), markup=True, highlight=False)
    answer = line.strip()
    return default if not answer and default is not None else answer


def choose(console: Console, prompt: str, options: list[str], stream: Optional[TextIO] = None,
           default: Optional[str] = None, show_options: bool = True) -> str:
    """One of `options` (matched case-insensitively, returned as spelled in `options`);
    asks again until the answer is one of them. `show_options=False` when the prompt
    already says them (a numbered menu)."""
    by_lower = {option.lower(): option for option in options}
    shown = f"{prompt} ({escape('/'.join(options))})" if show_options else prompt
    while True:
        answer = ask(console, shown, stream, default)
        if answer.lower() in by_lower:
            return by_lower[answer.lower()]
        console.print(f"[red]Please enter one of: {escape(', '.join(options))}[/red]")


def confirm(console: Console, prompt: str, stream: Optional[TextIO] = None, default: Optional[bool] = None) -> bool:
    """Yes or no (y/yes/n/no); asks again otherwise."""
    default_text = None if default is None else ("y" if default else "n")
    while True:
        answer = ask(console, f"{prompt} (y/n)", stream, default_text).lower()
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False
        console.print("[red]Please answer y or n.[/red]")


# ---- pure helpers ---------------------------------------------------------------------------
def format_count(count: float) -> str:
    """12_345_678 -> "12.3M"."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= limit:
            return f"{count / limit:.3g}{suffix}"
    return f"{count:g}"


def _help_text(field: dataclasses.Field) -> str:
    text = field.metadata.get("help", "")
    if "choices" in field.metadata:
        choices = ", ".join(map(str, field.metadata["choices"]))
        text = f"{text} (choices: {choices})" if text else f"choices: {choices}"
    return text


def render_table(config: Any, title: str, derived: Sequence[tuple[str, str]] = ()) -> Table:
    """The config as a table: #, field, value, help (with the choices); `derived` figures
    (label, value) below the fields in their own section."""
    table = Table(title=escape(title), title_justify="left", expand=False, show_lines=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", style="cyan", overflow="fold")
    table.add_column("help", overflow="fold")
    for row, field in enumerate(fields_of(config), start=1):
        table.add_row(str(row), field.name, escape(format_value(getattr(config, field.name))),
                      escape(_help_text(field)))
    if derived:
        table.add_section()
        for label, value in derived:
            table.add_row("", escape(label), escape(value), "", style="green")
    return table


def summary_figures(configs: dict[str, Any]) -> list[tuple[str, str]]:
    """Figures derived from the configs for the editor: parameters (and active parameters
    with MoE), head dim, tokens per optimizer step. Sections that are absent are skipped."""
    figures = []
    model = configs.get("model")
    if model is not None and hasattr(model, "num_params"):
        figures.append(("parameters", format_count(model.num_params())))
        if getattr(model, "use_moe", False):
            figures.append(("active parameters", format_count(model.num_params(active=True))))
        figures.append(("head dim", str(model.head_dim)))
    trainer = configs.get("trainer")
    if trainer is not None and hasattr(trainer, "tokens_per_step"):
        figures.append(("tokens per optimizer step", f"{trainer.tokens_per_step:,}"))
    return figures


def memory_problem(configs: dict[str, Any]) -> Optional[str]:
    """Why the configured model cannot train in this machine's memory, or None."""
    model, trainer = configs.get("model"), configs.get("trainer")
    if model is None or not hasattr(model, "num_params"):
        return None
    from budget import check_memory

    device = "cpu" if trainer is None or getattr(trainer, "device", "auto") == "cpu" else "cuda"
    try:
        check_memory(model, True, getattr(trainer, "max_seq_len", 1), device)
    except ValueError as error:
        return str(error)
    return None


# ---- the table editor -----------------------------------------------------------------------
EDITOR_HELP = """\
[bold]Commands[/bold]
  [cyan]3[/cyan] or [cyan]num_layers[/cyan]          edit one field (its help, choices and value are shown; Enter keeps it)
  [cyan]num_heads=6 num_kv_heads=3[/cyan]  set several fields at once (each change is checked as a whole)
  [cyan]reset[/cyan]                    reset this section to a preset
  [cyan]save PATH[/cyan] / [cyan]load PATH[/cyan]    save or load all sections (.json, .yaml)
  [cyan]show[/cyan]                     show the table again
  [cyan]help[/cyan]                     this list
  [cyan]Enter[/cyan], [cyan]done[/cyan] or [cyan]q[/cyan]         finish"""

_ASSIGNMENT_START = re.compile(r"\s+(?=[A-Za-z_][\w.]*\s*=)")  # where the next `name=` begins
_ASSIGNMENT = re.compile(r"[A-Za-z_][\w.]*\s*=")  # a line that starts with `name=`


class ConfigEditor:
    """The table editor screen: shows one section of the configs as a table and edits it
    by row number, field name or `field=value`, keeping every accepted state valid.

    `presets` are the configs `reset` offers for the section being edited; `derived`
    computes figures (label, value) from all the configs, shown under the table and after
    each change (e.g. `summary_figures`)."""

    def __init__(self, console: Console, stream: Optional[TextIO] = None,
                 presets: Optional[dict[str, Callable[[], ConfigIO]]] = None,
                 derived: Optional[Callable[[dict[str, ConfigIO]], list[tuple[str, str]]]] = None):
        self.console = console
        self.stream = stream
        self.presets = dict(presets or {})
        self.derived = derived

    def edit(self, configs: dict[str, ConfigIO], section: str) -> dict[str, ConfigIO]:
        """Edit `configs[section]` until the user finishes; returns the new configs (all
        sections, since `load` may change the others). Raises EndOfInput if input ends."""
        configs = dict(configs)
        self.show(configs, section)
        while True:
            answer = ask(self.console, "Edit (row number or field name; 'help' for commands, Enter to finish)",
                         self.stream)
            command, _, argument = answer.partition(" ")
            command, argument = command.lower(), argument.strip()
            if command in ("", "done", "q", "quit"):
                return configs
            if command == "help":
                self.console.print(EDITOR_HELP)
            elif command == "show":
                self.show(configs, section)
            elif command == "reset":
                configs = self._reset(configs, section)
            elif command in ("save", "load"):
                configs = self._save_or_load(configs, section, command, argument)
            elif "=" in answer:
                configs = self._assign(configs, section, answer)
            else:
                configs = self._edit_field(configs, section, answer)

    # ---- screens ----
    def show(self, configs: dict[str, ConfigIO], section: str) -> None:
        config = configs[section]
        figures = self.derived(configs) if self.derived else ()
        self.console.print(render_table(config, f"{section} ({type(config).__name__})", figures))

    def _print_figures(self, configs: dict[str, ConfigIO]) -> None:
        if self.derived:
            figures = self.derived(configs)
            if figures:
                self.console.print("  " + "   ".join(f"{escape(label)}: [green]{escape(value)}[/green]"
                                                     for label, value in figures))

    def _print_changes(self, before: ConfigIO, after: ConfigIO) -> None:
        changed = False
        for field in fields_of(after):
            old, new = getattr(before, field.name), getattr(after, field.name)
            if old != new:
                changed = True
                self.console.print(f"[green]{field.name}[/green]: {escape(format_value(old))} -> "
                                   f"[bold]{escape(format_value(new))}[/bold]", highlight=False)
        if not changed:
            self.console.print("[dim]No change.[/dim]")

    def _refuse(self, message: str) -> None:
        self.console.print(f"[red]{escape(message)}[/red]", highlight=False)

    # ---- finding fields and checking values ----
    def _field(self, config: ConfigIO, section: str, key: str) -> Optional[dataclasses.Field]:
        """The field a row number or (optionally `section.`-prefixed) name means; None after
        saying why there is none."""
        fields = fields_of(config)
        key = key.strip()
        if key.isdigit():
            row = int(key)
            if 1 <= row <= len(fields):
                return fields[row - 1]
            self._refuse(f"No row {row}: rows are 1-{len(fields)}.")
            return None
        name = key.lower()
        if name.startswith(f"{section}."):
            name = name[len(section) + 1:]
        by_name = {field.name.lower(): field for field in fields}
        if name in by_name:
            return by_name[name]
        close = difflib.get_close_matches(name, list(by_name), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        self._refuse(f"Unknown field {key!r} in {type(config).__name__} ({section}).{hint} "
                     f"Type a row number 1-{len(fields)} or a field name; 'help' lists the commands.")
        return None

    @staticmethod
    def _value(config: ConfigIO, field: dataclasses.Field, text: str) -> Any:
        """`text` parsed for `field`, checked against its choices (ConfigError if not)."""
        cls = type(config)
        value = parse_value(cls, field.name, text)
        choices = field.metadata.get("choices")
        if choices is not None and value not in choices:
            if isinstance(value, str):
                match = [choice for choice in choices if str(choice).lower() == value.lower()]
                if match:
                    return match[0]
            raise ConfigError(f"{cls.__name__}.{field.name}={text.strip()!r}: must be one of "
                              f"{', '.join(map(str, choices))}")
        return value

    @staticmethod
    def _replace(config: ConfigIO, changes: dict[str, Any]) -> ConfigIO:
        """The whole config rebuilt with `changes`, so __post_init__ checks every field
        and every cross-field rule; ConfigError if it refuses."""
        try:
            return dataclasses.replace(config, **changes)
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from None

    def _accept(self, configs: dict[str, ConfigIO], updates: dict[str, ConfigIO]) -> dict[str, ConfigIO]:
        """`updates` (section: new config) in place of the current ones, each change shown;
        the configs unchanged (and why) when the model could not fit in this machine's memory."""
        updated = {**configs, **updates}
        problem = memory_problem(updated)
        if problem and "model" in updates:
            self._refuse(f"Not changed: {problem}")
            return configs
        for section, new in updates.items():
            self._print_changes(configs[section], new)
        self._print_figures(updated)
        return updated

    def _alias(self, configs: dict[str, ConfigIO], section: str, key: str) -> Optional[tuple[str, str]]:
        """(home section, field) when `key` is a LightLM alias (e.g. use_flash in the model
        table) of a field that lives in another table; None otherwise."""
        name = key.strip().lower().removeprefix(f"{section}.")
        home = resolve_alias(section, name)
        if home == (section, name) or configs.get(home[0]) is None:
            return None
        self.console.print(f"[dim]{escape(section)}.{escape(name)} is {escape('.'.join(home))} "
                           f"(one setting; it lives in the {escape(home[0])} table)[/dim]", highlight=False)
        return home

    # ---- commands ----
    def _edit_field(self, configs: dict[str, ConfigIO], section: str, key: str) -> dict[str, ConfigIO]:
        home = self._alias(configs, section, key)
        if home is not None:
            return self._edit_field(configs, *home)
        config = configs[section]
        field = self._field(config, section, key)
        if field is None:
            return configs
        self.console.print(f"[bold]{field.name}[/bold]: {escape(field.metadata.get('help', ''))}", highlight=False)
        if "choices" in field.metadata:
            self.console.print(f"  choices: {escape(', '.join(map(str, field.metadata['choices'])))}", highlight=False)
        self.console.print(f"  current: [cyan]{escape(format_value(getattr(config, field.name)))}[/cyan]",
                           highlight=False)
        while True:
            text = ask(self.console, f"New value for {field.name} (Enter keeps it)", self.stream)
            if not text:
                self.console.print(f"[dim]{field.name} unchanged.[/dim]")
                return configs
            if _ASSIGNMENT.match(text) and unwrap_optional(field_types(type(config))[field.name])[0] is not str:
                return self._assign(configs, section, text)  # `num_heads=6 num_kv_heads=3` typed here
            try:
                value = self._value(config, field, text)
            except ConfigError as error:
                self._refuse(f"Not changed: {error}")
                continue
            try:
                new = self._replace(config, {field.name: value})
            except ConfigError as error:
                others = [f.name for f in fields_of(config)
                          if f.name != field.name and re.search(rf"\b{f.name}\b", str(error))]
                hint = f" Change them together, e.g. {field.name}={text.strip()} {others[0]}=..." if others else ""
                self._refuse(f"Not changed: {error}.{hint}")
                continue
            return self._accept(configs, {section: new})

    def _assign(self, configs: dict[str, ConfigIO], section: str, line: str) -> dict[str, ConfigIO]:
        changes: dict[str, dict[str, Any]] = {}  # by section: an alias sets a field of another table
        for assignment in _ASSIGNMENT_START.split(line.strip()):
            key, separator, text = assignment.partition("=")
            if not separator or not key.strip():
                self._refuse(f"Cannot read {assignment!r}: write FIELD=VALUE, e.g. num_layers=6. Nothing changed.")
                return configs
            target, key = self._alias(configs, section, key) or (section, key)
            field = self._field(configs[target], target, key)
            if field is None:  # _field said why; nothing of the line is applied
                return configs
            try:
                changes.setdefault(target, {})[field.name] = self._value(configs[target], field, text)
            except ConfigError as error:
                self._refuse(f"Not changed: {error}")
                return configs
        try:
            updates = {target: self._replace(configs[target], values) for target, values in changes.items()}
        except ConfigError as error:
            self._refuse(f"Not changed: {error}")
            return configs
        return self._accept(configs, updates)

    def _reset(self, configs: dict[str, ConfigIO], section: str) -> dict[str, ConfigIO]:
        if not self.presets:
            self.console.print(f"[yellow]There are no presets for {escape(section)}.[/yellow]")
            return configs
        names = list(self.presets)
        name = choose(self.console, "Reset to which preset?", names, self.stream, default=names[0])
        try:
            new = self.presets[name]()
        except (ValueError, TypeError) as error:
            self._refuse(f"Preset {name} failed: {error}")
            return configs
        if not isinstance(new, type(configs[section])):
            self._refuse(f"Preset {name} is a {type(new).__name__}, not a {type(configs[section]).__name__}.")
            return configs
        self.console.print(f"{escape(section)} reset to preset [bold]{escape(name)}[/bold].")
        return self._accept(configs, {section: new})

    def _save_or_load(self, configs: dict[str, ConfigIO], section: str, command: str,
                      argument: str) -> dict[str, ConfigIO]:
        if not argument:
            self._refuse(f"Write {command} PATH, e.g. {command} my_run.json (or .yaml).")
            return configs
        if command == "save":
            try:
                path = save_configs(argument, configs)
            except ConfigError as error:
                self._refuse(f"Not saved: {error}")
            else:
                sections = ", ".join(name for name, config in configs.items() if config is not None)
                self.console.print(f"Saved {escape(sections)} to [bold]{escape(str(path))}[/bold].")
            return configs
        try:
            loaded, ignored = load_configs(argument, configs)
        except ConfigError as error:
            self._refuse(f"Not loaded, nothing changed: {error}")
            return configs
        self.console.print(f"Loaded [bold]{escape(argument)}[/bold].")
        if ignored:
            self.console.print(f"[yellow]Ignored unknown keys: {escape(', '.join(ignored))}[/yellow]")
        self._print_changes(configs[section], loaded[section])
        for name, config in loaded.items():
            if name != section and config != configs.get(name):
                changed = sum(getattr(config, f.name) != getattr(configs[name], f.name) for f in fields_of(config))
                self.console.print(f"{escape(name)}: {changed} field(s) changed.")
        self._print_figures(loaded)
        return loaded
