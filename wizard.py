"""The interactive wizard that `python train.py` opens on a terminal.

LightLM's menus with the same numbers (its walkthrough `2, 5, 0.001, y, 7, 1` trains a
model for a ~4-second budget), on top of the same functions the subcommands call. Menus
are data; every prompt reads from an injectable console and input stream, so tests drive
the whole wizard with `io.StringIO`.

One way back, said under every menu: `b`, `back` or Esc (then Enter), or Enter where a
prompt has no default, go back; Ctrl-C cancels what is running or being asked and says
so; Ctrl-D goes up one level (a prompt, then its menu, then the wizard, which asks about
unsaved configuration changes before it ends).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, TextIO

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

import checkpoint
from budget import Plan, parse_duration, sequence_length, training_memory
from config_editor import ConfigEditor, EndOfInput, GoBack, ask, choose, confirm, lora_targets, source_problem, \
    wants_back
from config_io import ConfigError, load_configs, save_configs
from data import BUILTIN, RECORD_EXTENSIONS, DataConfig, DataError, builtin_documents, hub_offline_mode, hub_reachable, \
    offline_mode_text, prepare, read_source
import runs
from display import WaitDisplay, check_table, display_for, format_bytes, format_seconds, plan_table, report_outcome, \
    summary_table
from gguf_io import QUANTS
from lora import LoRAConfig
from model import PRESETS, ModelConfig
from runs import DEFAULT_CACHE, DEFAULT_PRESET, chat_prompt, data_summary, default_configs, fit_model_to_data, \
    list_runs, load_trained, stop_tokens, stream_text
from system_check import HardwareManager, SystemCheck
from trainer import TrainerConfig

MAIN_MENU = (("1", "Start training"), ("2", "Manage dataset/configuration"), ("3", "Exit"),
             ("4", "Resume a run"), ("5", "Fine-tune a model with LoRA / QLoRA"),
             ("6", "Chat / generate with a model"), ("7", "Evaluate a checkpoint"), ("8", "Export a model"),
             ("9", "Check this system again"))
MAIN_ACTIONS = {"1": "start_training", "2": "manage", "3": "exit", "4": "resume", "5": "finetune", "6": "chat",
                "7": "evaluate", "8": "export", "9": "system_checks"}
MANAGE_MENU = (("1", "Change dataset"), ("2", "Load existing configuration"),
               ("3", "Create new configuration (from presets)"), ("4", "Save current configuration"),
               ("5", "Optimize for training time"), ("6", "Edit configuration table"),
               ("7", "Continue with current settings"), ("8", "Exit"))
MANAGE_ACTIONS = {"1": "change_dataset", "2": "load_config", "3": "new_config", "4": "save_config",
                  "5": "optimize", "6": "edit_config", "7": "back", "8": "exit"}
DATASET_MENU = (("1", "built-in corpus (offline: Python's standard library and docs)"),
                ("2", "a local file or folder (.txt .md .json .jsonl .csv .parquet)"),
                ("3", "a Hugging Face hub dataset"), ("4", "back"))
MAIN_KEYS = "Ctrl-C: cancel an action · Ctrl-D or 3: exit"
MENU_KEYS = "b, Esc or Enter: back · Ctrl-C: cancel · Ctrl-D: up one level"
PROMPT_KEYS = "b or Esc: back"
RESUME_HINT = "menu 4 (Resume a run), or python train.py resume"
MICRO_BATCH_LIMIT = 256  # the largest micro-batch the Optimize screen looks for
RECOVERABLE = (ConfigError, DataError, ValueError, checkpoint.CheckpointError, FileNotFoundError, OSError,
               runs.RunInUse)


class Quit(Exception):
    """The user chose Exit (and said what to do with unsaved changes)."""


def menu_table(title: str, items: tuple, keys: str = "") -> Group:
    """A numbered menu under its title, then the keys that go back (one line each, not
    padded to the widest)."""
    lines = [Text(title, style="bold cyan")] + [Text(f"{key}. {label}") for key, label in items]
    return Group(*lines, *([Text(keys, style="dim")] if keys else []))


def derived_figures(configs: dict, section: str = "model") -> list[tuple[str, str]]:
    """What the editor shows under a table: size, tokens per step, memory; under the LoRA
    table, the adapters' figures instead."""
    if section == "lora":
        return lora_figures(configs["model"], configs["lora"])
    model, trainer = configs["model"], configs["trainer"]
    figures = [("parameters", f"{model.num_params() / 1e6:.2f}M"
                              + (f" ({model.num_params(active=True) / 1e6:.2f}M active)" if model.use_moe else ""))]
    figures.append(("tokens per optimizer step", f"{trainer.tokens_per_step:,} ({trainer.batch_size} x "
                                                 f"{trainer.accumulation_steps} x {trainer.max_seq_len})"))
    figures.append(("estimated training memory",
                    format_bytes(training_memory(model, trainer.batch_size, trainer.max_seq_len))))
    return figures


