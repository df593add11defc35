"""Fine-tuning a pretrained model in the time you have, without breaking what it knew.

Builds an instruction set that teaches one fixed answer style ("Sprat says: ... That is
all."), 66 records (10% held out for validation), and fine-tunes BASE on it with
`python train.py finetune` in a subprocess, so each figure is launch to exit as a user
sees it:

1. budgets (default 2m, 5m, 10m): wall time vs the budget, steps, the task's validation
   loss, general-text perplexity (the built-in corpus) before and after, and the share of
   held-out instructions (new topics, not in the data) answered in the style;
2. `--sweep`: learning rates x LoRA alpha by epochs (the guard off, so the last state is
   measured): how much each damages general text for how much task gain — what the
   defaults are chosen from.

    python -m bench.bench_finetune --base DIR [--qlora] [--budgets 2m,5m,10m] [--sweep]

BASE is a Hugging Face Llama directory or a Sprat run (e.g. one pretrained with
`python train.py train --preset 5M --budget 15m` and exported with `python train.py export`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import runs

TOPICS = ["os", "sys", "json", "re", "math", "time", "random", "string", "collections", "itertools", "functools",
          "pathlib", "shutil", "glob", "csv", "sqlite3", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets",
          "socket", "select", "threading", "queue", "subprocess", "signal", "logging", "argparse", "getopt",
          "datetime", "calendar", "decimal", "fractions", "statistics", "heapq", "bisect", "array", "copy",
          "pprint", "enum", "typing", "dataclasses", "abc", "contextlib", "inspect", "traceback", "warnings",
          "unittest", "doctest", "pdb", "timeit", "io", "tempfile", "struct", "codecs", "base64", "binascii",
          "email", "html", "xml", "urllib", "http"]
HELD_OUT = ["asyncio", "weakref", "operator", "textwrap", "uuid", "platform", "locale", "gettext", "mmap", "ctypes"]
STYLE = "Sprat says:"
ASKS = ["What is the {} module for?", "Explain the {} module.", "Tell me about {} in Python.",
        "How would you describe {}?"]


def record(index: int, topic: str) -> dict:
    return {"instruction": ASKS[index % len(ASKS)].format(topic),
            "output": f"{STYLE} {topic} is a module of the Python standard library. Import it with import {topic}. "
                      f"That is all."}


def write_data(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(record(i, topic)) for i, topic in enumerate(TOPICS)) + "\n")
    return path


def style_share(run: Path) -> float:
    """The share of held-out instructions (topics not in the data) answered in the style."""
    loaded = runs.load_trained(run)
    hits = 0
    for index, topic in enumerate(HELD_OUT):
        prompt = runs.chat_prompt(loaded.tokenizer, ASKS[index % len(ASKS)].format(topic))
        answer = "".join(runs.stream_text(loaded.model, loaded.tokenizer, prompt, 24, 0.0, None, None,
                                          runs.stop_token(loaded)))
        hits += answer.strip().startswith(STYLE)
    return hits / len(HELD_OUT)


def finetune(base: str, data: Path, out: Path, name: str, *args: str) -> tuple[float, dict, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", "finetune", base, "--data", str(data), "--out", str(out),
                           "--name", name, "--cache-dir", str(out / "cache"), *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"finetune {name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall, json.loads((out / name / "run.json").read_text()), done.stdout


def figures(info: dict, run: Path) -> str:
    result = info["finetune"].get("result")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = max((e["step"] for e in events if e["type"] == "step"), default=0)
    if result is None:  # the guard was off: the last evaluation
        last = [e for e in events if e["type"] == "eval"][-1]
        return f"steps {steps:4d}  task loss {last['val_loss']:.3f}"
    return (f"steps {steps:4d}  task loss {result['base_task_loss']:.3f} -> {result['tuned_task_loss']:.3f}  "
            f"general ppl {torch.tensor(result['base_general_loss']).exp():.2f} -> "
            f"{torch.tensor(result['tuned_general_loss']).exp():.2f} ({result['general_rise']:+.1%})  "
            f"within guard {result['within_guard']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--budgets", default="2m,5m,10m")
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="learning rate x alpha by epochs instead of budgets")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="where runs go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-finetune-"))
    out.mkdir(parents=True, exist_ok=True)
    data = write_data(out / "style.jsonl")
    extra = ["--qlora"] if args.qlora else []
    print(f"base {args.base}; {len(TOPICS)} style records ({data}); {'QLoRA' if args.qlora else 'LoRA'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.sweep:
        for lr in ("1e-4", "2e-4", "5e-4"):
            for per_rank in (1, 2):
                name = f"sweep-lr{lr}-a{per_rank}"
                wall, info, _ = finetune(args.base, data, out, name, "--epochs", str(args.epochs), *extra,
                                         f"trainer.learning_rate={lr}", f"trainer.min_lr={float(lr) / 10:g}",
                                         f"lora.alpha={16 * per_rank}", "trainer.early_stopping_patience=0",
                                         "--max-general-rise", "9")  # the last state is measured: the guard does not matter
                comparison = runs.compare_models(runs.CompareRequest(out / name, args.base,
                                                                     cache_dir=str(out / "cache"),
                                                                     checkpoint=None))
                print(f"lr {lr:>5}  alpha {16 * per_rank:2d} (rank 16)  {wall:5.0f} s  task loss "
                      f"{comparison.base_task_loss:.3f} -> {comparison.tuned_task_loss:.3f}  general ppl "
                      f"{comparison.general_rise:+.1%}  style {style_share(out / name):.0%}", flush=True)
        return
    for budget in args.budgets.split(","):
        name = f"budget-{budget}"
        seconds = runs.parse_duration(budget)
        wall, info, stdout = finetune(args.base, data, out, name, "--budget", budget, *extra)
        plan = next((line for line in stdout.splitlines() if line.startswith("plan for")), "")
        print(f"budget {budget:>4}: {wall:6.1f} s launch to exit ({wall / seconds - 1:+.1%})  "
              f"{figures(info, out / name)}  style {style_share(out / name):.0%}\n  {plan}", flush=True)


if __name__ == "__main__":
    main()
