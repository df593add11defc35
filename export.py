"""Import and export in the Hugging Face Llama layout (config.json + model.safetensors),
and Mixtral's for mixture-of-experts models.

Our parameter names are Llama's without the `model.` prefix (see model.py), so the
mapping is a prefix and the tied output head; nothing is permuted, because our RoPE
uses the same half-split layout as `transformers`. Mixtral routes as our MoE does
(softmax over all experts, top-k, renormalised), its experts' w1/w3/w2 are our
gate/up/down projections and its router `block_sparse_moe.gate` is our `mlp.gate`.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data import refuse_remote_code
from model import ModelConfig, Transformer

HEAD = "lm_head.weight"
MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # ours → Mixtral's


class UnsupportedModel(ValueError):
    """A model the target format cannot express, explained."""


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class HFOrigin:
    """What a Hugging Face directory says that ModelConfig does not hold, kept on the model
    `load_hf` returns (as `model.hf_origin`) so that exporting it says it again: the special
    ids of config.json (Llama 3 lists several end-of-sequence ids, its tokenizer names one),
    generation_config.json (the release's sampling defaults and stop ids) and the precision
    the weights were stored in (a bfloat16 release stays bfloat16, not twice its size)."""

    special_ids: dict
    generation_config: Optional[dict]
    dtype: torch.dtype


def refuse_biased_routing(model: Transformer, target: str) -> None:
    """Loss-free balancing picks experts by probability + a per-expert bias. Neither Mixtral nor
    llama.cpp's `llama` can add a bias to the selection, so a model whose biases differ
    between experts would route differently there: refused, saying what it would need."""
    if not (model.config.use_moe and model.config.use_lossfreebalance):
        return
    for name, bias in model.state_dict().items():
        if name.endswith("expert_bias") and float(bias.max() - bias.min()) > 0:
            raise UnsupportedModel(
                f"{name} holds a loss-free balancing bias ({float(bias.min()):.3g} … {float(bias.max()):.3g}) that "
                f"changes which experts a token uses; {target} has no expert-selection bias, so the model would "
                f"route differently there. Keep using it as a Sprat run; a format with a selection bias (DeepSeek-V3's "
                f"e_score_correction_bias) is what it needs")


def _hf_name(name: str) -> str:
    """Our parameter name → the Hugging Face one (Mixtral's for expert layers)."""
    if ".mlp.gate." in name or ".mlp.experts." in name:
        name = name.replace(".mlp.", ".block_sparse_moe.")
        for ours, theirs in MIXTRAL_EXPERT.items():
            name = name.replace(f".{ours}.", f".{theirs}.")
    return name if name == HEAD else "model." + name


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict under Llama's (or, with experts, Mixtral's) key names; the tied head is
    stored once, as the embedding."""
    refuse_biased_routing(model, "the Mixtral layout")
    state = {}
    for name, tensor in model.state_dict().items():
        if (name == HEAD and model.config.tie_embeddings) or name.endswith("expert_bias"):
            continue
        state[_hf_name(name)] = tensor
    return state


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama's or Mixtral's key names → ours. Rotary buffers some old checkpoints carry are dropped."""
    ours = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == HEAD:
            if not config.tie_embeddings:
                ours[name] = tensor
        elif name.startswith("model."):
            name = name[len("model."):]
            if ".block_sparse_moe." in name:
                name = name.replace(".block_sparse_moe.", ".mlp.")
                for our, their in MIXTRAL_EXPERT.items():
                    name = name.replace(f".{their}.", f".{our}.")
            ours[name] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r} in a Llama checkpoint")
    if config.tie_embeddings:
        ours[HEAD] = ours["embed_tokens.weight"]
    if config.use_moe:
        for index in range(config.num_layers):
            ours[f"layers.{index}.mlp.expert_bias"] = torch.zeros(config.moe_num_experts)
    return ours


def hf_config(config: ModelConfig, tokenizer=None, dtype: torch.dtype = torch.float32) -> dict:
    """A `config.json` for `LlamaForCausalLM` (`MixtralForCausalLM` with experts) with the
    same shape as `config`."""
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.num_dims,
        "intermediate_size": config.ffn_hidden_dims,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_len,
        "rms_norm_eps": config.rmsnorm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.use_moe:
        for key in ("attention_bias", "mlp_bias"):
            del values[key]
        values.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                       "num_local_experts": config.moe_num_experts, "num_experts_per_tok": config.moe_active_experts,
                       "router_aux_loss_coef": config.moe_aux_loss_coef, "router_jitter_noise": 0.0,
                       "sliding_window": None, "output_router_logits": False})
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, key, None)
            if token_id is not None:
                values[key] = token_id
    return values


