"""The operations both front ends share: configurations, data, runs, training, fine-tuning,
resuming, and the trained models (load, generate, evaluate, export, list).

`train.py` (the command line) and `wizard.py` (the menus) call these with typed requests
and render what comes back; nothing here prints, prompts or imports either of them.
Progress goes through two callbacks: `say(text)` for a line of news, and the trainer's
event callback (a display) for the run itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import psutil
import torch

import checkpoint
from budget import (CostModel, Estimate, FinetunePlan, HardwareProfile, Plan, best_thread_count, check_memory,
                    enough_steps, estimate_run, finetune_seq_len, measure, measure_step, parse_duration, plan,
                    plan_finetune, precision, probe, sequence_length, training_memory)
from config_io import ConfigError, apply_overrides, load_configs, move_aliases
from data import (BUILTIN, IM_END, DataConfig, DataError, MaskedSamples, PackedBlocks, PreparedData, held_out_text,
                  instruction_lengths, load_pretrained_tokenizer, load_tokenizer_dir, prepare, template_note,
                  tokenizer_hash, training_side_text, WithGeneralText)
from events import Callback, MetricsLog, TensorBoardLog, perplexity, progress_reporter
from export import load_hf, merge_and_save, merged_model, save_adapter, save_hf
from gguf_io import end_ids, export_gguf, load_gguf
from lora import LoRAConfig, apply_lora, parameter_report
from model import ModelConfig, Transformer
from trainer import (CpuPrecision, Guard, Trainer, TrainerConfig, TrainResult, evaluate, guard_limit, resolve_device,
                     resolve_dtype)

DEFAULT_PRESET = "2M"  # the model of `train` without --budget or --preset
DEFAULT_CACHE = ".cache/sprat"  # tokenized data and trained tokenizers
FINISH_RESERVE_S = 6.0  # kept from a fixed model's budget for the last evaluation, the save and the sample
SECTIONS = {"model": ModelConfig, "trainer": TrainerConfig, "data": DataConfig, "lora": LoRAConfig}
RUNTIME_MODEL_FIELDS = ("use_cache",)  # how a model generates, not what it is: may change on resume
# Fine-tuning starts from these trainer settings (a pretrained base wants a gentler schedule;
# measured in the README's "Fine-tuning defaults"): LoRA alpha = FINETUNE_ALPHA_PER_RANK x rank.
FINETUNE_TRAINER = dict(learning_rate=2e-4, min_lr=2e-5, warmup_ratio=0.03, early_stopping_patience=2)
FINETUNE_ALPHA_PER_RANK = 2.0
# General text (from `general_data`'s training side, never what the guard measures) mixed
# into a fine-tune: this many general target tokens per task target token.
FINETUNE_REPLAY = 3.0
REPLAY_POOL_EPOCHS = 32  # general text for this many epochs of fresh blocks ...
REPLAY_POOL_TOKENS = 262_144  # ... within this many tokens
FINETUNE_BATCH = 8  # a fine-tune's micro-batch without --batch-size or a budget
FINETUNE_VAL_SAMPLES = 256  # validation samples a fine-tune's evaluations read (the first ones)

Say = Callable[[str], None]


def _quiet(text: str) -> None:
    return None


def since_launch(started: Optional[float] = None) -> float:
    """Seconds since `started` (a time.time()), by default since this process started
    (imports included): where a budget's clock starts."""
    return time.time() - (psutil.Process().create_time() if started is None else started)


# ---- configurations ---------------------------------------------------------------------------
def default_configs(preset: str = DEFAULT_PRESET, source: str = BUILTIN, cache_dir: str = DEFAULT_CACHE) -> dict:
    """Where every run starts before files, options and overrides: the dataclasses' own
    defaults, with the model of a preset."""
    return {"model": ModelConfig.from_name(preset), "trainer": TrainerConfig(),
            "data": DataConfig(source=source, cache_dir=cache_dir)}


def load_config_file(path: str | Path, configs: dict) -> dict:
    """Sections `model`, `trainer`, `data` (and `lora`) of a JSON or YAML file, such as a
    run's run.json, over `configs`; unknown keys are errors here (the wizard warns)."""
    if not Path(path).exists():
        raise ConfigError(f"config file {path} does not exist")
    with_sections = dict(configs)
    for section, cls in SECTIONS.items():
        with_sections.setdefault(section, cls())
    updated, unknown = load_configs(path, with_sections)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; sections are {', '.join(SECTIONS)} "
                          f"(`python train.py config show` lists the fields)")
    return {section: updated[section] for section in configs}


def read_run_info(run_dir: Path) -> dict:
    """A run's run.json (its configs and, for fine-tunes, the base and LoRA settings)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no run.json)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ConfigError(f"{path}: not valid JSON ({str(error)[:200]}); the run's settings cannot be read") from None
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict) or \
            not all(isinstance(info.get(name, {}), dict) for name in ("trainer", "data")):
        raise ConfigError(f"{path}: expected model / trainer / data sections (objects of field: value)")
    finetune = info.get("finetune")
    if finetune is not None and not (isinstance(finetune, dict) and isinstance(finetune.get("base"), str)
                                     and isinstance(finetune.get("lora"), dict)):
        raise ConfigError(f"{path}: 'finetune' must name its base (a path) and its lora settings")
    return info


def run_configs(info: dict, where: Path) -> dict:
    """The model / trainer / data configs a run.json holds (files written before the four
    LightLM switches had one home load as the run used them)."""
    sections = move_aliases({name: info.get(name) or {} for name in ("model", "trainer", "data")})
    try:
        return {name: SECTIONS[name].from_dict(values) for name, values in sections.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"{where / 'run.json'}: {error}") from None


# ---- data -------------------------------------------------------------------------------------
def prepare_data(data_config: DataConfig, seq_len: int, tokenizer=None, fallback_to_builtin: bool = True,
                 say: Say = _quiet, progress: Optional[Callback] = None) -> PreparedData:
    """The dataset tokenized and packed for `seq_len`, with a summary through `say` and
    `Progress` events of the tokenizing (documents or records done of all) to `progress`."""
    say(f"preparing data from {data_config.source} ...")
    prepared = prepare(data_config, seq_len, tokenizer=tokenizer, fallback_to_builtin=fallback_to_builtin,
                       progress=progress)
    for line in data_summary(prepared):
        say(line)
    return prepared


def data_summary(prepared: PreparedData) -> list[str]:
    report = prepared.report
    lines = [f"note: {note}" for note in report.notes]
    if report.format == "instruction":
        lines.append(f"{report.source}: {report.documents_kept} samples ({report.train_documents} train, "
                     f"{report.val_documents} validation), {report.train_tokens:,} training and {report.val_tokens:,} "
                     f"validation response tokens (the answers, which the loss is on); truncated "
                     f"{report.truncated_samples}, dropped {report.dropped_samples}")
    else:
        lines.append(f"{report.source}: {report.documents_kept} documents, {report.train_tokens:,} training and "
                     f"{report.val_tokens:,} validation tokens "
                     f"({'from cache' if report.cached else f'{report.seconds:.1f} s'})")
    return lines


def fit_model_to_data(model_config: ModelConfig, trainer_config: TrainerConfig, prepared: PreparedData) -> ModelConfig:
    """The model config with the tokenizer's vocabulary and room for the sequence length."""
    if model_config.vocab_size != len(prepared.tokenizer):
        model_config = dataclasses.replace(model_config, vocab_size=len(prepared.tokenizer))
    if model_config.context_len < trainer_config.max_seq_len:
        model_config = dataclasses.replace(model_config, context_len=trainer_config.max_seq_len)
    return model_config


