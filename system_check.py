"""What this machine offers for training, as values the UI renders.

- `SystemCheck` runs quick checks (Python, GPU, CPU, RAM, disk, packages, the Hugging Face
  hub) and returns a `SystemReport` of `Check`s: a status, one line saying what the
  result means for the user, and machine-readable facts. The hub's socket runs in a
  background thread so a slow network never delays the other checks.
- `HardwareManager` describes the training device (precisions, flash attention, memory)
  and finds the largest micro-batch that fits: activation memory per sequence is
  measured from the tensors autograd saves for backward, and on CUDA the answer is
  confirmed by a real training step.

Nothing here prints or imports `rich`.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch

import budget
import data
from model import ModelConfig, Transformer
from trainer import cpu_precision, fast_bf16

GIB = 2**30
STATUSES = ("ok", "warn", "fail")
MIN_TORCH = (2, 11)
# Required packages and the oldest version requirements.txt accepts.
REQUIRED = {"torch": MIN_TORCH, "transformers": (4, 45), "datasets": (3, 0), "tokenizers": (0, 20),
            "safetensors": (0, 4)}
OPTIONAL = {"bitsandbytes": "4-bit QLoRA uses the built-in NF4 path", "matplotlib": "no PNG loss plots"}
ADAMW_STATE_BYTES = 16  # per parameter: fp32 weight, gradient and two AdamW moments


@dataclass
class Check:
    """One check's result: status "ok", "warn" or "fail", a line for a person, and facts."""

    name: str
    status: str
    message: str
    facts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Check.status={self.status!r}: must be one of {', '.join(STATUSES)}")


@dataclass
class SystemReport:
    """All checks of one `SystemCheck.run_all()` and how long they took."""

    checks: list[Check]
    seconds: float

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(check.status != "fail" for check in self.checks)

    @property
    def warnings(self) -> list[Check]:
        return [check for check in self.checks if check.status == "warn"]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "seconds": self.seconds, "checks": [asdict(check) for check in self.checks]}


def _version_tuple(version: str) -> tuple[int, ...]:
    """(2, 13, 0) for '2.13.0+cpu' or '2.13.0rc1'."""
    release = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in release.group().split(".")) if release else ()


def _flash_attention(capability: Optional[tuple[int, int]]) -> bool:
    return capability is not None and capability >= (8, 0) and torch.backends.cuda.flash_sdp_enabled()


