"""The wizard driven in-process with scripted input (an injected console and stream)."""

import dataclasses
import json
import re

import pytest

import checkpoint
import runs
import train
from conftest import write_corpus
from model import ModelConfig, Transformer
from walkthrough import CTRL_C, CTRL_D, ESC, Walkthrough
from wizard import BlankLines, Wizard, derived_figures


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


def test_lightlm_walkthrough_trains_and_returns_to_the_menu(tmp_path, corpus):
    """LightLM's 2, 5, 0.001, y, 7, 1 (after picking the small local dataset) trains for the
    ~4-second budget, saves a checkpoint and comes back to the main menu."""
    walk = Walkthrough(tmp_path).use_corpus(corpus)
    walk.manage("Optimize for training time").answer("desired training time", "0.001")
    walk.answer("Apply these optimizations", "y")
    walk.manage("Continue with current settings").main("Start training").main("Exit")
    code, wizard, out = walk.run()
    assert code == 0, out
    assert walk.typed[0] == "2" and walk.typed[-6:] == ["5", "0.001", "y", "7", "1", "3"]  # LightLM's keys
    assert "Configuration updated" in out and "sample:" in out
    assert re.search(r"tokenizing documents: (\d+)/\1 documents, eta 0\.0s", out)  # the data's progress
    assert re.search(r"largest micro-batch\W+[1-9]\d* sequences of 128 tokens", out)
    (run,) = (tmp_path / "runs").iterdir()
    assert checkpoint.latest(run) is not None
    assert out.count("Training Setup") == 3  # start, after "7", after training
    assert out.rstrip().endswith("bye")  # the run recorded the configuration: nothing unsaved to ask about


@pytest.mark.parametrize("where", ["first menu", "configuration menu", "duration", "table choice", "editor",
                                   "field value", "dataset menu", "dataset path"])
def test_end_of_input_at_any_prompt_goes_up_level_by_level_and_exits(tmp_path, where):
    walk = Walkthrough(tmp_path)
    if where != "first menu":
        walk.main("Manage dataset/configuration")
    if where == "duration":
        walk.manage("Optimize for training time")
    if where in ("table choice", "editor", "field value"):
        walk.manage("Edit configuration table")
    if where in ("editor", "field value"):
        walk.table("model")
    if where == "field value":
        walk.edit("num_layers")
    if where in ("dataset menu", "dataset path"):
        walk.manage("Change dataset")
    if where == "dataset path":
        walk.dataset("a local file or folder")
    code, _, out = walk.end_of_input().run()
    assert code == 0
    assert "end of input" in out and out.rstrip().endswith("bye")


def test_invalid_menu_answers_reprompt(tmp_path):
    walk = Walkthrough(tmp_path)
    walk.answer("Select option (1-9)", "10").answer("Select option (1-9)", "x")
    walk.main("Manage dataset/configuration").answer("Select option (1-8)", "0").manage("Exit")
    code, _, out = walk.run()
    assert code == 0
    assert out.count("Please enter one of") == 3
    assert out.rstrip().endswith("bye")


def test_editing_tables_rejects_bad_values_and_keeps_state(tmp_path):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Edit configuration table")
    walk.table("model").edit("num_layers=3", "num_kv_heads=3", "num_layerz=2", "num_layers")
    walk.answer("New num_layers", "many").answer("New num_layers", "4").edit("")
    walk.manage("Edit configuration table").table("trainer").edit("learning_rate")
    walk.answer("New learning_rate", "-1").answer("New learning_rate", "3e-4").edit("")
    walk.manage("Continue with current settings").main("Exit")
    walk.answer("Save before leaving", "n")
    code, wizard, out = walk.run()
    assert code == 0, out
    model, trainer = wizard.configs["model"], wizard.configs["trainer"]
    assert model.num_layers == 4 and trainer.learning_rate == 3e-4
    assert model.num_kv_heads == runs.default_configs()["model"].num_kv_heads
    assert "must divide" in out and "num_layerz" in out and "expected an integer" in out
    assert "learning_rate=-1" in out


