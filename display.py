"""Drawing a training run on the terminal: the live progress display, the end-of-run
summary, the loss curve in text, and a PNG of the curves (when matplotlib is installed).

The trainer only emits typed events (events.py); `LiveDisplay` is a callback that renders
them with rich, `PlainDisplay` writes lines; `display_for` picks one for a console. Both
front ends (`train.py`, `wizard.py`) render runs, plans, checks and results through here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, TaskProgressColumn, TextColumn
from rich.progress import Progress as ProgressBar
from rich.table import Table

from events import (Callback, CheckpointSaved, CheckpointSetAside, EarlyStop, Eval, Event, Fallback, Finished,
                    Interrupt, NonFinite, Progress, Reestimate, Resumed, Start, Step, Stopped, duration_text,
                    perplexity)


@dataclass
class History:
    """The curves of one run, as the events reported them."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)

    def record(self, event: Event) -> None:
        if isinstance(event, Step):
            self.steps.append(event.step)
            self.losses.append(event.loss)
            self.learning_rates.append(event.lr)
        elif isinstance(event, Eval):
            self.val_steps.append(event.step)
            self.val_losses.append(event.val_loss)


def format_seconds(seconds: float) -> str:
    return duration_text(seconds, gap="", fine=False)


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit in ("B", "KB") else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


def size_line(start: Start) -> str:
    """'139.4M parameters (base in NF4; 4.88M trainable)'."""
    base = "; base in NF4" if start.quantized else ""
    return f"{start.params / 1e6:.2f}M parameters ({start.trainable / 1e6:.2f}M trainable{base})"


def dtype_text(start: Start) -> str:
    """'float32', or with why auto chose it: 'bfloat16: measured 1.52x as fast as fp32 on this CPU'."""
    return f"{start.dtype}: {start.dtype_note}" if start.dtype_note else start.dtype


def guard_text(event: Eval) -> str:
    """A fine-tune's general-text figure: ', general perplexity 12.3 (+1.2%, within the guard)'."""
    if event.general_loss is None:
        return ""
    verdict = "within the guard" if event.within_guard else "over the guard"
    return f", general perplexity {event.general_perplexity:.2f} ({event.general_rise:+.1%}, {verdict})"


def length(start: Start) -> str:
    """How long a run will train, from its start event: a deadline that sets the schedule
    replaces the step count, and the estimate the plan or summary showed is repeated."""
    steps = f"{start.total_steps:,} optimizer steps"
    if start.time_left_s is None:
        text = steps
    elif start.schedule_by == "time" or not start.total_steps:
        text = f"{format_seconds(start.time_left_s)} of training (the deadline ends the run)"
    else:
        text = f"{steps} or {format_seconds(start.time_left_s)} of training, whichever ends first"
    return text + estimate_text(start)


def estimate_text(start: Start) -> str:
    """'; estimated ~395 steps in 1m05s (interpolated: ...), corrected after the first steps'."""
    if start.estimated_steps is None:
        return ""
    seconds = format_seconds(start.estimated_seconds) if start.estimated_seconds is not None else "?"
    basis = f" ({start.estimate_basis})" if start.estimate_basis else ""
    if start.total_steps and start.schedule_by != "time":  # the steps are known: only their time is estimated
        return f"; estimated {seconds}{basis}"
    return f"; estimated ~{start.estimated_steps:,} steps in {seconds}{basis}, corrected from the real speed after " \
           f"the first steps"


def total_text(total: int, estimated: bool) -> str:
    return f"~{total:,}" if estimated else f"{total:,}"


def reestimate_text(event: Reestimate) -> str:
    was = f" (was ~{event.previous_steps:,})" if event.previous_steps is not None else ""
    return (f"re-estimated from the real speed of {event.from_steps} step{'s' if event.from_steps != 1 else ''} "
            f"({event.tokens_per_s:,.0f} tokens/s): ~{event.steps:,} steps{was}, "
            f"{format_seconds(event.seconds_left)} left")


def expert_shares(load: list[list[float]]) -> list[float]:
    """Each expert's share of the tokens routed in the last step, over all MoE layers
    (`load` is the trainer's (layers, experts) token counts)."""
    totals = [sum(layer[expert] for layer in load) for expert in range(len(load[0]))]
    routed = sum(totals)
    return [total / routed if routed else 0.0 for total in totals]


