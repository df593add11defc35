"""Directories laid out as real Hugging Face releases are (Llama 3's several end ids and
generation defaults in bfloat16, Mistral, shards, the older pickled weights) and the
broken ones a user meets (an interrupted download, a missing shard, a quantized release),
built in the test with transformers at tiny sizes."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, \
    MistralForCausalLM

import train
from export import load_hf, merged_model, save_hf
from lora import LoRAConfig, apply_lora

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def decisive(model: torch.nn.Module) -> torch.nn.Module:
    """Weights larger than the initialisation, so greedy choices are not near-ties."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.15)
    return model.eval()


def llama3_release(path, dtype=torch.bfloat16) -> LlamaForCausalLM:
    """A Llama 3.1-style release: untied, GQA, scaled RoPE, BOS and two end ids, sampling
    defaults in generation_config.json, stored in bfloat16."""
    config = LlamaConfig(**SHAPE, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=98, eos_token_id=[99, 100])
    reference = decisive(LlamaForCausalLM(config)).to(dtype)
    reference.save_pretrained(path)
    GenerationConfig(bos_token_id=98, eos_token_id=[99, 100], do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(path)
    return reference


def test_export_of_an_imported_release_says_what_the_release_said(tmp_path):
    llama3_release(tmp_path / "release")
    model = load_hf(tmp_path / "release")
    save_hf(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["eos_token_id"] == [99, 100] and written["bos_token_id"] == 98
    assert written["rope_scaling"] == LLAMA3_SCALING and written["rope_theta"] == 500000.0
    assert written["torch_dtype"] == "bfloat16"
    original = load_file(str(tmp_path / "release" / "model.safetensors"))
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], original[name]) for name in original)  # bit for bit, still bfloat16
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [99, 100] and generation["temperature"] == 0.6
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert again.generation_config.eos_token_id == [99, 100]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "release", dtype=torch.float32).eval()
    x = torch.randint(0, 101, (1, 24))
    with torch.no_grad():
        assert torch.equal(again(x).logits, reference(x).logits)


