"""GGUF (llama.cpp's file format) both ways, and an Ollama Modelfile beside an export.

Names and layout follow llama.cpp's conventions (gguf-py's constants and its
convert_hf_to_gguf.py): architecture `llama`; a mixture-of-experts model is a `llama` with
`llama.expert_count` / `llama.expert_used_count`, a router `blk.N.ffn_gate_inp` and the
experts stacked into 3-D `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` (the layout
llama.cpp reads for Mixtral). Our RoPE rotates the two halves of each head (Hugging
Face's layout) while llama.cpp rotates adjacent pairs, so q/k rows are permuted on the way
out and back on the way in. Quantization is the `gguf` package's own (exact for the types
it implements); dequantization reads every type it can.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from budget import check_memory
from export import refuse_biased_routing
from model import ModelConfig, Transformer, llama3_scaled_frequencies

ARCH = "llama"
GPT2_PRE = "gpt-2"  # GPT-2's regex, what tokenizers' ByteLevel(use_regex=True) splits with
LLAMA3_PRE = "llama-bpe"
# the other names llama.cpp gives Llama 3's split (Falcon 3's and others' files carry them)
LLAMA3_ALIASES = ("llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
SMOLLM_PRE = "smollm"  # each digit alone, then GPT-2's regex: SmolLM's Digits + ByteLevel
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPM_SPACE = "\u2581"


class GGUFError(ValueError):
    """A model, tokenizer or file that GGUF (or this reader) cannot express, explained."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF needs the `gguf` package: pip install gguf (it is in requirements.txt)") from None
    return gguf


def quant_types() -> dict[str, tuple]:
    """--quant name → (tensor type, file type): the types gguf.quants writes exactly."""
    gguf = _gguf()
    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (T.F32, F.ALL_F32), "f16": (T.F16, F.MOSTLY_F16), "bf16": (T.BF16, F.MOSTLY_BF16),
            "q8_0": (T.Q8_0, F.MOSTLY_Q8_0), "q5_1": (T.Q5_1, F.MOSTLY_Q5_1), "q5_0": (T.Q5_0, F.MOSTLY_Q5_0),
            "q4_1": (T.Q4_1, F.MOSTLY_Q4_1), "q4_0": (T.Q4_0, F.MOSTLY_Q4_0)}


QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


