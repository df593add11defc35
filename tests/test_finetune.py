"""The fine-tuning flow end to end: `train.py finetune` on a local base and local data."""

import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import runs
import train
from conftest import write_corpus
from data import train_bpe
from export import load_adapter, load_hf, save_hf
from model import ModelConfig, Transformer

RECORDS = [{"instruction": f"Repeat the word {word}", "output": f"{word} {word} {word}"}
           for word in ("fish", "boat", "net", "sea", "wave", "salt", "tide", "reef", "shell", "sand", "gull", "rope")]


@pytest.fixture
def base_and_data(tmp_path):
    texts = [json.dumps(r) for r in RECORDS] * 3 + ["def f(x):\n    return x\n"] * 5
    tokenizer = train_bpe(texts, vocab_size=320)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=len(tokenizer), context_len=64))
    save_hf(model, tmp_path / "base", tokenizer)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    write_corpus(tmp_path / "general.jsonl")  # the guard's general text (the built-in corpus is slower to read)
    return tmp_path / "base", data


def general(tmp_path) -> list[str]:
    return ["--general-data", str(tmp_path / "general.jsonl")]


def losses(run, kind="step", key="loss"):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e[key] for e in events if e["type"] == kind]


@pytest.mark.parametrize("qlora", [False, True])
def test_finetune_lowers_the_response_loss_and_saves_an_adapter(tmp_path, base_and_data, qlora):
    base, data = base_and_data
    args = ["finetune", str(base), "--data", str(data), "--rank", "8", "--epochs", "30", "--batch-size", "4",
            "--seq-len", "48", "--out", str(tmp_path / "runs"), "--name", "ft", "--cache-dir", str(tmp_path / "cache"),
            "trainer.learning_rate=1e-2", "trainer.min_lr=1e-3", "data.val_fraction=0.2", "--merge",
            "--general-data", "none", "trainer.early_stopping_patience=0"]
    assert train.main(args + (["--qlora"] if qlora else [])) == 0
    run = tmp_path / "runs" / "ft"
    step_losses = losses(run)
    # a random 2-layer base with a frozen tied head learns slowly: ~8% in 90 steps
    assert sum(step_losses[-3:]) < 0.95 * sum(step_losses[:3])
    val = losses(run, "eval", "val_loss")
    assert val[-1] < val[0]
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(".lora_" in key for key in adapter)
    # checkpoints hold the adapter weights only, and the merged model loads without LoRA
    model_state, _, state = checkpoint.load(checkpoint.latest(run))
    assert state["adapter_only"] and all(key.endswith(("lora_A", "lora_B")) for key in model_state)
    merged = load_hf(run / "merged")
    assert merged.config.vocab_size == Transformer(merged.config).config.vocab_size


def test_finetune_run_resumes(tmp_path, base_and_data):
    base, data = base_and_data
    common = ["--out", str(tmp_path / "runs"), "--name", "ft", "--cache-dir", str(tmp_path / "cache"), *general(tmp_path)]
    assert train.main(["finetune", str(base), "--data", str(data), "--rank", "2", "--epochs", "2", "--batch-size", "4",
                       "--seq-len", "48", "trainer.max_steps=2", *common]) == 0
    run = tmp_path / "runs" / "ft"
    assert train.main(["resume", str(run), "trainer.max_steps=4"]) == 0
    assert checkpoint.read_state(checkpoint.latest(run))["global_step"] == 4


def test_finetune_bad_inputs(tmp_path, base_and_data, capsys):
    base, data = base_and_data
    assert train.main(["finetune", str(tmp_path), "--data", str(data), "--cache-dir", str(tmp_path)]) == 2
    assert "not a Sprat run directory" in capsys.readouterr().err
    assert train.main(["finetune", str(base), "--data", str(data), "--cache-dir", str(tmp_path), "--seq-len", "48",
                       "lora.target_modules=wq"]) == 2
    assert "'wq' match no linear layer" in capsys.readouterr().err
    assert train.main(["finetune", str(base), "--data", str(data), "--seq-len", "512", "--cache-dir",
                       str(tmp_path)]) == 2
    assert "exceeds the base model's context" in capsys.readouterr().err