def test_save_new_from_preset_then_load(tmp_path):
    path = tmp_path / "mine.yaml"
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration")
    walk.manage("Edit configuration table").table("model").edit("num_layers=5", "")
    walk.manage("Save current configuration").answer("Save to", str(path))
    walk.manage("Create new configuration").answer("Preset", "tiny")
    walk.manage("Load existing configuration").answer("Configuration file", str(path))
    walk.manage("Continue with current settings").main("Exit")
    code, wizard, out = walk.run()
    assert code == 0, out
    assert path.exists() and "preset tiny" in out
    assert wizard.configs["model"].num_layers == 5  # loaded back over the tiny preset (2 layers)


def test_loading_a_broken_file_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"model": {"num_heads": 4, "num_kv_heads": 3}}')
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration")
    walk.manage("Load existing configuration").answer("Configuration file", str(path))
    walk.manage("Continue with current settings").main("Exit")
    code, wizard, out = walk.run()
    assert code == 0
    assert "num_kv_heads" in out and wizard.configs["model"].num_kv_heads != 3


def test_optimize_rereads_a_bad_duration_and_can_be_declined(tmp_path, corpus):
    walk = Walkthrough(tmp_path).use_corpus(corpus).manage("Optimize for training time")
    walk.answer("desired training time", "soon").answer("desired training time", "0.001")
    walk.answer("Apply these optimizations", "n").manage("Continue with current settings").main("Exit")
    walk.answer("Save before leaving", "n")  # the dataset changed
    code, wizard, out = walk.run()
    assert code == 0, out
    assert "cannot read 'soon'" in out and "kept the current configuration" in out
    assert wizard.plan is None and wizard.configs["model"].num_layers == runs.default_configs()["model"].num_layers


def test_change_dataset_rechecks_paths_and_shows_a_preview_and_report(tmp_path, corpus):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Change dataset")
    walk.dataset("a local file or folder").answer("Path to the file or folder", str(tmp_path / "missing.txt"))
    walk.answer("Path to the file or folder", str(corpus))
    walk.manage("Continue with current settings").main("Exit").answer("Save before leaving", "n")
    code, wizard, out = walk.run()
    assert code == 0, out
    assert "no such file or folder" in out
    assert "first 3 records" in out and "quality report" in out and "train / validation tokens" in out
    assert wizard.configs["data"].source == str(corpus)


def choose_hub_dataset(tmp_path) -> Walkthrough:
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Change dataset")
    walk.dataset("a Hugging Face hub dataset").answer("Hub dataset name", "wikitext")
    return walk.dataset("back").manage("Continue with current settings").main("Exit")  # the Dataset menu offers the rest