# ---- rotary layout ------------------------------------------------------------------------
def permute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k projection rows from the half-split RoPE layout (ours, HF's) to the interleaved
    one llama.cpp rotates: in each head, row i of the first half and row i of the second
    half become rows 2i and 2i+1."""
    out_dims, in_dims = weight.shape
    head_dim = out_dims // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, in_dims).transpose(1, 2).reshape(out_dims, in_dims)


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary`."""
    out_dims, in_dims = weight.shape
    head_dim = out_dims // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, in_dims).transpose(1, 2).reshape(out_dims, in_dims)


# ---- tensors ------------------------------------------------------------------------------
def to_gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names, q/k permuted, experts stacked (fp32)."""
    config = model.config
    refuse_biased_routing(model, "llama.cpp's llama architecture")
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    out = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    if config.rope_scaling is not None:  # llama.cpp divides each frequency by its factor
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        out["rope_freqs.weight"] = inv_freq / llama3_scaled_frequencies(inv_freq, config.rope_scaling)
    for index in range(config.num_layers):
        ours, theirs = f"layers.{index}.", f"blk.{index}."
        out[theirs + "attn_norm.weight"] = state[ours + "input_layernorm.weight"]
        out[theirs + "attn_q.weight"] = permute_rotary(state[ours + "self_attn.q_proj.weight"], config.num_heads)
        out[theirs + "attn_k.weight"] = permute_rotary(state[ours + "self_attn.k_proj.weight"], config.num_kv_heads)
        out[theirs + "attn_v.weight"] = state[ours + "self_attn.v_proj.weight"]
        out[theirs + "attn_output.weight"] = state[ours + "self_attn.o_proj.weight"]
        out[theirs + "ffn_norm.weight"] = state[ours + "post_attention_layernorm.weight"]
        for proj, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            if config.use_moe:
                experts = [state[f"{ours}mlp.experts.{e}.{proj}.weight"] for e in range(config.moe_num_experts)]
                out[f"{theirs}ffn_{short}_exps.weight"] = torch.stack(experts)  # (E, out, in)
            else:
                out[f"{theirs}ffn_{short}.weight"] = state[f"{ours}mlp.{proj}.weight"]
        if config.use_moe:
            out[theirs + "ffn_gate_inp.weight"] = state[ours + "mlp.gate.weight"]
    return out


def from_gguf_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names → our state dict (the inverse of `to_gguf_tensors`)."""
    state = _outer_state(tensors, config)
    for index in range(config.num_layers):
        state.update(_layer_state(tensors, config, index))
    return state


def _outer_state(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The embedding, final norm and head of our state dict."""
    state = {"embed_tokens.weight": tensors["token_embd.weight"], "norm.weight": tensors["output_norm.weight"]}
    state["lm_head.weight"] = tensors["token_embd.weight"] if config.tie_embeddings else tensors["output.weight"]
    return state


def _layer_state(tensors: dict[str, torch.Tensor], config: ModelConfig, index: int) -> dict[str, torch.Tensor]:
    """Layer `index` of our state dict: q/k un-permuted, experts unstacked."""
    state = {}
    ours, theirs = f"layers.{index}.", f"blk.{index}."
    state[ours + "input_layernorm.weight"] = tensors[theirs + "attn_norm.weight"]
    state[ours + "self_attn.q_proj.weight"] = unpermute_rotary(tensors[theirs + "attn_q.weight"], config.num_heads)
    state[ours + "self_attn.k_proj.weight"] = unpermute_rotary(tensors[theirs + "attn_k.weight"],
                                                               config.num_kv_heads)
    state[ours + "self_attn.v_proj.weight"] = tensors[theirs + "attn_v.weight"]
    state[ours + "self_attn.o_proj.weight"] = tensors[theirs + "attn_output.weight"]
    state[ours + "post_attention_layernorm.weight"] = tensors[theirs + "ffn_norm.weight"]
    for proj, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        if config.use_moe:
            for expert, weight in enumerate(tensors[f"{theirs}ffn_{short}_exps.weight"]):
                state[f"{ours}mlp.experts.{expert}.{proj}.weight"] = weight
        else:
            state[f"{ours}mlp.{proj}.weight"] = tensors[f"{theirs}ffn_{short}.weight"]
    if config.use_moe:
        state[ours + "mlp.gate.weight"] = tensors[theirs + "ffn_gate_inp.weight"]
        state[ours + "mlp.expert_bias"] = torch.zeros(config.moe_num_experts)
    return state


def _encode(name: str, tensor: torch.Tensor, quant: str, head: str) -> tuple[np.ndarray, Optional[object]]:
    """(array, raw type) for GGUFWriter.add_tensor. Norms, RoPE factors and the router stay
    fp32 as llama.cpp's converter keeps them; the output head (`head`: `output.weight`, or
    the tied embedding) of a 4- or 5-bit file is q8_0, as llama.cpp's own quantizer keeps
    it above the rest (at Q6_K, which gguf cannot write); a row that does not fill whole
    quantization blocks falls back to f16."""
    gguf = _gguf()
    array = tensor.numpy().astype(np.float32)
    if tensor.dim() == 1 or name.endswith(("ffn_gate_inp.weight", "rope_freqs.weight")) or quant == "f32":
        return array, None
    if name == head and quant.startswith(("q4", "q5")):
        quant = "q8_0"
    qtype = quant_types()[quant][0]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if quant == "f16" or array.shape[-1] % block:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


# ---- tokenizer ------------------------------------------------------------------------------
def _backend_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs its "
                        f"vocabulary and merges")
    return json.loads(backend.to_str())


def bpe_pre_tokenizer(spec: dict) -> str:
    """The llama.cpp pre-tokenizer whose regex splits text as this tokenizer does, or an error."""
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if normalizer:
        raise GGUFError(f"the tokenizer normalizes text ({normalizer.get('type')}); a GGUF byte-level BPE cannot")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PRE
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True) \
            and not steps[1].get("add_prefix_space"):
        return SMOLLM_PRE
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        return LLAMA3_PRE
    raise GGUFError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:160]}) matches no llama.cpp pre-tokenizer "
                    f"Sprat knows; supported: GPT-2's byte-level regex ({GPT2_PRE}), Llama 3's ({LLAMA3_PRE}) and SmolLM's "
                    f"({SMOLLM_PRE})")


def adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens puts the BOS token first."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos] != tokenizer("a", add_special_tokens=False)[
        "input_ids"][:1]


def spm_space_prefix(spec: dict) -> bool:
    """Whether a byte-fallback BPE (SentencePiece converted by transformers) puts "▁" before
    the text — its Metaspace pre-tokenizer (or a legacy Prepend normalizer) — or an error
    when it splits text in a way llama.cpp's SentencePiece tokenizer does not."""
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == SPM_SPACE and not pre.get("split", True) \
            and not normalizer:
        return pre.get("prepend_scheme", "always") != "never"
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else []
    if not pre and [step.get("type") for step in steps] == ["Prepend", "Replace"] \
            and steps[0].get("prepend") == SPM_SPACE and steps[1].get("content") == SPM_SPACE:
        return True
    raise GGUFError(f"the SentencePiece-style tokenizer splits text as llama.cpp does not (pre-tokenizer "
                    f"{json.dumps(pre)[:100]}, normalizer {json.dumps(normalizer)[:100]}); supported: Metaspace "
                    f"without splitting, or Prepend + Replace of ' ' by '{SPM_SPACE}'")


def tokenizer_metadata(tokenizer, vocab_size: int, add_bos: Optional[bool] = None) -> dict:
    """The GGUF `tokenizer.ggml.*` values of a fast BPE tokenizer: a byte-level BPE as a
    `gpt2` vocabulary (merges, pre-tokenizer), a byte-fallback BPE converted from
    SentencePiece as a `llama` one (scores that rank merges as the merge list does, byte
    tokens); tokens by id padded to the model's vocabulary, types, special ids."""
    gguf = _gguf()
    spec = _backend_spec(tokenizer)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"GGUF export writes BPE tokenizers (byte-level, or SentencePiece-style with byte fallback); "
                        f"this one is {model.get('type')}")
    spm = bool(model.get("byte_fallback"))
    by_id = {index: token for token, index in model["vocab"].items()}
    kinds = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index, f"[PAD{index}]")
        tokens.append(token)
        if index not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif spm and token == tokenizer.unk_token:
            types.append(gguf.TokenType.UNKNOWN)
        elif index in kinds:
            types.append(kinds[index])
        elif spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    values = {"tokens": tokens, "types": types, "add_bos": adds_bos(tokenizer) if add_bos is None else add_bos,
              "chat_template": tokenizer.chat_template}
    if spm:
        # llama.cpp's SentencePiece merges the adjacent pair whose joined piece scores highest:
        # a piece scores minus the rank of the first merge that makes it, others below all.
        scores = [-float(len(merges) + index) for index in range(vocab_size)]
        for rank, merge in reversed(list(enumerate(merges))):
            joined = merge.replace(" ", "", 1)
            if joined in model["vocab"]:
                scores[model["vocab"][joined]] = -float(rank)
        values.update(model="llama", scores=scores, add_space_prefix=spm_space_prefix(spec))
    else:
        values.update(model="gpt2", pre=bpe_pre_tokenizer(spec), merges=merges)
    for key in ("bos", "eos", "pad", "unk"):
        values[key] = getattr(tokenizer, f"{key}_token_id", None)
    return values


