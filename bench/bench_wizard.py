"""The wizard, measured.

1. LightLM's walkthrough (2, 5, 0.001, y, 7, 1) on the real `python train.py` under a
   pseudo-terminal, timed phase by phase, cold (empty cache) then warm. The peer is the
   budget itself: the training phase (from the start of training to the saved
   checkpoint, as the trainer recorded it) against LightLM's 0.001 h = 3.6 s. Prints per
   run: seconds to the first menu, to the plan, of training (and its error against the
   budget), from "1" to the menu again, and the steps trained.
2. Start training's time estimate for fixed presets (menu 2 → 3, max_steps set in the
   table, then 1): the estimate on the summary screen (a few measured steps of the model)
   against the run's real training time, next to the estimate the planner's cost model
   (batch-2 probes of three small shapes) would have given for the same configuration.

    python -m bench.bench_wizard [--budget 0.001] [--estimates 2M:30,15M:8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pexpect
from rich.console import Console

import checkpoint
from budget import CostModel, HardwareProfile, parse_duration, probe
from wizard import Wizard

ROOT = Path(__file__).resolve().parent.parent
MENU = r"Select option \(1-[89]\): "


def walkthrough(cwd: Path, budget: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "LINES": "40"}
    started = time.perf_counter()
    child = pexpect.spawn(sys.executable, [str(ROOT / "train.py")], cwd=str(cwd), env=env, encoding="utf-8",
                          timeout=300, dimensions=(40, 120))
    marks = {}
    child.expect(MENU)
    marks["first menu"] = time.perf_counter() - started
    child.sendline("2")
    child.expect(MENU)
    child.sendline("5")
    child.expect("desired training time")
    child.sendline(budget)
    asked = time.perf_counter()
    child.expect("Apply these")
    marks["plan"] = time.perf_counter() - asked
    child.sendline("y")
    child.expect(MENU)
    child.sendline("7")
    child.expect(MENU)
    child.sendline("1")
    pressed = time.perf_counter()
    child.expect("sample:")
    child.expect(MENU)
    marks["to menu"] = time.perf_counter() - pressed
    child.sendline("3")
    child.expect(pexpect.EOF)
    child.close()
    (run,) = (cwd / "checkpoints").iterdir()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finished = next(e for e in events if e["type"] == "finished")
    marks["training"] = finished["elapsed_s"]
    marks["steps"] = checkpoint.read_state(checkpoint.latest(run))["global_step"]
    marks["exit code"] = child.exitstatus
    return marks


def estimate(preset: str, steps: int, cache_dir: str, out_dir: Path) -> dict:
    """The summary's estimated training time for `preset` capped at `steps`, the cost
    model's, and the time the run really took (trainer's clock, final evaluation excluded
    by evaluating one batch)."""
    keys = ["2", "3", preset, "6", "2", f"max_steps={steps} eval_steps=1", "", "7", "1", "y", "3"]
    screen = io.StringIO()
    wizard = Wizard(Console(file=screen, width=200, color_system=None), io.StringIO("\n".join(keys) + "\n"),
                    out_dir=out_dir / preset, cache_dir=cache_dir, run_checks=False)
    wizard.run()
    text = screen.getvalue()
    rate = float(re.search(r"at ([\d,]+) tokens/s \(measured", text).group(1).replace(",", ""))
    model, trainer = wizard.configs["model"], wizard.configs["trainer"]
    tokens = steps * trainer.tokens_per_step
    probes, _ = probe(HardwareProfile.detect(), model.vocab_size, trainer.max_seq_len, 2, 0.3, cache_dir)
    cost_rate = 1.0 / CostModel.fit(probes).seconds_per_token(model.flops_per_token(trainer.max_seq_len))
    (run,) = (out_dir / preset).iterdir()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finished = next(e for e in events if e["type"] == "finished")
    return {"preset": preset, "steps": steps, "estimate": tokens / rate, "cost model": tokens / cost_rate,
            "actual": finished["elapsed_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="0.001", help="what to type at 'desired training time'")
    parser.add_argument("--estimates", default="2M:30,15M:8", help="PRESET:STEPS,... for the estimate check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [estimate(preset, int(steps), ".cache/sprat", Path(work))
                for preset, steps in (item.split(":") for item in args.estimates.split(","))]
    print(f"{'preset':>6} {'steps':>5} {'actual s':>9} {'estimate s':>11} {'error':>7} {'cost model s':>13} {'error':>7}")
    for r in rows:
        print(f"{r['preset']:>6} {r['steps']:5d} {r['actual']:9.1f} {r['estimate']:11.1f} "
              f"{(r['estimate'] - r['actual']) / r['actual']:+7.0%} {r['cost model']:13.1f} "
              f"{(r['cost model'] - r['actual']) / r['actual']:+7.0%}")
    budget_s = parse_duration(args.budget)
    with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as warm:
        results = {"cold": walkthrough(Path(cold), args.budget)}
        (Path(warm) / ".cache").symlink_to(Path(cold) / ".cache")  # the same data and probe caches
        results["warm"] = walkthrough(Path(warm), args.budget)
    print(f"budget {args.budget} = {budget_s:.1f} s of training")
    print(f"{'run':>5} {'first menu s':>13} {'plan s':>7} {'training s':>11} {'vs budget':>10} "
          f"{'1 → menu s':>11} {'steps':>6} {'exit':>5}")
    for name, m in results.items():
        print(f"{name:>5} {m['first menu']:13.1f} {m['plan']:7.1f} {m['training']:11.2f} "
              f"{(m['training'] - budget_s) / budget_s:+10.1%} {m['to menu']:11.1f} "
              f"{m['steps']:6d} {m['exit code']:5d}")


if __name__ == "__main__":
    main()
