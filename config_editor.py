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
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config_io import ConfigError, ConfigIO, field_types, fields_of, format_value, load_configs, parse_value, \
    resolve_alias, save_configs, unwrap_optional


# ---- input helpers (shared with the wizard) -------------------------------------------------
class EndOfInput(Exception):
    """The input ended (Ctrl-D / closed stdin): the screen goes up one level."""


class GoBack(Exception):
    """The user asked to go back: `b` (or `back`, `q`) or Esc (then Enter), or Enter at a prompt that
    has no default and takes `back=True`."""


ESC = "\x1b"  # what a terminal line holds after Esc (then Enter)
BACK_WORDS = ("b", "back", "q")


def wants_back(answer: str) -> bool:
    """Whether an answer is one of the ways of saying "back" (b, back, q, Esc)."""
    return answer.strip().lower() in BACK_WORDS or ESC in answer


def ask(console: Console, prompt: str, stream: Optional[TextIO] = None, default: Optional[str] = None,
        back: bool = False) -> str:
    """One line of input after `prompt` (rich markup allowed), stripped; `default` when the
    line is empty and a default is given. Reads `stream` when given (echoing the answer, so
    a captured transcript reads like the screen), else the terminal. Raises EndOfInput when
    the input has ended; with `back`, GoBack for b / back / Esc, or for an empty line where
    there is no default."""
    shown = prompt + (f" [dim]{escape(f'[{default}]')}[/dim]" if default else "") + ": "
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
        console.print(escape(line.strip().replace(ESC, "<Esc>")), markup=True, highlight=False)
    answer = line.strip()
    if back and (wants_back(answer) or (not answer and default is None)):
        raise GoBack()
    return default if not answer and default is not None else answer


def choose(console: Console, prompt: str, options: list[str], stream: Optional[TextIO] = None,
           default: Optional[str] = None, show_options: bool = True, back: bool = False) -> str:
    """One of `options` (matched case-insensitively, returned as spelled in `options`);
    asks again until the answer is one of them. `show_options=False` when the prompt
    already says them (a numbered menu); `back` as in `ask`."""
    by_lower = {option.lower(): option for option in options}
    shown = f"{prompt} ({escape('/'.join(options))})" if show_options else prompt
    while True:
        answer = ask(console, shown, stream, default, back=back)
        if answer.lower() in by_lower:
            return by_lower[answer.lower()]
        console.print(f"[red]Please enter one of: {escape(', '.join(options))}"
                      f"{' (or b: back)' if back else ''}[/red]")


def confirm(console: Console, prompt: str, stream: Optional[TextIO] = None, default: Optional[bool] = None,
            back: bool = False) -> bool:
    """Yes or no (y/yes/n/no); asks again otherwise. `back` as in `ask`."""
    default_text = None if default is None else ("y" if default else "n")
    while True:
        answer = ask(console, f"{prompt} (y/n)", stream, default_text, back=back).lower()
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False
        console.print(f"[red]Please answer y or n{' (or b: back)' if back else ''}.[/red]")


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


def brief_help(field: dataclasses.Field) -> str:
    """A field's help for one table line: without its asides in parentheses (links,
    examples), the choices after it as a/b/c (`help FIELD` shows everything)."""
    text = re.sub(r"\s+\([^()]*\)", "", field.metadata.get("help", "")).strip()
    if "choices" in field.metadata:
        text = f"{'/'.join(map(str, field.metadata['choices']))}: {text}".strip(": ")
    return text


def render_table(config: Any, title: str, derived: Sequence[tuple[str, str]] = (), brief: bool = False):
    """The config as a table: #, field, value, help (with the choices); `derived` figures
    (label, value) below the fields in their own section. `brief`: one line of help a
    field, cut to the width the console has left (`help FIELD` shows all of it), so a
    narrow terminal keeps the table a screen tall."""
    if brief:
        return _FittedTable(lambda width: _table(config, title, derived, width))
    return _table(config, title, derived)


class _FittedTable:
    """A table built for the width it is drawn at."""

    def __init__(self, build: Callable[[int], Table]):
        self.build = build

    def __rich_console__(self, console: Console, options):
        yield self.build(options.max_width)