def save_hf(model: Transformer, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` (and its tokenizer) as a directory `transformers` loads with
    `AutoModelForCausalLM.from_pretrained`. A model imported by `load_hf` keeps what its
    directory said beyond the shape (see HFOrigin)."""
    origin: Optional[HFOrigin] = getattr(model, "hf_origin", None)
    state = {k: v.detach().contiguous().cpu() for k, v in to_hf_state_dict(model).items()}
    if origin is not None:
        state = {k: v.to(origin.dtype) if v.is_floating_point() else v for k, v in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    _save_shareable(state, out_dir / "model.safetensors")
    values = hf_config(model.config, tokenizer, dtype)
    if origin is not None:
        values.update(origin.special_ids)
    (out_dir / "config.json").write_text(json.dumps(values, indent=2) + "\n")
    if origin is not None and origin.generation_config is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(origin.generation_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def config_from_hf(values: dict, context_len: Optional[int] = None) -> ModelConfig:
    """Our ModelConfig for a Llama `config.json` (Mistral's is Llama's with an optional sliding
    window; Mixtral's adds experts); unsupported variants are a clear error."""
    if not isinstance(values, dict):
        raise ValueError(f"config.json holds a {type(values).__name__}, not an object of settings")
    model_type = values.get("model_type")
    if model_type not in ("llama", "mistral", "mixtral"):
        raise ValueError(f"model_type {model_type!r} is not supported; load_hf imports Llama-, Mistral- and "
                         f"Mixtral-architecture checkpoints (model_type 'llama', 'mistral' or 'mixtral')")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    absent = [key for key in required if not isinstance(values.get(key), int) or values[key] < 1]
    if absent:
        raise ValueError(f"config.json lacks a positive whole number for {', '.join(absent)}: a {model_type} "
                         f"config.json names all of {', '.join(required)}")
    quantization = values.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise ValueError(f"config.json has quantization_config (quant_method {method!r}): Sprat imports "
                         f"full-precision weights (float32, float16 or bfloat16); use the unquantized release")
    context = context_len or values.get("max_position_embeddings", 2048)
    window = values.get("sliding_window") if model_type in ("mistral", "mixtral") else None
    if window is not None and window < context:
        raise ValueError(f"config.json has sliding_window={window}, shorter than the {context}-token context; "
                         f"Sprat attends to the whole context, so it would compute other outputs")
    moe = {}
    if model_type == "mixtral":
        moe = dict(use_moe=True, moe_num_experts=values["num_local_experts"],
                   moe_active_experts=values["num_experts_per_tok"],
                   moe_aux_loss_coef=values.get("router_aux_loss_coef", 0.01))
    unsupported = {
        "attention_bias": values.get("attention_bias", False),
        "mlp_bias": values.get("mlp_bias", False),
    }
    for key, value in unsupported.items():
        if value:
            raise ValueError(f"config.json has {key}={value}; biases in attention/MLP are not supported")
    act = values.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json has hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    rope_scaling = values.get("rope_scaling") or values.get("rope_parameters") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json uses RoPE scaling {rope_type!r}; supported: none (default) and 'llama3'")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": "llama3", **{key: rope_scaling[key] for key in keys}}
    rope_theta = values.get("rope_theta", (values.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    head_dim = values.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"config.json has head_dim={head_dim} with hidden_size={hidden} and "
                         f"{heads} heads; only head_dim = hidden_size / num_attention_heads is supported")
    return ModelConfig(
        vocab_size=values["vocab_size"],
        num_dims=hidden,
        num_heads=heads,
        num_kv_heads=values.get("num_key_value_heads") or heads,
        num_layers=values["num_hidden_layers"],
        ffn_hidden_dims=values["intermediate_size"],
        context_len=context,
        rmsnorm_eps=values.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_embeddings=bool(values.get("tie_word_embeddings", False)),
        **moe,
    )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise ValueError(f"{file} is not a complete safetensors file ({error}); an interrupted download or copy "
                         f"leaves such files: fetch it again") from None


def _read_pickled(file: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin` read without running code (weights_only)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{file} is not a readable PyTorch weights file ({str(error).splitlines()[0][:200]}); "
                         f"an interrupted download leaves such files, and Sprat reads only plain tensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a dictionary of tensors")
    return state


