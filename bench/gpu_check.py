"""Every GPU check in one run, for a machine lent for a few minutes.

    python -m bench.gpu_check --out "$OUT"                    # on the GPU (about 5-7 minutes on an H200)
    python -m bench.gpu_check --out /tmp/check --cpu-smoke    # the same code on a CPU: tiny models, seconds

The checks run one after another, each in a fresh process with its own time limit, all
under one overall deadline (--total-seconds). A check that fails, raises or runs out of
time is recorded as such and the next one starts. After every check (and, inside a check,
after every figure it measures) the results are written, so a run cut short still leaves
what it measured:

- OUT/gpu_check.json: every figure of every check, its status and its time;
- OUT/gpu_check.md: the same as Markdown tables, ready to paste into the README;
- OUT/log.txt: this script's progress and everything the checks printed.

The checks, in order:
1. environment: versions, the device, its datasheet peak, which attention kernels (SDPA
   backends) run at the model's shapes, and which one the model's attention uses in bf16.
2. trainer_choices: what the trainer picks on this device (precision, fused AdamW, attention),
   read from what actually ran (the profiler's operator names), not from flags.
3. throughput: training tokens/s at the 125M preset, ours vs transformers'
   LlamaForCausalLM with identical weights, bf16 autocast, fused AdamW for both, rounds
   alternating; medians, ratio and MFU against the datasheet peak.
4. trainer_run: `python train.py train --budget 60s` on the built-in data, as a user runs it:
   launch-to-exit time against the budget, and the tokens/s the trainer reported.
5. oom: a real CUDA out-of-memory (a per-process memory cap below what a micro-batch
   needs): training must carry on with smaller micro-batches over the same samples.
6. nf4: bitsandbytes' CUDA 4-bit quantization vs ours (lora.py) on the same weights:
   codes, dequantized weights and matmuls compared, and timed.
7. generation: greedy decoding, ours (KV cache) vs transformers' generate: identical
   outputs, tokens/s, in fp32 and bf16.
8. compile: ours eager vs torch.compile: compilation time and tokens/s after it.

Nothing here downloads anything: the models are built from presets, the data is the
built-in corpus (or, in the smoke run, a small generated file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from bench.bench_generate import timed
from bench.common import hf_peer, matmul_peak_flops, median
from data import PackedBlocks
from events import Fallback, Start, Step
from model import ModelConfig, Transformer
from system_check import cuda_peak_flops
from trainer import Trainer, TrainerConfig, fast_bf16, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
STATUSES = ("ok", "fail", "error", "timeout", "skipped")  # "fail": it ran, and an expectation did not hold
MIN_CHECK_S = 20.0  # a check is not started with less time than this left
OOM_ROOM = 0.6  # the memory cap leaves this share of the reference run's activation memory
LOSS_TOLERANCE = 0.02  # relative: the same samples in other micro-batches, in bf16
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # for the processes started: nothing needs the network


@dataclass(frozen=True)
class Settings:
    """The checks' sizes: the GPU run's, or (`SMOKE`) the CPU smoke run's."""

    preset: str = "125M"  # throughput, trainer_choices, generation, compile
    seq_len: int = 1024
    batch_size: int = 16
    warmup_steps: int = 3
    steps_per_round: int = 10
    rounds: int = 5
    train_budget: Optional[str] = "60s"  # trainer_run; None: a few steps instead (smoke)
    oom_preset: str = "30M"
    oom_seq_len: int = 512
    oom_batch_size: int = 64
    oom_steps: int = 4
    nf4_shapes: tuple[tuple[int, int], ...] = ((768, 768), (3072, 768), (4096, 4096))
    prompt_len: int = 16
    new_tokens: int = 128
    generate_rounds: int = 3


SMOKE = Settings(preset="tiny", seq_len=16, batch_size=4, warmup_steps=1, steps_per_round=2, rounds=2,
                 train_budget=None, oom_preset="tiny", oom_seq_len=16, oom_batch_size=8, oom_steps=2,
                 nf4_shapes=((64, 128),), prompt_len=4, new_tokens=8, generate_rounds=1)


@dataclass
class Context:
    """What a check runs with."""

    settings: Settings
    device: torch.device
    work: Path  # scratch space (runs, caches), removed at the end


class Skipped(Exception):
    """A check that cannot run here (a package it compares against is missing)."""


class Recorder:
    """A check's figures and failed expectations so far. With a `path`, every change is
    written there at once, so a check stopped at its time limit still leaves its figures."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path
        self.values: dict = {}
        self.failures: list[str] = []

    def record(self, **values) -> None:
        self.values.update(values)
        self.save("running")

    def expect(self, condition: bool, failure: str) -> bool:
        """Note `failure` when `condition` is false: the check's status becomes "fail"."""
        if not condition:
            self.failures.append(failure)
            self.save("running")
        return condition

    def save(self, status: str, error: Optional[str] = None, skip_reason: Optional[str] = None) -> dict:
        result = self.result(status, error, skip_reason)
        if self.path is not None:
            write_atomic(self.path, json.dumps(result, indent=1, default=str))
        return result

    def result(self, status: str, error: Optional[str] = None, skip_reason: Optional[str] = None) -> dict:
        return {"status": status, "values": self.values, "failures": self.failures, "error": error,
                "skip_reason": skip_reason}


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---- measuring ---------------------------------------------------------------------------------
def compute_dtype(device: torch.device) -> torch.dtype:
    """The precision the trainer trains in on `device` (bf16 autocast on recent GPUs, fp32 on CPU)."""
    return resolve_dtype(TrainerConfig(), device)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def sprat_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)[1]


