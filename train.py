"""Sprat's entry point.

`python train.py` on a terminal opens the wizard (wizard.py); `python train.py COMMAND`
runs one job without a terminal: train, finetune, resume, generate, eval, export, plan,
check, config. This file wires the logic modules together and prints; it holds no
training or model math.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import psutil
import torch
from rich import box
from rich.console import Console

import checkpoint
from budget import HardwareProfile, parse_duration, plan, sequence_length
from config_editor import ConfigError, apply_overrides, load_configs, render_table, save_configs, sync_mirrors
from data import BUILTIN, IM_END, DataConfig, DataError, load_pretrained_tokenizer, load_tokenizer_dir, prepare
from display import LiveDisplay, PlainDisplay, result_table, save_plot, text_curve
from export import load_hf, merge_and_save, save_adapter, save_hf
from lora import LoRAConfig, apply_lora, parameter_report
from model import PRESETS, ModelConfig, Transformer
from trainer import Trainer, TrainerConfig, TrainResult, evaluate, resolve_device

DEFAULT_PRESET = "2M"  # the model of `train` without --budget or --preset
FINISH_RESERVE_S = 6.0  # kept from a fixed model's budget for the last evaluation, the save and the sample
RUNTIME_MODEL_FIELDS = ("gradient_checkpointing", "use_flash", "use_cache")  # how a model computes, not what it is
SECTIONS = {"model": ModelConfig, "trainer": TrainerConfig, "data": DataConfig, "lora": LoRAConfig}


def since_launch() -> float:
    """Seconds since this process started (imports included)."""
    return time.time() - psutil.Process().create_time()


def output_console() -> Console:
    """stdout as rich sees it: colours and live displays on a terminal, plain unwrapped
    lines in a pipe or a log."""
    console = Console(soft_wrap=True, highlight=False)
    return console if console.is_terminal else Console(soft_wrap=True, highlight=False, width=1000)


def show_table(console: Console, table) -> None:
    """A table as drawn boxes on a terminal; in a pipe or a log, Markdown rows (ASCII,
    one line per row) for grep and diff."""
    if not console.is_terminal:
        table.box = box.MARKDOWN
    console.print(table)


def display_for(console: Console):
    """The trainer callback for this output: a live display on a terminal, lines otherwise."""
    return LiveDisplay(console) if console.is_terminal else PlainDisplay()


def default_configs(preset: str = DEFAULT_PRESET, source: str = BUILTIN, cache_dir: str = ".cache/sprat") -> dict:
    """The configuration `train` starts from before files, options and overrides."""
    return {"model": ModelConfig.from_name(preset), "trainer": TrainerConfig(max_seq_len=128, batch_size=16),
            "data": DataConfig(source=source, cache_dir=cache_dir)}


# ---- data and runs --------------------------------------------------------------------------------
def build_run(data_config: DataConfig, model_config: ModelConfig, trainer_config: TrainerConfig,
              tokenizer=None, fallback_to_builtin: bool = True, say: Callable[[str], None] = print):
    """The prepared data, and the model config fitted to its vocabulary and sequence length."""
    say(f"preparing data from {data_config.source} ...")
    prepared = prepare(data_config, trainer_config.max_seq_len, tokenizer=tokenizer,
                       fallback_to_builtin=fallback_to_builtin)
    for line in data_summary(prepared):
        say(line)
    return prepared, fit_model_to_data(model_config, trainer_config, prepared)


def data_summary(prepared) -> list[str]:
    report = prepared.report
    lines = [f"note: {note}" for note in report.notes]
    lines.append(f"{report.source}: {report.documents_kept} documents, {report.train_tokens:,} training and "
                 f"{report.val_tokens:,} validation tokens ({'from cache' if report.cached else f'{report.seconds:.1f} s'})")
    return lines


def fit_model_to_data(model_config: ModelConfig, trainer_config: TrainerConfig, prepared) -> ModelConfig:
    if model_config.vocab_size != len(prepared.tokenizer):
        model_config = dataclasses.replace(model_config, vocab_size=len(prepared.tokenizer))
    if model_config.context_len < trainer_config.max_seq_len:
        model_config = dataclasses.replace(model_config, context_len=trainer_config.max_seq_len)
    return model_config


def run_info(model_config: ModelConfig, trainer_config: TrainerConfig, data_config: DataConfig) -> dict:
    return {"model": model_config.to_dict(), "trainer": trainer_config.to_dict(), "data": data_config.to_dict(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}


def new_trainer(model_config: ModelConfig, trainer_config: TrainerConfig, data_config: DataConfig, prepared,
                run_dir: Path, callback) -> Trainer:
    """A fresh model (its initialisation depends on the seed alone) and its trainer."""
    torch.manual_seed(trainer_config.seed)
    model = Transformer(model_config)
    return Trainer(model, trainer_config, prepared.train, prepared.val, run_dir=run_dir, callback=callback,
                   tokenizer=prepared.tokenizer, run_info=run_info(model_config, trainer_config, data_config))


def fit(trainer: Trainer, console: Console, display=None) -> tuple[TrainResult, object]:
    """Train with `display` (live on a terminal, lines otherwise) as the trainer's callback."""
    display = display or display_for(console)
    trainer.callback = display
    with display:
        result = trainer.fit()
    return result, display.history