# ---- export ----------------------------------------------------------------------------------
def save_gguf(model: Transformer, path: str | Path, tokenizer, quant: str = "f16", add_bos: Optional[bool] = None,
              name: str = "sprat") -> Path:
    """Write `model` and its tokenizer as one GGUF file llama.cpp loads. `add_bos` is whether
    llama.cpp should put BOS before a prompt (None: what the tokenizer itself does)."""
    gguf = _gguf()
    if quant not in QUANTS:
        raise GGUFError(f"--quant {quant!r} is not supported; choose one of: {', '.join(QUANTS)}")
    config = model.config
    tensors = to_gguf_tensors(model)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size, add_bos)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(quant_types()[quant][1])
    writer.add_context_length(config.context_len)
    writer.add_embedding_length(config.num_dims)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.ffn_hidden_dims)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rmsnorm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.use_moe:
        writer.add_expert_count(config.moe_num_experts)
        writer.add_expert_used_count(config.moe_active_experts)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types([int(kind) for kind in vocab["types"]])
    if vocab["model"] == "gpt2":
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_merges(vocab["merges"])
    else:
        writer.add_token_scores(vocab["scores"])
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(False)
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
    head = "token_embd.weight" if config.tie_embeddings else "output.weight"
    for tensor_name, tensor in tensors.items():
        array, raw_dtype = _encode(tensor_name, tensor, quant, head)
        writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def _go_template(render) -> Optional[tuple[str, str]]:
    """(Go template, the text around the contents) of the chat template `render` draws,
    read off one message per role and checked on a conversation; None when the template
    is not a fixed text before and after each message."""
    marker = "\x00CONTENT\x00"
    parts = {}
    for role in ("system", "user", "assistant"):
        before, _, after = render([{"role": role, "content": marker}], False).partition(marker)
        parts[role] = (before, after)
    generation = render([{"role": "user", "content": marker}], True)[len("".join(parts["user"])) + len(marker):]
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    expected = "".join(parts[m["role"]][0] + m["content"] + parts[m["role"]][1] for m in probe) + generation
    if render(probe, True) != expected:
        return None
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
                       f"{_go_literal(before)}{{{{ .Content }}}}{_go_literal(after)}"
                       for i, (role, (before, after)) in enumerate(parts.items()))
    go = f"{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go_literal(generation)}"
    return go, "".join(before + after for before, after in parts.values())