def load_text(load: list[list[float]]) -> str:
    return " ".join(f"{share:.0%}" for share in expert_shares(load))


NOTICES = (Stopped, EarlyStop, NonFinite, Resumed, CheckpointSetAside)  # shown as their fields


def details(event: Event) -> str:
    return ", ".join(f"{key} {value}" for key, value in dataclasses.asdict(event).items() if key != "time")


def _memory_text(memory: Optional[dict]) -> str:
    if not memory:
        return "-"
    if "cuda_allocated_mb" in memory:
        return f"GPU {memory['cuda_allocated_mb']:.0f} MB (peak {memory['cuda_peak_mb']:.0f} MB)"
    return f"{memory.get('rss_mb', 0):.0f} MB RSS"


class LiveDisplay:
    """A trainer callback drawing a progress bar with ETA, loss, learning rate, tokens/s,
    memory, the last validation loss / perplexity and (with MoE) the expert load.
    Use as a context manager around `Trainer.fit()`."""

    def __init__(self, console: Console, title: str = "training"):
        self.console = console
        self.history = History()
        self.metrics: dict = {}
        self.progress = ProgressBar(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[count]}"), TextColumn("eta {task.fields[eta]}"),
                                 console=console)
        self.title = title
        self.task = self.progress.add_task(title, total=1, eta="-", count="step 0/?")
        self.waits: dict[str, int] = {}  # a bar per wait before training (tokenizing the data), until it ends
        self.live = Live(Group(self.progress, self._metrics_table()), console=console, refresh_per_second=4,
                         transient=False)

    def __enter__(self) -> "LiveDisplay":
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self._refresh()
        self.live.stop()

    def _metrics_table(self) -> Group:
        grid = Table.grid(padding=(0, 3))
        m = self.metrics
        cells = [f"loss [bold]{m['loss']:.3f}[/bold]" if "loss" in m else "loss -",
                 f"lr {m['lr']:.2e}" if "lr" in m else "lr -",
                 f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else "- tok/s",
                 f"memory {_memory_text(m.get('memory'))}"]
        if "val_loss" in m:
            cells.append(f"val loss [bold]{m['val_loss']:.3f}[/bold] (ppl {m['perplexity']:.1f})")
        grid.add_row(*cells)
        if not m.get("expert_load"):
            return Group(grid)
        return Group(grid, f"expert load {load_text(m['expert_load'])} (share of routed tokens per expert, "
                           f"all {len(m['expert_load'])} MoE layers)")

    def _refresh(self) -> None:
        self.live.update(Group(self.progress, self._metrics_table()))

    def _wait(self, event: Progress) -> None:
        """A bar above the training bar while `event.task` lasts, removed when it is done."""
        if event.task not in self.waits:
            self.waits[event.task] = self.progress.add_task(event.task, total=event.total, eta="-", count="")
        task = self.waits[event.task]
        eta = format_seconds(event.eta_s) if event.eta_s is not None else "-"
        self.progress.update(task, completed=event.done, total=event.total, eta=eta,
                             count=f"{event.done:,}/{event.total:,} {event.unit}")
        if event.done >= event.total:
            self.progress.remove_task(self.waits.pop(event.task))

    def __call__(self, event: Event) -> None:
        self.history.record(event)
        if isinstance(event, Start):
            estimated = event.estimated_steps is not None and (event.schedule_by == "time" or not event.total_steps)
            total = event.estimated_steps if estimated else event.total_steps
            eta = format_seconds(event.estimated_seconds) if event.estimated_seconds is not None else "-"
            self.progress.update(self.task, total=max(1, total or 0), completed=event.step, eta=eta,
                                 count=f"step {event.step}/{total_text(total, estimated) if total else '?'}",
                                 description=f"{self.title} (estimated)" if estimated else self.title)
            self.console.print(f"{size_line(event)} on {event.device} ({dtype_text(event)}), {length(event)}, "
                               f"effective batch {event.effective_batch}")
        elif isinstance(event, Step):
            self.metrics.update(loss=event.loss, lr=event.lr, tokens_per_s=event.tokens_per_s)
            if event.memory is not None:
                self.metrics["memory"] = event.memory
            if event.expert_load is not None:
                self.metrics["expert_load"] = event.expert_load
            total = max(event.total_steps, event.step)
            self.progress.update(self.task, total=total, completed=event.step, eta=format_seconds(event.eta_s),
                                 count=f"step {event.step}/{total_text(total, event.total_estimated)}")
        elif isinstance(event, Reestimate):
            completed = self.progress.tasks[self.task].completed
            self.progress.update(self.task, total=max(1, event.steps),
                                 count=f"step {completed:.0f}/{total_text(event.steps, True)}",
                                 description=f"{self.title} (re-estimated)")
            self.console.print(f"[cyan]{reestimate_text(event)}[/cyan]")
        elif isinstance(event, Eval):
            self.metrics.update(val_loss=event.val_loss, perplexity=event.perplexity)
            self.console.print(f"eval at step {event.step}: validation loss {event.val_loss:.3f}, perplexity "
                               f"{event.perplexity:.1f}{guard_text(event)}"
                               f"{'  [green](best)[/green]' if event.improved else ''}")
        elif isinstance(event, CheckpointSaved):
            self.console.print(f"[green]saved checkpoint {event.name}[/green] ({event.seconds:.1f} s)")
        elif isinstance(event, Interrupt):
            self.console.print(f"[yellow]{event.signal}: finishing this step and saving "
                               f"(press again to quit without saving)[/yellow]")
        elif isinstance(event, Fallback):
            self.console.print(f"[yellow]out of memory: {event.action.replace('_', ' ')} at step {event.step}[/yellow]")
        elif isinstance(event, NOTICES):
            self.console.print(f"[yellow]{event.kind.replace('_', ' ')}: {details(event)}[/yellow]")
        elif isinstance(event, Progress):
            self._wait(event)
        elif isinstance(event, Finished) and event.status == "interrupted":  # the bar stays where the run stopped
            self.progress.update(self.task, completed=event.global_step, eta="-")
        elif isinstance(event, Finished):
            self.progress.update(self.task, total=max(1, event.global_step), completed=event.global_step, eta="0s",
                                 count=f"step {event.global_step:,}/{event.global_step:,}", description=self.title)
        self._refresh()


