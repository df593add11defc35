import contextlib
import dataclasses
import json

import pytest
import torch

import model as model_module
from model import (FeedForward, MoE, ModelConfig, RMSNorm, Transformer, apply_rope, linear_cross_entropy, rope_cache,
                   sample, shared_input_linears)


def tokens(config: ModelConfig, batch: int = 2, length: int | None = None) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length or config.context_len))


# ---- config -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(num_dims=30), "num_dims"),             # not divisible by 4 heads
    (dict(num_kv_heads=3), "num_kv_heads"),      # does not divide 4 heads
    (dict(num_dims=12, num_heads=4, num_kv_heads=1), "num_dims"),  # head dim 3 is odd
    (dict(moe_active_experts=5, moe_num_experts=4), "moe_active_experts"),
    (dict(moe_active_experts=0), "moe_active_experts"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(context_len=2.5), "context_len"),
    (dict(rmsnorm_eps=0.0), "rmsnorm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(moe_aux_loss_coef=-0.1), "moe_aux_loss_coef"),
])
def test_config_validation_names_field_and_value(overrides, field):
    with pytest.raises(ValueError, match=field) as error:
        ModelConfig.from_name("tiny", **overrides)
    assert str(overrides[field]) in str(error.value)


def test_config_unknown_preset_and_field():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.from_name("nope")
    with pytest.raises(ValueError, match="not_a_field"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "not_a_field": 1})


def test_config_json_round_trip(tmp_path, tiny):
    config = dataclasses.replace(tiny, use_moe=True, rope_theta=5e5, tie_embeddings=False)
    config.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 5e5


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False), dict(use_moe=True),
                                       dict(use_moe=True, moe_num_experts=8, moe_active_experts=2)])
def test_num_params_matches_the_module(tiny, overrides):
    config = dataclasses.replace(tiny, **overrides)
    model = Transformer(config)
    assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_active_params_and_flops(tiny):
    moe = dataclasses.replace(tiny, use_moe=True, moe_num_experts=4, moe_active_experts=1)
    expert = 3 * moe.num_dims * moe.ffn_hidden_dims
    assert moe.num_params() - moe.num_params(active=True) == 3 * expert * moe.num_layers
    dense = tiny
    # 6N with N = every matmul weight (the tied head counts once, as the head)
    assert dense.flops_per_token(seq_len=0) == 6 * dense.num_params() - 6 * (2 * dense.num_layers + 1) * dense.num_dims
    assert dense.flops_per_token(seq_len=8) > dense.flops_per_token(seq_len=4)


# ---- forward ------------------------------------------------------------------------
def test_shapes_and_loss(tiny):
    model = Transformer(tiny)
    x = tokens(tiny)
    logits, loss, ce_loss = model(x)
    assert logits.shape == (2, tiny.context_len, tiny.vocab_size)
    assert loss is None and ce_loss is None
    logits, loss, ce_loss = model(x, tokens(tiny))
    assert logits is None  # with targets the loss never materialises the logits
    assert loss.shape == () and torch.equal(loss, ce_loss)
    # an untrained model predicts roughly uniformly: loss near ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(float(tiny.vocab_size))).item()) < 0.5