def modelfile(tokenizer, gguf_name: str, add_bos: Optional[bool] = None) -> str:
    """An Ollama Modelfile for the GGUF `gguf_name` beside it: the chat template rendered
    into Go template syntax (each role's text before and after its content, read off the
    Jinja template and checked on a conversation) and the tokens that end a reply as stops.
    A BOS the conversation opens with (Llama 3's `{{- bos_token }}`) is left to the GGUF's
    add_bos_token (`add_bos`, None: the tokenizer's habit) when that adds it, as llama.cpp
    does; a template with BOS in every turn keeps it."""
    from jinja2 import TemplateError

    lines = [f"FROM ./{gguf_name}", ""]
    bos = tokenizer.bos_token if (adds_bos(tokenizer) if add_bos is None else add_bos) else None

    def render(messages: list[dict], generation: bool, strip: Optional[str]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        return text[len(strip):] if strip and text.startswith(strip) else text

    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    found = None
    for strip in dict.fromkeys([bos, None]) if tokenizer.chat_template else ():
        try:
            found = _go_template(lambda messages, generation: render(messages, generation, strip))
        except (TemplateError, ValueError, TypeError, KeyError):  # e.g. a template that refuses a system turn
            found = None
        if found is not None:
            break
    if found is not None:
        go, affixes = found
        lines += [f'TEMPLATE """{go}"""', ""]
        specials = tokenizer.all_special_tokens + [added.content for added in tokenizer.added_tokens_decoder.values()
                                                   if added.special]
        stops += [token for token in specials if token in affixes]
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def export_gguf(model: Transformer, out_dir: str | Path, tokenizer, quant: str = "f16",
                add_bos: Optional[bool] = None) -> Path:
    """`model.gguf` and an Ollama `Modelfile` in `out_dir`; returns the GGUF's path."""
    out_dir = Path(out_dir)
    path = save_gguf(model, out_dir / f"model-{quant}.gguf", tokenizer, quant, add_bos)
    (out_dir / "Modelfile").write_text(modelfile(tokenizer, path.name, add_bos))
    return path


# ---- import ----------------------------------------------------------------------------------
def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def end_ids(path: str | Path) -> tuple[int, ...]:
    """The ids a GGUF says end generation besides end-of-text: end of turn and end of message
    (`tokenizer.ggml.eot_token_id`, `eom_token_id`; Llama 3's <|eot_id|>, <|eom_id|>), as
    llama.cpp stops at them."""
    reader = _gguf().GGUFReader(str(path))
    ids = (_field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom"))
    return tuple(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))


def _shape(tensor) -> tuple[int, ...]:
    return tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists the fastest-varying dimension first


def _dequantized(tensor) -> torch.Tensor:
    gguf = _gguf()
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        readable = [t.name for t in gguf.GGMLQuantizationType if _can_dequantize(t)]
        raise GGUFError(f"tensor {tensor.name} has type {tensor.tensor_type.name}, which this reader cannot "
                        f"dequantize; supported: {', '.join(readable)}") from None
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(_shape(tensor)))


def _can_dequantize(qtype) -> bool:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        return True
    except (NotImplementedError, ValueError, TypeError):
        return False


