"""Sprat's entry point: the command line.

`python train.py` on a terminal opens the wizard (wizard.py); `python train.py COMMAND`
runs one job without a terminal: train, finetune, resume, generate, eval, export, plan,
check, config. Each command turns its arguments into a typed request for runs.py and
prints what comes back; the operations themselves live there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

import checkpoint
import runs
from config_editor import render_table
from config_io import ConfigError, apply_overrides, save_configs
from data import BUILTIN, DataError
from display import WaitDisplay, check_table, comparison_text, display_for, report_outcome
from gguf_io import QUANTS
from lora import LoRAConfig
from model import PRESETS
from runs import DEFAULT_CACHE, DEFAULT_PRESET, SECTIONS, since_launch
from trainer import TrainerConfig


def output_console() -> Console:
    """stdout as rich sees it: colours and live displays on a terminal, plain unwrapped
    lines in a pipe or a log."""
    console = Console(soft_wrap=True, highlight=False)
    return console if console.is_terminal else Console(soft_wrap=True, highlight=False, width=1000)


def show_table(console: Console, table: Table) -> None:
    """A table as drawn boxes on a terminal; in a pipe or a log, Markdown rows (ASCII,
    one line per row, cells not padded) for grep and diff."""
    if console.is_terminal:
        console.print(table)
        return
    for line in markdown_lines(table):
        console.print(line, markup=False, highlight=False)


def markdown_lines(table: Table) -> list[str]:
    """A rich table as its title and unpadded Markdown rows (`| a | b |`)."""
    def plain(cell) -> str:
        text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
        return " ".join(text.split()).replace("|", "\\|")

    columns = [[plain(cell) for cell in column.cells] for column in table.columns]
    lines = [plain(table.title)] if table.title else []
    lines.append("| " + " | ".join(plain(column.header) for column in table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in zip(*columns)]
    return lines


def say_to(console: Console):
    return lambda text: console.print(text, markup=False)


def note(text: str) -> None:
    """News beside a command's own output (generated text, JSON): on stderr."""
    print(text, file=sys.stderr)


def run_with_display(console: Console, operation, request) -> int:
    """A training operation with the live display (lines in a pipe, those of the data
    preparation's progress on stderr), then its report."""
    display = display_for(console, waiting=Console(stderr=True, highlight=False))
    with display:
        outcome = operation(request, display, say_to(console))
    return report_outcome(console, outcome, display.history)


# ---- commands ---------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, console: Console) -> int:
    request = runs.TrainRequest(budget=args.budget, data=args.data, config_file=args.config, preset=args.preset,
                                out=args.out, name=args.name, cache_dir=args.cache_dir, batch_size=args.batch_size,
                                seq_len=args.seq_len, overrides=args.overrides, overwrite=args.overwrite,
                                started=args.started, remeasure=args.remeasure)
    return run_with_display(console, runs.train, request)


def cmd_finetune(args: argparse.Namespace, console: Console) -> int:
    request = runs.FinetuneRequest(base=args.base, data=args.data, rank=args.rank, qlora=args.qlora, merge=args.merge,
                                   epochs=args.epochs, budget=args.budget, batch_size=args.batch_size,
                                   seq_len=args.seq_len, general_data=general_source(args.general_data),
                                   max_general_rise=args.max_general_rise, replay=args.replay, out=args.out,
                                   name=args.name,
                                   cache_dir=args.cache_dir, overrides=args.overrides, overwrite=args.overwrite,
                                   started=args.started)
    return run_with_display(console, runs.finetune, request)