class SystemCheck:
    """Quick checks of this machine; `run_all()` runs them all and never raises."""

    def __init__(self, checkpoint_dir: str | Path = "checkpoints", hub_timeout_s: float = 1.5):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.hub_timeout_s = hub_timeout_s

    def check_python(self, version: Optional[tuple[int, ...]] = None) -> Check:
        """`version` defaults to the running interpreter's."""
        version = tuple(sys.version_info[:3]) if version is None else tuple(version)
        text = ".".join(map(str, version))
        facts = {"version": text, "implementation": platform.python_implementation()}
        if version < (3, 9):
            return Check("Python", "fail", f"Python {text}: Sprat needs Python 3.9 or newer", facts)
        if version < (3, 10):
            return Check("Python", "warn", f"Python {text}: torch 2.9 and newer need Python 3.10, "
                                           f"so use 3.10 or newer", facts)
        return Check("Python", "ok", f"Python {text}", facts)

    def check_gpu(self) -> Check:
        mps = torch.backends.mps.is_available()
        if not torch.cuda.is_available():
            note = "; Apple MPS is present but Sprat trains on CUDA or the CPU" if mps else ""
            precision = cpu_precision()  # measured once a process (the front ends read it from the cache first)
            return Check("GPU", "warn", f"no GPU: training runs on the CPU in {precision.describe()}; the planner "
                                        f"sizes the model for it{note}",
                         {"cuda": False, "mps": mps, "count": 0, "torch_cuda": torch.version.cuda,
                          "cpu_dtype": precision.dtype, "cpu_bf16_speedup": precision.speedup})
        props = torch.cuda.get_device_properties(0)
        capability = (props.major, props.minor)
        bf16, flash = torch.cuda.is_bf16_supported(), _flash_attention(capability)
        facts = {"cuda": True, "mps": mps, "count": torch.cuda.device_count(), "name": props.name,
                 "memory_gib": round(props.total_memory / GIB, 1), "compute_capability": list(capability),
                 "bf16": bf16, "flash_attention": flash, "torch_cuda": torch.version.cuda}
        precision = "bf16 autocast" if fast_bf16(torch.device("cuda")) else \
            "fp16 autocast (bf16 is slow before compute 8.0)"
        attention = "flash attention available" if flash else "no flash attention"
        count = f" (GPU 0 of {facts['count']})" if facts["count"] > 1 else ""
        return Check("GPU", "ok", f"{props.name}{count}, {facts['memory_gib']} GiB, compute {capability[0]}."
                                  f"{capability[1]}: {precision} recommended, {attention}", facts)

    def check_cpu(self) -> Check:
        logical = psutil.cpu_count(logical=True) or 1
        physical = psutil.cpu_count(logical=False)
        facts = {"logical_cores": logical, "physical_cores": physical, "torch_threads": torch.get_num_threads()}
        cores = f"{logical} logical core{'s' if logical != 1 else ''} ({physical or '?'} physical), " \
                f"torch uses {facts['torch_threads']} thread{'s' if facts['torch_threads'] != 1 else ''}"
        if logical < 2:
            return Check("CPU", "warn", f"{cores}: CPU training and data preparation will be slow", facts)
        return Check("CPU", "ok", cores, facts)

    def check_ram(self) -> Check:
        memory = psutil.virtual_memory()
        facts = {"total_bytes": memory.total, "available_bytes": memory.available}
        amount = f"{memory.available / GIB:.1f} GiB of {memory.total / GIB:.1f} GiB RAM available"
        if memory.available < 2 * GIB:
            return Check("RAM", "warn", f"only {amount}: only small models and batches fit; close other programs "
                                        f"for more", facts)
        return Check("RAM", "ok", amount, facts)

    def check_disk(self) -> Check:
        """Free space where checkpoints go, at the nearest existing parent of that folder."""
        target = self.checkpoint_dir.expanduser().absolute()
        existing = target
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        usage = shutil.disk_usage(existing)
        facts = {"path": str(target), "checked_path": str(existing), "free_bytes": usage.free,
                 "total_bytes": usage.total}
        free = f"{usage.free / GIB:.1f} GiB free at {existing}"
        if usage.free < GIB:
            return Check("Disk", "warn", f"only {free}: checkpoints may not fit (weights and AdamW state take "
                                         f"12 bytes per parameter)", facts)
        return Check("Disk", "ok", f"{free} for checkpoints", facts)

    def check_packages(self) -> Check:
        """Installed versions, read from package metadata without importing anything."""
        versions: dict[str, Optional[str]] = {}
        for name in (*REQUIRED, *OPTIONAL):
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        facts = {"versions": versions}
        missing = [name for name in REQUIRED if versions[name] is None]
        if missing:
            return Check("Packages", "fail", f"missing {', '.join(missing)}: pip install -r requirements.txt", facts)
        old = [f"{name} {versions[name]} (needs {'.'.join(map(str, minimum))}+)" for name, minimum in REQUIRED.items()
               if _version_tuple(versions[name]) < minimum]
        notes = [f"no {name}: {meaning}" for name, meaning in OPTIONAL.items() if versions[name] is None]
        summary = ", ".join(f"{name} {version}" for name, version in versions.items() if version is not None)
        if old:
            return Check("Packages", "warn", f"too old: {', '.join(old)}; pip install -r requirements.txt",
                         facts)
        return Check("Packages", "warn" if notes else "ok", "; ".join([summary, *notes]), facts)

    def check_hub(self) -> Check:
        facts = {"offline_env": os.environ.get(data.offline_variable() or "HF_HUB_OFFLINE", "")}
        if data.hub_offline_mode():  # the user's choice, not a fault: nothing was tried
            return Check("Hub", "ok", f"{data.offline_mode_text()}: nothing is downloaded; the built-in "
                                      "corpus, local files and models already on disk work", {**facts, "reachable": None,
                                                                                              "offline_mode": True})
        reachable = data.hub_reachable(timeout_s=self.hub_timeout_s)
        facts = {**facts, "reachable": reachable}
        if reachable:
            return Check("Hub", "ok", "Hugging Face hub reachable: hub datasets and models can download", facts)
        return Check("Hub", "warn", "Hugging Face hub not reachable: use the built-in corpus or local files; hub "
                                    "datasets and models will not download", facts)

    def run_all(self) -> SystemReport:
        """Every check; one that raises becomes a "warn" naming the error. The hub check
        starts first, in a daemon thread, and is given up on after hub_timeout_s + 0.5 s."""
        started = time.perf_counter()
        hub: list[Check] = []
        thread = threading.Thread(target=lambda: hub.append(self._guarded("Hub", self.check_hub)), daemon=True,
                                  name="sprat-hub-check")
        thread.start()
        local = [("Python", self.check_python), ("GPU", self.check_gpu), ("CPU", self.check_cpu),
                 ("RAM", self.check_ram), ("Disk", self.check_disk), ("Packages", self.check_packages)]
        checks = [self._guarded(name, check) for name, check in local]
        thread.join(max(0.0, started + self.hub_timeout_s + 0.5 - time.perf_counter()))
        checks.append(hub[0] if hub else Check(
            "Hub", "warn", f"hub check timed out after {self.hub_timeout_s + 0.5:.1f} s: treat the hub as unreachable "
                           f"and use the built-in corpus or local files", {"reachable": None, "timed_out": True}))
        return SystemReport(checks, time.perf_counter() - started)

    @staticmethod
    def _guarded(name: str, check: Callable[[], Check]) -> Check:
        try:
            return check()
        except Exception as error:  # a broken check must not stop the others
            return Check(name, "warn", f"{name} check failed: {type(error).__name__}: {error}",
                         {"error": f"{type(error).__name__}: {error}"})