def hf_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def training_step(model, loss_fn, optimizer, x, y, dtype: torch.dtype) -> Callable[[], None]:
    """One optimizer step as a callable: the forward (and loss) under autocast, backward and
    the optimizer outside it, as the trainer does."""
    def step() -> None:
        with autocast(x.device, dtype):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    return timed(fn, 1, device)[0]


def alternating_rates(contenders: dict[str, Callable[[], None]], rounds: int, steps: int, tokens_per_step: int,
                      device: torch.device, recorder: Recorder, key: str) -> dict[str, float]:
    """Median tokens/s of each contender over `rounds` rounds of `steps` steps, the
    contenders taking turns in every round (so each sees the same machine conditions);
    recorded as `key` after every round."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            seconds = seconds_of(lambda: [step() for _ in range(steps)], device)
            rates[name].append(steps * tokens_per_step / seconds)
        recorder.record(**{key: {name: median(values) for name, values in rates.items()}})
    return {name: median(values) for name, values in rates.items()}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The MFU denominator and where it comes from: on CUDA the datasheet's dense peak
    (or an estimate for an unknown GPU); on a CPU a measured matmul peak."""
    if device.type == "cuda":
        peak, estimated = cuda_peak_flops(dtype)
        return peak, "estimated" if estimated else "datasheet"
    return matmul_peak_flops(device, dtype, sizes=(256, 512), seconds=0.2), "measured matmul"


def random_blocks(vocab_size: int, seq_len: int, count: int, seed: int = 0) -> PackedBlocks:
    stream = np.random.default_rng(seed).integers(0, vocab_size, count * seq_len + 1).astype(np.int32)
    return PackedBlocks.from_stream(stream, seq_len)