def config_from_gguf(reader, context_len: Optional[int] = None) -> ModelConfig:
    """Our ModelConfig for a GGUF's `llama.*` metadata; other architectures are refused."""
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported; Sprat reads 'llama' (dense, or with experts "
                        f"as Mixtral)")
    names = {tensor.name for tensor in reader.tensors}

    def key(name: str, default=None):
        value = _field(reader, f"{ARCH}.{name}", default)
        if value is None:
            raise GGUFError(f"the GGUF lacks {ARCH}.{name}")
        return value

    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab_size = int(embed.shape[1])
    dims, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(_field(reader, f"{ARCH}.rope.dimension_count", dims // heads))
    if head_dim * heads != dims:
        raise GGUFError(f"the GGUF has {heads} heads of {head_dim} dims in a {dims}-wide model; Sprat needs "
                        f"head_dim = embedding_length / head_count")
    for name in ("attention.key_length", "attention.value_length"):
        value = _field(reader, f"{ARCH}.{name}")
        if value is not None and int(value) != dims // heads:
            raise GGUFError(f"the GGUF sets {ARCH}.{name}={value}; Sprat needs embedding_length / head_count")
    scaling = None
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        theta = _float32(_field(reader, f"{ARCH}.rope.freq_base", 10000.0))
        divisors = torch.from_numpy(np.array(_gguf().quants.dequantize(rope_freqs.data, rope_freqs.tensor_type),
                                             dtype=np.float32).reshape(-1))
        scaling = llama3_scaling_from_divisors(divisors, theta, head_dim)
    rope_type = _field(reader, f"{ARCH}.rope.scaling.type")
    if rope_type not in (None, "none"):
        raise GGUFError(f"the GGUF uses RoPE scaling {rope_type!r}; Sprat reads unscaled RoPE (and Llama 3's factors "
                        f"in Hugging Face directories)")
    experts = int(_field(reader, f"{ARCH}.expert_count", 0) or 0)
    ffn = int(_field(reader, f"{ARCH}.expert_feed_forward_length", 0) or key("feed_forward_length"))
    moe = dict(use_moe=True, moe_num_experts=experts,
               moe_active_experts=int(key("expert_used_count"))) if experts else {}
    return ModelConfig(
        vocab_size=vocab_size, num_dims=dims, num_heads=heads,
        num_kv_heads=int(_field(reader, f"{ARCH}.attention.head_count_kv", heads)),
        num_layers=int(key("block_count")), ffn_hidden_dims=ffn,
        context_len=context_len or int(key("context_length")),
        rmsnorm_eps=_float32(key("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32(_field(reader, f"{ARCH}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_embeddings="output.weight" not in names, **moe)


def llama3_scaling_from_divisors(divisors: torch.Tensor, theta: float, head_dim: int) -> Optional[dict]:
    """Llama 3's RoPE scaling settings back from llama.cpp's `rope_freqs` (what each
    frequency is divided by), or None when every divisor is 1. The divisors are `factor` for
    long wavelengths, 1 for short ones and 1 / ((1 - s) / factor + s) between, where
    s = (original / wavelength - low) / (high - low): only original / (high - low) and
    low / (high - low) shape them, so low_freq_factor is taken as 1 (Llama 3.x's value, which
    then gives back its original context and high_freq_factor) and the rest fitted. Divisors
    of another shape are an error."""
    if divisors.numel() != head_dim // 2:
        raise GGUFError(f"the GGUF's rope_freqs has {divisors.numel()} values; a head of {head_dim} dims has "
                        f"{head_dim // 2} frequencies")
    divisors = divisors.double()
    if torch.allclose(divisors, torch.ones_like(divisors)):
        return None
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).double() / head_dim)
    wavelength = 2 * math.pi / inv_freq
    factor = float(divisors.max())
    kept, slowed = divisors <= 1 + 1e-6, divisors >= factor * (1 - 1e-6)
    between = ~(kept | slowed)
    if factor <= 1 or bool((kept & slowed).any()):
        raise GGUFError(_rope_freqs_refusal(divisors))
    # s = a / wavelength - b on the interpolated frequencies; s >= 1 on the kept ones, s <= 0 on the slowed
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    if int(between.sum()) >= 2:
        design = torch.stack([1 / wavelength[between], -torch.ones(int(between.sum()), dtype=torch.float64)], 1)
        a, b = torch.linalg.lstsq(design, smooth[between].unsqueeze(1)).solution.flatten().tolist()
    else:  # too few interpolated frequencies to fit: s = 0 between the neighbouring wavelengths
        longest_kept = float(wavelength[kept].max()) if kept.any() else float(wavelength.min()) / 2
        shortest_slowed = float(wavelength[slowed].min()) if slowed.any() else float(wavelength.max()) * 2
        if between.any():  # and through the one interpolated value
            w, s = float(wavelength[between][0]), float(smooth[between][0])
            low_edge = math.sqrt(w * shortest_slowed)
            a = s / (1 / w - 1 / low_edge)
        else:  # and s = 1 where the kept ones end
            low_edge = math.sqrt(longest_kept * shortest_slowed)
            a = 1 / (1 / longest_kept - 1 / low_edge)
        b = a / low_edge
    if not (a > 0 and b > 0):
        raise GGUFError(_rope_freqs_refusal(divisors))
    original, high = a / b, 1 + 1 / b
    for digits in (3, None):  # the round values a config states (8192, 4.0) when they fit as well
        scaling = {"rope_type": "llama3", "factor": _float32(factor), "low_freq_factor": 1.0,
                   "high_freq_factor": round(high, digits) if digits else high,
                   "original_max_position_embeddings": round(original) if digits else original}
        rebuilt = inv_freq.float() / llama3_scaled_frequencies(inv_freq.float(), scaling)
        if torch.allclose(rebuilt.double(), divisors, rtol=1e-4, atol=0):
            return scaling
    raise GGUFError(_rope_freqs_refusal(divisors))


def _rope_freqs_refusal(divisors: torch.Tensor) -> str:
    return (f"the GGUF's rope_freqs (per-frequency RoPE divisors, from {float(divisors.min()):.4g} to "
            f"{float(divisors.max()):.4g}) do not follow Llama 3's scaling, the only kind Sprat's RoPE can apply")


def _float32(value: float) -> float:
    """GGUF stores these as float32: 1e-05 comes back as 9.99999974e-06; the shortest decimal
    with float32's precision gives back the value that was written."""
    return float(f"{float(value):.7g}")


def _bpe_backend(tokens: list[str], merges: list[str], pre: Optional[str]):
    """A byte-level BPE splitting text as llama.cpp's pre-tokenizer `pre` does (Llama 3's
    ignores merges for words already in the vocabulary, as llama.cpp does for it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    llama3 = pre == LLAMA3_PRE or pre in LLAMA3_ALIASES
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=llama3))
    if pre == GPT2_PRE:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif llama3:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == SMOLLM_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        named = f"pre-tokenizer {pre!r}" if pre else "no pre-tokenizer (tokenizer.ggml.pre; an older file)"
        raise GGUFError(f"the GGUF's byte-level BPE vocabulary has {named}, which Sprat does not split text as; "
                        f"supported: {GPT2_PRE!r}, {LLAMA3_PRE!r} (or {', '.join(map(repr, LLAMA3_ALIASES))}), "
                        f"{SMOLLM_PRE!r}, and SentencePiece ('llama') vocabularies")
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_backend(tokens: list[str], scores: list[float], types: list[int], unk: Optional[int],
                 space_prefix: bool):
    """A SentencePiece-style vocabulary as a tokenizers BPE with byte fallback: merges are the
    splits of each piece into two pieces, ranked by the merged piece's score (as
    transformers' SentencePiece converter does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    gguf = _gguf()
    vocab = {token: index for index, token in enumerate(tokens)}
    normal = {int(gguf.TokenType.NORMAL), int(gguf.TokenType.USER_DEFINED)}
    ranked = []
    for token, index in vocab.items():
        if types[index] not in normal or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                   unk_token=tokens[unk] if unk is not None else None))
    # SentencePiece's dummy prefix: "▁" before the text even when it starts with a space (as
    # llama.cpp does; transformers' Metaspace adds none there)
    steps = [normalizers.Prepend(SPM_SPACE)] if space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPM_SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return backend