class PlainDisplay:
    """The same events as plain lines, for logs and pipes; `Progress` events of waits
    before training (tokenizing the data) go to `waiting`, lines of their own."""

    def __init__(self, every: int = 10, write: Optional[Callable[[str], None]] = None,
                 waiting: Optional[Callback] = None):
        self.history = History()
        self.every = every
        self.write = write or (lambda text: print(text, flush=True))
        self.waiting = waiting or ProgressLines(self.write)

    def __enter__(self) -> "PlainDisplay":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __call__(self, event: Event) -> None:
        self.history.record(event)
        if isinstance(event, Start):
            self.write(f"training: {size_line(event)} on {event.device} ({dtype_text(event)}), {length(event)}, "
                       f"effective batch {event.effective_batch}")
        elif isinstance(event, Step) and (event.step % self.every == 0 or event.step == event.total_steps):
            experts = f"  experts {load_text(event.expert_load)}" if event.expert_load else ""
            self.write(f"step {event.step:5d}/{total_text(event.total_steps, event.total_estimated)}  loss {event.loss:.3f}  lr {event.lr:.2e}  "
                       f"{event.tokens_per_s:,.0f} tok/s  eta {event.eta_s:.0f}s{experts}")
        elif isinstance(event, Eval):
            self.write(f"eval  step {event.step:5d}  val loss {event.val_loss:.3f}  "
                       f"perplexity {event.perplexity:.1f}{guard_text(event)}{'  (best)' if event.improved else ''}")
        elif isinstance(event, Progress):
            self.waiting(event)
        elif isinstance(event, Reestimate):
            self.write(reestimate_text(event))
        elif isinstance(event, CheckpointSaved):
            self.write(f"saved checkpoint {event.name} ({event.seconds:.1f} s)")
        elif isinstance(event, (Fallback, *NOTICES)):
            self.write(f"{event.kind}: {details(event)}")
        elif isinstance(event, Interrupt):
            self.write(f"\n{event.signal} received: finishing the current step and saving (press again to quit now)")