def operators_run(fn: Callable[[], object]) -> set[str]:
    """Names of the aten operators that ran during fn() (the profiler's CPU-side record,
    which names the SDPA backend and the optimizer kernel chosen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


ATTENTION_KERNELS = {"flash": "_scaled_dot_product_flash_attention",
                     "efficient": "_scaled_dot_product_efficient_attention",
                     "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math"}


def attention_kernel(operators: set[str]) -> str:
    """Which SDPA backend ran ("flash", "efficient", "cudnn", "math"; several joined by
    "+"), or "none" (explicit matmul-softmax attention)."""
    found = [kind for kind, name in ATTENTION_KERNELS.items() if any(name in op for op in operators)]
    return "+".join(found) or "none"


def first_line(error: BaseException, limit: int = 200) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:limit] if text else type(error).__name__


# ---- the checks --------------------------------------------------------------------------------
def check_environment(rec: Recorder, ctx: Context) -> None:
    device = ctx.device
    versions = {}
    for package in ("transformers", "tokenizers", "safetensors", "bitsandbytes", "datasets", "gguf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    rec.record(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               packages=versions, device=device.type, cpu_threads=torch.get_num_threads())
    dtype = compute_dtype(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        rec.record(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / GIB, 1), multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                   fast_bf16=fast_bf16(device), matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                 "math": torch.backends.cuda.math_sdp_enabled()})
        for name, peak_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            peak, source = peak_flops(device, peak_dtype)
            rec.record(**{f"peak_{name}_tflops": peak / 1e12, f"peak_{name}_source": source})
    rec.record(compute_dtype=str(dtype).removeprefix("torch."))

    config = ModelConfig.from_name(ctx.settings.preset)
    rec.record(sdpa_backends=sdpa_backends(config, ctx.settings.seq_len, device, dtype))

    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    ids = torch.randint(0, config.vocab_size, (1, ctx.settings.seq_len), device=device)

    def forward_backward() -> None:
        with autocast(device, dtype):
            loss = model(ids, ids)[1]
        loss.backward()

    kernel = attention_kernel(operators_run(forward_backward))
    rec.record(model_attention=kernel)
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                forward_backward()
            rec.record(model_runs_flash_only=True)
        except RuntimeError as error:
            rec.record(model_runs_flash_only=False, model_flash_only_error=first_line(error))
        if fast_bf16(device):
            rec.expect(kernel == "flash", f"the model's attention ran {kernel}, not flash attention, in bf16")
    rec.record(summary=f"{rec.values.get('device_name', 'CPU')}: computes in {rec.values['compute_dtype']}, "
                       f"the model's attention runs {kernel}")


def sdpa_backends(config: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Whether each SDPA backend runs forward and backward at the model's attention shapes
    (causal, grouped-query heads through enable_gqa as the model calls it, and with the
    key/value heads repeated), with the reason PyTorch gives when it does not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, groups = 2, config.num_heads // config.num_kv_heads
    shape = (batch, config.num_heads, seq_len, config.head_dim)
    kv_shape = (batch, config.num_kv_heads, seq_len, config.head_dim)
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        for gqa in (True, False):
            q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
            if not gqa:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            label = f"{backend.name.lower()}{'' if gqa else ' (heads repeated)'}"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).sum().backward()
                    results[label] = "runs"
                except Exception as error:  # noqa: BLE001 - "not available here", whatever form it takes
                    reasons = "; ".join(str(w.message).splitlines()[0][:160] for w in caught if str(w.message))
                    results[label] = f"no: {reasons or first_line(error)}"
    return results


def check_trainer_choices(rec: Recorder, ctx: Context) -> None:
    """A few real steps of `Trainer.fit` with its defaults, profiled."""
    settings, device = ctx.settings, ctx.device
    config = ModelConfig.from_name(settings.preset)
    batch_size, steps = 4, 3
    events = []
    torch.manual_seed(0)
    trainer = Trainer(Transformer(config), TrainerConfig(batch_size=batch_size, max_seq_len=settings.seq_len,
                                                         max_steps=steps, use_epoch_checkpoints=False),
                      random_blocks(config.vocab_size, settings.seq_len, batch_size * steps), callbacks=[events.append])
    operators = operators_run(trainer.fit)
    start = next(event for event in events if isinstance(event, Start))
    group = trainer.optimizer.param_groups[0]
    kernel = attention_kernel(operators)
    rec.record(device=start.device, dtype=start.dtype, optimizer=type(trainer.optimizer).__name__,
               fused_flag=bool(group.get("fused")), fused_adamw_ran="aten::_fused_adamw_" in operators,
               attention=kernel, use_flash=trainer.config.use_flash, use_compile=trainer.config.use_compile,
               attention_operators=sorted(op for op in operators if "attention" in op))
    rec.expect(rec.values["fused_adamw_ran"], "the trainer's optimizer step did not run the fused AdamW kernel")
    if device.type == "cuda":
        rec.expect(start.device == "cuda", f"the trainer trained on {start.device}, not on the GPU")
        if fast_bf16(device):
            rec.expect(start.dtype == "bfloat16", f"the trainer picked {start.dtype}, not bf16 autocast")
            rec.expect(kernel == "flash", f"the trainer's attention ran {kernel}, not flash attention")
    rec.record(summary=f"trains on {start.device} in {start.dtype}; fused AdamW ran: "
                       f"{'yes' if rec.values['fused_adamw_ran'] else 'no'}; attention: {kernel}")


def preset_config(ctx: Context) -> ModelConfig:
    """The preset the throughput checks time, its context long enough for their sequences."""
    preset = ctx.settings.preset
    return ModelConfig.from_name(preset, context_len=max(ctx.settings.seq_len, ModelConfig.from_name(preset).context_len))


def check_throughput(rec: Recorder, ctx: Context) -> None:
    """Ours vs transformers' LlamaForCausalLM, identical configuration and weights."""
    settings, device, dtype, config = ctx.settings, ctx.device, compute_dtype(ctx.device), preset_config(ctx)
    batch, seq_len = settings.batch_size, settings.seq_len
    flops_per_token = config.flops_per_token(seq_len)
    rec.record(preset=settings.preset, params=config.num_params(), batch_size=batch, seq_len=seq_len,
               dtype=str(dtype).removeprefix("torch."), flops_per_token=flops_per_token)
    torch.manual_seed(0)
    ours = Transformer(config).to(device).train()
    ours.check_inputs = False  # as the trainer sets it on CUDA: no device sync for the id range check
    peer = hf_peer(ours).train()
    x = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    fused = dict(lr=1e-4, fused=True)
    contenders = {"sprat": training_step(ours, sprat_loss, torch.optim.AdamW(ours.parameters(), **fused), x, y, dtype),
                  "transformers": training_step(peer, hf_loss, torch.optim.AdamW(peer.parameters(), **fused), x, y,
                                                dtype)}
    for name, step in contenders.items():
        rec.record(**{f"{name}_first_step_s": seconds_of(step, device)})
        for _ in range(settings.warmup_steps - 1):
            step()
    rates = alternating_rates(contenders, settings.rounds, settings.steps_per_round, batch * seq_len, device, rec,
                              "tokens_per_s")
    peak, source = peak_flops(device, dtype)
    measured = matmul_peak_flops(device, dtype, sizes=(4096, 8192) if device.type == "cuda" else (256, 512),
                                 seconds=1.0 if device.type == "cuda" else 0.2)
    mfu = {name: rate * flops_per_token / peak for name, rate in rates.items()}
    rec.record(sprat_tokens_per_s=rates["sprat"], transformers_tokens_per_s=rates["transformers"],
               ratio=rates["sprat"] / rates["transformers"], peak_tflops=peak / 1e12, peak_source=source,
               mfu_sprat=mfu["sprat"], mfu_transformers=mfu["transformers"], measured_matmul_tflops=measured / 1e12,
               mfu_sprat_of_measured=rates["sprat"] * flops_per_token / measured)
    rec.record(summary=f"{settings.preset}, batch {batch} x {seq_len}: Sprat {rates['sprat']:,.0f} tokens/s, "
                       f"transformers {rates['transformers']:,.0f} ({rec.values['ratio']:.2f}x); "
                       f"MFU {mfu['sprat']:.1%} vs {mfu['transformers']:.1%} of {peak / 1e12:,.1f} TFLOP/s ({source})")


