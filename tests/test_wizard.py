"""The wizard driven in-process with scripted input (an injected console and stream)."""

import dataclasses
import io
import json
import re

import pytest
from rich.console import Console

import checkpoint
import runs
import train
from conftest import write_corpus
from system_check import HardwareManager
from wizard import Wizard, derived_figures


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


def drive(tmp_path, keys: list[str], end_with_newline: bool = True):
    """Run the wizard on `keys` (one answer per line); returns (exit code, wizard, transcript)."""
    output = io.StringIO()
    console = Console(file=output, width=120, color_system=None)
    stream = io.StringIO("\n".join(keys) + ("\n" if end_with_newline and keys else ""))
    wizard = Wizard(console, stream, out_dir=tmp_path / "runs", cache_dir=str(tmp_path / "cache"), run_checks=False)
    code = wizard.run()
    return code, wizard, output.getvalue()


def use_corpus(path) -> list[str]:
    """Keys: Manage → Change dataset → local file → path (the manage menu stays open)."""
    return ["2", "1", "2", str(path)]


def test_walkthrough_keystrokes_train_and_return_to_the_menu(tmp_path, corpus):
    """LightLM's 2, 5, 0.001, y, 7, 1 (after picking the small local dataset) trains for the
    ~4-second budget, saves a checkpoint and comes back to the main menu."""
    keys = use_corpus(corpus)[1:]  # already in the manage menu after "2"
    code, wizard, out = drive(tmp_path, ["2", *keys, "5", "0.001", "y", "7", "1", "3"])
    assert code == 0, out
    assert "Configuration updated" in out and "sample:" in out
    assert re.search(r"largest micro-batch\W+[1-9]\d* sequences of 128 tokens", out)
    (run,) = (tmp_path / "runs").iterdir()
    assert checkpoint.latest(run) is not None
    assert out.count("Training Setup") == 3  # start, after "7", after training
    assert out.rstrip().endswith("bye")


@pytest.mark.parametrize("keys", [[], ["2"], ["2", "5"], ["2", "6", "1"], ["2", "6", "1", "num_layers"], ["6"],
                                  ["2", "1", "2"]])
def test_end_of_input_at_any_prompt_exits_cleanly(tmp_path, keys):
    code, _, out = drive(tmp_path, keys)
    assert code == 0
    assert "end of input" in out


def test_invalid_menu_answers_reprompt(tmp_path):
    code, _, out = drive(tmp_path, ["9", "x", "2", "0", "8"])
    assert code == 0
    assert out.count("Please enter one of") == 3
    assert out.rstrip().endswith("bye")


def test_editing_tables_rejects_bad_values_and_keeps_state(tmp_path):
    keys = ["2", "6", "1", "num_layers=3", "num_kv_heads=3", "num_layerz=2", "num_layers", "many", "4", "",
            "6", "2", "learning_rate", "-1", "3e-4", "", "7", "3"]
    code, wizard, out = drive(tmp_path, keys)
    assert code == 0, out
    model, trainer = wizard.configs["model"], wizard.configs["trainer"]
    assert model.num_layers == 4 and trainer.learning_rate == 3e-4
    assert model.num_kv_heads == runs.default_configs()["model"].num_kv_heads
    assert "must divide" in out and "num_layerz" in out and "expected an integer" in out
    assert "learning_rate=-1" in out


def test_save_new_from_preset_then_load(tmp_path):
    path = tmp_path / "mine.yaml"
    keys = ["2", "6", "1", "num_layers=5", "", "4", str(path), "3", "tiny", "2", str(path), "7", "3"]
    code, wizard, out = drive(tmp_path, keys)
    assert code == 0, out
    assert path.exists() and "preset tiny" in out
    assert wizard.configs["model"].num_layers == 5  # loaded back over the tiny preset (2 layers)


def test_loading_a_broken_file_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"model": {"num_heads": 4, "num_kv_heads": 3}}')
    code, wizard, out = drive(tmp_path, ["2", "2", str(path), "7", "3"])
    assert code == 0
    assert "num_kv_heads" in out and wizard.configs["model"].num_kv_heads != 3


def test_optimize_rereads_a_bad_duration_and_can_be_declined(tmp_path, corpus):
    keys = [*use_corpus(corpus), "5", "soon", "0.001", "n", "7", "3"]
    code, wizard, out = drive(tmp_path, keys)
    assert code == 0, out
    assert "cannot read 'soon'" in out and "kept the current configuration" in out
    assert wizard.plan is None and wizard.configs["model"].num_layers == runs.default_configs()["model"].num_layers