def test_a_merged_fine_tune_of_a_release_keeps_its_ids_and_precision(tmp_path):
    llama3_release(tmp_path / "release")
    model = load_hf(tmp_path / "release")
    apply_lora(model, LoRAConfig(rank=4))
    save_hf(merged_model(model), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["eos_token_id"] == [99, 100] and written["torch_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "generation_config.json").exists()


@pytest.mark.parametrize("window", [None, 64])  # none, and one as long as the context
def test_a_mistral_directory_loads_with_transformers_logits_and_greedy_ids(tmp_path, window):
    reference = decisive(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=window, rope_theta=1e6)))
    reference.save_pretrained(tmp_path)
    reference.generation_config.eos_token_id = None  # every row generates all 12 tokens
    ours = load_hf(tmp_path).eval()
    x = torch.randint(1, 101, (2, 40))  # no 0: transformers would mask it as padding
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], reference(x).logits, atol=1e-4, rtol=0)
        expected = reference.generate(x[:, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(x[:, :6], 12, temperature=0), expected)


def test_a_mistral_sliding_window_shorter_than_the_context_is_refused(tmp_path):
    MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding_window=16"):
        load_hf(tmp_path)


def test_older_weight_files_load_as_transformers_runs_them(tmp_path):
    """Shards named by model.safetensors.index.json, one pytorch_model.bin, and
    pytorch_model.bin shards named by pytorch_model.bin.index.json."""
    reference = decisive(LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)))
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    state = {name: tensor.clone() for name, tensor in reference.state_dict().items() if name != "lm_head.weight"}
    reference.config.save_pretrained(tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    reference.config.save_pretrained(tmp_path / "bin_shards")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in halves.items():
        torch.save({key: state[key] for key in keys}, tmp_path / "bin_shards" / shard)
    weight_map = {key: shard for shard, keys in halves.items() for key in keys}
    (tmp_path / "bin_shards" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    x = torch.randint(0, 101, (1, 32))
    with torch.no_grad():
        expected = reference(x).logits
        for kind in ("sharded", "bin", "bin_shards"):
            torch.testing.assert_close(load_hf(tmp_path / kind).eval()(x)[0], expected, atol=1e-4, rtol=0)


def broken(tmp_path, name: str):
    """A small saved Llama directory, then broken the way `name` says."""
    path = tmp_path / name
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(path, **({"max_shard_size": "100KB"} if "shard" in name else {}))
    config = json.loads((path / "config.json").read_text())
    if name == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif name == "truncated_bin":
        (path / "model.safetensors").unlink()
        (path / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    elif name == "missing_shard":
        next(iter(sorted(path.glob("model-0000*.safetensors")))).unlink()
    elif name == "hostile_shard":
        index = json.loads((path / "model.safetensors.index.json").read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = "../../etc/passwd"
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif name == "no_hidden_size":
        del config["hidden_size"]
    elif name == "quantized":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    elif name == "not_an_object":
        config = [config]
    elif name == "qwen2":
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name, message", [
    ("truncated", "model.safetensors is not a complete safetensors file"),
    ("truncated_bin", "pytorch_model.bin is not a readable PyTorch weights file"),
    ("missing_shard", "is missing: model.safetensors.index.json names"),
    ("hostile_shard", "shards must be files in the same directory"),
    ("no_hidden_size", "lacks a positive whole number for hidden_size"),
    ("quantized", "quantization_config .quant_method 'gptq'"),
    ("not_an_object", "holds a list"),
    ("qwen2", "model_type 'qwen2' is not supported"),
])
def test_a_broken_directory_is_one_clear_line_and_exit_code_2(tmp_path, capsys, name, message):
    path = broken(tmp_path, name)
    capsys.readouterr()
    assert train.main(["generate", str(path), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_release_too_large_for_this_machine_is_refused_before_its_weights_are_read(tmp_path, capsys, monkeypatch):
    """Llama 3.1 8B's config.json (8.0B parameters, 32 GB in float32) on a machine with 16 GiB free."""
    import budget

    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": 16 * 2**30)
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    assert train.main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: this model needs ~") and "GiB to load" in err and len(err.splitlines()) == 1, err


def test_generate_reads_an_imported_prompt_as_its_model_was_trained_with_bos(tmp_path, capsys):
    """A Llama release's tokenizer adds BOS to a prompt, as the model was trained; `generate`
    must too (Sprat's own runs train without it), giving transformers' greedy continuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", *[f"w{i}" for i in range(60)]]
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(**dict(SHAPE, vocab_size=len(words)), bos_token_id=0, eos_token_id=1)
    reference = decisive(LlamaForCausalLM(config))
    reference.save_pretrained(tmp_path / "release")
    tokenizer.save_pretrained(tmp_path / "release")
    prompt = "w5 w17 w3"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, 0] == 0  # the release's habit: BOS first
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=1)
    expected = tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)
    without_bos = reference.generate(ids[:, 1:], max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=1)
    assert tokenizer.decode(without_bos[0, ids.size(1) - 1:], skip_special_tokens=True) != expected  # BOS matters here
    capsys.readouterr()
    assert train.main(["generate", str(tmp_path / "release"), "--prompt", prompt, "--max-new-tokens", "8",
                       "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + expected + "\n"


def test_a_release_stops_at_every_end_id_it_lists(tmp_path):
    """Llama 3 lists several end ids (config.json, generation_config.json) and its tokenizer
    names one; a reply ends at any of them."""
    import runs

    llama3_release(tmp_path / "release")
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    generation = json.loads((tmp_path / "release" / "generation_config.json").read_text())
    generation["eos_token_id"] = [99, 100, 97]
    (tmp_path / "release" / "generation_config.json").write_text(json.dumps(generation))
    assert config["eos_token_id"] == [99, 100]

    class Tokenizer:
        eos_token_id = 100

    model = load_hf(tmp_path / "release")
    assert runs.stop_tokens(runs.Loaded(model, Tokenizer(), tmp_path, "huggingface")) == (100, 99, 97)
    del model.hf_origin
    assert runs.stop_tokens(runs.Loaded(model, Tokenizer(), tmp_path, "huggingface")) == (100,)
