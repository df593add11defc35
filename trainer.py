"""Training: `TrainerConfig`, `TrainState` and the `Trainer`.

The trainer accumulates gradients, picks the precision for the device, clips, schedules
the learning rate, evaluates, stops early or on a deadline, survives out-of-memory
(smaller micro-batches, then the CPU) without losing a sample, and saves checkpoints it
can resume from exactly. It never draws and never writes logs: it hands typed events
(events.py) to its callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import psutil
import torch

import checkpoint
from config_io import ConfigIO, described
from events import (Callback, CheckpointSaved, CheckpointSetAside, EarlyStop, EpochEnd, Eval, Event, Fallback,
                    Finished, Interrupt, NonFinite, Reestimate, Resumed, Start, Step, Stopped, TrainResult)
from loader import ThreadedDataLoader
from lora import parameter_report
from model import ModelConfig, Transformer


@dataclass
class TrainerConfig(ConfigIO):
    """How to train. Field names follow LightLM's TrainerConfig, plus what a real trainer needs."""

    section: ClassVar[str] = "trainer"

    num_epochs: int = described(1, "passes over the training data (0 = no limit: max_steps or time_limit_s ends the run)")
    batch_size: int = described(16, "sequences per micro-batch")
    accumulation_steps: int = described(1, "micro-batches per optimizer step")
    max_seq_len: int = described(128, "tokens per training sequence")
    learning_rate: float = described(1e-3, "peak learning rate")
    min_lr: float = described(1e-4, "learning rate at the end of the decay")
    lr_schedule: str = described("cosine", "decay after warm-up", choices=("cosine", "linear", "constant"))
    schedule_by: str = described("steps", "the schedule's clock: optimizer steps, or time (of time_limit_s; for budget runs)",
                                 choices=("steps", "time"))
    weight_decay: float = described(0.1, "AdamW weight decay on matrices (not norms, biases, embeddings)")
    warmup_ratio: float = described(0.01, "share of optimizer steps spent warming up linearly")
    betas: tuple[float, float] = described((0.9, 0.95), "AdamW betas")
    grad_clip: float = described(1.0, "clip the gradient norm to this (0 = off)")
    optimizer: str = described("adamw", "adamw, or adamw8bit (bitsandbytes)", choices=("adamw", "adamw8bit"))
    seed: int = described(1998, "random seed (data order, initialisation)")
    device: str = described("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    use_dtype: str = described("auto", "compute precision: auto (bf16/fp16 autocast on CUDA; on a CPU bf16 autocast "
                                       "where measured 1.2x faster than fp32, else fp32; a resumed run keeps its own), "
                                       "float32, bfloat16, float16",
                               choices=("auto", "float32", "bfloat16", "float16"))
    use_compile: bool = described(False, "torch.compile the model (off by default on CPU)")
    use_flash: bool = described(True, "attention through scaled_dot_product_attention (flash / memory-efficient "
                                      "kernels on CUDA) instead of explicit matmul-softmax; also model.use_flash")
    gradient_checkpointing: bool = described(False, "recompute each block's activations in backward to save memory; "
                                                    "also model.gradient_checkpointing")
    clean_cuda_cache: bool = described(False, "empty the CUDA cache after each evaluation")
    use_ddp: bool = described(False, "DistributedDataParallel under torchrun: a whole copy of the model and "
                                      "optimizer state on every process")
    use_fsdp: bool = described(False, "FSDP2 (fully_shard) under torchrun: parameters, gradients and optimizer "
                                      "state sharded across the processes, each block gathered only while it computes")
    path_to_checkpoints: str = described("checkpoints", "root folder of run directories")
    log_interval: int = described(10, "optimizer steps between memory readings and log flushes")
    eval_interval: int = described(0, "optimizer steps between evaluations (0 = at each epoch's end); the run's end "
                                      "is always evaluated")
    eval_steps: int = described(20, "validation batches per evaluation")
    use_epoch_checkpoints: bool = described(True, "save a checkpoint at the end of every epoch")
    save_every_n_steps: int = described(0, "also save every N optimizer steps (0 = off)")
    keep_last_n: int = described(3, "checkpoints to keep (the best is always kept; 0 = keep all)")
    early_stopping_patience: int = described(0, "stop after N evaluations without improvement (0 = off)")
    max_steps: int = described(0, "stop after N optimizer steps (0 = no limit)")
    time_limit_s: float = described(0.0, "stop after this many seconds: finish the step, evaluate, save (0 = none)")
    min_steps: int = described(0, "the deadline does not end the run before this many optimizer steps (a short "
                                  "budget on a machine slower than measured still trains a little)")
    max_nonfinite_steps: int = described(5, "stop after this many non-finite losses in a row")

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        positive = ("batch_size", "accumulation_steps", "max_seq_len", "log_interval", "eval_steps",
                    "max_nonfinite_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainerConfig.{name}={value!r}: must be a positive integer")
        for name in ("num_epochs", "eval_interval", "save_every_n_steps", "keep_last_n", "early_stopping_patience", "max_steps", "seed",
                     "min_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainerConfig.{name}={value!r}: must be an integer >= 0")
        for name in ("learning_rate",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 10:
                raise ValueError(f"TrainerConfig.{name}={value!r}: must be a number in (0, 10)")
        for name in ("min_lr", "weight_decay", "grad_clip", "time_limit_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"TrainerConfig.{name}={value!r}: must be a finite number >= 0")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"TrainerConfig.min_lr={self.min_lr}: must not exceed learning_rate={self.learning_rate}")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainerConfig.warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainerConfig.betas={self.betas!r}: must be two numbers in [0, 1)")
        if self.schedule_by == "time" and not self.time_limit_s:
            raise ValueError("TrainerConfig.schedule_by='time' needs time_limit_s > 0")
        if self.num_epochs == 0 and not self.max_steps and not (self.schedule_by == "time" and self.time_limit_s):
            raise ValueError("TrainerConfig.num_epochs=0 (no epoch limit) needs max_steps > 0, or schedule_by='time' "
                             "with time_limit_s > 0")
        if self.use_ddp and self.use_fsdp:
            raise ValueError("TrainerConfig.use_fsdp=True with use_ddp=True: choose one way of training on several "
                             "processes")
        for name in ("lr_schedule", "schedule_by", "optimizer", "device", "use_dtype"):
            choices = self.choices(name)
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainerConfig.{name}={getattr(self, name)!r}: must be one of {', '.join(choices)}")

    @property
    def distributed(self) -> bool:
        """Whether training runs as several torchrun processes (DDP or FSDP)."""
        return self.use_ddp or self.use_fsdp

    @property
    def launch_hint(self) -> str:
        """How to start training the way this config asks: the torchrun command line."""
        flag = "trainer.use_fsdp=yes" if self.use_fsdp else "trainer.use_ddp=yes"
        return f"torchrun --nproc_per_node=N train.py train {flag} ..."

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step on one process: micro-batch x accumulation x sequence."""
        return self.batch_size * self.accumulation_steps * self.max_seq_len


# ---- helpers --------------------------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator failing."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        "can't allocate memory" in message or "out of memory" in message.lower() or isinstance(error, MemoryError))


def learning_rate_at(step: int, total_steps: int, config: TrainerConfig) -> float:
    """Linear warm-up over warmup_ratio of the steps, then cosine/linear decay to min_lr."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    return _decay(min(1.0, (step - warmup) / max(1, total_steps - warmup - 1)), config)


def learning_rate_at_time(elapsed: float, config: TrainerConfig) -> float:
    """The same shape on the clock: warm-up over warmup_ratio of time_limit_s, then decay
    to min_lr at the deadline, whatever the throughput turns out to be."""
    progress = min(1.0, elapsed / config.time_limit_s)
    if progress < config.warmup_ratio:
        return config.learning_rate * max(progress / config.warmup_ratio, 1e-3)
    return _decay((progress - config.warmup_ratio) / max(1e-9, 1 - config.warmup_ratio), config)


def _decay(progress: float, config: TrainerConfig) -> float:
    if config.lr_schedule == "constant":
        return config.learning_rate
    if config.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return config.min_lr + (config.learning_rate - config.min_lr) * shape


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; weight decay on matrices, none on norms, biases and the
    (tied) embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainerConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = [g for g in parameter_groups(model, config.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from error
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, betas=config.betas)
    # The fused kernel on CPU too: one pass per tensor instead of foreach's several (for the
    # 30M preset's parameters, 23 ms a step vs 88 ms for foreach and 46 ms one tensor at a
    # time: python -m bench.bench_train --optimizers).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=fused or None,
                             foreach=None if fused else True)


def resolve_device(config: TrainerConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainerConfig.device='cuda' but no CUDA device is available; use auto or cpu")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


BF16_MARGIN = 1.2  # bf16 autocast trains a CPU run only when measured at least this much faster than fp32
CPU_DTYPE_VARIABLE = "SPRAT_CPU_DTYPE"  # float32 or bfloat16: auto's CPU choice without measuring (the tests pin it)


@dataclass(frozen=True)
class CpuPrecision:
    """The precision `use_dtype="auto"` trains in on this CPU, and why: `speedup` is how
    much faster bf16 autocast ran than fp32 when measured (None: not measured), `source`
    says where the choice came from (measured, cached, unsupported, environment)."""

    dtype: str  # float32 | bfloat16
    speedup: Optional[float] = None
    source: str = "measured"

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def describe(self) -> str:
        """'bf16 autocast (measured 1.52x as fast as fp32 on this CPU)'."""
        return f"{'bf16 autocast' if self.bf16 else 'fp32'} ({self.reason()})"

    def reason(self) -> str:
        """Why: 'measured 1.52x as fast as fp32 on this CPU' (', cached' when it was)."""
        if self.source == "environment":
            return f"set by {CPU_DTYPE_VARIABLE}"
        if self.source == "unsupported":
            return "torch has no bf16 kernels for this CPU"
        when = ", cached" if self.source == "cached" else ""
        if self.bf16:
            return f"measured {self.speedup:.2f}x as fast as fp32 on this CPU{when}"
        return f"bf16 autocast measured only {self.speedup:.2f}x as fast on this CPU (needs {BF16_MARGIN}x){when}"


_cpu_precision: list[CpuPrecision] = []  # this process's choice, once decided (measured or from the cache)


def bf16_speedup(seconds: float = 0.3, most_pairs: int = 7) -> float:
    """How much faster bf16 autocast trains than fp32 on this CPU: the median, over pairs
    of one fp32 and one bf16 forward and backward pass timed back to back (so that other
    work on the machine slows both alike), of fp32's time over bf16's, after a warm-up of
    each. The model is one block of the ladder's 256-wide shape with an 8,192-token
    vocabulary at batch 2 x 128, the logits included (most of a small model's step). At
    least three pairs, more while they fit in `seconds`; two when both find bf16 at less
    than half the speed (emulated: 13x slower on an earlier machine). On one thread: the
    cores' bf16 speed is what is asked, and two threads on a busy two-core machine time the
    other process instead (0.8x where one thread measured 1.4x)."""
    config = ModelConfig(vocab_size=8192, num_dims=256, num_heads=4, num_kv_heads=2, num_layers=1,
                         ffn_hidden_dims=672, context_len=128)
    with torch.random.fork_rng(devices=[]):  # the run's random state stays its own
        torch.manual_seed(0)
        model = Transformer(config).train()
        ids = torch.randint(0, config.vocab_size, (2, config.context_len))

    def seconds_of_step(bf16: bool) -> float:
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss, _ = model(ids, ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds_of_step(False), seconds_of_step(True)
        ratios: list[float] = []
        started = time.perf_counter()
        while len(ratios) < 3 or (len(ratios) < most_pairs and time.perf_counter() - started < seconds):
            fp32 = seconds_of_step(False)
            ratios.append(fp32 / seconds_of_step(True))
            if len(ratios) == 2 and max(ratios) < 0.5:
                break
    finally:
        torch.set_num_threads(threads)
    return statistics.median(ratios)


def cpu_precision(remeasure: bool = False, speedup: Optional[Callable[[], float]] = None) -> CpuPrecision:
    """The precision auto trains in on this CPU: bf16 autocast when it is measured (by
    `speedup`, default `bf16_speedup`) at least BF16_MARGIN times as fast as fp32, else
    fp32. Decided once a process (again when `remeasure`); SPRAT_CPU_DTYPE=float32 or
    bfloat16 decides without measuring."""
    known = known_cpu_precision()
    if known is not None and (not remeasure or known.source == "environment"):
        return known
    if not _bf16_kernels():
        choice = CpuPrecision("float32", None, "unsupported")
    else:
        ratio = (speedup or bf16_speedup)()
        choice = CpuPrecision("bfloat16" if ratio >= BF16_MARGIN else "float32", round(ratio, 3))
    remember_cpu_precision(choice)
    return choice


def known_cpu_precision() -> Optional[CpuPrecision]:
    """This process's CPU precision if it is decided (or set by SPRAT_CPU_DTYPE), without measuring."""
    pinned = os.environ.get(CPU_DTYPE_VARIABLE, "").strip().lower()
    if pinned:
        if pinned not in ("float32", "bfloat16"):
            raise ValueError(f"{CPU_DTYPE_VARIABLE}={pinned!r}: must be float32 or bfloat16 (or unset: measured)")
        return CpuPrecision(pinned, None, "environment")
    return _cpu_precision[0] if _cpu_precision else None


def _bf16_kernels() -> bool:
    """Whether torch has bf16 kernels for this CPU (oneDNN's own test; True where torch has no such test)."""
    test = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(test()) if test is not None else True
    except RuntimeError:
        return True


def remember_cpu_precision(choice: Optional[CpuPrecision]) -> None:
    """Make `choice` this process's CPU precision (from a cache), or forget it (None)."""
    _cpu_precision.clear()
    if choice is not None:
        _cpu_precision.append(choice)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast pays on `device`: CUDA from compute capability 8.0 (Ampere),
    where it runs natively (before that it is emulated); a CPU where it was measured
    faster than fp32 by a margin (`cpu_precision`: AVX-512 BF16 or AMX CPUs, not those that
    emulate it, 13x slower on an earlier machine). The one place this rule lives (training
    and the system check)."""
    if device.type == "cpu":
        return cpu_precision().bf16
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device.index or 0)
    return (props.major, props.minor) >= (8, 0)


def resolve_dtype(config: TrainerConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast where it is fast (`fast_bf16`); else fp16 with a GradScaler on CUDA
    and fp32 on a CPU; `use_dtype` forces a choice."""
    if config.use_dtype != "auto":
        return getattr(torch, config.use_dtype)
    if fast_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def memory_stats(device: torch.device) -> dict:
    stats = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        stats.update(cuda_allocated_mb=torch.cuda.memory_allocated(device) / 2**20,
                     cuda_reserved_mb=torch.cuda.memory_reserved(device) / 2**20,
                     cuda_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20)
    return stats


def rng_state() -> dict:
    state = {"python": _jsonable(random.getstate()),
             "numpy": _jsonable(np.random.get_state()),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@torch.no_grad()
def evaluate(model: Transformer, dataset, batch_size: int, max_batches: Optional[int] = None,
             device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
             progress: Optional[Callable[[int, int], None]] = None) -> float:
    """Mean cross-entropy over (the first `max_batches` batches of) a dataset, in order,
    weighted by the number of target tokens. `progress(done, total)` is called after each
    batch."""
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"evaluate: batch_size={batch_size}, max_batches={max_batches}: both must be at least 1")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, tokens, batches = 0.0, 0, 0
    planned = math.ceil(len(dataset) / batch_size)
    planned = planned if max_batches is None else min(planned, max_batches)
    for start in range(0, len(dataset), batch_size):
        if max_batches is not None and batches >= max_batches:
            break
        x, y = dataset.batch(np.arange(start, min(start + batch_size, len(dataset))))
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, _, ce_loss = model(x, y)
        count = int((y != -100).sum())
        total += ce_loss.float().item() * count
        tokens += count
        batches += 1
        if progress is not None:
            progress(batches, planned)
    model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate: the dataset has no target tokens")
    return total / tokens


def guard_limit(base_loss: float, max_rise: float) -> float:
    """The highest general-text loss allowed: the base's perplexity x (1 + max_rise)."""
    return base_loss + math.log1p(max_rise)


@dataclass
class Guard:
    """What a fine-tune must not damage: held-out general text. An evaluation counts as the
    best so far only when the task loss beats the base model's and every earlier one, while
    perplexity on `data` has risen by at most `max_rise` (0.05 = 5%) over the base's."""

    data: object  # PackedBlocks of general text, tokenized for the base
    base_loss: float  # the base model's loss on `data`
    base_task_loss: float  # the base model's loss on the task's validation split
    max_rise: float = 0.05
    batch_size: int = 8
    max_batches: Optional[int] = None
    source: str = ""  # where the general text came from, for reports

    @property
    def limit(self) -> float:
        return guard_limit(self.base_loss, self.max_rise)

    def rise(self, loss: float) -> float:
        """The change in general-text perplexity at `loss`, as a fraction of the base's."""
        return math.exp(loss - self.base_loss) - 1.0


# ---- FSDP2 ------------------------------------------------------------------------------------
def shard_model(model: Transformer, device: torch.device) -> None:
    """FSDP2 in place (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html):
    each transformer block is one unit, gathered only while it computes; the root holds the
    embedding, the final norm and the head tied to the embedding. A MoE expert that gets no
    tokens on one rank sends zero gradients, so every rank reduce-scatters the same tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if model.config.use_moe:
        model.set_reduce_scatter_unused_params(True)


@contextlib.contextmanager
def fsdp_accumulating(model: torch.nn.Module):
    """Backward passes inside the `with` keep their gradients unsharded and unreduced (one
    reduce-scatter per optimizer step instead of one per micro-batch, like DDP's no_sync)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict in rank 0's CPU memory ({} on the other ranks),
    names and tied weights as the unsharded model has them. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    if state:  # gathered once per name: point tied names at one tensor again, as state_dict() does
        first = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in state:
                state[name] = state[first.setdefault(param, name)]
    return state


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of a sharded model, whole, on rank 0 ({} on the others) in the
    layout `optimizer.state_dict()` gives an unsharded run: parameters numbered in param
    group order, not named. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not named:
        return {}
    index = {name: i for i, name in enumerate(n for group in named["param_groups"] for n in group["params"])}
    return {"state": {index[name]: value for name, value in named["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in named["param_groups"]]}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: Optional[dict]) -> None:
    """Load whole (unsharded) states, as an unsharded run saves them, into a sharded model
    and its optimizer: each rank keeps its shard. Every rank must call it with the same states."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}  # global shapes
    found = {name: tuple(value.shape) for name, value in model_state.items()}
    if expected != found:
        wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise RuntimeError(f"{len(wrong)} tensor(s) differ in name or shape, e.g. {wrong[:3]}")
    options = _full_options()
    set_model_state_dict(model, dict(model_state), options=options)
    if optimizer_state is not None:
        name_of = {param: name for name, param in model.named_parameters()}
        names = [name_of[param] for group in optimizer.param_groups for param in group["params"]]
        named = {"state": {names[int(i)]: value for i, value in optimizer_state["state"].items()},
                 "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                  for group in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, named, options=options)


def _replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm, already reduced over ranks) as a plain tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ---- the trainer ------------------------------------------------------------------------------
@dataclass
class TrainState:
    """A run's progress: what a checkpoint saves (`trainer_state.json`) and a resume
    restores, as one object."""

    global_step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training seconds of all sessions of this run
    loader: dict = field(default_factory=dict)  # ThreadedDataLoader.state_dict(): epoch, position, seed
    micro_splits: int = 1  # each loader batch is cut into this many micro-batches (grows on OOM)
    device: str = "cpu"
    dtype: Optional[str] = None  # the precision it trains in (None: a checkpoint from before it was recorded)
    best_val_loss: Optional[float] = None
    best_general_loss: Optional[float] = None  # the guard's general-text loss at the best evaluation
    best_checkpoint: Optional[str] = None
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0
    adapter_only: bool = False  # the checkpoint holds the trainable (LoRA) weights only
    scaler: Optional[dict] = None  # fp16 GradScaler state
    rng: Optional[dict] = None

    def to_dict(self) -> dict:
        """The JSON layout; `epoch` and `scheduler` are there for readers of the file."""
        return {**dataclasses.asdict(self), "epoch": self.loader.get("epoch", 0),
                "scheduler": {"step": self.global_step}}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass
class _Session:
    """The loop's bookkeeping for one call of `fit` (nothing of it is saved)."""

    started: float
    deadline: Optional[float]
    start_step: int
    elapsed_before: float
    stop_reason: Optional[str] = None
    interrupts: int = 0
    last_loss: Optional[float] = None
    best_step: Optional[int] = None  # a checkpoint saved at this step becomes the best one
    last_eval_step: Optional[int] = None
    nonfinite_in_a_row: int = 0
    last_step_s: float = 0.0  # the latest optimizer step's duration: whether another fits before the deadline
    window_started: float = 0.0  # the throughput window: its start and its tokens
    window_tokens: int = 0
    shown_total: Optional[int] = None  # the step total displays show while a deadline ends the run (an estimate)
    reestimated: bool = False  # the shown total came from this run's own speed
    finish_checked: bool = False  # the finishing reserve was weighed against the real speed


REESTIMATE_AFTER = 3  # steps of real speed before the estimate is corrected
MAX_SLOWDOWN = 4.0  # the most the finishing reserve grows when the machine runs slower than measured
REESTIMATE_TOLERANCE = 0.15  # a later projection this far from the shown total replaces it (labelled)


class Trainer:
    """Trains `model` on `train_data` (a `data.PackedBlocks` / `data.MaskedSamples`).

    Constructing one writes nothing and changes nothing it was given: the model is placed
    on the device and gets the runtime switches (`use_flash`, `gradient_checkpointing`)
    when training or a resume starts. Checkpoints go to `run_dir`; every event goes to each
    of `callbacks` (a display, `events.MetricsLog`, ...). `adapter_only` (LoRA fine-tuning)
    saves the trainable weights alone. Under torchrun, `config.use_ddp` replicates the model
    on every process and `config.use_fsdp` shards it (FSDP2); rank 0 reports and writes
    checkpoints, which hold the whole model either way. With a `guard` (fine-tuning), each evaluation also
    measures general text, only evaluations within the guard can be the best, and the best
    is saved when it is found. `fault_hook(step, micro_batch_size)` runs before each
    micro-batch's forward pass; tests make it raise out-of-memory. `estimate` (a
    `budget.Estimate`: what the plan or start summary showed) is the step total displays
    show until the real speed of the first steps corrects it, in a `Reestimate` event.
    """

    def __init__(self, model: Transformer, config: TrainerConfig, train_data, val_data=None,
                 run_dir: Optional[str | Path] = None, callbacks: Sequence[Callback] = (),
                 adapter_only: bool = False, fault_hook: Optional[Callable[[int, int], None]] = None,
                 rank: int = 0, world_size: int = 1, guard: Optional[Guard] = None, estimate=None,
                 finish_s: float = 0.0):
        if config.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise ValueError(f"TrainerConfig.use_{'fsdp' if config.use_fsdp else 'ddp'} needs torch.distributed: "
                                 f"launch with {config.launch_hint}")
            rank, world_size = dist.get_rank(), dist.get_world_size()
        if config.use_fsdp and adapter_only:
            raise ValueError("TrainerConfig.use_fsdp: fine-tuning (adapter weights only) runs on one process or under "
                             "DDP (use_ddp); FSDP shards models trained whole")
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.model, self.config = model, config
        self.train_data, self.val_data = train_data, val_data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.fault_hook = fault_hook
        self.guard = guard
        self.estimate = estimate
        self.finish_s = finish_s
        self.device = resolve_device(config)
        if config.distributed and self.device.type == "cuda":  # one GPU per process, as torchrun numbers them
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.dtype = resolve_dtype(config, self.device)
        # why auto chose this precision, for the start line (a CPU's measured choice)
        self.dtype_note = cpu_precision().reason() if config.use_dtype == "auto" and self.device.type == "cpu" else None
        self.loader = ThreadedDataLoader(dataset=train_data, batch_size=config.batch_size, seed=config.seed,
                                         rank=rank, world_size=world_size, pin_memory=self.device.type == "cuda")
        self.optimizer = build_optimizer(model, config, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16 and self.device.type == "cuda")
        self.steps_per_epoch = math.ceil(len(self.loader) / config.accumulation_steps)
        self.total_steps = total_steps(config, self.steps_per_epoch)  # None: the deadline ends the run
        self.state = TrainState(device=self.device.type, dtype=_dtype_name(self.dtype), adapter_only=adapter_only)
        self.last_checkpoint: Optional[str] = None
        self.last_checkpoint_step: Optional[int] = None  # the step it holds (every rank knows it, none reads files)
        self.last_eval: tuple[Optional[float], Optional[float]] = (None, None)  # task loss, general-text loss
        self.step_model: Optional[torch.nn.Module] = None  # the model as the step runs it (DDP, FSDP, compiled)
        self._session: Optional[_Session] = None

    @property
    def global_step(self) -> int:
        return self.state.global_step

    # ---- set-up when training starts --------------------------------------------------------
    def _place_model(self) -> None:
        """The model on the trainer's device with the runtime switches applied, wrapped for
        DDP / torch.compile, or sharded by FSDP with the optimizer built again over the
        shards (once)."""
        if self.step_model is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self.model.check_inputs = False  # the data pipeline guarantees ids < vocab; no per-step sync
        if not self.config.use_fsdp:  # fully_shard moves one block at a time, never the whole model at once
            self.model.to(self.device)
        self.model.set_runtime(use_flash=self.config.use_flash,
                               gradient_checkpointing=self.config.gradient_checkpointing)
        self.step_model = self.model
        if self.config.use_ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.model.config.use_moe)  # an expert may get no tokens on a rank
        elif self.config.use_fsdp:
            shard_model(self.model, self.device)
            self.optimizer = build_optimizer(self.model, self.config, self.device)  # over the sharded parameters
        if self.config.use_compile:
            self.step_model = torch.compile(self.step_model)

    def emit(self, event: Event) -> None:
        if self.is_main:  # under torchrun, rank 0 speaks for all
            for callback in self.callbacks:
                callback(event)

    # ---- checkpoints ----------------------------------------------------------------------
    def _snapshot(self) -> dict:
        """The state to save now (elapsed time, loader position, RNG and scaler filled in)."""
        self.state.loader = self.loader.state_dict()
        self.state.device = self.device.type
        self.state.dtype = _dtype_name(self.dtype)
        session = self._session
        if session is not None:
            self.state.elapsed_s = session.elapsed_before + time.perf_counter() - session.started
        self.state.rng = rng_state()
        self.state.scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        return self.state.to_dict()

    def save_checkpoint(self, name: str) -> Optional[Path]:
        """Save the run's state as `run_dir/name`; rank 0 writes it. Under FSDP every rank
        first helps gather the whole model and optimizer state to rank 0, so the checkpoint
        is the one an unsharded run writes (and resumes on any number of processes)."""
        if self._session is not None and self._session.best_step == self.global_step:
            self.state.best_checkpoint = name  # this checkpoint holds the best evaluated state
        gathered = None
        if self.run_dir is not None and self.config.use_fsdp:
            gathered = full_model_state(self.model), full_optimizer_state(self.model, self.optimizer)
        if self.run_dir is None or not self.is_main:
            self.last_checkpoint, self.last_checkpoint_step = name, self.global_step
            return None
        started = time.perf_counter()
        model_state, optimizer_state = gathered or (self.model_state(), self.optimizer.state_dict())
        path = checkpoint.save(self.run_dir / name, model_state, optimizer_state, self._snapshot())
        self.last_checkpoint, self.last_checkpoint_step = name, self.global_step
        best = self.state.best_checkpoint
        removed = checkpoint.prune(self.run_dir, self.config.keep_last_n, protect=(best,) if best else ())
        self.emit(CheckpointSaved(name=name, step=self.global_step, seconds=time.perf_counter() - started,
                                  removed=removed))
        return path

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.state.adapter_only:
            return {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        return self.model.state_dict()

    def _load_model_state(self, model_state: dict, adapter_only: bool, path: Path) -> None:
        if not adapter_only:
            self.model.load_state_dict(model_state)
            return
        result = self.model.load_state_dict(model_state, strict=False)
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if result.unexpected_keys or trainable - set(model_state):
            raise checkpoint.CheckpointError(
                f"{path.name} holds adapter weights that do not fit this model "
                f"(unexpected {result.unexpected_keys[:3]}, missing {sorted(trainable - set(model_state))[:3]})")

    def load_checkpoint(self, path: str | Path) -> TrainState:
        """Restore model, optimizer, schedule position, counters, RNG and loader position."""
        return self.restore(Path(path), *checkpoint.load(path))

    def restore(self, path: Path, model_state: dict, optimizer_state: Optional[dict], saved: dict) -> TrainState:
        """`load_checkpoint` from what `checkpoint.load` read of `path`."""
        try:
            state = TrainState.from_dict(saved)
            int(state.loader["epoch"]), int(state.loader["position"])
        except (KeyError, TypeError, ValueError):
            raise checkpoint.CheckpointError(f"{path.name}: {checkpoint.STATE_FILE} is not a trainer state") from None
        self._place_model()  # the optimizer state follows its parameters' device (and shards)
        try:
            if self.config.use_fsdp:
                load_full_state(self.model, self.optimizer, model_state, optimizer_state)
            else:
                self._load_model_state(model_state, state.adapter_only, path)
        except RuntimeError as error:  # shapes that do not match the model
            if isinstance(error, checkpoint.CheckpointError):
                raise
            raise checkpoint.CheckpointError(f"{path.name} does not fit this model: {str(error)[:300]}") from None
        if optimizer_state is not None and not self.config.use_fsdp:
            kernels = [(g.get("fused"), g.get("foreach")) for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(optimizer_state)
            for group, (fused, foreach) in zip(self.optimizer.param_groups, kernels):
                # the kernel is this machine's choice, not the saved run's (an older run, another device)
                group["fused"], group["foreach"] = fused, foreach
        if self.run_dir is not None and self.is_main:
            for name in checkpoint.set_aside_later(self.run_dir, path, state.global_step):
                self.emit(CheckpointSetAside(name=name, reason=f"resumed from {path.name}"))
        self.state = state
        self.last_checkpoint, self.last_checkpoint_step = path.name, state.global_step
        try:
            self.loader.load_state_dict(state.loader)
        except ValueError as error:  # saved with another global batch that does not divide what was read
            raise checkpoint.CheckpointError(f"{path.name}: {error}") from None
        self._keep_precision(state, path)
        if state.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(state.scaler)
        if state.rng is not None:
            set_rng_state(state.rng)
        self.emit(Resumed(checkpoint=path.name, step=self.global_step, epoch=self.loader.epoch))
        return state

    def _keep_precision(self, state: TrainState, path: Path) -> None:
        """A resumed run trains on in the precision it was trained in on this device type
        (under `use_dtype="auto"`), whatever auto would choose now: the one its state
        records, or fp32 on a CPU for a checkpoint from before it was recorded."""
        if self.config.use_dtype != "auto" or state.device != self.device.type:
            return
        if state.dtype in ("float32", "bfloat16", "float16"):
            recorded = getattr(torch, state.dtype)
        elif state.dtype is None and self.device.type == "cpu":
            recorded = torch.float32
        else:  # CUDA's rule has not changed since before the precision was recorded
            return
        if recorded != self.dtype:
            self.dtype = recorded
            self.scaler = torch.amp.GradScaler("cuda", enabled=recorded == torch.float16 and self.device.type == "cuda")
            self.dtype_note = f"as {path.name} trained: a resumed run keeps its precision"

    # ---- one optimizer step -------------------------------------------------------------
    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        if self.fault_hook is not None:
            self.fault_hook(self.global_step, x.size(0))
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            _, loss, ce_loss = self.step_model(x, y)
        self.scaler.scale(loss * scale).backward()
        return ce_loss.detach().float() * scale

    def _run_group(self, group: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward over one optimizer step's batches, each cut into
        `micro_splits` micro-batches, the loss weighted so the update equals one over
        the whole group. Returns the group's mean loss (a tensor, no sync)."""
        splits = self.state.micro_splits
        micro_batches = [(xs, ys) for x, y in group for xs, ys in zip(x.tensor_split(splits), y.tensor_split(splits))
                         if xs.size(0)]
        # Each micro-batch's loss is a mean over its target tokens; weighting by its share
        # of the group's target tokens makes the sum the mean over the whole group, however
        # the group is cut (prompt-masked data has unequal counts). Counted on the CPU.
        counts = [int((ys != -100).sum()) for _, ys in micro_batches]
        total_targets = max(1, sum(counts))
        total = None
        for index, (xs, ys) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # Under DDP and FSDP, gradients are reduced once per optimizer step, on the last micro-batch.
            with self._accumulating(last):
                loss = self._forward_backward(xs, ys, counts[index] / total_targets)
            total = loss if total is None else total + loss
        return total

    def _accumulating(self, last: bool):
        """What a micro-batch's backward runs in: nothing special for the last one (or on
        one process); before it, without reducing gradients across ranks."""
        if last or not self.config.distributed:
            return contextlib.nullcontext()
        if self.config.use_fsdp:
            return fsdp_accumulating(self.model)
        module = self.step_model
        return getattr(module, "_orig_mod", module).no_sync()  # (DDP under torch.compile)

    def _step_with_fallback(self, group: list) -> torch.Tensor:
        """`_run_group`, retried on out-of-memory with halved micro-batches, then on the CPU.
        The same data is retried from the group's start, so nothing is skipped or doubled."""
        while True:
            try:
                return self._run_group(group)
            except Exception as error:  # noqa: BLE001 - only out-of-memory is handled
                if not is_out_of_memory(error) or self.config.distributed \
                        or (self.config.batch_size <= self.state.micro_splits and self.device.type == "cpu"):
                    raise  # (under torchrun a rank retrying alone would hang the others)
                message = str(error)[:200]
            # Out of the except block: its traceback, and the failed step's tensors that its
            # frames hold, are released before the memory is freed.
            self.optimizer.zero_grad(set_to_none=True)
            self._free_memory()
            batch_size = self.config.batch_size
            if math.ceil(batch_size / self.state.micro_splits) > 1:
                self.state.micro_splits = min(batch_size, self.state.micro_splits * 2)
                self.emit(Fallback(action="halve_micro_batch", step=self.global_step, error=message,
                                   micro_batch_size=math.ceil(batch_size / self.state.micro_splits),
                                   accumulation=self.state.micro_splits * self.config.accumulation_steps,
                                   effective_batch=batch_size * self.config.accumulation_steps))
            else:
                self._move_to_cpu()
                self.emit(Fallback(action="move_to_cpu", step=self.global_step, error=message))

    def _free_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _move_to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self.dtype, self.dtype_note = torch.float32, None
        self.model.to(self.device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.state.micro_splits = 1
        self._free_memory()

    def _optimizer_step(self, lr: float) -> torch.Tensor:
        """Set the learning rate, unscale and clip; returns the gradient norm (the step
        itself is taken once the caller knows it is finite). Under FSDP the gradients are
        DTensor shards: their norm is computed over all ranks and clips every shard alike."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.grad_clip > 0:
            return _replicated(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
        return _replicated(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until the epochs, max_steps, the deadline, early stopping or Ctrl-C end it."""
        config = self.config
        self._place_model()
        started = time.perf_counter()
        elapsed_before = self.state.elapsed_s
        deadline = started + config.time_limit_s - elapsed_before if config.time_limit_s else None
        session = self._session = _Session(started, deadline, self.global_step, elapsed_before,
                                           window_started=started)
        estimate = self.estimate
        if estimate is not None and self._total_is_estimate():
            session.shown_total = self.global_step + estimate.steps if self.global_step else estimate.steps
        session.stop_reason = self.done_reason()  # a resumed run that had already ended trains nothing
        previous_handlers = self._install_signal_handlers()
        self.model.train()
        if self.loader.position >= len(self.loader):  # resumed from the end of an epoch
            self.loader.epoch, self.loader.position = self.loader.epoch + 1, 0
        counts = parameter_report(self.model)  # NF4 weights count as the parameters they stand for
        self.emit(Start(total_steps=self.total_steps or 0, steps_per_epoch=self.steps_per_epoch, step=self.global_step,
                        epoch=self.loader.epoch,
                        effective_batch=config.batch_size * config.accumulation_steps * self.world_size,
                        time_left_s=config.time_limit_s - elapsed_before if config.time_limit_s else None,
                        schedule_by=config.schedule_by, device=self.device.type,
                        dtype=_dtype_name(self.dtype), dtype_note=self.dtype_note, params=counts["total"],
                        trainable=counts["trainable"], quantized=counts["quantized"],
                        estimated_steps=None if estimate is None else estimate.steps,
                        estimated_seconds=None if estimate is None else estimate.seconds,
                        estimate_basis=None if estimate is None else f"{estimate.basis}: {estimate.detail}"))
        try:
            while session.stop_reason is None and not self._steps_done() \
                    and (config.num_epochs == 0 or self.loader.epoch < config.num_epochs):
                epoch = self.loader.epoch
                batches = iter(self.loader)
                try:
                    while session.stop_reason is None and not self._steps_done() \
                            and self.loader.position < len(self.loader):
                        size = min(config.accumulation_steps, len(self.loader) - self.loader.position)
                        self._train_step(epoch, [next(batches) for _ in range(size)])
                finally:
                    batches.close()
                if session.stop_reason != "nonfinite" and self.loader.position >= len(self.loader):
                    self.loader.epoch, self.loader.position = epoch + 1, 0
                    self.emit(EpochEnd(epoch=epoch, step=self.global_step))
                    if not config.eval_interval and session.last_eval_step != self.global_step:
                        self._evaluate()  # with an eval_interval, evaluations keep to it (and the run's end)
                    if config.use_epoch_checkpoints and self.last_checkpoint_step != self.global_step:
                        # (the guard may have saved this step as its best)
                        self.save_checkpoint(f"epoch_{epoch + 1}")
                    self._check_early_stop()
            status = session.stop_reason or "finished"
            trained = self.global_step > session.start_step
            if trained and status in ("deadline", "max_steps", "finished") and session.last_eval_step != self.global_step:
                self._evaluate()
            if trained and status != "nonfinite" and self.last_checkpoint_step != self.global_step:
                self.save_checkpoint(f"step_{self.global_step}")
            result = TrainResult(status, self.global_step, self.loader.epoch, session.last_loss,
                                 self.state.best_val_loss, self.last_checkpoint, time.perf_counter() - started,
                                 self.state.tokens_seen)
            self.emit(Finished(**dataclasses.asdict(result)))
            return result
        finally:
            self.loader.close()
            self._restore_signal_handlers(previous_handlers)
            for callback in self.callbacks:
                getattr(callback, "close", lambda: None)()

    def _steps_done(self) -> bool:
        return self.total_steps is not None and self.global_step >= self.total_steps

    def done_reason(self) -> Optional[str]:
        """Why there is nothing left to train (a resumed run that had already ended:
        max_steps, deadline, or its epochs finished), or None."""
        config, state, loader = self.config, self.state, self.loader
        if config.max_steps and state.global_step >= config.max_steps:
            return "max_steps"
        if config.time_limit_s and state.elapsed_s >= config.time_limit_s:
            return "deadline"
        epochs_done = loader.epoch + (1 if loader.position >= len(loader) else 0)
        if self._steps_done() or (config.num_epochs and epochs_done >= config.num_epochs):
            return "finished"
        return None

    def _train_step(self, epoch: int, group: list) -> None:
        config, session, state = self.config, self._session, self.state
        began = time.perf_counter()
        if config.schedule_by == "time":
            lr = learning_rate_at_time(session.elapsed_before + time.perf_counter() - session.started, config)
        else:
            lr = learning_rate_at(self.global_step, self.total_steps, config)
        loss = self._step_with_fallback(group)
        grad_norm = self._optimizer_step(lr)
        stats = torch.stack([loss, grad_norm.to(loss.device).float()])
        if config.distributed:  # the mean loss over ranks (the gradient norm is already shared)
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats = stats / self.world_size
        loss_value, norm_value = stats.tolist()  # one sync per step
        # With fp16 the GradScaler expects (and skips) steps with inf gradients; otherwise they are failures.
        if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and not self.scaler.is_enabled()):
            self._skip_nonfinite(loss_value, norm_value)
            return
        session.nonfinite_in_a_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._share_expert_load()
        self.model.update_moe_bias()
        state.global_step += 1
        tokens = sum(int(x.numel()) for x, _ in group) * self.world_size
        state.tokens_seen += tokens
        session.window_tokens += tokens
        session.last_loss = loss_value
        session.last_step_s = time.perf_counter() - began
        self._emit_step(epoch, loss_value, lr, norm_value)
        if self.global_step % config.log_interval == 0:
            session.window_started, session.window_tokens = time.perf_counter(), 0
        self._after_step()

    def _share_expert_load(self) -> None:
        """Under FSDP (which leaves buffers alone), the loss-free balancing bias follows the
        load of the whole global batch, as on one process, and stays the same on every rank."""
        if not (self.config.use_fsdp and self.model.config.use_moe and self.model.config.use_lossfreebalance):
            return
        import torch.distributed as dist

        for moe in self.model.moe_layers():
            dist.all_reduce(moe.pending_load)

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient: no update; too many in a row stop the run, saved."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # fp16: closes this step's unscale_ (and lowers the scale)
        self.state.nonfinite_steps += 1
        session = self._session
        session.nonfinite_in_a_row += 1
        self.emit(NonFinite(step=self.global_step, loss=loss, grad_norm=grad_norm, in_a_row=session.nonfinite_in_a_row))
        if session.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            session.stop_reason = "nonfinite"
            self.emit(Stopped(reason=f"{session.nonfinite_in_a_row} non-finite losses in a row; the last good state is "
                                     f"saved. Lower the learning rate or check the data."))
            self.save_checkpoint(f"step_{self.global_step}")

    def _total_is_estimate(self) -> bool:
        """Whether a deadline (not the epochs or max_steps alone) sets how many steps run."""
        config = self.config
        return bool(config.time_limit_s) and (config.schedule_by == "time" or self.total_steps is None)

    def _emit_step(self, epoch: int, loss: float, lr: float, grad_norm: float) -> None:
        session, config = self._session, self.config
        now = time.perf_counter()
        tokens_per_s = session.window_tokens / (now - session.window_started) if now > session.window_started else 0.0
        done = now - session.started
        steps_this_run = max(1, self.global_step - session.start_step)
        total, eta = self.total_steps, None
        if total is not None:
            eta = done / steps_this_run * max(0, total - self.global_step)
        estimated = self._total_is_estimate()
        if not session.finish_checked and steps_this_run >= REESTIMATE_AFTER:
            self._reserve_for_finishing(tokens_per_s)
        if config.time_limit_s:
            time_left = max(0.0, config.time_limit_s - session.elapsed_before - done)
            eta = time_left if eta is None else min(eta, time_left)
            if estimated:  # the deadline ends the run: its steps are an estimate, corrected now and then
                projected = self.global_step + round(steps_this_run / max(done, 1e-9) * time_left)
                projected = projected if total is None else min(total, projected)
                total = self._shown_total(projected, steps_this_run, time_left, tokens_per_s)
        load = self.model.expert_load() if self.model.config.use_moe else None
        self.emit(Step(epoch=epoch, step=self.global_step, total_steps=total, loss=loss, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=tokens_per_s, tokens_seen=self.state.tokens_seen, eta_s=eta,
                       memory=memory_stats(self.device) if self.global_step % config.log_interval == 0 else None,
                       expert_load=load.tolist() if load is not None else None, total_estimated=estimated))

    def _reserve_for_finishing(self, tokens_per_s: float) -> None:
        """Once the first steps show the real speed: when it is below the estimate's (other
        processes share the CPU), the finishing work after the deadline (`finish_s` at the
        estimated speed: the last evaluation, the save, the sample) will be slower by as much,
        so the deadline moves earlier by the difference and the run still ends in its budget."""
        session = self._session
        session.finish_checked = True
        if session.deadline is None or not self.finish_s or self.estimate is None or tokens_per_s <= 0:
            return
        slowdown = min(MAX_SLOWDOWN, self.estimate.tokens_per_second / tokens_per_s)
        if slowdown > 1.0:
            session.deadline -= self.finish_s * (slowdown - 1.0)

    def _shown_total(self, projected: int, steps_this_run: int, time_left: float, tokens_per_s: float) -> int:
        """The estimated step total displays show: the given estimate until REESTIMATE_AFTER
        steps of real speed correct it (when they differ), then replaced only when a later
        projection drifts by more than REESTIMATE_TOLERANCE or the run passes it; every
        replacement is a `Reestimate` event, so the total never changes unannounced."""
        session = self._session
        shown = session.shown_total
        if shown is not None and time_left <= 0:  # the last step: no news worth a line
            return max(shown, self.global_step)
        if shown is not None and self.global_step < shown:
            if steps_this_run < REESTIMATE_AFTER:
                return shown
            tolerance = REESTIMATE_TOLERANCE * shown if session.reestimated else max(1.0, 0.05 * shown)
            session.reestimated = True
            if abs(projected - shown) <= tolerance:
                return shown
        projected = max(projected, self.global_step + (1 if time_left > 0 else 0))
        if self.total_steps is not None:  # max_steps or the epochs still cap it
            projected = min(projected, self.total_steps)
        if projected == shown:
            return shown
        self.emit(Reestimate(step=self.global_step, steps=projected, previous_steps=shown, seconds_left=time_left,
                             tokens_per_s=tokens_per_s, from_steps=steps_this_run))
        session.shown_total, session.reestimated = projected, True
        return projected

    def _after_step(self) -> None:
        config, session = self.config, self._session
        if config.eval_interval and self.global_step % config.eval_interval == 0:
            self._evaluate()
            if self._check_early_stop():
                return
        if config.save_every_n_steps and self.global_step % config.save_every_n_steps == 0:
            self.save_checkpoint(f"step_{self.global_step}")
        if config.max_steps and self.global_step >= config.max_steps:
            session.stop_reason = "max_steps"
        elif session.deadline is not None and self.global_step >= config.min_steps \
                and time.perf_counter() + 0.5 * session.last_step_s >= session.deadline:
            # the next step would end more than half past the deadline (a busy machine's steps are long)
            session.stop_reason = "deadline"
        elif session.interrupts:
            session.stop_reason = "interrupted"
        if config.distributed:  # every rank stops at the same step, for the first reason any rank has
            import torch.distributed as dist

            reasons = ["", "max_steps", "deadline", "interrupted"]
            code = torch.tensor([reasons.index(session.stop_reason or "")], device=self.device)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            session.stop_reason = reasons[int(code)] or None

    def _check_early_stop(self) -> bool:
        """Stop (saved) after `early_stopping_patience` evaluations without a new best."""
        config, session = self.config, self._session
        if not config.early_stopping_patience or self.state.evals_without_improvement < config.early_stopping_patience \
                or session.stop_reason is not None:
            return False
        session.stop_reason = "early_stop"
        self.emit(EarlyStop(step=self.global_step, best_val_loss=self.state.best_val_loss,
                            patience=config.early_stopping_patience))
        if self.last_checkpoint_step != self.global_step:
            self.save_checkpoint(f"step_{self.global_step}")
        return True

    def _evaluate(self) -> Optional[float]:
        if self.val_data is None or len(self.val_data) == 0:
            return None
        started = time.perf_counter()
        val_loss = evaluate(self.model, self.val_data, self.config.batch_size, self.config.eval_steps,
                            self.device, self.dtype)
        state, session, guard = self.state, self._session, self.guard
        session.last_eval_step = self.global_step
        general_loss = None
        if guard is not None:
            general_loss = evaluate(self.model, guard.data, guard.batch_size, guard.max_batches, self.device,
                                    self.dtype)
        val_loss, general_loss = self._agreed(val_loss, general_loss)
        within = guard is None or general_loss <= guard.limit
        best_before = state.best_val_loss if state.best_val_loss is not None or guard is None else guard.base_task_loss
        improved = within and (best_before is None or val_loss < best_before)
        self.last_eval = (val_loss, general_loss)
        if improved:
            state.best_val_loss = val_loss
            state.best_general_loss = general_loss
            session.best_step = self.global_step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        if self.config.clean_cuda_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.emit(Eval(step=self.global_step, val_loss=val_loss, best_val_loss=state.best_val_loss, improved=improved,
                       seconds=time.perf_counter() - started, general_loss=general_loss,
                       general_rise=guard.rise(general_loss) if guard is not None else None,
                       within_guard=within if guard is not None else None))
        if improved and guard is not None:  # the best guarded state is kept as it is found
            self.save_checkpoint(f"step_{self.global_step}")
        return val_loss

    def _agreed(self, *values: Optional[float]) -> tuple[Optional[float], ...]:
        """Rank 0's figures on every rank: each rank evaluates the same batches, and the
        decisions taken on them (best, early stop, the guard's save) must not differ by a
        rounding."""
        if not self.config.distributed:
            return values
        import torch.distributed as dist

        shared = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, src=0)
        return tuple(None if v is None else s for v, s in zip(values, shared.tolist()))

    def unsharded_model(self) -> Optional[Transformer]:
        """The trained model as one ordinary module: the model itself, or under FSDP a copy
        built on rank 0 from the gathered weights (None on the other ranks, which must call
        this too)."""
        if not self.config.use_fsdp or self.step_model is None:
            return self.model
        state = full_model_state(self.model)
        if not self.is_main:
            return None
        model = Transformer(self.model.config)
        model.load_state_dict(state)
        model.set_runtime(use_flash=self.config.use_flash)
        return model.to(self.device)

    # ---- Ctrl-C and SIGTERM --------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._session.interrupts += 1
            if self._session.interrupts > 1:  # a second Ctrl-C: stop now, unsaved
                raise KeyboardInterrupt
            self.emit(Interrupt(signal=signal.Signals(signum).name, step=self.global_step))

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def total_steps(config: TrainerConfig, steps_per_epoch: int) -> Optional[int]:
    """Optimizer steps the epochs and max_steps allow; None when only the deadline ends the run."""
    by_epochs = steps_per_epoch * config.num_epochs if config.num_epochs else None
    if config.max_steps:
        return min(by_epochs, config.max_steps) if by_epochs else config.max_steps
    return by_epochs