def check_trainer_run(rec: Recorder, ctx: Context) -> None:
    """`train.py train` as a user runs it, in its own process: with a time budget, the
    launch-to-exit time against it (smoke: a few steps on a small generated corpus)."""
    settings = ctx.settings
    runs_dir, name = ctx.work / "runs", "gpu-check"
    command = [sys.executable, "train.py", "train", "--out", str(runs_dir), "--name", name, "--cache-dir",
               str(ctx.work / "cache")]
    if settings.train_budget is None:
        corpus = write_small_corpus(ctx.work / "corpus.txt")
        command += ["--data", str(corpus), "--preset", "tiny", "--seq-len", "16", "--batch-size", "4",
                    "data.vocab_size=300", "trainer.max_steps=3"]
    else:
        command += ["--budget", settings.train_budget]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE}
    rec.record(command=" ".join(command[1:]))
    print(f"$ {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    exit_code = subprocess.run(command, cwd=ROOT, env=environment).returncode  # output: into this log
    wall = time.perf_counter() - started
    rec.record(exit_code=exit_code, launch_to_exit_s=wall)
    if settings.train_budget is not None:
        from budget import parse_duration

        budget = parse_duration(settings.train_budget)
        rec.record(budget_s=budget, budget_error_s=wall - budget)
    if not rec.expect(exit_code == 0, f"train.py exited with {exit_code} (its output is in log.txt)"):
        return
    figures = run_figures(runs_dir / name)
    rec.record(**figures)
    rec.expect(figures["status"] in ("finished", "deadline", "max_steps"), f"the run ended as {figures['status']}")
    if ctx.device.type == "cuda":
        rec.expect(figures["device"] == "cuda", f"train.py trained on {figures['device']}, not on the GPU")
        if fast_bf16(ctx.device):
            rec.expect(figures["dtype"] == "bfloat16", f"train.py trained in {figures['dtype']}, not bf16 autocast")
    summary = f"{figures['steps']} steps of a {figures['params'] / 1e6:.1f}M model in {figures['dtype']} on " \
              f"{figures['device']}, {figures['tokens_per_s_overall']:,.0f} tokens/s"
    if settings.train_budget is not None:
        budget = rec.values["budget_s"]
        rec.expect(wall <= budget + max(5.0, 0.05 * budget),
                   f"launch to exit took {wall:.1f} s for a budget of {budget:.0f} s")
        summary = f"budget {budget:.0f} s, launch to exit {wall:.1f} s ({wall - budget:+.1f} s); " + summary
    rec.record(summary=summary)


def run_figures(run_dir: Path) -> dict:
    """What a finished run's metrics.jsonl and run.json say about it: model, device,
    precision, steps (and the estimate shown at the start), and tokens/s as the trainer's
    display reported it (median over the second half of the steps) and over its training time."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(e for e in events if e["type"] == "start")
    finished = next(e for e in reversed(events) if e["type"] == "finished")
    steps = [e for e in events if e["type"] == "step"]
    evals = [e for e in events if e["type"] == "eval"]
    info = json.loads((run_dir / "run.json").read_text())
    reported = [e["tokens_per_s"] for e in steps[len(steps) // 2:] if e["tokens_per_s"] > 0]
    return dict(device=start["device"], dtype=start["dtype"], params=start["params"],
                model={key: info["model"][key] for key in ("num_dims", "num_layers", "num_heads", "vocab_size")},
                batch_size=info["trainer"]["batch_size"], accumulation_steps=info["trainer"]["accumulation_steps"],
                seq_len=info["trainer"]["max_seq_len"], estimated_steps=start.get("estimated_steps"),
                estimate_basis=start.get("estimate_basis"), status=finished["status"], steps=finished["global_step"],
                tokens_seen=finished["tokens_seen"], training_s=finished["elapsed_s"],
                tokens_per_s_reported=median(reported) if reported else None,
                tokens_per_s_overall=finished["tokens_seen"] / max(finished["elapsed_s"], 1e-9),
                val_loss=evals[-1]["val_loss"] if evals else None)


def write_small_corpus(path: Path, documents: int = 60) -> Path:
    """A text file of random paragraphs: the smoke run's data (quicker than training a
    tokenizer on the whole built-in corpus, and read without `datasets`, as the built-in is)."""
    words = "the model reads tokens and learns to predict the next one from the ones before it".split()
    rng = np.random.default_rng(0)
    path.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(20, 60))) for _ in range(documents)))
    return path


def check_oom(rec: Recorder, ctx: Context) -> None:
    """A reference run, then the same run under a memory cap its micro-batch does not fit:
    the trainer must catch the real out-of-memory error and train the same samples."""
    settings = ctx.settings
    config = ModelConfig.from_name(settings.oom_preset, context_len=max(
        settings.oom_seq_len, ModelConfig.from_name(settings.oom_preset).context_len))
    batch = settings.oom_batch_size
    data = random_blocks(config.vocab_size, settings.oom_seq_len, batch * settings.oom_steps)
    trainer_config = TrainerConfig(batch_size=batch, max_seq_len=settings.oom_seq_len, num_epochs=1,
                                   use_epoch_checkpoints=False, log_interval=1)

    def train() -> tuple[Trainer, object, list]:
        events = []
        torch.manual_seed(0)
        trainer = Trainer(Transformer(config), trainer_config, data, callbacks=[events.append])
        return trainer, trainer.fit(), events

    torch.cuda.reset_peak_memory_stats()
    reference_trainer, reference, reference_events = train()
    peak, static = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    reference_weights = {name: p.detach().float().cpu() for name, p in reference_trainer.model.named_parameters()}
    del reference_trainer
    gc.collect()
    torch.cuda.empty_cache()
    cap = static + OOM_ROOM * (peak - static)
    total = torch.cuda.get_device_properties(0).total_memory
    rec.record(preset=settings.oom_preset, batch_size=batch, seq_len=settings.oom_seq_len,
               reference_peak_gib=peak / GIB, weights_and_optimizer_gib=static / GIB, memory_cap_gib=cap / GIB,
               reference_tokens_seen=reference.tokens_seen)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        trainer, result, events = train()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    fallbacks = [e for e in events if isinstance(e, Fallback)]
    losses = [e.loss for e in events if isinstance(e, Step)]
    reference_losses = [e.loss for e in reference_events if isinstance(e, Step)]
    loss_difference = max((abs(a - b) / abs(b) for a, b in zip(losses, reference_losses)), default=None)
    weights = dict(trainer.model.named_parameters())
    weight_difference = max(float((weights[name].detach().float().cpu() - value).norm() / value.norm())
                            for name, value in reference_weights.items())
    rec.record(fallbacks=[{"action": f.action, "step": f.step, "micro_batch_size": f.micro_batch_size,
                           "error": f.error[:120]} for f in fallbacks],
               final_micro_batch_size=-(-batch // trainer.state.micro_splits), final_device=trainer.device.type,
               tokens_seen=result.tokens_seen, steps=result.global_step, reference_steps=reference.global_step,
               max_relative_loss_difference=loss_difference, max_relative_weight_difference=weight_difference)
    rec.expect(bool(fallbacks) and "out of memory" in fallbacks[0].error.lower(),
               "no CUDA out-of-memory error was raised and caught (the cap was not low enough)")
    rec.expect(result.tokens_seen == reference.tokens_seen and result.global_step == reference.global_step,
               f"trained {result.tokens_seen} tokens in {result.global_step} steps, the reference "
               f"{reference.tokens_seen} in {reference.global_step}")
    rec.expect(loss_difference is not None and loss_difference <= LOSS_TOLERANCE,
               f"step losses differ from the reference's by up to {loss_difference}")
    sizes = " -> ".join([str(batch)] + [str(f.micro_batch_size or "CPU") for f in fallbacks])
    rec.record(summary=f"{len(fallbacks)} real CUDA out-of-memory error(s) caught, micro-batch {sizes}, training "
                       f"on {trainer.device.type}; {result.tokens_seen:,} tokens (reference "
                       f"{reference.tokens_seen:,}), losses within {loss_difference or 0:.2%}")


def check_nf4(rec: Recorder, ctx: Context) -> None:
    """bitsandbytes' CUDA NF4 vs ours: quantization, dequantization and the 4-bit matmul."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except ImportError as error:
        raise Skipped(f"bitsandbytes is not installed ({error})") from None
    from lora import Linear4bit, dequantize_nf4, quantize_nf4

    device, dtype = ctx.device, torch.bfloat16
    rec.record(bitsandbytes=bitsandbytes.__version__, dtype="bfloat16", blocksize=64)
    comparisons = {}
    for rows, columns in ctx.settings.nf4_shapes:
        torch.manual_seed(0)
        weight = (torch.randn(rows, columns, device=device) * 0.02).to(dtype)
        for double_quant in (False, True):
            packed, state = quantize_nf4(weight, 64, double_quant)
            theirs, their_state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                     quant_type="nf4")
            ours_weight = dequantize_nf4(packed, state)
            their_weight = bnbf.dequantize_4bit(theirs, their_state)
            comparisons[f"{rows}x{columns}{' double-quant' if double_quant else ''}"] = {
                "codes_equal": float((packed == theirs.flatten()).float().mean()),
                "dequantized_equal": float((ours_weight == their_weight).float().mean()),
                "max_abs_difference": float((ours_weight.float() - their_weight.float()).abs().max())}
            rec.record(comparisons=comparisons)
    for label, result in comparisons.items():
        rec.expect(result["codes_equal"] == 1.0, f"{label}: {1 - result['codes_equal']:.2%} of the packed codes differ")
        needed = 0.98 if "double" in label else 1.0  # the 8-bit absmax codes may round differently
        rec.expect(result["dequantized_equal"] >= needed,
                   f"{label}: {1 - result['dequantized_equal']:.2%} of the dequantized weights differ")

    rows, columns = max(ctx.settings.nf4_shapes, key=lambda shape: shape[0] * shape[1])
    torch.manual_seed(0)
    linear = torch.nn.Linear(columns, rows, bias=False, device=device, dtype=dtype)
    weight = linear.weight.detach()
    timings = {"quantize": {"sprat": lambda: quantize_nf4(weight, 64, True),
                            "bitsandbytes": lambda: bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                                       quant_type="nf4")}}
    packed, state = quantize_nf4(weight, 64, True)
    theirs, their_state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    timings["dequantize"] = {"sprat": lambda: dequantize_nf4(packed, state),
                             "bitsandbytes": lambda: bnbf.dequantize_4bit(theirs, their_state)}
    native = Linear4bit.from_linear(linear, backend="native")
    kernel = Linear4bit.from_linear(linear, backend="bitsandbytes")  # the same codes, bitsandbytes' matmul
    matmuls = {}
    with torch.no_grad():
        for tokens in (4096, 1):
            x = torch.randn(tokens, columns, device=device, dtype=dtype)
            ours_out, their_out = native(x), kernel(x)
            matmuls[f"{tokens} token{'s' if tokens > 1 else ''}"] = float(
                (ours_out.float() - their_out.float()).norm() / their_out.float().norm())
            timings[f"matmul, {tokens} token{'s' if tokens > 1 else ''}"] = {
                "sprat": lambda x=x: native(x), "bitsandbytes": lambda x=x: kernel(x),
                "bf16 F.linear": lambda x=x: F.linear(x, weight)}
        rec.record(matmul_relative_difference=matmuls)
        milliseconds = {}
        for operation, contenders in timings.items():
            for fn in contenders.values():
                fn()  # warm-up
            milliseconds[operation] = {name: 1e3 * median(seconds_of(fn, device) for _ in range(20))
                                       for name, fn in contenders.items()}
            rec.record(milliseconds=milliseconds, timed_shape=f"{rows}x{columns}")
    for label, difference in matmuls.items():
        rec.expect(difference < 1e-2, f"matmul on {label}: ours and bitsandbytes' differ by {difference:.2e} "
                                      f"(relative)")
    rec.record(summary=f"codes identical in {sum(r['codes_equal'] == 1 for r in comparisons.values())} of "
                       f"{len(comparisons)} comparisons; {rows}x{columns} dequantize "
                       f"{milliseconds['dequantize']['sprat']:.3f} ms ours vs "
                       f"{milliseconds['dequantize']['bitsandbytes']:.3f} ms bitsandbytes")