MAX_VALUE_WIDTH = 24  # longer values wrap in their column


def _table(config: Any, title: str, derived: Sequence[tuple[str, str]], width: Optional[int] = None) -> Table:
    fields = fields_of(config)
    rows = [(str(row), field.name, format_value(getattr(config, field.name)),
             brief_help(field) if width else _help_text(field)) for row, field in enumerate(fields, start=1)]
    rows += [("", label, value, "") for label, value in derived]
    table = Table(title=escape(title), title_justify="left", expand=False, show_lines=False)
    if width is None:
        table.add_column("#", justify="right", style="dim", no_wrap=True)
        table.add_column("field", style="bold", no_wrap=True)
        table.add_column("value", style="cyan", overflow="fold")
        table.add_column("help", overflow="fold")
    else:
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        widths[1] = max(widths[1], len("field"))
        widths[2] = min(max(widths[2], len("value")), MAX_VALUE_WIDTH)
        help_width = max(12, width - sum(widths) - 13)  # 5 rules and a space each side of 4 cells
        table.add_column("#", justify="right", style="dim", no_wrap=True, width=widths[0])
        table.add_column("field", style="bold", no_wrap=True, width=widths[1])
        table.add_column("value", style="cyan", overflow="fold", width=widths[2])
        table.add_column("help (help FIELD: all)", no_wrap=True, overflow="ellipsis", width=help_width)
    for number, name, value, text in rows[:len(fields)]:
        table.add_row(number, name, escape(value), escape(text))
    if derived:
        table.add_section()
        for label, value in derived:
            table.add_row("", escape(label), escape(value), "", style="green")
    return table


def summary_figures(configs: dict[str, Any], section: Optional[str] = None) -> list[tuple[str, str]]:
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


def entry_problem(configs: dict[str, Any], updates: dict[str, Any]) -> Optional[str]:
    """Why `updates` (section: new config) cannot work on this machine, found when they are
    typed instead of after the data is prepared: a device that is not here, a local data
    source that does not exist or holds nothing readable, LoRA targets that match no
    linear of the model. None when there is nothing to say."""
    trainer = updates.get("trainer")
    if trainer is not None and hasattr(trainer, "device"):
        from trainer import resolve_device

        try:
            resolve_device(trainer)
        except ValueError as error:
            return str(error)
    data = updates.get("data")
    if data is not None and hasattr(data, "source"):
        problem = source_problem(data.source)
        if problem:
            return problem
    lora, model = updates.get("lora"), configs.get("model")
    if lora is not None and hasattr(lora, "target_modules") and hasattr(model, "num_params"):
        try:
            lora_targets(model, lora)
        except ValueError as error:
            return f"LoRAConfig.target_modules: {error} (in a {model.num_layers}-layer model of this configuration)"
    return None


def source_problem(source: str) -> Optional[str]:
    """Why a data source names no readable local data, or None (the built-in corpus, a hub
    name, or a file or folder with supported files)."""
    from data import BUILTIN, RECORD_EXTENSIONS, TEXT_EXTENSIONS, is_hub_source

    if source == BUILTIN or is_hub_source(source):
        return None
    path = Path(source).expanduser()
    supported = TEXT_EXTENSIONS | RECORD_EXTENSIONS
    if not path.exists():
        return f"DataConfig.source={source!r}: no such file or folder"
    if path.is_dir():
        if not any(p.suffix.lower() in supported and p.is_file() for p in path.rglob("*")):
            return f"DataConfig.source={source!r}: the folder holds no {', '.join(sorted(supported))} files"
    elif path.suffix.lower() not in supported:
        return f"DataConfig.source={source!r}: {path.suffix or 'no suffix'} is not one of {', '.join(sorted(supported))}"
    return None


