"""Training: `TrainerConfig`, the `ThreadedDataLoader` and the `Trainer`.

The trainer accumulates gradients, picks the precision for the device, clips, schedules
the learning rate, evaluates, stops early or on a deadline, survives out-of-memory
(smaller micro-batches, then the CPU) without losing a sample, and saves checkpoints it
can resume from exactly. It never draws anything: it emits events (dicts) through a
callback and appends them to `metrics.jsonl` in the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import psutil
import torch

import checkpoint
from config_io import ConfigIO, described
from loader import ThreadedDataLoader
from model import Transformer


@dataclass
class TrainerConfig(ConfigIO):
    """How to train. Field names follow LightLM's TrainerConfig, plus what a real trainer needs."""

    num_epochs: int = described(1, "passes over the training data")
    batch_size: int = described(8, "sequences per micro-batch")
    accumulation_steps: int = described(1, "micro-batches per optimizer step")
    max_seq_len: int = described(256, "tokens per training sequence")
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
    use_dtype: str = described("auto", "compute precision: auto (bf16/fp16 autocast on CUDA, fp32 on CPU), float32, bfloat16, float16",
                                                          choices=("auto", "float32", "bfloat16", "float16"))
    use_compile: bool = described(False, "torch.compile the model (off by default on CPU)")
    use_flash: bool = described(True, "attention through scaled_dot_product_attention", mirrors="model.use_flash",
                                leads=True)
    gradient_checkpointing: bool = described(False, "recompute activations in backward to save memory",
                                             mirrors="model.gradient_checkpointing", leads=True)
    clean_cuda_cache: bool = described(False, "empty the CUDA cache after each evaluation")
    use_ddp: bool = described(False, "DistributedDataParallel under torchrun")
    use_moe: bool = described(False, "the model is a mixture of experts", mirrors="model.use_moe")
    use_lossfreebalance: bool = described(False, "loss-free MoE balancing: a selection bias updated after each step",
                                          mirrors="model.use_lossfreebalance")
    path_to_checkpoints: str = described("checkpoints", "root folder of run directories")
    log_interval: int = described(10, "optimizer steps between memory readings and log flushes")
    eval_interval: int = described(0, "optimizer steps between evaluations (0 = only at epoch end)")
    eval_steps: int = described(20, "validation batches per evaluation")
    use_epoch_checkpoints: bool = described(True, "save a checkpoint at the end of every epoch")
    save_every_n_steps: int = described(0, "also save every N optimizer steps (0 = off)")
    keep_last_n: int = described(3, "checkpoints to keep (the best is always kept; 0 = keep all)")
    early_stopping_patience: int = described(0, "stop after N evaluations without improvement (0 = off)")
    max_steps: int = described(0, "stop after N optimizer steps (0 = no limit)")
    time_limit_s: float = described(0.0, "stop after this many seconds: finish the step, evaluate, save (0 = none)")
    max_nonfinite_steps: int = described(5, "stop after this many non-finite losses in a row")

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        positive = ("num_epochs", "batch_size", "accumulation_steps", "max_seq_len", "log_interval", "eval_steps",
                    "max_nonfinite_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainerConfig.{name}={value!r}: must be a positive integer")
        for name in ("eval_interval", "save_every_n_steps", "keep_last_n", "early_stopping_patience", "max_steps", "seed"):
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
        for name in ("lr_schedule", "schedule_by", "optimizer", "device", "use_dtype"):
            choices = self.choices(name)
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainerConfig.{name}={getattr(self, name)!r}: must be one of {', '.join(choices)}")


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
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=fused or None,
                             foreach=None if fused else True)


