"""Trainer overhead and checkpoint speed.

1. Steps/s of `Trainer.fit` vs a bare loop (forward, backward, clip, AdamW) over the same
   model shape and the same batches, alternating rounds, medians. Target: overhead <= 5%
   on CPU for the tiny and ~5M configurations.
2. Checkpoint save and load time (model + optimizer state) for a ~30M model.
3. fp32 vs bf16 autocast training steps on this device (why CPU defaults to fp32).

    python -m bench.bench_trainer
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
from bench.common import median
from data import PackedBlocks
from model import ModelConfig, Transformer
from trainer import Trainer, TrainerConfig, build_optimizer, learning_rate_at


def bare_loop(model, optimizer, batches, config: TrainerConfig, total_steps: int) -> None:
    for step, (x, y) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total_steps, config)
        _, loss, _ = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def overhead(preset: str, steps: int, rounds: int, batch_size: int, seq_len: int) -> tuple[float, float]:
    model_config = ModelConfig.from_name(preset, context_len=max(seq_len, ModelConfig.from_name(preset).context_len))
    stream = np.random.default_rng(0).integers(0, model_config.vocab_size, steps * batch_size * seq_len + 1)
    data = PackedBlocks.from_stream(stream.astype(np.int32), seq_len)
    config = TrainerConfig(batch_size=batch_size, max_seq_len=seq_len, max_steps=steps, use_epoch_checkpoints=False,
                           log_interval=10)
    batches = [data.batch(np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(steps)]
    bare_times, trainer_times = [], []
    def run_bare() -> float:
        torch.manual_seed(0)
        model = Transformer(model_config)
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        start = time.perf_counter()
        bare_loop(model, optimizer, batches, config, steps)
        return time.perf_counter() - start

    def run_trainer() -> float:
        torch.manual_seed(0)
        trainer = Trainer(Transformer(model_config), config, data)
        start = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - start

    for round_index in range(rounds + 1):  # round 0 warms up both; the order alternates
        if round_index % 2:
            bare, managed = run_bare(), run_trainer()
        else:
            managed, bare = run_trainer(), run_bare()
        if round_index:
            bare_times.append(bare)
            trainer_times.append(managed)
    return steps / median(bare_times), steps / median(trainer_times)


def precision_speed(preset: str, steps: int, rounds: int, batch_size: int, seq_len: int) -> dict[str, float]:
    """Training steps/s with fp32 and with bf16 autocast, alternating."""
    config = ModelConfig.from_name(preset, context_len=max(seq_len, ModelConfig.from_name(preset).context_len))
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for round_index in range(rounds + 1):
        for name in times:
            torch.manual_seed(0)
            model = Transformer(config)
            optimizer = build_optimizer(model, TrainerConfig(), torch.device("cpu"))
            start = time.perf_counter()
            for _ in range(steps):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bfloat16"):
                    _, loss, _ = model(x, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: steps / median(values) for name, values in times.items()}


def checkpoint_speed(preset: str) -> tuple[float, float, float]:
    model = Transformer(ModelConfig.from_name(preset))
    optimizer = build_optimizer(model, TrainerConfig(), torch.device("cpu"))
    for param in model.parameters():  # populate AdamW's state as training would
        param.grad = torch.zeros_like(param)
    optimizer.step()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = checkpoint.save(Path(folder) / "step_1", model.state_dict(), optimizer.state_dict(), {"global_step": 1})
        saved = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        start = time.perf_counter()
        model_state, optimizer_state, _ = checkpoint.load(path)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        loaded = time.perf_counter() - start
    return saved, loaded, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,5M")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpoint-preset", default="30M")
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    shapes = {"tiny": (8, 16), "5M": (4, 128)}
    for preset in args.presets.split(","):
        batch_size, seq_len = shapes.get(preset, (4, 128))
        bare, managed = overhead(preset, args.steps, args.rounds, batch_size, seq_len)
        print(f"{preset:>5} (batch {batch_size} x {seq_len}): bare loop {bare:7.2f} steps/s, Trainer.fit "
              f"{managed:7.2f} steps/s, overhead {bare / managed - 1:+.1%}", flush=True)
    rates = precision_speed("5M", 3, 2, 4, 128)
    print(f"   5M (batch 4 x 128) on CPU: fp32 {rates['float32']:.2f} steps/s, bf16 autocast "
          f"{rates['bfloat16']:.2f} steps/s ({rates['bfloat16'] / rates['float32']:.2f}x)", flush=True)
    saved, loaded, size = checkpoint_speed(args.checkpoint_preset)
    print(f"checkpoint of {args.checkpoint_preset} ({size:.0f} MB with AdamW state): save {saved:.2f} s "
          f"(incl. SHA-256 and fsync), load {loaded:.2f} s (incl. verification)")


if __name__ == "__main__":
    main()
