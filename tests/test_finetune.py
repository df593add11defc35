"""The fine-tuning flow end to end: `train.py finetune` on a local base and local data."""

import json

import pytest
from safetensors.torch import load_file

import checkpoint
import train
from data import train_bpe
from export import load_hf, save_hf
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
    return tmp_path / "base", data


def losses(run, kind="step", key="loss"):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e[key] for e in events if e["type"] == kind]


@pytest.mark.parametrize("qlora", [False, True])
def test_finetune_lowers_the_response_loss_and_saves_an_adapter(tmp_path, base_and_data, qlora):
    base, data = base_and_data
    args = ["finetune", str(base), "--data", str(data), "--rank", "8", "--epochs", "30", "--batch-size", "4",
            "--seq-len", "48", "--out", str(tmp_path / "runs"), "--name", "ft", "--cache-dir", str(tmp_path / "cache"),
            "trainer.learning_rate=1e-2", "trainer.min_lr=1e-3", "data.val_fraction=0.2", "--merge"]
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
    common = ["--out", str(tmp_path / "runs"), "--name", "ft", "--cache-dir", str(tmp_path / "cache")]
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
                       "--name", "ft", "--cache-dir", cache]) == 0
    run = tmp_path / "runs" / "ft"
    capsys.readouterr()
    assert train.main(["generate", str(run), "--chat", "--prompt", "Repeat the word fish", "--max-new-tokens", "4",
                       "--temperature", "0"]) == 0
    assert train.main(["eval", str(run), "--json", "--cache-dir", cache]) == 0
    result = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the generated line
    assert result["loss"] == pytest.approx(losses(run, "eval", "val_loss")[-1], rel=1e-4)
    assert train.main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    merged = load_file(str(run / "merged" / "model.safetensors"))
    assert exported.keys() == merged.keys()
    for key in merged:
        assert (exported[key] == merged[key]).all(), key


def test_finetune_a_gguf_base_then_export_the_merged_model_as_gguf(tmp_path, base_and_data):
    """A .gguf file is a base like any other: the fine-tune rebuilds it to load its adapter
    checkpoints, and the GGUF export of the run carries the adapter merged in."""
    from gguf_io import load_gguf

    base, data = base_and_data
    assert train.main(["export", str(base), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "g")]) == 0
    gguf_base = tmp_path / "g" / "model-f32.gguf"
    assert train.main(["finetune", str(gguf_base), "--data", str(data), "--rank", "2", "--batch-size", "4",
                       "--seq-len", "48", "trainer.max_steps=3", "trainer.learning_rate=1e-2", "--merge",
                       "--out", str(tmp_path / "runs"), "--name", "ft", "--cache-dir", str(tmp_path / "cache")]) == 0
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