def check_generation(rec: Recorder, ctx: Context) -> None:
    """Greedy decoding, our KV cache vs transformers' generate with its cache, same weights."""
    settings, device = ctx.settings, ctx.device
    config = ModelConfig.from_name(settings.preset)
    torch.manual_seed(0)
    model = Transformer(config).to(device).eval()
    peer = hf_peer(model, training=False).eval()
    peer.generation_config.eos_token_id = None  # exactly new_tokens tokens, none suppressed (min_new_tokens would)
    prompt = torch.randint(0, config.vocab_size, (1, settings.prompt_len), device=device)
    new = settings.new_tokens
    rec.record(preset=settings.preset, prompt_len=settings.prompt_len, new_tokens=new, batch_size=1)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    summary = []
    for dtype in dtypes:  # fp32 first: casting to bf16 is one way
        model.to(dtype)
        peer.to(dtype)
        name = "fp32" if dtype == torch.float32 else "bf16"
        contenders = {"sprat": lambda: model.generate(prompt, new, temperature=0, use_cache=True),
                      "transformers": lambda: peer.generate(prompt, max_new_tokens=new, do_sample=False,
                                                            use_cache=True, pad_token_id=0)}
        outputs = {label: fn() for label, fn in contenders.items()}  # warm-up
        times = {label: [] for label in contenders}
        for _ in range(settings.generate_rounds):
            for label, fn in contenders.items():
                seconds, outputs[label] = timed(fn, 1, device)
                times[label].append(seconds)
        rates = {label: new / median(values) for label, values in times.items()}
        ours, theirs = outputs["sprat"], outputs["transformers"]
        identical = ours.shape == theirs.shape and torch.equal(ours, theirs)
        differs = (ours[0] != theirs[0]).nonzero() if ours.shape == theirs.shape else None
        rec.record(**{name: {"sprat_tokens_per_s": rates["sprat"], "transformers_tokens_per_s": rates["transformers"],
                             "ratio": rates["sprat"] / rates["transformers"], "identical": identical,
                             "first_difference_at": None if identical or differs is None or not len(differs)
                             else int(differs[0]) - settings.prompt_len}})
        if dtype == torch.float32:
            rec.expect(identical, "fp32 greedy outputs of ours and transformers differ")
        summary.append(f"{name}: Sprat {rates['sprat']:,.0f} tokens/s, transformers {rates['transformers']:,.0f} "
                       f"({'identical' if identical else 'outputs differ'})")
    rec.record(summary="; ".join(summary))