def test_ignore_index_excludes_positions(tiny):
    model = Transformer(tiny)
    x, y = tokens(tiny), tokens(tiny)
    masked = y.clone()
    masked[:, : tiny.context_len // 2] = -100
    _, _, ce_half = model(x, masked)
    logits, _, _ = model(x)
    expected = torch.nn.functional.cross_entropy(
        logits[:, tiny.context_len // 2:].reshape(-1, tiny.vocab_size), y[:, tiny.context_len // 2:].reshape(-1))
    torch.testing.assert_close(ce_half, expected)


@pytest.mark.parametrize("chunk_elements", [1 << 23, 3 * 64, 64])  # one chunk; 3 rows a chunk; 1 row a chunk
def test_linear_cross_entropy_equals_cross_entropy_on_full_logits(chunk_elements):
    hidden = torch.randn(10, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 64, (10,))
    targets[[0, 4, 9]] = -100
    ours = linear_cross_entropy(hidden, weight, targets, chunk_elements)
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight), targets, ignore_index=-100)
    torch.testing.assert_close(ours, reference)
    upstream = torch.tensor(2.5)  # a loss scale: backward must multiply by it
    got = torch.autograd.grad(ours, (hidden, weight), upstream, retain_graph=True)
    for got_one, expected in zip(got, torch.autograd.grad(reference, (hidden, weight), upstream)):
        torch.testing.assert_close(got_one, expected)
    assert torch.equal(got[0][[0, 4, 9]], torch.zeros(3, 32))  # ignored positions get no gradient
    with pytest.raises(RuntimeError, match="backward ran twice"):  # the stored gradients were scaled in place
        torch.autograd.grad(ours, hidden)


def test_linear_cross_entropy_frozen_weight_and_nothing_to_predict():
    hidden = torch.randn(6, 32, requires_grad=True)
    weight = torch.randn(64, 32)  # frozen (a LoRA model's tied head): only hidden gets a gradient
    targets = torch.randint(0, 64, (6,))
    ours = linear_cross_entropy(hidden, weight, targets, 64)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    torch.testing.assert_close(torch.autograd.grad(ours, hidden)[0], torch.autograd.grad(reference, hidden)[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 64), reference.detach())
    assert linear_cross_entropy(hidden, weight, torch.full((6,), -100)).isnan()  # as F.cross_entropy


def test_model_loss_equals_cross_entropy_of_its_logits(tiny):
    model = Transformer(tiny)
    x, y = tokens(tiny), tokens(tiny)
    y[0, :5] = -100
    _, loss, _ = model(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits, _, _ = model(x)
    reference = torch.nn.functional.cross_entropy(logits.view(-1, tiny.vocab_size), y.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, reference)
    for got, expected in zip(grads, torch.autograd.grad(reference, list(model.parameters()))):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def _grads(output, inputs, upstream):
    return torch.autograd.grad(output, [t for t in inputs if t.requires_grad], upstream)


@pytest.mark.parametrize("trainable", ["both", "input", "weight"])
def test_rmsnorm_backward_equals_autograd_of_the_formula(trainable):
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    norm.weight.requires_grad_(trainable != "input")
    x = (torch.randn(3, 5, 16) * 3).requires_grad_(trainable != "weight")
    ours = norm(x)  # fp32 CPU training: the hand-written backward
    assert type(ours.grad_fn).__name__ == "_RMSNormBackward"
    x64, w64 = x.double(), norm.weight.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64  # Llama's formula, float64
    torch.testing.assert_close(ours, expected.float())
    upstream = torch.randn_like(ours)
    for got, want in zip(_grads(ours, (x, norm.weight), upstream), _grads(expected, (x64, w64), upstream.double())):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("frozen", [(), (1,), (0, 1, 2)])
def test_shared_input_linears_equal_separate_linears(frozen):
    linears = tuple(torch.nn.Linear(12, out, bias=False) for out in (12, 4, 4))
    for index in frozen:
        linears[index].weight.requires_grad_(False)
    x = torch.randn(2, 3, 12, requires_grad=True)
    ours = shared_input_linears(x, linears)
    assert type(ours[0].grad_fn).__name__ == "_SharedInputLinearsBackward"
    expected = [torch.nn.functional.linear(x, m.weight) for m in linears]
    upstream = [torch.randn_like(o) for o in ours]
    inputs = (x, *(m.weight for m in linears))
    # k (the second output) unused: its gradient is None, and the others must still be right
    got = torch.autograd.grad([ours[0], ours[2]], [t for t in inputs if t.requires_grad], [upstream[0], upstream[2]])
    want = torch.autograd.grad([expected[0], expected[2]], [t for t in inputs if t.requires_grad],
                               [upstream[0], upstream[2]], allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("frozen", [False, True])  # True: a LoRA base, only the input needs its gradient
def test_swiglu_backward_equals_autograd_of_the_formula(frozen):
    ffn = FeedForward(12, 20)
    ffn.requires_grad_(not frozen)
    x = torch.randn(2, 3, 12, requires_grad=True)
    ours = ffn(x)
    assert type(ours.grad_fn).__name__ == "_SwiGLUBackward"
    F = torch.nn.functional
    expected = F.linear(F.silu(F.linear(x, ffn.gate_proj.weight)) * F.linear(x, ffn.up_proj.weight), ffn.down_proj.weight)
    torch.testing.assert_close(ours, expected)
    upstream = torch.randn_like(ours)
    inputs = (x, ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight)
    for got, want in zip(_grads(ours, inputs, upstream), _grads(expected, inputs, upstream)):
        torch.testing.assert_close(got, want)


def test_hand_written_backwards_stand_aside_where_they_do_not_apply():
    norm, ffn = RMSNorm(8, 1e-5), FeedForward(8, 16)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.no_grad():  # inference: plain ops
        assert norm(x).grad_fn is None and ffn(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: its casts, autograd's backward
        assert type(ffn(x).grad_fn).__name__ != "_SwiGLUBackward"
        assert type(norm(x).grad_fn).__name__ != "_RMSNormBackward"
    assert type(norm(x.double()).grad_fn).__name__ != "_RMSNormBackward"  # fp32 only


def test_cross_entropy_workspace_is_reused_and_grows():
    """The logits buffer is kept between calls (per thread): a bigger call grows it, a
    smaller one reuses a slice, and each result is the plain cross-entropy's."""
    weight = torch.randn(64, 8)
    for rows in (4, 9, 2):
        hidden, targets = torch.randn(rows, 8), torch.randint(0, 64, (rows,))
        expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_elements=64 * 3), expected)


def test_rope_equals_the_rotate_half_form_with_its_gradient():
    cos, sin = rope_cache(head_dim=8, max_len=5, theta=10000.0)
    x = torch.randn(2, 5, 3, 8).transpose(1, 2).requires_grad_()  # (B, nh, T, hs) as attention makes it
    x1, x2 = x.chunk(2, dim=-1)
    expected = x * cos + torch.cat((-x2, x1), dim=-1) * sin  # Hugging Face's apply_rotary_pos_emb
    ours = apply_rope(x, cos, sin)
    torch.testing.assert_close(ours, expected)
    upstream = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(ours, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0])


def test_bad_inputs_raise(tiny):
    model = Transformer(tiny)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 4), tiny.vocab_size))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="context_len"):
        model(tokens(tiny, 1, tiny.context_len + 1))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_sdpa_equals_explicit_attention(tiny, num_kv_heads):
    config = dataclasses.replace(tiny, num_kv_heads=num_kv_heads)
    model = Transformer(config).eval()
    x = tokens(config)
    fast, _, _ = model(x)
    model.set_runtime(use_flash=False)
    explicit, _, _ = model(x)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=0)