def sample_text(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8,
                top_k: Optional[int] = 40) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


def sample_prompt(prepared, tokens: int = 4) -> str:
    """What the end-of-run sample continues: code for the built-in corpus (Python's
    standard library), else the opening tokens of the first validation sequence."""
    if (prepared.config and prepared.config.source == BUILTIN) or len(prepared.val) == 0:
        return "def "
    first, _ = prepared.val.batch(np.arange(1))
    return prepared.tokenizer.decode(first[0, :tokens].tolist(), skip_special_tokens=True) or "def "


def finish(trainer: Trainer, result: TrainResult, prepared, run_dir: Path, console: Console, history=None,
           prompt_text: Optional[str] = None, resume_hint: str = "python train.py resume") -> int:
    """The end of a run: how to resume it, or its summary, curves and a sample."""
    if trainer.config.use_ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
        if not trainer.is_main:
            return 130 if result.status == "interrupted" else 0
    if result.status == "interrupted":
        console.print(f"interrupted at step {result.global_step}; checkpoint {result.last_checkpoint} saved.\n"
                      f"resume with: {resume_hint} {run_dir}")
        return 130
    best = f"{result.best_val_loss:.3f} (perplexity {math.exp(min(result.best_val_loss, 50)):.1f})" \
        if result.best_val_loss is not None else "n/a"
    console.print(f"{result.status}: {result.global_step} steps, {result.tokens_seen:,} tokens in "
                  f"{result.elapsed_s:.0f} s; best validation loss {best}; run directory {run_dir}")
    if console.is_terminal:
        console.print(result_table(result, run_dir))
    if history is not None and len(history.losses) >= 2:
        console.print("training loss by step:\n" + text_curve(history.losses), markup=False)
        plot = save_plot(history, run_dir / "loss.png")
        if plot is not None:
            console.print(f"loss curves plotted in {plot}")
    if result.status == "nonfinite":
        return 1
    prompt_text = sample_prompt(prepared) if prompt_text is None else prompt_text
    console.print("sample:\n" + sample_text(trainer.model, prepared.tokenizer, prompt_text), markup=False)
    return 0


