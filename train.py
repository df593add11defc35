"""Sprat's entry point: `python train.py SUBCOMMAND ...`.

For now one subcommand, `train`, runs the placeholder main job: a small fixed-shape model
trained on the built-in corpus (or `--data`) for a time budget. The wizard, the planner
and the other subcommands land with their issues.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import psutil
import torch

from budget import parse_duration
from data import BUILTIN, DataConfig, DataError, prepare
from export import save_hf
from model import ModelConfig, Transformer
from trainer import ThreadedDataLoader, evaluate, train_until

def batches_forever(loader: ThreadedDataLoader):
    """Batches across epochs, for a loop that stops on time rather than on data."""
    while True:
        yield from loader


def since_launch() -> float:
    """Seconds since this process started (imports included)."""
    return time.time() - psutil.Process().create_time()


def cmd_train(args: argparse.Namespace) -> int:
    seconds = parse_duration(args.budget)
    torch.manual_seed(args.seed)
    data_config = DataConfig(source=args.data, subset_size=args.documents, seed=args.seed, cache_dir=args.cache_dir)
    print(f"preparing data from {data_config.source} ...", flush=True)
    prepared = prepare(data_config, args.seq_len, fallback_to_builtin=True)
    report = prepared.report
    for note in report.notes:
        print(f"note: {note}")
    print(f"{report.source}: {report.documents_kept} documents, {report.train_tokens:,} training and "
          f"{report.val_tokens:,} validation tokens ({'cached' if report.cached else f'{report.seconds:.1f} s'})")
    config = ModelConfig(vocab_size=len(prepared.tokenizer), num_dims=128, num_heads=4, num_kv_heads=2,
                         num_layers=4, ffn_hidden_dims=352, context_len=args.seq_len)
    model = Transformer(config)
    remaining = seconds - since_launch() - 6.0  # keep ~6 s for the last step, evaluation, saving, sampling
    if remaining < 1.0:
        raise ValueError(f"a budget of {args.budget} leaves no time to train after start-up and data preparation "
                         f"({since_launch():.0f} s); give at least {since_launch() + 10:.0f}s")
    print(f"model {config.num_params() / 1e6:.2f}M parameters; training for {remaining:.0f} s "
          f"on {torch.get_num_threads()} CPU threads", flush=True)

    def report_step(step: int, loss: float, elapsed: float) -> None:
        if step % 25 == 0:
            print(f"step {step:5d}  loss {loss:.3f}  {elapsed:6.1f}s", flush=True)

    loader = ThreadedDataLoader(dataset=prepared.train, batch_size=args.batch_size, seed=args.seed)
    steps = train_until(model, batches_forever(loader), remaining, on_step=report_step)
    loader.close()
    val_loss = evaluate(model, prepared.val, args.batch_size, max_batches=4)
    out = Path(args.out) / time.strftime("run-%Y%m%d-%H%M%S")
    save_hf(model, out, prepared.tokenizer)
    prompt = torch.tensor([prepared.tokenizer("def ", add_special_tokens=False)["input_ids"]])
    sample = model.generate(prompt, 60, temperature=0.8, top_k=40)
    print(f"{steps} steps; validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}); saved to {out}")
    print("sample:\n" + prepared.tokenizer.decode(sample[0].tolist()))
    print(f"finished in {since_launch():.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Sprat: train small language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model for a time budget")
    train.add_argument("--budget", default="2m", help="time to train: 90s, 20m, 2h, or hours (0.001)")
    train.add_argument("--data", default=BUILTIN, help="'builtin', a local file or folder, or a hub dataset name")
    train.add_argument("--out", default="checkpoints", help="directory for run folders")
    train.add_argument("--cache-dir", default=".cache/sprat", help="cache of tokenized data and trained tokenizers")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--documents", type=int, default=None, help="use only the first N documents")
    train.add_argument("--seed", type=int, default=1998)
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