def test_attention_is_causal(tiny):
    model = Transformer(tiny).eval()
    x = tokens(tiny, 1)
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % tiny.vocab_size
    a, _, _ = model(x)
    b, _, _ = model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gqa_shares_kv_heads(tiny):
    """With one KV head, every query head attends over the same keys: k_proj has one head."""
    config = dataclasses.replace(tiny, num_kv_heads=1)
    model = Transformer(config)
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (config.head_dim, config.num_dims)
    assert attn.v_proj.weight.shape == (config.head_dim, config.num_dims)


def test_tied_weights_are_one_tensor(tiny):
    model = Transformer(tiny)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = Transformer(dataclasses.replace(tiny, tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_init_scales_residual_projections(tiny):
    config = dataclasses.replace(tiny, num_dims=256, num_heads=4, num_kv_heads=2, ffn_hidden_dims=512, num_layers=8)
    model = Transformer(config)
    residual = model.layers[0].self_attn.o_proj.weight.std().item()
    other = model.layers[0].self_attn.q_proj.weight.std().item()
    assert abs(other - 0.02) < 0.002
    assert abs(residual - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)


def test_gradient_checkpointing_gives_same_gradients(tiny):
    x, y = tokens(tiny), tokens(tiny)
    plain = Transformer(tiny)
    checkpointed = Transformer(tiny)
    checkpointed.set_runtime(gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    plain(x, y)[1].backward()
    checkpointed(x, y)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_tiny_model_overfits_one_batch(tiny):
    model = Transformer(tiny)
    x, y = tokens(tiny, 4), tokens(tiny, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = model(x, y)[1].item()
    for _ in range(300):
        _, loss, _ = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * start


# ---- KV cache and generation ----------------------------------------------------------
@pytest.mark.parametrize("use_flash", [True, False])
def test_kv_cache_reproduces_uncached_forward(tiny, use_flash):
    config = tiny
    model = Transformer(config).eval()
    model.set_runtime(use_flash=use_flash)
    x = tokens(config)
    full, _, _ = model(x)
    model.setup_kv_cache(batch_size=2)
    prefill, _, _ = model(x[:, :5])  # a prompt, then a 3-token chunk, then one token at a time
    chunk, _, _ = model(x[:, 5:8], start_pos=5)
    steps = [model(x[:, i:i + 1], start_pos=i)[0] for i in range(8, config.context_len)]
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    model.reset_kv_cache()
    assert all(block.self_attn.kv_cache is None for block in model.layers)


def test_generation_sizes_its_kv_cache_to_what_it_needs(tiny, monkeypatch):
    """A Llama 3 checkpoint's context is 131072 positions: a cache that long is 8.6 GB at
    1B parameters, for a 30-token reply. The cache holds the prompt and the new tokens;
    a longer run than the context is capped at it (the window then slides)."""
    model = Transformer(tiny)
    sizes = []
    real = Transformer.setup_kv_cache
    monkeypatch.setattr(Transformer, "setup_kv_cache",
                        lambda self, batch, max_len=None, **kw: (sizes.append((batch, max_len)), real(self, batch, max_len, **kw))[1])
    prompt = tokens(tiny, 2, 3)
    assert torch.equal(model.generate(prompt, 5, temperature=0), model.generate(prompt, 5, temperature=0, use_cache=False))
    model.generate(prompt, 40, temperature=0)  # past context_len=16
    assert sizes == [(2, 8), (2, tiny.context_len)]
    model.setup_kv_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit a KV cache of 4"):
        model(tokens(tiny, 1, 5))


def test_an_uninitialized_model_has_a_new_models_buffers_and_ties(tiny, moe_config):
    """`Transformer.uninitialized` (to load a checkpoint into) skips the random weights but
    must have every buffer of a new model and the tied head, so a loaded state dict gives the
    same model."""
    for config in (tiny, moe_config, dataclasses.replace(tiny, tie_embeddings=False),
                   dataclasses.replace(tiny, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8})):
        new, empty = Transformer(config), Transformer.uninitialized(config)
        assert dict(new.named_buffers()).keys() == dict(empty.named_buffers()).keys()
        for name, buffer in new.named_buffers():
            assert torch.equal(buffer, dict(empty.named_buffers())[name]), name
        assert (empty.lm_head.weight is empty.embed_tokens.weight) == config.tie_embeddings
        assert all(p.device.type == "cpu" for p in empty.parameters())
        empty.load_state_dict(new.state_dict())
        x = tokens(config)
        torch.testing.assert_close(empty(x, x)[1], new(x, x)[1], atol=0, rtol=0)


def test_kv_cache_buffers_are_not_saved(tiny):
    model = Transformer(tiny)
    keys = set(model.state_dict())
    model.setup_kv_cache(batch_size=1)
    assert set(model.state_dict()) == keys


def test_cached_generation_equals_uncached(tiny):
    model = Transformer(tiny)
    prompt = tokens(tiny, 2, 4)
    # 30 new tokens run past context_len=16: the window slides and both paths must agree
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 34)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :4], prompt)
    assert model.training  # generate restores the mode it found


