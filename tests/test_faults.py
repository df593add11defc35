"""Faults and hostile files: each gives a clear error (exit 2 for bad input, 1 for the
environment), runs no code it was handed, and leaves the previous checkpoint intact."""

import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import train
from conftest import write_corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


def tiny_args(tmp_path, corpus, *extra) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
            "--seq-len", "16", "--batch-size", "4", "data.vocab_size=300", *extra]


@pytest.fixture
def run(tmp_path, corpus) -> Path:
    assert train.main(tiny_args(tmp_path, corpus, "--out", str(tmp_path / "runs"), "--name", "r",
                                "trainer.max_steps=2", "trainer.save_every_n_steps=1", "trainer.keep_last_n=0")) == 0
    return tmp_path / "runs" / "r"


def reseal(directory: Path) -> None:
    """Recompute a checkpoint's manifest, as someone who tampered with it would."""
    manifest = {name: checkpoint._sha256(directory / name) for name in json.loads(
        (directory / checkpoint.MANIFEST_FILE).read_text())}
    (directory / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))


def fails(capsys, args: list[str], code: int, message: str) -> None:
    assert train.main(args) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


# ---- code in files ------------------------------------------------------------------------
def test_a_tokenizer_with_custom_code_is_refused_and_never_run(run, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    (run / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((run / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (run / "tokenizer_config.json").write_text(json.dumps(config))
    for command in (["generate", str(run), "--prompt", "x"], ["eval", str(run)], ["resume", str(run)]):
        fails(capsys, command, 2, "names custom code (auto_map")
    assert not marker.exists()


def test_an_hf_directory_with_custom_code_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Evil"}}))
    fails(capsys, ["generate", str(directory), "--prompt", "x"], 2, "names custom code")


def test_a_pickle_in_the_optimizer_state_is_refused_in_sprats_words(run, tmp_path, capsys):
    latest = checkpoint.latest(run)
    torch.save({"state": {}, "param_groups": [], "evil": datetime.timedelta(1)}, latest / checkpoint.OPTIMIZER_FILE)
    reseal(latest)
    assert train.main(["resume", str(run), "trainer.max_steps=3"]) == 0  # the older checkpoint carries on
    captured = capsys.readouterr()
    assert f"skipping checkpoint {latest.name}: optimizer.pt holds something other than tensors" in captured.out
    assert "weights_only=False" not in captured.out + captured.err
    assert train.main(["generate", str(run), "--prompt", "x", "--checkpoint", latest.name,
                       "--max-new-tokens", "2"]) == 0  # generate does not need the optimizer state


@pytest.mark.parametrize("state", ["[]", "{}", '{"global_step": null}', '"x"'])
def test_a_broken_trainer_state_is_skipped_by_every_command(run, capsys, state):
    latest = checkpoint.latest(run)
    (latest / checkpoint.STATE_FILE).write_text(state)
    reseal(latest)
    for command in (["generate", str(run), "--prompt", "x", "--max-new-tokens", "2"], ["eval", str(run)],
                    ["export", str(run), "--out", str(run.parent / f"exported-{len(state)}")]):
        assert train.main(command) == 0, capsys.readouterr().err
        captured = capsys.readouterr()
        assert f"skipping checkpoint {latest.name}" in captured.out + captured.err


# ---- sizes and shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"num_layers": 10**7}, "GiB to load"), ({"context_len": 10**9}, "GiB to load"),
    ({"num_dims": 2**20, "num_heads": 2**10, "num_kv_heads": 2**10}, "GiB to load")])
def test_a_run_json_asking_for_more_memory_than_there_is_is_refused_before_building(run, capsys, change, message):
    info = json.loads((run / "run.json").read_text())
    info["model"].update(change)
    (run / "run.json").write_text(json.dumps(info))
    started = time.perf_counter()
    fails(capsys, ["generate", str(run), "--prompt", "x"], 2, message)
    fails(capsys, ["resume", str(run)], 2, "GiB to train")
    assert time.perf_counter() - started < 60  # refused from the config, not after trying to allocate


def test_the_command_line_refuses_a_model_that_cannot_fit(tmp_path, corpus, capsys):
    fails(capsys, tiny_args(tmp_path, corpus, "--out", str(tmp_path / "runs"), "model.num_layers=10000000"), 2,
          "GiB to train")
    fails(capsys, tiny_args(tmp_path, corpus, "--out", str(tmp_path / "runs"), "model.rmsnorm_eps=inf"), 2,
          "ModelConfig.rmsnorm_eps=inf")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["run.json", "config"])
def test_deeply_nested_json_is_a_clear_error(run, tmp_path, capsys, where):
    deep = "[" * 100_000 + "]" * 100_000
    if where == "run.json":
        (run / "run.json").write_text(deep)
        fails(capsys, ["generate", str(run), "--prompt", "x"], 2, "run.json")
    else:
        (tmp_path / "deep.json").write_text(deep)
        fails(capsys, ["config", "validate", str(tmp_path / "deep.json")], 2, "nested too deeply")


# ---- data ---------------------------------------------------------------------------------
def test_a_fifo_is_refused_not_read(tmp_path, capsys):
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "train.py", *tiny_args(tmp_path, fifo, "--out", str(tmp_path))],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a regular file" in result.stderr