def tokenizer_from_gguf(reader):
    """A PreTrainedTokenizerFast rebuilt from the GGUF's `tokenizer.ggml.*` metadata, with its
    special tokens, BOS setting and chat template."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    gguf = _gguf()
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFError("the GGUF carries no tokenizer (tokenizer.ggml.model / tokens)")
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))]
    ids = {"bos": gguf.Keys.Tokenizer.BOS_ID, "eos": gguf.Keys.Tokenizer.EOS_ID, "pad": gguf.Keys.Tokenizer.PAD_ID,
           "unk": gguf.Keys.Tokenizer.UNK_ID}
    special = {name: _field(reader, key) for name, key in ids.items()}
    pre = _field(reader, "tokenizer.ggml.pre")
    if kind == "gpt2":
        backend = _bpe_backend(tokens, _field(reader, "tokenizer.ggml.merges", []), pre)
    elif kind == "llama":
        backend = _spm_backend(tokens, _field(reader, "tokenizer.ggml.scores"), types, special["unk"],
                               bool(_field(reader, gguf.Keys.Tokenizer.ADD_PREFIX, True)))
    else:
        raise GGUFError(f"the GGUF's tokenizer model {kind!r} is not supported; Sprat reads 'gpt2' (byte-level BPE) "
                        f"and 'llama' (SentencePiece)")
    control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(types) if kind == control])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, kind in enumerate(types) if kind == user and len(tokens[i]) > 1])
    # without the key, llama.cpp adds BOS for SentencePiece and Llama 3-split vocabularies
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token",
                          kind == "llama" or (kind == "gpt2" and (pre == LLAMA3_PRE or pre in LLAMA3_ALIASES))))
    if add_bos and special["bos"] is not None:
        bos = tokens[special["bos"]]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, special["bos"])])
    names = {f"{name}_token": tokens[index] for name, index in special.items() if index is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **names)
    tokenizer.chat_template = _field(reader, "tokenizer.chat_template")
    tokenizer.model_max_length = 1 << 30
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def _checked_state(tensors: dict[str, torch.Tensor], model: Transformer, path: Path) -> dict[str, torch.Tensor]:
    """Our state dict from the GGUF's tensors, with every name and shape checked first."""
    config = model.config
    known = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    known |= {f"blk.{i}.{name}.weight" for i in range(config.num_layers) for name in LAYER_TENSORS}
    extra = sorted(name for name in tensors if name not in known)
    if extra:
        raise GGUFError(f"{path}: tensors Sprat's llama model has no place for, e.g. {extra[:3]} (biases or another "
                        f"architecture's layers)")
    try:
        state = from_gguf_tensors(tensors, config)
    except KeyError as error:
        raise GGUFError(f"{path}: the GGUF lacks tensor {error.args[0]!r} that its llama.* metadata implies") from None
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise GGUFError(f"{path}: {name} has shape {tuple(tensor.shape)}, the metadata implies "
                            f"{tuple(expected[name].shape)}")
    if set(state) != set(expected):
        raise GGUFError(f"{path}: the model needs {sorted(set(expected) - set(state))[:3]}, which the GGUF does "
                        f"not give")
    return state


