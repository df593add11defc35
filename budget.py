"""Time budgets: from "I have 20 minutes" to a model and trainer configuration that finish
on time, planned from throughput measured on this machine.

1. Probe: time a few training steps (forward + backward + AdamW, after a warm-up) of a
   few candidate shapes on the device in the precision the run will use (on a CPU, chosen
   by measurement and cached too), and cache the timings per machine, device, torch
   version, thread count and precision.
2. Cost model: seconds per token = α + β · training FLOPs per token, fitted to the probes.
3. Choose: for every shape of a ladder, predict the tokens it can see in the time left
   after the fixed costs (start-up and data preparation already spent, the final
   evaluation, the checkpoint, the sample), predict its loss with Chinchilla's
   parametric fit L(N, D) = E + A/N^α + B/D^β (https://arxiv.org/abs/2203.15556), and
   take the lowest — tokens ≈ 20 × parameters for large budgets, smaller models for small
   ones. Tokens beyond 4 passes over the data count as nothing new
   (https://arxiv.org/abs/2305.16264).

The trainer's deadline (`time_limit_s`) guarantees the stop; the learning-rate schedule
runs on the clock so it completes whatever the real throughput turns out to be.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from events import Callback, duration_text as _duration, progress_reporter
from model import ModelConfig, Transformer
from trainer import (CpuPrecision, TrainerConfig, build_optimizer, cpu_precision, known_cpu_precision,
                     remember_cpu_precision, resolve_dtype)

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
# Chinchilla's fitted constants (Hoffmann et al. 2022, approach 3).
LOSS_E, LOSS_A, LOSS_B, LOSS_ALPHA, LOSS_BETA = 1.69, 406.4, 410.7, 0.34, 0.28
MAX_USEFUL_EPOCHS = 4
PROBE_WIDTHS = (64, 128, 256)
PROBE_BATCH = 2  # sequences per probe step: enough to be representative, cheap enough to be quick
PROBE_TASK = "measuring this machine (throughput probes)"  # training steps of small, middle and large shapes
PROBE_METHOD = "median"  # in the cache key: probes cached by an earlier way of measuring are measured again
PRECISION_METHOD = "pairs1"  # the same for the CPU's precision (trainer.bf16_speedup)
# Past ~16 passes repeated data is worth almost nothing more (Muennighoff et al. 2023 fit its
# value's decay constant at ~15 epochs), so no plan trains longer than that: the rest of a
# larger budget is left unused, and the plan says so.
MAX_PLANNED_EPOCHS = 16
# A budget that fits fewer deadline-bound steps than this trains a fixed number of steps
# instead (at least FLOOR_STEPS): one slow step would otherwise cut such a run to one or two.
FIXED_STEPS_BELOW = 10
FLOOR_STEPS = 5  # LightLM's table gives its tiny walkthrough 5 steps
# torch.compile, by device type: (speed of a compiled training step / eager, seconds to
# compile), as measured with `python -m bench.bench_train --compile`. On the 2-core EPYC:
# 0.95x at 5M and 1.00x at 30M, in fp32, for 16-31 s of compiling, so a CPU plan never pays. A device type not in the
# table has not been measured, and is not compiled either (bench/gpu_check.py measures it).
COMPILE_GAIN: dict[str, tuple[float, float]] = {"cpu": (1.0, 30.0)}


def parse_duration(text: str | float | int) -> float:
    """Seconds for '90s', '20m', '2h', '1h30m', or a bare number of hours as LightLM takes
    it ('0.001' = 3.6 s). Raises ValueError on anything else or a non-positive duration."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 3600
    else:
        cleaned = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(cleaned) * 3600
        except ValueError:
            parts = re.fullmatch(r"((?:\d+(?:\.\d+)?(?:s|sec|m|min|h|hr))+)", cleaned)
            if not parts:
                raise ValueError(f"cannot read {text!r} as a duration; use e.g. 90s, 20m, 2h, 1h30m "
                                 f"or hours as a number (0.001)") from None
            seconds = sum(float(value) * _UNITS[unit]
                          for value, unit in re.findall(r"(\d+(?:\.\d+)?)(sec|min|hr|s|m|h)", cleaned))
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"duration {text!r} must be positive and finite")
    return seconds


