"""The interactive wizard that `python train.py` opens on a terminal.

LightLM's menus with the same numbers (its walkthrough `2, 5, 0.001, y, 7, 1` trains a
model for a ~4-second budget), on top of the same functions the subcommands call. Menus
are data; every prompt reads from an injectable console and input stream, so tests drive
the whole wizard with `io.StringIO`. End of input (Ctrl-D) leaves cleanly from any prompt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, TextIO

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

import checkpoint
from budget import CostModel, HardwareProfile, Plan, batch_tokens, parse_duration, plan, probe, sequence_length, \
    training_memory
from config_editor import ConfigEditor, EndOfInput, ask, choose, confirm
from config_io import ConfigError, load_configs, save_configs
from data import BUILTIN, DataConfig, DataError, builtin_documents, hub_reachable, prepare, read_source
import runs
from display import check_table, display_for, format_bytes, format_seconds, report_outcome
from gguf_io import QUANTS
from lora import LoRAConfig
from model import PRESETS, ModelConfig
from runs import chat_prompt, data_summary, default_configs, fit_model_to_data, list_runs, load_trained, stop_token, \
    stream_text
from system_check import HardwareManager, SystemCheck
from trainer import TrainerConfig, resolve_dtype

MAIN_MENU = (("1", "Start training"), ("2", "Manage dataset/configuration"), ("3", "Exit"),
             ("4", "Resume a run"), ("5", "Fine-tune a model with LoRA / QLoRA"),
             ("6", "Chat / generate with a model"), ("7", "Evaluate a checkpoint"), ("8", "Export a model"))
MAIN_ACTIONS = {"1": "start_training", "2": "manage", "3": "exit", "4": "resume", "5": "finetune", "6": "chat",
                "7": "evaluate", "8": "export"}
MANAGE_MENU = (("1", "Change dataset"), ("2", "Load existing configuration"),
               ("3", "Create new configuration (from presets)"), ("4", "Save current configuration"),
               ("5", "Optimize for training time"), ("6", "Edit configuration table"),
               ("7", "Continue with current settings"), ("8", "Exit"))
MANAGE_ACTIONS = {"1": "change_dataset", "2": "load_config", "3": "new_config", "4": "save_config",
                  "5": "optimize", "6": "edit_config", "7": "back", "8": "exit"}
RESUME_HINT = "menu 4 (Resume a run), or python train.py resume"
MICRO_BATCH_LIMIT = 256  # the largest micro-batch the Optimize screen looks for
RECOVERABLE = (ConfigError, DataError, ValueError, checkpoint.CheckpointError, FileNotFoundError, OSError,
               runs.RunInUse)


class Quit(Exception):
    """The user chose Exit."""


def menu_table(title: str, items: tuple) -> Group:
    """A numbered menu under its title (the title is not a table title: a narrow menu
    would wrap it)."""
    table = Table.grid(padding=(0, 1))
    for key, label in items:
        table.add_row(f"{key}.", label)
    return Group(Text(title, style="bold cyan"), table)


def derived_figures(configs: dict, section: str = "model") -> list[tuple[str, str]]:
    """What the editor shows under the table (any `section`): size, tokens per step, memory."""
    model, trainer = configs["model"], configs["trainer"]
    figures = [("parameters", f"{model.num_params() / 1e6:.2f}M"
                              + (f" ({model.num_params(active=True) / 1e6:.2f}M active)" if model.use_moe else ""))]
    figures.append(("tokens per optimizer step", f"{trainer.tokens_per_step:,} ({trainer.batch_size} x "
                                                 f"{trainer.accumulation_steps} x {trainer.max_seq_len})"))
    figures.append(("estimated training memory",
                    format_bytes(training_memory(model, trainer.batch_size, trainer.max_seq_len))))
    return figures


class Wizard:
    """The menus. `stream` replaces the keyboard (tests); `out_dir` holds the runs."""

    def __init__(self, console: Console, stream: Optional[TextIO] = None, out_dir: str | Path = "checkpoints",
                 cache_dir: str = ".cache/sprat", run_checks: bool = True):
        self.console = console
        self.stream = stream
        self.out_dir = Path(out_dir)
        self.run_checks = run_checks
        self.configs = {**default_configs(cache_dir=cache_dir), "lora": LoRAConfig()}
        self.configs["trainer"] = dataclasses.replace(self.configs["trainer"], path_to_checkpoints=str(self.out_dir))
        self.plan: Optional[Plan] = None  # the accepted time-budget plan, until the configuration changes
        self._prepared: dict = {}
        self._throughput: dict = {}  # measured tokens/s by (model, micro-batch, sequence length, dtype, device)

    # ---- input ------------------------------------------------------------------------------------
    def ask(self, prompt: str, default: Optional[str] = None) -> str:
        return ask(self.console, prompt, self.stream, default)

    def choose(self, prompt: str, options: list[str], default: Optional[str] = None) -> str:
        return choose(self.console, prompt, options, self.stream, default, show_options=False)

    def confirm(self, prompt: str, default: Optional[bool] = None) -> bool:
        return confirm(self.console, prompt, self.stream, default)

    def say(self, text: str) -> None:
        self.console.print(text)

    def error(self, text: str) -> None:
        self.console.print(f"[red]{text}[/red]", markup=True)

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
        except EndOfInput:
            self.say("\nend of input: bye")
            return 0
        except KeyboardInterrupt:
            self.say("\ninterrupted: bye")
            return 130
        return 0

    def system_checks(self) -> None:
        with self.console.status("checking the system ..."):
            report = SystemCheck(checkpoint_dir=self.out_dir).run_all()
            hardware = HardwareManager()
        self.console.print(check_table(report, hardware))
        if not report.ok:
            self.error("some checks failed (above): training may not work on this machine")

    def main_menu(self) -> None:
        while True:
            self.console.print()
            self.console.print(menu_table("Training Setup", MAIN_MENU))
            answer = self.choose(f"Select option (1-{len(MAIN_MENU)})", [key for key, _ in MAIN_MENU])
            self.dispatch(MAIN_ACTIONS[answer])

    def dispatch(self, action: str) -> None:
        """Run one menu action; its errors and Ctrl-C come back to the menu."""
        try:
            getattr(self, action)()
        except (Quit, _Back, EndOfInput):
            raise
        except KeyboardInterrupt:
            self.error("\ncancelled")
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
        raise Quit

    def back(self) -> None:
        raise _Back

    def manage(self) -> None:
        while True:
            self.console.print()
            self.console.print(menu_table("Dataset and Configuration Management", MANAGE_MENU))
            self.say(f"dataset: {self.configs['data'].source}; model: {self.model_line()}")
            answer = self.choose(f"Select option (1-{len(MANAGE_MENU)})", [key for key, _ in MANAGE_MENU])
            try:
                self.dispatch(MANAGE_ACTIONS[answer])
            except _Back:
                return

    @property
    def runs_dir(self) -> Path:
        """Where new runs go: the trainer's path_to_checkpoints (editable in the table)."""
        return Path(self.configs["trainer"].path_to_checkpoints)

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
            with self.console.status(f"preparing {data_config.source} (tokenizer and token blocks; cached after "
                                     f"the first time) ..."):
                prepared = prepare(data_config, seq_len, fallback_to_builtin=True)
            for line in data_summary(prepared):
                self.say(line)
            self._prepared[key] = prepared
        return self._prepared[key]

    def change_dataset(self) -> None:
        options = (("1", "built-in corpus (offline: Python's standard library and docs)"),
                   ("2", "a local file or folder (.txt .md .json .jsonl .csv .parquet)"),
                   ("3", "a Hugging Face hub dataset"), ("4", "back"))
        self.console.print(menu_table("Dataset", options))
        answer = self.choose("Select option (1-4)", ["1", "2", "3", "4"])
        data = self.configs["data"]
        if answer == "4":
            return
        if answer == "1":
            data = dataclasses.replace(data, source=BUILTIN)
        elif answer == "2":
            while True:
                path = Path(self.ask("Path to the file or folder")).expanduser()
                if path.exists():
                    break
                self.error(f"{path}: no such file or folder")
            data = dataclasses.replace(data, source=str(path))
        else:
            name = self.ask("Hub dataset name (e.g. wikitext)")
            with self.console.status("checking the hub ..."):
                reachable = hub_reachable(data.hub_timeout_s)
            if not reachable:
                self.error("the Hugging Face hub is not reachable from here: keeping the current dataset "
                           "(the built-in corpus and local files work offline)")
                return
            config_name = self.ask("Configuration (e.g. wikitext-2-raw-v1; Enter for none)")
            data = dataclasses.replace(data, source=name, hub_config=config_name or None)
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
                ("train / validation tokens", f"{report.train_tokens:,} / {report.val_tokens:,}"),
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
        found = sorted(Path("configs").glob("*.json")) + sorted(Path("configs").glob("*.y*ml")) + \
            sorted(self.runs_dir.glob("*/run.json"))
        if found:
            self.say("configurations found: " + ", ".join(str(p) for p in found[:10]))
        path = ""
        while not path:
            path = self.ask("Path of the configuration file (.json / .yaml, or a run's run.json)",
                            default=str(found[0]) if found else None)
        configs, unknown = load_configs(path, self.configs)
        self.configs = configs
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
        name = self.choose(f"Preset ({', '.join(PRESETS)})", list(PRESETS), default="2M")
        self.configs["model"] = ModelConfig.from_name(name)
        self.configs["trainer"] = dataclasses.replace(default_configs()["trainer"],
                                                      path_to_checkpoints=str(self.runs_dir))
        self.plan = None
        self._fix_context()
        self.say(f"✓ new configuration from preset {name}: {self.model_line()}")

    def save_config(self) -> None:
        path = self.ask("Save to (.json, or .yaml)", default="configs/sprat.json")
        self.say(f"✓ saved {save_configs(path, self.configs)}")

    def edit_config(self) -> None:
        sections = list(self.configs)
        self.console.print(menu_table("Edit which table?", tuple((str(i), s) for i, s in enumerate(sections, 1))))
        section = sections[int(self.choose(f"Select table (1-{len(sections)})",
                                           [str(i) for i in range(1, len(sections) + 1)])) - 1]
        presets = {"model": {name: (lambda name=name: ModelConfig.from_name(name)) for name in PRESETS},
                   "trainer": {"defaults": lambda: dataclasses.replace(default_configs()["trainer"],
                                                                        path_to_checkpoints=str(self.runs_dir))},
                   "data": {"defaults": lambda: DataConfig(cache_dir=self.configs["data"].cache_dir)},
                   "lora": {"defaults": LoRAConfig}}[section]
        before = {name: config.to_dict() for name, config in self.configs.items()}
        editor = ConfigEditor(self.console, self.stream, presets=presets, derived=derived_figures)
        self.configs = editor.edit(self.configs, section)
        self._fix_context()
        if self.plan is not None and before != {name: config.to_dict() for name, config in self.configs.items()}:
            self.plan = None
            self.say("the configuration no longer is the planned one: the estimate at start comes from measurements")

    def _fix_context(self) -> None:
        model, trainer = self.configs["model"], self.configs["trainer"]
        if model.context_len < trainer.max_seq_len:
            self.configs["model"] = dataclasses.replace(model, context_len=trainer.max_seq_len)

    # ---- planning ---------------------------------------------------------------------------------
    def optimize(self) -> None:
        while True:
            text = self.ask("Enter desired training time in hours (e.g. 24.0), or with a unit (90s, 20m, 2h)")
            try:
                budget = parse_duration(text)
                break
            except ValueError as error:
                self.error(str(error))
        seq_len = sequence_length(budget)
        prepared = self.prepared_data(seq_len)
        device = self.configs["trainer"].device
        hardware = HardwareProfile.detect(None if device == "auto" else device)
        self.say("\n[bold]Starting configuration optimization[/bold]")
        self.say(f"target training time: {format_seconds(budget)} ({budget / 3600:.6f} hours), counted from the "
                 f"start of training")
        with self.console.status("measuring this machine (a few short training steps; cached afterwards) ..."):
            probes, cached = probe(hardware, len(prepared.tokenizer), seq_len, max(1, batch_tokens(budget) // seq_len),
                                   min(0.5, max(0.1, 0.005 * budget)), self.configs["data"].cache_dir)
        the_plan = plan(budget, hardware, prepared.report.train_tokens, len(prepared.tokenizer), probes=probes,
                        seq_len=seq_len, whole_run=False)
        with self.console.status("measuring the memory of a training step ..."):
            manager = HardwareManager(hardware.device)
            max_batch = manager.max_micro_batch(the_plan.model, seq_len, limit=MICRO_BATCH_LIMIT)
        self.console.print(plan_table(the_plan, hardware, cached, max_batch, manager.flash_attention_available))
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
        self.console.print(self.summary_table(model_config, trainer_config, prepared))
        if self.plan is not None:
            self.say("starting the accepted plan (the budget counts from now)")
        elif not self.confirm("Start training?", default=True):
            return
        run_dir = runs.new_run_dir(None, trainer_config, None)
        self.run_operation(lambda display: runs.train_prepared(self.configs, prepared, run_dir, display))
        self.plan = None

    def run_operation(self, operation: Callable[[object], runs.RunOutcome]) -> None:
        """`operation(display)`, a training operation of runs.py, under the live display;
        then its report."""
        display = display_for(self.console)
        with display:
            outcome = operation(display)
        report_outcome(self.console, outcome, display.history, resume_hint=RESUME_HINT)

    def summary_table(self, model_config: ModelConfig, trainer_config: TrainerConfig, prepared) -> Table:
        seq_len, batch = trainer_config.max_seq_len, trainer_config.batch_size
        tokens_per_step = trainer_config.tokens_per_step
        memory = training_memory(model_config, batch, seq_len)
        if self.plan is not None:
            seconds, steps = self.plan.train_seconds, f"~{self.plan.steps:,} (the deadline ends the run)"
            rate, measured = self.plan.tokens_per_second, "measured on this machine for the plan"
        else:
            rate, measured = self.throughput(model_config, batch, seq_len, memory)
            steps_per_epoch = math.ceil(len(prepared.train) / batch / trainer_config.accumulation_steps)
            total = steps_per_epoch * trainer_config.num_epochs
            steps = f"{total:,} ({trainer_config.num_epochs} epoch{'s' if trainer_config.num_epochs > 1 else ''} " \
                    f"of {steps_per_epoch:,})"
            if trainer_config.max_steps and trainer_config.max_steps < total:
                total = trainer_config.max_steps
                steps = f"{total:,} (max_steps; an epoch is {steps_per_epoch:,})"
            seconds = total * tokens_per_step / rate
            if trainer_config.time_limit_s and (seconds > trainer_config.time_limit_s
                                                or trainer_config.schedule_by == "time"):
                seconds = trainer_config.time_limit_s
                total = max(1, round(seconds * rate / tokens_per_step))
                steps = f"~{total:,} (time_limit_s ends the run)"
        table = Table(title="about to train", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("model", f"{model_config.num_layers} layers x {model_config.num_dims}, {model_config.num_heads}/"
                               f"{model_config.num_kv_heads} heads, FFN {model_config.ffn_hidden_dims}"
                               + (f", {model_config.moe_num_experts} experts" if model_config.use_moe else ""))
        table.add_row("parameters", f"{model_config.num_params() / 1e6:.2f}M")
        table.add_row("data", f"{prepared.report.source}: {prepared.report.train_tokens:,} training tokens")
        table.add_row("tokens per optimizer step", f"{tokens_per_step:,} ({batch} x {trainer_config.accumulation_steps}"
                                                   f" x {seq_len})")
        table.add_row("optimizer steps", steps)
        table.add_row("tokens to train on", f"~{seconds * rate / 1e6:,.2f}M")
        table.add_row("estimated time", f"{format_seconds(seconds)} at {rate:,.0f} tokens/s ({measured})")
        table.add_row("estimated memory", format_bytes(memory))
        table.add_row("runs in", str(self.runs_dir))
        return table

    def throughput(self, model_config: ModelConfig, batch_size: int, seq_len: int,
                   memory: int) -> tuple[float, str]:
        """Tokens per second of this model at this micro-batch, measured with a few real
        training steps; from the planner's cached probes instead when the step would not
        fit in memory (measuring it could take the machine down)."""
        trainer_config = self.configs["trainer"]
        manager = HardwareManager(None if trainer_config.device == "auto" else trainer_config.device)
        dtype = resolve_dtype(trainer_config, torch.device(manager.device))
        key = (json.dumps(model_config.to_dict(), sort_keys=True), batch_size, seq_len, str(dtype), manager.device)
        if key not in self._throughput and memory < 0.8 * manager.memory_available_bytes:
            with self.console.status("measuring a few training steps of this model on this machine (a step takes "
                                     "as long as in training) ..."):
                self._throughput[key] = manager.tokens_per_second(model_config, batch_size, seq_len, dtype=dtype)
        if key in self._throughput:
            return self._throughput[key], "measured: 3+ steps of this model"
        with self.console.status("estimating throughput from the planner's probes (cached afterwards) ..."):
            probes, _ = probe(manager.profile(), model_config.vocab_size, seq_len, 2, 0.3,
                              self.configs["data"].cache_dir)
        self.error(f"this step needs ~{format_bytes(memory)}, more than the {format_bytes(manager.memory_available_bytes)}"
                   f" available: training will fall back to smaller micro-batches or fail")
        rate = 1.0 / CostModel.fit(probes).seconds_per_token(model_config.flops_per_token(seq_len))
        return rate, "estimated from small probes: the step does not fit in memory to measure it"

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
        if not runs_only:
            hint += " (a run, a checkpoint, a Hugging Face model directory or a .gguf file)"
        while True:
            answer = self.ask(f"{what}: {hint}", default="1" if found else None)
            if answer.isdigit() and found and 1 <= int(answer) <= len(found):
                return found[int(answer) - 1].path
            path = Path(answer).expanduser()
            if path.exists():
                return path
            self.error(f"{answer}: not a number from the list nor an existing path")

    def resume(self) -> None:
        run_dir = self.pick_model("Run to resume", runs_only=True)
        self.run_operation(lambda display: runs.resume(runs.ResumeRequest(run_dir), display, self.say))

    def finetune(self) -> None:
        base = self.pick_model("Base model")
        while True:
            data = Path(self.ask("Instruction data (.json / .jsonl / .csv / .parquet file or folder)")).expanduser()
            if data.exists():
                break
            self.error(f"{data}: no such file or folder")
        lora = self.configs["lora"]
        self.say(f"LoRA table (menu 2 → 6 → lora edits the rest): rank {lora.rank}, alpha {lora.alpha:g}, "
                 f"targets {', '.join(lora.target_modules)}")
        rank = self._ask_int("LoRA rank", lora.rank)
        qlora = self.confirm("Quantize the frozen base to 4-bit NF4 (QLoRA)?", default=lora.quantize_base)
        budget, epochs = self._ask_budget(), runs.FinetuneRequest.epochs
        if budget is None:
            epochs = self._ask_int("Epochs", runs.FinetuneRequest.epochs)
        general = self.ask("General text the fine-tune must not get worse on (the guard: 'builtin', a file or "
                           "folder, or 'none')", default=BUILTIN)
        alpha = 2.0 * rank if lora.alpha == 2.0 * lora.rank else lora.alpha  # keep the scale alpha/r = 2
        self.configs["lora"] = dataclasses.replace(lora, rank=rank, alpha=alpha, quantize_base=qlora)
        request = runs.FinetuneRequest(base=str(base), data=str(data), epochs=epochs, budget=budget,
                                       general_data=None if general.lower() in ("none", "off", "no") else general,
                                       out=str(self.runs_dir), cache_dir=self.configs["data"].cache_dir,
                                       lora=self.configs["lora"], started=time.time())
        self.run_operation(lambda display: runs.finetune(request, display, self.say))

    def _ask_budget(self) -> Optional[str]:
        """A time budget ('5m'), or None to train by epochs."""
        while True:
            answer = self.ask("Time budget from now to the end (e.g. 90s, 5m, 1h; empty: by epochs)", default="").strip()
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
        settings = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "max_new_tokens": 100}
        chat = loaded.kind == "finetuned"
        self.say(f"loaded {loaded.source} ({loaded.checkpoint or loaded.kind}); "
                 f"{'chat' if chat else 'text continuation'} mode. Commands: /temperature X, /top_k N, /top_p X, "
                 f"/max_new_tokens N, /settings; an empty line or /exit returns to the menu.")
        while True:
            prompt = self.ask("[bold]you[/bold]")
            if prompt in ("", "/exit", "/quit"):
                return
            if prompt.startswith("/"):
                self._chat_setting(prompt, settings)
                continue
            text = chat_prompt(loaded.tokenizer, prompt) if chat else prompt
            if not chat:
                self.console.print(prompt, end="", markup=False, highlight=False)
            for piece in stream_text(loaded.model, loaded.tokenizer, text, settings["max_new_tokens"],
                                     settings["temperature"], settings["top_k"], settings["top_p"], stop_token(loaded)):
                self.console.print(piece, end="", markup=False, highlight=False)
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
        with self.console.status("evaluating ..."):
            loaded = load_trained(path, say=self.say)
            # The command line's defaults (the whole validation split), so both give the same figures.
            cache_dir = self.configs["data"].cache_dir if loaded.kind == "huggingface" else None
            result = runs.evaluate_model(runs.EvalRequest(path, cache_dir=cache_dir), loaded)
        self.say(f"{result.model} ({result.checkpoint or loaded.kind}) on the validation split of "
                 f"{result.data}: loss [bold]{result.loss:.4f}[/bold], perplexity {result.perplexity:.2f} "
                 f"({result.sequences} sequences of {result.seq_len} tokens)")

    def export(self) -> None:
        path = self.pick_model("Model to export")
        fmt = self.choose("Format: hf (transformers) or gguf (llama.cpp, Ollama)", list(runs.EXPORT_FORMATS),
                          default="hf")
        quant = self.choose(f"GGUF tensor type ({', '.join(QUANTS)})", list(QUANTS), default="f16") \
            if fmt == "gguf" else "f16"
        out = Path(self.ask("Export to (a new directory)", default=f"exports/{path.stem}-{fmt}")).expanduser()
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


class _Back(Exception):
    """Leave the manage menu for the main menu."""


def plan_table(the_plan: Plan, hardware: HardwareProfile, cached: bool, max_batch: int, flash: bool) -> Table:
    m, t = the_plan.model, the_plan.trainer
    table = Table(title="planned configuration", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("hardware", f"{hardware.device}: {hardware.device_name}, {hardware.threads} threads, "
                              f"{format_bytes(hardware.memory_bytes)} available; flash attention "
                              f"{'yes' if flash else 'no'}")
    most = "" if max_batch < MICRO_BATCH_LIMIT else " or more (the most it looks for)"
    table.add_row("largest micro-batch", f"{max_batch} sequences of {t.max_seq_len} tokens{most} for this model (from "
                                         f"measured activation memory)" if max_batch else
                                         "not even one sequence fits in memory")
    table.add_row("measured", f"{the_plan.tokens_per_second:,.0f} tokens/s for this shape "
                              f"({'from the cache' if cached else 'just measured'})")
    table.add_row("model", f"{m.num_layers} layers x {m.num_dims} wide, {m.num_heads}/{m.num_kv_heads} heads, FFN "
                           f"{m.ffn_hidden_dims}: {the_plan.params / 1e6:.2f}M parameters")
    table.add_row("training", f"batch {t.batch_size} x {t.max_seq_len} tokens, learning rate {t.learning_rate:g} "
                              f"(cosine to {t.min_lr:g})")
    table.add_row("time", f"{format_seconds(the_plan.budget_s)} from the start of training to the saved checkpoint: "
                          f"{the_plan.train_seconds:.1f} s of steps, then the final evaluation and the save")
    table.add_row("expected", f"~{the_plan.steps:,} steps, {the_plan.tokens / 1e6:.2f}M tokens "
                              f"({the_plan.epochs:.2f} epochs), memory {format_bytes(the_plan.memory_bytes)}")
    table.add_row("why", the_plan.reasoning)
    return table


def run_wizard(console: Console, stream: Optional[TextIO] = None, **options) -> int:
    """The wizard from its system checks to Exit; 0 on Exit or end of input."""
    return Wizard(console, stream, **options).run()
