import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from export import load_adapter, merge_and_save, save_adapter, save_hf
from lora import (Linear4bit, LoRAConfig, LoRALinear, apply_lora, dequantize_nf4, derive_nf4_levels, dynamic_map,
                  lora_layers, merge_lora, merged_state_dict, nf4_levels, parameter_report, quantize_nf4, unmerge_lora)
from model import Transformer


def randomize_b(model: torch.nn.Module) -> None:
    """LoRA starts as a no-op (B = 0); give it something to do."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.02)


# ---- config -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(rank=0), "rank"), (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(target_modules=()), "target_modules"), (dict(quant_backend="cuda"), "quant_backend"),
    (dict(blocksize=48), "blocksize"),
])
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        LoRAConfig(**overrides)


def test_backend_auto_is_native_without_cuda():
    from lora import resolve_backend

    assert resolve_backend("bitsandbytes") == "bitsandbytes"
    assert resolve_backend("auto") == ("bitsandbytes" if torch.cuda.is_available() else "native")


def test_config_json_round_trip(tmp_path):
    config = LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), quantize_base=True)
    config.to_json(tmp_path / "lora.json")
    assert LoRAConfig.from_json(tmp_path / "lora.json") == config
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0


# ---- LoRALinear --------------------------------------------------------------------------
def test_lora_equals_base_at_init_and_keeps_base_names(tiny):
    model = Transformer(tiny)
    x = torch.randint(0, tiny.vocab_size, (2, 8))
    before = model(x)[0]
    base_state = model.state_dict()
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    torch.testing.assert_close(model(x)[0], before)
    # a base checkpoint loads into the LoRA model with strict=True (LoRA weights aside)
    result = model.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == []
    assert all(key.endswith(("lora_A", "lora_B")) for key in result.missing_keys)


def test_only_lora_trains_and_the_base_is_untouched(tiny):
    model = Transformer(tiny)
    apply_lora(model, LoRAConfig(rank=4))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, tiny.vocab_size, (2, 16))
    for _ in range(3):
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
            assert param.grad is None
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())


def test_merge_is_idempotent_and_equals_w_plus_scaled_ba(tiny):
    linear = torch.nn.Linear(32, 48, bias=True)
    layer = LoRALinear(linear, rank=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32)
    unmerged = layer(x)
    original = layer.weight.detach().clone()
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(layer.weight, original + 2.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, atol=1e-6, rtol=0)
    model = Transformer(tiny)
    apply_lora(model, LoRAConfig(rank=4))
    randomize_b(model)
    model.eval()
    ids = torch.randint(0, tiny.vocab_size, (2, 8))
    before = model(ids)[0]
    merge_lora(model)
    torch.testing.assert_close(model(ids)[0], before, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids)[0], before, atol=1e-5, rtol=0)


def test_unmatched_target_is_an_error_naming_the_choices(tiny):
    with pytest.raises(ValueError, match=r"'wq'.*q_proj") as error:
        apply_lora(Transformer(tiny), LoRAConfig(target_modules=("q_proj", "wq")))
    assert "lm_head" not in str(error.value)


def test_targets_patterns_and_moe_experts(tiny):
    model = Transformer(dataclasses.replace(tiny, use_moe=True, moe_num_experts=4, moe_active_experts=2))
    adapted = apply_lora(model, LoRAConfig(rank=2, target_modules=("*_proj",)))
    assert "layers.0.mlp.experts.3.down_proj" in adapted
    assert not any(name.endswith("mlp.gate") for name in adapted)  # the router stays as it is
    report = parameter_report(model)
    assert 0 < report["share"] < 1


def test_trainable_count_is_rank_times_in_plus_out_of_each_adapted_linear():
    from model import ModelConfig

    config = ModelConfig.from_name("125M")
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    adapted = apply_lora(model, LoRAConfig(rank=16))
    assert len(adapted) == 7 * config.num_layers
    kv = config.num_kv_heads * config.head_dim
    d, f = config.num_dims, config.ffn_hidden_dims
    per_layer = 16 * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
    report = parameter_report(model)
    assert report["trainable"] == per_layer * config.num_layers
    assert report["total"] == total + report["trainable"]
    assert 0.02 < report["share"] < 0.03  # 2.4% at this shape: small models carry a larger share


# ---- NF4 --------------------------------------------------------------------------------------
def test_nf4_levels_are_the_normal_quantiles():
    torch.testing.assert_close(derive_nf4_levels(), nf4_levels(), atol=1e-6, rtol=0)
    levels = nf4_levels()
    assert levels[0] == -1 and levels[-1] == 1 and levels[7] == 0 and torch.all(levels[1:] > levels[:-1])


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_is_bounded(double_quant):
    weight = torch.randn(256, 128) * 0.02
    packed, state = quantize_nf4(weight, 64, double_quant)
    assert packed.dtype == torch.uint8 and packed.numel() == weight.numel() // 2
    restored = dequantize_nf4(packed, state)
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    blocks = weight.view(-1, 64)
    gaps = (nf4_levels()[1:] - nf4_levels()[:-1]).max() / 2  # the widest half-gap between levels
    bound = (blocks.abs().amax(1, keepdim=True) * gaps * 1.01).expand(-1, 64).reshape(weight.shape)
    assert torch.all((restored - weight).abs() <= bound + (1e-4 if double_quant else 0))
    relative = (restored - weight).norm() / weight.norm()
    assert relative < 0.12  # ~0.09 for normal weights at 4 bits


def test_nf4_matches_bitsandbytes_without_double_quant():
    functional = pytest.importorskip("bitsandbytes.functional")
    for shape in [(64, 128), (96, 256), (300, 64)]:
        weight = torch.randn(shape) * 0.02
        packed, state = quantize_nf4(weight, 64, double_quant=False)
        reference, reference_state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=False,
                                                              quant_type="nf4")
        assert torch.equal(packed, reference.flatten())
        assert torch.equal(state.absmax, reference_state.absmax)
        assert torch.equal(dequantize_nf4(packed, state), functional.dequantize_4bit(reference, reference_state))


def test_nf4_matches_bitsandbytes_with_double_quant():
    """The 4-bit codes, the absmax offset and the per-256 scales are identical. The 8-bit
    absmax codes are identical except where bitsandbytes' CPU kernel does not pick the
    nearest code (its bucketing is approximate for the tiny values of the dynamic map);
    there ours is the nearer one; every weight outside those blocks dequantizes identically."""
    functional = pytest.importorskip("bitsandbytes.functional")
    code = dynamic_map()
    assert torch.equal(code, functional.create_dynamic_map())
    for shape in [(64, 128), (96, 256), (300, 64), (512, 512)]:
        weight = torch.randn(shape) * 0.02
        packed, state = quantize_nf4(weight, 64, double_quant=True)
        reference, reference_state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                              quant_type="nf4")
        assert torch.equal(packed, reference.flatten())
        assert torch.equal(state.absmax_offset, reference_state.offset)
        assert torch.equal(state.absmax_scale, reference_state.state2.absmax)
        ours, theirs = state.quant_absmax.long(), reference_state.absmax.long()
        differ = ours != theirs
        assert differ.float().mean() < 0.02
        target = (weight.view(-1, 64).abs().amax(1) - state.absmax_offset)
        target = target / state.absmax_scale.repeat_interleave(256)[:target.numel()]
        assert torch.all((code[ours] - target).abs() <= (code[theirs] - target).abs() + 1e-9)
        restored = dequantize_nf4(packed, state)
        reference_restored = functional.dequantize_4bit(reference, reference_state)
        assert torch.equal(restored[~differ.repeat_interleave(64).view(shape)],
                           reference_restored[~differ.repeat_interleave(64).view(shape)])



def test_linear4bit_forward_save_load(tmp_path):
    linear = torch.nn.Linear(128, 64, bias=True)
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(3, 128)
    expected = torch.nn.functional.linear(x, dequantize_nf4(*quantize_nf4(linear.weight)), linear.bias)
    torch.testing.assert_close(layer(x), expected)
    assert not any(p.requires_grad for p in layer.parameters())
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    fresh = Linear4bit(128, 64, bias=True)
    fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)


def test_linear4bit_bitsandbytes_backend_matches_native():
    pytest.importorskip("bitsandbytes")
    linear = torch.nn.Linear(128, 64)
    native = Linear4bit.from_linear(linear, backend="native")
    fast = Linear4bit.from_linear(linear, backend="bitsandbytes")
    x = torch.randn(4, 128)
    torch.testing.assert_close(fast(x), native(x), atol=1e-5, rtol=1e-4)


# ---- QLoRA, adapters and peft ----------------------------------------------------------------
def test_qlora_model_is_close_to_the_base_and_trains_only_adapters(tiny):
    config = dataclasses.replace(tiny, num_dims=64, num_heads=4, num_kv_heads=2, ffn_hidden_dims=128)
    model = Transformer(config).eval()
    x = torch.randint(0, config.vocab_size, (2, 16))
    before = model(x)[0]
    apply_lora(model, LoRAConfig(rank=4, quantize_base=True))
    assert isinstance(model.layers[0].self_attn.q_proj.base4bit, Linear4bit)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.embed_tokens.weight
    after = model(x)[0]
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    model.train()
    model(x, x)[1].backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(name.endswith(("lora_A", "lora_B")) for name in grads)


def test_adapter_save_load_gives_identical_outputs(tmp_path, tiny):
    model = Transformer(tiny).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj"))
    apply_lora(model, config)
    randomize_b(model)
    x = torch.randint(0, tiny.vocab_size, (2, 8))
    expected = model(x)[0]
    save_adapter(model, tmp_path / "adapter", config)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert len(saved) == 2 * 3 * tiny.num_layers  # adapter weights only
    fresh = Transformer(tiny).eval()
    fresh.load_state_dict(base_state)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded.target_modules == config.target_modules
    torch.testing.assert_close(fresh(x)[0], expected, atol=0, rtol=0)


def test_adapter_on_a_different_shape_is_an_error(tmp_path, tiny):
    model = Transformer(tiny)
    config = LoRAConfig(rank=4)
    apply_lora(model, config)
    save_adapter(model, tmp_path / "adapter", config)
    other = Transformer(dataclasses.replace(tiny, num_dims=64, ffn_hidden_dims=128))
    with pytest.raises(ValueError, match=r"mismatch at layers\.0\.\S+\.lora_A: the adapter has \(4, (32|64)\), "
                                         r"the model expects \(4, (64|128)\)"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(Transformer(tiny), tmp_path)


def test_peft_applies_our_adapter_to_the_exported_model(tmp_path, tiny):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = Transformer(tiny).eval()
    save_hf(model, tmp_path / "base")
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0)
    apply_lora(model, config)
    randomize_b(model)
    save_adapter(model, tmp_path / "adapter", config, base_model=str(tmp_path / "base"))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reference = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    x = torch.randint(0, tiny.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=x).logits, model(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantize_base", [False, True])
def test_merge_and_save_folds_the_adapters(tmp_path, tiny, quantize_base):
    from export import load_hf

    config = dataclasses.replace(tiny, num_dims=64, ffn_hidden_dims=128, context_len=16)
    model = Transformer(config).eval()
    apply_lora(model, LoRAConfig(rank=4, quantize_base=quantize_base))
    randomize_b(model)
    x = torch.randint(0, config.vocab_size, (2, 16))
    expected = model(x)[0]
    merge_and_save(model, tmp_path / "merged")
    merged = load_hf(tmp_path / "merged").eval()
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(x)[0], expected, atol=1e-5, rtol=0)
    assert set(merged_state_dict(model)) == set(Transformer(config).state_dict())


def test_linear4bit_backward_recomputes_the_weight():
    """Gradients through the NF4 layer equal those through the dequantized weight, and the
    fp32 weight is not among the tensors autograd keeps for backward."""
    linear = torch.nn.Linear(128, 64)
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.square().sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    weight = layer.dequantized_weight()
    torch.nn.functional.linear(reference_x, weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)
    assert not any(t.shape == (64, 128) and t.dtype == torch.float32 for t in saved)


def test_adapter_with_another_scale_is_an_error(tmp_path, tiny):
    model = Transformer(tiny)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    save_adapter(model, tmp_path / "adapter", LoRAConfig(rank=4, alpha=8))
    other = Transformer(tiny)
    apply_lora(other, LoRAConfig(rank=4, alpha=16))
    with pytest.raises(ValueError, match="scales its update by 2"):
        load_adapter(other, tmp_path / "adapter")
