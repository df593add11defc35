"""Sprat's entry point: `python train.py SUBCOMMAND ...`.

Subcommands so far: `train` (a model for a time budget or for epochs) and `resume` (a
run from its latest or a named checkpoint). The wizard, the planner and the other
subcommands land with their issues. This file wires the pieces together and prints; it
holds no training or model math.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import psutil
import torch

import checkpoint
from budget import HardwareProfile, parse_duration, plan, sequence_length
from config_editor import ConfigError, apply_overrides
from data import BUILTIN, DataConfig, DataError, load_pretrained_tokenizer, load_tokenizer_dir, prepare
from export import load_hf, merge_and_save, save_adapter
from lora import LoRAConfig, apply_lora, parameter_report
from model import ModelConfig, Transformer
from trainer import Trainer, TrainerConfig, TrainResult

DEFAULT_PRESET = "2M"  # the model of `train` without --budget or --preset
FINISH_RESERVE_S = 6.0  # kept from a fixed model's budget for the last evaluation, the save and the sample


def since_launch() -> float:
    """Seconds since this process started (imports included)."""
    return time.time() - psutil.Process().create_time()


def print_event(event: dict) -> None:
    """Plain-text rendering of trainer events (the live rich display comes with the wizard)."""
    kind = event["type"]
    if kind == "start":
        print(f"training: {event['params'] / 1e6:.2f}M parameters on {event['device']} ({event['dtype']}), "
              f"{event['total_steps']} optimizer steps, effective batch {event['effective_batch']}", flush=True)
    elif kind == "step" and (event["step"] % 10 == 0 or event["step"] == event["total_steps"]):
        print(f"step {event['step']:5d}/{event['total_steps']}  loss {event['loss']:.3f}  lr {event['lr']:.2e}  "
              f"{event['tokens_per_s']:,.0f} tok/s  eta {event['eta_s']:.0f}s", flush=True)
    elif kind == "eval":
        print(f"eval  step {event['step']:5d}  val loss {event['val_loss']:.3f}  "
              f"perplexity {event['perplexity']:.1f}{'  (best)' if event['improved'] else ''}", flush=True)
    elif kind == "checkpoint":
        print(f"saved checkpoint {event['name']} ({event['seconds']:.1f} s)", flush=True)
    elif kind in ("fallback", "stopped", "early_stop", "resumed", "nonfinite"):
        details = {k: v for k, v in event.items() if k not in ("type", "time")}
        print(f"{kind}: {details}", flush=True)
    elif kind == "interrupt":
        print(f"\n{event['signal']} received: finishing the current step and saving (press again to quit now)",
              flush=True)


def build_run(data_config: DataConfig, model_config: ModelConfig, trainer_config: TrainerConfig,
              tokenizer=None, fallback_to_builtin: bool = True):
    print(f"preparing data from {data_config.source} ...", flush=True)
    prepared = prepare(data_config, trainer_config.max_seq_len, tokenizer=tokenizer,
                       fallback_to_builtin=fallback_to_builtin)
    report = prepared.report
    for note in report.notes:
        print(f"note: {note}")
    print(f"{report.source}: {report.documents_kept} documents, {report.train_tokens:,} training and "
          f"{report.val_tokens:,} validation tokens ({'from cache' if report.cached else f'{report.seconds:.1f} s'})",
          flush=True)
    if model_config.vocab_size != len(prepared.tokenizer):
        model_config = dataclasses.replace(model_config, vocab_size=len(prepared.tokenizer))
    if model_config.context_len < trainer_config.max_seq_len:
        model_config = dataclasses.replace(model_config, context_len=trainer_config.max_seq_len)
    return prepared, model_config


def run_info(model_config: ModelConfig, trainer_config: TrainerConfig, data_config: DataConfig) -> dict:
    return {"model": model_config.to_dict(), "trainer": trainer_config.to_dict(), "data": data_config.to_dict(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__}


def finish(trainer: Trainer, result: TrainResult, prepared, run_dir: Path, prompt_text: str = "def ") -> int:
    if trainer.config.use_ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
        if not trainer.is_main:
            return 130 if result.status == "interrupted" else 0
    if result.status == "interrupted":
        print(f"interrupted at step {result.global_step}; checkpoint {result.last_checkpoint} saved.\n"
              f"resume with: python train.py resume {run_dir}")
        return 130
    best = f"{result.best_val_loss:.3f} (perplexity {math.exp(result.best_val_loss):.1f})" \
        if result.best_val_loss is not None else "n/a"
    print(f"{result.status}: {result.global_step} steps, {result.tokens_seen:,} tokens in {result.elapsed_s:.0f} s; "
          f"best validation loss {best}; run directory {run_dir}")
    if result.status == "nonfinite":
        return 1
    tokenizer = prepared.tokenizer
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    sample = trainer.model.generate(torch.tensor([prompt], device=trainer.device), 60, temperature=0.8, top_k=40)
    print("sample:\n" + tokenizer.decode(sample[0].tolist()))
    print(f"finished in {since_launch():.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    budget = parse_duration(args.budget) if args.budget else None
    planned = budget is not None and args.preset is None
    seq_len = args.seq_len or (sequence_length(budget) if planned else 128)
    configs = {"model": ModelConfig.from_name(args.preset or DEFAULT_PRESET),
               "trainer": TrainerConfig(max_seq_len=seq_len, batch_size=args.batch_size or 16),
               "data": DataConfig(source=args.data, cache_dir=args.cache_dir)}
    if args.config:
        configs = load_config_file(args.config, configs)
    configs = apply_overrides(configs, args.overrides)
    model_config, trainer_config, data_config = configs["model"], configs["trainer"], configs["data"]
    if trainer_config.use_ddp:
        if planned:
            raise ConfigError("--budget plans on one process; with DDP pass --preset NAME (the budget then "
                              "sets the deadline) or a planned configuration from `plan --budget B --json`")
        start_distributed()
    prepared, model_config = build_run(data_config, model_config, trainer_config)
    data_config = prepared.config or data_config  # the built-in corpus after a hub fallback
    reserve = FINISH_RESERVE_S
    if planned:
        hardware = HardwareProfile.detect(None if trainer_config.device == "auto" else trainer_config.device)
        the_plan = plan(budget, hardware, prepared.report.train_tokens, len(prepared.tokenizer),
                        spent_seconds=since_launch(), cache_dir=data_config.cache_dir,
                        seq_len=trainer_config.max_seq_len)
        print_plan(the_plan)
        planned_configs = {"model": the_plan.model, "trainer": the_plan.trainer, "data": data_config}
        if args.batch_size:
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
    torch.manual_seed(trainer_config.seed)  # the initialisation depends on the seed alone, not on probing
    model = Transformer(model_config)
    trainer = Trainer(model, trainer_config, prepared.train, prepared.val, run_dir=run_dir, callback=print_event,
                      tokenizer=prepared.tokenizer, run_info=run_info(model_config, trainer_config, data_config))
    if budget is not None:  # the deadline counts from now: everything before it is already spent
        trainer.config = dataclasses.replace(trainer.config, time_limit_s=max(1.0, budget - since_launch() - reserve))
    return finish(trainer, trainer.fit(), prepared, run_dir)


def print_plan(the_plan) -> None:
    m, t = the_plan.model, the_plan.trainer
    print(f"plan for {the_plan.budget_s:.0f} s: {m.num_layers} layers x {m.num_dims} wide ({m.num_heads}/"
          f"{m.num_kv_heads} heads, FFN {m.ffn_hidden_dims}), {the_plan.params / 1e6:.2f}M parameters; batch "
          f"{t.batch_size} x {t.max_seq_len}, lr {t.learning_rate:g}; {the_plan.train_seconds:.0f} s of training at "
          f"{the_plan.tokens_per_second:,.0f} tokens/s = {the_plan.tokens / 1e6:.2f}M tokens "
          f"(~{the_plan.steps} steps, {the_plan.epochs:.2f} epochs); probes "
          f"{'cached' if the_plan.probes_cached else f'{the_plan.probe_seconds:.1f} s'}", flush=True)
    print(f"why: {the_plan.reasoning}", flush=True)


def cmd_plan(args: argparse.Namespace) -> int:
    budget = parse_duration(args.budget)
    data_config = apply_overrides({"data": DataConfig(source=args.data, cache_dir=args.cache_dir)}, args.overrides)["data"]
    quiet = args.json
    prepared = prepare(data_config, sequence_length(budget), fallback_to_builtin=True)
    hardware = HardwareProfile.detect()
    the_plan = plan(budget, hardware, prepared.report.train_tokens, len(prepared.tokenizer),
                    spent_seconds=since_launch(), cache_dir=data_config.cache_dir)
    if quiet:
        print(json.dumps(the_plan.summary(), indent=2))
    else:
        print_plan(the_plan)
    return 0


def load_base(base: str) -> tuple[Transformer, object]:
    """A base model and its tokenizer: a Sprat run directory (its latest checkpoint) or a
    Llama-architecture directory saved by `transformers`."""
    path = Path(base)
    if (path / "run.json").exists():
        info = json.loads((path / "run.json").read_text())
        if info.get("finetune"):
            raise ConfigError(f"{path} is a fine-tuning run; fine-tune its merged model (finetune --merge) instead")
        latest = checkpoint.latest(path, on_skip=print)
        if latest is None:
            raise ConfigError(f"{path} has no complete checkpoint")
        model = Transformer(ModelConfig.from_dict(info["model"]))
        model.load_state_dict(checkpoint.load(latest)[0])
        return model, load_tokenizer_dir(path)
    if (path / "config.json").exists():
        return load_hf(path), load_pretrained_tokenizer(str(path))
    raise ConfigError(f"{base}: not a Sprat run directory (run.json) nor a Hugging Face model directory (config.json)")


def build_finetune(info: dict) -> tuple[Transformer, object, LoRAConfig]:
    model, tokenizer = load_base(info["finetune"]["base"])
    lora_config = LoRAConfig.from_dict(info["finetune"]["lora"])
    apply_lora(model, lora_config)
    return model, tokenizer, lora_config


def cmd_finetune(args: argparse.Namespace) -> int:
    model, tokenizer = load_base(args.base)
    configs = {"trainer": TrainerConfig(max_seq_len=args.seq_len, batch_size=args.batch_size, learning_rate=2e-4,
                                        min_lr=2e-5, warmup_ratio=0.03, num_epochs=args.epochs),
               "data": DataConfig(source=args.data, cache_dir=args.cache_dir, format="instruction"),
               "lora": LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, quantize_base=args.qlora)}
    configs = apply_overrides(configs, args.overrides)
    trainer_config, data_config, lora_config = configs["trainer"], configs["data"], configs["lora"]
    if trainer_config.max_seq_len > model.config.context_len:
        raise ConfigError(f"trainer.max_seq_len={trainer_config.max_seq_len} exceeds the base model's context "
                          f"({model.config.context_len})")
    print(f"preparing data from {data_config.source} ...", flush=True)
    prepared = prepare(data_config, trainer_config.max_seq_len, tokenizer=tokenizer)
    report = prepared.report
    print(f"{report.source}: {report.documents_kept} samples ({report.train_documents} train, {report.val_documents} "
          f"validation), {report.train_tokens:,} response tokens; truncated {report.truncated_samples}, "
          f"dropped {report.dropped_samples}", flush=True)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the base model only {model.config.vocab_size}")
    apply_lora(model, lora_config)
    counts = parameter_report(model)
    print(f"LoRA rank {lora_config.rank}{' on a 4-bit NF4 base (QLoRA)' if lora_config.quantize_base else ''}: "
          f"{counts['trainable']:,} trainable of {counts['total']:,} parameters ({counts['share']:.2%})", flush=True)
    run_dir = Path(args.out or trainer_config.path_to_checkpoints) / (args.name or time.strftime("finetune-%Y%m%d-%H%M%S"))
    info = {**run_info(model.config, trainer_config, data_config),
            "finetune": {"base": str(Path(args.base).resolve()), "lora": lora_config.to_dict()}}
    trainer = Trainer(model, trainer_config, prepared.train, prepared.val, run_dir=run_dir, callback=print_event,
                      tokenizer=tokenizer, run_info=info)
    result = trainer.fit()
    return finish_finetune(trainer, result, prepared, run_dir, lora_config, args.base, args.merge)


def finish_finetune(trainer: Trainer, result: TrainResult, prepared, run_dir: Path, lora_config: LoRAConfig,
                    base: str, merge: bool) -> int:
    if trainer.is_main and result.status != "interrupted":
        adapter = save_adapter(trainer.model, run_dir / "adapter", lora_config, base_model=str(base))
        print(f"adapter saved to {adapter} (PEFT format)")
        if merge:
            merged = merge_and_save(trainer.model, run_dir / "merged", prepared.tokenizer)
            print(f"merged model saved to {merged} (Hugging Face layout)")
    prompt = prepared.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                                     add_generation_prompt=True)
    return finish(trainer, result, prepared, run_dir, prompt_text=prompt)


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no run.json)")
    info = json.loads((run_dir / "run.json").read_text())
    configs = {"model": ModelConfig.from_dict(info["model"]), "trainer": TrainerConfig.from_dict(info["trainer"]),
               "data": DataConfig.from_dict(info["data"])}
    configs = apply_overrides(configs, args.overrides)
    if any(o.strip().startswith("model.") for o in args.overrides):
        raise ConfigError("the model of a run cannot change on resume (its checkpoints hold that shape); "
                          "start a new run instead")
    if configs["trainer"].use_ddp:
        start_distributed()
    if args.checkpoint:
        path = run_dir / args.checkpoint
        problem = checkpoint.verify(path) if path.is_dir() else f"{args.checkpoint}: no such checkpoint in {run_dir}"
        if problem:
            raise ConfigError(problem)
    else:
        path = checkpoint.latest(run_dir, on_skip=print)
        if path is None:
            raise ConfigError(f"{run_dir} has no complete checkpoint to resume from")
    tokenizer = load_tokenizer_dir(run_dir)
    if info.get("finetune"):
        model, tokenizer, lora_config = build_finetune(info)
        prepared = prepare(configs["data"], configs["trainer"].max_seq_len, tokenizer=tokenizer)
    else:
        prepared, model_config = build_run(configs["data"], configs["model"], configs["trainer"], tokenizer=tokenizer,
                                           fallback_to_builtin=False)
        model = Transformer(model_config)
    trainer = Trainer(model, configs["trainer"], prepared.train, prepared.val, run_dir=run_dir, callback=print_event)
    trainer.load_checkpoint(path)
    print(f"resuming {run_dir} from {path.name} (step {trainer.global_step})", flush=True)
    result = trainer.fit()
    if info.get("finetune"):
        return finish_finetune(trainer, result, prepared, run_dir, lora_config, info["finetune"]["base"], False)
    return finish(trainer, result, prepared, run_dir)


def start_distributed() -> None:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs)."""
    import os

    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("trainer.use_ddp=yes needs several processes: launch with "
                          "torchrun --nproc_per_node=N train.py train trainer.use_ddp=yes ...")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def load_config_file(path: str, configs: dict) -> dict:
    """Sections `model`, `trainer`, `data` of a JSON file (such as a run's run.json)."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    classes = {"model": ModelConfig, "trainer": TrainerConfig, "data": DataConfig}
    unknown = sorted(set(values) - set(classes) - {"created", "torch"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; expected model, trainer, data")
    updated = dict(configs)
    for section, cls in classes.items():
        if section in values:
            updated[section] = cls.from_dict({**configs[section].to_dict(), **values[section]})
    return updated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Sprat: train small language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (for a time budget, or for its epochs)",
                                description="Train a model. Any config field can be set as SECTION.FIELD=VALUE, "
                                            "e.g. model.num_layers=6 trainer.learning_rate=3e-4 data.subset_size=100.")
    train.add_argument("--budget", default=None, help="time for the whole run: 90s, 20m, 2h, or hours (0.001)")
    train.add_argument("--data", default=BUILTIN, help="'builtin', a local file or folder, or a hub dataset name")
    train.add_argument("--config", default=None, help="JSON file with model / trainer / data sections")
    train.add_argument("--preset", default=None, help=f"model preset; with --budget it skips planning "
                                                      f"(default: planned with --budget, else {DEFAULT_PRESET})")
    train.add_argument("--out", default=None, help="folder for run directories (default trainer.path_to_checkpoints)")
    train.add_argument("--name", default=None, help="run directory name (default run-DATE-TIME)")
    train.add_argument("--cache-dir", default=".cache/sprat", help="cache of tokenized data and trained tokenizers")
    train.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (default 16, or planned)")
    train.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128, or planned)")
    train.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    train.set_defaults(func=cmd_train)
    finetune = commands.add_parser("finetune", help="fine-tune a model with LoRA or QLoRA on instruction data",
                                   description="Fine-tune BASE (a Sprat run directory or a Hugging Face Llama "
                                               "directory) on instruction/chat records (Alpaca, prompt/response or "
                                               "messages); the loss is on the responses only. LoRA fields are "
                                               "settable as lora.FIELD=VALUE.")
    finetune.add_argument("base")
    finetune.add_argument("--data", required=True, help="a local .json/.jsonl/.csv/.parquet file or folder, or a hub dataset")
    finetune.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha defaults to 2 x rank)")
    finetune.add_argument("--qlora", action="store_true", help="quantize the frozen base to 4-bit NF4 (QLoRA)")
    finetune.add_argument("--merge", action="store_true", help="also write the model with the adapter folded in")
    finetune.add_argument("--epochs", type=int, default=3)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument("--seq-len", type=int, default=128)
    finetune.add_argument("--out", default=None, help="folder for run directories (default trainer.path_to_checkpoints)")
    finetune.add_argument("--name", default=None, help="run directory name (default finetune-DATE-TIME)")
    finetune.add_argument("--cache-dir", default=".cache/sprat", help="cache of tokenized data")
    finetune.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    finetune.set_defaults(func=cmd_finetune)
    plan_parser = commands.add_parser("plan", help="print the configuration planned for a time budget",
                                      description="Measure this machine and print the model and trainer "
                                                  "configuration planned for the budget, without training.")
    plan_parser.add_argument("--budget", required=True, help="90s, 20m, 2h, or hours (0.001)")
    plan_parser.add_argument("--data", default=BUILTIN)
    plan_parser.add_argument("--cache-dir", default=".cache/sprat")
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_parser.add_argument("overrides", nargs="*", metavar="data.FIELD=VALUE")
    plan_parser.set_defaults(func=cmd_plan)
    resume = commands.add_parser("resume", help="resume a run from its latest (or a named) checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--checkpoint", default=None, help="checkpoint name, e.g. step_200 or epoch_1")
    resume.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    resume.set_defaults(func=cmd_resume)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may sit between options (`train X=1 --budget 2m Y=2`): collect the stragglers.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
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