def test_hub_dataset_when_the_hub_is_unreachable_keeps_the_dataset(tmp_path, monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr("wizard.hub_reachable", lambda timeout: False)
    code, wizard, out = choose_hub_dataset(tmp_path).run()
    assert code == 0
    assert "not reachable" in out and wizard.configs["data"].source == "builtin"


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_dataset_in_offline_mode_says_so_instead_of_unreachable(tmp_path, monkeypatch, variable):
    """Offline mode is the user's choice, worded as the system check words it, not a fault."""
    for other in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(variable, "1")
    code, wizard, out = choose_hub_dataset(tmp_path).run()
    assert code == 0
    assert f"offline mode ({variable} is set)" in out and "not reachable" not in out
    assert wizard.configs["data"].source == "builtin"


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
    walk = Walkthrough(tmp_path).use_corpus(corpus).manage("Create new configuration").answer("Preset", "tiny")
    walk.manage("Edit configuration table").table("trainer").edit("max_seq_len=16 batch_size=4 max_steps=3", "")
    walk.manage("Continue with current settings")
    walk.main("Start training").answer("Start training?", "n")
    walk.main("Start training").answer("Start training?", "y").main("Exit")
    code, wizard, out = walk.run()
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
    walk = Walkthrough(tmp_path).main("Chat / generate with a model").answer("Model", "1")
    for line in ("the model", "/temperature 0", "/top_k x", "/top_p 2", "/nope", ""):
        walk.answer("you", line)
    walk.main("Evaluate a checkpoint").answer("Model to evaluate", "1")
    walk.main("Export a model").answer("Model to export", "1").answer("Format", "hf")
    walk.answer("Export to", "").main("Exit")  # Enter: the default folder
    code, _, out = walk.run()
    assert code == 0, out
    assert "temperature = 0.0" in out and "needs a whole number" in out and "out of range" in out
    assert "unknown command /nope" in out and "model: the model" in out
    assert "perplexity" in out and "exported to" in out
    assert (tmp_path / "runs" / "exports" / "r-hf" / "config.json").exists()  # under the runs, not the repository


def test_export_gguf_from_the_menu_then_chat_with_the_file(tmp_path, trained):
    """Menu 8 writes a GGUF of the chosen type; menus 6 (chat) and 5 (fine-tune) take a .gguf path."""
    gguf_file = tmp_path / "gguf" / "model-q8_0.gguf"
    walk = Walkthrough(tmp_path).main("Export a model").answer("Model to export", "1").answer("Format", "gguf")
    walk.answer("GGUF tensor type", "q3").answer("GGUF tensor type", "q8_0").answer("Export to", str(tmp_path / "gguf"))
    walk.main("Chat / generate with a model").answer("Model", str(tmp_path / "missing.gguf"))
    walk.answer("Model", str(gguf_file)).answer("you", "/temperature 0").answer("you", "the model").answer("you", "")
    walk.main("Exit")
    code, _, out = walk.run()
    assert code == 0, out
    assert gguf_file.exists() and (tmp_path / "gguf" / "Modelfile").exists()
    words = " ".join(out.split())  # long temporary paths wrap
    assert "q8_0" in words and "ollama create" in words
    assert "missing.gguf: not a number from the list, and" in words and "no such file or folder" in words
    assert "model-q8_0.gguf (gguf); text continuation mode" in words and "you: the model" in words


def test_evaluate_gives_the_figures_the_command_line_gives(tmp_path, trained, capsys, monkeypatch):
    """The same run, the same settings: one number from either front end."""
    requests = []
    evaluate_model = runs.evaluate_model
    monkeypatch.setattr(runs, "evaluate_model", lambda request, *rest, **options: requests.append(request)
                        or evaluate_model(request, *rest, **options))
    assert train.main(["eval", str(trained), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    code, _, out = Walkthrough(tmp_path).main("Evaluate a checkpoint").answer("Model to evaluate", "1").main("Exit").run()
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
    code, _, out = Walkthrough(tmp_path).main("Evaluate a checkpoint").answer("Model to evaluate", "1").main("Exit").run()
    assert code == 0 and "evaluating on the val split: 1/" in out


def test_finetune_from_the_menu_uses_the_lora_table_and_fits_the_base_context(tmp_path, corpus):
    assert train.main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "runs"),
                       "--name", "base", "--cache-dir", str(tmp_path / "cache"), "--seq-len", "48", "--batch-size", "4",
                       "data.vocab_size=300", "trainer.max_steps=2"]) == 0
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "say", "response": word}) for word in ("the", "model", "reads") * 8))
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Edit configuration table")
    walk.table("lora").edit("dropout=0 target_modules=q_proj,v_proj", "").manage("Continue with current settings")
    walk.main("Fine-tune a model with LoRA / QLoRA").answer("Base model", "1").answer("Instruction data", str(data))
    walk.answer("LoRA rank", "4").answer("QLoRA", "n").answer("merged model", "").answer("Time budget", "")
    walk.answer("Epochs", "1").answer("General text", str(corpus)).main("Exit")
    code, wizard, out = walk.run()
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
    code, _, out = Walkthrough(tmp_path).main("Resume a run").answer("Run to resume", "1").main("Exit").run()
    assert code == 0, out
    assert f"(step {before})" in out
    assert checkpoint.read_state(checkpoint.latest(trained))["global_step"] == before


def test_ctrl_c_inside_an_action_returns_to_the_menu(tmp_path, monkeypatch):
    def interrupted(root):
        raise KeyboardInterrupt

    monkeypatch.setattr("wizard.list_runs", interrupted)
    code, _, out = Walkthrough(tmp_path).main("Resume a run").main("Exit").run()
    assert code == 0
    assert "Ctrl-C: cancelled Resume a run; back to the first menu" in out and out.count("Training Setup") == 2


def test_an_unexpected_error_in_an_action_is_logged_and_the_menu_comes_back(tmp_path, monkeypatch):
    def broken(root):
        raise TypeError("something nobody planned for")

    monkeypatch.setattr("wizard.list_runs", broken)
    code, _, out = Walkthrough(tmp_path).main("Resume a run").main("Exit").run()
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


