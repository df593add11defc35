"""GGUF export and import, checked against llama.cpp itself (llama-cpp-python) where it is
installed, and against GGUFs written with the gguf package straight from transformers."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import gguf
import runs
from data import CHATML_TEMPLATE, train_bpe
from gguf_io import QUANTS, GGUFError, load_gguf, modelfile, permute_rotary, save_gguf, \
    unpermute_rotary
from model import ModelConfig, Transformer

CODE = '''def greet(name: str) -> str:
    """Say hello."""
    return f"Hello, {name}!"  # 3 + 4 == 7


class Counter:
    def __init__(self):
        self.count = 0
'''
PROSE = ("The model reads tokens and learns to predict the next one. Naïve café owners sell crème brûlée for "
         "€4.50 — ¿por qué no? 日本語のテキストも少し。 Ελληνικά, русский, emoji 🙂🚀 and   spaced\ttabs.\n")
MIXED = (CODE + PROSE + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"
         "<|endoftext|>  trailing  \n\n")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([CODE, PROSE] * 30, vocab_size=400)


def trained(tokenizer, **overrides) -> Transformer:
    """A small model fitted for 25 steps to the test text, so its predictions are decisive
    (random weights give near-ties that any rounding flips)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=416, num_dims=64, num_heads=4, num_kv_heads=2, num_layers=2, ffn_hidden_dims=128,
                         context_len=160, tie_embeddings=False, **overrides)
    model = Transformer(config)
    ids = torch.tensor(tokenizer((CODE + PROSE) * 2, add_special_tokens=False)["input_ids"])
    starts = range(0, len(ids) - 65, 48)
    inputs = torch.stack([ids[i:i + 64] for i in starts])  # (B, 64)
    targets = torch.stack([ids[i + 1:i + 65] for i in starts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(25):
        _, loss, _ = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"dense": trained(tokenizer), "moe": trained(tokenizer, use_moe=True, moe_num_experts=4,
                                                         moe_active_experts=2)}


@pytest.fixture(scope="module")
def exported(models, tokenizer, tmp_path_factory):
    """(kind, quant) → path of the model's GGUF, written once per module."""
    root = tmp_path_factory.mktemp("gguf")
    return {(kind, quant): save_gguf(model, root / f"{kind}-{quant}.gguf", tokenizer, quant, add_bos=False)
            for kind, model in models.items() for quant in ("f32", "f16", "q8_0")}


def test_rotary_permutation_turns_half_split_rope_into_interleaved_rope():
    """llama.cpp rotates pairs (2i, 2i+1); we rotate (i, i + hd/2). After the permutation the
    rotated query of llama.cpp's layout is ours with its rows permuted the same way."""
    heads, head_dim, dims = 2, 8, 16
    weight = torch.randn(heads * head_dim, dims)
    permuted = permute_rotary(weight, heads)
    assert torch.equal(unpermute_rotary(permuted, heads), weight)
    x = torch.randn(dims)
    angles = torch.rand(head_dim // 2) * 6
    ours = (weight @ x).view(heads, head_dim)
    first, second = ours[:, :head_dim // 2], ours[:, head_dim // 2:]
    rotated_ours = torch.cat((first * angles.cos() - second * angles.sin(),
                              second * angles.cos() + first * angles.sin()), dim=-1)
    theirs = (permuted @ x).view(heads, head_dim // 2, 2)
    rotated_theirs = torch.stack((theirs[..., 0] * angles.cos() - theirs[..., 1] * angles.sin(),
                                  theirs[..., 1] * angles.cos() + theirs[..., 0] * angles.sin()), dim=-1)
    back = unpermute_rotary(rotated_theirs.reshape(heads * head_dim, 1), heads).view(heads, head_dim)
    torch.testing.assert_close(back, rotated_ours)


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("quant", QUANTS)
def test_sprat_gguf_reads_back_with_only_the_quantization_error(models, tokenizer, tmp_path, kind, quant):
    model = models[kind]
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer, quant, add_bos=False)
    again, again_tokenizer = load_gguf(path)
    assert again.config == model.config
    original, reloaded = model.state_dict(), again.state_dict()
    reader = gguf.GGUFReader(str(path))
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    if quant not in ("f32", "f16"):
        assert types["blk.0.attn_v.weight"].name.lower() == quant
        assert types["output.weight"].name.lower() == ("q8_0" if quant[:2] in ("q4", "q5") else quant)
    # each weight comes back as exactly its own rounding through the type it was stored as
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        quant, types["blk.0.attn_v.weight"])
    for name, tensor in original.items():
        if tensor.dim() == 1 or name.endswith("mlp.gate.weight"):  # norms and routers stay f32
            assert torch.equal(reloaded[name], tensor), name
            continue
        heads = {"q_proj": model.config.num_heads, "k_proj": model.config.num_kv_heads}.get(name.split(".")[-2])
        stored = permute_rotary(tensor, heads) if heads else tensor
        rounding = types["output.weight"] if name == "lm_head.weight" else qtype
        rounded = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(stored.numpy(), rounding), rounding))
        assert torch.equal(reloaded[name], unpermute_rotary(rounded, heads) if heads else rounded), name
    x = torch.tensor([tokenizer(PROSE, add_special_tokens=False)["input_ids"][:48]])
    with torch.no_grad():
        expected, got = model(x)[0], again(x)[0]
    if quant == "f32":
        assert torch.equal(expected, got)
    agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean()
    assert agreement >= {"f32": 1, "f16": 0.95, "bf16": 0.9, "q8_0": 0.9}.get(quant, 0.5)