def check_compile(rec: Recorder, ctx: Context) -> None:
    """Our model eager vs torch.compile'd (as `trainer.use_compile` does), same parameters."""
    settings, device, dtype, config = ctx.settings, ctx.device, compute_dtype(ctx.device), preset_config(ctx)
    batch, seq_len = settings.batch_size, settings.seq_len
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    model.check_inputs = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    eager = training_step(model, sprat_loss, optimizer, x, y, dtype)
    compiled = training_step(torch.compile(model), sprat_loss, optimizer, x, y, dtype)
    eager_step_s = min(seconds_of(eager, device) for _ in range(settings.warmup_steps))
    first = seconds_of(compiled, device)  # compilation happens here
    rec.record(preset=settings.preset, batch_size=batch, seq_len=seq_len, compiled_first_step_s=first,
               compile_s=first - eager_step_s)
    for _ in range(settings.warmup_steps - 1):
        compiled()
    rates = alternating_rates({"eager": eager, "compiled": compiled}, settings.rounds, settings.steps_per_round,
                              batch * seq_len, device, rec, "tokens_per_s")
    peak, source = peak_flops(device, dtype)
    flops = config.flops_per_token(seq_len)
    rec.record(eager_tokens_per_s=rates["eager"], compiled_tokens_per_s=rates["compiled"],
               speedup=rates["compiled"] / rates["eager"], mfu_eager=rates["eager"] * flops / peak,
               mfu_compiled=rates["compiled"] * flops / peak, peak_source=source)
    rec.record(summary=f"compiling took {rec.values['compile_s']:.0f} s; eager {rates['eager']:,.0f} -> compiled "
                       f"{rates['compiled']:,.0f} tokens/s ({rec.values['speedup']:.2f}x, MFU "
                       f"{rec.values['mfu_compiled']:.1%})")


@dataclass(frozen=True)
class CheckSpec:
    name: str
    run: Callable[[Recorder, Context], None]
    limit_s: float  # on the GPU (the smoke run's sizes take seconds)
    cuda_only: bool = False  # skipped without CUDA (on a CPU: nothing to check, or minutes to compile)


CHECKS = (
    CheckSpec("environment", check_environment, 60),
    CheckSpec("trainer_choices", check_trainer_choices, 90),
    CheckSpec("throughput", check_throughput, 150),
    CheckSpec("trainer_run", check_trainer_run, 150),
    CheckSpec("oom", check_oom, 150, cuda_only=True),
    CheckSpec("nf4", check_nf4, 90, cuda_only=True),
    CheckSpec("generation", check_generation, 120),
    CheckSpec("compile", check_compile, 240, cuda_only=True),
)
BY_NAME = {spec.name: spec for spec in CHECKS}


# ---- running them --------------------------------------------------------------------------------
def run_check(spec: CheckSpec, ctx: Context, recorder: Recorder) -> dict:
    """Run one check here and now; whatever it raises becomes its status."""
    try:
        spec.run(recorder, ctx)
    except Skipped as reason:
        return recorder.save("skipped", skip_reason=str(reason))
    except Exception as error:  # noqa: BLE001 - recorded; the next check runs
        print(traceback.format_exc(), flush=True)
        return recorder.save("error", f"{type(error).__name__}: {error}"[:2000])
    return recorder.save("fail" if recorder.failures else "ok")