class HardwareManager:
    """What training can use on this machine: device, precisions, attention kernels,
    memory, and a measured maximum micro-batch."""

    def __init__(self, device: Optional[str] = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: use 'cpu', 'cuda' or None (CUDA when available)")
        if device == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device 'cuda' was asked for but no CUDA GPU is available (torch {torch.__version__} "
                             f"is {build}); use 'cpu' or None")
        self.device = device
        self.device_name = self.profile().device_name
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            self.compute_capability: Optional[tuple[int, int]] = (props.major, props.minor)
            self.bf16_supported = torch.cuda.is_bf16_supported()
            self.fast_bf16 = fast_bf16(torch.device("cuda"))
            self.memory_available_bytes, self.memory_total_bytes = torch.cuda.mem_get_info()
        else:
            memory = psutil.virtual_memory()
            self.compute_capability = None
            self.bf16_supported = True  # it runs everywhere; fast only where measured so (AVX-512 BF16, AMX)
            self.fast_bf16 = fast_bf16(torch.device("cpu"))
            self.memory_total_bytes, self.memory_available_bytes = memory.total, memory.available
        self.flash_attention_available = _flash_attention(self.compute_capability)

    def recommended_dtype(self) -> str:
        """The autocast precision for training: bf16 where it is fast, else fp16 on older
        GPUs and fp32 on a CPU."""
        if self.fast_bf16:
            return "bfloat16"
        return "float32" if self.device == "cpu" else "float16"

    def precision_note(self) -> Optional[str]:
        """Why a CPU trains in `recommended_dtype`: 'measured 1.52x as fast as fp32 on this CPU'."""
        return cpu_precision().reason() if self.device == "cpu" else None

    def profile(self) -> budget.HardwareProfile:
        return budget.HardwareProfile.detect(self.device)

    def _autocast(self) -> torch.autocast:
        dtype = getattr(torch, self.recommended_dtype())
        return torch.autocast(self.device, dtype=dtype, enabled=dtype != torch.float32)

    def _saved_bytes(self, model: Transformer, batch_size: int, seq_len: int) -> int:
        """Bytes of the distinct storages autograd saves for backward in one forward + loss
        of `model`, its parameters and buffers (RoPE tables) excluded."""
        fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        kept: list[torch.Tensor] = []  # keeps saved tensors alive so no storage address is reused
        sizes: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> None:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in fixed:
                kept.append(tensor)
                sizes[storage.data_ptr()] = storage.nbytes()

        ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=self.device)
        # pack returns None: this graph never runs backward, and holds no reference cycles.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None), self._autocast():
            model(ids, ids)
        return sum(sizes.values())

    def activation_bytes_per_sequence(self, config: ModelConfig, seq_len: int,
                                      gradient_checkpointing: bool = False) -> int:
        """Measured activation memory of one training sequence in the precision
        `recommended_dtype` gives: the bytes autograd saves for backward at batch 1, plus the
        fp32 logits. Under autocast it is batch 2 minus batch 1, so the low-precision weight
        copies autocast saves, which do not grow with the batch, cancel. Blocks are
        identical, so only 1- and 2-layer models run and the depth is extrapolated linearly;
        with gradient checkpointing one block's activations are added for its recomputation."""
        if not 1 <= seq_len <= config.context_len:
            raise ValueError(f"seq_len={seq_len}: must be between 1 and context_len={config.context_len}")

        def saved_per_sequence(shape: ModelConfig, checkpointed: bool) -> int:
            with torch.random.fork_rng(devices=[0] if self.device == "cuda" else []):
                model = Transformer(shape).to(self.device).train()
                model.set_runtime(gradient_checkpointing=checkpointed)
                if self.recommended_dtype() == "float32":
                    return self._saved_bytes(model, 1, seq_len)
                return self._saved_bytes(model, 2, seq_len) - self._saved_bytes(model, 1, seq_len)

        def per_layer(checkpointed: bool) -> tuple[int, int]:  # (bytes outside the blocks, bytes per block)
            one = saved_per_sequence(replace(config, num_layers=1), checkpointed)
            two = saved_per_sequence(replace(config, num_layers=2), checkpointed)
            return one - (two - one), two - one

        outside, block = per_layer(gradient_checkpointing)
        saved = outside + config.num_layers * block
        if gradient_checkpointing:  # backward recomputes one block at a time and holds its activations
            saved += per_layer(False)[1]
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return saved + seq_len * config.vocab_size * 4

    def tokens_per_second(self, config: ModelConfig, batch_size: int, seq_len: int, seconds: float = 1.0,
                          dtype: Optional[torch.dtype] = None) -> float:
        """Measured training throughput of `config` at this micro-batch on this device, in
        `dtype` (default: the precision training picks here): the median of at least three
        full steps (forward, backward, AdamW) after a warm-up step."""
        with torch.random.fork_rng(devices=[0] if self.device == "cuda" else []):
            return 1.0 / budget.measure(config, batch_size, seq_len, self.device, seconds, dtype)

    def max_micro_batch(self, config: ModelConfig, seq_len: int, limit: int = 256,
                        memory_fraction: float = 0.8) -> int:
        """The largest power-of-two batch (<= limit) whose AdamW training state (16 bytes per
        parameter) and measured activations fit in `memory_fraction` of the available
        memory; 0 when not even one sequence fits. On CUDA the estimate is tried with a real
        training step and halved until it runs."""
        if limit < 1 or not 0 < memory_fraction <= 1:
            raise ValueError(f"limit={limit}, memory_fraction={memory_fraction}: need limit >= 1 and "
                             f"0 < memory_fraction <= 1")
        state = ADAMW_STATE_BYTES * config.num_params()
        room = memory_fraction * self.memory_available_bytes - state
        per_sequence = self.activation_bytes_per_sequence(config, seq_len)
        fits = min(limit, math.floor(room / per_sequence)) if room > 0 else 0
        if fits < 1:
            return 0
        batch = 1 << (fits.bit_length() - 1)  # round down to a power of two
        if self.device == "cuda":  # CPU allocation failures kill the process instead of raising
            batch = self._confirm_on_cuda(config, seq_len, batch)
        return batch

    def _confirm_on_cuda(self, config: ModelConfig, seq_len: int, batch_size: int) -> int:
        """The largest of batch_size, batch_size/2, ... that runs a forward, backward and
        AdamW step without torch.cuda.OutOfMemoryError; 0 if none does."""
        with torch.random.fork_rng(devices=[0]):
            model = Transformer(config).to(self.device).train()
        optimizer = torch.optim.AdamW(model.parameters())
        try:
            while batch_size >= 1:
                try:
                    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=self.device)
                    with self._autocast():
                        _, loss, _ = model(ids, ids)
                    loss.backward()
                    optimizer.step()
                    torch.cuda.synchronize()
                    return batch_size
                except torch.cuda.OutOfMemoryError:
                    pass  # free memory below, outside the handler: its traceback holds the step's tensors
                ids = loss = None
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                batch_size //= 2
            return 0
        finally:
            del model, optimizer
            torch.cuda.empty_cache()

    def to_dict(self) -> dict:
        return {"device": self.device, "device_name": self.device_name,
                "compute_capability": list(self.compute_capability) if self.compute_capability else None,
                "bf16_supported": self.bf16_supported, "fast_bf16": self.fast_bf16,
                "flash_attention_available": self.flash_attention_available,
                "memory_total_bytes": self.memory_total_bytes, "memory_available_bytes": self.memory_available_bytes,
                "recommended_dtype": self.recommended_dtype(), "precision_note": self.precision_note()}