def test_the_tokenizer_comes_back_with_its_ids_specials_and_template(exported, tokenizer):
    _, again = load_gguf(exported["dense", "f32"])
    for text in (MIXED, CODE, PROSE, " leading space", "\n\n\n", ""):
        assert again(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text
        assert again(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]  # no BOS added
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert again.decode(ids) == MIXED
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(again, name) == getattr(tokenizer, name)
    assert again.chat_template == tokenizer.chat_template == CHATML_TEMPLATE
    chat = [{"role": "user", "content": "hi"}]
    assert runs.chat_prompt(again, "hi") == tokenizer.apply_chat_template(chat, tokenize=False,
                                                                          add_generation_prompt=True)


def test_modelfile_renders_the_chat_template_in_go_and_stops_at_its_end_tokens(tokenizer):
    import re

    text = modelfile(tokenizer, "model-f16.gguf")
    assert text.startswith("FROM ./model-f16.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.startswith("{{- range .Messages }}")
    # executing the Go template by hand gives what the Jinja chat template renders
    branches = {role: (before, after) for role, before, after in
                re.findall(r'{{ (?:else )?if eq .Role "(\w+)" }}(.*?){{ .Content }}(.*?)(?={{ else if|{{ end }})',
                           template, flags=re.S)}
    assert set(branches) == {"system", "user", "assistant"}
    generation = template.rsplit("{{ end }}{{ end }}", 1)[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    executed = "".join(branches[m["role"]][0] + m["content"] + branches[m["role"]][1] for m in messages) + generation
    assert executed == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    stops = [line.split(" ", 2)[2].strip('"') for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert set(stops) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_export_writes_gguf_and_modelfile_and_merges_a_finetuned_model(models, tokenizer, tmp_path):
    from lora import LoRAConfig, apply_lora, merged_state_dict

    model = trained(tokenizer)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    loaded = runs.Loaded(model, tokenizer, tmp_path, "finetuned")
    path = runs.export_model(loaded, tmp_path / "out", "gguf", "f32")
    assert path == tmp_path / "out" / "model-f32.gguf" and (tmp_path / "out" / "Modelfile").exists()
    again, _ = load_gguf(path)
    for name, tensor in merged_state_dict(model).items():
        assert torch.equal(again.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="not empty"):
        runs.export_model(loaded, tmp_path / "out", "gguf")


def test_a_loss_free_bias_that_changes_routing_is_refused(tokenizer, tmp_path):
    model = Transformer(ModelConfig(vocab_size=416, num_dims=64, num_heads=4, num_kv_heads=2, num_layers=1,
                                    ffn_hidden_dims=64, context_len=32, use_moe=True, use_lossfreebalance=True))
    save_gguf(model, tmp_path / "zero.gguf", tokenizer, "f32")  # all-zero bias: routing as without it
    model.layers[0].mlp.expert_bias[1] = 0.01
    with pytest.raises(ValueError, match="expert_bias.*selection bias"):
        save_gguf(model, tmp_path / "biased.gguf", tokenizer, "f32")
    assert not (tmp_path / "biased.gguf").exists()


def test_unsupported_inputs_are_clear_errors(exported, models, tmp_path):
    with pytest.raises(GGUFError, match="--quant 'q3_k'.*q8_0"):
        save_gguf(models["dense"], tmp_path / "x.gguf", None, "q3_k")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported.*'llama'"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_a_tensor_type_it_cannot_read_is_named_with_those_it_can(models, tokenizer, tmp_path, monkeypatch):
    import gguf_io

    encode = gguf_io._encode
    monkeypatch.setattr(gguf_io, "_encode", lambda name, tensor, quant, head: (tensor.numpy().astype(np.int8), None)
                        if name == "blk.1.attn_v.weight" else encode(name, tensor, quant, head))
    save_gguf(models["dense"], tmp_path / "i8.gguf", tokenizer, "f32")
    with pytest.raises(GGUFError, match="blk.1.attn_v.weight has type I8.*supported: F32, F16, Q4_0.*Q4_K.*BF16"):
        load_gguf(tmp_path / "i8.gguf")


# ---- GGUFs written straight from transformers with the gguf package ---------------------------------
def write_llama_gguf(reference, tokenizer, path, types: dict) -> None:
    """A GGUF of a transformers LlamaForCausalLM, written here with the gguf package and
    convert_hf_to_gguf's conventions (its q/k permutation, its key names), independently of
    gguf_io's writer. `types` maps a tensor-name fragment to the type to store it as."""
    config = reference.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    specials = set(tokenizer.all_special_ids)
    writer.add_token_list([vocab.get(i, f"[PAD{i}]") for i in range(config.vocab_size)])
    writer.add_token_types([3 if i in specials else 1 if i in vocab else 5 for i in range(config.vocab_size)])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    add_llama_tensors(writer, reference, types)


def add_llama_tensors(writer, reference, types: dict) -> None:
    """Write `reference`'s tensors as convert_hf_to_gguf does (its names, q/k rows interleaved
    per head, a tied head left out, norms f32), then the file. `types` maps a tensor-name
    fragment to the type to store it as (F32 where none matches)."""
    config = reference.config

    def permute(weight, heads):
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in reference.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a missing output.weight as tied to the embedding
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            index, rest = base.removeprefix("model.layers.").split(".", 1)
            target = f"blk.{index}.{per_layer[rest]}"
        else:
            target = names[base]
        array = tensor.numpy()
        if target.endswith("attn_q"):
            array = permute(array, config.num_attention_heads)
        if target.endswith("attn_k"):
            array = permute(array, config.num_key_value_heads)
        qtype = next((t for fragment, t in types.items() if fragment in target), gguf.GGMLQuantizationType.F32)
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target + ".weight", array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target + ".weight", array.astype(np.float16))
        else:
            writer.add_tensor(target + ".weight", gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0", "Q4_0"])
def test_import_a_gguf_written_from_transformers(tokenizer, tmp_path, tie, quant):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                         rope_theta=5e5, tie_word_embeddings=tie)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    qtype = gguf.GGMLQuantizationType[quant]
    types = {"attn": qtype, "ffn": qtype, "token_embd": qtype, "output": qtype}
    write_llama_gguf(reference, tokenizer, tmp_path / "hf.gguf", types)
    ours, again = load_gguf(tmp_path / "hf.gguf")
    assert ours.config.tie_embeddings == tie and ours.config.num_kv_heads == 2 and ours.config.rope_theta == 5e5
    assert again(MIXED, add_special_tokens=False)["input_ids"] == tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    # the same file read by hand: each weight is its own dequantization, nothing else changed
    reader = gguf.GGUFReader(str(tmp_path / "hf.gguf"))
    q_tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    q_by_hand = torch.from_numpy(gguf.quants.dequantize(q_tensor.data, q_tensor.tensor_type).copy())
    assert torch.equal(permute_rotary(ours.layers[1].self_attn.q_proj.weight.detach(), 4), q_by_hand.float())
    # the logits are transformers' on the same weights rounded through the stored type (rows are
    # quantized along the input dimension, so the q/k row permutation does not change the rounding)
    rounded = LlamaForCausalLM(config).eval()
    rounded.load_state_dict({name: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(
        tensor.numpy(), qtype), qtype)) if tensor.dim() == 2 else tensor
        for name, tensor in reference.state_dict().items()})
    x = torch.randint(0, 416, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], rounded(x).logits, atol=1e-4, rtol=0)
        error = (ours(x)[0] - reference(x).logits).abs().max()
    assert error <= {"F32": 1e-4, "F16": 2e-3, "Q8_0": 0.02, "Q4_0": 0.2}[quant]  # logits here are about ±0.3