@pytest.mark.parametrize("layout", ["as stored", "held", "per call"])
def test_greedy_generation_equals_argmax_of_the_plain_forward(tiny, layout, monkeypatch):
    """generate decodes with the weights as stored (a short generation), in their decoding
    layout (column-major, q/k/v and gate/up side by side) held by `decoding()`, or relaid
    for one call (a long generation); the tokens must be those of the plain forward's argmax."""
    model = Transformer(tiny).eval()
    prompt = tokens(tiny, 2, 4)
    expected = prompt
    with torch.no_grad():
        for _ in range(8):
            logits, _, _ = model(expected)
            expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    calls = []
    relayout = model._decoding_layout
    model._decoding_layout = lambda: calls.append(1) or relayout()
    if layout == "per call":
        monkeypatch.setattr(model_module, "LAYOUT_MIN_TOKENS", 8)
    with model.decoding() if layout == "held" else contextlib.nullcontext():
        assert torch.equal(model.generate(prompt, 8, temperature=0), expected)
        assert torch.equal(model.generate(prompt, 8, temperature=0), expected)
        if layout == "held":
            assert not model.layers[0].self_attn.q_proj.weight.is_contiguous()  # still relaid between calls
    assert len(calls) == {"as stored": 0, "held": 1, "per call": 2}[layout]
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query and plain multi-head attention
@pytest.mark.parametrize("relaid", [False, True])
def test_decode_step_equals_the_blocks_forward(tiny, kv_heads, relaid):
    """Generation's one-token step writes the blocks out without the modules; with the
    weights as stored and in the decoding layout, its logits and cache must be exactly
    the modules' (the same operations in the same order)."""
    config = dataclasses.replace(tiny, num_kv_heads=kv_heads)
    model = Transformer(config).eval()
    x = tokens(config, 2, 10)
    with torch.no_grad():
        layout = model._decoding_layout() if relaid else []
        weights = model._decode_step_weights()
        assert all((qkv is not None, gate_up is not None) == (relaid, relaid) for qkv, gate_up in weights)
        runs = []
        for step in (lambda i: model._decode_step(x[:, i:i + 1], i, weights),
                     lambda i: model.lm_head(model._hidden(x[:, i:i + 1], i)[0][:, -1])):
            model.setup_kv_cache(2)
            model._hidden(x[:, :6], 0)
            logits = torch.stack([step(i) for i in range(6, 10)])
            runs.append((logits, [(b.self_attn.kv_cache.k[:, :, :10].clone(), b.self_attn.kv_cache.v[:, :, :10].clone())
                                 for b in model.layers]))  # the positions written
        for weight in layout:
            weight.data = weight.data.contiguous()
    (fast, fast_cache), (modules, module_cache) = runs
    assert torch.equal(fast, modules)
    assert all(torch.equal(a, b) for pair, other in zip(fast_cache, module_cache) for a, b in zip(pair, other))