def lora_targets(model_config: Any, lora_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear the LoRA table adapts in a model of `model_config`
    (built on the meta device: no memory); ValueError for a pattern that matches nothing."""
    import torch

    from lora import target_linears
    from model import Transformer

    with torch.device("meta"):
        model = Transformer(model_config)
    return {name: (linear.in_features, linear.out_features)
            for name, linear in target_linears(model, tuple(lora_config.target_modules)).items()}


# ---- the table editor -----------------------------------------------------------------------
def editor_help(config: Any) -> str:
    """The editor's commands, its examples taken from `config`'s own rows."""
    fields = fields_of(config)
    row = min(3, len(fields))
    name = fields[row - 1].name
    return f"""\
[bold]Commands[/bold]
  [cyan]{row}[/cyan] or [cyan]{name}[/cyan]   edit one field (Enter keeps it)
  [cyan]FIELD=VALUE ...[/cyan]   set several at once, checked together
  [cyan]help FIELD[/cyan], [cyan]? FIELD[/cyan]   a field's full help and choices
  [cyan]reset[/cyan]             reset this table to a preset
  [cyan]save PATH[/cyan]         save all tables (.json, .yaml)
  [cyan]load PATH[/cyan]         load all tables
  [cyan]show[/cyan]              the table again
  [cyan]help[/cyan], [cyan]?[/cyan]           this list
  [cyan]Enter[/cyan], [cyan]b[/cyan], Esc    done (back to the menu)
  Ctrl-C             cancel the value being typed
  Ctrl-D             up one level (the value prompt, then the table)"""


_ASSIGNMENT_START = re.compile(r"\s+(?=[A-Za-z_][\w.]*\s*=)")  # where the next `name=` begins
_ASSIGNMENT = re.compile(r"[A-Za-z_][\w.]*\s*=")  # a line that starts with `name=`
EDIT_HINT = "row number or field name: edit · FIELD=VALUE: set · help [FIELD] · Enter: done"
class ConfigEditor:
    """The table editor screen: shows one section of the configs as a table and edits it
    by row number, field name or `field=value`, keeping every accepted state valid.

    `presets` are the configs `reset` offers for the section being edited; `derived`
    computes figures (label, value) from all the configs, shown under the table and after
    each change (e.g. `summary_figures`)."""

    def __init__(self, console: Console, stream: Optional[TextIO] = None,
                 presets: Optional[dict[str, Callable[[], ConfigIO]]] = None,
                 derived: Optional[Callable[[dict[str, ConfigIO], str], list[tuple[str, str]]]] = None):
        self.console = console
        self.stream = stream
        self.presets = dict(presets or {})
        self.derived = derived
        self.section = ""  # the table being edited
        self.last_saved: Optional[dict[str, ConfigIO]] = None  # the configs as `save` or `load` last left them

    def edit(self, configs: dict[str, ConfigIO], section: str) -> dict[str, ConfigIO]:
        """Edit `configs[section]` until the user finishes (Enter, b, Esc, Ctrl-D or
        Ctrl-C at the Edit prompt); returns the new configs (all sections, since `load`
        may change the others). Every accepted change is kept whichever way the user
        leaves; Ctrl-C or Ctrl-D while a value is asked only drops that value."""
        configs = dict(configs)
        self.section = section
        self.show(configs, section)
        self.console.print(f"[dim]{escape(EDIT_HINT)}[/dim]")
        while True:
            try:
                answer = ask(self.console, "Edit", self.stream)
            except KeyboardInterrupt:
                self.console.print("\n[yellow]Ctrl-C: left the table; the changes shown above are kept.[/yellow]")
                return configs
            except EndOfInput:
                self.console.print("[dim]Ctrl-D: left the table[/dim]")
                return configs
            command, _, argument = answer.partition(" ")
            command, argument = command.lower(), argument.strip()
            if command in ("", "done", "q", "quit") or wants_back(answer):
                return configs
            try:
                configs = self._command(configs, section, answer, command, argument)
            except KeyboardInterrupt:
                self.console.print("\n[yellow]Ctrl-C: cancelled; nothing changed.[/yellow]")
            except (EndOfInput, GoBack):
                self.console.print("[dim]Nothing changed.[/dim]")

    def _command(self, configs: dict[str, ConfigIO], section: str, answer: str, command: str,
                 argument: str) -> dict[str, ConfigIO]:
        if command in ("help", "?") or answer.endswith("?"):
            name = argument or (answer[:-1].strip() if answer.endswith("?") and command not in ("help", "?") else "")
            self._help(configs, section, name)
        elif command == "show":
            self.show(configs, section)
        elif command == "reset":
            return self._reset(configs, section)
        elif command in ("save", "load"):
            return self._save_or_load(configs, section, command, argument)
        elif "=" in answer:
            return self._assign(configs, section, answer)
        else:
            return self._edit_field(configs, section, answer)
        return configs

    # ---- screens ----
    def show(self, configs: dict[str, ConfigIO], section: str) -> None:
        config = configs[section]
        self.console.print(render_table(config, f"{section} ({type(config).__name__})", brief=True))
        self._print_figures(configs, one_per_line=True)

    def _help(self, configs: dict[str, ConfigIO], section: str, name: str) -> None:
        """The commands, or all there is to know about one field."""
        if not name:
            self.console.print(editor_help(configs[section]))
            return
        home = self._alias(configs, section, name)
        target = home[0] if home else section
        field = self._field(configs[target], target, home[1] if home else name)
        if field is not None:
            self._describe(configs[target], field)

    def _describe(self, config: ConfigIO, field: dataclasses.Field) -> None:
        self.console.print(f"[bold]{field.name}[/bold]: {escape(field.metadata.get('help', ''))}", highlight=False)
        if "choices" in field.metadata:
            self.console.print(f"  choices: {escape(', '.join(map(str, field.metadata['choices'])))}", highlight=False)
        self.console.print(f"  current: [cyan]{escape(format_value(getattr(config, field.name)))}[/cyan]",
                           highlight=False)

    def _print_figures(self, configs: dict[str, ConfigIO], one_per_line: bool = False) -> None:
        figures = self.derived(configs, self.section) if self.derived else ()
        if not figures:
            return
        if one_per_line:
            for label, value in figures:
                self.console.print(f"  {escape(label)}: [green]{escape(value)}[/green]", highlight=False)
        else:
            self.console.print("  " + " · ".join(f"{escape(label)}: [green]{escape(value)}[/green]"
                                                 for label, value in figures), highlight=False)

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

    def _problem(self, configs: dict[str, ConfigIO], updates: dict[str, ConfigIO]) -> Optional[str]:
        """Why `updates` cannot be accepted though each config is valid on its own: a model
        too large for this machine's memory, or what `entry_problem` finds."""
        updated = {**configs, **updates}
        if "model" in updates:
            problem = memory_problem(updated)
            if problem:
                return problem
        return entry_problem(updated, updates)

    def _accept(self, configs: dict[str, ConfigIO], updates: dict[str, ConfigIO]) -> dict[str, ConfigIO]:
        """`updates` (section: new config) in place of the current ones, each change shown;
        the configs unchanged (and why) when `_problem` finds one."""
        problem = self._problem(configs, updates)
        if problem:
            self._refuse(f"Not changed: {problem}")
            return configs
        updated = {**configs, **updates}
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
        self._describe(config, field)
        while True:
            text = ask(self.console, f"New {field.name} (Enter keeps it)", self.stream)
            if not text or wants_back(text):
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
            problem = self._problem(configs, {section: new})
            if problem:
                self._refuse(f"Not changed: {problem}")
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
        self.console.print(f"presets: {escape(', '.join(names))}; b or Esc: back", highlight=False)
        name = choose(self.console, "Reset to preset", names, self.stream, default=names[0], show_options=False,
                      back=True)
        try:
            new = self.presets[name]()
        except (ValueError, TypeError) as error:
            self._refuse(f"Preset {name} failed: {error}")
            return configs
        if not isinstance(new, type(configs[section])):
            self._refuse(f"Preset {name} is a {type(new).__name__}, not a {type(configs[section]).__name__}.")
            return configs
        if new == configs[section]:
            self.console.print(f"{escape(section)} already is preset [bold]{escape(name)}[/bold]: nothing changed.")
            return configs
        self.console.print(f"{escape(section)} reset to preset [bold]{escape(name)}[/bold]:")
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
                self.last_saved = dict(configs)
                sections = ", ".join(name for name, config in configs.items() if config is not None)
                self.console.print(f"Saved {escape(sections)} to [bold]{escape(str(path))}[/bold].")
            return configs
        try:
            loaded, ignored = load_configs(argument, configs)
        except ConfigError as error:
            self._refuse(f"Not loaded, nothing changed: {error}")
            return configs
        self.last_saved = dict(loaded)
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