# ---- shapes ------------------------------------------------------------------------------------
def shape(width: int, vocab_size: int, context_len: int) -> ModelConfig:
    """The ladder's model of a given width: head dim 32 below 256 wide, else 64; depth
    grows with width; SwiGLU hidden ≈ 8/3 · width; half as many KV heads as heads."""
    head_dim = 32 if width < 256 else 64
    heads = max(2, width // head_dim)
    layers = {64: 2, 96: 2, 128: 4, 192: 4, 256: 4, 384: 6, 512: 8, 640: 10, 768: 12}.get(width, max(2, width // 64))
    ffn = int(round(8 * width / 3 / 32)) * 32
    return ModelConfig(vocab_size=vocab_size, num_dims=width, num_heads=heads, num_kv_heads=max(1, heads // 2),
                       num_layers=layers, ffn_hidden_dims=ffn, context_len=context_len)


LADDER = (64, 96, 128, 192, 256, 384, 512, 640, 768)


def non_embedding_params(config: ModelConfig) -> int:
    return config.num_params(active=True) - config.vocab_size * config.num_dims * (1 if config.tie_embeddings else 2)


def predicted_loss(params: float, tokens: float) -> float:
    """Chinchilla's parametric loss; used to rank shapes, not to predict our numbers."""
    return LOSS_E + LOSS_A / max(params, 1.0) ** LOSS_ALPHA + LOSS_B / max(tokens, 1.0) ** LOSS_BETA


# ---- hardware and probes -------------------------------------------------------------------------
@dataclass
class HardwareProfile:
    """What the plan depends on about this machine."""

    device: str
    device_name: str
    threads: int
    torch_version: str
    memory_bytes: int
    machine: str = field(default_factory=platform.node)

    @classmethod
    def detect(cls, device: Optional[str] = None) -> "HardwareProfile":
        import psutil

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda":
            name = torch.cuda.get_device_name(0)
            memory = torch.cuda.get_device_properties(0).total_memory
        else:
            name = _cpu_name()
            memory = psutil.virtual_memory().available
        return cls(device, name, torch.get_num_threads(), torch.__version__, memory)

    def key(self) -> str:
        return f"{self.machine}|{self.device}|{self.device_name}|{self.threads}|{self.torch_version}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@dataclass
class Probe:
    width: int
    flops_per_token: float
    seconds_per_token: float


def measure(config: ModelConfig, batch_size: int, seq_len: int, device: str, seconds: float,
            dtype: Optional[torch.dtype] = None) -> float:
    """Seconds per token of full training steps of `config` in the precision training
    uses on `device` (unless `dtype`): the median step after one warm-up step, of as many
    as fit in `seconds` and at least three, so a step slowed by something else on the
    machine does not set the figure."""
    torch.manual_seed(0)
    dtype = dtype or resolve_dtype(TrainerConfig(), torch.device(device))
    model = Transformer(config).to(device)
    optimizer = build_optimizer(model, TrainerConfig(), torch.device(device))
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            _, loss, _ = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    durations: list[float] = []
    start = time.perf_counter()
    while len(durations) < 3 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        step()
        durations.append(time.perf_counter() - began)
    return statistics.median(durations) / (batch_size * seq_len)


def probes_look_sane(probes: list[Probe]) -> bool:
    """Wider shapes cost at least about as much per token: a probe slowed by something
    else on the machine breaks this (and must not be cached)."""
    ordered = sorted(probes, key=lambda p: p.flops_per_token)
    return all(b.seconds_per_token >= 0.9 * a.seconds_per_token for a, b in zip(ordered, ordered[1:]))


def machine_busy(threads: int) -> bool:
    """Other processes hold the CPU: the last minute's load average exceeds our threads by half."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return False
    return load > 1.5 * max(1, threads)


def probe(hardware: HardwareProfile, vocab_size: int, seq_len: int, batch_size: int, seconds_each: float,
          cache_dir: Optional[str | Path] = None, remeasure: bool = False,
          progress: Optional[Callable[[int, int], None]] = None,
          dtype: Optional[torch.dtype] = None) -> tuple[list[Probe], bool]:
    """Probes for the ladder's small, middle and large shapes in `dtype` (default: the
    precision training picks here), from the cache when this machine, device, torch
    version, vocabulary, sequence length and precision were measured before (unless
    `remeasure`). A measurement that looks disturbed (a wider shape faster than a
    narrower one) is taken once more; one taken while the machine was busy or still
    disturbed is used for this plan but not cached, so one slow moment does not make every
    later plan pessimistic. `progress(done, total)` follows the probes measured (a retake
    adds its probes to the total). Returns (probes, came_from_cache)."""
    dtype = dtype or resolve_dtype(TrainerConfig(), torch.device(hardware.device))
    key = f"{hardware.key()}|v{vocab_size}|t{seq_len}|b{batch_size}|{PROBE_METHOD}|{str(dtype).removeprefix('torch.')}"
    cache = Path(cache_dir) / "probes.json" if cache_dir else None
    stored = _read_cache(cache)
    if key in stored and not remeasure:
        return [Probe(**p) for p in stored[key]], True

    def measure_all(done: int, total: int) -> list[Probe]:
        probes = []
        for width in PROBE_WIDTHS:
            config = shape(width, vocab_size, seq_len)
            probes.append(Probe(width, config.flops_per_token(seq_len),
                                measure(config, min(batch_size, PROBE_BATCH), seq_len, hardware.device, seconds_each,
                                        dtype)))
            if progress is not None:
                progress(done + len(probes), total)
        return probes

    count = len(PROBE_WIDTHS)
    probes = measure_all(0, count)
    if not probes_look_sane(probes):
        probes = measure_all(count, 2 * count)
    trustworthy = probes_look_sane(probes) and (hardware.device != "cpu" or not machine_busy(hardware.threads))
    if cache is not None and trustworthy:
        stored[key] = [asdict(p) for p in probes]
        _write_cache(cache, stored)
    elif cache is not None and key in stored:  # a stale figure (--remeasure) is not better than this one
        del stored[key]
        _write_cache(cache, stored)
    return probes, False


def _read_cache(cache: Optional[Path]) -> dict:
    try:
        return json.loads(cache.read_text()) if cache and cache.exists() else {}
    except ValueError:  # a damaged cache is measured again
        return {}


def _write_cache(cache: Path, stored: dict) -> None:
    """`stored` in `cache` whole, or the old file untouched (another process may read it)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.stem}.{os.getpid()}")
    partial.write_text(json.dumps(stored, indent=1))
    os.replace(partial, cache)


def precision(hardware: HardwareProfile, cache_dir: Optional[str | Path] = None,
              remeasure: bool = False) -> Optional[CpuPrecision]:
    """The precision `use_dtype="auto"` trains in on this CPU (`trainer.cpu_precision`):
    this process's choice when it has one, else the one cached in `precision.json` next to
    the probes for this machine and torch version (measured on one thread, whatever the
    count), else measured now (about half a second) and cached; `remeasure` measures again. None on CUDA, whose rule needs no
    measurement. Whatever it finds becomes this process's choice, so the probes, the plan
    and the run all use it."""
    if hardware.device != "cpu":
        return None
    choice = known_cpu_precision()
    if choice is not None and (not remeasure or choice.source == "environment"):
        return choice
    cache = Path(cache_dir) / "precision.json" if cache_dir else None
    key = f"{hardware.machine}|{hardware.device}|{hardware.device_name}|{hardware.torch_version}|{PRECISION_METHOD}"
    stored = _read_cache(cache)
    if key in stored and not remeasure:
        try:
            choice = CpuPrecision(stored[key]["dtype"], stored[key]["speedup"], "cached")
        except (KeyError, TypeError):
            choice = None
        if choice is not None:
            remember_cpu_precision(choice)
            return choice
    choice = cpu_precision(remeasure=True)
    if cache is not None and choice.source in ("measured", "unsupported"):
        stored[key] = {"dtype": choice.dtype, "speedup": choice.speedup}
        _write_cache(cache, stored)
    return choice


def best_thread_count(device: str = "cpu", seq_len: int = 128, vocab_size: int = 8192,
                      dtype: Optional[torch.dtype] = None) -> tuple[int, dict[int, float]]:
    """Torch's thread count for training on this CPU, by measurement in `dtype` (default:
    the precision training picks here): one thread against all the cores (on a busy
    machine one thread can be twice as fast). Returns the faster and seconds per token of
    each."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if device != "cpu" or cores <= 1:
        return torch.get_num_threads(), {}
    config = shape(PROBE_WIDTHS[1], vocab_size, seq_len)
    before = torch.get_num_threads()
    timings = {}
    try:
        for threads in (cores, 1):
            torch.set_num_threads(threads)
            timings[threads] = measure(config, PROBE_BATCH, seq_len, device, seconds=0.2, dtype=dtype)
    finally:
        torch.set_num_threads(before)
    return min(timings, key=timings.get), timings


@dataclass
class CostModel:
    """seconds per token = overhead + seconds_per_flop · FLOPs per token."""

    overhead: float
    seconds_per_flop: float

    @classmethod
    def fit(cls, probes: list[Probe]) -> "CostModel":
        flops = np.array([p.flops_per_token for p in probes])
        seconds = np.array([p.seconds_per_token for p in probes])
        design = np.stack([np.ones_like(flops), flops], axis=1)
        (overhead, per_flop), *_ = np.linalg.lstsq(design, seconds, rcond=None)
        if per_flop <= 0:  # degenerate timings: fall back to a line through the origin
            overhead, per_flop = 0.0, float(seconds.sum() / flops.sum())
        return cls(max(float(overhead), 0.0), float(per_flop))

    def seconds_per_token(self, flops_per_token: float) -> float:
        return self.overhead + self.seconds_per_flop * flops_per_token


# ---- the one estimate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """How many optimizer steps a run takes and how long it trains, from one throughput
    figure. The plan, the start summary and the live display all show this same object
    until the trainer corrects it from the real speed of the first steps."""

    steps: int
    seconds: float
    tokens_per_second: float
    tokens_per_step: int
    basis: str  # how tokens_per_second was found: measured | interpolated | extrapolated
    detail: str  # from what, e.g. "3+ steps of this model at micro-batch 16"
    ends_by: str  # what ends the run: deadline | epochs | max_steps | steps (a fixed short run)
    threads: Optional[int] = None  # torch's CPU threads the speed holds for (None: leave them as they are)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def rate_text(self) -> str:
        """'1,121 tokens/s (interpolated from probes of widths 64, 128, 256; cached)'."""
        return f"{self.tokens_per_second:,.0f} tokens/s ({self.basis}: {self.detail})"

    def describe(self) -> str:
        """'~395 optimizer steps, 1m05s of training (estimated at 1,121 tokens/s, interpolated ...)'."""
        ends = {"deadline": "the deadline ends the run", "epochs": "its epochs end the run",
                "max_steps": "max_steps ends the run", "steps": "a fixed number of steps"}[self.ends_by]
        return (f"~{self.steps:,} optimizer steps, {_duration(self.seconds)} of training ({ends}); estimated at "
                f"{self.rate_text()}")


def estimate_run(trainer: TrainerConfig, train_sequences: int, tokens_per_second: float, basis: str, detail: str,
                 threads: Optional[int] = None, world_size: int = 1) -> Estimate:
    """Steps and seconds of training for `trainer` over `train_sequences` sequences at
    `tokens_per_second`: its epochs or max_steps, or as many steps as its deadline holds,
    whichever ends first (the trainer's own rules)."""
    if not tokens_per_second > 0:
        raise ValueError(f"estimate_run: tokens_per_second={tokens_per_second}: must be positive")
    tokens_per_step = trainer.tokens_per_step * world_size
    batches = math.ceil(train_sequences / world_size / trainer.batch_size)
    steps_per_epoch = max(1, math.ceil(batches / trainer.accumulation_steps))
    by_epochs = steps_per_epoch * trainer.num_epochs if trainer.num_epochs else None
    candidates = [(by_epochs, "epochs")] if by_epochs else []
    if trainer.max_steps:
        candidates.append((trainer.max_steps, "max_steps"))
    steps, ends_by = min(candidates) if candidates else (None, "deadline")
    step_seconds = tokens_per_step / tokens_per_second
    if trainer.time_limit_s and (steps is None or trainer.schedule_by == "time"
                                 or steps * step_seconds > trainer.time_limit_s):
        by_deadline = max(1, int(trainer.time_limit_s / step_seconds))
        if steps is None or by_deadline < steps:
            steps, ends_by = by_deadline, "deadline"
    seconds = trainer.time_limit_s if ends_by == "deadline" else steps * step_seconds
    return Estimate(steps, seconds, tokens_per_second, tokens_per_step, basis, detail, ends_by, threads)


def probe_basis(width: int, probes: list[Probe], cached: bool) -> tuple[str, str]:
    """How the cost model's figure for a shape `width` wide was found: measured (a probed
    width), interpolated between probed widths, or extrapolated beyond them."""
    widths = sorted(p.width for p in probes)
    when = "cached from an earlier measurement" if cached else "just measured"
    listed = ", ".join(str(w) for w in widths)
    if width in widths:
        return "measured", f"a probe of this shape at {PROBE_BATCH} sequences per step, {when}"
    if widths[0] < width < widths[-1]:
        return "interpolated", f"between probes of widths {listed}, {when}"
    return "extrapolated", f"beyond probes of widths {listed}, {when}"


def epochs_text(epochs: float) -> str:
    """'12 epochs', '1.5 epochs', '0.25 epochs', '3% of an epoch', '<1% of an epoch'."""
    if epochs >= 10:
        return f"{epochs:,.0f} epochs"
    if epochs >= 0.995:
        return f"{epochs:.1f} epoch{'' if round(epochs, 1) == 1 else 's'}"
    if epochs >= 0.1:
        return f"{epochs:.2f} epochs"
    return f"{epochs:.0%} of an epoch" if epochs >= 0.005 else "<1% of an epoch"


def tokens_text(tokens: float) -> str:
    """'9,728 tokens', '1.53M tokens', '48.0M tokens', '2.10B tokens'."""
    if tokens < 1e6:
        return f"{tokens:,.0f} tokens"
    if tokens < 1e9:
        return f"{tokens / 1e6:,.{2 if tokens < 1e7 else 1}f}M tokens"
    return f"{tokens / 1e9:,.2f}B tokens"


def ratio_text(value: float) -> str:
    """A ratio with the digits that matter: 1,234 / 45 / 3.2 / 0.041."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}"


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A configuration for a time budget, the estimate it was chosen on, and why."""

    model: ModelConfig
    trainer: TrainerConfig
    budget_s: float
    train_seconds: float  # of training steps (the deadline, or the fixed steps' estimated time)
    dataset_tokens: int
    params: int
    memory_bytes: int
    finish_s: float
    probe_seconds: float
    probes_cached: bool
    reasoning: str
    estimate: Estimate
    notes: list[str] = field(default_factory=list)  # where the plan departs from the budget, and why
    reserve_s: float = 0.0  # kept after training for the last evaluation, the save, the sample and the exit

    @property
    def steps(self) -> int:
        return self.estimate.steps

    @property
    def tokens(self) -> int:
        return self.estimate.tokens

    @property
    def tokens_per_second(self) -> float:
        return self.estimate.tokens_per_second

    @property
    def epochs(self) -> float:
        return self.tokens / max(self.dataset_tokens, 1)

    def summary(self) -> dict:
        values = asdict(self)
        values["model"], values["trainer"] = self.model.to_dict(), self.trainer.to_dict()
        values.update(steps=self.steps, tokens=self.tokens, tokens_per_second=self.tokens_per_second,
                      epochs=self.epochs)
        return values

    def describe(self) -> str:
        """The plan in a few lines: the shape and run it chose, its estimate, why, and any cap or floor."""
        m, t = self.model, self.trainer
        probes = "probes cached" if self.probes_cached else f"probes {self.probe_seconds:.1f} s"
        lines = [f"plan for {_duration(self.budget_s)}: {m.num_layers} layers x {m.num_dims} wide ({m.num_heads}/"
                 f"{m.num_kv_heads} heads, FFN {m.ffn_hidden_dims}), {self.params / 1e6:.2f}M parameters; batch "
                 f"{t.batch_size} x {t.max_seq_len}, lr {t.learning_rate:g}; {tokens_text(self.tokens)} "
                 f"({epochs_text(self.epochs)}); {probes}",
                 f"estimate: {self.estimate.describe()}", f"why: {self.reasoning}"]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def sequence_length(budget_s: float) -> int:
    return 128 if budget_s < 600 else 256 if budget_s < 3600 else 512


def batch_tokens(budget_s: float) -> int:
    """Tokens per optimizer step: small for short budgets (more steps), larger later."""
    return 2048 if budget_s < 300 else 4096 if budget_s < 1800 else 8192


def training_memory(config: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Bytes of a training step: fp32 weights, gradients and two AdamW moments (16 B per
    parameter), plus activations (~ 34·B·T·C·L bytes, and the B·T·V logits three times)."""
    params = config.num_params()
    activations = 34 * batch_size * seq_len * config.num_dims * config.num_layers
    logits = 3 * 4 * batch_size * seq_len * config.vocab_size
    return 16 * params + activations + logits


def memory_needed(config: ModelConfig, training: bool, seq_len: int = 1) -> int:
    """Bytes a model needs before any batch: its fp32 weights (with gradients and AdamW
    moments when `training`, plus one sequence of activations: the out-of-memory fallback
    goes down to a micro-batch of one) and its RoPE tables."""
    rope = 2 * 4 * config.context_len * config.head_dim
    if training:
        return training_memory(config, 1, seq_len) + rope
    return 4 * config.num_params() + rope


def available_memory(device: str = "cpu") -> int:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))[0]  # this rank's GPU under torchrun
    import psutil

    return psutil.virtual_memory().available


def check_memory(config: ModelConfig, training: bool, seq_len: int = 1, device: str = "cpu",
                 fraction: float = 0.8) -> None:
    """Refuse, before anything is allocated, a model that cannot fit in `fraction` of this
    machine's available memory (a typo such as num_layers=10000, or a hostile run.json)."""
    need, have = memory_needed(config, training, seq_len), available_memory(device)
    if need > fraction * have:
        raise ValueError(f"this model needs ~{need / 2**30:,.1f} GiB to {'train' if training else 'load'} "
                         f"({config.num_params() / 1e6:,.1f}M parameters, context {config.context_len:,}) but "
                         f"{device} has {have / 2**30:,.1f} GiB available; use a smaller model (model.num_layers, "
                         f"model.num_dims, model.context_len)")


def finish_seconds(config: ModelConfig, cost: CostModel, seq_len: int, eval_tokens: int,
                   whole_run: bool = True) -> float:
    """The final evaluation (forward only, ~1/3 of a training step per token) and the
    checkpoint (weights and AdamW state at ~200 MB/s with checksums); for a whole run
    also a 60-token sample, building the model and loader (1 s) and interpreter exit (1 s)."""
    evaluation = eval_tokens * cost.seconds_per_token(config.flops_per_token(seq_len)) / 3
    save = 12 * config.num_params() / 200e6
    if not whole_run:
        return evaluation + save
    sample = 60 * (0.005 + 2 * config.num_params() / 3e9)
    return evaluation + save + sample + 2.0


def compile_decision(device: str, train_seconds: float,
                     gains: Optional[dict[str, tuple[float, float]]] = None) -> tuple[bool, str]:
    """Whether compiling the model pays within `train_seconds` of training on `device`:
    whether the steps saved at the measured speed-up outweigh the compile time. Returns
    the decision and a note that says why."""
    gains = COMPILE_GAIN if gains is None else gains
    if device not in gains:
        return False, f"torch.compile off: its gain on {device} has not been measured yet"
    speedup, compile_s = gains[device]
    saved = train_seconds * (1 - 1 / speedup) if speedup > 1 else 0.0
    if saved > compile_s:
        return True, (f"torch.compile on: {speedup:.2f}x faster steps save ~{_duration(saved)} of "
                      f"{_duration(train_seconds)}, more than the ~{_duration(compile_s)} it takes to compile")
    return False, (f"torch.compile off: {speedup:.2f}x faster steps would save ~{_duration(saved)}, less than the "
                   f"~{_duration(compile_s)} it takes to compile on {device}")


def plan(budget_seconds: float, hardware: HardwareProfile, dataset_tokens: int, vocab_size: int,
         spent_seconds: float = 0.0, cache_dir: Optional[str | Path] = None,
         probes: Optional[list[Probe]] = None, seq_len: Optional[int] = None, whole_run: bool = True,
         remeasure: bool = False, progress: Optional[Callback] = None, dtype: Optional[torch.dtype] = None) -> Plan:
    """The configuration expected to reach the lowest loss in `budget_seconds` of wall
    time, of which `spent_seconds` (start-up, data preparation) are already gone, probed in
    `dtype` (default: the precision training picks here).
    `Progress` events of the throughput probes (probes measured of all) go to `progress`.
    `probes` skips measuring (tests pass synthetic ones); `seq_len` overrides the
    sequence length chosen for the budget. `whole_run=False` plans `budget_seconds` of
    training alone, from the start of training to the saved checkpoint (the wizard: probing,
    set-up and the sample come before and after the clock)."""
    if not budget_seconds > 0:
        raise ValueError(f"budget {budget_seconds} s: must be positive")
    seq_len = seq_len or sequence_length(budget_seconds)
    batch_size = max(1, batch_tokens(budget_seconds) // seq_len)
    probe_started = time.perf_counter()
    cached = probes is not None
    if probes is None:
        seconds_each = min(0.5, max(0.1, 0.005 * budget_seconds))  # ~5 s of probing at most
        probes, cached = probe(hardware, vocab_size, seq_len, batch_size, seconds_each, cache_dir, remeasure,
                               progress_reporter(PROBE_TASK, "probes", progress), dtype)
    probe_seconds = 0.0 if cached else time.perf_counter() - probe_started
    cost = CostModel.fit(probes)
    eval_batches = 4
    left = budget_seconds - spent_seconds - (probe_seconds if whole_run else 0.0)
    memory_limit = 0.6 * hardware.memory_bytes

    def best_shape(batch_size: int) -> Optional[tuple]:
        """The ladder shape with the lowest predicted loss that fits three steps at this batch."""
        best = None
        eval_tokens = eval_batches * batch_size * seq_len
        for width in LADDER:
            config = shape(width, vocab_size, seq_len)
            memory = training_memory(config, batch_size, seq_len)
            if memory > memory_limit:
                continue
            train_seconds = left - finish_seconds(config, cost, seq_len, eval_tokens, whole_run)
            seconds_per_token = cost.seconds_per_token(config.flops_per_token(seq_len))
            step_seconds = seconds_per_token * batch_size * seq_len
            if train_seconds < 3 * step_seconds:
                continue
            tokens = train_seconds / seconds_per_token
            useful = min(tokens, MAX_USEFUL_EPOCHS * dataset_tokens)
            loss = predicted_loss(non_embedding_params(config), useful)
            if best is None or loss < best[0]:
                best = (loss, config, train_seconds, tokens, memory, step_seconds)
        return best

    # A budget too short for three steps of the smallest shape gets smaller batches (a slow
    # or busy machine still trains for LightLM's 3.6-second walkthrough).
    planned_batch = batch_size
    best = best_shape(batch_size)
    while best is None and batch_size > 1:
        batch_size //= 2
        best = best_shape(batch_size)
    smallest = shape(LADDER[0], vocab_size, seq_len)
    if best is None and training_memory(smallest, 1, seq_len) > memory_limit:
        raise ValueError(f"not even the smallest model ({LADDER[0]} wide) fits a training step in 60% of the "
                         f"{hardware.memory_bytes / 2**30:.1f} GiB of memory available on {hardware.device}")
    notes: list[str] = []
    if best is not None and best[2] / best[5] >= FIXED_STEPS_BELOW:
        _, config, train_seconds, tokens, memory, step_seconds = best
        basis, detail = probe_basis(config.num_dims, probes, cached)
        most_tokens = MAX_PLANNED_EPOCHS * dataset_tokens
        if tokens > most_tokens:  # more time than the data can use: stop where repeats stop teaching
            unused = train_seconds - most_tokens / tokens * train_seconds
            train_seconds *= most_tokens / tokens
            tokens = most_tokens
            notes.append(f"the budget is more than this data can use: {MAX_PLANNED_EPOCHS} passes over its "
                         f"{dataset_tokens:,} tokens take ~{_duration(train_seconds)} of training here, and repeated "
                         f"data past that teaches almost nothing, so the run stops there ({_duration(unused)} of the "
                         f"budget unused); more data would use it")
        fixed_steps = None
    else:  # too short for a deadline to be safe: a fixed few steps of the smallest shape
        config = smallest
        basis, detail = probe_basis(config.num_dims, probes, cached)
        seconds_per_token = cost.seconds_per_token(config.flops_per_token(seq_len))

        def room(batch: int) -> float:  # seconds of steps after the final evaluation and save at this batch
            return left - finish_seconds(config, cost, seq_len, eval_batches * batch * seq_len, whole_run)

        batch_size = planned_batch
        while batch_size > 1 and (room(batch_size) < FLOOR_STEPS * seconds_per_token * batch_size * seq_len
                                  or training_memory(config, batch_size, seq_len) > memory_limit):
            batch_size //= 2
        train_seconds = max(room(batch_size), 0.0)
        step_seconds = seconds_per_token * batch_size * seq_len
        fixed_steps = max(FLOOR_STEPS, min(FIXED_STEPS_BELOW - 1, int(train_seconds / step_seconds)))
        memory = training_memory(config, batch_size, seq_len)
        if fixed_steps * step_seconds > train_seconds:
            spent = [f"start-up and data preparation took {spent_seconds:.0f} s"] if whole_run and spent_seconds else []
            finishing = finish_seconds(config, cost, seq_len, eval_batches * batch_size * seq_len, whole_run)
            spent.append(f"the final evaluation and save{' and the sample' if whole_run else ''} need "
                         f"~{_duration(finishing)}")
            notes.append(f"a budget of {_duration(budget_seconds)} is shorter than {FLOOR_STEPS} steps of the "
                         f"smallest model need here ({' and '.join(spent)}; one step takes "
                         f"~{_duration(step_seconds)} by the probes): training {fixed_steps} steps anyway, so the run "
                         f"is short but useful; give a longer budget to stay inside it")
        else:
            notes.append(f"a budget this short trains a fixed {fixed_steps} steps instead of running to a deadline: "
                         f"one slow step would cut such a run to one or two")
        train_seconds = fixed_steps * step_seconds
        tokens = train_seconds / seconds_per_token
    eval_tokens = eval_batches * batch_size * seq_len
    params = non_embedding_params(config)
    learning_rate = 3e-3 if params < 2e6 else 2e-3 if params < 10e6 else 1e-3 if params < 50e6 else 6e-4
    use_compile, compile_note = compile_decision(hardware.device, train_seconds) if fixed_steps is None else (False, "")
    rate = 1 / cost.seconds_per_token(config.flops_per_token(seq_len))
    if use_compile:  # the compile time comes out of the training time, and the steps run faster
        speedup, compile_s = COMPILE_GAIN[hardware.device]
        rate *= speedup
        tokens = (train_seconds - compile_s) * rate
    if fixed_steps is None:  # the deadline ends the run, not the epochs (the throughput may beat the prediction)
        steps = max(1, int(tokens // (batch_size * seq_len)))
        trainer = TrainerConfig(num_epochs=0, batch_size=batch_size, max_seq_len=seq_len, learning_rate=learning_rate,
                                min_lr=learning_rate / 10, warmup_ratio=min(0.05, 20 / steps) if steps > 20 else 0.0,
                                lr_schedule="cosine", schedule_by="time", time_limit_s=train_seconds,
                                eval_steps=eval_batches, use_epoch_checkpoints=False, min_steps=FLOOR_STEPS,
                                log_interval=max(1, steps // 50), use_compile=use_compile)
    else:
        trainer = TrainerConfig(num_epochs=0, max_steps=fixed_steps, batch_size=batch_size, max_seq_len=seq_len,
                                learning_rate=learning_rate, min_lr=learning_rate / 10, warmup_ratio=0.0,
                                lr_schedule="cosine", eval_steps=eval_batches, use_epoch_checkpoints=False,
                                log_interval=1)
    estimate = estimate_run(trainer, 0, rate, basis, detail, hardware.threads if hardware.device == "cpu" else None)
    reasoning = (f"{rate:,.0f} tokens/s for this shape ({basis}); {_duration(train_seconds)} of training → "
                 f"{tokens_text(tokens)} = {ratio_text(tokens / max(params, 1))} tokens per non-embedding "
                 f"parameter ({epochs_text(tokens / max(dataset_tokens, 1))}), the lowest predicted loss among "
                 f"{len(LADDER)} shapes that fit in memory" if fixed_steps is None else
                 f"{rate:,.0f} tokens/s for the smallest shape ({basis}); the budget holds only a few steps")
    if use_compile or (fixed_steps is None and hardware.device not in COMPILE_GAIN):
        notes.append(compile_note)  # (on a measured device type, leaving it off is the plain default)
    reserve = finish_seconds(config, cost, seq_len, eval_tokens, whole_run)
    finish = budget_seconds - (left - train_seconds - reserve)
    return Plan(config, trainer, budget_seconds, train_seconds, dataset_tokens, config.num_params(), memory, finish,
                probe_seconds, cached, reasoning, estimate, notes, reserve)


# ---- fine-tuning ------------------------------------------------------------------------------
FINETUNE_EVAL_SHARE = 0.2  # of the training time, at most, spent on the guard's evaluations
FINETUNE_MIN_STEPS = 8  # a micro-batch whose steps would be fewer than this is halved


def measure_step(model: Transformer, dataset, batch_size: int, device: torch.device, dtype: torch.dtype,
                 steps: int = 2) -> float:
    """Seconds per training step of `model` as it is (LoRA layers, NF4 base) on the first
    batches of `dataset`: the median of `steps` after a warm-up step. The optimizer runs
    with a learning rate of 0 and the gradients are dropped, so the weights do not change."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.0, weight_decay=0.0)
    rng = torch.random.get_rng_state()  # LoRA dropout draws; the run's draws stay its own
    was_training = model.training
    model.train()
    durations = []
    try:
        for step in range(steps + 1):
            indices = np.arange(step * batch_size, (step + 1) * batch_size) % len(dataset)
            x, y = (t.to(device) for t in dataset.batch(indices))
            began = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss, _ = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                durations.append(time.perf_counter() - began)
    finally:
        torch.random.set_rng_state(rng)
        model.train(was_training)
    return statistics.median(durations)


@dataclass
class FinetunePlan:
    """A fine-tune fitted to a budget from measurements of the actual base on this device."""

    budget_s: float
    spent_s: float  # loading the base, the data, the base's evaluation and the measurements
    batch_size: int
    seq_len: int
    step_seconds: float
    eval_seconds: float  # one guard evaluation (task + general text), measured on the base
    finish_s: float  # after training: saving the adapter (and merged model) and the sample
    train_seconds: float  # training steps plus the evaluations between them
    evaluations: int
    eval_interval: int
    steps: int
    epochs: float

    def trainer_settings(self) -> dict:
        """The TrainerConfig fields the plan sets: the deadline ends the run and the
        learning rate follows the clock."""
        return dict(batch_size=self.batch_size, max_seq_len=self.seq_len, num_epochs=0, schedule_by="time",
                    time_limit_s=self.train_seconds, eval_interval=self.eval_interval, use_epoch_checkpoints=False,
                    warmup_ratio=min(0.1, 2 / max(self.steps, 1)) if self.steps > 4 else 0.0,
                    log_interval=max(1, self.steps // 50))

    def describe(self) -> str:
        return (f"plan for {self.budget_s:.0f} s: micro-batch {self.batch_size} x {self.seq_len} tokens, "
                f"{self.step_seconds:.2f} s per step (measured) -> ~{self.steps} steps = {self.epochs:.1f} epochs in "
                f"{self.train_seconds:.0f} s, evaluated every {self.eval_interval} steps ({self.eval_seconds:.1f} s "
                f"each); {self.spent_s:.0f} s already spent on loading, measuring and the base's evaluation, "
                f"{self.finish_s:.0f} s kept for saving and the sample")


def enough_steps(seconds: float, step_seconds: float) -> bool:
    """Whether `seconds` (less the evaluations' share) hold FINETUNE_MIN_STEPS steps."""
    return seconds * (1 - FINETUNE_EVAL_SHARE) / step_seconds >= FINETUNE_MIN_STEPS


def plan_finetune(budget_s: float, spent_s: float, samples: int, seq_len: int, eval_seconds: float,
                  step_seconds: dict[int, float], finish_s: float) -> FinetunePlan:
    """The fine-tune that fits `budget_s` from launch to exit: `spent_s` are gone,
    `finish_s` come after training, and the time between trains with the largest measured
    micro-batch (of `step_seconds`: batch -> seconds per step) that still gives
    FINETUNE_MIN_STEPS steps, evaluating the guard a few times (at most
    FINETUNE_EVAL_SHARE of the time)."""
    left = budget_s - spent_s - finish_s
    if not step_seconds:
        raise ValueError("plan_finetune: no measured step time")
    smallest = min(step_seconds)
    need = spent_s + finish_s + 2 * eval_seconds + FINETUNE_MIN_STEPS * step_seconds[smallest]
    if left < 2 * eval_seconds + 2 * step_seconds[smallest]:
        raise ValueError(f"a budget of {budget_s:.0f} s is too short for this fine-tune: loading, measuring and "
                         f"evaluating the base took {spent_s:.0f} s, and a few steps with two evaluations need about "
                         f"{need - spent_s:.0f} s more; give at least {math.ceil(need * 1.1)} s")
    batch_size = max(b for b in step_seconds if b == smallest or enough_steps(left, step_seconds[b]))
    step = step_seconds[batch_size]
    # As many evaluations as FINETUNE_EVAL_SHARE of the time pays for, up to four an epoch: a
    # small data set learns (and can start to damage the base) within an epoch or two, and the
    # guard can only keep a state it has measured.
    steps_per_epoch = max(1, math.ceil(samples / batch_size))
    affordable = int(FINETUNE_EVAL_SHARE * left // max(eval_seconds, 1e-6))
    most = max(2, math.ceil(4 * left / step / steps_per_epoch))
    evaluations = max(2, min(affordable, most))
    evaluations = max(1, min(evaluations, int((left - 2 * step) // max(eval_seconds, 1e-6))))
    steps = max(1, int((left - evaluations * eval_seconds) // step))
    eval_interval = max(1, math.ceil(steps / evaluations))
    return FinetunePlan(budget_s, spent_s, batch_size, seq_len, step, eval_seconds, finish_s, left, evaluations,
                        eval_interval, steps, steps * batch_size / max(samples, 1))


def finetune_seq_len(lengths: list[int], context_len: int, multiple: int = 8) -> tuple[int, int]:
    """The sequence length for instruction samples of `lengths` tokens (prompt and answer):
    the longest, rounded up to a multiple of 8, unless a few outliers would more than
    double the 99th percentile's (then that); never beyond the context. Returns it and the
    number of samples it cuts."""
    if not lengths:
        raise ValueError("finetune_seq_len: no samples")
    needs = np.asarray(lengths) - 1  # a sample of n tokens is n - 1 inputs predicting n - 1 targets
    longest = int(needs.max())
    typical = int(np.percentile(needs, 99))
    wanted = longest if longest <= 2 * max(typical, multiple) else typical
    seq_len = min(context_len, max(multiple, math.ceil(wanted / multiple) * multiple))
    return seq_len, int((needs > seq_len).sum())
