"""The README's promises: two set-up commands, the one CI runs, and a working main job."""

import re
import subprocess
import sys
from pathlib import Path

from data import load_tokenizer_dir
from export import load_hf

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert "train.py train" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '(.*?)' README.md", ci).group(1)
    matches = [c for c in commands if re.search(pattern, c)]
    assert matches == [commands[1]]


def test_main_job_trains_saves_and_samples(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "train", "--budget", "20s", "--documents", "30",
                             "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
                             "--seq-len", "32", "--batch-size", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sample:" in result.stdout
    (run,) = (tmp_path / "runs").iterdir()
    model = load_hf(run)
    assert (run / "tokenizer.json").exists()
    assert model.config.vocab_size == len(load_tokenizer_dir(run))


def test_bad_budget_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "train", "--budget", "soon", "--out", str(tmp_path),
                             "--cache-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot read 'soon' as a duration" in result.stderr
    assert "Traceback" not in result.stderr