def test_a_folder_mixing_text_and_instruction_records_is_a_clear_error(tmp_path, corpus, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.txt").write_text("some plain text " * 50)
    (folder / "chat.jsonl").write_text(json.dumps({"instruction": "say", "output": "hi"}) + "\n")
    fails(capsys, tiny_args(tmp_path, folder, "--out", str(tmp_path / "runs")), 2, "mixes plain text")


def test_encodings_utf16_refused_latin1_reported(tmp_path, capsys):
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("the model reads tokens " * 200, encoding="utf-16")
    fails(capsys, tiny_args(tmp_path, utf16, "--out", str(tmp_path / "runs")), 2, "looks like UTF-16")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("café crème brûlée " * 300).encode("latin-1"))
    assert train.main(tiny_args(tmp_path, latin1, "--out", str(tmp_path / "runs"), "trainer.max_steps=1")) == 0
    assert "latin1.txt is not valid UTF-8: 1,200 undecodable bytes were replaced" in capsys.readouterr().out


def test_finetuning_on_plain_text_is_refused(run, tmp_path, capsys):
    text = tmp_path / "plain.txt"
    text.write_text("just text " * 100)
    fails(capsys, ["finetune", str(run), "--data", str(text)], 2, "fine-tuning needs instruction records")


def test_a_single_text_file_validates_on_its_tail(tmp_path):
    from data import DataConfig, prepare

    document = tmp_path / "book.txt"
    document.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    for seed in range(4):  # the split used to pick head or tail at random
        prepared = prepare(DataConfig(source=str(document), vocab_size=300, seed=seed,
                                      cache_dir=str(tmp_path / "cache")), 16)
        assert prepared.report.train_tokens > 10 * prepared.report.val_tokens


