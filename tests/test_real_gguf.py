"""GGUFs as real downloads carry them, written here the way llama.cpp's convert_hf_to_gguf
writes a transformers Llama (general.* keys, q/k permuted, Llama 3's RoPE as `rope_freqs`,
`tokenizer.ggml.*` with a named pre-tokenizer), and read by Sprat: the logits must be
transformers' on the source model and llama.cpp's on the file, the token ids llama.cpp's."""

import json
import math

import numpy as np
import pytest
import torch

import gguf
import train
from gguf_io import GGUFError, LLAMA3_REGEX, llama3_scaling_from_divisors, load_gguf, save_gguf
from model import llama3_scaled_frequencies
from test_gguf import add_llama_tensors, llama_cpp, open_llama  # noqa: F401 (llama_cpp: a fixture)

TEXTS = ["Hello world", " leading space", "  two spaces\n\nnewlines\n", "Ünïcödé café 日本語 😀",
         "digits 1234567 and 3.14159", "def f(x):\n    return x + 1\n", "don't I'LL we've", "tabs\tand\r\nCRLF",
         "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi 42<|eot_id|>"]
CORPUS = TEXTS * 20 + ["The model reads tokens and learns to predict the next one. 2024-12-04, 1,000,000 items."] * 20
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 128}


def byte_level_tokenizer(split: str):
    """A trained byte-level BPE whose text split is Llama 3's regex ("llama3") or SmolLM's
    digits-then-GPT-2 ("smollm"), with Llama 3's special tokens and a BOS post-processor."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(ignore_merges=split == "llama3"))
    if split == "llama3":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    bos = backend.token_to_id(SPECIALS[0])
    backend.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A",
                                                           special_tokens=[(SPECIALS[0], bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0], eos_token="<|eot_id|>")
    tokenizer.chat_template = ("{{- bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                               "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>"
                               "\n\n' }}{% endif %}")
    return tokenizer


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return byte_level_tokenizer("llama3")


def hf_llama(vocab_size: int, rope_scaling=None, tie: bool = False):
    """A transformers Llama with GQA, rope_theta 500000 and head_dim 32, weights scaled up so
    position and rounding show in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4.0)
    return model