def _fill(model: Transformer, reader) -> None:
    """Copy the GGUF's weights into `model` a layer at a time (dequantized, q/k un-permuted),
    so that beside the model only one layer's fp32 tensors exist, not a second model."""
    groups: dict[Optional[int], dict] = {}
    for tensor in reader.tensors:
        if tensor.name != "rope_freqs.weight":  # read by config_from_gguf
            index = int(tensor.name.split(".")[1]) if tensor.name.startswith("blk.") else None
            groups.setdefault(index, {})[tensor.name] = tensor
    targets = model.state_dict()
    for index, group in groups.items():
        _fill_group(targets, group, model.config, index)


@torch.no_grad()
def _fill_group(targets: dict[str, torch.Tensor], group: dict, config: ModelConfig, index: Optional[int]) -> None:
    tensors = {name: _dequantized(tensor) for name, tensor in group.items()}
    part = _outer_state(tensors, config) if index is None else _layer_state(tensors, config, index)
    for name, tensor in part.items():
        targets[name].copy_(tensor)


def load_gguf(path: str | Path, context_len: Optional[int] = None) -> tuple[Transformer, object]:
    """Our model and a tokenizer from a `.gguf` file of the llama architecture (dense, or
    with experts in Mixtral's layout): tensors dequantized, q/k un-permuted, the head tied
    to the embedding when there is no `output.weight`."""
    gguf = _gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as error:
        raise GGUFError(f"{path} is not a readable GGUF file ({type(error).__name__}: {str(error)[:160]})") from None
    config = config_from_gguf(reader, context_len)
    check_memory(config, False)  # before dequantizing: a quantized file grows 3-8x as fp32 weights
    model = Transformer.uninitialized(config)  # every weight comes from the file (checked below)
    # every name and shape checked on shape-only tensors before anything is read
    _checked_state({t.name: torch.empty(_shape(t), device="meta") for t in reader.tensors}, model, path)
    _fill(model, reader)
    return model, tokenizer_from_gguf(reader)