def test_change_dataset_rechecks_paths_and_shows_a_preview_and_report(tmp_path, corpus):
    keys = ["2", "1", "2", str(tmp_path / "missing.txt"), str(corpus), "7", "3"]
    code, wizard, out = drive(tmp_path, keys)
    assert code == 0, out
    assert "no such file or folder" in out
    assert "first 3 records" in out and "quality report" in out and "train / validation tokens" in out
    assert wizard.configs["data"].source == str(corpus)


def test_hub_dataset_when_the_hub_is_unreachable_keeps_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, wizard, out = drive(tmp_path, ["2", "1", "3", "wikitext", "7", "3"])
    assert code == 0
    assert "not reachable" in out and wizard.configs["data"].source == "builtin"


def test_start_training_shows_a_summary_and_can_be_declined(tmp_path, corpus, monkeypatch):
    """The summary's estimate is measured once, at the run's micro-batch, and the very same
    object reaches the trainer, whose live display starts from it."""
    measured, estimates, started = [], [], []
    real_measure, real_estimate, real_train = runs.measure, runs.estimate_training, runs.train_prepared
    monkeypatch.setattr(runs, "measure", lambda *args, **kwargs: measured.append(args) or real_measure(*args, **kwargs))
    monkeypatch.setattr(runs, "estimate_training",
                        lambda *args, **kwargs: estimates.append(real_estimate(*args, **kwargs)) or estimates[-1])
    monkeypatch.setattr(runs, "train_prepared",
                        lambda *args, **kwargs: started.append(kwargs["estimate"]) or real_train(*args, **kwargs))
    keys = [*use_corpus(corpus), "3", "tiny", "6", "2", "max_seq_len=16 batch_size=4 max_steps=3", "", "7",
            "1", "n", "1", "y", "3"]
    code, wizard, out = drive(tmp_path, keys)
    assert code == 0, out
    assert "about to train" in out and "estimated time" in out and "tokens/s (measured: 3+ steps" in out
    assert len(measured) == 1 and measured[0][1:3] == (4, 16)  # at the run's micro-batch, once for both summaries
    assert started == [estimates[-1]] and started[0].steps == 3 and started[0].ends_by == "max_steps"
    (run,) = (tmp_path / "runs").iterdir()  # the declined start made no run
    assert checkpoint.read_state(checkpoint.latest(run))["global_step"] == 3
    assert re.search(r"\w+: 3 steps, [\d,]+ tokens", out) and out.count("about to train") == 2
    assert re.search(r"optimizer steps\W+3 \(max_steps\)", out)


@pytest.fixture
def trained(tmp_path, corpus):
    assert train.main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "runs"),
                       "--name", "r", "--cache-dir", str(tmp_path / "cache"), "--seq-len", "16", "--batch-size", "4",
                       "data.vocab_size=300", "trainer.max_steps=4", "trainer.eval_steps=2"]) == 0
    return tmp_path / "runs" / "r"


def test_chat_evaluate_and_export_from_the_menu(tmp_path, trained):
    keys = ["6", "1", "the model", "/temperature 0", "/top_k x", "/top_p 2", "/nope", "", "7", "1",
            "8", "1", "hf", str(tmp_path / "exported"), "3"]
    code, _, out = drive(tmp_path, keys)
    assert code == 0, out
    assert "temperature = 0.0" in out and "needs a whole number" in out and "out of range" in out
    assert "unknown command /nope" in out
    assert "perplexity" in out and "exported to" in out
    assert (tmp_path / "exported" / "config.json").exists()


def test_export_gguf_from_the_menu_then_chat_with_the_file(tmp_path, trained):
    """Menu 8 writes a GGUF of the chosen type; menus 6 (chat) and 5 (fine-tune) take a .gguf path."""
    gguf_file = tmp_path / "gguf" / "model-q8_0.gguf"
    keys = ["8", "1", "gguf", "q3", "q8_0", str(tmp_path / "gguf"),
            "6", str(tmp_path / "missing.gguf"), str(gguf_file), "/temperature 0", "the model", "", "3"]
    code, _, out = drive(tmp_path, keys)
    assert code == 0, out
    assert gguf_file.exists() and (tmp_path / "gguf" / "Modelfile").exists()
    words = " ".join(out.split())  # long temporary paths wrap
    assert "q8_0" in words and "ollama create" in words
    assert "missing.gguf: not a number from the list nor an existing path" in words
    assert "model-q8_0.gguf (gguf); text continuation mode" in words and "you: the model" in words
    loaded = runs.load_trained(gguf_file)
    assert loaded.kind == "gguf" and loaded.model.config.vocab_size == runs.load_trained(trained).model.config.vocab_size


