"""Run operations (runs.py): who owns a run directory, and runs that survive debris."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint
import runs
import train
from conftest import write_corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def common(tmp_path) -> list[str]:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    return ["--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "runs"), "--cache-dir",
            str(tmp_path / "cache"), "--seq-len", "16", "--batch-size", "4", "data.vocab_size=300",
            "trainer.max_steps=3", "trainer.save_every_n_steps=1", "trainer.keep_last_n=0"]


def test_a_new_run_over_an_existing_one_is_refused_or_moved_aside(tmp_path, common, capsys):
    run = tmp_path / "runs" / "r"
    assert train.main(["train", "--name", "r", *common]) == 0
    first = (run / "run.json").read_text()
    assert train.main(["train", "--name", "r", *common, "trainer.seed=2"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume" in err and "--overwrite" in err
    assert (run / "run.json").read_text() == first  # untouched

    assert train.main(["train", "--name", "r", "--overwrite", *common, "trainer.seed=2"]) == 0
    (moved,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("r.replaced-")]
    assert (moved / "run.json").read_text() == first and checkpoint.latest(moved).name == "step_3"
    assert json.loads((run / "run.json").read_text())["trainer"]["seed"] == 2
    assert {p.name for p in checkpoint.candidates(run)} == {"step_1", "step_2", "step_3"}


def test_a_run_in_use_is_refused_with_the_holders_pid(tmp_path, common, capsys):
    assert train.main(["train", "--name", "r", *common]) == 0
    run = tmp_path / "runs" / "r"
    with runs.RunLock(run):  # as a training process holds it
        assert train.main(["resume", str(run), "trainer.max_steps=5"]) == 1
        assert f"in use by process {os.getpid()}" in capsys.readouterr().err
        assert train.main(["train", "--name", "r", "--overwrite", *common]) == 1
    assert checkpoint.latest(run).name == "step_3"  # nothing renamed, nothing set aside


def test_a_lock_dies_with_its_process(tmp_path):
    """kill -9 of the owner leaves no stale lock: the kernel drops it."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import runs, time\nwith runs.RunLock({str(run)!r}):\n"
                               f"    print('held', flush=True)\n    time.sleep(60)"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runs.RunInUse, match=str(holder.pid)):
        runs.RunLock(run).__enter__()
    holder.kill()
    holder.wait(timeout=30)
    with runs.RunLock(run):
        pass


