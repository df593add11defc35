"""The README's promises: two set-up commands, the one CI runs, and a working main job."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import train
from data import load_tokenizer_dir
from model import ModelConfig, Transformer

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


def run_train(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_main_job_trains_saves_samples_and_resumes(tmp_path):
    """The main job's path: plan for a budget, train, save, sample, resume. The budget is
    generous and max_steps ends the run, so a slow or busy machine passes the same way."""
    common = ["--cache-dir", str(tmp_path / "cache")]
    result = run_train("train", "--budget", "5m", "--out", str(tmp_path / "runs"), "--seq-len", "32",
                       "--batch-size", "4", "data.subset_size=30", "trainer.max_steps=6", *common)
    assert result.returncode == 0, result.stderr
    assert "plan for 5m00s" in result.stdout and "max_steps: 6 steps" in result.stdout
    assert "sample:" in result.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert {"run.json", "tokenizer.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    latest = checkpoint.latest(run)
    model_state, _, state = checkpoint.load(latest)
    info = json.loads((run / "run.json").read_text())
    model = Transformer(ModelConfig.from_dict(info["model"]))
    model.load_state_dict(model_state)
    assert model.config.vocab_size == len(load_tokenizer_dir(run))
    assert info["data"]["subset_size"] == 30 and info["trainer"]["schedule_by"] == "time"
    assert state["global_step"] == 6

    assert train.main(["resume", str(run), "model.num_layers=6"]) == 2  # a run's shape is fixed
    resumed = run_train("resume", str(run), "trainer.max_steps=9")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from {latest.name} (step 6)" in resumed.stdout
    assert checkpoint.read_state(checkpoint.latest(run))["global_step"] == 9


@pytest.mark.parametrize("args, message", [
    (["train", "--budget", "soon"], "cannot read 'soon' as a duration"),
    (["train", "trainer.learning_rate=-1"], "TrainerConfig.learning_rate=-1.0"),
    (["train", "model.num_kv_heads=3"], "must divide num_heads"),
    (["train", "trainer.nope=1"], "TrainerConfig has no field 'nope'"),
    (["train", "learning_rate"], "SECTION.FIELD=VALUE"),
    (["train", "--data", "./missing.jsonl"], "no such file"),
    (["train", "--config", "missing.json"], "does not exist"),
    (["resume", "."], "not a run directory"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, args, message):
    extra = ["--cache-dir", str(tmp_path), "--out", str(tmp_path)] if args[0] == "train" else []
    assert train.main(args + extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_saves_and_the_run_resumes(tmp_path):
    process = subprocess.Popen([sys.executable, "train.py", "train", "--out", str(tmp_path / "runs"), "--cache-dir",
                                str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "4",
                                "data.subset_size=30", "trainer.num_epochs=1000"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("step "):  # training is under way
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "resume with: python train.py resume" in out
    (run,) = (tmp_path / "runs").iterdir()
    saved = checkpoint.read_state(checkpoint.latest(run))["global_step"]
    resumed = run_train("resume", str(run), "trainer.max_steps=" + str(saved + 3))
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.read_state(checkpoint.latest(run))["global_step"] == saved + 3


def step_losses_of(run: Path) -> list[float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["type"] == "step"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_whole_batch(tmp_path):
    """torchrun with gloo: 2 ranks x batch 4 see the same 8 blocks per step as 1 process x batch 8."""
    common = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), "--seq-len", "32",
              "--preset", "tiny", "data.subset_size=40", "trainer.max_steps=4", "trainer.seed=3"]
    single = run_train("train", "--batch-size", "8", "--name", "single", *common)
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "train.py", "train",
                          "--batch-size", "4", "--name", "ddp", "trainer.use_ddp=yes", *common],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single_losses = step_losses_of(tmp_path / "runs" / "single")
    assert len(single_losses) == 4
    np.testing.assert_allclose(step_losses_of(tmp_path / "runs" / "ddp"), single_losses, rtol=1e-5)


@pytest.mark.slow
def test_fsdp_under_torchrun_matches_one_process_and_resumes_on_one(tmp_path):
    """The command line under torchrun: 2 FSDP ranks x batch 4 against 1 process x batch 8;
    the FSDP run resumed from step 2 on one process continues the same curve, and its
    checkpoints serve generate and export like any other."""
    runs = tmp_path / "runs"
    common = ["--cache-dir", str(tmp_path / "cache"), "--out", str(runs), "--seq-len", "32", "--preset", "tiny",
              "data.subset_size=40", "trainer.max_steps=4", "trainer.seed=3", "trainer.save_every_n_steps=2"]
    single = run_train("train", "--batch-size", "8", "--name", "single", *common)
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    fsdp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "train.py", "train",
                           "--batch-size", "4", "--name", "fsdp", "trainer.use_fsdp=yes", *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert fsdp.returncode == 0, fsdp.stderr[-2000:]
    single_losses = step_losses_of(runs / "single")
    assert len(single_losses) == 4
    np.testing.assert_allclose(step_losses_of(runs / "fsdp"), single_losses, rtol=1e-5)

    resumed = run_train("resume", str(runs / "fsdp"), "--checkpoint", "step_2", "trainer.use_fsdp=no",
                        "trainer.batch_size=8")
    assert resumed.returncode == 0, resumed.stderr
    losses = step_losses_of(runs / "fsdp")  # the first curve, then the resumed steps 3 and 4
    assert len(losses) == 6
    np.testing.assert_allclose(losses[4:], losses[2:4], rtol=1e-5)
    generated = run_train("generate", str(runs / "fsdp"), "--prompt", "def ", "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    exported = run_train("export", str(runs / "fsdp"), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), exported.stderr


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert train.main(["train", "trainer.use_fsdp=yes", "--cache-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node=N train.py train trainer.use_fsdp=yes" in err and "trainer.use_fsdp=no" in err


def test_ddp_without_torchrun_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert train.main(["train", "trainer.use_ddp=yes", "--cache-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


def readme_section(title: str) -> str:
    return (ROOT / "README.md").read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_preset_table_matches_the_presets():
    from model import PRESETS

    rows = {}
    for line in readme_section("Model presets").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        match = re.match(r"`([^`]+)`", cells[0]) if line.startswith("| `") else None
        if match:
            rows[match.group(1)] = cells[1:]
    assert list(rows) == list(PRESETS)
    for name, (vocab, width, layers, heads, ffn, context, parameters) in rows.items():
        config = ModelConfig.from_name(name)
        assert (int(vocab), int(width), int(layers), heads, int(ffn), int(context)) == \
            (config.vocab_size, config.num_dims, config.num_layers, f"{config.num_heads} / {config.num_kv_heads}",
             config.ffn_hidden_dims, config.context_len), name
        shown = float(parameters.rstrip("M"))
        decimals = len(parameters.rstrip("M").partition(".")[2])
        assert shown == round(config.num_params() / 1e6, decimals), name


def test_the_readme_wizard_menus_match_the_program():
    from wizard import MAIN_MENU, MANAGE_MENU

    block = re.search(r"```text\n(Training Setup.*?)```", readme_section("The wizard"), re.S).group(1)
    left, right = [], []
    for line in block.splitlines()[1:]:
        first, _, second = line.partition("  ")
        left.append(first.strip())
        right.append(second.strip())
    assert [item for item in left if item] == [f"{key}. {label}" for key, label in MAIN_MENU]
    assert [item for item in right if item] == [f"{key}. {label}" for key, label in MANAGE_MENU]
