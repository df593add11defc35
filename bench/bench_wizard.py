"""LightLM's wizard walkthrough (2, 5, 0.001, y, 7, 1) on the real `python train.py`
under a pseudo-terminal, timed phase by phase, cold (empty cache) then warm.

The peer is the budget itself: the training phase (from the start of training to the
saved checkpoint, as the trainer recorded it) against LightLM's 0.001 h = 3.6 s.
Prints per run: seconds to the first menu, to the plan, of training (and its error
against the budget), from "1" to the menu again, and the steps trained.

    python -m bench.bench_wizard [--budget 0.001]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pexpect

import checkpoint
from budget import parse_duration

ROOT = Path(__file__).resolve().parent.parent
MENU = r"Select option \(1-8\): "


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="0.001", help="what to type at 'desired training time'")
    args = parser.parse_args()
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