# ---- train, plan, finetune, resume ----------------------------------------------------------------
def cmd_train(args: argparse.Namespace, console: Console) -> int:
    budget = parse_duration(args.budget) if args.budget else None
    planned = budget is not None and args.preset is None
    seq_len = args.seq_len if args.seq_len is not None else sequence_length(budget) if planned else 128
    configs = default_configs(args.preset or DEFAULT_PRESET, args.data, args.cache_dir)
    configs["trainer"] = dataclasses.replace(configs["trainer"], max_seq_len=seq_len,
                                             batch_size=16 if args.batch_size is None else args.batch_size)
    if args.config:
        configs = load_config_file(args.config, configs)
    configs = apply_overrides(configs, args.overrides)
    model_config, trainer_config, data_config = configs["model"], configs["trainer"], configs["data"]
    if trainer_config.use_ddp:
        if planned:
            raise ConfigError("--budget plans on one process; with DDP pass --preset NAME (the budget then "
                              "sets the deadline) or a planned configuration from `plan --budget B --json`")
        start_distributed()
    prepared, model_config = build_run(data_config, model_config, trainer_config, say=console.print)
    data_config = prepared.config or data_config  # the built-in corpus after a hub fallback
    reserve = FINISH_RESERVE_S
    if planned:
        hardware = HardwareProfile.detect(None if trainer_config.device == "auto" else trainer_config.device)
        the_plan = plan(budget, hardware, prepared.report.train_tokens, len(prepared.tokenizer),
                        spent_seconds=since_launch(), cache_dir=data_config.cache_dir,
                        seq_len=trainer_config.max_seq_len)
        console.print(plan_text(the_plan))
        planned_configs = {"model": the_plan.model, "trainer": the_plan.trainer, "data": data_config}
        if args.batch_size is not None:
            planned_configs["trainer"] = dataclasses.replace(the_plan.trainer, batch_size=args.batch_size)
        configs = apply_overrides(planned_configs, args.overrides)  # what the user set explicitly wins
        model_config, trainer_config = configs["model"], configs["trainer"]
        if model_config.context_len < trainer_config.max_seq_len:
            model_config = dataclasses.replace(model_config, context_len=trainer_config.max_seq_len)
        reserve = budget - the_plan.train_seconds - since_launch()  # the plan's finishing costs
    elif budget is not None:  # a fixed model under the budget's deadline
        remaining = budget - since_launch() - reserve
        if remaining < 1.0:
            raise ConfigError(f"a budget of {args.budget} leaves no time to train after start-up and data "
                              f"preparation ({since_launch():.0f} s); give at least {since_launch() + reserve + 5:.0f}s")
        trainer_config = dataclasses.replace(trainer_config, time_limit_s=remaining, schedule_by="time",
                                             num_epochs=max(trainer_config.num_epochs, 1000), eval_steps=4,
                                             use_epoch_checkpoints=False)
    run_dir = Path(args.out or trainer_config.path_to_checkpoints) / (args.name or time.strftime("run-%Y%m%d-%H%M%S"))
    trainer = new_trainer(model_config, trainer_config, data_config, prepared, run_dir, callback=None)
    if budget is not None:  # the deadline counts from now: everything before it is already spent
        trainer.config = dataclasses.replace(trainer.config, time_limit_s=max(1.0, budget - since_launch() - reserve))
    result, history = fit(trainer, console)
    return finish(trainer, result, prepared, run_dir, console, history)


def plan_text(the_plan) -> str:
    m, t = the_plan.model, the_plan.trainer
    return (f"plan for {the_plan.budget_s:.0f} s: {m.num_layers} layers x {m.num_dims} wide ({m.num_heads}/"
            f"{m.num_kv_heads} heads, FFN {m.ffn_hidden_dims}), {the_plan.params / 1e6:.2f}M parameters; batch "
            f"{t.batch_size} x {t.max_seq_len}, lr {t.learning_rate:g}; {the_plan.train_seconds:.0f} s of training at "
            f"{the_plan.tokens_per_second:,.0f} tokens/s = {the_plan.tokens / 1e6:.2f}M tokens "
            f"(~{the_plan.steps} steps, {the_plan.epochs:.2f} epochs); probes "
            f"{'cached' if the_plan.probes_cached else f'{the_plan.probe_seconds:.1f} s'}\nwhy: {the_plan.reasoning}")


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    budget = parse_duration(args.budget)
    data_config = apply_overrides({"data": DataConfig(source=args.data, cache_dir=args.cache_dir)}, args.overrides)["data"]
    prepared = prepare(data_config, sequence_length(budget), fallback_to_builtin=True)
    hardware = HardwareProfile.detect()
    the_plan = plan(budget, hardware, prepared.report.train_tokens, len(prepared.tokenizer),
                    spent_seconds=since_launch(), cache_dir=data_config.cache_dir)
    if args.json:
        print(json.dumps(the_plan.summary(), indent=2))
    else:
        console.print(plan_text(the_plan))
    return 0


def load_base(base: str) -> tuple[Transformer, object]:
    """A base model and its tokenizer: a Sprat run directory (its latest checkpoint) or a
    Llama-architecture directory saved by `transformers`."""
    path = Path(base)
    if (path / "run.json").exists() and json.loads((path / "run.json").read_text()).get("finetune"):
        raise ConfigError(f"{path} is a fine-tuning run; fine-tune its merged model (finetune --merge) instead")
    loaded = load_trained(path)
    return loaded.model, loaded.tokenizer


def build_finetune(info: dict) -> tuple[Transformer, object, LoRAConfig]:
    model, tokenizer = load_base(info["finetune"]["base"])
    lora_config = LoRAConfig.from_dict(info["finetune"]["lora"])
    apply_lora(model, lora_config)
    return model, tokenizer, lora_config