def progress_text(event: Progress) -> str:
    """'evaluating on the val split: 12/96 batches, eta 31s'."""
    eta = format_seconds(event.eta_s) if event.eta_s is not None else "-"
    return f"{event.task}: {event.done:,}/{event.total:,} {event.unit}, eta {eta}"


class ProgressLines:
    """`Progress` events as lines through `write` (pipes, logs): the first of each wait,
    then at most one every `every_s` seconds, and the last."""

    def __init__(self, write: Callable[[str], None], every_s: float = 2.0):
        self.write = write
        self.every_s = every_s
        self.last_line = -math.inf

    def __call__(self, event: Event) -> None:
        if not isinstance(event, Progress):
            return
        now = time.monotonic()
        if event.done <= 1 or event.done >= event.total or now - self.last_line >= self.every_s:
            self.write(progress_text(event))
            self.last_line = now


class WaitDisplay:
    """`Progress` events of a wait outside training (an evaluation, a comparison, data
    preparation): on a terminal a transient bar per task with n/N and an ETA; elsewhere
    (pipes, logs) `ProgressLines`."""

    def __init__(self, console: Console, every_s: float = 2.0):
        self.console = console
        self.bar = ProgressBar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                               TextColumn("eta {task.fields[eta]}"), console=console, transient=True) \
            if console.is_terminal else None
        self.tasks: dict[str, int] = {}
        self.lines = ProgressLines(lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True),
                                   every_s)

    def __enter__(self) -> "WaitDisplay":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, event: Event) -> None:
        if not isinstance(event, Progress):
            return
        if self.bar is not None:
            if event.task not in self.tasks:
                self.tasks[event.task] = self.bar.add_task(event.task, total=event.total, count="", eta="-")
            eta = format_seconds(event.eta_s) if event.eta_s is not None else "-"
            self.bar.update(self.tasks[event.task], completed=event.done, total=event.total, eta=eta,
                            count=f"{event.done:,}/{event.total:,} {event.unit}")
            return
        self.lines(event)