def test_import_reads_a_sentencepiece_vocabulary(tmp_path, models):
    """A `llama` (SentencePiece) vocabulary — tokens with scores, byte tokens <0x..> — becomes
    a byte-fallback BPE that splits as the scores say and round-trips any text."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor",
             "ld", "▁world"]
    tokens = pieces + words
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(words))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    model = models["dense"]
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    config = model.config
    for add, value in ((writer.add_context_length, config.context_len), (writer.add_embedding_length, config.num_dims),
                       (writer.add_block_count, config.num_layers), (writer.add_feed_forward_length, config.ffn_hidden_dims),
                       (writer.add_head_count, config.num_heads), (writer.add_head_count_kv, config.num_kv_heads),
                       (writer.add_layer_norm_rms_eps, config.rmsnorm_eps)):
        add(value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), config.vocab_size)])
    writer.add_token_scores(scores + [0.0] * (config.vocab_size - len(tokens)))
    writer.add_token_types(types + [5] * (config.vocab_size - len(tokens)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    from gguf_io import to_gguf_tensors
    for name, tensor in to_gguf_tensors(model).items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, spm = load_gguf(path)
    ids = spm("hello world")["input_ids"]
    assert [tokens[i] for i in ids] == ["<s>", "▁hello", "▁world"]  # BOS: SentencePiece's default
    text = "hello wörld\n"
    assert spm.decode(spm(text, add_special_tokens=False)["input_ids"]) == text
    assert "<0xC3>" in [tokens[i] for i in spm(text)["input_ids"]]  # ö falls back to its UTF-8 bytes
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = open_llama(llama_cpp, path)
    for text in ("hello world", "hello wörld\n", " hello  world", "lower held word"):
        assert llm.tokenize(text.encode(), add_bos=True) == spm(text)["input_ids"], text


# ---- llama.cpp itself -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def open_llama(llama_cpp, path, n_ctx: int = 160):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, verbose=False, seed=0,
                           n_threads=2)


def test_llama_cpp_tokenizes_like_sprat(llama_cpp, exported, tokenizer):
    llm = open_llama(llama_cpp, exported["dense", "f32"])
    for text in (MIXED, CODE, PROSE, " leading space", "a  b   c\n\n\td", "x\n \n"):
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours, text  # the GGUF says: no BOS
    assert llm.token_eos() == tokenizer.eos_token_id
    assert llm.detokenize(tokenizer(PROSE, add_special_tokens=False)["input_ids"]).decode() == PROSE


def teacher_forced(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_llama_cpp_greedy_continuation_and_logits_equal_sprats(llama_cpp, exported, models, tokenizer, kind):
    model = models[kind]
    prompt = tokenizer("def greet(name", add_special_tokens=False)["input_ids"]
    ours = model.generate(torch.tensor([prompt]), 24, temperature=0)[0, len(prompt):].tolist()
    llm = open_llama(llama_cpp, exported[kind, "f32"])
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(24):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(token)
        llm.eval([token])
    assert theirs == ours
    assert llm.detokenize(theirs).decode() == tokenizer.decode(ours)
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"][:64]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(teacher_forced(llm, ids) - expected).max() < 1e-3


AGREEMENT = {"f16": 0.99, "q8_0": 0.95}


def top1_agreement(llama_cpp, path, model, ids) -> float:
    llm = open_llama(llama_cpp, path)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].argmax(-1).numpy()
    return float((teacher_forced(llm, ids).argmax(-1) == expected).mean())


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("quant", sorted(AGREEMENT))
def test_llama_cpp_top1_agreement_per_quantization(llama_cpp, exported, models, tokenizer, kind, quant):
    ids = tokenizer(MIXED + CODE, add_special_tokens=False)["input_ids"][:64]
    assert len(ids) == 64
    agreement = top1_agreement(llama_cpp, exported[kind, quant], models[kind], ids)
    print(f"{kind} {quant}: top-1 agreement {agreement:.1%} over 64 positions")
    assert agreement >= AGREEMENT[quant]


@pytest.fixture(scope="module")
def llama3_style_tokenizer():
    """A BPE split by Llama 3's regex, byte-level without its own regex, that adds BOS (as
    Llama 3's tokenizer.json does)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from gguf_io import LLAMA3_REGEX

    backend = Tokenizer(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator([CODE, PROSE] * 30, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[0], eos_token=specials[1],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def test_a_hugging_face_directory_with_a_llama3_style_tokenizer_exports_to_gguf(llama3_style_tokenizer, models,
                                                                                tmp_path):
    from export import save_hf

    save_hf(models["dense"], tmp_path / "hf", llama3_style_tokenizer)
    loaded = runs.load_trained(tmp_path / "hf")
    assert loaded.kind == "huggingface"
    path = runs.export_model(loaded, tmp_path / "out", "gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # the tokenizer's own habit
    model, again = load_gguf(path)
    for text in (MIXED, CODE, PROSE, "don'T 12345 x\r\n\r\n  y"):
        assert again(text)["input_ids"] == llama3_style_tokenizer(text)["input_ids"], text
        assert again(text)["input_ids"][0] == 0
    assert torch.equal(model.lm_head.weight, models["dense"].lm_head.weight)


def test_llama_cpp_tokenizes_like_a_llama3_style_tokenizer(llama_cpp, llama3_style_tokenizer, models, tmp_path):
    path = save_gguf(models["dense"], tmp_path / "l3.gguf", llama3_style_tokenizer, "f16")
    llm = open_llama(llama_cpp, path)
    for text in (MIXED, CODE, PROSE, "don'T 12345 x\r\n\r\n  y"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == llama3_style_tokenizer(text)["input_ids"]


def test_llama3_rope_scaling_travels_as_rope_freqs(llama_cpp, tokenizer, tmp_path):
    """Llama 3's scaled RoPE is written as llama.cpp's per-frequency divisors: llama.cpp's
    logits equal ours; reading the file back gives the same RoPE again."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model = Transformer(ModelConfig(vocab_size=416, num_dims=64, num_heads=4, num_kv_heads=2, num_layers=2,
                                    ffn_hidden_dims=128, context_len=128, rope_scaling=scaling)).eval()
    with torch.no_grad():  # larger weights than the initialisation, so position matters in the logits
        for block in model.layers:
            block.self_attn.q_proj.weight.mul_(20)
            block.self_attn.k_proj.weight.mul_(20)
    path = save_gguf(model, tmp_path / "l3.gguf", tokenizer, "f32", add_bos=False)
    ids = tokenizer(MIXED, add_special_tokens=False)["input_ids"][:96]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
        unscaled = Transformer(dataclasses.replace(model.config, rope_scaling=None))
        unscaled.load_state_dict(model.state_dict())
        differs = np.abs(unscaled(torch.tensor([ids]))[0][0].numpy() - expected).max()
    got = teacher_forced(open_llama(llama_cpp, path, n_ctx=128), ids)
    assert np.abs(got - expected).max() < 1e-3 < differs
    with torch.no_grad():  # settings that give the same divisors (a 16-dim head cannot tell them apart)
        again = load_gguf(path)[0](torch.tensor([ids]))[0][0].numpy()
    assert np.abs(again - expected).max() < 1e-4


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer():
    """Llama 2's kind of tokenizer as transformers builds it: a byte-fallback BPE over
    "▁"-joined text, with byte tokens, here with merges trained on the test text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    trainer_backend = Tokenizer(models.BPE(byte_fallback=True))
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_backend.train_from_iterator([CODE, PROSE] * 30, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    trained_model = json.loads(trainer_backend.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(trained_model["vocab"], key=trained_model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained_model["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges)


SPM_TEXTS = ("hello world", PROSE, CODE, "two  spaces and\ttab ", "wörld ∑ 🙂")  # none starts with a space (see README)


def spm_model(tokenizer) -> Transformer:
    return Transformer(ModelConfig(vocab_size=len(tokenizer), num_dims=32, num_heads=2, num_kv_heads=1, num_layers=1,
                                   ffn_hidden_dims=32, context_len=512))


def test_a_sentencepiece_style_tokenizer_exports_as_a_llama_vocabulary(sentencepiece_style_tokenizer, models,
                                                                      tmp_path):
    tokenizer = sentencepiece_style_tokenizer
    path = save_gguf(spm_model(tokenizer), tmp_path / "spm.gguf", tokenizer, "f32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == gguf.TokenType.UNKNOWN and types[3] == gguf.TokenType.BYTE
    _, again = load_gguf(path)
    for text in SPM_TEXTS:
        assert again(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text
        assert again.decode(again(text, add_special_tokens=False)["input_ids"]) == text


def test_llama_cpp_tokenizes_like_a_sentencepiece_style_tokenizer(llama_cpp, sentencepiece_style_tokenizer, models,
                                                                  tmp_path):
    tokenizer = sentencepiece_style_tokenizer
    path = save_gguf(spm_model(tokenizer), tmp_path / "spm.gguf", tokenizer, "f16", add_bos=False)
    llm = open_llama(llama_cpp, path, n_ctx=512)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text, add_special_tokens=False)["input_ids"], \
            text