def run_isolated(spec: CheckSpec, args: argparse.Namespace, work: Path, limit_s: float, log) -> dict:
    """Run one check in a fresh process (its own CUDA context, allocator and memory cap),
    killed with everything it started when `limit_s` passes; its last saved figures are
    kept either way."""
    path = work / f"{spec.name}.json"
    path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.gpu_check", "--child", spec.name, "--work", str(work)]
    if args.cpu_smoke:
        command.append("--cpu-smoke")
    if args.train_budget:
        command += ["--train-budget", args.train_budget]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE}
    log.flush()
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        exit_code, timed_out = process.wait(timeout=limit_s), False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # (it may have ended just now)
            os.killpg(process.pid, signal.SIGKILL)  # the check and what it started (train.py)
        exit_code, timed_out = process.wait(), True
    result = json.loads(path.read_text()) if path.exists() else Recorder().result("running")
    if timed_out:
        result.update(status="timeout", error=f"stopped after its time limit of {limit_s:.0f} s")
    elif result["status"] == "running":  # died without a word: a crash in native code, the OOM killer
        result.update(status="error", error=f"the check's process ended with exit code {exit_code}")
    return result


def settings_for(args: argparse.Namespace) -> Settings:
    settings = SMOKE if args.cpu_smoke else Settings()
    return replace(settings, train_budget=args.train_budget) if args.train_budget else settings