def test_a_finetuning_run_generates_evaluates_and_exports_merged(tmp_path, base_and_data, capsys):
    """The run directory of a fine-tune (base + adapter-only checkpoints) serves generate,
    eval and export; the export equals the merged model written at the end of training."""
    base, data = base_and_data
    cache = str(tmp_path / "cache")
    assert train.main(["finetune", str(base), "--data", str(data), "--rank", "2", "--batch-size", "4",
                       "--seq-len", "48", "trainer.max_steps=3", "--merge", "--out", str(tmp_path / "runs"),
                       "--name", "ft", "--cache-dir", cache, *general(tmp_path)]) == 0
    run = tmp_path / "runs" / "ft"
    capsys.readouterr()
    assert train.main(["generate", str(run), "--chat", "--prompt", "Repeat the word fish", "--max-new-tokens", "4",
                       "--temperature", "0"]) == 0
    assert train.main(["eval", str(run), "--json", "--cache-dir", cache]) == 0
    result = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the generated line
    kept = json.loads((run / "run.json").read_text())["finetune"]["result"]
    assert result["checkpoint"] == kept["checkpoint"]  # the state the guard kept, as the adapter
    assert result["loss"] == pytest.approx(kept["tuned_task_loss"], rel=1e-4)
    assert train.main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    merged = load_file(str(run / "merged" / "model.safetensors"))
    assert exported.keys() == merged.keys()
    for key in merged:
        assert (exported[key] == merged[key]).all(), key


# ---- the quality guard, budgets, reports --------------------------------------------------------
def finetune_args(tmp_path, base, data, *extra):
    return ["finetune", str(base), "--data", str(data), "--rank", "4", "--batch-size", "4", "--out",
            str(tmp_path / "runs"), "--name", "ft", "--cache-dir", str(tmp_path / "cache"), "data.val_fraction=0.25",
            *general(tmp_path), *extra]