def cmd_finetune(args: argparse.Namespace, console: Console, display=None,
                 lora_config: Optional[LoRAConfig] = None) -> int:
    """Fine-tune args.base; `lora_config` (the wizard's LoRA table) replaces --rank / --qlora."""
    model, tokenizer = load_base(args.base)
    seq_len = min(128, model.config.context_len) if args.seq_len is None else args.seq_len
    configs = {"trainer": TrainerConfig(max_seq_len=seq_len, batch_size=args.batch_size, learning_rate=2e-4,
                                        min_lr=2e-5, warmup_ratio=0.03, num_epochs=args.epochs),
               "data": DataConfig(source=args.data, cache_dir=args.cache_dir, format="instruction"),
               "lora": lora_config or LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, quantize_base=args.qlora)}
    configs = apply_overrides(configs, args.overrides)
    configs["trainer"] = sync_mirrors({"model": model.config, "trainer": configs["trainer"]})[0]["trainer"]
    trainer_config, data_config, lora_config = configs["trainer"], configs["data"], configs["lora"]
    if trainer_config.max_seq_len > model.config.context_len:
        raise ConfigError(f"trainer.max_seq_len={trainer_config.max_seq_len} exceeds the base model's context "
                          f"({model.config.context_len})")
    console.print(f"preparing data from {data_config.source} ...")
    prepared = prepare(data_config, trainer_config.max_seq_len, tokenizer=tokenizer)
    report = prepared.report
    console.print(f"{report.source}: {report.documents_kept} samples ({report.train_documents} train, "
                  f"{report.val_documents} validation), {report.train_tokens:,} response tokens; truncated "
                  f"{report.truncated_samples}, dropped {report.dropped_samples}")
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the base model only {model.config.vocab_size}")
    apply_lora(model, lora_config)
    counts = parameter_report(model)
    console.print(f"LoRA rank {lora_config.rank}{' on a 4-bit NF4 base (QLoRA)' if lora_config.quantize_base else ''}: "
                  f"{counts['trainable']:,} trainable of {counts['total']:,} parameters ({counts['share']:.2%})")
    run_dir = Path(args.out or trainer_config.path_to_checkpoints) / (args.name or time.strftime("finetune-%Y%m%d-%H%M%S"))
    info = {**run_info(model.config, trainer_config, data_config),
            "finetune": {"base": str(Path(args.base).resolve()), "lora": lora_config.to_dict()}}
    trainer = Trainer(model, trainer_config, prepared.train, prepared.val, run_dir=run_dir, tokenizer=tokenizer,
                      run_info=info)
    result, history = fit(trainer, console, display)
    return finish_finetune(trainer, result, prepared, run_dir, lora_config, args.base, args.merge, console, history)


def finish_finetune(trainer: Trainer, result: TrainResult, prepared, run_dir: Path, lora_config: LoRAConfig,
                    base: str, merge: bool, console: Console, history=None,
                    resume_hint: str = "python train.py resume") -> int:
    if trainer.is_main and result.status != "interrupted":
        adapter = save_adapter(trainer.model, run_dir / "adapter", lora_config, base_model=str(base))
        console.print(f"adapter saved to {adapter} (PEFT format)")
        if merge:
            merged = merge_and_save(trainer.model, run_dir / "merged", prepared.tokenizer)
            console.print(f"merged model saved to {merged} (Hugging Face layout)")
    prompt = chat_prompt(prepared.tokenizer, "Hello")
    return finish(trainer, result, prepared, run_dir, console, history, prompt_text=prompt, resume_hint=resume_hint)


def resume_run(run_dir: Path, checkpoint_name: Optional[str], overrides: list[str], console: Console,
               display=None, resume_hint: str = "python train.py resume") -> int:
    if not (run_dir / "run.json").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no run.json)")
    info = json.loads((run_dir / "run.json").read_text())
    saved, _ = sync_mirrors({"model": ModelConfig.from_dict(info["model"]),  # mirrored pairs as the run used them
                             "trainer": TrainerConfig.from_dict(info["trainer"]),
                             "data": DataConfig.from_dict(info["data"])})
    configs = apply_overrides(saved, overrides)
    reshaped = [f"model.{field.name}" for field in dataclasses.fields(ModelConfig)
                if field.name not in RUNTIME_MODEL_FIELDS
                and getattr(configs["model"], field.name) != getattr(saved["model"], field.name)]
    if reshaped:
        raise ConfigError(f"the model of a run cannot change on resume ({', '.join(reshaped)}: its checkpoints hold "
                          f"that model); start a new run instead")
    if configs["trainer"].use_ddp:
        start_distributed()
    path = find_checkpoint(run_dir, checkpoint_name)
    tokenizer = load_tokenizer_dir(run_dir)
    if info.get("finetune"):
        model, tokenizer, lora_config = build_finetune(info)
        prepared = prepare(configs["data"], configs["trainer"].max_seq_len, tokenizer=tokenizer)
    else:
        prepared, model_config = build_run(configs["data"], configs["model"], configs["trainer"], tokenizer=tokenizer,
                                           fallback_to_builtin=False, say=console.print)
        model = Transformer(model_config)
    trainer = Trainer(model, configs["trainer"], prepared.train, prepared.val, run_dir=run_dir)
    trainer.load_checkpoint(path)
    console.print(f"resuming {run_dir} from {path.name} (step {trainer.global_step})")
    result, history = fit(trainer, console, display)
    if info.get("finetune"):
        return finish_finetune(trainer, result, prepared, run_dir, lora_config, info["finetune"]["base"], False,
                               console, history, resume_hint)
    return finish(trainer, result, prepared, run_dir, console, history, resume_hint=resume_hint)