def device_for(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")


class Report:
    """The run's results, written in full (JSON, Markdown) after every check."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.meta = meta
        self.checks: list[dict] = []

    def add(self, name: str, result: dict, seconds: float, limit_s: Optional[float]) -> None:
        self.checks.append({"name": name, "seconds": round(seconds, 2), "limit_s": limit_s, **result})
        self.write()

    def write(self, finished: bool = False) -> None:
        document = {**self.meta, "finished": finished, "checks": self.checks}
        write_atomic(self.out / "gpu_check.json", json.dumps(document, indent=1, default=str))
        write_atomic(self.out / "gpu_check.md", markdown(document))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md and log.txt")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU; CUDA-only checks skipped")
    parser.add_argument("--checks", default=",".join(BY_NAME), help="comma-separated subset, in the usual order")
    parser.add_argument("--total-seconds", type=float, default=450.0, help="overall deadline of the run")
    parser.add_argument("--train-budget", default=None, help="trainer_run's --budget (default 60s; smoke: none)")
    parser.add_argument("--in-process", action="store_true", help="run the checks in this process (quicker to "
                        "start; no time limits, no isolation)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (runs, caches)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run this one check and save its result
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and not args.child:
        parser.error("--out is required")
    unknown = [name for name in args.checks.split(",") if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(BY_NAME)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:  # one check, in the process run_isolated started
        ctx = Context(settings_for(args), device_for(args), args.work)
        run_check(BY_NAME[args.child], ctx, Recorder(args.work / f"{args.child}.json"))
        return 0
    return run_all(args, [BY_NAME[name] for name in args.checks.split(",")])


def run_all(args: argparse.Namespace, specs: list[CheckSpec]) -> int:
    """Run `specs` in order under the overall deadline, writing the report after each."""
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sprat-gpu-check-"))
    started, deadline = time.perf_counter(), time.perf_counter() + args.total_seconds
    settings, device = settings_for(args), device_for(args)
    report = Report(args.out, {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "device": device.type,
                               "started": datetime.datetime.now().isoformat(timespec="seconds"),
                               "command": " ".join(sys.argv), "commit": git_commit(), "settings": asdict(settings)})
    with open(args.out / "log.txt", "a") as log, contextlib.ExitStack() as cleanup:
        if not args.keep_work:
            cleanup.callback(shutil.rmtree, work, ignore_errors=True)

        def say(text: str) -> None:
            line = f"[{time.strftime('%H:%M:%S')}] {text}"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        say(f"gpu_check: {len(specs)} checks, {report.meta['mode']} on {device.type}, deadline "
            f"{args.total_seconds:.0f} s, results in {args.out}")
        for spec in specs:
            check_started = time.perf_counter()
            left = deadline - check_started
            limit = None
            reason = reason_to_skip(spec, device, args.cpu_smoke)
            if reason:
                result = Recorder().result("skipped", skip_reason=reason)
            elif left < MIN_CHECK_S:
                result = Recorder().result("skipped", skip_reason=f"out of time ({left:.0f} s left)")
            elif args.in_process:
                say(f"{spec.name}: started (in process)")
                result = run_check(spec, Context(settings, device, work), Recorder())
            else:
                limit = round(min(spec.limit_s, left), 1)
                say(f"{spec.name}: started (limit {limit:.0f} s)")
                result = run_isolated(spec, args, work, limit, log)
            seconds = time.perf_counter() - check_started
            report.add(spec.name, result, seconds, limit)
            detail = result.get("skip_reason") or result.get("error") or "; ".join(result.get("failures") or []) \
                or result["values"].get("summary", "")
            say(f"{spec.name}: {result['status']} in {seconds:.1f} s: {detail}")
        report.meta["total_seconds"] = round(time.perf_counter() - started, 1)
        report.write(finished=True)
        say(f"gpu_check: done in {report.meta['total_seconds']:.0f} s: " + ", ".join(
            f"{check['name']} {check['status']}" for check in report.checks))
    return 0


def reason_to_skip(spec: CheckSpec, device: torch.device, smoke: bool) -> Optional[str]:
    if device.type == "cuda":
        return None
    if spec.cuda_only:
        return "no CUDA"
    if not smoke and spec.name != "environment":  # the GPU sizes would take hours on a CPU
        return "no CUDA (--cpu-smoke runs the CPU version)"
    return None


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- Markdown ---------------------------------------------------------------------------------------
def fmt(value) -> str:
    """A figure for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{fmt(key)}: {nested(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(nested(item) for item in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def nested(value) -> str:
    return f"({fmt(value)})" if isinstance(value, (dict, list, tuple)) else fmt(value)


def table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
                    for row in rows]


def markdown(document: dict) -> str:
    checks = {check["name"]: check for check in document["checks"]}
    environment = checks.get("environment", {}).get("values", {})
    device = environment.get("device_name") or document["device"].upper()
    lines = [f"# Sprat GPU check ({document['mode']})", "",
             f"{device}, torch {environment.get('torch', '?')} (CUDA {environment.get('torch_cuda') or '-'}), "
             f"started {document['started']}, commit {document.get('commit') or '?'}"
             + (f", {document['total_seconds']:.0f} s in all" if "total_seconds" in document else
                " (still running, or stopped before the end)"), ""]
    lines += table(("check", "status", "seconds", "result"), [
        (check["name"], check["status"], fmt(check["seconds"]),
         fmt(check.get("skip_reason") or check.get("error") or "; ".join(check["failures"])
             or check["values"].get("summary", ""))) for check in document["checks"]])
    for name, section in (("throughput", throughput_table), ("compile", compile_table),
                          ("generation", generation_table), ("trainer_run", trainer_run_table), ("nf4", nf4_table)):
        values = checks.get(name, {}).get("values", {})
        if values:
            lines += ["", *section(values)]
    lines += ["", "## Every figure"]
    for check in document["checks"]:
        values = {key: value for key, value in check["values"].items() if key != "summary"}
        if values:
            lines += ["", f"### {check['name']}", "", *table(("figure", "value"),
                                                              [(key, value) for key, value in values.items()])]
    return "\n".join(lines) + "\n"


def throughput_table(values: dict) -> list[str]:
    if "sprat_tokens_per_s" not in values:
        return []
    title = f"## Training throughput: {values['preset']}, {values['dtype']}, batch {values['batch_size']} x " \
            f"{values['seq_len']}, fused AdamW"
    mfu = f"MFU ({values['peak_source']} peak {values['peak_tflops']:,.1f} TFLOP/s)"
    return [title, "", *table(("model", "tokens/s", mfu), [
        ("Sprat", values["sprat_tokens_per_s"], f"{values['mfu_sprat']:.1%}"),
        ("transformers LlamaForCausalLM", values["transformers_tokens_per_s"], f"{values['mfu_transformers']:.1%}"),
        ("Sprat / transformers", f"{values['ratio']:.2f}x", "")])]


def compile_table(values: dict) -> list[str]:
    if "compiled_tokens_per_s" not in values:
        return []
    return [f"## torch.compile: {values['preset']}, batch {values['batch_size']} x {values['seq_len']}", "",
            *table(("Sprat", "tokens/s", "MFU"), [("eager", values["eager_tokens_per_s"], f"{values['mfu_eager']:.1%}"),
                                                  ("compiled", values["compiled_tokens_per_s"],
                                                   f"{values['mfu_compiled']:.1%}")]),
            "", f"Compiling took {values['compile_s']:.0f} s (first compiled step "
                f"{values['compiled_first_step_s']:.0f} s); speed-up {values['speedup']:.2f}x."]


def generation_table(values: dict) -> list[str]:
    rows = [(dtype, values[dtype]["sprat_tokens_per_s"], values[dtype]["transformers_tokens_per_s"],
             f"{values[dtype]['ratio']:.2f}x", values[dtype]["identical"])
            for dtype in ("fp32", "bf16") if dtype in values]
    if not rows:
        return []
    return [f"## Generation: {values['preset']}, greedy, batch 1, {values['prompt_len']}-token prompt, "
            f"{values['new_tokens']} new tokens", "",
            *table(("precision", "Sprat (KV cache) tokens/s", "transformers generate tokens/s", "ratio",
                    "identical output"), rows)]


def trainer_run_table(values: dict) -> list[str]:
    if "tokens_per_s_overall" not in values:
        return []
    budget = values.get("budget_s")
    rows = [("command", f"`{values['command']}`"),
            ("budget / launch to exit", f"{budget:.0f} s / {values['launch_to_exit_s']:.1f} s "
                                        f"({values['budget_error_s']:+.1f} s)" if budget else
             f"{values['launch_to_exit_s']:.1f} s"),
            ("model", f"{values['params'] / 1e6:.1f}M parameters: {values['model']['num_layers']} layers x "
                      f"{values['model']['num_dims']} dims, vocabulary {values['model']['vocab_size']:,}"),
            ("device, precision", f"{values['device']}, {values['dtype']}"),
            ("steps (estimated)", f"{values['steps']} ({fmt(values['estimated_steps'])})"),
            ("tokens/s (trainer's display, training time)", f"{fmt(values['tokens_per_s_reported'])}, "
                                                             f"{fmt(values['tokens_per_s_overall'])}")]
    return ["## The trainer end to end", "", *table(("", ""), rows)]



def nf4_table(values: dict) -> list[str]:
    if "milliseconds" not in values:
        return []
    timings = values["milliseconds"]
    rows = [(operation, *(f"{times[name]:.3f}" if name in times else "" for name in
                          ("sprat", "bitsandbytes", "bf16 F.linear"))) for operation, times in timings.items()]
    agreement = [(label, f"{result['codes_equal']:.2%}", f"{result['dequantized_equal']:.2%}")
                 for label, result in values.get("comparisons", {}).items()]
    return [f"## NF4: ours vs bitsandbytes {values['bitsandbytes']} ({values['dtype']}, blocks of "
            f"{values['blocksize']})",
            "", *table(("weight", "packed codes equal", "dequantized weights equal"), agreement),
            "", f"Milliseconds (median of 20) on a {values.get('timed_shape', '?')} weight:", "",
            *table(("operation", "Sprat", "bitsandbytes", "bf16 F.linear"), rows)]


if __name__ == "__main__":
    sys.exit(main())