def cmd_resume(args: argparse.Namespace, console: Console) -> int:
    request = runs.ResumeRequest(args.run_dir, args.checkpoint, args.overrides)
    return run_with_display(console, runs.resume, request)


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    with WaitDisplay(Console(stderr=True, highlight=False)) as waiting:  # progress beside the plan, not in it
        the_plan = runs.plan_budget(args.budget, args.data, args.cache_dir, args.overrides,
                                    say=note if args.json else say_to(console), started=args.started,
                                    remeasure=args.remeasure, progress=waiting)
    if args.json:
        print(json.dumps(the_plan.summary(), indent=2))
    else:
        console.print(the_plan.describe(), markup=False)
    return 0


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    loaded = runs.load_trained(args.run_dir, args.checkpoint, say=note)
    prompt = runs.chat_prompt(loaded.tokenizer, args.prompt) if args.chat else args.prompt
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in runs.stream_text(loaded.model, loaded.tokenizer, prompt, args.max_new_tokens, args.temperature,
                                  args.top_k, args.top_p, runs.stop_tokens(loaded), args.seed,
                                  runs.with_special_tokens(loaded, args.chat)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def eval_line(result: runs.EvalResult) -> str:
    return (f"{result.model} ({result.checkpoint or 'weights'}) on the {result.split} split of {result.data}: "
            f"loss {result.loss:.4f}, perplexity {result.perplexity:.2f} ({result.sequences} sequences of "
            f"{result.seq_len} tokens, {result.seconds:.1f} s)")


def general_source(value: str) -> Optional[str]:
    return None if value.lower() in ("none", "off", "no") else value


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    waiting = WaitDisplay(Console(stderr=True, highlight=False))  # progress beside the result, not in it
    if args.compare:
        request = runs.CompareRequest(args.run_dir, args.compare, args.data, args.general_data,
                                      args.max_general_rise, args.checkpoint, args.cache_dir)
        with waiting:
            comparison = runs.compare_models(request, say=note, progress=waiting)
        if args.json:
            print(json.dumps(comparison.to_dict(), indent=2))
        else:
            console.print(comparison_text(comparison), markup=False)
        return 0
    request = runs.EvalRequest(args.run_dir, args.checkpoint, args.data, args.split, args.max_batches,
                               args.batch_size, args.seq_len, args.cache_dir)
    with waiting:
        result = runs.evaluate_model(request, runs.load_trained(request.model, request.checkpoint, say=note), waiting,
                                     say=note)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(eval_line(result), markup=False)
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    loaded = runs.load_trained(args.run_dir, args.checkpoint, say=say_to(console))
    started = time.perf_counter()
    path = runs.export_model(loaded, Path(args.out), args.format, args.quant)
    merged = " with the adapter merged" if loaded.kind == "finetuned" else ""
    if args.format == "gguf":
        console.print(f"exported {loaded.source} ({loaded.checkpoint or loaded.kind}) to {path}{merged} (GGUF "
                      f"{args.quant}, {path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s) and "
                      f"an Ollama Modelfile beside it; run it with llama.cpp (llama-cli -m {path}) or "
                      f"`ollama create NAME -f {path.parent / 'Modelfile'}`", markup=False)
        return 0
    layout = "Mixtral" if loaded.model.config.use_moe else "Llama"
    console.print(f"exported {loaded.source} ({loaded.checkpoint or loaded.kind}) to {path} in the Hugging Face "
                  f"{layout} layout{merged}; load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})", markup=False)
    return 0


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    from system_check import HardwareManager, SystemCheck

    runs.settle_precision(TrainerConfig(), runs.DEFAULT_CACHE)  # the CPU's precision as training will find it
    report = SystemCheck(checkpoint_dir=args.out).run_all()
    hardware = HardwareManager()
    if args.json:
        print(json.dumps({**report.to_dict(), "hardware": hardware.to_dict()}, indent=2))
    else:
        show_table(console, check_table(report, hardware))
    return 0 if report.ok else 1


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    configs = {**runs.default_configs(args.preset), "lora": LoRAConfig()}
    if args.action == "show":
        if args.file:
            configs = runs.load_config_file(args.file, configs)
        for section in [args.section] if args.section else list(configs):
            show_table(console, render_table(configs[section], f"{section} ({type(configs[section]).__name__})"))
        return 0
    if not args.file:
        raise ConfigError(f"config {args.action} needs a FILE (a .json or .yaml path)")
    if args.action == "validate":
        loaded = runs.load_config_file(args.file, configs)
        model, trainer = loaded["model"], loaded["trainer"]
        console.print(f"{args.file}: valid ({model.num_params() / 1e6:.2f}M parameters, "
                      f"{trainer.tokens_per_step:,} tokens per optimizer step)", markup=False)
        return 0
    if not args.overrides:
        raise ConfigError("config set needs SECTION.FIELD=VALUE assignments, e.g. model.num_layers=6")
    if Path(args.file).exists():
        configs = runs.load_config_file(args.file, configs)
    configs = apply_overrides(configs, args.overrides)
    path = save_configs(args.file, configs)
    console.print(f"saved {path}: " + ", ".join(o.strip() for o in args.overrides), markup=False)
    return 0


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


def add_guard_arguments(parser: argparse.ArgumentParser, from_run: bool = False) -> None:
    """The guard's options; `from_run` (eval --compare): default to what the fine-tune used."""
    default = "the fine-tune's" if from_run else "builtin"
    parser.add_argument("--general-data", default=None if from_run else BUILTIN,
                        help=f"held-out general text whose perplexity the fine-tune must not raise ('builtin', a file "
                             f"or folder; 'none' turns the guard off; default {default})")
    parser.add_argument("--max-general-rise", type=rise_fraction,
                        default=None if from_run else runs.FinetuneRequest.max_general_rise,
                        help=f"the guard's limit on the general-text perplexity rise (0.05 = 5%%, or 5%%; default "
                             f"{'the fine-tune' + chr(39) + 's' if from_run else '5%%'})")


def rise_fraction(text: str) -> float:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"{text}: a fraction such as 0.05, or a percentage such as 5%")
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
    train.add_argument("--remeasure", action="store_true", help="with --budget: measure this machine again (ignore "
                                                                 "the cached precision and probes)")
    train.add_argument("--data", default=BUILTIN, help="'builtin', a local file or folder, or a hub dataset name")
    train.add_argument("--config", default=None, help="JSON or YAML file with model / trainer / data sections")
    train.add_argument("--preset", default=None, choices=list(PRESETS), help=f"model preset; with --budget it skips "
                       f"planning (default: planned with --budget, else {DEFAULT_PRESET})")
    train.add_argument("--out", default=None, help="folder for run directories (default trainer.path_to_checkpoints)")
    train.add_argument("--name", default=None, help="run directory name (default run-DATE-TIME)")
    train.add_argument("--overwrite", action="store_true", help="start over where a run named --name exists (it is "
                                                                 "moved to NAME.replaced-DATE, not deleted)")
    train.add_argument("--cache-dir", default=DEFAULT_CACHE, help="cache of tokenized data and trained tokenizers")
    train.add_argument("--batch-size", type=positive_int, default=None, help=f"sequences per micro-batch (default {TrainerConfig.batch_size}, or planned)")
    train.add_argument("--seq-len", type=positive_int, default=None, help=f"tokens per sequence (default {TrainerConfig.max_seq_len}, or planned)")
    train.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    train.set_defaults(func=cmd_train)

    finetune = commands.add_parser("finetune", help="fine-tune a model with LoRA or QLoRA on instruction data",
                                   description="Fine-tune BASE (a Sprat run directory or a Hugging Face Llama "
                                               "directory) on instruction/chat records (Alpaca, prompt/response or "
                                               "messages); the loss is on the responses only. LoRA fields are "
                                               "settable as lora.FIELD=VALUE.")
    finetune.add_argument("base", help="a Sprat run directory, a Hugging Face Llama directory or a .gguf file")
    finetune.add_argument("--data", required=True, help="a local .json/.jsonl/.csv/.parquet file or folder, or a hub dataset")
    finetune.add_argument("--rank", type=positive_int, default=runs.FinetuneRequest.rank, help="LoRA rank (alpha defaults to 2 x rank)")
    finetune.add_argument("--qlora", action="store_true", help="quantize the frozen base to 4-bit NF4 (QLoRA)")
    finetune.add_argument("--merge", action="store_true", help="also write the model with the adapter folded in")
    finetune.add_argument("--budget", default=None, help="time from launch to exit (90s, 5m, 1h): micro-batch, steps and "
                                                         "schedule planned from measurements of BASE on this device")
    finetune.add_argument("--epochs", type=positive_int, default=runs.FinetuneRequest.epochs, help="without --budget")
    finetune.add_argument("--batch-size", type=positive_int, default=None,
                          help=f"sequences per micro-batch (default {runs.FINETUNE_BATCH}, or planned)")
    finetune.add_argument("--seq-len", type=positive_int, default=None,
                          help="tokens per sample (default: the data's longest record, within the base's context)")
    add_guard_arguments(finetune)
    finetune.add_argument("--replay", type=non_negative_float, default=runs.FinetuneRequest.replay,
                          help="general text trained on alongside the task, from --general-data's training side (never "
                               "what the guard measures): general target tokens per task target token (0 turns it "
                               f"off; default {runs.FinetuneRequest.replay:g})")
    finetune.add_argument("--out", default=None, help="folder for run directories (default trainer.path_to_checkpoints)")
    finetune.add_argument("--name", default=None, help="run directory name (default finetune-DATE-TIME)")
    finetune.add_argument("--overwrite", action="store_true", help="start over where a run named --name exists (it is "
                                                                    "moved aside, not deleted)")
    finetune.add_argument("--cache-dir", default=DEFAULT_CACHE, help="cache of tokenized data")
    finetune.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    finetune.set_defaults(func=cmd_finetune)

    resume = commands.add_parser("resume", help="resume a run from its latest (or a named) checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--checkpoint", default=None, help="checkpoint name, e.g. step_200 or epoch_1")
    resume.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE")
    resume.set_defaults(func=cmd_resume)

    model_help = ("a run directory (latest checkpoint), one of its checkpoint directories, a Hugging Face model "
                  "directory, or a .gguf file")
    generate = commands.add_parser("generate", help="generate text with a trained model",
                                   description="Continue PROMPT with a trained model, streaming the text.")
    generate.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    generate.add_argument("--prompt", required=True)
    sampling = runs.GenerateSettings()
    generate.add_argument("--max-new-tokens", type=positive_int, default=sampling.max_new_tokens)
    generate.add_argument("--temperature", type=non_negative_float, default=sampling.temperature, help="0 is greedy")
    generate.add_argument("--top-k", type=positive_int, default=sampling.top_k)
    generate.add_argument("--top-p", type=probability, default=sampling.top_p)
    generate.add_argument("--seed", type=int, default=None, help="for a repeatable sample")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (fine-tuned models)")
    generate.add_argument("--checkpoint", default=None, help="checkpoint name (default: the latest)")
    generate.set_defaults(func=cmd_generate)

    evaluation = commands.add_parser("eval", help="loss and perplexity of a trained model",
                                     description="Evaluate a trained model on the validation split of its run's "
                                                 "data, or of --data.")
    evaluation.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    evaluation.add_argument("--data", default=None, help="another dataset ('builtin', a file or folder, a hub name)")
    evaluation.add_argument("--split", default=runs.EvalRequest.split, choices=("val", "train"))
    evaluation.add_argument("--max-batches", type=positive_int, default=None, help="evaluate only this many batches")
    evaluation.add_argument("--batch-size", type=positive_int, default=runs.EvalRequest.batch_size)
    evaluation.add_argument("--seq-len", type=positive_int, default=None, help="default: the run's sequence length")
    evaluation.add_argument("--cache-dir", default=None, help="cache of tokenized data (default: the run's)")
    evaluation.add_argument("--checkpoint", default=None, help="checkpoint name (default: the latest)")
    evaluation.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluation.add_argument("--compare", metavar="BASE", default=None,
                            help="compare RUN_DIR with BASE: task loss on the validation split and general-text "
                                 "perplexity, base vs fine-tuned, change in %%")
    add_guard_arguments(evaluation, from_run=True)
    evaluation.set_defaults(func=cmd_eval)

    export = commands.add_parser("export", help="export a trained model (Hugging Face layout or GGUF)",
                                 description="Write a trained model where `transformers` (hf: Llama, or Mixtral for "
                                             "MoE) or llama.cpp / Ollama (gguf) loads it; fine-tuned runs are "
                                             "exported with the adapter merged in.")
    export.add_argument("run_dir", metavar="RUN_DIR", help=model_help)
    export.add_argument("--format", default=runs.DEFAULT_EXPORT_FORMAT, choices=runs.EXPORT_FORMATS,
                        help="hf: safetensors + config.json + tokenizer; gguf: one .gguf file + an Ollama Modelfile")
    export.add_argument("--quant", default=runs.DEFAULT_GGUF_QUANT, choices=QUANTS,
                        help=f"GGUF tensor type (default {runs.DEFAULT_GGUF_QUANT})")
    export.add_argument("--out", required=True, help="a new (or empty) directory")
    export.add_argument("--checkpoint", default=None, help="checkpoint name (default: the latest)")
    export.set_defaults(func=cmd_export)

    plan_parser = commands.add_parser("plan", help="print the configuration planned for a time budget",
                                      description="Measure this machine and print the model and trainer "
                                                  "configuration planned for the budget, without training.")
    plan_parser.add_argument("--budget", required=True, help="90s, 20m, 2h, or hours (0.001)")
    plan_parser.add_argument("--data", default=BUILTIN)
    plan_parser.add_argument("--cache-dir", default=DEFAULT_CACHE)
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_parser.add_argument("--remeasure", action="store_true", help="measure this machine again (ignore the cached "
                                                                      "precision and probes)")
    plan_parser.add_argument("overrides", nargs="*", metavar="data.FIELD=VALUE")
    plan_parser.set_defaults(func=cmd_plan)

    check = commands.add_parser("check", help="check this machine: Python, GPU, CPU, RAM, disk, packages, hub")
    check.add_argument("--out", default=TrainerConfig.path_to_checkpoints,
                       help="where checkpoints go (its free disk space is checked)")
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
    """The command line. A budget counts from this process's start (imports included) when
    it runs as `python train.py`, and from this call for a caller that passes `argv` (tests,
    scripts in a long-lived process)."""
    started = None if argv is None else time.time()
    parser = build_parser()
    # Overrides may sit between options (`train X=1 --budget 2m Y=2`): collect the stragglers.
    args, extra = parser.parse_known_args(argv)
    args.started = started
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
    except runs.RunInUse as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as error:
        print(f"error: out of memory outside the training step ({str(error).splitlines()[0]}); use a smaller "
              f"model or batch (model.num_layers=..., trainer.batch_size=..., trainer.eval_steps=...)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`check --json | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except OSError as error:
        print(f"error: {error.strerror or error} ({getattr(error, 'filename', '') or 'I/O'})", file=sys.stderr)
        return 1
    except RecursionError:
        print("error: an input file is nested too deeply to read (hostile or broken JSON?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped without saving (interrupted twice, or outside training)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