def test_the_guard_keeps_the_best_checkpoint_within_it_and_eval_compare_prints_the_same_figures(
        tmp_path, base_and_data, capsys):
    base, data = base_and_data
    assert train.main(finetune_args(tmp_path, base, data, "--epochs", "6", "trainer.learning_rate=1e-2")) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "ft"
    info = json.loads((run / "run.json").read_text())
    result, guard = info["finetune"]["result"], info["finetune"]["guard"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["type"] == "eval"]
    assert evals and all(e["general_loss"] is not None for e in evals)
    within = [e for e in evals if e["general_loss"] <= guard["base_general_loss"] + math.log1p(0.05)
              and e["val_loss"] < guard["base_task_loss"]]
    # the kept checkpoint is the best task loss among the evaluations within the guard
    best = min(within, key=lambda e: e["val_loss"])
    assert result["tuned_task_loss"] == pytest.approx(best["val_loss"])
    assert result["tuned_general_loss"] == pytest.approx(best["general_loss"])
    assert result["within_guard"] is True and f"step_{best['step']}" == result["checkpoint"]
    assert info["finetune"]["adapter"] == str(run / "adapter") and info["finetune"]["base"] == str(base.resolve())
    # the adapter written at the end is that checkpoint's
    kept, _, _ = checkpoint.load(run / result["checkpoint"], with_optimizer=False)
    model = load_hf(base)
    load_adapter(model, run / "adapter")
    trained = {name: p for name, p in model.named_parameters() if name.endswith(("lora_A", "lora_B"))}
    assert trained.keys() == kept.keys()
    for key, value in kept.items():
        assert torch.equal(trained[key], value), key
    assert "task loss" in out and "general perplexity" in out and "within the guard" in out
    last = evals[-1]
    if last["val_loss"] < result["tuned_task_loss"] and last["general_loss"] > guard["base_general_loss"] + \
            math.log1p(0.05):  # what the guard gave up is said
        assert f"the last evaluation reached task loss {last['val_loss']:.3f}" in out
    # eval --compare measures the same two models the same way (the run's general text and limit by default)
    assert train.main(["eval", str(run), "--compare", str(base), "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    compared = json.loads(capsys.readouterr().out)
    for key in ("base_task_loss", "tuned_task_loss", "base_general_loss", "tuned_general_loss"):
        assert compared[key] == pytest.approx(result[key], rel=1e-4), key
    assert compared["general_data"] == str(tmp_path / "general.jsonl") and compared["within_guard"] is True


def test_eval_compare_measures_in_the_precision_the_fine_tune_recorded(tmp_path, base_and_data, capsys,
                                                                       monkeypatch):
    """A fine-tune that auto ran in bf16 on this CPU is compared in bf16 again, whatever auto
    would choose now (here fp32): the figures are the ones its guard measured."""
    import trainer

    base, data = base_and_data
    monkeypatch.setenv(trainer.CPU_DTYPE_VARIABLE, "bfloat16")
    assert train.main(finetune_args(tmp_path, base, data, "--epochs", "2", "trainer.learning_rate=1e-2")) == 0
    run = tmp_path / "runs" / "ft"
    result = json.loads((run / "run.json").read_text())["finetune"]["result"]
    assert checkpoint.read_state(run / result["checkpoint"])["dtype"] == "bfloat16"
    monkeypatch.setenv(trainer.CPU_DTYPE_VARIABLE, "float32")
    trainer.remember_cpu_precision(None)
    capsys.readouterr()
    assert train.main(["eval", str(run), "--compare", str(base), "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    compared = json.loads(capsys.readouterr().out)
    for key in ("base_task_loss", "tuned_task_loss", "base_general_loss", "tuned_general_loss"):
        assert compared[key] == pytest.approx(result[key], rel=1e-5), key


def test_when_no_checkpoint_meets_the_guard_it_says_so(tmp_path, base_and_data, capsys, monkeypatch):
    from trainer import Guard

    monkeypatch.setattr(Guard, "limit", property(lambda self: -1.0))  # no general-text loss is this low
    base, data = base_and_data
    assert train.main(finetune_args(tmp_path, base, data, "--epochs", "4")) == 0
    out = capsys.readouterr().out
    assert "no checkpoint met the guard" in out and "NOT within the guard" in out
    info = json.loads((tmp_path / "runs" / "ft" / "run.json").read_text())
    assert info["finetune"]["result"]["within_guard"] is False
    events = [json.loads(line) for line in (tmp_path / "runs" / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert not any(e["improved"] for e in events if e["type"] == "eval")
    assert any(e["type"] == "early_stop" for e in events)  # nothing improves: it stops after the patience


def test_a_budget_plans_from_measurements_and_runs_on_the_clock(tmp_path, base_and_data, capsys):
    base, data = base_and_data
    assert train.main(finetune_args(tmp_path, base, data, "--budget", "10m", "trainer.max_steps=6", "--qlora")) == 0
    out = capsys.readouterr().out
    assert "plan for 600 s: micro-batch" in out and "s per step (measured)" in out
    info = json.loads((tmp_path / "runs" / "ft" / "run.json").read_text())
    trainer = info["trainer"]
    assert trainer["schedule_by"] == "time" and 0 < trainer["time_limit_s"] < 600 and trainer["num_epochs"] == 0
    assert trainer["eval_interval"] >= 1
    # the parameter count includes the NF4 weights (all of the base), and says the base is quantized
    total = int(re.search(r"trainable of ([\d,]+) parameters", out).group(1).replace(",", ""))
    assert total > ModelConfig(**info["model"]).num_params()
    line = next(line for line in out.splitlines() if line.startswith("training:"))
    assert f"{total / 1e6:.2f}M parameters" in line and "base in NF4" in line


def test_a_budget_too_short_is_refused_before_a_run_directory_exists(tmp_path, base_and_data, capsys):
    base, data = base_and_data
    assert train.main(finetune_args(tmp_path, base, data, "--budget", "1s")) == 2
    assert "too short" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "ft").exists()


def test_the_sample_answers_a_held_out_instruction(tmp_path, base_and_data, capsys):
    base, data = base_and_data
    assert train.main(finetune_args(tmp_path, base, data, "trainer.max_steps=2")) == 0
    out = capsys.readouterr().out
    instructions = {r["instruction"] for r in RECORDS}
    line = next(line for line in out.splitlines() if line.startswith("held-out instruction: "))
    assert line.removeprefix("held-out instruction: ") in instructions
    answer = out.split("\nanswer: ", 1)[1]
    assert "<|im_start|>" not in answer and "\nassistant\n" not in answer and "sample:" not in out


def test_the_sequence_length_comes_from_the_data_and_cuts_are_reported(tmp_path, base_and_data, capsys):
    base, data = base_and_data
    records = RECORDS + [{"instruction": "Write a long answer", "output": " ".join(["fish"] * 200)}]
    data.write_text("\n".join(json.dumps(r) for r in records))
    assert train.main(finetune_args(tmp_path, base, data, "trainer.max_steps=1")) == 0
    out = capsys.readouterr().out
    # the long record is longer than the base's context of 64: cut there, and said so
    assert "sequence length 64" in out and "1 longer than 65" in out and "are cut" in out
    info = json.loads((tmp_path / "runs" / "ft" / "run.json").read_text())
    assert info["trainer"]["max_seq_len"] == 64


def test_bad_instruction_data_is_counted_or_refused(tmp_path, base_and_data, capsys):
    base, data = base_and_data
    records = RECORDS + [{"instruction": "Say nothing", "output": ""}, {"instruction": "Again", "output": "  "}]
    data.write_text("\n".join(json.dumps(r) for r in records))
    assert train.main(finetune_args(tmp_path, base, data, "trainer.max_steps=1")) == 0
    assert "skipped 2 record(s) with an empty response" in capsys.readouterr().out
    # a base whose vocabulary is smaller than its tokenizer: refused, no run directory
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = 100
    small = tmp_path / "small"
    small.mkdir()
    for file in base.iterdir():
        (small / file.name).write_bytes(file.read_bytes())
    save_hf(Transformer(ModelConfig.from_name("tiny", vocab_size=100, context_len=64)), small,
            load_hf_tokenizer(base))
    args = finetune_args(tmp_path, small, data, "trainer.max_steps=1")
    args[args.index("ft")] = "small-ft"
    assert train.main(args) == 2
    assert "do not belong together" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "small-ft").exists()


def load_hf_tokenizer(path):
    from data import load_pretrained_tokenizer

    return load_pretrained_tokenizer(str(path))


def test_a_tokenizer_without_a_chat_template_gets_one_that_ends_answers_with_its_end_token(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data import ALPACA_TEMPLATE, encode_chat, load_pretrained_tokenizer, template_note, to_messages

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([json.dumps(r) for r in RECORDS] * 3,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(str(tmp_path / "plain"))
    tokenizer = load_pretrained_tokenizer(str(tmp_path / "plain"))  # no template, no ChatML tokens
    assert tokenizer.chat_template == ALPACA_TEMPLATE and "Alpaca layout" in template_note(tokenizer)
    ids, labels = encode_chat(to_messages(RECORDS[0]), tokenizer)
    answer = [i for i, label in zip(ids, labels) if label != -100]
    assert answer[-1] == tokenizer.eos_token_id  # generation learns to stop where runs.answer_stop stops it
    assert runs.answer_stop(tokenizer) == tokenizer.eos_token_id
    assert "### Response:" in tokenizer.decode(ids) and RECORDS[0]["output"] in tokenizer.decode(answer)


def test_a_guarded_finetune_resumes_with_its_guard(tmp_path, base_and_data):
    base, data = base_and_data
    assert train.main(finetune_args(tmp_path, base, data, "trainer.max_steps=2", "trainer.eval_interval=1")) == 0
    run = tmp_path / "runs" / "ft"
    assert train.main(["resume", str(run), "trainer.max_steps=4"]) == 0
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [1, 2, 3, 4] and all(e["general_loss"] is not None for e in evals)
    assert json.loads((run / "run.json").read_text())["finetune"]["result"]["checkpoint"]


def test_finetune_a_gguf_base_then_export_the_merged_model_as_gguf(tmp_path, base_and_data):
    """A .gguf file is a base like any other: the fine-tune rebuilds it to load its adapter
    checkpoints, and the GGUF export of the run carries the adapter merged in."""
    from gguf_io import load_gguf

    base, data = base_and_data
    assert train.main(["export", str(base), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "g")]) == 0
    gguf_base = tmp_path / "g" / "model-f32.gguf"
    assert train.main(["finetune", str(gguf_base), "--data", str(data), "--rank", "2", "--batch-size", "4",
                       "--seq-len", "48", "trainer.max_steps=3", "trainer.learning_rate=1e-2", "--merge",
                       "--out", str(tmp_path / "runs"), "--name", "ft", "--cache-dir", str(tmp_path / "cache"),
                       *general(tmp_path)]) == 0
    run = tmp_path / "runs" / "ft"
    assert json.loads((run / "run.json").read_text())["finetune"]["base"] == str(gguf_base.resolve())
    assert train.main(["export", str(run), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "ft")]) == 0
    exported, _ = load_gguf(tmp_path / "ft" / "model-f32.gguf")
    merged = load_file(str(run / "merged" / "model.safetensors"))
    original = load_hf(base).state_dict()
    changed = 0
    for name, tensor in exported.state_dict().items():
        key = "lm_head.weight" if name == "lm_head.weight" else "model." + name
        if key in merged:
            assert (merged[key] == tensor).all(), name
            changed += not (original[name] == tensor).all()
    assert changed > 0  # the adapter moved some weights


def test_replayed_general_text_is_trained_on_and_rebuilt_on_resume(tmp_path, base_and_data, monkeypatch, capsys):
    base, data = base_and_data
    seen = []

    class Recording(runs.Trainer):
        def __init__(self, model, config, train_data, *args, **kwargs):
            seen.append(train_data)
            super().__init__(model, config, train_data, *args, **kwargs)

    monkeypatch.setattr(runs, "Trainer", Recording)
    assert train.main(finetune_args(tmp_path, base, data, "--replay", "2", "--seq-len", "24",
                                    "trainer.max_steps=2")) == 0
    run = tmp_path / "runs" / "ft"
    replay = json.loads((run / "run.json").read_text())["finetune"]["replay"]
    first = seen[0]
    assert replay["general_data"] == str(tmp_path / "general.jsonl") and replay["ratio"] == 2
    # enough general blocks an epoch for 2 general target tokens per task target token, every token a target
    task_tokens = (first.task.targets != -100).sum()
    assert len(first) == replay["task_samples"] + replay["per_epoch"] == len(first.task) + replay["per_epoch"]
    assert replay["per_epoch"] == math.ceil(2 * task_tokens / 24) and len(first.pool) == replay["pool"]
    general = np.arange(len(first.task), len(first))
    assert (first.rows(general, epoch=3)[1] != -100).all()
    assert train.main(["resume", str(run), "trainer.max_steps=4"]) == 0
    for epoch in range(3):  # the resumed run reads the same rows
        everything = np.arange(len(first))
        for mine, theirs in zip(seen[1].rows(everything, epoch), first.rows(everything, epoch)):
            assert np.array_equal(mine, theirs)
    # general text that shrank since the run began cannot give the same rows: refused, not resumed differently
    write_corpus(tmp_path / "general.jsonl", documents=4)
    assert train.main(["resume", str(run), "trainer.max_steps=6"]) == 2
    assert "cannot resume exactly" in capsys.readouterr().err
    write_corpus(tmp_path / "general.jsonl")
    # --replay 0: the task alone
    assert train.main(finetune_args(tmp_path, base, data, "--replay", "0", "--seq-len", "24", "trainer.max_steps=1",
                                    "--overwrite")) == 0
    assert len(seen[2]) == replay["task_samples"]
    assert json.loads((run / "run.json").read_text())["finetune"]["replay"] is None