# ---- a way back everywhere ------------------------------------------------------------------------
@pytest.mark.parametrize("back", ["b", "back", "q", ESC, ""])
def test_b_q_esc_and_enter_go_back_from_the_table_choice_and_the_duration(tmp_path, back):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration")
    walk.manage("Edit configuration table").answer("Select table", back)
    walk.manage("Optimize for training time").answer("desired training time", back)
    walk.manage("Continue with current settings").main("Exit")
    code, wizard, out = walk.run()
    assert code == 0, out
    assert "cannot read" not in out and "Please enter one of" not in out
    assert out.count("Dataset and Configuration Management") == 3 and out.count("back to the configuration menu") == 2
    assert "b, Esc or Enter: back · Ctrl-C: cancel · Ctrl-D: up one level" in out  # the convention, on screen


def test_ctrl_c_at_a_prompt_cancels_that_action_and_says_so(tmp_path):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Optimize for training time")
    walk.press("desired training time", CTRL_C).press("Select option (1-8)", CTRL_C)
    walk.press("Select option (1-9)", CTRL_C)  # at the first menu: leave, as Exit does
    code, _, out = walk.run()
    assert code == 0, out
    assert "Ctrl-C: cancelled Optimize for training time; back to the configuration menu" in out
    assert "Ctrl-C: back to the first menu" in out and "Ctrl-C at the first menu" in out
    assert out.rstrip().endswith("bye")


def test_ctrl_c_at_the_first_menu_still_asks_about_unsaved_changes(tmp_path):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Create new configuration")
    walk.answer("Preset", "tiny").manage("Continue with current settings")
    walk.press("Select option (1-9)", CTRL_C).press("Save before leaving", CTRL_C)  # Ctrl-C again: stay
    walk.press("Select option (1-9)", CTRL_D).answer("Save before leaving", "n")
    code, wizard, out = walk.run()
    assert code == 0, out
    assert out.count("unsaved configuration changes: model.") == 2 and "staying" in out


def test_ctrl_d_goes_up_one_level_not_out_of_the_wizard(tmp_path):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Edit configuration table")
    walk.table("model").edit("num_layers").press("New num_layers", CTRL_D)  # drops the value: back to Edit
    walk.press("Edit", CTRL_D)  # leaves the table: back to the configuration menu
    walk.manage("Optimize for training time").press("desired training time", CTRL_D)
    walk.press("Select option (1-8)", CTRL_D)  # the configuration menu: back to the first menu
    walk.main("Exit")
    code, _, out = walk.run()
    assert code == 0, out
    assert "Ctrl-D: left the table" in out and "Ctrl-D: back to the first menu" in out
    assert "Ctrl-D: left Optimize for training time; back to the configuration menu" in out
    assert out.count("Training Setup") == 2 and out.rstrip().endswith("bye")


def test_exit_asks_about_unsaved_changes_and_saves_under_the_runs_folder(tmp_path):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Edit configuration table")
    walk.table("model").edit("num_layers=6", "")
    walk.manage("Exit").answer("Save before leaving", "b")  # stay
    walk.manage("Exit").answer("Save before leaving", "y").answer("Save to", "")  # Enter: the default file
    code, wizard, out = walk.run()
    assert code == 0, out
    assert "unsaved configuration changes: model.num_layers" in out
    assert "staying" in out and out.count("Dataset and Configuration Management") == 3  # menu, after edit, stayed
    saved = tmp_path / "runs" / "configs" / "sprat.json"  # beside the runs, not in the repository
    assert json.loads(saved.read_text())["model"]["num_layers"] == 6 and out.rstrip().endswith("bye")


def test_exit_without_saving_and_nothing_to_ask_after_a_save(tmp_path):
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Edit configuration table")
    walk.table("trainer").edit("learning_rate=3e-4", "").manage("Continue with current settings")
    walk.main("Exit").answer("Save before leaving", "n")
    code, _, out = walk.run()
    assert code == 0 and "trainer.learning_rate" in out and out.rstrip().endswith("bye")
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Edit configuration table")
    walk.table("trainer").edit("learning_rate=3e-4", f"save {tmp_path / 'mine.json'}", "")
    walk.manage("Exit")  # saved in the table: no question
    code, _, out = walk.run()
    assert code == 0 and "unsaved" not in out