def text_curve(values: list[float], width: int = 60, height: int = 10) -> str:
    """`values` drawn as a text plot `height` rows high: each of up to `width` columns is
    the mean of its share of the values; the y axis is labelled with the range."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return ""
    columns = min(width, len(finite))
    means = []
    for c in range(columns):
        bucket = finite[c * len(finite) // columns:(c + 1) * len(finite) // columns] or [finite[-1]]
        means.append(sum(bucket) / len(bucket))
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    rows = [[" "] * columns for _ in range(height)]
    for c, value in enumerate(means):
        row = round((high - value) / span * (height - 1))
        rows[row][c] = "•"
    label_width = max(len(f"{high:.2f}"), len(f"{low:.2f}"))
    lines = []
    for r, row in enumerate(rows):
        label = f"{high:.2f}" if r == 0 else f"{low:.2f}" if r == height - 1 else ""
        lines.append(f"{label:>{label_width}} │{''.join(row)}")
    lines.append(" " * label_width + " └" + "─" * columns)
    return "\n".join(lines)


def save_plot(history: History, path: Path) -> Optional[Path]:
    """The training (and validation) loss and the learning rate as a PNG; None when
    matplotlib is not installed or there is nothing to draw."""
    if len(history.steps) < 2:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(9, 4), dpi=100)
    loss_axes, lr_axes = figure.subplots(1, 2)
    loss_axes.plot(history.steps, history.losses, label="training", linewidth=1)
    if history.val_steps:
        loss_axes.plot(history.val_steps, history.val_losses, "o-", label="validation")
    loss_axes.set(xlabel="optimizer step", ylabel="loss", title="loss")
    loss_axes.legend()
    lr_axes.plot(history.steps, history.learning_rates, linewidth=1)
    lr_axes.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def result_table(result, run_dir: Path) -> Table:
    table = Table(title="run summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", result.status)
    table.add_row("optimizer steps", f"{result.global_step:,}")
    table.add_row("tokens seen", f"{result.tokens_seen:,}")
    table.add_row("training time", format_seconds(result.elapsed_s))
    table.add_row("last training loss", f"{result.last_loss:.3f}" if result.last_loss is not None else "-")
    if result.best_val_loss is not None:
        table.add_row("best validation loss", f"{result.best_val_loss:.3f} (perplexity "
                                               f"{perplexity(result.best_val_loss):.1f})")
    table.add_row("checkpoint", str(run_dir / result.last_checkpoint) if result.last_checkpoint else "-")
    return table


def display_for(console: Console, waiting: Optional[Console] = None):
    """The trainer callback for this console: a live display on a terminal, lines otherwise
    (those of waits before training, such as tokenizing, on `waiting` when given: stderr
    beside a command's log)."""
    if console.is_terminal:
        return LiveDisplay(console)
    lines_to = waiting or console
    return PlainDisplay(write=lambda text: console.print(text, markup=False),
                        waiting=ProgressLines(lambda text: lines_to.print(text, markup=False, highlight=False,
                                                                          soft_wrap=True)))


def report_outcome(console: Console, outcome, history: Optional[History] = None,
                   resume_hint: str = "python train.py resume") -> int:
    """The end of a run (a `runs.RunOutcome`): how to resume it, or its summary, curves and
    sample. Returns the exit code: 0 done, 1 stopped on non-finite losses, 130 interrupted."""
    result, run_dir = outcome.result, outcome.run_dir
    if not outcome.is_main:
        return 130 if result.status == "interrupted" else 0
    for note in outcome.notes:
        console.print(note, markup=False)
    if result.status == "interrupted":
        console.print(f"interrupted at step {result.global_step}; checkpoint {result.last_checkpoint} saved.\n"
                      f"resume with: {resume_hint} {run_dir}", markup=False)
        return 130
    best = f"{result.best_val_loss:.3f} (perplexity {perplexity(result.best_val_loss):.1f})" \
        if result.best_val_loss is not None else "n/a"
    console.print(f"{result.status}: {result.global_step} steps, {result.tokens_seen:,} tokens in "
                  f"{result.elapsed_s:.0f} s; best validation loss {best}; run directory {run_dir}", markup=False)
    if console.is_terminal:
        console.print(result_table(result, run_dir))
    if history is not None and len(history.losses) >= 2:
        console.print("training loss by step:\n" + text_curve(history.losses), markup=False)
        plot = save_plot(history, run_dir / "loss.png")
        if plot is not None:
            console.print(f"loss curves plotted in {plot}", markup=False)
    if result.status == "nonfinite":
        return 1
    if outcome.comparison is not None:
        console.print(comparison_text(outcome.comparison), markup=False)
    if outcome.sample is not None and outcome.sample_prompt is not None:
        answer = outcome.sample or "(nothing: the model ended its answer at once)"
        console.print(f"held-out instruction: {outcome.sample_prompt}\nanswer: {answer}", markup=False)
    elif outcome.sample is not None:
        console.print("sample:\n" + outcome.sample, markup=False)
    return 0


def comparison_text(comparison) -> str:
    """A `runs.Comparison` as an aligned table with its verdict."""
    rows = [("", "base", "fine-tuned", "change")]
    rows += [(name, f"{base:.4g}", f"{tuned:.4g}", f"{change:+.1%}") for name, base, tuned, change in comparison.rows()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    general = f"; general text: {comparison.general_data}" if comparison.general_data else ""
    checkpoint = f" ({comparison.checkpoint})" if comparison.checkpoint else ""
    return "\n".join([f"base {comparison.base} vs fine-tuned {comparison.tuned}{checkpoint}",
                      f"task: validation split of {comparison.task_data}{general}", *lines, comparison.verdict()])


def check_table(report, hardware) -> Table:
    """The system check (a `system_check.SystemReport`) and the training device as a table."""
    marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
    table = Table(title=f"system check ({report.seconds:.1f} s)", title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("status")
    table.add_column("details")
    for check in report.checks:
        table.add_row(check.name, marks.get(check.status, check.status), check.message)
    note = hardware.precision_note()
    table.add_row("Training", "", f"device {hardware.device}, dtype {hardware.recommended_dtype()}"
                                  f"{f' ({note})' if note else ''}, flash attention "
                                  f"{'yes' if hardware.flash_attention_available else 'no'}")
    return table


def steps_text(estimate, trainer_config) -> str:
    """'~395 (estimated; the deadline ends the run)' or '1,234 (2 epochs of 617)'."""
    if estimate.ends_by == "epochs":
        per_epoch = estimate.steps // max(trainer_config.num_epochs, 1)
        epochs = trainer_config.num_epochs
        return f"{estimate.steps:,} ({epochs} epoch{'s' if epochs != 1 else ''} of {per_epoch:,})"
    if estimate.ends_by == "max_steps":
        return f"{estimate.steps:,} (max_steps)"
    return f"~{estimate.steps:,} (estimated; the deadline ends the run)"


def summary_table(model_config, trainer_config, report, estimate, memory: int, runs_in: Path) -> Table:
    """What Start training is about to do (the wizard's confirmation), from the one
    `budget.Estimate` that the live display then starts from."""
    table = Table(title="about to train", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    m, t = model_config, trainer_config
    table.add_row("model", f"{m.num_layers} layers x {m.num_dims}, {m.num_heads}/{m.num_kv_heads} heads, FFN "
                           f"{m.ffn_hidden_dims}" + (f", {m.moe_num_experts} experts" if m.use_moe else ""))
    table.add_row("parameters", f"{m.num_params() / 1e6:.2f}M")
    table.add_row("data", f"{report.source}: {report.train_tokens:,} training "
                          f"{'response ' if report.format == 'instruction' else ''}tokens")
    table.add_row("tokens per optimizer step", f"{t.tokens_per_step:,} ({t.batch_size} x {t.accumulation_steps} x "
                                               f"{t.max_seq_len})")
    table.add_row("optimizer steps", steps_text(estimate, t))
    table.add_row("tokens to train on", f"~{estimate.tokens / 1e6:,.2f}M")
    table.add_row("estimated time", f"{format_seconds(estimate.seconds)} at {estimate.rate_text()}; corrected from "
                                    f"the real speed after the first steps")
    table.add_row("estimated memory", format_bytes(memory))
    table.add_row("runs in", str(runs_in))
    return table


def plan_table(the_plan, hardware, max_batch: int, flash: bool, batch_limit: int) -> Table:
    """A time-budget plan (a `budget.Plan`) with its estimate, labelled as measured,
    interpolated or extrapolated, and any cap or floor it applied."""
    from budget import epochs_text, tokens_text

    m, t, estimate = the_plan.model, the_plan.trainer, the_plan.estimate
    table = Table(title="planned configuration", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("hardware", f"{hardware.device}: {hardware.device_name}, {hardware.threads} threads, "
                              f"{format_bytes(hardware.memory_bytes)} available; flash attention "
                              f"{'yes' if flash else 'no'}")
    most = "" if max_batch < batch_limit else " or more (the most it looks for)"
    table.add_row("largest micro-batch", f"{max_batch} sequences of {t.max_seq_len} tokens{most} for this model (from "
                                         f"measured activation memory)" if max_batch else
                                         "not even one sequence fits in memory")
    table.add_row("speed", estimate.rate_text())
    table.add_row("model", f"{m.num_layers} layers x {m.num_dims} wide, {m.num_heads}/{m.num_kv_heads} heads, FFN "
                           f"{m.ffn_hidden_dims}: {the_plan.params / 1e6:.2f}M parameters")
    table.add_row("training", f"batch {t.batch_size} x {t.max_seq_len} tokens, learning rate {t.learning_rate:g} "
                              f"(cosine to {t.min_lr:g})")
    table.add_row("time", f"{format_seconds(the_plan.budget_s)} from the start of training to the saved checkpoint: "
                          f"{format_seconds(estimate.seconds)} of steps, then the final evaluation and the save")
    table.add_row("expected", f"{steps_text(estimate, t)}, {tokens_text(estimate.tokens)} "
                              f"({epochs_text(the_plan.epochs)}), memory {format_bytes(the_plan.memory_bytes)}")
    table.add_row("why", the_plan.reasoning)
    for note in the_plan.notes:
        table.add_row("note", note)
    return table