# ---- runs -------------------------------------------------------------------------------------
def run_info(model_config: ModelConfig, trainer_config: TrainerConfig, data_config: DataConfig, **extra) -> dict:
    return {"model": model_config.to_dict(), "trainer": trainer_config.to_dict(), "data": data_config.to_dict(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, **extra}


def new_run_dir(out: Optional[str], trainer_config: TrainerConfig, name: Optional[str], prefix: str = "run") -> Path:
    """Where a new run goes: `name`, or a fresh `PREFIX-DATE-TIME` (with -2, -3, ... when
    that one is taken)."""
    root = Path(out or trainer_config.path_to_checkpoints)
    if name:
        if name in (".", "..") or Path(name).name != name:
            raise ConfigError(f"--name {name!r}: a run's name is one folder name (no '/', '.' or '..'); "
                              f"--out chooses where runs go")
        return root / name
    fresh = root / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    return _claim(fresh) if _is_writer(trainer_config.distributed) else fresh


def _claim(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : the first that this process creates (atomically,
    so two processes starting in the same second get different ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, count = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            count += 1
            candidate = path.with_name(f"{path.name}-{count}")


class RunInUse(RuntimeError):
    """Another process is training in this run directory."""


class RunLock:
    """Ownership of a run directory while a process writes to it (train, resume, finetune):
    an exclusive advisory lock on `run_dir/.lock`, which names the owner's PID. The kernel
    drops it when the process ends, kill -9 included, so a lock is never stale."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._file = None

    def __enter__(self) -> "RunLock":
        import fcntl

        handle = open(self.run_dir / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RunInUse(f"{self.run_dir} is in use by process {holder}, which is training in it; wait for it to "
                           f"end (or stop it), or choose another --name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def _is_writer(distributed: bool) -> bool:
    """Whether this process writes the run directory: rank 0 under torchrun (DDP, FSDP), else
    always (a RANK left in the environment by a launcher does not count without them)."""
    return not distributed or int(os.environ.get("RANK", "0")) == 0


def _owning(run_dir: Path, distributed: bool):
    """The run's lock on the process that writes it, nothing on the other ranks."""
    return RunLock(run_dir) if _is_writer(distributed) else contextlib.nullcontext()


def check_new_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Refuse a new run over an existing one before any work (unless `overwrite`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; choose another --name or --out")
    holds = run_dir.is_dir() and any(path.name != ".lock" for path in run_dir.iterdir())
    if not overwrite and holds:
        what = "a run" if (run_dir / "run.json").exists() else "files"
        raise ConfigError(f"{run_dir} already holds {what}. Continue it with `python train.py resume {run_dir}`, pass "
                          f"--overwrite to start over (the old run is moved aside, not deleted), or choose another "
                          f"--name")


@contextlib.contextmanager
def new_run(run_dir: Path, overwrite: bool = False, distributed: bool = False) -> Iterator[Optional[Path]]:
    """Hold the empty, locked directory of a new run while the block runs; yields where an
    old run there was moved (`overwrite`: nothing is deleted), or None. Of two processes
    starting one name, one gets it and the other RunInUse or a refusal."""
    if not _is_writer(distributed):  # under torchrun, rank 0 alone creates and owns the run directory
        yield None
        return
    check_new_run_dir(run_dir, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        check_new_run_dir(run_dir, overwrite)  # another process may have created it meanwhile
        leftovers = [path for path in run_dir.iterdir() if path.name != ".lock"]
        moved = None
        if leftovers:  # move the contents, not the directory: the lock stays where it is held
            moved = _claim(run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
            for path in leftovers:
                path.rename(moved / path.name)
        yield moved


def _write_atomic(path: Path, text: str) -> None:
    """`text` in `path`, or the old file untouched: never a half-written one (a full disk)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def create_run(run_dir: Path, info: dict, tokenizer) -> Path:
    """A run directory holding run.json (its settings) and the tokenizer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "run.json", json.dumps(info, indent=2) + "\n")
    tokenizer.save_pretrained(str(run_dir))
    return run_dir


@dataclass
class RunOutcome:
    """What a training operation ends with, for a front end to render."""

    result: TrainResult
    run_dir: Path
    is_main: bool = True  # False on the other ranks of a torchrun run: they report nothing
    notes: list[str] = field(default_factory=list)  # files written after training (adapter, merged model)
    sample: Optional[str] = None  # the model's continuation of a prompt, when the run ended well
    sample_prompt: Optional[str] = None  # a fine-tune's held-out instruction that `sample` answers
    comparison: Optional["Comparison"] = None  # a fine-tune against its base


def _attach(trainer: Trainer, display: Optional[Callback]) -> Trainer:
    """The run's sinks (metrics.jsonl, TensorBoard) and `display` as the trainer's callbacks."""
    if trainer.run_dir is not None and trainer.is_main:
        trainer.callbacks += [MetricsLog(trainer.run_dir / "metrics.jsonl", trainer.config.log_interval),
                              TensorBoardLog(trainer.run_dir / "tensorboard")]
    if display is not None:
        trainer.callbacks.append(display)
    return trainer


def _fit(trainer: Trainer, display: Optional[Callback]) -> TrainResult:
    return _attach(trainer, display).fit()


def _outcome(trainer: Trainer, result: TrainResult, run_dir: Path, tokenizer, prompt: str,
             notes: Optional[list[str]] = None) -> RunOutcome:
    model = trainer.unsharded_model()  # under FSDP every rank helps gather it to rank 0
    if trainer.config.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    outcome = RunOutcome(result, run_dir, trainer.is_main, notes or [])
    if trainer.is_main and result.status not in ("interrupted", "nonfinite"):
        outcome.sample = sample_text(model, tokenizer, prompt)
    return outcome


def sample_prompt(prepared: PreparedData, tokens: int = 4) -> str:
    """What the end-of-run sample continues: code for the built-in corpus (Python's
    standard library), else the opening tokens of the first validation sequence."""
    if (prepared.config and prepared.config.source == BUILTIN) or len(prepared.val) == 0:
        return "def "
    first, _ = prepared.val.batch(np.arange(1))
    return prepared.tokenizer.decode(first[0, :tokens].tolist(), skip_special_tokens=True) or "def "


def train_prepared(configs: dict, prepared: PreparedData, run_dir: Path, display: Optional[Callback] = None,
                   stop_at: Optional[float] = None, overwrite: bool = False,
                   estimate: Optional[Estimate] = None, finish_s: float = 0.0) -> RunOutcome:
    """Train a new model of `configs` (model, trainer, data) on prepared data in `run_dir`.
    `stop_at` (a time.time()) sets the deadline once the model is built, so everything
    before it counts against a budget. `overwrite` moves an old run there aside.
    `estimate` (what the plan or start summary showed) is what the live display starts
    from, and its thread count is the one training uses: the speed it was measured at.
    `finish_s` (the work after the deadline, at the estimated speed) grows with the real
    speed's shortfall, taken from the deadline."""
    model_config = fit_model_to_data(configs["model"], configs["trainer"], prepared)
    trainer_config = configs["trainer"]
    check_memory(model_config, True, trainer_config.max_seq_len, resolve_device(trainer_config).type)
    with new_run(run_dir, overwrite, trainer_config.distributed) as moved, threads_set(estimate and estimate.threads):
        torch.manual_seed(trainer_config.seed)  # the initialisation depends on the seed alone
        model = Transformer(model_config)
        if stop_at is not None:
            trainer_config = dataclasses.replace(trainer_config, time_limit_s=max(1.0, stop_at - time.time()))
        data_config = prepared.config or configs["data"]  # the built-in corpus after a hub fallback
        settle_precision(trainer_config, data_config.cache_dir)
        trainer = Trainer(model, trainer_config, prepared.train, prepared.val, run_dir=run_dir, estimate=estimate,
                          finish_s=finish_s)
        if trainer.is_main:
            create_run(run_dir, run_info(model_config, trainer_config, data_config), prepared.tokenizer)
        result = _fit(trainer, display)
    notes = [f"the run that was in {run_dir} is now in {moved}"] if moved else []
    return _outcome(trainer, result, run_dir, prepared.tokenizer, sample_prompt(prepared), notes)


@dataclass
class TrainRequest:
    """`train`: a model for a time budget (planned from measurements) or for its epochs."""

    budget: Optional[str] = None  # 90s, 20m, 2h, or hours
    data: str = BUILTIN
    config_file: Optional[str] = None
    preset: Optional[str] = None  # with a budget: skip planning and train this model until the deadline
    out: Optional[str] = None
    name: Optional[str] = None
    cache_dir: str = DEFAULT_CACHE
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    overrides: list[str] = field(default_factory=list)
    overwrite: bool = False  # a run already at out/name is moved aside (else: refused)
    started: Optional[float] = None  # when the budget's clock started (a time.time()); None: process start
    remeasure: bool = False  # measure this machine again instead of using cached probes


def train(request: TrainRequest, display: Optional[Callback] = None, say: Say = _quiet) -> RunOutcome:
    """Resolve the configs (defaults < file < options < overrides), prepare the data, plan
    for the budget when there is one (with torch's thread count measured), and train."""
    with contextlib.ExitStack() as stack:
        return _train(request, display, say, stack)


def _train(request: TrainRequest, display: Optional[Callback], say: Say, stack: contextlib.ExitStack) -> RunOutcome:
    budget = parse_duration(request.budget) if request.budget else None
    planned = budget is not None and request.preset is None
    configs = default_configs(request.preset or DEFAULT_PRESET, request.data, request.cache_dir)
    if request.seq_len is not None or planned:
        seq_len = request.seq_len if request.seq_len is not None else sequence_length(budget)
        configs["trainer"] = dataclasses.replace(configs["trainer"], max_seq_len=seq_len)
    if request.batch_size is not None:
        configs["trainer"] = dataclasses.replace(configs["trainer"], batch_size=request.batch_size)
    if request.config_file:
        configs = load_config_file(request.config_file, configs)
    configs = apply_overrides(configs, request.overrides)
    if not planned:  # a model that cannot fit is refused before any work (the planner sizes its own)
        check_memory(configs["model"], True, configs["trainer"].max_seq_len, resolve_device(configs["trainer"]).type)
    if request.name and _is_writer(configs["trainer"].distributed):  # refuse an existing run before any work
        check_new_run_dir(new_run_dir(request.out, configs["trainer"], request.name), request.overwrite)
    if configs["trainer"].distributed:
        if planned:
            raise ConfigError("--budget plans on one process; under torchrun pass --preset NAME (the budget then "
                              "sets the deadline) or a planned configuration from `plan --budget B --json`")
        start_distributed(configs["trainer"])
    prepared = prepare_data(configs["data"], configs["trainer"].max_seq_len, say=say, progress=display)
    configs["data"] = prepared.config or configs["data"]
    stop_at, estimate, finish_s = None, None, 0.0
    if planned:
        trainer_config = configs["trainer"]
        the_plan = plan_prepared(budget, prepared, trainer_config, configs["data"].cache_dir,
                                 spent=lambda: since_launch(request.started), remeasure=request.remeasure, say=say,
                                 progress=display)
        estimate = the_plan.estimate
        stack.enter_context(threads_set(estimate.threads))  # the thread count the plan measured fastest
        say(the_plan.describe())
        planned_configs = {"model": the_plan.model, "trainer": the_plan.trainer, "data": configs["data"]}
        if request.batch_size is not None:
            planned_configs["trainer"] = dataclasses.replace(the_plan.trainer, batch_size=request.batch_size)
        configs = apply_overrides(planned_configs, request.overrides)  # what the user set explicitly wins
        if the_plan.trainer.time_limit_s:  # a fixed few steps have no deadline
            # The deadline counts from launch: planning that took longer than the plan allowed for (measuring
            # threads on a busy machine) comes out of training, not past the budget. The finishing costs follow.
            stop_at = time.time() - since_launch(request.started) + budget - the_plan.reserve_s
            finish_s = the_plan.reserve_s
    elif budget is not None:  # a fixed model under the budget's deadline
        spent = since_launch(request.started)
        remaining = budget - spent - FINISH_RESERVE_S
        if remaining < 1.0:
            raise ConfigError(f"a budget of {request.budget} leaves no time to train after start-up and data "
                              f"preparation ({spent:.0f} s); give at least {spent + FINISH_RESERVE_S + 5:.0f}s")
        configs["trainer"] = dataclasses.replace(configs["trainer"], time_limit_s=remaining, schedule_by="time",
                                                 num_epochs=0, eval_steps=4, use_epoch_checkpoints=False)
        stop_at = time.time() + remaining
        finish_s = FINISH_RESERVE_S
    if estimate is not None and configs["trainer"] != the_plan.trainer:  # overrides changed the run: the real speed tells
        estimate = None
    run_dir = new_run_dir(request.out, configs["trainer"], request.name)
    return train_prepared(configs, prepared, run_dir, display, stop_at, request.overwrite, estimate, finish_s)


@contextlib.contextmanager
def threads_set(threads: Optional[int]) -> Iterator[None]:
    """Torch's thread count at `threads` while the block runs (None: as it is)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def settle_precision(trainer_config: TrainerConfig, cache_dir: Optional[str], remeasure: bool = False,
                     say: Say = _quiet) -> Optional[CpuPrecision]:
    """The precision `use_dtype="auto"` trains in on this CPU, decided for this process
    before anything resolves it: cached next to the planner's probes, or measured and
    cached (`budget.precision`); said through `say`. None when the config
    names a precision or trains on CUDA."""
    if trainer_config.use_dtype != "auto" or resolve_device(trainer_config).type != "cpu":
        return None
    choice = precision(HardwareProfile.detect("cpu"), cache_dir, remeasure)
    say(f"precision: {choice.describe()}")
    return choice


def plan_prepared(budget_s: float, prepared: PreparedData, trainer_config: TrainerConfig, cache_dir: str,
                  whole_run: bool = True, remeasure: bool = False,
                  measure_chosen: bool = False, say: Say = _quiet, progress: Optional[Callback] = None,
                  spent: Optional[Callable[[], float]] = None) -> Plan:
    """The plan for `budget_s` on prepared data, as every front end makes it: at torch's
    thread count chosen by measurement (which the plan's estimate carries, so training uses
    it too), from cached or fresh probes. `whole_run=False` (the wizard) budgets training
    alone. `measure_chosen` then times a few steps of the chosen model at its micro-batch
    when they are quick, so the estimate is measured rather than interpolated. `spent`
    (the seconds since launch) is read once the thread count is measured, so that
    measurement counts against the budget too (none: nothing spent). `Progress` events of
    the throughput probes go to `progress`."""
    device = resolve_device(trainer_config).type
    settle_precision(trainer_config, cache_dir, remeasure, say)
    dtype = resolve_dtype(trainer_config, torch.device(device))  # what the run will train in: what is timed
    with chosen_threads(device, say, dtype):
        spent_seconds = spent() if spent is not None else 0.0
        hardware = HardwareProfile.detect(device)
        the_plan = plan(budget_s, hardware, prepared.report.train_tokens, len(prepared.tokenizer),
                        spent_seconds=spent_seconds, cache_dir=cache_dir, seq_len=trainer_config.max_seq_len,
                        whole_run=whole_run, remeasure=remeasure, progress=progress, dtype=dtype)
        t = the_plan.trainer
        step_s = t.tokens_per_step / the_plan.tokens_per_second
        if measure_chosen and step_s <= MEASURE_STEP_LIMIT_S and \
                training_memory(the_plan.model, t.batch_size, t.max_seq_len) < 0.6 * hardware.memory_bytes:
            rate = 1.0 / measure(fit_model_to_data(the_plan.model, t, prepared), t.batch_size, t.max_seq_len, device,
                                 seconds=min(1.0, 4 * step_s), dtype=dtype)
            estimate = estimate_run(t, len(prepared.train), rate, "measured",
                                    f"3+ steps of this model at micro-batch {t.batch_size}", the_plan.estimate.threads)
            the_plan = dataclasses.replace(the_plan, estimate=estimate)
    return the_plan


MEASURE_STEP_LIMIT_S = 1.0  # a step longer than this (by the estimate) is not timed before training: too slow


def estimate_training(configs: dict, prepared: PreparedData, measured: Optional[dict] = None) -> Estimate:
    """The one estimate of training `configs` (model, trainer) on prepared data, shown by
    the start summary and the live display alike: the throughput of this model at its
    micro-batch and precision, measured with a few real training steps at torch's thread
    count chosen by measurement; from the planner's probes instead (interpolated) when the
    step would not fit in memory to measure. `measured` caches the figures by shape."""
    trainer_config = configs["trainer"]
    model_config = fit_model_to_data(configs["model"], trainer_config, prepared)
    device = resolve_device(trainer_config)
    settle_precision(trainer_config, prepared_cache(prepared))
    dtype = resolve_dtype(trainer_config, device)
    batch, seq_len = trainer_config.batch_size, trainer_config.max_seq_len
    measured = {} if measured is None else measured
    key = (json.dumps(model_config.to_dict(), sort_keys=True), batch, seq_len, str(dtype), device.type)
    if key not in measured:
        threads = best_thread_count(device.type, dtype=dtype)[0] if device.type == "cpu" else None
        with threads_set(threads):
            hardware = HardwareProfile.detect(device.type)
            if training_memory(model_config, batch, seq_len) < 0.8 * hardware.memory_bytes:
                with torch.random.fork_rng(devices=[0] if device.type == "cuda" else []):
                    rate = 1.0 / measure(model_config, batch, seq_len, device.type, seconds=1.0, dtype=dtype)
                measured[key] = (rate, "measured", f"3+ steps of this model at micro-batch {batch}", threads)
            else:
                probes, cached = probe(hardware, model_config.vocab_size, seq_len, 2, 0.3, prepared_cache(prepared),
                                       dtype=dtype)
                rate = 1.0 / CostModel.fit(probes).seconds_per_token(model_config.flops_per_token(seq_len))
                measured[key] = (rate, "interpolated", "the planner's probes: the step does not fit in memory to "
                                                       "measure it", threads)
    rate, basis, detail, threads = measured[key]
    return estimate_run(trainer_config, len(prepared.train), rate, basis, detail, threads)


def prepared_cache(prepared: PreparedData) -> Optional[str]:
    return prepared.config.cache_dir if prepared.config is not None else None


@contextlib.contextmanager
def chosen_threads(device: str, say: Say = _quiet, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Torch's thread count by measurement on a CPU (in `dtype`, default: the precision
    training picks) while the block runs (1 thread beats all cores when other processes
    hold them); the caller's count afterwards."""
    before = torch.get_num_threads()
    threads, timings = best_thread_count(device, dtype=dtype)
    if len(timings) > 1:
        rates = ", ".join(f"{n} thread{'s' if n > 1 else ''} {1 / t:,.0f}" for n, t in sorted(timings.items()))
        say(f"torch threads: {threads} (measured tokens/s: {rates})")
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plan_budget(budget: str, data: str = BUILTIN, cache_dir: str = DEFAULT_CACHE,
                overrides: Optional[list[str]] = None, say: Say = _quiet, started: Optional[float] = None,
                remeasure: bool = False, progress: Optional[Callback] = None) -> Plan:
    """The configuration planned for `budget` on this machine and data, without training
    (what the data turned out to be, e.g. the built-in corpus when the hub is unreachable,
    goes through `say`); `Progress` events of the data preparation go to `progress`."""
    seconds = parse_duration(budget)
    data_config = apply_overrides({"data": DataConfig(source=data, cache_dir=cache_dir)}, overrides or [])["data"]
    prepared = prepare_data(data_config, sequence_length(seconds), say=say, progress=progress)
    return plan_prepared(seconds, prepared, TrainerConfig(max_seq_len=sequence_length(seconds)), data_config.cache_dir,
                         spent=lambda: since_launch(started), remeasure=remeasure, say=say, progress=progress)


def start_distributed(trainer_config: TrainerConfig) -> None:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs)."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        flag = "trainer.use_fsdp" if trainer_config.use_fsdp else "trainer.use_ddp"
        raise ConfigError(f"{flag}=yes needs several processes: launch with {trainer_config.launch_hint} "
                          f"(a run saved that way resumes on one process with {flag}=no)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


# ---- fine-tuning ------------------------------------------------------------------------------
@dataclass
class FinetuneRequest:
    """`finetune`: LoRA / QLoRA on instruction data. `lora` (the wizard's LoRA table)
    replaces `rank` / `qlora`. With a `budget` the micro-batch, the steps and the schedule
    are planned from measurements of the base on this device; else `epochs` end the run.
    The guard (on unless `general_data` is None) keeps the best checkpoint that improves
    the task while perplexity on held-out general text rises by at most `max_general_rise`."""

    base: str
    data: str
    rank: int = LoRAConfig.rank
    qlora: bool = False
    merge: bool = False
    epochs: int = 3
    budget: Optional[str] = None  # 90s, 5m, 1h
    batch_size: Optional[int] = None  # default 8 (with a budget: planned)
    seq_len: Optional[int] = None  # default: the data's longest record, within the base's context
    general_data: Optional[str] = BUILTIN
    max_general_rise: float = 0.05
    replay: float = FINETUNE_REPLAY  # general-text target tokens trained on per task target token
    out: Optional[str] = None
    name: Optional[str] = None
    cache_dir: str = DEFAULT_CACHE
    overrides: list[str] = field(default_factory=list)
    lora: Optional[LoRAConfig] = None
    overwrite: bool = False
    started: Optional[float] = None  # when the budget's clock started (a time.time()); None: process start


@dataclass
class Comparison:
    """A fine-tuned model against its base: loss on the task's validation split and
    perplexity on held-out general text, and whether the change is within the guard."""

    base: str
    tuned: str
    task_data: str
    base_task_loss: float
    tuned_task_loss: float
    general_data: Optional[str] = None
    base_general_loss: Optional[float] = None
    tuned_general_loss: Optional[float] = None
    max_general_rise: float = 0.05
    checkpoint: Optional[str] = None  # the fine-tune's checkpoint compared
    general_limit: Optional[float] = None  # the highest general-text loss within the guard

    def __post_init__(self) -> None:
        if self.general_limit is None and self.base_general_loss is not None:
            self.general_limit = guard_limit(self.base_general_loss, self.max_general_rise)

    @property
    def general_rise(self) -> Optional[float]:
        if self.base_general_loss is None or self.tuned_general_loss is None:
            return None
        return math.exp(self.tuned_general_loss - self.base_general_loss) - 1.0

    @property
    def improved_task(self) -> bool:
        return self.tuned_task_loss < self.base_task_loss

    @property
    def within_guard(self) -> Optional[bool]:
        if self.tuned_general_loss is None or self.general_limit is None:
            return None
        return self.improved_task and self.tuned_general_loss <= self.general_limit

    def rows(self) -> list[tuple[str, float, float, float]]:
        """(measure, base, fine-tuned, change as a fraction of the base)."""
        rows = [("task loss", self.base_task_loss, self.tuned_task_loss),
                ("task perplexity", perplexity(self.base_task_loss), perplexity(self.tuned_task_loss))]
        if self.general_rise is not None:
            rows.append(("general perplexity", perplexity(self.base_general_loss),
                         perplexity(self.tuned_general_loss)))
        return [(name, base, tuned, tuned / base - 1.0) for name, base, tuned in rows]

    def verdict(self) -> str:
        if self.within_guard is None:
            return f"task loss {'improved' if self.improved_task else 'did not improve'} (no general-text measure)"
        if self.within_guard:
            return (f"within the guard: the task improved and general perplexity changed {self.general_rise:+.1%} "
                    f"(limit +{self.max_general_rise:.0%})")
        why = [] if self.improved_task else ["the task did not improve"]
        if self.tuned_general_loss > self.general_limit:
            why.append(f"general perplexity rose {self.general_rise:+.1%} (limit +{self.max_general_rise:.0%})")
        return "NOT within the guard: " + " and ".join(why)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "general_rise": self.general_rise, "within_guard": self.within_guard}


GUARD_SEQUENCES = 8  # general-text sequences per guard evaluation
GUARD_SEQ_LEN = 256
FINETUNE_EXIT_S = 5.0  # after the sample: the adapter, the loss plot, the report and the interpreter's exit
NF4_EVAL_SLOWDOWN = 1.3  # an evaluation through NF4 layers vs the base's, for planning (measured on CPU: ~1.2x)


def general_text(source: str, tokenizer, cache_dir: str, context_len: int) -> PackedBlocks:
    """Held-out general text for the guard, tokenized for the base: the first documents
    `source`'s validation split holds out."""
    return held_out_text(DataConfig(source=source, cache_dir=cache_dir, format="text"), tokenizer,
                         min(GUARD_SEQ_LEN, context_len), GUARD_SEQUENCES)


def finetune(request: FinetuneRequest, display: Optional[Callback] = None, say: Say = _quiet) -> RunOutcome:
    """Load the base, size the sequence from the data, measure the base (the guard), plan
    the budget when there is one (with torch's thread count measured), and fine-tune."""
    with contextlib.ExitStack() as stack:
        return _finetune(request, display, say, stack)


def _finetune(request: FinetuneRequest, display: Optional[Callback], say: Say,
              stack: contextlib.ExitStack) -> RunOutcome:
    budget = parse_duration(request.budget) if request.budget else None
    if not 0 <= request.max_general_rise < 10:
        raise ConfigError(f"max general rise {request.max_general_rise}: a fraction such as 0.05 (+5%)")
    model, tokenizer = load_base(request.base)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"{request.base}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                          f"{model.config.vocab_size}: they do not belong together")
    if template_note(tokenizer):
        say(f"note: {template_note(tokenizer)}")
    configs = {"model": model.config,
               "trainer": TrainerConfig(max_seq_len=min(TrainerConfig().max_seq_len, model.config.context_len),
                                        num_epochs=request.epochs, batch_size=request.batch_size or FINETUNE_BATCH,
                                        **FINETUNE_TRAINER),
               "data": DataConfig(source=request.data, cache_dir=request.cache_dir, format="instruction"),
               "lora": request.lora or LoRAConfig(rank=request.rank, alpha=FINETUNE_ALPHA_PER_RANK * request.rank,
                                                  quantize_base=request.qlora)}
    configs = apply_overrides(configs, request.overrides)
    if configs["model"] != model.config:
        raise ConfigError("a fine-tune keeps its base model's shape; model.* settings cannot change")
    trainer_config, data_config, lora_config = configs["trainer"], configs["data"], configs["lora"]
    if trainer_config.use_fsdp:
        raise ConfigError("trainer.use_fsdp: a fine-tune trains small adapters and runs on one process or under DDP "
                          "(trainer.use_ddp=yes); FSDP shards models trained whole")
    if request.name and _is_writer(trainer_config.distributed):
        check_new_run_dir(new_run_dir(request.out, trainer_config, request.name), request.overwrite)
    seq_len = request.seq_len or (trainer_config.max_seq_len if _overridden(request.overrides, "trainer.max_seq_len")
                                  else None)
    if seq_len is None:  # from the data: nothing cut silently
        lengths = instruction_lengths(data_config, tokenizer)
        seq_len, cut = finetune_seq_len(lengths, model.config.context_len)
        say(f"sequence length {seq_len}, from the data: records of {min(lengths)}-{max(lengths)} tokens"
            + (f"; {cut} longer than {seq_len + 1} (the model's context or the outliers) are cut"
               f"{' (data.overlong=drop skips them)' if data_config.overlong == 'truncate' else ''}" if cut else ""))
    trainer_config = dataclasses.replace(trainer_config, max_seq_len=seq_len)
    if trainer_config.max_seq_len > model.config.context_len:
        raise ConfigError(f"trainer.max_seq_len={trainer_config.max_seq_len} exceeds the base model's context "
                          f"({model.config.context_len})")
    prepared = prepare_data(data_config, trainer_config.max_seq_len, tokenizer=tokenizer, fallback_to_builtin=False,
                            say=say, progress=display)
    task_val = first_samples(prepared.val, FINETUNE_VAL_SAMPLES)  # every evaluation reads these, whole
    general, replay = None, None
    if request.general_data:
        say(f"reading held-out general text from {request.general_data} for the guard ...")
        general = general_text(request.general_data, tokenizer, request.cache_dir, model.config.context_len)
        if request.replay > 0:
            replay = _replay_info(request.general_data, request.replay, prepared.train)
            prepared = _with_replay(prepared, replay, tokenizer, request.cache_dir)
            say(f"replaying general text with the task: {replay['per_epoch']} blocks of {prepared.train.seq_len} tokens "
                f"an epoch beside {replay['task_samples']} task samples ({request.replay:g} general target tokens per "
                f"task target token), fresh each epoch from {replay['pool']} blocks of {request.general_data}'s "
                f"training side")
    device = resolve_device(trainer_config)
    settle_precision(trainer_config, request.cache_dir, say=say)
    dtype = resolve_dtype(trainer_config, device)
    if budget is not None:
        stack.enter_context(chosen_threads(device.type, say, dtype))
    model.to(device)
    eval_started = time.perf_counter()  # the base as the user has it (before NF4): what the guard compares with
    base_task = evaluate(model, task_val, trainer_config.batch_size, None, device, dtype)
    guard = None
    if general is not None:
        base_general = evaluate(model, general, GUARD_SEQUENCES, 1, device, dtype)
        guard = Guard(general, base_general, base_task, request.max_general_rise, GUARD_SEQUENCES, 1,
                      request.general_data)
        say(f"base model: task validation loss {base_task:.3f}, general-text perplexity "
            f"{perplexity(base_general):.2f} ({len(general)} x {general.seq_len} tokens of {request.general_data}); "
            f"the guard keeps checkpoints within +{request.max_general_rise:.0%}")
    else:
        say(f"base model: task validation loss {base_task:.3f}; no general-text guard (--general-data none) and "
            f"no general text replayed")
    eval_seconds = time.perf_counter() - eval_started
    if lora_config.quantize_base:  # NF4 layers dequantize as they run: slower than the base just measured
        eval_seconds *= NF4_EVAL_SLOWDOWN
    model.to("cpu")
    apply_lora(model, lora_config)
    counts = parameter_report(model)
    say(f"LoRA rank {lora_config.rank}, alpha {lora_config.alpha:g}: {counts['trainable']:,} trainable of "
        f"{counts['total']:,} parameters ({counts['share']:.2%})"
        f"{'; base in 4-bit NF4 (QLoRA)' if lora_config.quantize_base else ''}")
    stop_at = None
    if budget is not None:
        the_plan = _plan_finetune(request, budget, model, prepared, trainer_config, eval_seconds, device, dtype)
        say(the_plan.describe())
        # The budget is used whole: the schedule anneals on the clock and the kept checkpoint is the best
        # guarded one whenever it came (early stopping ends runs by epochs only).
        planned = {**configs, "trainer": dataclasses.replace(trainer_config, **the_plan.trainer_settings(),
                                                             early_stopping_patience=0)}
        trainer_config = apply_overrides(planned, request.overrides)["trainer"]  # what the user set wins
        stop_at = time.time() + the_plan.train_seconds
    run_dir = new_run_dir(request.out, trainer_config, request.name, prefix="finetune")
    with new_run(run_dir, request.overwrite, trainer_config.distributed) as moved:
        if moved:
            say(f"the run that was in {run_dir} is now in {moved}")
        trainer_config = dataclasses.replace(trainer_config,
                                             eval_steps=math.ceil(len(task_val) / trainer_config.batch_size))
        if guard is not None and not trainer_config.eval_interval:  # by epochs: the guard looks 4 times an epoch
            steps_per_epoch = math.ceil(len(prepared.train) / trainer_config.batch_size /
                                        trainer_config.accumulation_steps)
            trainer_config = dataclasses.replace(trainer_config, eval_interval=max(1, math.ceil(steps_per_epoch / 4)))
        if stop_at is not None:
            trainer_config = dataclasses.replace(trainer_config, time_limit_s=max(1.0, stop_at - time.time()))
        trainer = Trainer(model, trainer_config, prepared.train, task_val, run_dir=run_dir, adapter_only=True,
                          guard=guard)
        if trainer.is_main:
            info = run_info(model.config, trainer_config, data_config,
                            finetune={"base": str(Path(request.base).resolve()), "lora": lora_config.to_dict(),
                                      "guard": _guard_info(request, guard), "replay": replay})
            create_run(run_dir, info, tokenizer)
        result = _fit(trainer, display)
        return _finish_finetune(trainer, result, run_dir, tokenizer, lora_config, request.base, request.merge,
                                prepared, request.data)


def _replay_info(source: str, ratio: float, task: MaskedSamples) -> dict:
    """How much general text a fine-tune replays: enough blocks an epoch for `ratio` general
    target tokens per task target token (answers only are targets in the task's samples),
    from a pool of up to REPLAY_POOL_EPOCHS epochs' worth (REPLAY_POOL_TOKENS at most)."""
    if not 0 <= ratio <= 100:
        raise ConfigError(f"replay {ratio}: general target tokens per task target token, e.g. 1 (0 turns it off)")
    task_tokens = int((task.targets != -100).sum())
    per_epoch = max(1, math.ceil(ratio * task_tokens / task.seq_len))
    pool = max(per_epoch, min(REPLAY_POOL_EPOCHS * per_epoch, REPLAY_POOL_TOKENS // (task.seq_len + 1)))
    return {"general_data": source, "ratio": ratio, "task_samples": len(task), "per_epoch": per_epoch, "pool": pool}


def _with_replay(prepared: PreparedData, replay: dict, tokenizer, cache_dir: str) -> PreparedData:
    """`prepared` with the general text `replay` describes after its training samples (the
    same blocks every time: a resumed run trains on what it started with). A source with
    less text than the pool asked for replays what it has; `replay` is updated to say so."""
    config = DataConfig(source=replay["general_data"], cache_dir=cache_dir, format="text")
    pool = training_side_text(config, tokenizer, prepared.train.seq_len, int(replay["pool"]))
    pool = PackedBlocks(pool.tokens[:int(replay["pool"])], pool.seq_len)
    replay.update(pool=len(pool), per_epoch=min(int(replay["per_epoch"]), len(pool)))
    return dataclasses.replace(prepared, train=WithGeneralText(prepared.train, pool, replay["per_epoch"]))


def first_samples(dataset: MaskedSamples, count: int) -> MaskedSamples:
    return dataset if len(dataset) <= count else MaskedSamples(dataset.inputs[:count], dataset.targets[:count])


def _overridden(overrides: list[str], key: str) -> Optional[str]:
    values = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0].strip() == key]
    return values[-1] if values else None


def _guard_info(request: FinetuneRequest, guard: Optional[Guard]) -> Optional[dict]:
    if guard is None:
        return None
    return {"general_data": request.general_data, "max_general_rise": guard.max_rise,
            "base_general_loss": guard.base_loss, "base_task_loss": guard.base_task_loss,
            "sequences": min(guard.batch_size, len(guard.data)), "seq_len": guard.data.seq_len}


def _rebuild_guard(info: dict, tokenizer, cache_dir: str, context_len: int) -> Optional[Guard]:
    """A resumed fine-tune's guard, from the base figures its run.json recorded."""
    saved = (info.get("finetune") or {}).get("guard")
    if not isinstance(saved, dict):
        return None
    try:
        source = str(saved["general_data"])
        figures = [float(saved[key]) for key in ("base_general_loss", "base_task_loss", "max_general_rise")]
    except (KeyError, TypeError, ValueError):
        raise ConfigError("run.json: the fine-tune's guard needs general_data, base_general_loss, base_task_loss "
                          "and max_general_rise") from None
    return Guard(general_text(source, tokenizer, cache_dir, context_len), *figures, GUARD_SEQUENCES, 1, source)


def _plan_finetune(request: FinetuneRequest, budget: float, model: Transformer, prepared: PreparedData,
                   trainer_config: TrainerConfig, eval_seconds: float, device: torch.device,
                   dtype: torch.dtype) -> FinetunePlan:
    """Measure training steps of the LoRA model at the micro-batches the plan may choose
    (largest first, halving while too few steps would fit) and plan the budget."""
    model.to(device)
    samples = len(prepared.train)
    batch = min(request.batch_size or FINETUNE_BATCH, samples)
    measured: dict[int, float] = {}
    began = time.perf_counter()  # the end-of-run answer: 4 tokens measured, 60 generated then
    held_out_answer(model, prepared.tokenizer, prepared.val, None, max_new_tokens=4)
    sample_s = (time.perf_counter() - began) * 15
    merge_s = 12 * model.config.num_params() / 200e6 if request.merge else 0.0
    finish = eval_seconds + sample_s + merge_s + FINETUNE_EXIT_S  # the last evaluation, the sample, saving, exit
    while True:
        measured[batch] = measure_step(model, prepared.train, batch, device, dtype)
        left = budget - since_launch(request.started) - finish
        if batch == 1 or request.batch_size or enough_steps(left, measured[batch]):
            break
        batch = max(1, batch // 2)
    try:
        return plan_finetune(budget, since_launch(request.started), samples, trainer_config.max_seq_len,
                             eval_seconds, measured, finish)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def held_out_answer(model: Transformer, tokenizer, val, stop: Optional[int], max_new_tokens: int = 60,
                    temperature: float = 0.0) -> tuple[str, str]:
    """(instruction, answer) for the first validation sample: its prompt as the chat
    template renders it, and the model's answer alone (greedy unless `temperature`)."""
    inputs, targets = val.batch(np.arange(1))
    answer_at = int((targets[0] != -100).nonzero()[0])  # the first answer token is predicted here
    prompt = inputs[0, :answer_at + 1].tolist()
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens, temperature=temperature,
                         eos_token_id=stop)
    new = out[0, len(prompt):].tolist()
    if stop is not None and stop in new:
        new = new[:new.index(stop)]
    return _instruction_text(tokenizer, tokenizer.decode(prompt)), tokenizer.decode(new, skip_special_tokens=True).strip()


def _instruction_text(tokenizer, rendered: str) -> str:
    """The user's message out of a rendered prompt (the template's text around it removed)."""
    marker = "\x00"
    template = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    before, _, after = template.partition(marker)
    start = rendered.rfind(before) + len(before) if before and before in rendered else 0
    end = rendered.rfind(after) if after and rendered.endswith(after) else len(rendered)
    return rendered[start:end].strip()


def _finish_finetune(trainer: Trainer, result: TrainResult, run_dir: Path, tokenizer, lora_config: LoRAConfig,
                     base: str, merge: bool, prepared: Optional[PreparedData] = None,
                     data: Optional[str] = None) -> RunOutcome:
    """The adapter of the best guarded checkpoint (else the last state), the comparison
    with the base, the merged model when asked, and a held-out instruction's answer."""
    notes, comparison, guard = [], None, trainer.guard
    state = trainer.state
    if trainer.is_main and result.status != "interrupted":
        if guard is not None:
            kept = state.best_checkpoint
            if kept is not None and kept != trainer.last_checkpoint:
                model_state, _, _ = checkpoint.load(run_dir / kept, with_optimizer=False)
                trainer.model.load_state_dict(model_state, strict=False)
            comparison = Comparison(str(base), str(run_dir), data or "", guard.base_task_loss,
                                    state.best_val_loss if kept else trainer.last_eval[0], guard.source,
                                    guard.base_loss, state.best_general_loss if kept else trainer.last_eval[1],
                                    guard.max_rise, kept or trainer.last_checkpoint, guard.limit)
            if kept is None:
                notes.append(f"no checkpoint met the guard (task better than the base, general perplexity within "
                             f"+{guard.max_rise:.0%}): the adapter saved is the last state. Lower "
                             f"trainer.learning_rate or the rank, or shorten the run")
            else:
                notes.append(f"kept checkpoint {kept} (step {checkpoint.read_state(run_dir / kept)['global_step']}), "
                             f"the best within the guard")
                last_task, last_general = trainer.last_eval
                if last_task is not None and last_general is not None and last_task < state.best_val_loss \
                        and last_general > guard.limit:  # say what the guard gave up
                    notes.append(f"the last evaluation reached task loss {last_task:.3f} (kept: "
                                 f"{state.best_val_loss:.3f}) at general perplexity {guard.rise(last_general):+.1%}, "
                                 f"over the guard; `python train.py eval {run_dir} --checkpoint "
                                 f"{trainer.last_checkpoint} --compare {base}` measures that state the same way")
        adapter = save_adapter(trainer.model, run_dir / "adapter", lora_config, base_model=str(base))
        notes.append(f"adapter saved to {adapter} (PEFT format)")
        merged = None
        if merge:
            merged = merge_and_save(trainer.model, run_dir / "merged", tokenizer)
            notes.append(f"merged model saved to {merged} (Hugging Face layout)")
        _record(run_dir, comparison, adapter, merged)
    if trainer.config.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    outcome = RunOutcome(result, run_dir, trainer.is_main, notes, comparison=comparison)
    if trainer.is_main and result.status not in ("interrupted", "nonfinite") and prepared is not None \
            and len(prepared.val):
        outcome.sample_prompt, outcome.sample = held_out_answer(trainer.model, tokenizer, prepared.val,
                                                                answer_stop(tokenizer))
    return outcome


def _record(run_dir: Path, comparison: Optional[Comparison], adapter: Path, merged: Optional[Path]) -> None:
    """What the fine-tune wrote and the guard's outcome, in run.json's finetune section."""
    info = read_run_info(run_dir)
    info["finetune"].update(adapter=str(adapter), merged=str(merged) if merged else None)
    if comparison is not None:
        info["finetune"]["result"] = comparison.to_dict()
    _write_atomic(run_dir / "run.json", json.dumps(info, indent=2) + "\n")


def load_base(base: str) -> tuple[Transformer, object]:
    """A base model and its tokenizer: a Sprat run directory (its latest checkpoint), a
    Llama-architecture directory saved by `transformers`, or a llama `.gguf` file."""
    path = Path(base)
    if (path / "run.json").exists() and read_run_info(path).get("finetune"):
        raise ConfigError(f"{path} is a fine-tuning run; fine-tune its merged model (finetune --merge) instead")
    loaded = load_trained(path)
    return loaded.model, loaded.tokenizer


def _rebuild_finetune(info: dict) -> tuple[Transformer, object, LoRAConfig]:
    """A fine-tuning run's model before its adapter weights: the base with LoRA layers."""
    model, tokenizer = load_base(info["finetune"]["base"])
    lora_config = LoRAConfig.from_dict(info["finetune"]["lora"])
    apply_lora(model, lora_config)
    return model, tokenizer, lora_config


# ---- resume -----------------------------------------------------------------------------------
@dataclass
class ResumeRequest:
    run_dir: str | Path
    checkpoint: Optional[str] = None  # default: the latest complete one
    overrides: list[str] = field(default_factory=list)  # trainer / data settings; not the model's shape


def resume(request: ResumeRequest, display: Optional[Callback] = None, say: Say = _quiet) -> RunOutcome:
    run_dir = Path(request.run_dir)
    info = read_run_info(run_dir)
    saved = run_configs(info, run_dir)
    configs = apply_overrides(saved, request.overrides)
    reshaped = [f"model.{name}" for name, value in configs["model"].to_dict().items()
                if name not in RUNTIME_MODEL_FIELDS and value != getattr(saved["model"], name)]
    if reshaped:
        raise ConfigError(f"the model of a run cannot change on resume ({', '.join(reshaped)}: its checkpoints hold "
                          f"that model); start a new run instead")
    finetuned = bool(info.get("finetune"))
    if finetuned and configs["trainer"].use_fsdp:
        raise ConfigError("trainer.use_fsdp: a fine-tune runs on one process or under DDP (trainer.use_ddp=yes)")
    if configs["trainer"].distributed:
        start_distributed(configs["trainer"])
    if finetuned:
        model, tokenizer, lora_config = _rebuild_finetune(info)
    else:
        check_memory(configs["model"], True, configs["trainer"].max_seq_len, resolve_device(configs["trainer"]).type)
        model, tokenizer = Transformer(configs["model"]), load_tokenizer_dir(run_dir)
    if configs["trainer"].max_seq_len > model.config.context_len:
        raise ConfigError(f"trainer.max_seq_len={configs['trainer'].max_seq_len} exceeds the model's context "
                          f"({model.config.context_len})")
    prepared = prepare_data(configs["data"], configs["trainer"].max_seq_len, tokenizer=tokenizer,
                            fallback_to_builtin=False, say=say, progress=display)
    val, guard = prepared.val, None
    if finetuned:
        recorded = info["finetune"].get("replay")
        if recorded:
            rebuilt = dict(recorded)
            prepared = _with_replay(prepared, rebuilt, tokenizer, configs["data"].cache_dir)
            if rebuilt != recorded:
                raise ConfigError(f"{recorded['general_data']} holds less text than when {run_dir} started "
                                  f"({rebuilt['pool']} blocks, not {recorded['pool']}): the replayed text would "
                                  f"differ, so the run cannot resume exactly")
        val = first_samples(prepared.val, FINETUNE_VAL_SAMPLES)
        guard = _rebuild_guard(info, tokenizer, configs["data"].cache_dir, model.config.context_len)
    settle_precision(configs["trainer"], configs["data"].cache_dir)  # (a run keeps its own: the trainer's restore)
    trainer = Trainer(model, configs["trainer"], prepared.train, val, run_dir=run_dir, adapter_only=finetuned,
                      guard=guard)
    distributed = configs["trainer"].distributed
    with _owning(run_dir, distributed):
        for name in checkpoint.clean_stale(run_dir) if _is_writer(distributed) else []:
            say(f"removed {name}, left by a save that did not finish")
        path, *saved_state = checkpoint.load_latest(run_dir, request.checkpoint, on_skip=say)
        _attach(trainer, display).restore(path, *saved_state)  # its events reach the sinks
        say(f"resuming {run_dir} from {path.name} (step {trainer.global_step})")
        done = trainer.done_reason()
        if done is not None:
            result = TrainResult(done, trainer.global_step, trainer.loader.epoch, None, trainer.state.best_val_loss,
                                 path.name, 0.0, trainer.state.tokens_seen)
            limit = {"max_steps": "trainer.max_steps", "deadline": "trainer.time_limit_s",
                     "finished": "trainer.num_epochs or trainer.max_steps"}[done]
            return RunOutcome(result, run_dir, trainer.is_main,
                              [f"{run_dir} had already ended ({done}) at step {trainer.global_step}: nothing was "
                               f"trained. To train on, raise {limit}, e.g. `python train.py resume {run_dir} "
                               f"{limit.split()[0]}=...`"])
        result = trainer.fit()
        if finetuned:  # the adapter is written while the run is still owned
            return _finish_finetune(trainer, result, run_dir, tokenizer, lora_config, info["finetune"]["base"], False,
                                    prepared, configs["data"].source)
    return _outcome(trainer, result, run_dir, tokenizer, sample_prompt(prepared))


# ---- trained models: load, generate, evaluate, export ---------------------------------------
@dataclass
class Loaded:
    """A trained model ready to use, and where it came from."""

    model: Transformer
    tokenizer: object
    source: Path
    kind: str  # pretrained | finetuned | huggingface | gguf
    checkpoint: Optional[str] = None
    info: Optional[dict] = None


def load_trained(path: str | Path, checkpoint_name: Optional[str] = None, say: Say = _quiet) -> Loaded:
    """The model of a Sprat run directory (its latest or a named checkpoint; fine-tuning
    runs rebuild their base and add the adapter), of one of its checkpoint directories, of
    a Hugging Face Llama/Mixtral directory, or of a llama `.gguf` file. The checkpoint is
    verified once, as it is read."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such run or model directory, nor .gguf file")
    if path.is_file() and path.suffix.lower() == ".gguf":
        model, tokenizer = load_gguf(path)
        return Loaded(model, tokenizer, path, "gguf")
    if (path / checkpoint.MANIFEST_FILE).exists() and (path.parent / "run.json").exists():  # a checkpoint directory
        path, checkpoint_name = path.parent, path.name
    if (path / "run.json").exists():
        info = read_run_info(path)
        if info.get("finetune"):
            kept = (info["finetune"].get("result") or {}).get("checkpoint")
            if checkpoint_name is None and isinstance(kept, str) and (path / kept).is_dir():
                checkpoint_name = kept  # the state the guard kept, which the adapter holds
                say(f"using {kept}, the checkpoint the fine-tune's guard kept (--checkpoint NAME for another)")
            model, tokenizer, _ = _rebuild_finetune(info)
            found, model_state, _, _ = checkpoint.load_latest(path, checkpoint_name, on_skip=say, with_optimizer=False)
            result = model.load_state_dict(model_state, strict=False)
            if result.unexpected_keys:
                raise ConfigError(f"{found} does not fit the model rebuilt from {info['finetune']['base']}")
            return Loaded(model, tokenizer, path, "finetuned", found.name, info)
        model_config = run_configs(info, path)["model"]
        check_memory(model_config, False, device=resolve_device(TrainerConfig()).type)
        model = Transformer.uninitialized(model_config)  # the checkpoint overwrites every weight
        found, model_state, _, _ = checkpoint.load_latest(path, checkpoint_name, on_skip=say, with_optimizer=False)
        try:
            model.load_state_dict(model_state)
        except RuntimeError as error:
            raise checkpoint.CheckpointError(f"{found} does not fit the model of {path / 'run.json'}: "
                                             f"{str(error)[:300]}") from None
        return Loaded(model, load_tokenizer_dir(path), path, "pretrained", found.name, info)
    if (path / "config.json").exists():
        return Loaded(load_hf(path), load_pretrained_tokenizer(str(path)), path, "huggingface")
    raise ConfigError(f"{path}: not a Sprat run directory (run.json), one of its checkpoints, a Hugging Face "
                      f"model directory (config.json), nor a .gguf file")


def chat_prompt(tokenizer, message: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)


def sample_text(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8,
                top_k: Optional[int] = 40) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


@dataclass
class GenerateSettings:
    """How text is sampled: the defaults of `generate` and of the wizard's chat."""

    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 is greedy
    top_k: Optional[int] = 40
    top_p: Optional[float] = None


def with_special_tokens(loaded: Loaded, chat: bool) -> bool:
    """Whether a prompt is tokenized with the tokenizer's own special tokens (Llama's BOS):
    for imported models, which were trained with them, unless a chat template writes its
    own; Sprat's runs train and generate without."""
    return loaded.kind in ("huggingface", "gguf") and not chat


def stream_text(model: Transformer, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                top_k: Optional[int], top_p: Optional[float], stop_at: tuple[int, ...] = (),
                seed: Optional[int] = None, special_tokens: bool = False) -> Iterator[str]:
    """The continuation of `prompt`, yielded as text pieces while it is generated (a
    piece is held back while it ends inside a multi-byte character); `special_tokens`:
    see `with_special_tokens`."""
    ids = tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"] or [tokenizer.eos_token_id]
    if len(ids) > model.config.context_len:
        ids = ids[-model.config.context_len:]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    new: list[int] = []
    shown = ""
    for token in model.generate_stream(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, eos_token_id=stop_at, generator=generator):
        if int(token[0]) in stop_at:
            break
        new.append(int(token[0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown):]


def stop_tokens(loaded: Loaded) -> tuple[int, ...]:
    """Where a reply ends: the chat template's end of turn for fine-tuned models; else the
    tokenizer's end-of-text and, for an imported release, every end id its config.json and
    generation_config.json list, or a GGUF's end of turn and of message (Llama 3 ends a turn
    with <|eot_id|> and text with <|end_of_text|>, its tokenizer names one)."""
    if loaded.kind == "finetuned":
        ids = [answer_stop(loaded.tokenizer)]
    else:
        ids = [loaded.tokenizer.eos_token_id]
        origin = getattr(loaded.model, "hf_origin", None)
        if loaded.kind == "gguf":
            ids += end_ids(loaded.source)
        elif origin is not None:
            for listed in (origin.special_ids.get("eos_token_id"), (origin.generation_config or {}).get("eos_token_id")):
                ids += listed if isinstance(listed, list) else [listed]
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool)))


def answer_stop(tokenizer) -> Optional[int]:
    """The token that ends an answer: `<|im_end|>` where the tokenizer has it, else end-of-text."""
    ids = tokenizer.convert_tokens_to_ids([IM_END])
    if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return ids[0]
    return tokenizer.eos_token_id


@dataclass
class EvalRequest:
    """`eval`: loss and perplexity of a model on a split of its run's data, or of `data`.
    The defaults are the command line's and the wizard's alike."""

    model: str | Path
    checkpoint: Optional[str] = None
    data: Optional[str] = None
    split: str = "val"
    max_batches: Optional[int] = None  # None: the whole split
    batch_size: int = 16
    seq_len: Optional[int] = None  # default: the run's sequence length
    cache_dir: Optional[str] = None  # default: the run's


@dataclass
class EvalResult:
    model: str
    checkpoint: Optional[str]
    data: str
    split: str
    sequences: int
    seq_len: int
    loss: float
    seconds: float

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "perplexity": self.perplexity}


def evaluate_model(request: EvalRequest, loaded: Optional[Loaded] = None, progress: Optional[Callback] = None,
                   say: Say = _quiet) -> EvalResult:
    """Loss and perplexity of a trained model (`loaded`, or loaded from request.model);
    `Progress` events (batches done of all) go to `progress`, news to `say`."""
    loaded = loaded or load_trained(request.model, request.checkpoint, say=say)
    info = loaded.info or {}
    data_config = run_configs(info, loaded.source)["data"] if "data" in info else DataConfig()
    if request.data:
        data_config = dataclasses.replace(data_config, source=request.data, subset_size=None)
    if request.cache_dir:
        data_config = dataclasses.replace(data_config, cache_dir=request.cache_dir)
    context = loaded.model.config.context_len
    seq_len = request.seq_len or info.get("trainer", {}).get("max_seq_len") or min(256, context)
    if seq_len > context:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({context})")
    say(f"preparing {data_config.source} for {seq_len}-token sequences ...")
    prepared = prepare(data_config, seq_len, tokenizer=loaded.tokenizer, progress=progress)
    dataset = prepared.val if request.split == "val" else prepared.train
    if len(dataset) == 0:
        raise DataError(f"{data_config.source}: the {request.split} split is empty at sequence length {seq_len}")
    device = resolve_device(TrainerConfig())
    started = time.perf_counter()
    loss = evaluate(loaded.model.to(device), dataset, request.batch_size, request.max_batches, device=device,
                    progress=progress_reporter(f"evaluating on the {request.split} split", "batches", progress))
    batches = math.ceil(len(dataset) / request.batch_size)
    if request.max_batches is not None:
        batches = min(batches, request.max_batches)
    return EvalResult(str(loaded.source), loaded.checkpoint, data_config.source, request.split,
                      min(len(dataset), batches * request.batch_size), seq_len, loss, time.perf_counter() - started)


@dataclass
class CompareRequest:
    """`eval RUN --compare BASE`: a fine-tuned model against its base, as a fine-tune's
    guard measures them (the task's validation split; held-out general text)."""

    tuned: str | Path
    base: str | Path
    data: Optional[str] = None  # the task's data; default: the fine-tune's
    general_data: Optional[str] = None  # default: the fine-tune's guard's (else builtin); "none": no general text
    max_general_rise: Optional[float] = None  # default: the fine-tune's guard's (else 0.05)
    checkpoint: Optional[str] = None
    cache_dir: Optional[str] = None


def compare_models(request: CompareRequest, say: Say = _quiet, progress: Optional[Callback] = None) -> Comparison:
    tuned = load_trained(request.tuned, request.checkpoint, say=say)
    base = load_trained(request.base, say=say)
    info = tuned.info or {}
    if request.data is None and "data" not in info:
        raise ConfigError(f"{request.tuned} is not a Sprat run: name the task's data with --data")
    data_config = run_configs(info, tuned.source)["data"] if "data" in info else DataConfig(format="instruction")
    if request.data:
        data_config = dataclasses.replace(data_config, source=request.data, subset_size=None)
    if request.cache_dir:
        data_config = dataclasses.replace(data_config, cache_dir=request.cache_dir)
    if tokenizer_hash(tuned.tokenizer) != tokenizer_hash(base.tokenizer):
        say("note: the two models have different tokenizers: their per-token losses are not directly comparable")
    saved_guard = (info.get("finetune") or {}).get("guard") or {}
    general_data = request.general_data or saved_guard.get("general_data") or BUILTIN
    general_data = None if general_data.lower() == "none" else general_data
    max_rise = request.max_general_rise if request.max_general_rise is not None \
        else float(saved_guard.get("max_general_rise", 0.05))
    context = min(tuned.model.config.context_len, base.model.config.context_len)
    seq_len = min(info.get("trainer", {}).get("max_seq_len") or 256, context)
    trainer_config = run_configs(info, tuned.source)["trainer"] if "trainer" in info else TrainerConfig()
    device = resolve_device(trainer_config)
    dtype = recorded_dtype(tuned, device.type) if trainer_config.use_dtype == "auto" else None
    dtype = dtype or resolve_dtype(trainer_config, device)  # the precision the fine-tune evaluated in
    figures = []
    for name, loaded in (("base", base), ("fine-tuned", tuned)):
        prepared = prepare(data_config, seq_len, tokenizer=loaded.tokenizer, progress=progress)
        model = loaded.model.to(device)
        task = evaluate(model, prepared.val, GUARD_SEQUENCES, math.ceil(FINETUNE_VAL_SAMPLES / GUARD_SEQUENCES),
                        device, dtype, progress=progress_reporter(f"{name}: task loss", "batches", progress))
        general = None
        if general_data:
            held_out = general_text(general_data, loaded.tokenizer, data_config.cache_dir, context)
            general = evaluate(model, held_out, GUARD_SEQUENCES, 1, device, dtype,
                               progress=progress_reporter(f"{name}: general text", "batches", progress))
        figures.append((task, general))
        model.to("cpu")
    (base_task, base_general), (tuned_task, tuned_general) = figures
    return Comparison(str(base.source), str(tuned.source), data_config.source, base_task, tuned_task,
                      general_data, base_general, tuned_general, max_rise, tuned.checkpoint)


def recorded_dtype(loaded: Loaded, device_type: str) -> Optional[torch.dtype]:
    """The precision a Sprat run's checkpoint trained (and evaluated) in on this device type,
    as its state records it; None where nothing is recorded (imported models, older runs)."""
    if loaded.checkpoint is None or loaded.kind not in ("pretrained", "finetuned"):
        return None
    try:
        state = checkpoint.read_state(loaded.source / loaded.checkpoint)
    except (OSError, ValueError):
        return None
    name = state.get("dtype") if isinstance(state, dict) and state.get("device") == device_type else None
    return getattr(torch, name) if name in ("float32", "bfloat16", "float16") else None


EXPORT_FORMATS = ("hf", "gguf")
DEFAULT_EXPORT_FORMAT = "hf"
DEFAULT_GGUF_QUANT = "f16"


def export_model(loaded: Loaded, out: Path, fmt: str = DEFAULT_EXPORT_FORMAT, quant: str = DEFAULT_GGUF_QUANT) -> Path:
    """The model (fine-tuned models with the adapter merged in) with its tokenizer: in the
    Hugging Face layout (Llama, or Mixtral for MoE), or as a GGUF file with an Ollama
    Modelfile beside it (returns the GGUF's path)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is not supported; choose one of: {', '.join(EXPORT_FORMATS)}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; export needs a new (or empty) directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new directory")
    model = merged_model(loaded.model) if loaded.kind == "finetuned" else loaded.model
    if fmt == "hf":
        return save_hf(model, out, loaded.tokenizer)
    # Sprat trains and generates without a BOS token; imported models keep their tokenizer's habit.
    add_bos = False if loaded.kind in ("pretrained", "finetuned") else None
    return export_gguf(model, out, loaded.tokenizer, quant, add_bos)


# ---- listing ----------------------------------------------------------------------------------
@dataclass
class RunSummary:
    path: Path
    name: str
    kind: str  # pretrain | fine-tune
    checkpoint: Optional[str]  # the newest complete-looking one (verified when it is loaded)
    step: int
    best_val_loss: Optional[float]


def list_runs(root: str | Path) -> list[RunSummary]:
    """Run directories under `root`, newest first, from their metadata alone: nothing is
    hashed here (loading a checkpoint verifies it)."""
    runs = []
    for info_file in sorted(Path(root).glob("*/run.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        run_dir = info_file.parent
        try:
            info = read_run_info(run_dir)
        except ConfigError:
            continue
        latest = checkpoint.latest(run_dir, verify_contents=False)
        try:
            state = checkpoint.read_state(latest) if latest else {}
        except (OSError, ValueError):
            state = {}
        state = state if isinstance(state, dict) else {}
        runs.append(RunSummary(run_dir, run_dir.name, "fine-tune" if info.get("finetune") else "pretrain",
                               latest.name if latest else None, state.get("global_step", 0),
                               state.get("best_val_loss")))
    return runs