def test_an_empty_path_goes_back_to_the_dataset_menu_without_reading_anything(tmp_path, monkeypatch):
    def must_not_read(*args, **kwargs):
        raise AssertionError("read a dataset")

    monkeypatch.setattr("wizard.read_source", must_not_read)
    monkeypatch.setattr("wizard.prepare", must_not_read)
    walk = Walkthrough(tmp_path).main("Manage dataset/configuration").manage("Change dataset")
    walk.dataset("a local file or folder").answer("Path to the file or folder", "")
    walk.dataset("a local file or folder").answer("Path to the file or folder", str(tmp_path))  # no data files
    walk.answer("Path to the file or folder", ESC).dataset("back")
    walk.manage("Continue with current settings").main("Exit")
    code, wizard, out = walk.run()
    assert code == 0, out
    assert "holds no" in out and wizard.configs["data"].source == "builtin"
    assert out.count("Dataset\n1. built-in corpus") == 3


@pytest.fixture
def gguf_base(tmp_path):
    """A path the fine-tune menu accepts as a base (nothing reads it in these tests)."""
    path = tmp_path / "base.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_finetune_goes_back_on_an_empty_data_path_before_asking_anything_else(tmp_path, gguf_base):
    walk = Walkthrough(tmp_path).main("Fine-tune a model with LoRA / QLoRA")
    walk.answer("Base model", str(tmp_path)).answer("Base model", str(gguf_base)).answer("Instruction data", "")
    walk.main("Exit")
    code, _, out = walk.run()
    assert code == 0, out
    assert "not a run (run.json)" in out and "LoRA rank" not in out


def test_finetune_checks_each_answer_when_typed_and_offers_a_merge(tmp_path, gguf_base, corpus, monkeypatch):
    requests = []
    monkeypatch.setattr(Wizard, "run_operation", lambda self, operation: operation(None))
    monkeypatch.setattr(runs, "finetune", lambda request, *rest: requests.append(request))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("plain text, not instruction records")
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "say", "response": word}) for word in ("a", "b", "c")))
    walk = Walkthrough(tmp_path).main("Fine-tune a model with LoRA / QLoRA").answer("Base model", str(gguf_base))
    walk.answer("Instruction data", str(corpus)).answer("Instruction data", str(text_file))
    walk.answer("Instruction data", str(data)).answer("LoRA rank", "0").answer("LoRA rank", "")
    walk.answer("QLoRA", "n").answer("merged model", "y").answer("Time budget", "soon").answer("Time budget", "")
    walk.answer("Epochs", "").answer("General text", str(tmp_path / "nonexistent")).answer("General text", "none")
    walk.main("Exit")
    code, _, out = walk.run()
    assert code == 0, out
    words = " ".join(out.split())
    assert "not an instruction record" in words and "plain text, but fine-tuning needs instruction records" in words
    assert "expected a positive whole number" in words and "cannot read 'soon'" in words
    assert "nonexistent: no such file or folder" in words
    (request,) = requests
    defaults = runs.FinetuneRequest(base="", data="")
    assert request.merge and request.general_data is None and request.budget is None
    assert (request.lora.rank, request.epochs) == (defaults.rank, defaults.epochs)  # Enter: the shared defaults


class FakeTokenizer:
    pass


def test_chat_labels_each_turn_and_collapses_blank_lines(tmp_path, gguf_base, monkeypatch):
    replies = iter([["\n" * 20, "hello", "\n\n\n\n\n", "  ", "\n", "world", "\n\n"], ["\n"] * 20])
    sampled = []

    model = Transformer(ModelConfig.from_name("tiny"))

    def stream(model, tokenizer, text, *settings, special_tokens):
        sampled.append(settings[:4])
        assert not special_tokens  # a Sprat fine-tune's chat template: no BOS added
        held.append(not model.layers[0].self_attn.q_proj.weight.is_contiguous())
        yield from next(replies)

    held = []  # whether the decoding layout is held at each reply: laid out once for the whole chat
    monkeypatch.setattr("wizard.load_trained", lambda path: runs.Loaded(model, FakeTokenizer(), path, "finetuned"))
    monkeypatch.setattr("wizard.chat_prompt", lambda tokenizer, text: text)
    monkeypatch.setattr("wizard.stop_tokens", lambda loaded: ())
    monkeypatch.setattr("wizard.stream_text", stream)
    walk = Walkthrough(tmp_path).main("Chat / generate with a model").answer("Model", str(gguf_base))
    walk.answer("you", "hi").answer("you", "again").answer("you", ESC).main("Exit")
    code, _, out = walk.run()
    assert code == 0, out
    assert "you: hi\nmodel: hello\n\nworld\n" in out
    assert "you: again\nmodel: (a blank reply)\n" in out
    settings = runs.GenerateSettings()
    assert sampled[0] == (settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p)
    assert held == [True, True] and all(p.is_contiguous() for p in model.parameters())  # and put back after


