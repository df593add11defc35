"""LoRA and hand-rolled 4-bit NormalFloat (NF4) linear layers: QLoRA.

- `quantize_nf4` / `dequantize_nf4`: pure functions. Block-wise absmax scaling (64 weights
  a block) onto the 16 NF4 levels, two codes per byte, optionally with the absmax
  constants themselves quantized to 8 bits in blocks of 256 (double quantization), as in
  QLoRA (https://arxiv.org/abs/2305.14314). The layout is bitsandbytes': the tests check
  our codes and dequantized values against `bitsandbytes.functional.quantize_4bit`.
- `Linear4bit`: a frozen linear layer stored in NF4, dequantized on the fly in forward.
- `LoRALinear` (https://arxiv.org/abs/2106.09685): a frozen base (full precision or
  `Linear4bit`) plus a trainable low-rank update `scale · B A`. It keeps the base's
  parameter names (`weight`, `bias`), so a base checkpoint loads with `strict=True`.
- `apply_lora`, `mark_only_lora_as_trainable`, merging, and adapter state in PEFT's key
  names (the files themselves are written by `export.save_adapter`).
"""

from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from config_io import ConfigIO, described

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig(ConfigIO):
    """Which linears get adapters, their size, and whether the frozen base is 4-bit."""

    section: ClassVar[str] = "lora"

    rank: int = described(16, "rank r of the update B·A")
    alpha: float = described(32.0, "scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA)")
    dropout: float = described(0.05, "dropout on the LoRA path's input")
    target_modules: tuple[str, ...] = described(DEFAULT_TARGETS, "name patterns of the linears to adapt (fnmatch on the "
                                                "module name or its full dotted path)")
    use_rslora: bool = described(False, "rank-stabilised scaling alpha/sqrt(r) (https://arxiv.org/abs/2312.03732)")
    quantize_base: bool = described(False, "store the frozen base linears in 4-bit NF4 (QLoRA)")
    quant_backend: str = described("auto", "NF4 kernels: native (ours), bitsandbytes, or auto (bitsandbytes on CUDA "
                                   "when installed, else native)", choices=("auto", "native", "bitsandbytes"))
    double_quant: bool = described(True, "quantize the NF4 absmax constants to 8 bits as well")
    blocksize: int = described(64, "weights per NF4 absmax block", choices=(32, 64, 128, 256, 512, 1024, 2048, 4096))

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, str)):
            self.target_modules = (self.target_modules,) if isinstance(self.target_modules, str) \
                else tuple(self.target_modules)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank!r}: must be a positive integer")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r}: must be a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoRAConfig.target_modules={self.target_modules!r}: must name at least one module pattern")
        for name in ("quant_backend", "blocksize"):
            if getattr(self, name) not in self.choices(name):
                raise ValueError(f"LoRAConfig.{name}={getattr(self, name)!r}: must be one of "
                                 f"{', '.join(map(str, self.choices(name)))}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


# ---- NF4 -------------------------------------------------------------------------------------
# The NF4 data type as published (QLoRA, appendix E) and as bitsandbytes stores it; the
# float32 values are the format's definition. `derive_nf4_levels` shows where they come from.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


@functools.cache
def nf4_levels() -> torch.Tensor:
    """The NF4 levels as a CPU tensor, built once (callers move it, never modify it)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def derive_nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat levels from first principles: quantiles of N(0, 1) spaced so that
    both halves have equal probability mass, with an exact zero, normalised to [-1, 1]
    (QLoRA, eq. 4); the outermost quantile sits at 1 - 0.5·(1/30 + 1/32). Agrees with
    `NF4_LEVELS` to float32 rounding (2e-7)."""
    offset = 0.5 * (1 - 1 / 32 + 1 - 1 / 30)  # 0.9677083: between the asymmetric halves' edges
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels
    levels = torch.cat((positive, torch.zeros(1, dtype=torch.float64), negative)).sort().values
    return (levels / levels.abs().max()).float()


@functools.cache
def dynamic_map() -> torch.Tensor:
    """The 256 signed values of 8-bit dynamic-exponent quantization
    (https://arxiv.org/abs/1511.04561), used for the double-quantized absmax constants:
    for each decade 10^-6 … 10^0, 2^k evenly spaced fractions (k = 0 … 6), both signs,
    plus 0 and 1. Built once: every NF4 forward and backward reads it."""
    values = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1, 2**k + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        values += mids + [-m for m in mids]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` for each value."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(values, midpoints)


def _blockwise(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values padded to whole blocks, (blocks, blocksize), and each block's absmax."""
    padding = (-values.numel()) % blocksize
    blocks = F.pad(values.flatten().float(), (0, padding)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


@dataclass
class NF4State:
    """What `dequantize_nf4` needs besides the packed codes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    absmax: Optional[torch.Tensor] = None  # fp32 per block (no double quantization)
    quant_absmax: Optional[torch.Tensor] = None  # uint8 per block (double quantization)
    absmax_scale: Optional[torch.Tensor] = None  # fp32 per 256 absmax values
    absmax_offset: Optional[torch.Tensor] = None  # fp32 scalar: the mean absmax, subtracted first

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("absmax", "quant_absmax", "absmax_scale", "absmax_offset")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, NF4State]:
    """Packed NF4 codes (uint8, two per byte, the first in the high nibble) and the state."""
    if weight.numel() % 2:
        raise ValueError(f"NF4 packs two weights per byte; a tensor of {weight.numel()} elements cannot be packed")
    blocks, absmax = _blockwise(weight.detach(), blocksize)
    levels = nf4_levels().to(weight.device)
    scaled = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)[:, None]
    codes = _nearest(scaled, levels).to(torch.uint8).flatten()[:weight.numel()]
    packed = (codes[0::2] << 4) | codes[1::2]
    state = NF4State(tuple(weight.shape), weight.dtype, blocksize)
    if double_quant:
        offset = absmax.mean()
        absmax_blocks, absmax_scale = _blockwise(absmax - offset, 256)
        code = dynamic_map().to(weight.device)
        normalized = absmax_blocks / torch.where(absmax_scale == 0, torch.ones_like(absmax_scale), absmax_scale)[:, None]
        state.quant_absmax = _nearest(normalized, code).to(torch.uint8).flatten()[:absmax.numel()]
        state.absmax_scale, state.absmax_offset = absmax_scale, offset
    else:
        state.absmax = absmax
    return packed, state


def nf4_absmax(state: NF4State) -> torch.Tensor:
    if state.absmax is not None:
        return state.absmax
    code = dynamic_map().to(state.quant_absmax.device)
    values = code[state.quant_absmax.long()]
    padding = (-values.numel()) % 256
    scaled = F.pad(values, (0, padding)).view(-1, 256) * state.absmax_scale[:, None]
    return scaled.flatten()[:state.quant_absmax.numel()] + state.absmax_offset


@functools.cache
def nf4_byte_table() -> torch.Tensor:
    """(256, 2): the two NF4 levels each packed byte stands for, high nibble first. One
    lookup per byte decodes both codes: QLoRA dequantizes every weight twice a step."""
    byte = torch.arange(256)
    return torch.stack((nf4_levels()[byte >> 4], nf4_levels()[byte & 0x0F]), dim=-1)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight back from its packed codes, in `dtype` (default: the original dtype)."""
    numel = math.prod(state.shape)
    table = nf4_byte_table().to(packed.device)
    values = F.embedding(packed.int(), table).flatten()[:numel]  # (numel,) levels in [-1, 1]
    if numel % state.blocksize == 0:  # whole blocks: scale in place, no padded copy
        values = values.view(-1, state.blocksize).mul_(nf4_absmax(state)[:, None])
    else:
        blocks, _ = _blockwise(values, state.blocksize)
        values = (blocks * nf4_absmax(state)[:, None]).flatten()[:numel]
    return values.view(state.shape).to(dtype or state.dtype)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized in forward.
    With `backend="bitsandbytes"` the packing and the matmul are bitsandbytes' own."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, blocksize: int = 64,
                 double_quant: bool = True, backend: str = "native", dtype: torch.dtype = torch.float32):
        super().__init__()
        if (in_features * out_features) % blocksize:
            raise ValueError(f"a {out_features}x{in_features} weight does not split into blocks of {blocksize}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.backend, self.dtype = blocksize, double_quant, backend, dtype
        blocks = in_features * out_features // blocksize
        self.register_buffer("packed", torch.zeros(in_features * out_features // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("quant_absmax", torch.zeros(blocks, dtype=torch.uint8))
            self.register_buffer("absmax_scale", torch.zeros(math.ceil(blocks / 256)))
            self.register_buffer("absmax_offset", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.zeros(blocks))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._bnb_state = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    backend: str = "native") -> "Linear4bit":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                    backend, linear.weight.dtype).to(linear.weight.device)
        layer.quantize(linear.weight.data)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer

    def quantize(self, weight: torch.Tensor) -> None:
        packed, state = quantize_nf4(weight, self.blocksize, self.double_quant)
        self.packed.copy_(packed)
        for name, tensor in state.tensors().items():
            getattr(self, name).copy_(tensor)
        self._bnb_state = None

    def state(self) -> NF4State:
        tensors = {name: getattr(self, name) for name in ("absmax", "quant_absmax", "absmax_scale", "absmax_offset")
                   if hasattr(self, name)}
        return NF4State((self.out_features, self.in_features), self.dtype, self.blocksize, **tensors)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nf4(self.packed, self.state(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "bitsandbytes":
            import bitsandbytes as bnb

            packed, state = self._bitsandbytes_state(x.dtype)
            return bnb.matmul_4bit(x, packed.t(), state, bias=None if self.bias is None else self.bias.to(x.dtype))
        out = _DequantizingLinear.apply(x, self)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def _bitsandbytes_state(self, dtype: torch.dtype):
        """bitsandbytes' QuantState over our buffers: the layouts are the same, so the
        packed codes are shared, not copied."""
        if self._bnb_state is None or self._bnb_state[1].dtype != dtype:
            import bitsandbytes.functional as bnbf

            absmax = nf4_absmax(self.state()).float()
            state = bnbf.QuantState(absmax=absmax, shape=torch.Size((self.out_features, self.in_features)),
                                    code=nf4_levels().to(self.packed.device), blocksize=self.blocksize,
                                    quant_type="nf4", dtype=dtype)
            self._bnb_state = (self.packed.view(-1, 1), state)
        return self._bnb_state

    def _apply(self, fn, recurse=True):
        self._bnb_state = None  # device or dtype moves invalidate the cached bitsandbytes state
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, backend={self.backend}")


class _DequantizingLinear(torch.autograd.Function):
    """x Wᵀ with W dequantized from NF4 in forward and again in backward, so autograd never
    holds the full-precision weight between them (that would undo the 4-bit saving)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.layer.dequantized_weight(grad_out.dtype)
        return grad_out @ weight, None


# ---- LoRA ----------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = base(x) + scale · dropout(x) Aᵀ Bᵀ, with A (r × in, Kaiming-uniform) and B
    (out × r, zeros), so the layer equals its base at initialisation."""

    def __init__(self, base: nn.Linear | Linear4bit, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, Linear4bit):
            self.base4bit: Optional[Linear4bit] = base
        else:
            self.base4bit = None
            self.weight = base.weight
            self.weight.requires_grad_(False)
            self.bias = base.bias
            if self.bias is not None:
                self.bias.requires_grad_(False)
        device = base.packed.device if isinstance(base, Linear4bit) else base.weight.device
        self.rank = rank
        self.scale = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base4bit is not None:
            return self.base4bit(x)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.merged:
            return out
        hidden = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        # out + scale · hidden Bᵀ as one addmm: the scale and the sum ride on the matmul
        # instead of two more passes over the (N, out) activations, forward and backward.
        update = torch.addmm(out.reshape(-1, self.out_features), hidden.reshape(-1, self.rank),
                             self.lora_B.to(x.dtype).t(), alpha=self.scale)
        return update.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A, the change LoRA makes to the weight (out × in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the full-precision base weight (idempotent)."""
        if self.base4bit is not None:
            raise ValueError("a 4-bit base cannot absorb the update in place; use merged_state_dict() / "
                             "merge_and_save, which dequantize first")
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (idempotent)."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """The full-precision weight with the update folded in, whatever the base."""
        base = self.base4bit.dequantized_weight(torch.float32) if self.base4bit is not None else self.weight.float()
        return base if self.merged else base + self.delta_weight().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _matches(name: str, patterns: tuple[str, ...]) -> Optional[str]:
    leaf = name.rsplit(".", 1)[-1]
    return next((p for p in patterns if fnmatch.fnmatchcase(leaf, p) or fnmatch.fnmatchcase(name, p)), None)


def target_linears(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The linears (not the output head) that `patterns` select, by name; ValueError naming
    any pattern that matches nothing, and the names the linears have."""
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name != "lm_head"}
    used = {pattern: False for pattern in patterns}
    chosen = {}
    for name, linear in linears.items():
        pattern = _matches(name, patterns)
        if pattern is not None:
            used[pattern] = True
            chosen[name] = linear
    unused = [pattern for pattern, hit in used.items() if not hit]
    if unused:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"LoRA target pattern(s) {', '.join(map(repr, unused))} match no linear layer; "
                         f"linear layers are named: {', '.join(leaves)}")
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace the linears matching `config.target_modules` by `LoRALinear`s (their base in
    NF4 with `quantize_base`), freeze everything else, and return the adapted names. The
    output head, embeddings and norms stay as they are. A pattern that matches nothing
    is an error naming it and the linears there are."""
    linears = target_linears(model, config.target_modules)
    chosen = list(linears)
    backend = resolve_backend(config.quant_backend)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = linears[name]
        base = Linear4bit.from_linear(linear, config.blocksize, config.double_quant, backend) \
            if config.quantize_base else linear
        layer = LoRALinear(base, config.rank, config.alpha, config.dropout, config.use_rslora)
        setattr(parent, child, layer.train(linear.training))  # an eval-mode model stays in eval mode
    mark_only_lora_as_trainable(model)
    return chosen


def resolve_backend(choice: str) -> str:
    if choice != "auto":
        return choice
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "bitsandbytes"
    return "native"


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("lora_A", "lora_B")))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def parameter_report(model: nn.Module) -> dict:
    """Trainable vs total parameters (NF4 weights counted as the parameters they stand for)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    total = sum(p.numel() for p in model.parameters()) + quantized
    return {"trainable": trainable, "total": total, "quantized": quantized, "share": trainable / total if total else 0.0}


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain model's state dict (no LoRA, no NF4) with every update folded in: what
    `Transformer(config).load_state_dict` takes."""
    layers = lora_layers(model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner = next((layer for layer in layers if name.startswith(layer + ".")), None)
        if owner is None:
            state[name] = tensor
            continue
        leaf = name[len(owner) + 1:]
        if leaf == "bias" or leaf == "base4bit.bias":
            state[f"{owner}.bias"] = tensor
        elif leaf == "weight" or leaf == "base4bit.packed":
            state[f"{owner}.weight"] = layers[owner].merged_weight().to(torch.float32)
    return state


# ---- adapters in PEFT's key names -------------------------------------------------------------
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights only, under the keys `peft` uses for a `LlamaForCausalLM`:
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    state = {}
    for name, layer in lora_layers(model).items():
        key = f"{PEFT_PREFIX}model.{name}"
        state[f"{key}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        state[f"{key}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (PEFT key names) into the model's LoRA layers; a missing
    layer or a shape mismatch is an error naming the module and both shapes."""
    layers = lora_layers(model)
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"the adapter has weights for modules this model does not adapt, e.g. {unexpected[0]}")
    if missing:
        raise ValueError(f"the adapter lacks weights for {len(missing)} adapted module(s), e.g. {missing[0]}")
    for key, tensor in state.items():
        module_name = key[len(PEFT_PREFIX) + len("model."):].rsplit(".", 2)[0]
        which = "lora_A" if ".lora_A." in key else "lora_B"
        target = getattr(layers[module_name], which)
        if tensor.shape != target.shape:
            raise ValueError(f"adapter shape mismatch at {module_name}.{which}: the adapter has "
                             f"{tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)


def peft_config(config: LoRAConfig, base_model: Optional[str] = None) -> dict:
    """`adapter_config.json` in PEFT's format."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "target_modules": list(config.target_modules), "bias": "none",
            "use_rslora": config.use_rslora, "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": base_model}


def config_from_peft(values: dict) -> LoRAConfig:
    if values.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter type {values.get('peft_type')!r} is not LoRA")
    targets = values.get("target_modules") or list(DEFAULT_TARGETS)
    return LoRAConfig(rank=values["r"], alpha=float(values["lora_alpha"]), dropout=float(values.get("lora_dropout", 0.0)),
                      target_modules=tuple([targets] if isinstance(targets, str) else targets),
                      use_rslora=bool(values.get("use_rslora", False)))