def lora_figures(model: ModelConfig, lora: LoRAConfig) -> list[tuple[str, str]]:
    """The LoRA table's own figures, for a base shaped like the model table: the linears it
    adapts, the parameters it trains, the update's scale and the frozen base's size."""
    try:
        targets = lora_targets(model, lora)
    except ValueError as error:
        return [("adapted linears", f"none ({error})")]
    trained = sum(lora.rank * (fan_in + fan_out) for fan_in, fan_out in targets.values())
    total = model.num_params()
    adapted_weights = sum(fan_in * fan_out for fan_in, fan_out in targets.values())
    # NF4: 4 bits a weight plus an absmax per block (8-bit with double quantization, whose
    # own fp32 constants come one per 256 blocks).
    nf4_bits = 4 + (8 / lora.blocksize + 32 / (256 * lora.blocksize) if lora.double_quant else 32 / lora.blocksize)
    frozen = (total - adapted_weights) * 4 + adapted_weights * nf4_bits / 8 if lora.quantize_base else total * 4
    names = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return [("adapted linears", f"{len(targets)} ({', '.join(names)}) in {model.num_layers} layers"),
            ("LoRA parameters (trained)", f"{trained:,} = {100 * trained / total:.2f}% of {total / 1e6:.2f}M"),
            ("update scale", f"{lora.scale:g} (alpha / {'sqrt(rank)' if lora.use_rslora else 'rank'})"),
            ("frozen base in memory", f"{format_bytes(frozen)} ({'NF4 + fp32' if lora.quantize_base else 'fp32'})"),
            ("figures for", "a base shaped like the model table (menu 5 picks the real base)")]