def test_evaluate_gives_the_figures_the_command_line_gives(tmp_path, trained, capsys, monkeypatch):
    """The same run, the same settings: one number from either front end."""
    requests = []
    evaluate_model = runs.evaluate_model
    monkeypatch.setattr(runs, "evaluate_model", lambda request, *rest, **options: requests.append(request)
                        or evaluate_model(request, *rest, **options))
    assert train.main(["eval", str(trained), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    code, _, out = drive(tmp_path, ["7", "1", "3"])
    assert code == 0, out
    assert f"loss {cli['loss']:.4f}, perplexity {cli['perplexity']:.2f} ({cli['sequences']} sequences" in out
    from_cli, from_wizard = requests
    assert dataclasses.replace(from_wizard, model=str(from_wizard.model)) == from_cli


def test_evaluation_reports_progress_as_n_of_n_in_both_front_ends(tmp_path, trained, capsys):
    """Every batch is a Progress event (n of N); piped, the command prints progress lines
    on stderr (the first and the last at least) and keeps stdout for the result."""
    from events import Progress

    events = []
    result = runs.evaluate_model(runs.EvalRequest(trained, batch_size=2), progress=events.append)
    total = -(-result.sequences // 2)
    assert [e.done for e in events] == list(range(1, total + 1)) and {e.total for e in events} == {total}
    assert all(isinstance(e, Progress) and e.unit == "batches" for e in events) and events[-1].eta_s == 0
    assert train.main(["eval", str(trained), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert f"evaluating on the val split: 1/{total} batches, eta" in captured.err
    assert f"evaluating on the val split: {total}/{total} batches, eta 0.0s" in captured.err
    assert "batches" not in captured.out and "perplexity" in captured.out
    code, _, out = drive(tmp_path, ["7", "1", "3"])
    assert code == 0 and "evaluating on the val split: 1/" in out


def test_finetune_from_the_menu_uses_the_lora_table_and_fits_the_base_context(tmp_path, corpus):
    assert train.main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "runs"),
                       "--name", "base", "--cache-dir", str(tmp_path / "cache"), "--seq-len", "48", "--batch-size", "4",
                       "data.vocab_size=300", "trainer.max_steps=2"]) == 0
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "say", "response": word}) for word in ("the", "model", "reads") * 8))
    keys = ["2", "6", "4", "dropout=0 target_modules=q_proj,v_proj", "", "7",
            "5", "1", str(data), "4", "n", "", "1", str(corpus), "3"]
    code, wizard, out = drive(tmp_path, keys)
    assert code == 0, out
    assert "adapter saved" in out and "LoRA rank 4" in out
    assert "general-text perplexity" in out and "fine-tuned" in out  # the guard measured the base, and the table
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("finetune-")]
    info = json.loads((run / "run.json").read_text())
    assert info["trainer"]["max_seq_len"] <= 48  # from the data's lengths, within the base's context
    assert "from the data" in out
    lora = info["finetune"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"]) == (4, 8.0, 0, ["q_proj", "v_proj"])


def test_resume_from_the_menu_continues_the_run(tmp_path, trained):
    before = checkpoint.read_state(checkpoint.latest(trained))["global_step"]
    # Resuming a finished run reaches its max_steps again at once: it saves nothing new and says so.
    code, _, out = drive(tmp_path, ["4", "1", "3"])
    assert code == 0, out
    assert f"(step {before})" in out
    assert checkpoint.read_state(checkpoint.latest(trained))["global_step"] == before


def test_ctrl_c_inside_an_action_returns_to_the_menu(tmp_path, monkeypatch):
    def interrupted(root):
        raise KeyboardInterrupt

    monkeypatch.setattr("wizard.list_runs", interrupted)
    code, _, out = drive(tmp_path, ["4", "3"])
    assert code == 0
    assert "cancelled" in out and out.count("Training Setup") == 2


def test_an_unexpected_error_in_an_action_is_logged_and_the_menu_comes_back(tmp_path, monkeypatch):
    def broken(root):
        raise TypeError("something nobody planned for")

    monkeypatch.setattr("wizard.list_runs", broken)
    code, _, out = drive(tmp_path, ["4", "3"])
    assert code == 0 and out.count("Training Setup") == 2
    assert "unexpected TypeError in resume: something nobody planned for" in " ".join(out.split())
    assert "something nobody planned for" in (tmp_path / "runs" / "wizard-errors.log").read_text()


def test_derived_figures_follow_the_configuration():
    configs = runs.default_configs("tiny")
    small = dict(derived_figures(configs))
    configs["model"] = configs["model"].__class__.from_name("2M")
    large = dict(derived_figures(configs))
    assert small["parameters"] != large["parameters"]
    assert small["tokens per optimizer step"].startswith("2,048")
