"""Every subcommand: good arguments do their job, bad ones exit 2 with a message that
says what to fix. One tiny run (trained once per module) serves generate, eval and export."""

import json
import re

import numpy as np
import pytest
import torch

import checkpoint
import runs
import train
from conftest import write_corpus
from data import MaskedSamples, PackedBlocks
from model import ModelConfig, Transformer

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for 6 steps: (run directory, cache directory)."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus.jsonl")
    code = train.main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(root / "runs"), "--name", "r",
                       "--cache-dir", str(root / "cache"), "--seq-len", "16", "--batch-size", "4",
                       "data.vocab_size=300", "trainer.max_steps=6", "trainer.eval_steps=2"])
    assert code == 0
    return root / "runs" / "r", root / "cache"


def test_no_command_without_a_terminal_prints_help_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert train.main([]) == 2
    err = capsys.readouterr().err
    assert "usage: train.py" in err and "no terminal" in err


@pytest.mark.parametrize("command", ["train", "finetune", "resume", "generate", "eval", "export", "plan", "check",
                                     "config"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: train.py {command}" in capsys.readouterr().out


def test_generate_streams_a_repeatable_continuation(run, capsys):
    run_dir, _ = run
    args = ["generate", str(run_dir), "--prompt", "the model", "--max-new-tokens", "12", "--temperature", "0"]
    assert train.main(args) == 0
    first = capsys.readouterr().out
    assert train.main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("the model") and len(first) > len("the model\n")


def test_generate_matches_the_model_loaded_by_hand(run, capsys):
    """Greedy text from the CLI equals greedy decoding of the checkpoint's weights."""
    run_dir, _ = run
    loaded = runs.load_trained(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    model = Transformer(ModelConfig.from_dict(info["model"]))
    model.load_state_dict(checkpoint.load(checkpoint.latest(run_dir))[0])
    ids = loaded.tokenizer("the model", add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), 8, temperature=0, eos_token_id=loaded.tokenizer.eos_token_id)
    expected = loaded.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    assert train.main(["generate", str(run_dir), "--prompt", "the model", "--max-new-tokens", "8",
                       "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected


def exit_code(args: list[str]) -> int:
    """train.main's exit code, whether it returns it or argparse exits with it."""
    try:
        return train.main(args)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("extra, message", [
    (["--top-p", "1.5"], "argument --top-p: 1.5 must be in (0, 1]"),
    (["--temperature", "-1"], "argument --temperature: -1 must be a number >= 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be at least 1"),
    (["--top-k", "two"], "argument --top-k: 'two' is not a whole number"),
    (["--checkpoint", "step_999"], "no such checkpoint"),
])
def test_generate_bad_arguments_write_nothing_to_stdout(run, capsys, extra, message):
    run_dir, _ = run
    assert exit_code(["generate", str(run_dir), "--prompt", "x", *extra]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""


@pytest.mark.parametrize("extra, message", [
    (["--max-batches", "0"], "argument --max-batches: 0 must be at least 1"),
    (["--max-batches", "-1"], "argument --max-batches: -1 must be at least 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    (["--seq-len", "0"], "argument --seq-len: 0 must be at least 1"),
])
def test_eval_refuses_batch_arguments_that_would_measure_nothing(run, capsys, extra, message):
    run_dir, cache = run
    assert exit_code(["eval", str(run_dir), "--cache-dir", str(cache), *extra]) == 2
    out, err = capsys.readouterr()
    assert message in err and "loss" not in out


@pytest.mark.parametrize("extra", [["--seq-len", "0"], ["--batch-size", "0"], ["--batch-size", "-3"]])
def test_train_refuses_sizes_below_one_instead_of_replacing_them(tmp_path, capsys, extra):
    assert exit_code(["train", "--out", str(tmp_path), *extra]) == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_resume_bad_arguments(run, tmp_path, capsys):
    run_dir, _ = run
    assert exit_code(["resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert exit_code(["resume", str(run_dir), "--checkpoint", "step_999"]) == 2
    assert "step_999: no such checkpoint" in capsys.readouterr().err
    assert exit_code(["resume", str(run_dir), "model.num_layers=3"]) == 2
    assert "cannot change on resume (model.num_layers" in capsys.readouterr().err
    assert exit_code(["resume", str(run_dir), "trainer.use_moe=yes"]) == 2  # a mirror of model.use_moe
    assert "cannot change on resume (model.use_moe" in capsys.readouterr().err


def test_evaluate_refuses_empty_measurements(tiny):
    from trainer import evaluate

    model = Transformer(tiny)
    data = PackedBlocks.from_stream(np.arange(65, dtype=np.int32) % 64, 16)
    with pytest.raises(ValueError, match="at least 1"):
        evaluate(model, data, batch_size=4, max_batches=0)
    assert evaluate(model, data, batch_size=4, max_batches=1) > 0
    masked = MaskedSamples(np.zeros((2, 16), dtype=np.int32), np.full((2, 16), -100, dtype=np.int32))
    with pytest.raises(ValueError, match="no target tokens"):  # not a loss of 0 and a perplexity of 1
        evaluate(model, masked, batch_size=2)


def test_model_commands_on_a_missing_or_wrong_directory(tmp_path, capsys):
    assert train.main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such run or model directory" in capsys.readouterr().err
    assert train.main(["eval", str(tmp_path)]) == 2
    assert "not a Sprat run directory" in capsys.readouterr().err


def test_eval_reproduces_the_runs_last_validation_loss(run, capsys):
    """eval over the same batches as the trainer's final evaluation gives the same loss."""
    run_dir, cache = run
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [e for e in events if e["type"] == "eval"][-1]
    assert train.main(["eval", str(run_dir), "--json", "--max-batches", "2", "--batch-size", "4",
                       "--cache-dir", str(cache)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["seq_len"] == 16
    assert result["loss"] == pytest.approx(last_eval["val_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)


def test_eval_plain_text_and_bad_seq_len(run, capsys):
    run_dir, cache = run
    assert train.main(["eval", str(run_dir), "--max-batches", "1", "--cache-dir", str(cache)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert train.main(["eval", str(run_dir), "--seq-len", "64", "--cache-dir", str(cache)]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_export_loads_in_transformers_with_the_same_logits(run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir, _ = run
    out = tmp_path / "hf"
    assert train.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    ours = runs.load_trained(run_dir).model.eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)
    assert train.main(["export", str(run_dir), "--out", str(out)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err
    assert train.main(["export", str(run_dir), "--out", str(out / "config.json")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_export_from_a_checkpoint_directory_and_unknown_format(run, tmp_path, capsys):
    run_dir, _ = run
    latest = checkpoint.latest(run_dir)
    assert train.main(["export", str(latest), "--out", str(tmp_path / "x")]) == 0
    assert latest.name in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        train.main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "y")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train.main(["export", str(run_dir), "--format", "gguf", "--quant", "q3_k", "--out", str(tmp_path / "y")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'q3_k'" in capsys.readouterr().err


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_export_gguf_then_every_model_command_reads_the_file(run, tmp_path, capsys, quant):
    """The .gguf an export writes is a model path for generate and eval: at f32 it continues
    a prompt exactly as the run does and evaluates to the same loss."""
    run_dir, cache = run
    out = tmp_path / "gguf"
    assert train.main(["export", str(run_dir), "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0
    gguf_file = out / f"model-{quant}.gguf"
    assert str(gguf_file) in capsys.readouterr().out
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{gguf_file.name}\n")
    texts = []
    for model in (run_dir, gguf_file):
        assert train.main(["generate", str(model), "--prompt", "the model", "--temperature", "0",
                           "--max-new-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    losses = []
    for model in (run_dir, gguf_file):
        assert train.main(["eval", str(model), "--data", str(cache.parent / "corpus.jsonl"), "--cache-dir", str(cache),
                           "--seq-len", "16", "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    if quant == "f32":
        assert texts[0] == texts[1]
        assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    else:
        assert losses[1] == pytest.approx(losses[0], rel=0.02)
    assert train.main(["generate", str(tmp_path / "missing.gguf"), "--prompt", "x"]) == 2
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    assert train.main(["generate", str(tmp_path / "bad.gguf"), "--prompt", "x"]) == 2
    assert "bad.gguf" in capsys.readouterr().err


def test_check_json_reports_every_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = train.main(["check", "--json", "--out", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 1)
    assert {c["name"] for c in report["checks"]} >= {"Python", "GPU", "CPU", "RAM", "Disk", "Packages", "Hub"}
    assert report["hardware"]["device"] in ("cpu", "cuda")
    hub = next(c for c in report["checks"] if c["name"] == "Hub")
    assert hub["message"].startswith("offline mode") and hub["facts"]["offline_mode"] is True


def test_check_plain_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert train.main(["check", "--out", str(tmp_path)]) == 0  # warnings (no GPU, no hub) are not failures
    out = capsys.readouterr().out
    assert "Python" in out and "Disk" in out and "device" in out
    assert re.search(r"^\| Packages \| \w+ \| torch .*, bitsandbytes", out, re.MULTILINE)  # a row a line, no box
    assert not set("┃│┏━") & set(out) and "\x1b[" not in out
    assert not [line for line in out.splitlines() if line != line.rstrip() or "   " in line]  # no padding


def test_config_show_in_a_pipe_is_unpadded_markdown(capsys):
    assert train.main(["config", "show", "--section", "lora"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["lora (LoRAConfig)", "| # | field | value | help |", "|---|---|---|---|"]
    assert "| 1 | rank | 16 | rank r of the update B·A |" in lines
    assert all(line == line.rstrip() and "   " not in line for line in lines)


def test_check_exits_1_when_a_check_fails(tmp_path, capsys, monkeypatch):
    import system_check

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(system_check.SystemCheck, "check_python",
                        lambda self: system_check.Check("Python", "fail", "Python 3.8.0: Sprat needs Python 3.9"))
    assert train.main(["check", "--out", str(tmp_path)]) == 1
    assert "Sprat needs Python 3.9" in capsys.readouterr().out


def test_the_commands_and_the_wizard_take_their_defaults_from_runs():
    """One place for each default: the request dataclasses and constants of runs.py."""
    parser = train.build_parser()
    generate = parser.parse_args(["generate", "RUN", "--prompt", "x"])
    sampling = runs.GenerateSettings()
    assert (generate.max_new_tokens, generate.temperature, generate.top_k, generate.top_p) == \
        (sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p)
    export = parser.parse_args(["export", "RUN", "--out", "x"])
    assert (export.format, export.quant) == (runs.DEFAULT_EXPORT_FORMAT, runs.DEFAULT_GGUF_QUANT)
    finetune = parser.parse_args(["finetune", "BASE", "--data", "x"])
    request = runs.FinetuneRequest(base="BASE", data="x")
    assert (finetune.rank, finetune.epochs, finetune.merge, finetune.general_data, finetune.max_general_rise) == \
        (request.rank, request.epochs, request.merge, request.general_data, request.max_general_rise)
    assert request.rank == runs.LoRAConfig().rank  # the wizard's default rank is the LoRA table's
    check = parser.parse_args(["check"])
    assert check.out == runs.TrainerConfig().path_to_checkpoints
    assert parser.parse_args(["train"]).cache_dir == runs.DEFAULT_CACHE


def test_config_show_lists_every_field(capsys):
    assert train.main(["config", "show"]) == 0
    out = capsys.readouterr().out
    for name in ("num_kv_heads", "learning_rate", "subset_size", "use_rslora"):
        assert name in out


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_set_then_validate_then_train_reads_it(tmp_path, capsys, suffix):
    path = str(tmp_path / f"my{suffix}")
    assert train.main(["config", "set", path, "model.num_layers=3", "trainer.learning_rate=3e-4"]) == 0
    assert train.main(["config", "set", path, "data.subset_size=7"]) == 0  # updates, keeps the earlier values
    assert train.main(["config", "validate", path]) == 0
    assert "valid" in capsys.readouterr().out
    configs = runs.load_config_file(path, runs.default_configs())
    assert configs["model"].num_layers == 3
    assert configs["trainer"].learning_rate == 3e-4
    assert configs["data"].subset_size == 7


@pytest.mark.parametrize("content, message", [
    ('{"model": {"num_heads": 4, "num_kv_heads": 3}}', "num_kv_heads"),
    ('{"model": {"num_layerz": 4}}', "model.num_layerz"),
    ('{"optimiser": {}}', "optimiser"),
    ('{"model": ', "not valid JSON"),
])
def test_config_validate_rejects_bad_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert train.main(["config", "validate", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["config", "set", "{file}"], "needs SECTION.FIELD=VALUE"),
    (["config", "set", "{file}", "model.num_layers=two"], "expected an integer"),
    (["config", "validate"], "needs a FILE"),
    (["config", "validate", "{file}"], "does not exist"),
])
def test_config_bad_arguments(tmp_path, capsys, args, message):
    args = [a.format(file=tmp_path / "c.json") for a in args]
    assert train.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_plan_json_fits_the_budget(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert train.main(["plan", "--budget", "5m", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                       "--json", "data.vocab_size=300"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)  # progress goes beside the JSON, never into it
    assert re.search(r"tokenizing documents: (\d+)/\1 documents, eta 0\.0s", captured.err)
    assert re.search(r"measuring this machine \(throughput probes\): ([36])/\1 probes, eta 0\.0s\n", captured.err)  # 6: one retake
    assert 0 < plan["train_seconds"] < 300 and plan["model"]["vocab_size"] <= 300
    deadline = plan["trainer"]["schedule_by"] == "time" and plan["estimate"]["ends_by"] == "deadline"
    assert deadline or plan["trainer"]["max_steps"] == plan["steps"] >= 5  # (a fixed few steps on a very busy machine)
    assert plan["steps"] == plan["estimate"]["steps"]


def test_piped_train_shows_the_tokenizing_progress_on_stderr(tmp_path, capsys):
    """The first and the last progress lines of the data preparation (n/N documents and
    an ETA) go to stderr; stdout keeps the run's log. Cached data is not tokenized again."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", documents=60)
    args = ["train", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "runs"), "--cache-dir",
            str(tmp_path / "cache"), "--seq-len", "16", "--batch-size", "4", "data.vocab_size=300",
            "trainer.max_steps=1"]
    assert train.main([*args, "--name", "first"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("tokenizing documents: ")]
    assert lines and re.fullmatch(r"tokenizing documents: (\d+)/\1 documents, eta 0\.0s", lines[-1])
    assert "tokenizing" not in captured.out and "preparing data from" in captured.out
    assert train.main([*args, "--name", "second"]) == 0
    assert "tokenizing" not in capsys.readouterr().err  # from the cache


def test_a_budget_shorter_than_start_up_plans_a_few_steps_and_says_so(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert train.main(["plan", "--budget", "1s", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                       "data.vocab_size=300"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "training 5 steps anyway" in out and "start-up and data preparation took" in out
    assert "estimate: ~5 optimizer steps" in out


@pytest.mark.parametrize("args, message", [
    (["plan", "--budget", "soon"], "cannot read 'soon' as a duration"),
    (["plan", "--budget", "1m", "data.nope=1"], "DataConfig has no field 'nope'"),
])
def test_plan_bad_arguments(tmp_path, capsys, args, message):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    args = [a.format(corpus=corpus) for a in args] + ["--cache-dir", str(tmp_path / "cache")]
    assert train.main(args) == 2
    assert message in capsys.readouterr().err