class Wizard:
    """The menus. `stream` replaces the keyboard (tests); `out_dir` holds the runs."""

    def __init__(self, console: Console, stream: Optional[TextIO] = None,
                 out_dir: str | Path = TrainerConfig.path_to_checkpoints, cache_dir: str = DEFAULT_CACHE,
                 run_checks: bool = True):
        self.console = console
        self.stream = stream
        self.out_dir = Path(out_dir)
        self.run_checks = run_checks
        self.configs = {**default_configs(cache_dir=cache_dir), "lora": LoRAConfig()}
        self.configs["trainer"] = dataclasses.replace(self.configs["trainer"], path_to_checkpoints=str(self.out_dir))
        self.plan: Optional[Plan] = None  # the accepted time-budget plan, until the configuration changes
        self._prepared: dict = {}
        self._throughput: dict = {}  # measured tokens/s by (model, micro-batch, sequence length, dtype, device)
        self._saved = self._snapshot(self.configs)  # the configuration as last saved (or as it started)

    # ---- input ------------------------------------------------------------------------------------
    def ask(self, prompt: str, default: Optional[str] = None, back: bool = True) -> str:
        """An answer; with `back` (the default), b / Esc / Enter without a default raise GoBack."""
        return ask(self.console, prompt, self.stream, default, back=back)

    def choose(self, prompt: str, options: list[str], default: Optional[str] = None) -> str:
        return choose(self.console, prompt, options, self.stream, default, show_options=False, back=True)

    def confirm(self, prompt: str, default: Optional[bool] = None) -> bool:
        return confirm(self.console, prompt, self.stream, default, back=True)

    def say(self, text: str) -> None:
        self.console.print(text)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/yellow]", markup=True, highlight=False)

    def error(self, text: str) -> None:
        self.console.print(f"[red]{text}[/red]", markup=True)

    def menu(self, title: str, items: tuple, top: bool = False, status: str = "", prompt: str = "Select option") -> str:
        """A numbered menu and the key of the answer; GoBack for b / Esc / Enter (except at
        the top, which has nothing to go back to)."""
        self.console.print()
        self.console.print(menu_table(title, items, MAIN_KEYS if top else MENU_KEYS))
        if status:
            self.say(status)
        keys = [key for key, _ in items]
        while True:
            try:
                return self.choose(f"{prompt} (1-{len(items)})", keys)
            except GoBack:
                if not top:
                    raise
                self.note(f"this is the first menu: {MAIN_MENU[2][0]} exits")

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        self.console.print("[bold]Sprat[/bold]: train and fine-tune small language models")
        try:
            if self.run_checks:
                self.system_checks()
            self.main_menu()
        except Quit:
            self.say("bye")
            return 0
        return 0

    def system_checks(self) -> None:
        with self.console.status("checking the system ..."):
            runs.settle_precision(TrainerConfig(), self.configs["data"].cache_dir)  # as training will find it
            report = SystemCheck(checkpoint_dir=self.out_dir).run_all()
            hardware = HardwareManager()
        self.console.print(check_table(report, hardware))
        if not report.ok:
            self.error("some checks failed (above): training may not work on this machine")

    def main_menu(self) -> None:
        while True:
            try:
                answer = self.menu("Training Setup", MAIN_MENU, top=True)
            except EndOfInput:
                self.leave("end of input (Ctrl-D)")
                continue
            except KeyboardInterrupt:
                self.leave("\nCtrl-C at the first menu")
                continue
            self.dispatch(MAIN_ACTIONS[answer], MAIN_MENU, answer)

    def dispatch(self, action: str, items: tuple = MAIN_MENU, key: str = "") -> None:
        """Run one menu action; back, Ctrl-C, Ctrl-D and its errors come back to the menu
        (`items`, the menu it was chosen from), saying which."""
        menu_name = "the first menu" if items is MAIN_MENU else "the configuration menu"
        label = dict(items).get(key, action.replace("_", " ")).split(" (")[0]
        try:
            getattr(self, action)()
        except Quit:
            raise
        except GoBack:
            self.say(f"[dim]back to {menu_name}[/dim]")
        except EndOfInput:
            self.note(f"Ctrl-D: left {label}; back to {menu_name}")
        except KeyboardInterrupt:
            self.note(f"\nCtrl-C: cancelled {label}; back to {menu_name}")
        except RECOVERABLE as error:
            self.error(f"error: {error}")
        except Exception as error:  # a bug in one action must not end the session
            log = self.out_dir / "wizard-errors.log"
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a") as file:
                    file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {action}\n{traceback.format_exc()}\n")
                where = f"; the traceback is in {log}"
            except OSError:
                where = ""
            self.error(f"unexpected {type(error).__name__} in {action.replace('_', ' ')}: {error} (a bug in Sprat"
                       f"{where})")

    def exit(self) -> None:
        self.leave("")

    def leave(self, reason: str) -> None:
        """End the wizard (raise Quit), first asking what to do with unsaved changes; returns
        when the user would rather stay."""
        if reason:
            self.say(reason)
        changed = self.unsaved_changes()
        if not changed:
            raise Quit
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        self.note(f"unsaved configuration changes: {shown}")
        self.say("y: save, then exit · n: exit without saving · b, Esc or Enter: stay")
        try:
            answer = choose(self.console, "Save before leaving? (y/n/b)", ["y", "n"], self.stream,
                            show_options=False, back=True)
        except (GoBack, KeyboardInterrupt):
            self.say("\nstaying")
            return
        except EndOfInput:
            self.note("end of input: leaving without saving")
            raise Quit from None
        if answer == "y":
            try:
                self.save_config()
            except (GoBack, KeyboardInterrupt, EndOfInput, ConfigError, OSError) as error:
                self.error(f"not saved{f': {error}' if str(error) else ''}; staying")
                return
        raise Quit

    @staticmethod
    def _snapshot(configs: dict) -> dict:
        return {name: config.to_dict() for name, config in configs.items()}

    def unsaved_changes(self) -> list[str]:
        """`section.field` of each value that differs from the configuration last saved
        (or loaded, or recorded in a run started since)."""
        now = self._snapshot(self.configs)
        return [f"{name}.{key}" for name, values in now.items() for key, value in values.items()
                if self._saved.get(name, {}).get(key) != value]

    def back(self) -> None:
        raise GoBack

    def manage(self) -> None:
        while True:
            try:
                answer = self.menu("Dataset and Configuration Management", MANAGE_MENU,
                                   status=f"dataset: {self.configs['data'].source}; model: {self.model_line()}")
            except GoBack:
                return
            except EndOfInput:
                self.say("[dim]Ctrl-D: back to the first menu[/dim]")
                return
            except KeyboardInterrupt:
                self.note("\nCtrl-C: back to the first menu")
                return
            if MANAGE_ACTIONS[answer] == "back":
                return
            self.dispatch(MANAGE_ACTIONS[answer], MANAGE_MENU, answer)

    @property
    def runs_dir(self) -> Path:
        """Where new runs go: the trainer's path_to_checkpoints (editable in the table)."""
        return Path(self.configs["trainer"].path_to_checkpoints)

    @property
    def configs_dir(self) -> Path:
        """Where saved configurations go by default: beside the runs, out of the repository."""
        return self.runs_dir / "configs"

    def model_line(self) -> str:
        m, t = self.configs["model"], self.configs["trainer"]
        return (f"{m.num_layers} layers x {m.num_dims} ({m.num_params() / 1e6:.2f}M parameters), batch "
                f"{t.batch_size} x {t.max_seq_len}" + (" [planned]" if self.plan else ""))

    # ---- data -------------------------------------------------------------------------------------
    def prepared_data(self, seq_len: Optional[int] = None):
        """The current dataset tokenized for `seq_len` (cached in memory and on disk)."""
        data_config = self.configs["data"]
        seq_len = seq_len or self.configs["trainer"].max_seq_len
        key = (json.dumps(data_config.to_dict(), sort_keys=True), seq_len)
        if key not in self._prepared:
            self.say(f"[dim]preparing {data_config.source} (tokenizer and token blocks; cached after the first "
                     f"time) ...[/dim]")
            with WaitDisplay(self.console) as progress:
                prepared = prepare(data_config, seq_len, fallback_to_builtin=True, progress=progress)
            for line in data_summary(prepared):
                self.say(line)
            self._prepared[key] = prepared
        return self._prepared[key]

    def change_dataset(self) -> None:
        while True:
            answer = self.menu("Dataset", DATASET_MENU)
            if answer == "4":
                return
            try:
                data = self._dataset_choice(answer)
            except GoBack:
                continue  # back to the dataset menu
            if data is not None:
                break
        self.preview(data)
        previous = self.configs["data"]
        self.configs["data"] = data
        try:
            prepared = self.prepared_data()
        except RECOVERABLE:
            self.configs["data"] = previous
            raise
        self.quality_report(prepared.report)
        self.plan = None

    def _dataset_choice(self, answer: str) -> Optional[DataConfig]:
        """The data config for a choice of the Dataset menu, each answer checked as it is
        typed; None to stay on the current dataset."""
        data = self.configs["data"]
        if answer == "1":
            return dataclasses.replace(data, source=BUILTIN)
        if answer == "2":
            self.say(f"[dim]{PROMPT_KEYS}; Enter: back to the Dataset menu[/dim]")
            while True:
                path = Path(self.ask("Path to the file or folder")).expanduser()
                problem = source_problem(str(path)) or ("" if path.exists() else f"{path}: no such file or folder")
                if not problem:
                    return dataclasses.replace(data, source=str(path))
                self.error(problem.replace(f"DataConfig.source={str(path)!r}: ", f"{path}: "))
        name = self.ask("Hub dataset name (e.g. wikitext)")
        with self.console.status("checking the hub ..."):
            reachable = hub_reachable(data.hub_timeout_s)
        if not reachable:
            why = (f"{offline_mode_text()}, so the hub is not tried" if hub_offline_mode()
                   else "the Hugging Face hub is not reachable from here")
            self.error(f"{why}: keeping the current dataset (the built-in corpus and local files work offline)")
            return None
        config_name = self.ask("Configuration (e.g. wikitext-2-raw-v1)", default="", back=False)
        return dataclasses.replace(data, source=name, hub_config=config_name or None)

    def preview(self, data: DataConfig, count: int = 3) -> None:
        if data.source == BUILTIN:
            items = list(builtin_documents(count))
        else:
            with self.console.status("reading a few records ..."):
                items, _ = read_source(dataclasses.replace(data, subset_size=count))
        table = Table(title=f"first {len(items)} records of {data.source}", title_justify="left", show_lines=True)
        table.add_column("#")
        table.add_column("record")
        for index, item in enumerate(items[:count], 1):
            text = json.dumps(item, ensure_ascii=False) if isinstance(item, dict) else item
            table.add_row(str(index), text[:300].replace("\n", " ⏎ ") + (" …" if len(text) > 300 else ""))
        self.console.print(table)

    def quality_report(self, report) -> None:
        table = Table(title=f"quality report: {report.source}", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        rows = [("format", report.format), ("documents read / kept", f"{report.documents_read:,} / {report.documents_kept:,}"),
                ("empty / duplicates dropped", f"{report.empty_dropped:,} / {report.duplicates_dropped:,}"),
                ("train / validation documents", f"{report.train_documents:,} / {report.val_documents:,}"),
                ("train / validation response tokens (the loss's targets)" if report.format == "instruction" else
                 "train / validation tokens", f"{report.train_tokens:,} / {report.val_tokens:,}"),
                ("tokens per document (mean, median, p95, max)",
                 f"{report.length_mean:,.0f}, {report.length_p50:,.0f}, {report.length_p95:,.0f}, {report.length_max:,}")]
        if report.truncated_samples or report.dropped_samples:
            rows.append(("samples truncated / dropped", f"{report.truncated_samples:,} / {report.dropped_samples:,}"))
        for label, value in rows:
            table.add_row(label, value)
        for note in report.notes:
            table.add_row("note", note)
        self.console.print(table)

    # ---- configurations ---------------------------------------------------------------------------
    def load_config(self) -> None:
        folders = list(dict.fromkeys([self.configs_dir, Path("configs")]))  # and where older versions saved
        found = [path for folder in folders for pattern in ("*.json", "*.y*ml") for path in sorted(folder.glob(pattern))]
        found += sorted(self.runs_dir.glob("*/run.json"))
        if found:
            self.say("configurations found: " + ", ".join(str(p) for p in found[:10]))
        self.say(f"[dim]a .json / .yaml file, or a run's run.json; {PROMPT_KEYS}[/dim]")
        while True:
            path = Path(self.ask("Configuration file", default=str(found[0]) if found else None)).expanduser()
            if path.is_file():
                break
            self.error(f"{path}: no such file")
        configs, unknown = load_configs(path, self.configs)
        self.configs = configs
        self._saved = self._snapshot(configs)
        self.plan = None
        self._fix_context()
        if unknown:
            self.console.print(f"[yellow]ignored unknown keys: {', '.join(unknown)}[/yellow]")
        self.say(f"✓ loaded {path}: {self.model_line()}")

    def new_config(self) -> None:
        table = Table(title="model presets", title_justify="left")
        for column in ("preset", "layers", "width", "heads / KV heads", "FFN", "parameters (vocab 8192)"):
            table.add_column(column)
        for name in PRESETS:
            m = ModelConfig.from_name(name)
            table.add_row(name, str(m.num_layers), str(m.num_dims), f"{m.num_heads} / {m.num_kv_heads}",
                          str(m.ffn_hidden_dims), f"{dataclasses.replace(m, vocab_size=8192).num_params() / 1e6:.2f}M")
        self.console.print(table)
        self.say(f"[dim]{PROMPT_KEYS}[/dim]")
        name = self.choose("Preset", list(PRESETS), default=DEFAULT_PRESET)
        self.configs["model"] = ModelConfig.from_name(name)
        self.configs["trainer"] = dataclasses.replace(default_configs()["trainer"],
                                                      path_to_checkpoints=str(self.runs_dir))
        self.plan = None
        self._fix_context()
        self.say(f"✓ new configuration from preset {name}: {self.model_line()}")

    def save_config(self) -> None:
        self.say(f"[dim].json or .yaml; {PROMPT_KEYS}[/dim]")
        while True:
            path = Path(self.ask("Save to", default=str(self.configs_dir / "sprat.json"))).expanduser()
            if path.suffix.lower() not in (".json", ".yaml", ".yml"):
                self.error(f"{path}: name a .json, .yaml or .yml file")
            elif path.is_dir():
                self.error(f"{path} is a folder: name a file in it")
            else:
                break
        self.say(f"✓ saved {save_configs(path, self.configs)}")
        self._saved = self._snapshot(self.configs)

    def edit_config(self) -> None:
        sections = list(self.configs)
        answer = self.menu("Edit which table?", tuple((str(i), s) for i, s in enumerate(sections, 1)),
                           prompt="Select table")
        section = sections[int(answer) - 1]
        presets = {"model": {name: (lambda name=name: ModelConfig.from_name(name)) for name in PRESETS},
                   "trainer": {"defaults": lambda: dataclasses.replace(default_configs()["trainer"],
                                                                        path_to_checkpoints=str(self.runs_dir))},
                   "data": {"defaults": lambda: DataConfig(cache_dir=self.configs["data"].cache_dir)},
                   "lora": {"defaults": LoRAConfig}}[section]
        before = self._snapshot(self.configs)
        editor = ConfigEditor(self.console, self.stream, presets=presets, derived=derived_figures)
        self.configs = editor.edit(self.configs, section)
        if editor.last_saved is not None:
            self._saved = self._snapshot(editor.last_saved)
        self._fix_context()
        if self.plan is not None and before != self._snapshot(self.configs):
            self.plan = None
            self.say("the configuration no longer is the planned one: the estimate at start comes from measurements")

    def _fix_context(self) -> None:
        model, trainer = self.configs["model"], self.configs["trainer"]
        if model.context_len < trainer.max_seq_len:
            self.configs["model"] = dataclasses.replace(model, context_len=trainer.max_seq_len)

    # ---- planning ---------------------------------------------------------------------------------
    def optimize(self) -> None:
        self.say(f"[dim]hours, or a time with its unit (90s, 20m, 2h); {PROMPT_KEYS}, or Enter[/dim]")
        while True:
            text = self.ask("Enter desired training time in hours (e.g. 24.0)")
            try:
                budget = parse_duration(text)
                break
            except ValueError as error:
                self.error(str(error))
        seq_len = sequence_length(budget)
        prepared = self.prepared_data(seq_len)
        self.say("\n[bold]Starting configuration optimization[/bold]")
        self.say(f"target training time: {format_seconds(budget)} ({budget / 3600:.6f} hours), counted from the "
                 f"start of training")
        trainer_config = dataclasses.replace(self.configs["trainer"], max_seq_len=seq_len)
        self.say("[dim]measuring this machine (a few short training steps; cached afterwards) ...[/dim]")
        with WaitDisplay(self.console) as progress:
            the_plan = runs.plan_prepared(budget, prepared, trainer_config, self.configs["data"].cache_dir,
                                          whole_run=False, measure_chosen=True, say=self.say, progress=progress)
        with self.console.status("measuring the memory of a training step ..."):
            manager = HardwareManager(None if trainer_config.device == "auto" else trainer_config.device)
            max_batch = manager.max_micro_batch(the_plan.model, seq_len, limit=MICRO_BATCH_LIMIT)
        self.console.print(plan_table(the_plan, manager.profile(), max_batch, manager.flash_attention_available,
                                      MICRO_BATCH_LIMIT))
        if not self.confirm("Apply these optimizations?"):
            self.say("kept the current configuration")
            return
        data = self.configs["data"]
        self.configs = {**self.configs, "model": fit_model_to_data(the_plan.model, the_plan.trainer, prepared),
                        "trainer": dataclasses.replace(the_plan.trainer, path_to_checkpoints=str(self.runs_dir)),
                        "data": data}
        self.plan = the_plan
        self.say("[green]✓ Configuration updated[/green]")

    # ---- training ---------------------------------------------------------------------------------
    def start_training(self) -> None:
        prepared = self.prepared_data()
        trainer_config = self.configs["trainer"]
        model_config = fit_model_to_data(self.configs["model"], trainer_config, prepared)
        self.configs["model"] = model_config
        estimate = self.estimate(prepared)
        memory = training_memory(model_config, trainer_config.batch_size, trainer_config.max_seq_len)
        self.console.print(summary_table(model_config, trainer_config, prepared.report, estimate, memory,
                                         self.runs_dir))
        if self.plan is not None:
            self.say("starting the accepted plan (the budget counts from now)")
        elif not self.confirm("Start training?", default=True):
            return
        run_dir = runs.new_run_dir(None, trainer_config, None)
        self._saved = self._snapshot(self.configs)  # the run's run.json records this configuration
        self.run_operation(lambda display: runs.train_prepared(self.configs, prepared, run_dir, display,
                                                               estimate=estimate))
        self.plan = None

    def run_operation(self, operation: Callable[[object], runs.RunOutcome]) -> None:
        """`operation(display)`, a training operation of runs.py, under the live display;
        then its report."""
        display = display_for(self.console)
        with display:
            outcome = operation(display)
        report_outcome(self.console, outcome, display.history, resume_hint=RESUME_HINT)

    def estimate(self, prepared) -> "runs.Estimate":
        """The one estimate of the run Start training would do: the accepted plan's, or one
        measured with a few steps of this model (runs.estimate_training)."""
        if self.plan is not None:
            return self.plan.estimate
        with self.console.status("measuring a few training steps of this model on this machine (a step takes "
                                 "as long as in training) ..."):
            return runs.estimate_training(self.configs, prepared, self._throughput)

    # ---- runs and models --------------------------------------------------------------------------
    def pick_model(self, what: str, runs_only: bool = False) -> Path:
        roots = list(dict.fromkeys([self.runs_dir, self.out_dir]))  # where runs go now, and the default
        found = [run for root in roots for run in list_runs(root)]
        if found:
            table = Table(title=f"runs in {', '.join(map(str, roots))}", title_justify="left")
            for column in ("#", "run", "kind", "latest checkpoint", "step", "best val loss"):
                table.add_column(column)
            for index, run in enumerate(found, 1):
                table.add_row(str(index), run.name, run.kind, run.checkpoint or "-", str(run.step),
                              f"{run.best_val_loss:.3f}" if run.best_val_loss is not None else "-")
            self.console.print(table)
        hint = "a number from the list or a path" if found else "a path"
        hint += " to a run" if runs_only else " (a run, a checkpoint, a Hugging Face model folder or a .gguf file)"
        self.say(f"[dim]{hint}; {PROMPT_KEYS}{'' if found else ', or Enter'}[/dim]")
        while True:
            answer = self.ask(what, default="1" if found else None)
            if answer.isdigit() and found and 1 <= int(answer) <= len(found):
                return found[int(answer) - 1].path
            path = Path(answer).expanduser()
            problem = model_problem(path, runs_only)
            if problem is None:
                return path
            self.error(f"{answer}: not a number from the list, and {problem}" if found else problem)

    def resume(self) -> None:
        run_dir = self.pick_model("Run to resume", runs_only=True)
        self.run_operation(lambda display: runs.resume(runs.ResumeRequest(run_dir), display, self.say))

    def finetune(self) -> None:
        base = self.pick_model("Base model")
        self.say(f"[dim]instruction records (instruction/output, prompt/response or messages) in a "
                 f"{' / '.join(sorted(RECORD_EXTENSIONS))} file or folder; {PROMPT_KEYS}, or Enter[/dim]")
        while True:
            data = Path(self.ask("Instruction data")).expanduser()
            problem = self.instruction_problem(data)
            if problem is None:
                break
            self.error(problem)
        lora = self.configs["lora"]
        self.say(f"LoRA table (menu 2 → 6 → lora edits the rest): rank {lora.rank}, alpha {lora.alpha:g}, "
                 f"targets {', '.join(lora.target_modules)}")
        rank = self._ask_int("LoRA rank", lora.rank)
        self.say("[dim]QLoRA keeps the frozen base in 4-bit NF4 (a quarter of the memory)[/dim]")
        qlora = self.confirm("QLoRA: quantize the base to 4 bits?", default=lora.quantize_base)
        self.say("[dim]a merged model folds the adapter into a copy of the base: one plain model to chat with "
                 "or export[/dim]")
        merge = self.confirm("Also save a merged model?", default=runs.FinetuneRequest.merge)
        budget, epochs = self._ask_budget(), runs.FinetuneRequest.epochs
        if budget is None:
            epochs = self._ask_int("Epochs", runs.FinetuneRequest.epochs)
        general = self._ask_general_text()
        alpha = runs.FINETUNE_ALPHA_PER_RANK * rank if lora.alpha == runs.FINETUNE_ALPHA_PER_RANK * lora.rank \
            else lora.alpha  # keep the scale alpha/r
        self.configs["lora"] = dataclasses.replace(lora, rank=rank, alpha=alpha, quantize_base=qlora)
        request = runs.FinetuneRequest(base=str(base), data=str(data), merge=merge, epochs=epochs, budget=budget,
                                       general_data=general, out=str(self.runs_dir),
                                       cache_dir=self.configs["data"].cache_dir, lora=self.configs["lora"],
                                       started=time.time())
        self._saved["lora"] = self.configs["lora"].to_dict()  # the fine-tune's run.json records the LoRA table
        self.run_operation(lambda display: runs.finetune(request, display, self.say))

    def instruction_problem(self, path: Path) -> Optional[str]:
        """Why `path` cannot be fine-tuned on (read a few records to know), or None."""
        problem = source_problem(str(path)) or ("" if path.exists() else f"{path}: no such file or folder")
        if problem:
            return problem.replace(f"DataConfig.source={str(path)!r}: ", f"{path}: ")
        try:
            with self.console.status("reading the first records ..."):
                read_source(DataConfig(source=str(path), format="instruction", subset_size=3))
        except (DataError, OSError) as error:
            return str(error)
        return None

    def _ask_general_text(self) -> Optional[str]:
        """The guard's general text: 'builtin', a file or folder, or None for no guard."""
        self.say(f"[dim]general text the fine-tune must not get worse on (the guard): '{BUILTIN}', a file or folder, "
                 f"or 'none'[/dim]")
        while True:
            answer = self.ask("General text", default=runs.FinetuneRequest.general_data or "none")
            if answer.lower() in ("none", "off", "no"):
                return None
            problem = source_problem(answer) or ("" if answer == BUILTIN or Path(answer).expanduser().exists()
                                                 else f"{answer}: no such file or folder")
            if not problem:
                return answer
            self.error(problem.replace(f"DataConfig.source={answer!r}: ", f"{answer}: "))

    def _ask_budget(self) -> Optional[str]:
        """A time budget ('5m'), or None to train by epochs."""
        self.say(f"[dim]time from now to the end (90s, 5m, 1h), or Enter to train by epochs; {PROMPT_KEYS}[/dim]")
        while True:
            answer = self.ask("Time budget", default="").strip()
            if not answer:
                return None
            try:
                parse_duration(answer)
                return answer
            except ValueError as error:
                self.error(str(error))

    def _ask_int(self, prompt: str, default: int) -> int:
        while True:
            answer = self.ask(prompt, default=str(default))
            if answer.isdigit() and int(answer) > 0:
                return int(answer)
            self.error(f"{prompt}: expected a positive whole number")

    def chat(self) -> None:
        path = self.pick_model("Model")
        with self.console.status("loading the model ..."):
            loaded = load_trained(path)
        with self.console.status("laying out the weights for decoding ..."):
            with contextlib.ExitStack() as session:  # held for the whole chat: paid once, not per reply
                session.enter_context(loaded.model.decoding())
                session = session.pop_all()
        with session:
            self._chat_session(loaded)

    def _chat_session(self, loaded: runs.Loaded) -> None:
        settings = dataclasses.asdict(runs.GenerateSettings())
        chat = loaded.kind == "finetuned"
        stops = stop_tokens(loaded)  # (a GGUF's are read from its file: once, not per reply)
        self.say(f"loaded {loaded.source} ({loaded.checkpoint or loaded.kind}); "
                 f"{'chat' if chat else 'text continuation'} mode. Commands: /temperature X, /top_k N, /top_p X, "
                 f"/max_new_tokens N, /settings; Ctrl-C stops a reply; Enter on an empty line, /exit or Esc "
                 f"returns to the menu.")
        while True:
            prompt = self.ask("[bold]you[/bold]", back=False)
            if prompt in ("", "/exit", "/quit") or wants_back(prompt) and prompt.lower() not in ("b", "back"):
                return
            if prompt.startswith("/"):
                self._chat_setting(prompt, settings)
                continue
            text = chat_prompt(loaded.tokenizer, prompt) if chat else prompt
            self.console.print("[bold]model[/bold]: ", end="")
            if not chat:
                self.console.print(prompt, end="", markup=False, highlight=False)
            reply = BlankLines(continuing=not chat)
            try:
                for piece in stream_text(loaded.model, loaded.tokenizer, text, settings["max_new_tokens"],
                                         settings["temperature"], settings["top_k"], settings["top_p"],
                                         stops, special_tokens=runs.with_special_tokens(loaded, chat)):
                    self.console.print(reply(piece), end="", markup=False, highlight=False)
            except KeyboardInterrupt:
                self.console.print()
                self.note("Ctrl-C: reply stopped")
                continue
            if chat and not reply.started:
                self.console.print("[dim](a blank reply)[/dim]", end="")
            self.console.print()

    def _chat_setting(self, command: str, settings: dict) -> None:
        name, _, value = command[1:].partition(" ")
        if name == "settings" or name not in settings:
            if name != "settings":
                self.error(f"unknown command /{name}")
            self.say(", ".join(f"{k} {v}" for k, v in settings.items()))
            return
        kind = int if name in ("top_k", "max_new_tokens") else float
        try:
            parsed = kind(value)
        except ValueError:
            self.error(f"/{name} needs a {'whole number' if kind is int else 'number'}")
            return
        limits = {"temperature": parsed >= 0, "top_k": parsed >= 1, "top_p": 0 < parsed <= 1,
                  "max_new_tokens": parsed >= 1}
        if not limits[name]:
            self.error(f"/{name} {value}: out of range (temperature >= 0, top_k >= 1, 0 < top_p <= 1, "
                       f"max_new_tokens >= 1)")
            return
        settings[name] = parsed
        self.say(f"{name} = {parsed}")

    def evaluate(self) -> None:
        path = self.pick_model("Model to evaluate")
        with self.console.status("loading the model ..."):
            loaded = load_trained(path, say=self.say)
        # The command line's defaults (the whole validation split), so both give the same figures.
        cache_dir = self.configs["data"].cache_dir if loaded.kind == "huggingface" else None
        with WaitDisplay(self.console) as progress:
            result = runs.evaluate_model(runs.EvalRequest(path, cache_dir=cache_dir), loaded, progress, say=self.say)
        self.say(f"{result.model} ({result.checkpoint or loaded.kind}) on the validation split of "
                 f"{result.data}: loss [bold]{result.loss:.4f}[/bold], perplexity {result.perplexity:.2f} "
                 f"({result.sequences} sequences of {result.seq_len} tokens)")

    def export(self) -> None:
        path = self.pick_model("Model to export")
        self.say("[dim]hf: the Hugging Face layout (transformers) · gguf: one file for llama.cpp and Ollama[/dim]")
        fmt = self.choose(f"Format ({'/'.join(runs.EXPORT_FORMATS)})", list(runs.EXPORT_FORMATS),
                          default=runs.DEFAULT_EXPORT_FORMAT)
        quant = runs.DEFAULT_GGUF_QUANT
        if fmt == "gguf":
            self.say(f"[dim]tensor types: {', '.join(QUANTS)}[/dim]")
            quant = self.choose("GGUF tensor type", list(QUANTS), default=runs.DEFAULT_GGUF_QUANT)
        self.say(f"[dim]a new (or empty) folder; {PROMPT_KEYS}[/dim]")
        while True:
            out = Path(self.ask("Export to", default=str(self.runs_dir / "exports" / f"{path.stem}-{fmt}")))
            out = out.expanduser()
            if out.exists() and not out.is_dir():
                self.error(f"{out} is a file: name a new folder")
            elif out.is_dir() and any(out.iterdir()):
                self.error(f"{out} is not empty: name a new folder")
            else:
                break
        with self.console.status("exporting ..."):
            loaded = load_trained(path, say=self.say)
            exported = runs.export_model(loaded, out, fmt, quant)
        if fmt == "gguf":
            self.say(f"✓ exported to {exported} ({quant}, {exported.stat().st_size / 1e6:.1f} MB) with an Ollama "
                     f"Modelfile beside it: llama.cpp loads the file, `ollama create NAME -f "
                     f"{exported.parent / 'Modelfile'}` makes an Ollama model")
        else:
            layout = "Mixtral" if loaded.model.config.use_moe else "Llama"
            self.say(f"✓ exported to {exported} (Hugging Face {layout} layout: transformers.AutoModelForCausalLM "
                     f"loads it)")


def model_problem(path: Path, runs_only: bool = False) -> Optional[str]:
    """Why `path` is not a model the menus can open (run_only: not a run to resume), or
    None; from the files alone, nothing is loaded."""
    if not path.exists():
        return f"{path}: no such file or folder"
    if (path / "run.json").is_file():
        return None
    if runs_only:
        return f"{path}: not a run (no run.json in it)"
    if path.is_file():
        return None if path.suffix.lower() == ".gguf" else f"{path}: a file, but not a .gguf file"
    if (path / checkpoint.MANIFEST_FILE).is_file() and (path.parent / "run.json").is_file():
        return None
    if (path / "config.json").is_file():
        return None
    return f"{path}: not a run (run.json), one of its checkpoints, a Hugging Face model folder (config.json) " \
           f"nor a .gguf file"


class BlankLines:
    """A streamed reply with runs of blank lines collapsed to one, and no blank lines
    before it (`continuing`: it continues text already shown, so its first spaces count)."""

    def __init__(self, continuing: bool = False):
        self.started = continuing
        self.pending = ""  # whitespace held until the next visible character

    def __call__(self, piece: str) -> str:
        shown = []
        for char in piece:
            if char.isspace():
                self.pending += char
                continue
            if self.pending:
                newlines = self.pending.count("\n")
                indent = self.pending.rsplit("\n", 1)[-1]
                if newlines == 0:
                    shown.append(self.pending if self.started else "")
                else:
                    shown.append(("\n" * min(newlines, 2) if self.started else "") + indent)
                self.pending = ""
            self.started = True
            shown.append(char)
        return "".join(shown)


def run_wizard(console: Console, stream: Optional[TextIO] = None, **options) -> int:
    """The wizard from its system checks to Exit; 0 on Exit or end of input."""
    return Wizard(console, stream, **options).run()