def resolve_device(config: TrainerConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainerConfig.device='cuda' but no CUDA device is available; use auto or cpu")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: TrainerConfig, device: torch.device) -> torch.dtype:
    """fp32 on CPU (its bf16 matmuls are slower here); bf16 autocast on CUDA where
    supported, else fp16 with a GradScaler; `use_dtype` forces a choice."""
    if config.use_dtype != "auto":
        return getattr(torch, config.use_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
             device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> float:
    """Mean cross-entropy over (the first `max_batches` batches of) a dataset, in order,
    weighted by the number of target tokens."""
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"evaluate: batch_size={batch_size}, max_batches={max_batches}: both must be at least 1")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, tokens, batches = 0.0, 0, 0
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
    model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate: the dataset has no target tokens")
    return total / tokens


# ---- the trainer ------------------------------------------------------------------------------
@dataclass
class TrainResult:
    status: str  # finished | deadline | max_steps | early_stop | interrupted | nonfinite
    global_step: int
    epoch: int
    last_loss: Optional[float]
    best_val_loss: Optional[float]
    last_checkpoint: Optional[str]
    elapsed_s: float
    tokens_seen: int


class Trainer:
    """Trains `model` on `train_data` (a `data.PackedBlocks` / `data.MaskedSamples`).

    `run_dir` receives `run.json` (`run_info`), the tokenizer, `metrics.jsonl` and the
    checkpoints. `callback(event)` sees every event. `fault_hook(step, micro_batch_size)`
    runs before each micro-batch's forward pass; tests make it raise out-of-memory.
    """

    def __init__(self, model: Transformer, config: TrainerConfig, train_data, val_data=None,
                 run_dir: Optional[str | Path] = None, callback: Optional[Callable[[dict], None]] = None,
                 tokenizer=None, run_info: Optional[dict] = None,
                 fault_hook: Optional[Callable[[int, int], None]] = None, rank: int = 0, world_size: int = 1):
        if config.use_moe and not model.config.use_moe:
            raise ValueError("TrainerConfig.use_moe is on but the model has no mixture-of-experts layers")
        if config.use_ddp:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise ValueError("TrainerConfig.use_ddp needs torch.distributed: launch with "
                                 "torchrun --nproc_per_node=N train.py train trainer.use_ddp=yes ...")
            rank, world_size = dist.get_rank(), dist.get_world_size()
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.model = model
        self.config = config
        self.train_data, self.val_data = train_data, val_data
        self.callback = callback
        self.fault_hook = fault_hook
        self.device = resolve_device(config)
        if config.use_ddp and self.device.type == "cuda":  # one GPU per process, as torchrun numbers them
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config, self.device)
        self.micro_splits = 1  # each loader batch is cut into this many micro-batches (grows on OOM)
        model.config.gradient_checkpointing = config.gradient_checkpointing
        for module in model.modules():
            if hasattr(module, "use_flash"):
                module.use_flash = config.use_flash
        if self.device.type == "cuda":
            model.check_inputs = False  # the data pipeline guarantees ids < vocab; no per-step sync
        self.model.to(self.device)
        self.loader = ThreadedDataLoader(dataset=train_data, batch_size=config.batch_size, seed=config.seed,
                                         rank=rank, world_size=world_size,
                                         pin_memory=self.device.type == "cuda")
        self.optimizer = build_optimizer(model, config, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16 and self.device.type == "cuda")
        self.steps_per_epoch = math.ceil(len(self.loader) / config.accumulation_steps)
        total = self.steps_per_epoch * config.num_epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.step_model = model
        if config.use_ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=model.config.use_moe)  # an expert may get no tokens on a rank
        if config.use_compile:
            self.step_model = torch.compile(self.step_model)
        self.global_step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # training seconds of earlier sessions of this run (resume)
        self.best_val_loss: Optional[float] = None
        self.best_checkpoint: Optional[str] = None
        self.evals_without_improvement = 0
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self.last_checkpoint: Optional[str] = None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._metrics = None
        self._stop_reason: Optional[str] = None
        self._interrupts = 0
        self._best_step: Optional[int] = None
        self._last_eval_step: Optional[int] = None
        self._start_step = 0
        self._fit_started: Optional[float] = None
        if self.run_dir is not None and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if run_info is not None:
                (self.run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
            if tokenizer is not None and not (self.run_dir / "tokenizer.json").exists():
                tokenizer.save_pretrained(str(self.run_dir))
        self._tensorboard = None

    # ---- events --------------------------------------------------------------------------
    def emit(self, kind: str, **values) -> None:
        if not self.is_main:  # with DDP, rank 0 speaks for all
            return
        event = {"type": kind, "time": time.time(), **values}
        if self.run_dir is not None:
            if self._metrics is None:
                self._metrics = open(self.run_dir / "metrics.jsonl", "a")
            self._metrics.write(json.dumps(event) + "\n")
            if kind != "step" or values.get("step", 0) % self.config.log_interval == 0:
                self._metrics.flush()
            self._log_tensorboard(kind, values)
        if self.callback is not None:
            self.callback(event)

    def _log_tensorboard(self, kind: str, values: dict) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self._tensorboard is False:
            return
        step = values.get("step", self.global_step)
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss"):
            if isinstance(values.get(key), (int, float)):
                self._tensorboard.add_scalar(f"{kind}/{key}", values[key], step)

    # ---- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        elapsed = self.elapsed_before + (time.perf_counter() - self._fit_started if self._fit_started else 0.0)
        return {"epoch": self.loader.epoch, "global_step": self.global_step, "tokens_seen": self.tokens_seen,
                "elapsed_s": elapsed,
                "loader": self.loader.state_dict(), "scheduler": {"step": self.global_step, "total_steps": self.total_steps},
                "micro_splits": self.micro_splits, "device": self.device.type,
                "best_val_loss": self.best_val_loss, "best_checkpoint": self.best_checkpoint,
                "evals_without_improvement": self.evals_without_improvement,
                "nonfinite_steps": self.nonfinite_steps, "rng": rng_state(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def save_checkpoint(self, name: str) -> Optional[Path]:
        if self.run_dir is None or not self.is_main:
            self.last_checkpoint = name
            return None
        if self._best_step == self.global_step:  # this checkpoint holds the best evaluated state
            self.best_checkpoint = name
        state = self.state()
        state["adapter_only"] = self.adapter_only
        started = time.perf_counter()
        path = checkpoint.save(self.run_dir / name, self.model_state(), self.optimizer.state_dict(), state)
        self.last_checkpoint = name
        removed = checkpoint.prune(self.run_dir, self.config.keep_last_n,
                                   protect=(self.best_checkpoint,) if self.best_checkpoint else ())
        self.emit("checkpoint", name=name, step=self.global_step, seconds=time.perf_counter() - started,
                  removed=removed)
        return path

    @property
    def adapter_only(self) -> bool:
        """Fine-tuning with LoRA: checkpoints hold the trainable weights only; the frozen
        base is rebuilt from where it came from."""
        from lora import lora_layers

        return bool(lora_layers(self.model))

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.adapter_only:
            return {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        return self.model.state_dict()

    def _load_model_state(self, model_state: dict, state: dict, path) -> None:
        if not state.get("adapter_only"):
            self.model.load_state_dict(model_state)
            return
        result = self.model.load_state_dict(model_state, strict=False)
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if result.unexpected_keys or trainable - set(model_state):
            raise checkpoint.CheckpointError(
                f"{Path(path).name} holds adapter weights that do not fit this model "
                f"(unexpected {result.unexpected_keys[:3]}, missing {sorted(trainable - set(model_state))[:3]})")

    def _set_aside_later_checkpoints(self, path: Path, step: int) -> None:
        """Resuming from an older checkpoint abandons the later ones: hide them (renamed,
        not deleted) so `latest` and pruning never mistake them for this run's future."""
        if self.run_dir is None or not self.is_main:
            return
        for other in checkpoint.candidates(self.run_dir):
            if other != path and checkpoint.read_state(other).get("global_step", -1) > step:
                other.rename(other.with_name(f".abandoned-{other.name}-{int(time.time())}"))
                self.emit("checkpoint_set_aside", name=other.name, reason=f"resumed from {path.name}")

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore model, optimizer, schedule position, counters, RNG and loader position."""
        model_state, optimizer_state, state = checkpoint.load(path)
        try:
            self._load_model_state(model_state, state, path)
        except checkpoint.CheckpointError:
            raise
        except RuntimeError as error:  # shapes that do not match the model
            raise checkpoint.CheckpointError(f"{Path(path).name} does not fit this model: {str(error)[:300]}") from None
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.last_checkpoint = Path(path).name
        self._set_aside_later_checkpoints(Path(path), state["global_step"])
        self.global_step = state["global_step"]
        self.tokens_seen = state.get("tokens_seen", 0)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.loader.load_state_dict(state["loader"])
        self.micro_splits = state.get("micro_splits", 1)
        self.best_val_loss = state.get("best_val_loss")
        self.best_checkpoint = state.get("best_checkpoint")
        self.evals_without_improvement = state.get("evals_without_improvement", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.emit("resumed", checkpoint=Path(path).name, step=self.global_step, epoch=self.loader.epoch)
        return state

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
        micro_batches = [(xs, ys) for x, y in group
                         for xs, ys in zip(x.tensor_split(self.micro_splits), y.tensor_split(self.micro_splits))
                         if xs.size(0)]
        # Each micro-batch's loss is a mean over its target tokens; weighting by its share
        # of the group's target tokens makes the sum the mean over the whole group, however
        # the group is cut (prompt-masked data has unequal counts). Counted on the CPU.
        counts = [int((ys != -100).sum()) for _, ys in micro_batches]
        total_targets = max(1, sum(counts))
        total = None
        for index, (xs, ys) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # With DDP, gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or not self.config.use_ddp else self._ddp_module().no_sync()
            with sync:
                loss = self._forward_backward(xs, ys, counts[index] / total_targets)
            total = loss if total is None else total + loss
        return total

    def _ddp_module(self):
        module = self.step_model
        return getattr(module, "_orig_mod", module)  # under torch.compile

    def _step_with_fallback(self, group: list) -> torch.Tensor:
        """`_run_group`, retried on out-of-memory with halved micro-batches, then on the CPU.
        The same data is retried from the group's start, so nothing is skipped or doubled."""
        while True:
            try:
                return self._run_group(group)
            except Exception as error:  # noqa: BLE001 - only out-of-memory is handled
                if not is_out_of_memory(error) or self.config.use_ddp:
                    raise  # under DDP a rank retrying alone would hang the others
                self.optimizer.zero_grad(set_to_none=True)
                self._free_memory()
                micro = math.ceil(self.config.batch_size / self.micro_splits)
                if micro > 1:
                    self.micro_splits = min(self.config.batch_size, self.micro_splits * 2)
                    new_micro = math.ceil(self.config.batch_size / self.micro_splits)
                    self.emit("fallback", action="halve_micro_batch", step=self.global_step,
                              micro_batch_size=new_micro,
                              accumulation=self.micro_splits * self.config.accumulation_steps,
                              effective_batch=self.config.batch_size * self.config.accumulation_steps,
                              error=str(error)[:200])
                elif self.device.type != "cpu":
                    self._move_to_cpu()
                    self.emit("fallback", action="move_to_cpu", step=self.global_step, error=str(error)[:200])
                else:
                    raise

    def _free_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _move_to_cpu(self) -> None:
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.model.to(self.device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(self.device)
        for group in self.optimizer.param_groups:
            if group.get("fused"):
                group["fused"], group["foreach"] = False, True
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.micro_splits = 1
        self._free_memory()

    def _optimizer_step(self, lr: float) -> torch.Tensor:
        """Set the learning rate, unscale and clip; returns the gradient norm (the step
        itself is taken once the caller knows it is finite)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return grad_norm

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until the epochs, max_steps, the deadline, early stopping or Ctrl-C end it."""
        config = self.config
        started = time.perf_counter()
        self._fit_started = started
        self._start_step = self.global_step
        deadline = started + config.time_limit_s - self.elapsed_before if config.time_limit_s else None
        previous_handlers = self._install_signal_handlers()
        self.model.train()
        if self.loader.position >= len(self.loader):  # resumed from the end of an epoch
            self.loader.epoch, self.loader.position = self.loader.epoch + 1, 0
        self.emit("start", total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                  step=self.global_step, epoch=self.loader.epoch,
                  effective_batch=config.batch_size * config.accumulation_steps * self.loader.world_size,
                  time_left_s=config.time_limit_s - self.elapsed_before if config.time_limit_s else None,
                  schedule_by=config.schedule_by, device=self.device.type, dtype=str(self.dtype).removeprefix("torch."),
                  params=sum(p.numel() for p in self.model.parameters()),
                  trainable=sum(p.numel() for p in self.model.parameters() if p.requires_grad))
        self._last_loss: Optional[float] = None
        self._window = [time.perf_counter(), 0]  # start time and tokens of the throughput window
        try:
            while self._stop_reason is None and self.loader.epoch < config.num_epochs:
                if self.global_step >= self.total_steps:
                    break
                epoch = self.loader.epoch
                batches = iter(self.loader)
                try:
                    while self._stop_reason is None and self.loader.position < len(self.loader):
                        if self.global_step >= self.total_steps:
                            break
                        size = min(config.accumulation_steps, len(self.loader) - self.loader.position)
                        self._train_step(epoch, [next(batches) for _ in range(size)], started, deadline)
                finally:
                    batches.close()
                if self._stop_reason != "nonfinite" and self.loader.position >= len(self.loader):
                    self.loader.epoch, self.loader.position = epoch + 1, 0
                    self.emit("epoch_end", epoch=epoch, step=self.global_step)
                    if self._last_eval_step != self.global_step:
                        self._evaluate()
                    if config.use_epoch_checkpoints:
                        self.save_checkpoint(f"epoch_{epoch + 1}")
            status = self._stop_reason or "finished"
            if status in ("deadline", "max_steps", "finished") and self._last_eval_step != self.global_step:
                self._evaluate()
            if status != "nonfinite" and read_step(self.run_dir, self.last_checkpoint) != self.global_step:
                self.save_checkpoint(f"step_{self.global_step}")
            result = TrainResult(status, self.global_step, self.loader.epoch, self._last_loss, self.best_val_loss,
                                 self.last_checkpoint, time.perf_counter() - started, self.tokens_seen)
            self.emit("finished", **dataclasses.asdict(result))
            return result
        finally:
            self.loader.close()
            self._restore_signal_handlers(previous_handlers)
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None

    def _train_step(self, epoch: int, group: list, started: float, deadline: Optional[float]) -> None:
        config = self.config
        if config.schedule_by == "time":
            lr = learning_rate_at_time(self.elapsed_before + time.perf_counter() - started, config)
        else:
            lr = learning_rate_at(self.global_step, self.total_steps, config)
        loss = self._step_with_fallback(group)
        grad_norm = self._optimizer_step(lr)
        stats = torch.stack([loss, grad_norm.to(loss.device).float()])
        if self.config.use_ddp:  # the mean loss over ranks (the gradient norm is already shared)
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats = stats / self.world_size
        loss_value, norm_value = stats.tolist()  # one sync per step
        # With fp16 the GradScaler expects (and skips) steps with inf gradients; otherwise they are failures.
        if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # fp16: closes this step's unscale_ (and lowers the scale)
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            self.emit("nonfinite", step=self.global_step, loss=loss_value, grad_norm=norm_value,
                      in_a_row=self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= config.max_nonfinite_steps:
                self._stop_reason = "nonfinite"
                self.emit("stopped", reason=f"{self.nonfinite_in_a_row} non-finite losses in a row; the last good "
                          f"state is saved. Lower the learning rate or check the data.")
                self.save_checkpoint(f"step_{self.global_step}")
            return
        self.nonfinite_in_a_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_moe_bias()
        self.global_step += 1
        tokens = sum(int(x.numel()) for x, _ in group) * self.loader.world_size
        self.tokens_seen += tokens
        self._window[1] += tokens
        self._last_loss = loss_value
        self._emit_step(epoch, loss_value, lr, norm_value, started)
        if self.global_step % config.log_interval == 0:
            self._window = [time.perf_counter(), 0]
        self._after_step(deadline)

    def _emit_step(self, epoch: int, loss: float, lr: float, grad_norm: float, started: float) -> None:
        elapsed = time.perf_counter() - self._window[0]
        tokens_per_s = self._window[1] / elapsed if elapsed > 0 else 0.0
        done = time.perf_counter() - started
        steps_this_run = max(1, self.global_step - self._start_step)
        eta = done / steps_this_run * max(0, self.total_steps - self.global_step)
        if self.config.time_limit_s:
            eta = min(eta, max(0.0, self.config.time_limit_s - done))
        total_steps = self.total_steps
        if self.config.schedule_by == "time" and done > 0:  # the deadline ends the run: estimate its steps
            rate = steps_this_run / done
            total_steps = min(total_steps, self.global_step + round(rate * max(0.0, self.config.time_limit_s
                                                                                  - self.elapsed_before - done)))
        values = dict(epoch=epoch, step=self.global_step, total_steps=total_steps, loss=loss, lr=lr,
                      grad_norm=grad_norm, tokens_per_s=tokens_per_s, tokens_seen=self.tokens_seen, eta_s=eta)
        if self.global_step % self.config.log_interval == 0:
            values["memory"] = memory_stats(self.device)
        load = self.model.expert_load() if self.model.config.use_moe else None
        if load is not None:
            values["expert_load"] = load.tolist()
        self.emit("step", **values)

    def _after_step(self, deadline: Optional[float]) -> None:
        config = self.config
        if config.eval_interval and self.global_step % config.eval_interval == 0:
            self._evaluate()
            if config.early_stopping_patience and self.evals_without_improvement >= config.early_stopping_patience:
                self._stop_reason = "early_stop"
                self.emit("early_stop", step=self.global_step, best_val_loss=self.best_val_loss,
                          patience=config.early_stopping_patience)
                self.save_checkpoint(f"step_{self.global_step}")
                return
        if config.save_every_n_steps and self.global_step % config.save_every_n_steps == 0:
            self.save_checkpoint(f"step_{self.global_step}")
        if config.max_steps and self.global_step >= config.max_steps:
            self._stop_reason = "max_steps"
        elif deadline is not None and time.perf_counter() >= deadline:
            self._stop_reason = "deadline"
        elif self._interrupts:
            self._stop_reason = "interrupted"
        if config.use_ddp:  # every rank stops at the same step, for the first reason any rank has
            import torch.distributed as dist

            reasons = ["", "max_steps", "deadline", "interrupted"]
            code = torch.tensor([reasons.index(self._stop_reason or "")], device=self.device)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            self._stop_reason = reasons[int(code)] or None

    def _evaluate(self) -> Optional[float]:
        if self.val_data is None or len(self.val_data) == 0:
            return None
        started = time.perf_counter()
        val_loss = evaluate(self.model, self.val_data, self.config.batch_size, self.config.eval_steps,
                            self.device, self.dtype)
        self._last_eval_step = self.global_step
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
            self._best_step = self.global_step  # a checkpoint saved at this step becomes the best one
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if self.config.clean_cuda_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.emit("eval", step=self.global_step, val_loss=val_loss, perplexity=math.exp(min(val_loss, 50)),
                  best_val_loss=self.best_val_loss, improved=improved, seconds=time.perf_counter() - started)
        return val_loss

    # ---- Ctrl-C and SIGTERM --------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._interrupts += 1
            if self._interrupts > 1:  # a second Ctrl-C: stop now, unsaved
                raise KeyboardInterrupt
            self.emit("interrupt", signal=signal.Signals(signum).name, step=self.global_step)

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def read_step(run_dir: Optional[Path], name: Optional[str]) -> Optional[int]:
    if run_dir is None or name is None:
        return None
    try:
        return checkpoint.read_state(run_dir / name)["global_step"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
