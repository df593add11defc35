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


# ---- peak throughput, the denominator of MFU ------------------------------------------------
@dataclass(frozen=True)
class DevicePeak:
    """Dense peak throughput of one GPU model in TFLOP/s, as its vendor's datasheet states it.
    Datasheets print tensor-core figures "with sparsity" (2:4 structured sparsity, which
    training does not use); the dense figure is half of that, and that is what is kept here.
    `half` is the 16-bit tensor-core rate with fp32 accumulation (what autocast's matmuls
    run); `bf16` is None where the chip has no bf16 tensor cores, `tf32` where it has no TF32
    ones; `fp32` is the plain (CUDA core) rate."""

    pattern: str  # searched (case-insensitive) in torch.cuda.get_device_name()
    half: float
    bf16: Optional[float]
    tf32: Optional[float]
    fp32: float


# Most specific first: the first pattern found in the device name wins. Consumer cards match
# only when the name ends with the model ("... RTX 4090", not "RTX 4090 D" or "Laptop GPU").
DEVICE_PEAKS = (
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM, H100 PCIe, H100 NVL columns)
    DevicePeak(r"\bH100\b.*\bNVL\b", half=835.5, bf16=835.5, tf32=417.5, fp32=60.0),
    DevicePeak(r"\bH100\b.*\bPCIe\b", half=756.5, bf16=756.5, tf32=378.0, fp32=51.0),
    DevicePeak(r"\bH100\b", half=989.5, bf16=989.5, tf32=494.5, fp32=67.0),  # SXM: "NVIDIA H100 80GB HBM3"
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM and H200 NVL columns)
    DevicePeak(r"\bH200\b.*\bNVL\b", half=835.5, bf16=835.5, tf32=417.5, fp32=60.0),
    DevicePeak(r"\bH200\b", half=989.5, bf16=989.5, tf32=494.5, fp32=67.0),
    # NVIDIA GH200 Grace Hopper Superchip datasheet (the GPU's figures are the H100 SXM's)
    DevicePeak(r"\bGH200\b", half=989.5, bf16=989.5, tf32=494.5, fp32=67.0),
    # NVIDIA A100 Tensor Core GPU datasheet: the same figures for 40/80 GB, PCIe and SXM
    DevicePeak(r"\bA100\b", half=312.0, bf16=312.0, tf32=156.0, fp32=19.5),
    # NVIDIA L40S and L40 datasheets
    DevicePeak(r"\bL40S\b", half=362.05, bf16=362.05, tf32=183.0, fp32=91.6),
    DevicePeak(r"\bL40\b", half=181.05, bf16=181.05, tf32=90.5, fp32=90.5),
    # NVIDIA L4 Tensor Core GPU datasheet (242 and 120 TFLOP/s with sparsity)
    DevicePeak(r"\bL4\b", half=121.0, bf16=121.0, tf32=60.0, fp32=30.3),
    # NVIDIA A10 Tensor Core GPU datasheet
    DevicePeak(r"\bA10\b", half=125.0, bf16=125.0, tf32=62.5, fp32=31.2),
    # NVIDIA Ada GPU Architecture whitepaper, appendix A (GeForce: FP32 accumulation at half rate)
    DevicePeak(r"\bRTX 4090$", half=165.2, bf16=165.2, tf32=82.6, fp32=82.6),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, table 9 (likewise)
    DevicePeak(r"\bRTX 3090$", half=71.0, bf16=71.0, tf32=35.6, fp32=35.6),
    # NVIDIA T4 Tensor Core GPU datasheet ("mixed precision (FP16/FP32)"; Turing has no bf16 or TF32)
    DevicePeak(r"\bT4\b", half=65.0, bf16=None, tf32=None, fp32=8.1),
    # NVIDIA V100 Tensor Core GPU datasheet (V100S PCIe, V100 PCIe, V100 SXM2 columns)
    DevicePeak(r"\bV100S\b", half=130.0, bf16=None, tf32=None, fp32=16.4),
    DevicePeak(r"\bV100\b.*\bPCIe\b", half=112.0, bf16=None, tf32=None, fp32=14.0),
    DevicePeak(r"\bV100\b", half=125.0, bf16=None, tf32=None, fp32=15.7),
)