def test_resuming_a_finished_run_trains_nothing_and_says_how_to_go_on(tmp_path, common, capsys):
    assert train.main(["train", "--name", "r", *common]) == 0
    run = tmp_path / "runs" / "r"
    capsys.readouterr()
    assert train.main(["resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "had already ended (max_steps) at step 3: nothing was trained" in out and "trainer.max_steps=" in out
    assert checkpoint.latest(run).name == "step_3" and "sample:" not in out
    assert train.main(["resume", str(run), "trainer.max_steps=4"]) == 0
    assert checkpoint.latest(run).name == "step_4"


def test_resume_skips_broken_checkpoints_and_clears_dead_saves(tmp_path, common, capsys):
    """What kill -9 during a save or a prune leaves: a checkpoint without its state file,
    an empty one, a temporary directory of a dead process."""
    assert train.main(["train", "--name", "r", *common]) == 0
    run = tmp_path / "runs" / "r"
    (run / "step_3" / checkpoint.STATE_FILE).unlink()  # pruning or writing cut short
    (run / "step_5").mkdir()  # a stray empty one
    shutil.copytree(run / "step_2", run / ".step_9.tmp-999999999")  # a save whose process died
    capsys.readouterr()
    assert train.main(["resume", str(run), "trainer.max_steps=4"]) == 0
    captured = capsys.readouterr()
    assert "skipping checkpoint step_3" in captured.out and "(step 2)" in captured.out
    assert not (run / ".step_9.tmp-999999999").exists()
    assert checkpoint.read_state(checkpoint.latest(run))["global_step"] == 4


def test_runs_are_listed_from_metadata_without_hashing(tmp_path, common, monkeypatch):
    assert train.main(["train", "--name", "r", *common]) == 0
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "run.json").write_text("{not json")

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(checkpoint, "_sha256", no_hashing)
    (found,) = runs.list_runs(tmp_path / "runs")
    assert (found.name, found.kind, found.checkpoint, found.step) == ("r", "pretrain", "step_3", 3)


def test_resume_events_reach_the_metrics_file(tmp_path, common):
    assert train.main(["train", "--name", "r", *common]) == 0
    run = tmp_path / "runs" / "r"
    assert train.main(["resume", str(run), "--checkpoint", "step_1", "trainer.max_steps=2"]) == 0
    kinds = [json.loads(line)["type"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "resumed" in kinds and kinds.count("checkpoint_set_aside") == 2


def test_names_that_are_not_one_folder_and_folders_with_files_are_refused(tmp_path, common, capsys):
    for name in (".", "..", "a/b", str(tmp_path)):
        assert train.main(["train", "--name", name, *common]) == 2
        assert "one folder name" in capsys.readouterr().err
    other = tmp_path / "runs" / "notes"
    other.mkdir(parents=True)
    (other / "keep.txt").write_text("mine")
    assert train.main(["train", "--name", "notes", *common]) == 2
    assert "already holds files" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"


def test_a_stray_rank_in_the_environment_does_not_skip_ownership(tmp_path, common, monkeypatch, capsys):
    assert train.main(["train", "--name", "r", *common]) == 0
    monkeypatch.setenv("RANK", "1")  # left by a launcher; this run does not use DDP
    assert train.main(["train", "--name", "r", *common]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from trainer import TrainerConfig

    config = TrainerConfig(path_to_checkpoints=str(tmp_path))
    first, second = runs.new_run_dir(None, config, None), runs.new_run_dir(None, config, None)
    assert first != second and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("change", [{"trainer": 5}, {"finetune": True}, {"finetune": {"lora": {}}}])
def test_a_malformed_run_json_is_a_message(tmp_path, common, capsys, change):
    assert train.main(["train", "--name", "r", *common]) == 0
    run = tmp_path / "runs" / "r"
    info = {**json.loads((run / "run.json").read_text()), **change}
    (run / "run.json").write_text(json.dumps(info))
    for command in (["generate", str(run), "--prompt", "x"], ["resume", str(run)], ["eval", str(run)]):
        assert train.main(command) == 2
        assert "run.json" in capsys.readouterr().err


def test_a_save_killed_between_its_renames_is_put_back_not_deleted(tmp_path, common):
    """Replacing step_N: step_N was moved to .step_N.old-PID, the new copy waits in
    .step_N.tmp-PID, and the process died before renaming it into place."""
    assert train.main(["train", "--name", "r", *common]) == 0
    run = tmp_path / "runs" / "r"
    dead = 999_999_999
    shutil.copytree(run / "step_3", run / f".step_3.tmp-{dead}")
    (run / "step_3").rename(run / f".step_3.old-{dead}")
    assert checkpoint.clean_stale(run) == [f".step_3.old-{dead}"]
    assert checkpoint.verify(run / "step_3") is None
    assert not [p for p in run.iterdir() if p.name.startswith(".step_3")]


def test_the_instruction_data_summary_says_its_tokens_are_response_tokens():
    from types import SimpleNamespace

    from data import QualityReport

    report = QualityReport(source="chat.jsonl", format="instruction", documents_kept=20, train_documents=18,
                           val_documents=2, train_tokens=514, val_tokens=23)
    (line,) = runs.data_summary(SimpleNamespace(report=report))
    assert "514 training and 23 validation response tokens" in line


def test_a_run_trains_in_the_cpu_precision_measured_and_keeps_it_on_resume(tmp_path, common, capsys, monkeypatch):
    """auto on a CPU: bf16 measured faster, so the run trains in it, says why, and caches
    the choice beside the probes; resumed after the cache is gone and the measurement says
    fp32, the run still trains in bf16, as it started."""
    import trainer

    monkeypatch.delenv(trainer.CPU_DTYPE_VARIABLE)
    monkeypatch.setattr(trainer, "_bf16_kernels", lambda: True)
    speedup = iter([1.6, 1.0])
    monkeypatch.setattr(trainer, "bf16_speedup", lambda: next(speedup))
    assert train.main(["train", "--name", "r", *common]) == 0
    run = tmp_path / "runs" / "r"
    out = capsys.readouterr().out
    assert "(bfloat16: measured 1.60x as fast as fp32 on this CPU)" in out
    assert checkpoint.read_state(checkpoint.latest(run))["dtype"] == "bfloat16"
    (tmp_path / "cache" / "precision.json").unlink()
    trainer.remember_cpu_precision(None)  # a new process, on a day bf16 measures no faster
    assert train.main(["resume", str(run), "trainer.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "(bfloat16: as step_3 trained: a resumed run keeps its precision)" in out
    assert checkpoint.read_state(checkpoint.latest(run))["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "cache" / "precision.json").read_text()) != {}  # (re-measured: fp32 now)
    assert trainer.cpu_precision().dtype == "float32"