@pytest.mark.parametrize("pieces, continuing, shown", [
    (["\n\n\nA", "\n\n\n\n", "B\n"], False, "A\n\nB"),
    (["a\n", "b \n  c"], False, "a\nb\n  c"),  # spaces ending a line go too
    ([" the", " end\n\n\n\n  indented"], True, " the end\n\n  indented"),
    (["\n" * 20], False, ""),
])
def test_blank_lines_collapse_across_pieces(pieces, continuing, shown):
    blank_lines = BlankLines(continuing)
    assert "".join(blank_lines(piece) for piece in pieces) == shown


def test_the_system_check_can_be_run_again_from_the_menu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, out = Walkthrough(tmp_path).main("Check this system again").main("Exit").run()
    assert code == 0, out
    assert "system check" in out and "Python" in out and out.count("Training Setup") == 2


def test_the_lora_table_shows_the_adapters_figures(tiny):
    from lora import apply_lora
    from model import Transformer

    lora = runs.LoRAConfig(rank=4, target_modules=("q_proj", "v_proj"))
    figures = dict(derived_figures({"model": tiny, "trainer": runs.TrainerConfig(), "lora": lora}, "lora"))
    model = Transformer(tiny)
    apply_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert figures["LoRA parameters (trained)"].startswith(f"{trainable:,} = ")
    assert figures["adapted linears"].startswith(f"{2 * tiny.num_layers} (q_proj, v_proj)")
    assert "parameters" not in figures and "tokens per optimizer step" not in figures  # the model table's figures
    quantized = dict(derived_figures({"model": tiny, "lora": dataclasses.replace(lora, quantize_base=True)}, "lora"))
    assert "NF4" in quantized["frozen base in memory"]


# ---- screens at 80 and 140 columns ----------------------------------------------------------------
@pytest.mark.parametrize("width", [80, 140])
def test_every_screen_fits_the_terminal_and_leaves_room_to_type(tmp_path, monkeypatch, width):
    """Every menu and prompt (back out of each), as a new user would visit them."""
    monkeypatch.chdir(tmp_path)  # defaults as a user sees them: checkpoints/...
    walk = Walkthrough(tmp_path, width=width).main("Manage dataset/configuration").manage("Change dataset")
    walk.dataset("a local file or folder").answer("Path to the file or folder", "").dataset("back")
    walk.manage("Load existing configuration").answer("Configuration file", "b")
    walk.manage("Create new configuration").answer("Preset", "b")
    walk.manage("Save current configuration").answer("Save to", "b")
    walk.manage("Optimize for training time").answer("desired training time", ESC)
    for section in ("model", "trainer", "data", "lora"):
        walk.manage("Edit configuration table").table(section).edit("help", "show", "3").answer("New", "")
        walk.edit("reset").answer("Reset to preset", "b").edit("")
    walk.manage("Continue with current settings")
    for item, prompt in [("Resume a run", "Run to resume"), ("Fine-tune a model with LoRA / QLoRA", "Base model"),
                         ("Chat / generate with a model", "Model"), ("Evaluate a checkpoint", "Model to evaluate"),
                         ("Export a model", "Model to export")]:
        walk.main(item).answer(prompt, "")
    walk.main("Exit")
    code, _, out = walk.run(out_dir="checkpoints", cache_dir=".cache/sprat")
    assert code == 0, out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width
    assert not [line for line in lines if re.match(r"\d\. ", line) and line != line.rstrip()]  # menus unpadded
    assert max(len(prompt) for prompt in walk.prompts) <= 50  # 30 columns left to type at 80
    model_table = out.split("model (ModelConfig)")[1].split("row number or field name")[0]
    # one line a field, plus the header, four rules and three figures (it was ~60 lines at 80 columns)
    assert len(model_table.splitlines()) <= len(dataclasses.fields(runs.ModelConfig)) + 9
    assert not (tmp_path / "configs").exists() and not (tmp_path / "exports").exists()