def test_decode_step_is_left_to_the_modules_where_it_does_not_apply(tiny, moe_config):
    from lora import LoRAConfig, apply_lora

    assert Transformer(moe_config)._decode_step_weights() is None
    explicit = Transformer(tiny)
    explicit.set_runtime(use_flash=False)
    assert explicit._decode_step_weights() is None
    adapted = Transformer(tiny)
    apply_lora(adapted, LoRAConfig(rank=2, target_modules=("o_proj",)))
    assert adapted._decode_step_weights() is None
    assert Transformer(tiny)._decode_step_weights() is not None


def test_decoding_layout_keeps_values_and_is_undone(tiny, monkeypatch):
    monkeypatch.setattr(model_module, "LAYOUT_MIN_TOKENS", 0)  # every generation relays
    model = Transformer(tiny).eval()
    x = tokens(tiny, 2, 5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        reference, _, _ = model(x)
        relaid = model._decoding_layout()
        attention = model.layers[0].self_attn
        relaid_ids = {id(w) for w in relaid}
        assert id(attention.q_proj.weight) in relaid_ids and not attention.q_proj.weight.is_contiguous()
        joined = shared_input_linears.__globals__["_side_by_side"]([attention.q_proj.weight, attention.k_proj.weight,
                                                                     attention.v_proj.weight])
        assert joined is not None and joined.shape == (tiny.num_dims + 2 * tiny.num_kv_heads * tiny.head_dim,
                                                       tiny.num_dims)
        assert id(model.layers[0].mlp.down_proj.weight) not in relaid_ids  # narrowing (out < in): left row-major
        torch.testing.assert_close(model(x)[0], reference, atol=1e-5, rtol=1e-5)
        for weight in relaid:
            weight.data = weight.data.contiguous()
    # after generation, also one abandoned part-way, every weight is back, contiguous and equal
    model.generate(x, 3, temperature=0)
    stream = model.generate_stream(x, 5, temperature=0)
    next(stream)
    stream.close()
    for name, param in model.named_parameters():
        assert param is params[name] and param.is_contiguous() and torch.equal(param, before[name])
    with torch.inference_mode():  # a caller's inference mode: the weights must still train afterwards
        model.generate(x, 2, temperature=0)
    assert not any(param.is_inference() for param in model.parameters())
    model.train()
    model(x, x)[1].backward()


def test_generate_stream_equals_generate(tiny):
    model = Transformer(tiny)
    prompt = tokens(tiny, 2, 3)
    generated = model.generate(prompt, 10, temperature=0.8, top_k=20, top_p=0.9,
                               generator=torch.Generator().manual_seed(1))
    streamed = list(model.generate_stream(prompt, 10, temperature=0.8, top_k=20, top_p=0.9,
                                          generator=torch.Generator().manual_seed(1)))
    assert torch.equal(generated[:, 3:], torch.stack(streamed, dim=1))


def test_generate_stops_at_eos(tiny):
    model = Transformer(tiny)
    prompt = tokens(tiny, 1, 3)
    greedy = model.generate(prompt, 12, temperature=0)
    eos = int(greedy[0, 5])  # the third generated token
    stopped = model.generate(prompt, 12, temperature=0, eos_token_id=eos)
    first = (stopped[0, 3:] == eos).nonzero()[0].item()
    assert stopped.size(1) == 3 + first + 1


def test_generate_stops_at_any_of_several_end_ids(tiny):
    model = Transformer(tiny)
    prompt = tokens(tiny, 2, 3)
    greedy = model.generate(prompt, 12, temperature=0)
    first, second = int(greedy[0, 5]), int(greedy[1, 7])  # one end id reached by each sequence
    stopped = model.generate(prompt, 12, temperature=0, eos_token_id=[first, second])
    ends = [next(i for i in range(3, 15) if int(greedy[row, i]) in (first, second)) for row in range(2)]
    assert stopped.size(1) == max(ends) + 1
    for row, end in enumerate(ends):  # each row keeps its tokens up to its end, then repeats the first end id
        assert torch.equal(stopped[row, :end + 1], greedy[row, :end + 1])
        assert (stopped[row, end + 1:] == first).all()
    assert torch.equal(model.generate(prompt, 12, temperature=0, eos_token_id=[]), greedy)


def test_generate_rejects_bad_settings(tiny):
    model = Transformer(tiny)
    prompt = tokens(tiny, 1, 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    top1 = {sample(logits, 1.0, top_k=1, generator=generator).item() for _ in range(50)}
    assert top1 == {0}
    nucleus = {sample(logits, 1.0, top_p=0.8, generator=generator).item() for _ in range(200)}
    assert nucleus == {0, 1}  # p = 0.66, 0.24, ... : the first two reach 0.8
    assert sample(logits, 0.0).item() == 0


# ---- mixture of experts --------------------------------------------------------------
@pytest.fixture
def moe_config(tiny) -> ModelConfig:
    return dataclasses.replace(tiny, use_moe=True, moe_num_experts=4, moe_active_experts=2)


def test_moe_routes_each_token_to_top_k(moe_config):
    model = Transformer(moe_config)
    x = tokens(moe_config)
    model(x)
    load = model.expert_load()
    assert load.shape == (moe_config.num_layers, moe_config.moe_num_experts)
    assert torch.equal(load.sum(dim=1), torch.full((moe_config.num_layers,), float(x.numel() * 2)))


def test_moe_matches_dense_reference(moe_config):
    """The routed computation equals Σ_topk gate·expert(x) computed densely."""
    moe = MoE(moe_config)
    x = torch.randn(2, 5, moe_config.num_dims)
    out, _ = moe(x)
    probs = torch.softmax(moe.gate(x), dim=-1)
    gates, chosen = probs.topk(2, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        weight = (gates * (chosen == e)).sum(-1, keepdim=True)
        expected += weight * expert(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_moe_aux_loss_is_positive_and_has_gradients(moe_config):
    model = Transformer(moe_config)
    x, y = tokens(moe_config), tokens(moe_config)
    _, loss, ce_loss = model(x, y)
    assert loss.item() > ce_loss.item()
    loss.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_lossfree_bias_changes_selection_not_gates(moe_config):
    config = dataclasses.replace(moe_config, use_lossfreebalance=True, moe_active_experts=1)
    moe = MoE(config)
    names = [name for name, _ in moe.named_parameters()]
    assert not any("expert_bias" in name for name in names)
    assert "expert_bias" in moe.state_dict()
    x = torch.randn(1, 8, config.num_dims)
    base, _ = moe(x)
    assert moe.last_load[3] < 8
    moe.expert_bias[3] = 10.0  # force every token to expert 3
    biased, _ = moe(x)
    assert moe.last_load[3] == 8
    # with one active expert the renormalised gate is 1 whatever the bias: output = expert 3
    torch.testing.assert_close(biased, moe.experts[3](x), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(base, biased)


def test_lossfree_update_moves_bias_toward_balance(moe_config):
    config = dataclasses.replace(moe_config, use_lossfreebalance=True)
    model = Transformer(config).train()
    with torch.no_grad():
        model.layers[0].mlp.gate.weight.zero_()
        model.layers[0].mlp.gate.weight[0] += 1.0  # make expert 0 popular
    x = tokens(config)
    model(x)
    load = model.layers[0].mlp.pending_load.clone()
    model.update_moe_bias(rate=0.01)
    bias = model.layers[0].mlp.expert_bias
    assert torch.equal(bias, 0.01 * torch.sign(load.mean() - load))
    assert model.layers[0].mlp.pending_load.sum() == 0
    _, loss, ce_loss = model(x, x)
    assert torch.equal(loss, ce_loss)  # no auxiliary loss with loss-free balancing


def test_compiled_model_trains_like_the_eager_one(tiny):
    """torch.compile takes the plain code paths (RoPE's formula, autograd's backwards) and
    leaves the loss eager; its loss and gradients must be the eager model's."""
    torch._dynamo.reset()
    model = Transformer(tiny)
    x, y = tokens(tiny), tokens(tiny)
    _, loss, _ = model(x, y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    _, compiled_loss, _ = torch.compile(model)(x, y)
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(compiled_loss, list(model.parameters())), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("quantize_base", [False, True])
def test_generation_with_adapted_layers_leaves_them_alone(tiny, quantize_base, monkeypatch):
    """LoRA and NF4 (QLoRA) layers are not plain linears: decoding leaves them as they are
    (an NF4 layer has no `weight` at all) and relays the plain ones around them."""
    from lora import LoRAConfig, apply_lora

    monkeypatch.setattr(model_module, "LAYOUT_MIN_TOKENS", 0)  # the layout is tried on every generation
    model = Transformer(tiny)
    apply_lora(model, LoRAConfig(rank=2, target_modules=("q_proj", "v_proj", "gate_proj"), quantize_base=quantize_base,
                                 quant_backend="native", blocksize=32))
    prompt = tokens(tiny, 1, 3)
    model.eval()
    with torch.no_grad():
        expected = prompt
        for _ in range(4):
            expected = torch.cat((expected, model(expected)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(prompt, 4, temperature=0), expected)
