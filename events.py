"""What a training run reports: typed events, and the sinks that record them.

The trainer calls each of its callbacks with these dataclasses; a front end renders them
(display.py), `MetricsLog` appends them to `metrics.jsonl` and `TensorBoardLog` writes
their scalars. A renamed field breaks its readers where a type checker or a test sees it,
not when a display first draws it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss gives a large finite number, not an overflow."""
    return math.exp(min(loss, 50.0))


@dataclass(frozen=True)
class Event:
    """One thing that happened in a run; `kind` names it in `metrics.jsonl`."""

    kind: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict:
        return {"type": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Start(Event):
    kind: ClassVar[str] = "start"
    total_steps: int
    steps_per_epoch: int
    step: int
    epoch: int
    effective_batch: int
    time_left_s: Optional[float]  # the deadline, when there is one
    schedule_by: str
    device: str
    dtype: str
    params: int  # NF4 weights counted as the parameters they stand for
    trainable: int
    quantized: int = 0  # of params, held in 4-bit NF4
    estimated_steps: Optional[int] = None  # the estimate the plan / start summary showed (budget.Estimate)
    estimated_seconds: Optional[float] = None
    estimate_basis: Optional[str] = None  # e.g. "interpolated: between probes of widths 64, 128, 256"
    dtype_note: Optional[str] = None  # why auto chose `dtype`, e.g. "bf16 autocast measured 1.52x as fast as fp32 ..."


@dataclass(frozen=True)
class Step(Event):
    kind: ClassVar[str] = "step"
    epoch: int
    step: int
    total_steps: int  # an estimate when the deadline ends the run (then total_estimated)
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    tokens_seen: int
    eta_s: float
    memory: Optional[dict] = None  # every log_interval steps
    expert_load: Optional[list] = None  # (layers, experts) token counts of MoE models
    total_estimated: bool = False  # total_steps is an estimate (a deadline ends the run)


@dataclass(frozen=True)
class Reestimate(Event):
    """The run's estimate corrected from the real speed of its steps so far: the step
    total a display shows changes only here, so every change is labelled."""

    kind: ClassVar[str] = "reestimate"
    step: int
    steps: int  # the new estimate of the run's optimizer steps
    previous_steps: Optional[int]  # what was shown before (None: nothing yet)
    seconds_left: float
    tokens_per_s: float
    from_steps: int  # how many steps of this session the speed was measured over


@dataclass(frozen=True)
class Eval(Event):
    kind: ClassVar[str] = "eval"
    step: int
    val_loss: float
    best_val_loss: float
    improved: bool
    seconds: float
    general_loss: Optional[float] = None  # fine-tuning's guard: loss on held-out general text
    general_rise: Optional[float] = None  # its perplexity's change from the base model's (0.05 = +5%)
    within_guard: Optional[bool] = None

    @property
    def perplexity(self) -> float:
        return perplexity(self.val_loss)

    @property
    def general_perplexity(self) -> Optional[float]:
        return None if self.general_loss is None else perplexity(self.general_loss)

    def to_dict(self) -> dict:
        values = {**super().to_dict(), "perplexity": self.perplexity}
        if self.general_loss is not None:
            values["general_perplexity"] = self.general_perplexity
        return values


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint"
    name: str
    step: int
    seconds: float
    removed: list[str]


@dataclass(frozen=True)
class CheckpointSetAside(Event):
    kind: ClassVar[str] = "checkpoint_set_aside"
    name: str
    reason: str


@dataclass(frozen=True)
class Resumed(Event):
    kind: ClassVar[str] = "resumed"
    checkpoint: str
    step: int
    epoch: int


@dataclass(frozen=True)
class EpochEnd(Event):
    kind: ClassVar[str] = "epoch_end"
    epoch: int
    step: int


@dataclass(frozen=True)
class Fallback(Event):
    """Out of memory: the micro-batch was halved, or training moved to the CPU."""

    kind: ClassVar[str] = "fallback"
    action: str  # halve_micro_batch | move_to_cpu
    step: int
    error: str
    micro_batch_size: Optional[int] = None
    accumulation: Optional[int] = None
    effective_batch: Optional[int] = None


@dataclass(frozen=True)
class NonFinite(Event):
    kind: ClassVar[str] = "nonfinite"
    step: int
    loss: float
    grad_norm: float
    in_a_row: int


@dataclass(frozen=True)
class Stopped(Event):
    kind: ClassVar[str] = "stopped"
    reason: str


@dataclass(frozen=True)
class EarlyStop(Event):
    kind: ClassVar[str] = "early_stop"
    step: int
    best_val_loss: Optional[float]
    patience: int


@dataclass(frozen=True)
class Interrupt(Event):
    kind: ClassVar[str] = "interrupt"
    signal: str
    step: int


@dataclass(frozen=True)
class TrainResult:
    """How a call of `Trainer.fit` ended."""

    status: str  # finished | deadline | max_steps | early_stop | interrupted | nonfinite
    global_step: int
    epoch: int
    last_loss: Optional[float]
    best_val_loss: Optional[float]
    last_checkpoint: Optional[str]
    elapsed_s: float
    tokens_seen: int


@dataclass(frozen=True)
class Finished(TrainResult, Event):
    """The run's last event: its `TrainResult`."""

    kind: ClassVar[str] = "finished"


@dataclass(frozen=True)
class Progress(Event):
    """How far a long wait outside training has got (an evaluation, ...): `done` of
    `total` units after `elapsed_s` seconds."""

    kind: ClassVar[str] = "progress"
    task: str
    done: int
    total: int
    unit: str
    elapsed_s: float

    @property
    def eta_s(self) -> Optional[float]:
        """Seconds left at the speed so far (None before anything is done)."""
        return self.elapsed_s / self.done * (self.total - self.done) if self.done else None


Callback = Callable[[Event], None]


def progress_reporter(task: str, unit: str, progress: Optional[Callback]) -> Callable[[int, int], None]:
    """A `(done, total)` callback that sends `Progress` events of `task` to `progress`
    (nothing when it is None), timed from this call."""
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(Progress(task=task, done=done, total=total, unit=unit, elapsed_s=time.perf_counter() - started))

    return report


class MetricsLog:
    """Appends every event to `metrics.jsonl` as one JSON line; step lines are flushed
    every `flush_every` steps, everything else at once."""

    def __init__(self, path: str | Path, flush_every: int = 10):
        self.path = Path(path)
        self.flush_every = flush_every
        self._file = None

    def __call__(self, event: Event) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(event.to_dict()) + "\n")
        if not isinstance(event, Step) or event.step % self.flush_every == 0:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLog:
    """The scalars of step and eval events in a TensorBoard log (when tensorboard is installed)."""

    SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss")

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._writer = None

    def __call__(self, event: Event) -> None:
        if not isinstance(event, (Step, Eval)):
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer = False
            else:
                self._writer = SummaryWriter(str(self.directory))
        if self._writer is False:
            return
        for key in self.SCALARS:
            value = getattr(event, key, None)
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{event.kind}/{key}", value, event.step)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        self._writer = None


def duration_text(seconds: float, gap: str = " ", fine: bool = True) -> str:
    """'0.25 s', '4.2 s', '45 s', '5m00s', '2h05m' ('45s' with `gap=""`); `fine=False`
    shows under a second as '0.5s' too, as progress lines do."""
    seconds = max(0.0, seconds)
    if fine and seconds < 1:
        return f"{seconds:.2f}{gap}s"
    if seconds < 10:
        return f"{seconds:.1f}{gap}s"
    if seconds < 60:
        return f"{seconds:.0f}{gap}s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:,}h{minutes:02d}m"
