"""Parity with transformers.LlamaForCausalLM, both directions."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from export import load_hf, save_hf
from model import Transformer


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def hf_llama(tie: bool, num_kv_heads: int, rope_scaling=None) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=32,
                         rms_norm_eps=1e-6, rope_theta=5e5, tie_word_embeddings=tie, rope_scaling=rope_scaling)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_load_hf_matches_transformers(tmp_path, tie, num_kv_heads):
    reference = hf_llama(tie, num_kv_heads)
    reference.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.tie_embeddings == tie and ours.config.num_kv_heads == num_kv_heads
    assert ours.config.rope_theta == 5e5 and ours.config.rmsnorm_eps == 1e-6
    x = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], reference(x).logits, atol=1e-4, rtol=0)
    # the KV-cache generation matches transformers' greedy generate too
    with torch.no_grad():
        expected = reference.generate(x[:, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(x[:, :5], 10, temperature=0), expected)


@pytest.mark.parametrize("tie", [True, False])
def test_save_hf_loads_in_transformers(tmp_path, tiny, tie):
    config = dataclasses.replace(tiny, tie_embeddings=tie, context_len=32, rope_theta=1e5)
    ours = Transformer(config).eval()
    save_hf(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["num_key_value_heads"] == config.num_kv_heads
    assert written["tie_word_embeddings"] == tie
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reference, LlamaForCausalLM)
    x = torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reference(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    # and back again, losslessly
    again = load_hf(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.1/3.2 checkpoints scale RoPE frequencies; a short original context makes
    all three frequency bands (kept, interpolated, slowed) appear at head_dim 16."""
    reference = hf_llama(True, 2, rope_scaling=dict(LLAMA3_SCALING))
    reference.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.rope_scaling == LLAMA3_SCALING
    x = torch.randint(0, 96, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], reference(x).logits, atol=1e-4, rtol=0)
    save_hf(ours, tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, reference(x).logits, atol=1e-4, rtol=0)


def test_load_hf_rejects_what_it_cannot_import(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    reference = hf_llama(True, 2)
    reference.save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    for change, message in [({"model_type": "gpt2"}, "gpt2"), ({"attention_bias": True}, "attention_bias"),
                            ({"hidden_act": "gelu"}, "gelu"),
                            ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn")]:
        (tmp_path / "config.json").write_text(json.dumps({**values, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**values, "intermediate_size": 100}))
    with pytest.raises(ValueError, match="shape"):
        load_hf(tmp_path)


def moe_config(tiny, **overrides):
    return dataclasses.replace(tiny, use_moe=True, moe_num_experts=4, moe_active_experts=2, context_len=32,
                               tie_embeddings=False, **overrides)


def test_a_moe_model_exports_as_mixtral_with_the_same_logits(tmp_path, tiny):
    ours = Transformer(moe_config(tiny)).eval()
    for block in ours.layers:  # a decisive router, so no top-k near-ties for rounding to flip
        torch.nn.init.normal_(block.mlp.gate.weight, std=1.0)
    save_hf(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "mixtral" and written["num_local_experts"] == 4
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reference, MixtralForCausalLM)
    x = torch.randint(0, ours.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reference(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    again = load_hf(tmp_path)
    assert again.config == ours.config
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_hf_reads_a_mixtral_directory_saved_by_transformers(tmp_path):
    config = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=1e4)
    reference = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.mlp.gate.weight.normal_(std=1.0)
    reference.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.use_moe and ours.config.moe_num_experts == 4 and ours.config.moe_active_experts == 2
    x = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], reference(x).logits, atol=1e-4, rtol=0)


def test_routing_the_target_cannot_express_is_refused(tmp_path, tiny):
    ours = Transformer(moe_config(tiny, use_lossfreebalance=True))
    save_hf(ours, tmp_path / "zero")  # an all-zero bias routes as Mixtral does
    ours.layers[1].mlp.expert_bias[0] = 1e-3
    with pytest.raises(ValueError, match="layers.1.mlp.expert_bias.*Mixtral layout has no expert-selection bias"):
        save_hf(ours, tmp_path / "biased")
    assert not (tmp_path / "biased").exists()
    values = json.loads((tmp_path / "zero" / "config.json").read_text())
    (tmp_path / "zero" / "config.json").write_text(json.dumps({**values, "sliding_window": 8}))
    with pytest.raises(ValueError, match="sliding_window=8"):
        load_hf(tmp_path / "zero")