def cmd_resume(args: argparse.Namespace, console: Console) -> int:
    return resume_run(Path(args.run_dir), args.checkpoint, args.overrides, console)


def find_checkpoint(run_dir: Path, name: Optional[str]) -> Path:
    """The named checkpoint of a run (verified), or its latest complete one."""
    if name:
        path = run_dir / name
        problem = checkpoint.verify(path) if path.is_dir() else f"{name}: no such checkpoint in {run_dir}"
        if problem:
            raise ConfigError(problem)
        return path
    path = checkpoint.latest(run_dir, on_skip=print)
    if path is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint")
    return path


def start_distributed() -> None:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs)."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("trainer.use_ddp=yes needs several processes: launch with "
                          "torchrun --nproc_per_node=N train.py train trainer.use_ddp=yes ...")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


# ---- trained models: generate, eval, export -------------------------------------------------------
@dataclass
class Loaded:
    """A trained model ready to use, and where it came from."""

    model: Transformer
    tokenizer: object
    source: Path
    kind: str  # pretrained | finetuned | huggingface
    checkpoint: Optional[str] = None
    info: Optional[dict] = None


def load_trained(path: str | Path, checkpoint_name: Optional[str] = None) -> Loaded:
    """The model of a Sprat run directory (its latest or a named checkpoint; fine-tuning
    runs rebuild their base and add the adapter), of one of its checkpoint directories, or
    of a Hugging Face Llama directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such run or model directory")
    if (path / "manifest.json").exists() and (path.parent / "run.json").exists():  # a checkpoint directory
        path, checkpoint_name = path.parent, path.name
    if (path / "run.json").exists():
        info = json.loads((path / "run.json").read_text())
        found = find_checkpoint(path, checkpoint_name)
        model_state, _, state = checkpoint.load(found)
        if info.get("finetune"):
            model, tokenizer, _ = build_finetune(info)
            result = model.load_state_dict(model_state, strict=False)
            if result.unexpected_keys:
                raise ConfigError(f"{found} does not fit the model rebuilt from {info['finetune']['base']}")
            return Loaded(model, tokenizer, path, "finetuned", found.name, info)
        model = Transformer(ModelConfig.from_dict(info["model"]))
        model.load_state_dict(model_state)
        return Loaded(model, load_tokenizer_dir(path), path, "pretrained", found.name, info)
    if (path / "config.json").exists():
        return Loaded(load_hf(path), load_pretrained_tokenizer(str(path)), path, "huggingface")
    raise ConfigError(f"{path}: not a Sprat run directory (run.json), one of its checkpoints, nor a Hugging Face "
                      f"model directory (config.json)")


def chat_prompt(tokenizer, message: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)


def stream_text(model: Transformer, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                top_k: Optional[int], top_p: Optional[float], stop_at: Optional[int] = None,
                seed: Optional[int] = None) -> Iterator[str]:
    """The continuation of `prompt`, yielded as text pieces while it is generated (a
    piece is held back while it ends inside a multi-byte character)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    if len(ids) > model.config.context_len:
        ids = ids[-model.config.context_len:]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    new: list[int] = []
    shown = ""
    for token in model.generate_stream(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, eos_token_id=stop_at, generator=generator):
        if stop_at is not None and int(token[0]) == stop_at:
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