# ---- disks --------------------------------------------------------------------------------
def test_a_full_disk_during_a_save_is_a_message_and_the_old_checkpoint_stays(run, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(checkpoint, "save_file", full)
    fails(capsys, ["resume", str(run), "trainer.max_steps=3"], 1, "the disk is full")
    assert checkpoint.verify(checkpoint.latest(run)) is None and checkpoint.latest(run).name == "step_2"
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_a_real_full_filesystem(tmp_path, corpus, capsys):
    """A 1 MB tmpfs (where this process may mount one): the first checkpoints fit, then the disk fills."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the faked full disk above covers the message)")
    try:
        code = train.main(tiny_args(tmp_path, corpus, "--out", str(disk), "--name", "r", "trainer.max_steps=50",
                                    "trainer.save_every_n_steps=1", "trainer.keep_last_n=0"))
        err = capsys.readouterr().err
        assert code == 1 and ("the disk is full" in err or "No space left" in err) and "Traceback" not in err
        good = checkpoint.latest(disk / "r")
        assert good is not None and checkpoint.verify(good) is None
        assert not [p for p in (disk / "r").iterdir() if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_read_only_run_directory_is_a_message(run, capsys):
    """A read-only file system (a bind mount where this process may make one), else permissions."""
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", str(run), str(run)], capture_output=True).returncode == 0 and \
            subprocess.run(["mount", "-o", "remount,ro,bind", str(run)], capture_output=True).returncode == 0
        if not mounted:
            subprocess.run(["umount", str(run)], capture_output=True)
            pytest.skip("root writes through permissions and no read-only mount can be made here")
        undo = ["umount", str(run)]
    else:
        os.chmod(run, 0o555)
        undo = ["chmod", "755", str(run)]
    try:
        fails(capsys, ["resume", str(run), "trainer.max_steps=3"], 1, str(run))
    finally:
        subprocess.run(undo, capture_output=True)
    assert checkpoint.latest(run).name == "step_2"


def test_a_broken_pipe_is_not_an_error():
    reader = subprocess.Popen([sys.executable, "train.py", "check", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    reader.stdout.read(10)
    reader.stdout.close()  # what `| head -c 10` does
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) in (0, 1) and "Broken pipe" not in err and "Traceback" not in err


# ---- kills --------------------------------------------------------------------------------
def step_losses(run: Path) -> dict[int, float]:
    """The last loss logged for each step (a resumed run logs the steps after its checkpoint again)."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def kill_and_resume(tmp_path, corpus, name: str, delay: float) -> tuple[Path, Path]:
    common = ["--out", str(tmp_path / "runs"), "trainer.max_steps=40", "trainer.save_every_n_steps=3",
              "trainer.keep_last_n=2", "trainer.log_interval=1"]
    reference = tmp_path / "runs" / "reference"
    if not reference.exists():
        assert train.main(tiny_args(tmp_path, corpus, *common, "--name", "reference")) == 0
    process = subprocess.Popen([sys.executable, "train.py", *tiny_args(tmp_path, corpus, *common, "--name", name)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / name
    deadline = time.time() + 120
    while checkpoint.latest(run) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    if checkpoint.latest(run) is not None and checkpoint.read_state(checkpoint.latest(run))["global_step"] < 40:
        resumed = subprocess.run([sys.executable, "train.py", "resume", str(run)], cwd=ROOT, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
    return reference, run


def test_kill_9_mid_run_then_resume_gives_the_same_losses(tmp_path, corpus):
    reference, run = kill_and_resume(tmp_path, corpus, "killed", delay=0.05)
    assert step_losses(run) == step_losses(reference)
    assert checkpoint.read_state(checkpoint.latest(run))["global_step"] == 40


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_same_losses(tmp_path, corpus):
    rng = random.Random(0)
    for trial in range(5):
        reference, run = kill_and_resume(tmp_path, corpus, f"trial{trial}", delay=rng.uniform(0.0, 1.5))
        np.testing.assert_equal(step_losses(run), step_losses(reference))


def test_two_writers_of_one_run(tmp_path, corpus):
    """Two processes start the same --name at once: one trains it, the other is refused."""
    args = [sys.executable, "train.py", *tiny_args(tmp_path, corpus, "--out", str(tmp_path / "runs"), "--name", "r",
                                                   "trainer.max_steps=30", "trainer.save_every_n_steps=2",
                                                   "trainer.keep_last_n=2")]
    train.main(tiny_args(tmp_path, corpus, "--out", str(tmp_path / "warm"), "trainer.max_steps=1"))  # data cached
    first, second = (subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2))
    results = [(process.wait(timeout=300), process.stderr.read()) for process in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] in (1, 2), results
    refusal = next(err for code, err in results if code)
    assert "in use by process" in refusal or "already holds a run" in refusal
    latest = checkpoint.latest(tmp_path / "runs" / "r")
    assert checkpoint.verify(latest) is None and checkpoint.read_state(latest)["global_step"] == 30


def test_exported_files_all_get_the_folders_file_mode(run, tmp_path):
    assert train.main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "exported").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
