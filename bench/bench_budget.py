"""Time-budget planning against LightLM's fixed table, on this machine.

For each budget: `python train.py train --budget B` (our plan) and LightLM's table
configuration for the same budget trained on the same data under the same deadline
(`--preset` fixes the model; other fields are the project's defaults: batch 8 x 256,
learning rate 1e-3, the schedule on the clock). Both final models are then evaluated on
the same validation blocks (the built-in corpus' split, 128-token sequences).
Prints: budget, planned shape, wall time, error %, probe seconds, val loss ours vs table.

    python -m bench.bench_budget [--budgets 60,180,600]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import checkpoint
from data import DataConfig, prepare
from model import ModelConfig, Transformer
from trainer import evaluate


def lightlm_table(budget_s: float) -> list[str]:
    """LightLM's optimize_for_time_target tiers as train.py arguments."""
    hours = budget_s / 3600
    if hours < 0.01:
        return ["--preset", "tiny", "model.num_layers=1", "model.num_dims=64", "model.ffn_hidden_dims=256",
                "model.context_len=128", "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=8192",
                "--seq-len", "64", "--batch-size", "4", "data.subset_size=20"]
    if hours < 0.1:  # 4 layers x 256 (the 5M preset), 5% of the data
        return ["--preset", "5M", "--seq-len", "256", "--batch-size", "8", "data.subset_size=40"]
    if hours < 0.5:  # 12 layers x 512, 10% of the data
        return ["--preset", "30M", "model.num_layers=12", "--seq-len", "256", "--batch-size", "8",
                "data.subset_size=81"]
    return ["--preset", "60M", "model.num_layers=20", "model.num_dims=768", "model.num_heads=12",
            "model.num_kv_heads=4", "--seq-len", "256", "--batch-size", "8", "data.subset_size=161"]


def run(args: list[str], name: str, out: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", "train", "--out", str(out), "--name", name, *args],
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-2000:]}")
    return wall, result.stdout


def final_val_loss(run_dir: Path, val) -> float:
    info = json.loads((run_dir / "run.json").read_text())
    model = Transformer(ModelConfig.from_dict(info["model"]))
    model.load_state_dict(checkpoint.load(checkpoint.latest(run_dir))[0])
    return evaluate(model, val, batch_size=8, max_batches=25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="60,180,600")
    args = parser.parse_args()
    val = prepare(DataConfig(), 128).val  # the shared yardstick (cached after the first run)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        for budget in [float(b) for b in args.budgets.split(",")]:
            wall, stdout = run(["--budget", f"{budget:g}s"], f"ours-{budget:g}", out)
            planned = re.search(r"plan for .*?: (.*?), ([\d.]+M) parameters", stdout)
            probe = re.search(r"probes ([\d.]+) s", stdout)
            _, _ = run(["--budget", f"{budget:g}s", *lightlm_table(budget)], f"table-{budget:g}", out)
            ours = final_val_loss(out / f"ours-{budget:g}", val)
            table = final_val_loss(out / f"table-{budget:g}", val)
            rows.append((budget, f"{planned.group(1)} ({planned.group(2)})" if planned else "?", wall,
                         100 * (wall - budget) / budget, float(probe.group(1)) if probe else 0.0, ours, table))
            print(f"budget {budget:5.0f} s | ours: {rows[-1][1]} | wall {wall:6.1f} s ({rows[-1][3]:+.1f}%) | "
                  f"probe {rows[-1][4]:.1f} s | val loss ours {ours:.3f} vs table {table:.3f}", flush=True)
    print("\n| budget | planned shape | wall time | error | probe | val loss ours | val loss table |")
    print("|---|---|---|---|---|---|---|")
    for budget, shape, wall, error, probe, ours, table in rows:
        print(f"| {budget:.0f} s | {shape} | {wall:.1f} s | {error:+.1f}% | {probe:.1f} s | {ours:.3f} | {table:.3f} |")



if __name__ == "__main__":
    main()