def _shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each checked to be a file beside it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ValueError(f"{index} is not a shard index (a JSON object whose weight_map maps tensor names to "
                         f"files)") from None
    shards = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{index} names the shard {name!r}; shards must be files in the same directory")
        if not (index.parent / name).is_file():
            raise FileNotFoundError(f"{index.parent / name} is missing: {index.name} names {len(names)} shard "
                                    f"files, and all must be present (an interrupted download?)")
        shards.append(index.parent / name)
    return shards


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `save_pretrained` directory: safetensors (one file or shards) first,
    else the older pickled `pytorch_model.bin` (one file or shards)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        state = {}
        for shard in _shards(index):
            state.update(_read_safetensors(shard))
        return state
    legacy = path / "pytorch_model.bin"
    legacy_index = path / "pytorch_model.bin.index.json"
    if legacy.exists():
        return _read_pickled(legacy)
    if legacy_index.exists():
        state = {}
        for shard in _shards(legacy_index):
            state.update(_read_pickled(shard))
        return state
    raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                            f"or pytorch_model.bin.index.json")


def _save_shareable(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors writes its files 0600; an exported model gets the mode of the files
    beside it (0666 less the umask), so others who may read the folder can load it."""
    save_file(state, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_hf(path: str | Path, context_len: Optional[int] = None,
            dtype: Optional[torch.dtype] = None) -> Transformer:
    """Import a Llama- or Mixtral-architecture directory saved by `transformers` (`save_pretrained`).
    `context_len` caps the RoPE tables for checkpoints with very long contexts."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    refuse_remote_code(path)
    values = json.loads(config_file.read_text())
    config = config_from_hf(values, context_len)
    from budget import check_memory  # (budget imports the trainer: only when a model is loaded)

    check_memory(config, training=False)  # before the weights are read: an 8B release would not fit here
    weights = _read_weights(path)
    stored = {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()}
    state = from_hf_state_dict(weights, config)
    model = Transformer.uninitialized(config)  # every weight comes from the checkpoint (strict load below)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name!r}")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    generation = path / "generation_config.json"
    try:
        generation_config = json.loads(generation.read_text()) if generation.is_file() else None
    except (ValueError, RecursionError):
        generation_config = None  # not needed to run the model; an export writes none
    model.hf_origin = HFOrigin({key: values[key] for key in SPECIAL_IDS if key in values},
                               generation_config if isinstance(generation_config, dict) else None,
                               stored.pop() if len(stored) == 1 else torch.float32)
    return model


# ---- LoRA adapters in PEFT's format --------------------------------------------------------
def save_adapter(model: Transformer, out_dir: str | Path, config, base_model: Optional[str] = None) -> Path:
    """Only the LoRA weights (`adapter_model.safetensors`) and `adapter_config.json`, in
    PEFT's format, so `peft.PeftModel.from_pretrained` applies them to the model that
    `save_hf` exports."""
    from lora import adapter_state_dict, peft_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_shareable(adapter_state_dict(model), out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(config, base_model), indent=2) + "\n")
    return out_dir


def load_adapter(model: Transformer, path: str | Path, quantize_base: bool = False):
    """Apply the adapter at `path` (PEFT format) to `model`: LoRA layers are added where the
    model has none, then the adapter's weights are copied in. Returns its LoRAConfig."""
    import dataclasses

    from lora import apply_lora, config_from_peft, load_adapter_state_dict, lora_layers

    path = Path(path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a LoRA adapter directory (no {name})")
    config = config_from_peft(json.loads((path / "adapter_config.json").read_text()))
    config = dataclasses.replace(config, quantize_base=quantize_base)
    if not lora_layers(model):
        apply_lora(model, config)
    for name, layer in lora_layers(model).items():
        if abs(layer.scale - config.scale) > 1e-12 * config.scale:
            raise ValueError(f"the adapter scales its update by {config.scale:g} (alpha {config.alpha:g}, rank "
                             f"{config.rank}) but {name} uses {layer.scale:g}; load it onto a model without LoRA layers")
    load_adapter_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    return config


def merged_model(model: Transformer) -> Transformer:
    """A plain model with the adapters folded into the (dequantized) base weights."""
    from lora import merged_state_dict

    merged = Transformer.uninitialized(model.config)  # every weight comes from the merged state
    merged.load_state_dict(merged_state_dict(model))
    if getattr(model, "hf_origin", None) is not None:
        merged.hf_origin = model.hf_origin
    return merged


def merge_and_save(model: Transformer, out_dir: str | Path, tokenizer=None) -> Path:
    """A full checkpoint with the adapters folded into the (dequantized) base weights, in
    the Hugging Face layout."""
    return save_hf(merged_model(model), out_dir, tokenizer)