def llama3_divisors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """What llama.cpp divides each RoPE frequency by, computed as convert_hf_to_gguf does
    (from the settings, in float64), independently of model.py."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    divisors = []
    for index in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (index / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def write_converted(reference, tokenizer, path, pre: str, qtype=gguf.GGMLQuantizationType.F32,
                    add_bos=None, arch: str = "llama") -> None:
    """`reference` (a transformers Llama) and its byte-level tokenizer as convert_hf_to_gguf
    writes them: general.* keys, llama.* hyperparameters, q/k rows interleaved per head,
    rope_freqs for Llama 3 scaling, norms f32 and matrices in `qtype`."""
    config = reference.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name("Tiny Llama 3.1 Instruct")
    writer.add_basename("tiny-llama")
    writer.add_size_label("1M")
    writer.add_license("llama3.1")
    writer.add_tags(["text-generation"])
    writer.add_languages(["en"])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    specials = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(token) for token in SPECIALS}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([vocab.get(index, f"[PAD{index}]") for index in range(config.vocab_size)])
    writer.add_token_types([gguf.TokenType.CONTROL if index in specials else gguf.TokenType.NORMAL
                            if index in vocab else gguf.TokenType.UNUSED for index in range(config.vocab_size)])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(tokenizer.chat_template)
    writer.add_string("general.source.url", "https://example.invalid/tiny")  # unusual but valid keys
    writer.add_uint32("tokenizer.ggml.eot_token_id", tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    scaling = config.rope_parameters if config.rope_parameters.get("rope_type") == "llama3" else None
    if scaling is not None:
        writer.add_tensor("rope_freqs.weight", llama3_divisors(head_dim, config.rope_parameters["rope_theta"],
                                                               scaling))

    add_llama_tensors(writer, reference, {"": qtype})


@pytest.fixture(scope="module")
def llama31_file(llama3_tokenizer, tmp_path_factory):
    """A Llama 3.1-style file: Llama 3 RoPE scaling as rope_freqs, BOS added, untied head."""
    reference = hf_llama(416, rope_scaling=dict(LLAMA3_SCALING))
    path = tmp_path_factory.mktemp("real") / "llama31.gguf"
    write_converted(reference, llama3_tokenizer, path, "llama-bpe", add_bos=True)
    return path, reference


def token_ids(llama3_tokenizer, count: int) -> list[int]:
    ids = llama3_tokenizer(" ".join(CORPUS[-3:] + TEXTS), add_special_tokens=False)["input_ids"]
    return ([llama3_tokenizer.bos_token_id] + ids)[:count]


# ---- Llama 3 RoPE scaling read back from rope_freqs ---------------------------------------------------
def test_a_llama31_file_with_rope_freqs_loads_with_its_scaling_and_transformers_logits(llama31_file,
                                                                                        llama3_tokenizer):
    path, reference = llama31_file
    model, tokenizer = load_gguf(path)
    assert model.config.rope_scaling == LLAMA3_SCALING
    ids = token_ids(llama3_tokenizer, 200)  # past original_max_position_embeddings (128): the scaling shows
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0][0], reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_llama31_file_exports_back_with_the_same_rope_freqs(llama31_file, llama3_tokenizer, tmp_path):
    path, _ = llama31_file
    model, tokenizer = load_gguf(path)
    again = save_gguf(model, tmp_path / "again.gguf", tokenizer, "f32")
    read = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(again)).tensors}
    original = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    np.testing.assert_allclose(read["rope_freqs.weight"], original["rope_freqs.weight"], rtol=1e-6)


@pytest.mark.parametrize("head_dim, factor, original", [(128, 8.0, 8192), (64, 32.0, 8192), (32, 8.0, 128)])
def test_rope_freqs_of_llama3_models_give_back_their_settings(head_dim, factor, original):
    """Llama 3.1 8B/70B (head 128, factor 8) and Llama 3.2 1B/3B (head 64, factor 32)."""
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original}
    divisors = torch.from_numpy(llama3_divisors(head_dim, 500000.0, scaling))
    assert llama3_scaling_from_divisors(divisors, 500000.0, head_dim) == scaling


def test_rope_freqs_too_few_to_fit_still_give_the_same_frequencies():
    """A 16-dim head has one interpolated frequency: any settings that give these divisors do."""
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
               "original_max_position_embeddings": 64}
    divisors = torch.from_numpy(llama3_divisors(16, 500000.0, scaling))
    fitted = llama3_scaling_from_divisors(divisors, 500000.0, 16)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(inv_freq / llama3_scaled_frequencies(inv_freq, fitted), divisors, rtol=1e-5, atol=0)
    assert llama3_scaling_from_divisors(torch.ones(8), 500000.0, 16) is None


@pytest.mark.parametrize("divisors", [[1.0, 1.0, 3.0, 1.0], [1.0, 0.5, 2.0, 2.0], [1.0, 2.0, 2.0]])
def test_rope_freqs_of_another_shape_are_refused_by_name(divisors):
    with pytest.raises(GGUFError, match="rope_freqs"):
        llama3_scaling_from_divisors(torch.tensor(divisors), 500000.0, 8)


# ---- tokenizers as real files name them -------------------------------------------------------------
@pytest.mark.parametrize("pre", ["llama3", "falcon3"])
def test_llama_cpps_other_names_for_llama3_split_are_read(llama3_tokenizer, tmp_path, pre):
    write_converted(hf_llama(416, tie=True), llama3_tokenizer, tmp_path / "f.gguf", pre, add_bos=True)
    _, tokenizer = load_gguf(tmp_path / "f.gguf")
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == llama3_tokenizer(text)["input_ids"], text


def test_a_llama3_file_without_add_bos_token_adds_bos_as_llama_cpp_does(llama3_tokenizer, tmp_path):
    write_converted(hf_llama(416, tie=True), llama3_tokenizer, tmp_path / "f.gguf", "llama-bpe", add_bos=None)
    _, tokenizer = load_gguf(tmp_path / "f.gguf")
    assert tokenizer("Hello")["input_ids"][0] == llama3_tokenizer.bos_token_id


def test_an_unknown_or_missing_pre_tokenizer_is_refused_by_name(llama3_tokenizer, tmp_path):
    write_converted(hf_llama(416, tie=True), llama3_tokenizer, tmp_path / "f.gguf", "tekken")
    with pytest.raises(GGUFError, match="'tekken'.*supported: 'gpt-2', 'llama-bpe'"):
        load_gguf(tmp_path / "f.gguf")


# ---- llama.cpp itself (the `llama_cpp` fixture and `open_llama` are test_gguf's) -------------------------
def test_llama_cpp_logits_on_a_llama31_file_equal_sprats(llama_cpp, llama31_file, llama3_tokenizer):
    path, _ = llama31_file
    model, tokenizer = load_gguf(path)
    ids = token_ids(llama3_tokenizer, 200)
    llm = open_llama(llama_cpp, path, 256)
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(np.array(llm.scores[:len(ids)]) - expected).max() < 1e-2  # logits here reach about ±4


@pytest.mark.parametrize("split, pre", [("llama3", "llama-bpe"), ("llama3", "llama3"), ("smollm", "smollm")])
def test_llama_cpp_tokenizes_real_pre_tokenizers_as_sprat(llama_cpp, tmp_path, split, pre):
    source = byte_level_tokenizer(split)
    write_converted(hf_llama(416, tie=True), source, tmp_path / "f.gguf", pre, add_bos=None)
    _, tokenizer = load_gguf(tmp_path / "f.gguf")
    llm = open_llama(llama_cpp, tmp_path / "f.gguf", 64)
    for text in TEXTS + ["1234567890 x9y88z 3.14"]:
        assert tokenizer(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=True), text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == source(text, add_special_tokens=False)[
            "input_ids"], text


# ---- bad files: one line, exit 2 ----------------------------------------------------------------------
def test_bad_gguf_files_are_one_line_errors_with_exit_code_2(llama31_file, llama3_tokenizer, tmp_path, capsys):
    path, _ = llama31_file
    data = path.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[:len(data) // 2])
    (tmp_path / "header.gguf").write_bytes(data[:200])
    (tmp_path / "text.gguf").write_text("not a model\n")
    write_converted(hf_llama(416, tie=True), llama3_tokenizer, tmp_path / "qwen2.gguf", "llama-bpe", arch="qwen2")
    for name in ("truncated", "header", "text", "qwen2"):
        capsys.readouterr()
        code = train.main(["generate", str(tmp_path / f"{name}.gguf"), "--prompt", "hi", "--max-new-tokens", "2"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "Traceback" not in err and err.startswith("error:"), (name, err)


def test_a_smollm_style_tokenizer_exports_under_llama_cpps_name_and_tokenizes_alike(llama_cpp, tmp_path):
    """SmolLM's pre-tokenizer (each digit alone, then GPT-2's regex) is llama.cpp's `smollm`."""
    source = byte_level_tokenizer("smollm")
    write_converted(hf_llama(416, tie=True), source, tmp_path / "in.gguf", "smollm")
    model, _ = load_gguf(tmp_path / "in.gguf")
    path = save_gguf(model, tmp_path / "out.gguf", source, "f16")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == "smollm"
    llm = open_llama(llama_cpp, path, 64)
    for text in TEXTS + ["1234567890 x9y88z 3.14"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == source(text)["input_ids"], text


# ---- Ollama Modelfile -----------------------------------------------------------------------------------
def test_a_llama3_template_that_opens_with_bos_becomes_a_go_template_without_it(llama31_file, tmp_path):
    """Llama 3's template starts with `{{- bos_token }}`; the GGUF's add_bos_token puts BOS
    there, so the Go template leaves it out and renders the rest as Jinja does."""
    import re

    from gguf_io import export_gguf

    model, tokenizer = load_gguf(llama31_file[0])
    text = (export_gguf(model, tmp_path, tokenizer, "f16").parent / "Modelfile").read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    branches = {role: (before, after) for role, before, after in
                re.findall(r'{{ (?:else )?if eq .Role "(\w+)" }}(.*?){{ .Content }}(.*?)(?={{ else if|{{ end }})',
                           template, flags=re.S)}
    generation = template.rsplit("{{ end }}{{ end }}", 1)[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    executed = "".join(branches[m["role"]][0] + m["content"] + branches[m["role"]][1] for m in messages) + generation
    assert tokenizer.bos_token + executed == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    stops = {line.split(" ", 2)[2].strip('"') for line in text.splitlines() if line.startswith("PARAMETER stop")}
    assert stops == {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"}


def test_a_gguf_too_large_for_memory_is_refused_before_dequantizing(llama31_file, monkeypatch, capsys):
    """An 8B Q4_K_M file (4.9 GB) is 32 GB of fp32 weights: refused as Sprat refuses such runs."""
    import budget

    monkeypatch.setattr(budget, "available_memory", lambda device="cpu": 2 ** 20)
    with pytest.raises(ValueError, match="needs ~.* GiB to load"):
        load_gguf(llama31_file[0])
    assert train.main(["generate", str(llama31_file[0]), "--prompt", "hi"]) == 2
    assert "GiB available" in capsys.readouterr().err


def test_a_template_with_bos_in_every_turn_keeps_it(llama3_tokenizer, tmp_path):
    """Llama 2's kind puts BOS before each user turn; the Go template keeps it there."""
    import copy

    from gguf_io import modelfile

    tokenizer = copy.deepcopy(llama3_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                               "m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
                               "{% endfor %}")
    text = modelfile(tokenizer, "m.gguf", add_bos=True)
    assert 'eq .Role "user" }}<|begin_of_text|>[INST] {{ .Content }} [/INST]' in text


def test_loading_holds_one_layer_of_fp32_weights_beside_the_model(llama31_file, monkeypatch):
    """A GGUF is dequantized into the model a layer at a time: a 1B file (5 GB as fp32) must
    not need a second 5 GB for a full dequantized copy."""
    import weakref

    import gguf_io

    dequantize, alive, most = gguf_io._dequantized, weakref.WeakSet(), []

    def tracked(tensor):
        out = dequantize(tensor)
        alive.add(out)
        most.append(len(alive))
        return out

    monkeypatch.setattr(gguf_io, "_dequantized", tracked)
    model, _ = load_gguf(llama31_file[0])
    assert len(most) == len(gguf.GGUFReader(str(llama31_file[0])).tensors) - 1  # all but rope_freqs
    assert max(most) <= 9  # one layer's tensors


def test_a_reply_ends_at_the_files_end_of_turn_too(llama3_tokenizer, tmp_path):
    """llama.cpp stops at a file's end-of-turn id (<|eot_id|>) as at end-of-text; so does a
    reply from the file, and a plain prompt starts with the BOS the file adds."""
    import copy

    import runs

    tokenizer = copy.deepcopy(llama3_tokenizer)
    tokenizer.eos_token = "<|end_of_text|>"  # a base model's end of text; its turns end with <|eot_id|>
    path = tmp_path / "base.gguf"
    write_converted(hf_llama(416), tokenizer, path, "llama-bpe", add_bos=True)
    loaded = runs.load_trained(path)
    eos, eot = (tokenizer.convert_tokens_to_ids(token) for token in ("<|end_of_text|>", "<|eot_id|>"))
    assert loaded.tokenizer.eos_token_id == eos != eot
    assert runs.stop_tokens(loaded) == (eos, eot)
    ids = loaded.tokenizer("hello", add_special_tokens=runs.with_special_tokens(loaded, chat=False))["input_ids"]
    assert ids[0] == loaded.tokenizer.bos_token_id