# Dense FLOPs per clock per multiprocessor by compute capability, for GPUs not in the table:
# (16-bit tensor cores, TF32 tensor cores or None, plain fp32), from each architecture's
# tensor cores per SM x FMAs per clock x 2. Consumer cards of 8.6/8.9/12.0 run 16-bit with
# fp32 accumulation at half this rate, so for them the estimate is high (MFU reads low).
FLOPS_PER_CLOCK_PER_SM = {
    (7, 0): (1024, None, 128),  # Volta
    (7, 5): (1024, None, 128),  # Turing
    (8, 0): (2048, 1024, 128),  # A100
    (8, 6): (1024, 512, 256),  # GA10x
    (8, 9): (1024, 512, 256),  # Ada
    (9, 0): (4096, 2048, 256),  # Hopper
    (10, 0): (8192, 4096, 256),  # Blackwell data center
    (12, 0): (1024, 512, 256),  # Blackwell workstation and consumer
}
DEFAULT_CLOCK_HZ = 1.5e9  # when the SM clock is unknown: about a data-center part's boost clock
DEFAULT_PEAKS = {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}  # nothing known at all: an A100's


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "half"
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    raise ValueError(f"dtype {dtype}: peak throughput is known for bfloat16, float16 and float32")


def estimated_peak_flops(dtype: torch.dtype, capability: Optional[tuple[int, int]] = None,
                         multiprocessors: Optional[int] = None, clock_hz: Optional[float] = None,
                         tf32: bool = False) -> float:
    """Peak FLOP/s of a GPU the table does not know: multiprocessors x SM clock x dense FLOPs
    per clock per multiprocessor of the nearest known compute capability at or below
    `capability`. bf16 before compute 8.0 (no bf16 tensor cores) and TF32 before 8.0 fall
    back to the fp32 rate. Without a capability or a multiprocessor count, an A100's figures."""
    precision = _precision(dtype, tf32)
    known = [cc for cc in FLOPS_PER_CLOCK_PER_SM if capability is not None and cc <= tuple(capability)]
    if not known or not multiprocessors:
        return DEFAULT_PEAKS["half" if precision == "bf16" else precision]
    half, tf32_rate, fp32 = FLOPS_PER_CLOCK_PER_SM[max(known)]
    per_clock = {"half": half, "bf16": half if tuple(capability) >= (8, 0) else fp32,
                 "tf32": tf32_rate or fp32, "fp32": fp32}[precision]
    return multiprocessors * (clock_hz or DEFAULT_CLOCK_HZ) * per_clock


def device_peak_flops(name: str, dtype: torch.dtype, tf32: bool = False,
                      capability: Optional[tuple[int, int]] = None, multiprocessors: Optional[int] = None,
                      clock_hz: Optional[float] = None) -> tuple[float, bool]:
    """(peak FLOP/s, estimated?) of the GPU `name` (torch.cuda.get_device_name()) for matmuls
    in `dtype`: the dense datasheet figure when the table knows the device and the precision,
    else `estimated_peak_flops` from the other arguments, marked estimated. float32 counts
    at the TF32 tensor-core rate when `tf32` (torch.backends.cuda.matmul.allow_tf32)."""
    precision = _precision(dtype, tf32)
    for peak in DEVICE_PEAKS:
        if re.search(peak.pattern, name.strip(), flags=re.IGNORECASE):
            tflops = getattr(peak, precision)
            if tflops is not None:
                return tflops * 1e12, False
            break  # the chip lacks that unit: estimated from what it has
    return estimated_peak_flops(dtype, capability, multiprocessors, clock_hz, tf32), True


def cuda_peak_flops(dtype: torch.dtype, device: int = 0) -> tuple[float, bool]:
    """`device_peak_flops` of a CUDA device of this machine, with its compute capability,
    multiprocessor count and (through NVML, when nvidia-ml-py is installed) maximum SM clock
    for the estimate."""
    props = torch.cuda.get_device_properties(device)
    clock_hz = None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        clock_hz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) * 1e6
    except Exception:  # noqa: BLE001 - no NVML: the default clock
        pass
    return device_peak_flops(props.name, dtype, torch.backends.cuda.matmul.allow_tf32, (props.major, props.minor),
                             props.multi_processor_count, clock_hz)


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