def stop_token(loaded: Loaded) -> Optional[int]:
    """Where a reply ends: `<|im_end|>` for chat models, end-of-text otherwise."""
    if loaded.kind == "finetuned":
        ids = loaded.tokenizer.convert_tokens_to_ids([IM_END])
        if ids and ids[0] is not None and ids[0] != loaded.tokenizer.unk_token_id:
            return ids[0]
    return loaded.tokenizer.eos_token_id


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    loaded = load_trained(args.run_dir, args.checkpoint)
    prompt = chat_prompt(loaded.tokenizer, args.prompt) if args.chat else args.prompt
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in stream_text(loaded.model, loaded.tokenizer, prompt, args.max_new_tokens, args.temperature,
                             args.top_k, args.top_p, stop_token(loaded), args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def evaluate_run(loaded: Loaded, data: Optional[str], split: str, max_batches: Optional[int], seq_len: Optional[int],
                 batch_size: int, cache_dir: Optional[str]) -> dict:
    """Loss and perplexity of a trained model on the validation (or training) split of its
    run's data, or of `data`."""
    info = loaded.info or {}
    data_config = DataConfig.from_dict(info["data"]) if "data" in info else DataConfig()
    if data:
        data_config = dataclasses.replace(data_config, source=data, subset_size=None)
    if cache_dir:
        data_config = dataclasses.replace(data_config, cache_dir=cache_dir)
    seq_len = seq_len or info.get("trainer", {}).get("max_seq_len") or min(256, loaded.model.config.context_len)
    if seq_len > loaded.model.config.context_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({loaded.model.config.context_len})")
    prepared = prepare(data_config, seq_len, tokenizer=loaded.tokenizer)
    dataset = prepared.val if split == "val" else prepared.train
    if len(dataset) == 0:
        raise DataError(f"{data_config.source}: the {split} split is empty at sequence length {seq_len}")
    device = resolve_device(TrainerConfig())
    model = loaded.model.to(device)
    started = time.perf_counter()
    loss = evaluate(model, dataset, batch_size, max_batches, device=device)
    batches = math.ceil(len(dataset) / batch_size) if max_batches is None else min(max_batches, math.ceil(len(dataset) / batch_size))
    return {"model": str(loaded.source), "checkpoint": loaded.checkpoint, "data": data_config.source,
            "split": split, "sequences": min(len(dataset), batches * batch_size), "seq_len": seq_len,
            "loss": loss, "perplexity": math.exp(min(loss, 50)), "seconds": time.perf_counter() - started}


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    loaded = load_trained(args.run_dir, args.checkpoint)
    result = evaluate_run(loaded, args.data, args.split, args.max_batches, args.seq_len, args.batch_size,
                          args.cache_dir)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console.print(f"{result['model']} ({result['checkpoint'] or 'weights'}) on the {result['split']} split of "
                      f"{result['data']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
                      f"({result['sequences']} sequences of {result['seq_len']} tokens, {result['seconds']:.1f} s)")
    return 0


def export_model(loaded: Loaded, out: Path, fmt: str = "hf") -> Path:
    """The model in the Hugging Face Llama layout (fine-tuned models with the adapter
    merged in), with its tokenizer."""
    if fmt != "hf":
        raise ConfigError(f"export format {fmt!r} is not supported yet; use hf")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; export needs a new (or empty) directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new directory")
    if loaded.kind == "finetuned":
        return merge_and_save(loaded.model, out, loaded.tokenizer)
    return save_hf(loaded.model, out, loaded.tokenizer)


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    loaded = load_trained(args.run_dir, args.checkpoint)
    path = export_model(loaded, Path(args.out), args.format)
    console.print(f"exported {loaded.source} ({loaded.checkpoint or loaded.kind}) to {path} in the Hugging Face "
                  f"Llama layout{' with the adapter merged' if loaded.kind == 'finetuned' else ''}; load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0


# ---- check and config -----------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace, console: Console) -> int:
    from system_check import HardwareManager, SystemCheck

    report = SystemCheck(checkpoint_dir=args.out).run_all()
    hardware = HardwareManager()
    if args.json:
        print(json.dumps({**report.to_dict(), "hardware": hardware.to_dict()}, indent=2))
    else:
        show_table(console, check_table(report, hardware))
    return 0 if report.ok else 1


def check_table(report, hardware):
    from rich.table import Table

    marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
    table = Table(title=f"system check ({report.seconds:.1f} s)", title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("status")
    table.add_column("details")
    for check in report.checks:
        table.add_row(check.name, marks.get(check.status, check.status), check.message)
    table.add_row("Training", "", f"device {hardware.device}, dtype {hardware.recommended_dtype()}, flash attention "
                                  f"{'yes' if hardware.flash_attention_available else 'no'}")
    return table


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    configs = {**default_configs(args.preset), "lora": LoRAConfig()}
    if args.action == "show":
        if args.file:
            configs = load_config_file(args.file, configs)
        for section in [args.section] if args.section else list(configs):
            show_table(console, render_table(configs[section], f"{section} ({type(configs[section]).__name__})"))
        return 0
    if not args.file:
        raise ConfigError(f"config {args.action} needs a FILE (a .json or .yaml path)")
    if args.action == "validate":
        loaded = load_config_file(args.file, configs)
        model, trainer = loaded["model"], loaded["trainer"]
        console.print(f"{args.file}: valid ({model.num_params() / 1e6:.2f}M parameters, "
                      f"{trainer.batch_size * trainer.accumulation_steps * trainer.max_seq_len:,} tokens per optimizer step)")
        return 0
    if not args.overrides:
        raise ConfigError("config set needs SECTION.FIELD=VALUE assignments, e.g. model.num_layers=6")
    if Path(args.file).exists():
        configs = load_config_file(args.file, configs)
    configs = apply_overrides(configs, args.overrides)
    path = save_configs(args.file, configs)
    console.print(f"saved {path}: " + ", ".join(o.strip() for o in args.overrides))
    return 0


def load_config_file(path: str, configs: dict) -> dict:
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


# ---- the command line -----------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} must be a number >= 0")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Sprat: train and fine-tune small language models. Without a command, on a "
                                     "terminal, `python train.py` opens the interactive wizard.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train a model (for a time budget, or for its epochs)",
                                description="Train a model. Any config field can be set as SECTION.FIELD=VALUE, "
                                            "e.g. model.num_layers=6 trainer.learning_rate=3e-4 data.subset_size=100.")
    train.add_argument("--budget", default=None, help="time for the whole run: 90s, 20m, 2h, or hours (0.001)")
    train.add_argument("--data", default=BUILTIN, help="'builtin', a local file or folder, or a hub dataset name")
    train.add_argument("--config", default=None, help="JSON or YAML file with model / trainer / data sections")
    train.add_argument("--preset", default=None, choices=list(PRESETS), help=f"model preset; with --budget it skips "
                       f"planning (default: planned with --budget, else {DEFAULT_PRESET})")
    train.add_argument("--out", default=None, help="folder for run directories (default trainer.path_to_checkpoints)")
    train.add_argument("--name", default=None, help="run directory name (default run-DATE-TIME)")
    train.add_argument("--cache-dir", default=".cache/sprat", help="cache of tokenized data and trained tokenizers")
    train.add_argument("--batch-size", type=positive_int, default=None, help="sequences per micro-batch (default 16, or planned)")
    train.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default 128, or planned)")
    train.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    train.set_defaults(func=cmd_train)

    finetune = commands.add_parser("finetune", help="fine-tune a model with LoRA or QLoRA on instruction data",
                                   description="Fine-tune BASE (a Sprat run directory or a Hugging Face Llama "
                                               "directory) on instruction/chat records (Alpaca, prompt/response or "
                                               "messages); the loss is on the responses only. LoRA fields are "
                                               "settable as lora.FIELD=VALUE.")
    finetune.add_argument("base")
    finetune.add_argument("--data", required=True, help="a local .json/.jsonl/.csv/.parquet file or folder, or a hub dataset")
    finetune.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (alpha defaults to 2 x rank)")
    finetune.add_argument("--qlora", action="store_true", help="quantize the frozen base to 4-bit NF4 (QLoRA)")
    finetune.add_argument("--merge", action="store_true", help="also write the model with the adapter folded in")
    finetune.add_argument("--epochs", type=positive_int, default=3)
    finetune.add_argument("--batch-size", type=positive_int, default=8)
    finetune.add_argument("--seq-len", type=positive_int, default=None,
                          help="tokens per sample (default 128, or the base model's context if shorter)")
    finetune.add_argument("--out", default=None, help="folder for run directories (default trainer.path_to_checkpoints)")
    finetune.add_argument("--name", default=None, help="run directory name (default finetune-DATE-TIME)")
    finetune.add_argument("--cache-dir", default=".cache/sprat", help="cache of tokenized data")
    finetune.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    finetune.set_defaults(func=cmd_finetune)

    resume = commands.add_parser("resume", help="resume a run from its latest (or a named) checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--checkpoint", default=None, help="checkpoint name, e.g. step_200 or epoch_1")
    resume.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    resume.set_defaults(func=cmd_resume)

    model_help = "a run directory (latest checkpoint), one of its checkpoint directories, or a Hugging Face model directory"
    generate = commands.add_parser("generate", help="generate text with a trained model",
                                   description="Continue PROMPT with a trained model, streaming the text.")
    generate.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=positive_int, default=100)
    generate.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=positive_int, default=40)
    generate.add_argument("--top-p", type=probability, default=None)
    generate.add_argument("--seed", type=int, default=None, help="for a repeatable sample")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (fine-tuned models)")
    generate.add_argument("--checkpoint", default=None, help="checkpoint name (default: the latest)")
    generate.set_defaults(func=cmd_generate)

    evaluation = commands.add_parser("eval", help="loss and perplexity of a trained model",
                                     description="Evaluate a trained model on the validation split of its run's "
                                                 "data, or of --data.")
    evaluation.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    evaluation.add_argument("--data", default=None, help="another dataset ('builtin', a file or folder, a hub name)")
    evaluation.add_argument("--split", default="val", choices=("val", "train"))
    evaluation.add_argument("--max-batches", type=positive_int, default=None, help="evaluate only this many batches")
    evaluation.add_argument("--batch-size", type=positive_int, default=16)
    evaluation.add_argument("--seq-len", type=positive_int, default=None, help="default: the run's sequence length")
    evaluation.add_argument("--cache-dir", default=None, help="cache of tokenized data (default: the run's)")
    evaluation.add_argument("--checkpoint", default=None, help="checkpoint name (default: the latest)")
    evaluation.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluation.set_defaults(func=cmd_eval)

    export = commands.add_parser("export", help="export a trained model (Hugging Face Llama layout)",
                                 description="Write a trained model where `transformers` loads it; fine-tuned "
                                             "runs are exported with the adapter merged in.")
    export.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    export.add_argument("--format", default="hf", choices=("hf",), help="hf: safetensors + config.json + tokenizer")
    export.add_argument("--out", required=True, help="a new (or empty) directory")
    export.add_argument("--checkpoint", default=None, help="checkpoint name (default: the latest)")
    export.set_defaults(func=cmd_export)

    plan_parser = commands.add_parser("plan", help="print the configuration planned for a time budget",
                                      description="Measure this machine and print the model and trainer "
                                                  "configuration planned for the budget, without training.")
    plan_parser.add_argument("--budget", required=True, help="90s, 20m, 2h, or hours (0.001)")
    plan_parser.add_argument("--data", default=BUILTIN)
    plan_parser.add_argument("--cache-dir", default=".cache/sprat")
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_parser.add_argument("overrides", nargs="*", metavar="data.FIELD=VALUE")
    plan_parser.set_defaults(func=cmd_plan)

    check = commands.add_parser("check", help="check this machine: Python, GPU, CPU, RAM, disk, packages, hub")
    check.add_argument("--out", default="checkpoints", help="where checkpoints go (its free disk space is checked)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_check)

    config = commands.add_parser("config", help="show, set or validate configuration files",
                                 description="show [FILE]: the fields, values and help of each section; "
                                             "set FILE SECTION.FIELD=VALUE ...: write a config file (created from the "
                                             "defaults); validate FILE: check a file without training.")
    config.add_argument("action", choices=("show", "set", "validate"))
    config.add_argument("file", nargs="?", default=None, metavar="FILE", help="a .json or .yaml config file")
    config.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    config.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="model preset to start from")
    config.add_argument("--section", default=None, choices=list(SECTIONS), help="show only this section")
    config.set_defaults(func=cmd_config)
    parser.commands = commands.choices  # each command's own parser, for its usage line in errors
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # Overrides may sit between options (`train X=1 --budget 2m Y=2`): collect the stragglers.
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if not sys.stdin.isatty():
            parser.print_help(sys.stderr)
            print("\nno command given and no terminal to run the wizard on: name a command, e.g. "
                  "`python train.py train --budget 2m`", file=sys.stderr)
            return 2
        from wizard import run_wizard

        return run_wizard(Console(highlight=False))
    command_parser = parser.commands[args.command]
    if getattr(args, "file", "absent") is None and extra and "=" not in extra[0] and not extra[0].startswith("-"):
        args.file = extra.pop(0)  # `config set --preset tiny FILE ...`: FILE came after an option
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        command_parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        code = args.func(args, output_console())
        if code == 0 and args.command in ("train", "finetune", "resume") and os.environ.get("RANK", "0") == "0":
            print(f"finished in {since_launch():.1f} s (process start to exit, imports included)")
        return code
    except (ValueError, DataError, ConfigError, checkpoint.CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as error:
        print(f"error: out of memory outside the training step ({str(error).splitlines()[0]}); use a smaller "
              f"model or batch (model.num_layers=..., trainer.batch_size=..., trainer.eval_steps=...)", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error.strerror or error} ({getattr(error, 'filename', '') or 'I/O'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped without saving (interrupted twice, or outside training)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
