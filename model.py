"""A Llama-style decoder-only Transformer: GQA, RoPE, RMSNorm, SwiGLU, optional MoE.

Module and parameter names follow Hugging Face's Llama layout (`embed_tokens`,
`layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...) so weights map to and from
`transformers.LlamaForCausalLM` by name alone (see export.py), and LoRA adapters use
the key names `peft` expects.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from config_io import ConfigIO, described


@dataclass
class ModelConfig(ConfigIO):
    """Shape and options of a `Transformer`. Field names follow LightLM's ModelConfig."""

    section: ClassVar[str] = "model"

    vocab_size: int = described(8192, "tokens in the vocabulary")
    num_dims: int = described(256, "model width (embedding size)")
    num_heads: int = described(4, "query heads")
    num_kv_heads: int = described(2, "key/value heads (grouped-query attention)")
    num_layers: int = described(4, "transformer blocks")
    ffn_hidden_dims: int = described(688, "hidden width of the SwiGLU feed-forward (per expert with MoE)")
    context_len: int = described(256, "longest sequence the model accepts")
    rmsnorm_eps: float = described(1e-5, "epsilon inside RMSNorm")
    rope_theta: float = described(10000.0, "RoPE base frequency")
    rope_scaling: Optional[dict] = described(None, 
        "Llama 3 RoPE frequency scaling: {'rope_type': 'llama3', 'factor', 'low_freq_factor', "
        "'high_freq_factor', 'original_max_position_embeddings'}; empty for none")
    use_cache: bool = described(True, "use the KV cache when generating")
    use_moe: bool = described(False, "mixture-of-experts feed-forward")
    moe_num_experts: int = described(4, "experts per MoE layer")
    moe_active_experts: int = described(2, "experts each token is routed to (top-k)")
    moe_eps: float = described(1e-6, "epsilon when renormalising the top-k gates")
    moe_aux_loss_coef: float = described(0.01, "weight of the Switch-Transformer load-balancing loss (not used with loss-free balancing)")
    use_lossfreebalance: bool = described(False, "DeepSeek-V3 auxiliary-loss-free balancing: a per-expert selection bias instead of the aux loss")
    moe_bias_update_rate: float = described(1e-3, "step size of the loss-free balancing bias update")
    tie_embeddings: bool = described(True, "share the token embedding with the output head")

    def __post_init__(self) -> None:
        positive = ("vocab_size", "num_dims", "num_heads", "num_kv_heads", "num_layers",
                    "ffn_hidden_dims", "context_len", "moe_num_experts", "moe_active_experts")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive integer")
        for name in ("rmsnorm_eps", "rope_theta", "moe_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a finite positive number")
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a finite number >= 0")
        if self.num_dims % self.num_heads:
            raise ValueError(f"ModelConfig.num_dims={self.num_dims}: must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads}: must divide "
                             f"num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.num_dims={self.num_dims}: head dim num_dims/num_heads="
                             f"{self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            required = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if not isinstance(self.rope_scaling, dict) or self.rope_scaling.get("rope_type") != "llama3" \
                    or not required <= set(self.rope_scaling):
                raise ValueError(f"ModelConfig.rope_scaling={self.rope_scaling!r}: must be None or a dict with "
                                 f"rope_type='llama3' and {', '.join(sorted(required))}")
        if self.moe_active_experts > self.moe_num_experts:
            raise ValueError(f"ModelConfig.moe_active_experts={self.moe_active_experts}: must be "
                             f"between 1 and moe_num_experts={self.moe_num_experts}")

    @property
    def head_dim(self) -> int:
        return self.num_dims // self.num_heads

    # ---- presets and serialisation -------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A preset by name (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- size and cost ------------------------------------------------------------
    def _layer_params(self, experts: int, norms: bool = True) -> int:
        kv_dims = self.num_kv_heads * self.head_dim
        attention = 2 * self.num_dims * self.num_dims + 2 * self.num_dims * kv_dims
        ffn = 3 * self.num_dims * self.ffn_hidden_dims
        if self.use_moe:
            ffn = experts * ffn + self.num_dims * self.moe_num_experts  # experts + router
        return attention + ffn + (2 * self.num_dims if norms else 0)  # + two RMSNorm weights

    def num_params(self, active: bool = False) -> int:
        """Parameter count; `active=True` counts only the experts a token uses (MoE)."""
        experts = self.moe_active_experts if active else self.moe_num_experts
        embedding = self.vocab_size * self.num_dims
        head = 0 if self.tie_embeddings else embedding
        return embedding + head + self.num_layers * self._layer_params(experts) + self.num_dims

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token: 6N over the matmul weights (the embedding lookup is
        free, the output head is not) plus PaLM's attention term 12·L·H·Q·T
        (https://arxiv.org/abs/2204.02311, appendix B; counts the full, not causal, T×T)."""
        seq_len = self.context_len if seq_len is None else seq_len
        matmul_params = self.num_layers * self._layer_params(self.moe_active_experts, norms=False)
        matmul_params += self.vocab_size * self.num_dims  # output head
        attention = 12 * self.num_layers * self.num_dims * seq_len
        return 6 * matmul_params + attention


PRESETS: dict[str, dict] = {
    # For tests: builds and runs in milliseconds.
    "tiny": dict(vocab_size=64, num_dims=32, num_heads=4, num_kv_heads=2, num_layers=2,
                 ffn_hidden_dims=64, context_len=16),
    # Sizes below assume the default 8192-token BPE vocabulary.
    "1M": dict(vocab_size=8192, num_dims=96, num_heads=3, num_kv_heads=1, num_layers=2,
               ffn_hidden_dims=256, context_len=256),
    "2M": dict(vocab_size=8192, num_dims=128, num_heads=4, num_kv_heads=2, num_layers=4,
               ffn_hidden_dims=352, context_len=256),
    "5M": dict(vocab_size=8192, num_dims=256, num_heads=4, num_kv_heads=2, num_layers=4,
               ffn_hidden_dims=688, context_len=256),
    "15M": dict(vocab_size=8192, num_dims=384, num_heads=6, num_kv_heads=2, num_layers=8,
                ffn_hidden_dims=1024, context_len=512),
    "30M": dict(vocab_size=8192, num_dims=512, num_heads=8, num_kv_heads=4, num_layers=9,
                ffn_hidden_dims=1408, context_len=512),
    "60M": dict(vocab_size=8192, num_dims=640, num_heads=10, num_kv_heads=5, num_layers=12,
                ffn_hidden_dims=1728, context_len=1024),
    "125M": dict(vocab_size=32000, num_dims=768, num_heads=12, num_kv_heads=4, num_layers=12,
                 ffn_hidden_dims=3072, context_len=1024),
}


# ---- building blocks ------------------------------------------------------------------
def _eager_fp32_training(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> bool:
    """Whether the hand-written autograd functions below apply: an fp32 forward in eager
    mode that autograd records, outside autocast (whose casts they do not repeat in
    backward). Under torch.compile the compiler fuses the plain code itself."""
    return x.dtype == torch.float32 and torch.is_grad_enabled() and not torch.compiler.is_compiling() \
        and not torch.is_autocast_enabled(x.device.type) and (x.requires_grad or any(w.requires_grad for w in weights))


class RMSNorm(nn.Module):
    """Root-mean-square norm (https://arxiv.org/abs/1910.07467), computed in fp32 as Llama does."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _eager_fp32_training(x, (self.weight,)):  # CUDA has a fused kernel
            return _RMSNorm.apply(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.size(-1),), None, self.eps).to(x.dtype)
        return self.weight * normed


class _RMSNorm(torch.autograd.Function):
    """fp32 RMSNorm for CPU training with a hand-written backward. On CPU `F.rms_norm` is
    composed of pow, mean, rsqrt and two multiplications, and autograd then runs each
    one's backward with a fresh activation-sized tensor apiece; here the forward is one
    reduction and two passes, and the backward six passes with two new tensors (the
    per-row sums come from `vecdot` and a matrix-vector product, without temporaries).
    With x̂ = x·r, r = (mean(x²) + eps)^-½ and g = dy·w:
    dx = r·g - x·r³·mean(g·x), dw = Σ_rows dy·x̂."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))  # (n, C)
        rstd = (torch.linalg.vecdot(rows, rows).div_(rows.size(1)).add_(eps).rsqrt_()).unsqueeze(1)  # (n, 1)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return torch.mul(rows, rstd).mul_(weight).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dy = grad_out.reshape(rows.shape)
        d_x = d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = rstd.t().mm(dy * rows).squeeze(0)  # Σ_n r_n·dy_n·x_n
        if ctx.needs_input_grad[0]:
            g = dy * weight
            coefficient = torch.linalg.vecdot(g, rows).unsqueeze(1).mul_(rstd.pow(3)).div_(rows.size(1))  # (n, 1)
            d_x = g.mul_(rstd).addcmul_(rows, coefficient, value=-1.0).view(ctx.shape)
        return d_x, d_weight, None


def llama3_scaled_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's long-context RoPE (https://arxiv.org/abs/2407.21783): wavelengths longer
    than the original context / low_freq_factor are slowed by `factor`, shorter than
    context / high_freq_factor are kept, and those between are interpolated."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(between, interpolated, scaled)


def rope_cache(head_dim: int, max_len: int, theta: float,
               scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) for RoPE (https://arxiv.org/abs/2104.09864) in the
    half-split layout of Hugging Face's Llama: frequencies repeated for both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


class _Rope(torch.autograd.Function):
    """Rotary embedding in Hugging Face's half-split layout: with x = (x1, x2) and the
    halves' tables c, s, out = (x1·c - x2·s, x2·c + x1·s). Written into the two halves of
    one output with four half-size kernels each way; the rotate_half form (cat, neg, two
    muls, add) takes more passes over the activations, and more again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, sign=-1.0), None, None  # the inverse rotation


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin with rotate_half(x) = cat(-x2, x1), as
    `transformers`' Llama computes it. x: (B, nh, T, hs); cos, sin: (T, hs) from `rope_cache`."""
    half = x.size(-1) // 2
    if torch.compiler.is_compiling():  # the compiler fuses the plain formula into one loop each way
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    if not (torch.is_grad_enabled() and x.requires_grad):  # decoding: no autograd node to build
        return _rotate(x, cos[..., :half], sin[..., :half], sign=1.0)
    return _Rope.apply(x, cos[..., :half], sin[..., :half])  # both halves of the tables are equal


IGNORE_INDEX = -100

_workspace = threading.local()  # per thread: a reused fp32 logits buffer for each device


def _logits_buffer(rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, columns) fp32 scratch buffer on like's device. On CPU one buffer per thread
    and device is kept and reused: a fresh chunk of logits is tens of megabytes, which the C
    allocator maps from (and returns to) the kernel every time, so that every step would pay
    a page fault per 4 KiB of it (measured: 8,192 faults and ~16 ms per 32 MB chunk on the
    2-core EPYC). CUDA's caching allocator already reuses memory, so there a plain empty."""
    if like.device.type != "cpu":
        return torch.empty(rows, columns, device=like.device, dtype=torch.float32)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buffer = buffers.get(like.device)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = buffers[like.device] = torch.empty(rows * columns, device=like.device, dtype=torch.float32)
    return buffer[:rows * columns].view(rows, columns)


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                           grad_hidden: bool, grad_weight: bool):
    """Summed cross-entropy of `hidden @ weightᵀ` against `targets`, `chunk_rows` rows at
    a time, and (if asked) its gradients for hidden and weight from the same chunks. Each
    chunk's logits live in one reused fp32 buffer and become their own gradient in place
    (subtract the row max, exp, sum, scale: four passes, no temporaries)."""
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = None  # the first chunk's product, then accumulated
    total = hidden.new_zeros((), dtype=torch.float32)
    buffer = _logits_buffer(min(chunk_rows, targets.numel()), weight.size(0), hidden)
    # fp32 outside autocast: matmuls straight into the buffers; otherwise in the compute
    # dtype (autocast's or the weights'), converted.
    plain = hidden.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
    for start in range(0, targets.numel(), chunk_rows):
        rows = hidden[start:start + chunk_rows]  # (n, C)
        target = targets[start:start + chunk_rows, None]  # (n, 1)
        logits = buffer[:rows.size(0)]  # (n, V), fp32
        if plain:
            torch.mm(rows, weight.t(), out=logits)
        else:
            logits.copy_(F.linear(rows, weight))
        row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        target_logit = logits.gather(1, target)  # (n, 1), before the buffer is overwritten
        exp_sum = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)  # logits now exp(l - max)
        total += (row_max + exp_sum.log() - target_logit).sum()  # log-sum-exp - target logit
        if not (grad_hidden or grad_weight):
            continue
        # d(summed loss)/d logits = softmax - one_hot(target)
        dlogits = logits.div_(exp_sum).scatter_add_(1, target, logits.new_full(target.shape, -1.0))
        dlogits = dlogits.to(rows.dtype)
        if grad_hidden and plain:
            torch.mm(dlogits, weight, out=d_hidden[start:start + chunk_rows])
        elif grad_hidden:
            d_hidden[start:start + chunk_rows] = dlogits @ weight
        if grad_weight and d_weight is None:
            d_weight = (dlogits.t() @ rows).float()  # (V, C); a no-op .float() in fp32
        elif grad_weight and plain:
            d_weight.addmm_(dlogits.t(), rows)
        elif grad_weight:
            d_weight += (dlogits.t() @ rows).float()
    return total, d_hidden, d_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weightᵀ` with the gradients computed in the forward
    pass, chunk by chunk: the (N, V) logits, their log-softmax and their gradient never
    exist at once, only a (rows, V) chunk (as in Liger's fused linear cross-entropy,
    https://arxiv.org/abs/2410.10989); backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int) -> torch.Tensor:
        total, d_hidden, d_weight = _chunked_cross_entropy(hidden, weight, targets, chunk_rows,
                                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.count, ctx.weight_dtype, ctx.used = targets.numel(), weight.dtype, False
        return total / ctx.count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("backward ran twice through linear_cross_entropy: its stored gradients are "
                               "scaled in place, so compute the loss again instead of retain_graph=True")
        ctx.used = True
        d_hidden, d_weight = ctx.saved_tensors
        scale = grad_loss / ctx.count
        # Scaled in place: a fresh copy of the (V, C) weight gradient would be a large new
        # allocation every step (on CPU, page faults on all of it).
        d_hidden = None if d_hidden is None else d_hidden.mul_(scale.to(d_hidden.dtype))
        d_weight = None if d_weight is None else d_weight.mul_(scale).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None


@torch.compiler.disable  # under torch.compile the loss runs as written (its buffers, its in-place gradient)
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_elements: int = 1 << 23) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100)`, the
    mean over the non-ignored targets, without materialising the (N, V) logits: only
    positions with a target are projected, about `chunk_elements` logits at a time.
    hidden (N, C), weight (V, C), targets (N,)."""
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    if keep.numel() < targets.numel():
        hidden, targets = hidden[keep], targets[keep]  # (M, C), (M,)
    if targets.numel() == 0:  # nothing to predict: F.cross_entropy's NaN, still part of the graph
        return F.cross_entropy(F.linear(hidden, weight).float(), targets)
    chunk_rows = max(1, chunk_elements // weight.size(0))
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _chunked_cross_entropy(hidden, weight, targets, chunk_rows, False, False)[0] / targets.numel()
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def shared_input_linears(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """Each linear applied to x. While training plain bias-free `nn.Linear`s in fp32 eager
    mode, through `_SharedInputLinears`: x's gradient is accumulated by each matmul into one
    tensor instead of being summed from one tensor per linear. Otherwise (LoRA, NF4, no
    autograd, autocast, or torch.compile, which plans the graph itself) one call each."""
    if all(type(m) is nn.Linear and m.bias is None for m in linears):
        if _eager_fp32_training(x, tuple(m.weight for m in linears)):
            return _SharedInputLinears.apply(x, *(m.weight for m in linears))
        if not torch.is_grad_enabled() and (joined := _side_by_side([m.weight for m in linears])) is not None:
            return F.linear(x, joined).split([m.out_features for m in linears], dim=-1)
    return tuple(m(x) for m in linears)


def _side_by_side(weights: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The weights (outᵢ, in) as one (Σ outᵢ, in) weight, if they are consecutive blocks of
    one column-major buffer (as `Transformer._decoding_layout` stores them); else None."""
    first = weights[0]
    if len(weights) < 2 or first.dim() != 2 or first.stride(0) != 1:
        return None
    offset, storage = first.storage_offset(), first.untyped_storage().data_ptr()
    for weight in weights:
        if weight.stride() != first.stride() or weight.size(1) != first.size(1) \
                or weight.untyped_storage().data_ptr() != storage or weight.storage_offset() != offset:
            return None
        offset += weight.size(0)
    return first.as_strided((offset - first.storage_offset(), first.size(1)), first.stride(), first.storage_offset())


class _SharedInputLinears(torch.autograd.Function):
    """(x @ W1ᵀ, x @ W2ᵀ, ...) with one backward for all: dx = Σ dyᵢ @ Wᵢ accumulated in
    place by `addmm_` (autograd would give each linear its own dx and add them up), and
    dWᵢ = dyᵢᵀ @ x. No concatenated copy of the weights or of the output gradients is
    made either way (an earlier version concatenated them: one copy of each per step,
    which on CPU also paid page faults for the fresh memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, weight) for weight in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, *weights = ctx.saved_tensors
        rows = x.reshape(-1, x.size(-1))  # (n, in)
        d_x, d_weights = None, []
        for grad, weight, needed in zip(grads, weights, ctx.needs_input_grad[1:]):
            if grad is None:
                d_weights.append(None)
                continue
            grad = grad.reshape(-1, grad.size(-1))  # (n, out)
            if ctx.needs_input_grad[0]:
                d_x = torch.mm(grad, weight) if d_x is None else d_x.addmm_(grad, weight)
            d_weights.append(grad.t().mm(rows) if needed else None)
        if d_x is not None:
            d_x = d_x.view(x.shape)
        return (d_x, *d_weights)


class KVCache(nn.Module):
    """Keys and values of past positions for one attention layer (non-persistent buffers)."""

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        # empty, not zeros: a position is written before it is read (`update` returns only the
        # positions written), and a long context's cache is then not touched beyond its use
        self.register_buffer("k", torch.empty(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.empty(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at positions [start_pos, start_pos+T); return all keys
        and values up to start_pos+T."""
        end = start_pos + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"positions up to {end - 1} do not fit a KV cache of {self.k.size(2)}; "
                             f"set it up longer (setup_kv_cache max_len)")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal grouped-query attention (https://arxiv.org/abs/2305.13245) with RoPE."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.use_flash = True  # scaled_dot_product_attention; False: explicit matmul-softmax (Transformer.set_runtime)
        kv_dims = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.num_dims, config.num_dims, bias=False)
        self.k_proj = nn.Linear(config.num_dims, kv_dims, bias=False)
        self.v_proj = nn.Linear(config.num_dims, kv_dims, bias=False)
        self.o_proj = nn.Linear(config.num_dims, config.num_dims, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = shared_input_linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)  # (B, nkv, start_pos+T, hs)
        y = self._attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o_proj(y)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, nh, T, hs), k and v (B, nkv, S, hs): each key/value head serves
        nh / nkv query heads."""
        T, S = q.size(2), k.size(2)
        groups = self.num_heads // self.num_kv_heads
        # Query i sits at absolute position S - T + i and sees keys 0..S-T+i.
        mask = None
        if T > 1 and S > T:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        if self.use_flash:  # enable_gqa: the kernel indexes the shared heads, no repeated copies
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T > 1 and S == T),
                                                  enable_gqa=groups > 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, S)
        if T > 1:
            if mask is None:
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
        return weights @ v  # (B, nh, T, hs)


class FeedForward(nn.Module):
    """SwiGLU feed-forward (https://arxiv.org/abs/2002.05202)."""

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linears = (self.gate_proj, self.up_proj, self.down_proj)
        if all(type(m) is nn.Linear and m.bias is None for m in linears) \
                and _eager_fp32_training(x, tuple(m.weight for m in linears)):
            return _SwiGLU.apply(x, *(m.weight for m in linears))
        gate, up = shared_input_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class _SwiGLU(torch.autograd.Function):
    """down(silu(x @ Wgᵀ) · (x @ Wuᵀ)) with a hand-written backward that works in place on
    the tensors it owns: per step one activation-sized tensor fewer kept for backward
    (autograd keeps silu's output too) and two fewer allocated, which on CPU is where
    the elementwise time goes (fresh memory, page faults), not the arithmetic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w_gate), F.linear(x, w_up)
        hidden = F.silu(gate).mul_(up)
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate, up, hidden)
        return F.linear(hidden, w_down)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w_gate, w_up, w_down, gate, up, hidden = ctx.saved_tensors
        rows = x.reshape(-1, x.size(-1))  # (n, C)
        dy = grad_out.reshape(-1, grad_out.size(-1))  # (n, C)
        gate, up = gate.reshape(-1, gate.size(-1)), up.reshape(-1, up.size(-1))  # (n, H)
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad
        d_down = dy.t().mm(hidden.reshape(-1, hidden.size(-1))) if need_down else None
        d_hidden = dy.mm(w_down)  # (n, H), ours to overwrite
        d_up = F.silu(gate).mul_(d_hidden)  # dL/d up = dh · silu(gate)
        d_gate = torch.ops.aten.silu_backward(d_hidden.mul_(up), gate)  # dL/d gate = dh · up · silu'(gate)
        d_x = None
        if need_x:
            d_x = d_gate.mm(w_gate).addmm_(d_up, w_up).view(x.shape)
        return (d_x, d_gate.t().mm(rows) if need_gate else None, d_up.t().mm(rows) if need_up else None, d_down)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (https://arxiv.org/abs/2101.03961 for the router and
    auxiliary loss; https://arxiv.org/abs/2412.19437 section 2.1.2 for loss-free balancing).
    Each expert runs only on the tokens routed to it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_active_experts
        self.eps = config.moe_eps
        self.use_lossfreebalance = config.use_lossfreebalance
        self.gate = nn.Linear(config.num_dims, config.moe_num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(FeedForward(config.num_dims, config.ffn_hidden_dims)
                                     for _ in range(config.moe_num_experts))
        # Selection bias of loss-free balancing: a buffer, saved with the model, never seen
        # by the optimizer; it shifts which experts are chosen, not the gate values.
        self.register_buffer("expert_bias", torch.zeros(config.moe_num_experts))
        # Tokens routed to each expert: in the last forward, and since the last bias update.
        self.register_buffer("last_load", torch.zeros(config.moe_num_experts), persistent=False)
        self.register_buffer("pending_load", torch.zeros(config.moe_num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and the Switch auxiliary loss (f·P summed, times num_experts)."""
        B, T, C = x.size()
        tokens = x.reshape(B * T, C)
        probs = F.softmax(self.gate(tokens).float(), dim=-1)  # (N, E)
        scores = probs + self.expert_bias if self.use_lossfreebalance else probs
        _, chosen = scores.topk(self.top_k, dim=-1)  # (N, k)
        gates = probs.gather(-1, chosen)
        gates = gates / (gates.sum(dim=-1, keepdim=True) + self.eps)  # (N, k)

        load = torch.bincount(chosen.flatten(), minlength=self.num_experts).to(probs.dtype)  # (E,)
        with torch.no_grad():
            self.last_load.copy_(load)
            if self.training:
                self.pending_load.add_(load)

        out = torch.zeros_like(tokens)
        order = chosen.flatten().argsort()  # assignments grouped by expert
        token_of = order // self.top_k
        gate_of = gates.flatten()[order]
        counts = load.long().tolist()
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                idx = token_of[start:start + count]
                y = expert(tokens[idx]) * gate_of[start:start + count, None].to(tokens.dtype)
                out.index_add_(0, idx, y)
            start += count

        fraction = load / (B * T * self.top_k)  # f_e: share of assignments per expert
        aux_loss = self.num_experts * (fraction * probs.mean(dim=0)).sum()
        return out.view(B, T, C), aux_loss

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Loss-free balancing step: raise the bias of under-loaded experts, lower the rest."""
        load = self.pending_load
        if load.sum() > 0:
            self.expert_bias.add_(rate * torch.sign(load.mean() - load))
        load.zero_()


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.num_dims, config.rmsnorm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.num_dims, config.rmsnorm_eps)
        self.mlp = MoE(config) if config.use_moe else FeedForward(config.num_dims, config.ffn_hidden_dims)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, aux_loss = h
        else:
            aux_loss = x.new_zeros((), dtype=torch.float32)
        return x + h, aux_loss


class Transformer(nn.Module):
    """Token embedding → blocks → RMSNorm → LM head (tied to the embedding by default)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.num_dims)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.num_dims, config.rmsnorm_eps)
        self.lm_head = nn.Linear(config.num_dims, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(config.head_dim, config.context_len, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.check_inputs = True  # token-id range check; costs a device sync on CUDA
        self.gradient_checkpointing = False  # how the model computes, not what it is: see set_runtime
        self._held_layout: Optional[list[nn.Parameter]] = None  # weights relaid by `decoding()`, while it lasts
        self.apply(self._init_weights)
        # GPT-2 scaling of the residual projections: std 0.02/sqrt(2·num_layers).
        residual_std = 0.02 / math.sqrt(2 * config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @classmethod
    def uninitialized(cls, config: ModelConfig) -> "Transformer":
        """The model on CPU with its weights allocated but not initialised, to load a
        checkpoint into: a 1.2B-parameter model's random initialisation took 28.5 s here,
        only to be overwritten. Its buffers are those of a new model."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        if config.tie_embeddings:  # `to_empty` gives each module a parameter of its own
            model.lm_head.weight = model.embed_tokens.weight
        model.rope_cos, model.rope_sin = rope_cache(config.head_dim, config.context_len, config.rope_theta,
                                                    config.rope_scaling)
        for moe in model.moe_layers():
            for buffer in (moe.expert_bias, moe.last_load, moe.pending_load):
                buffer.zero_()
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def set_runtime(self, use_flash: Optional[bool] = None, gradient_checkpointing: Optional[bool] = None) -> None:
        """Switches that change how the model computes, not its weights or outputs
        (TrainerConfig holds them): SDPA vs explicit attention, and recomputing each block's
        activations in backward (https://arxiv.org/abs/1604.06174) to save memory."""
        if use_flash is not None:
            for block in self.layers:
                block.self_attn.use_flash = use_flash
        if gradient_checkpointing is not None:
            self.gradient_checkpointing = gradient_checkpointing

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None,
                start_pos: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """input_ids (B, T) → (logits (B, T, V), loss, ce_loss). `targets` are next-token ids
        aligned with the inputs; -100 is ignored. `loss` adds the MoE auxiliary loss. With
        targets the logits are None: the loss is computed without materialising them."""
        x, aux_loss = self._hidden(input_ids, start_pos)  # checks input_ids first
        B, T = input_ids.size()
        if targets is None:
            return self.lm_head(x), None, None  # (B, T, V)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            logits = None  # not materialised: the loss projects only labelled positions, in chunks
            ce_loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T))
        else:  # a wrapped head (e.g. adapted by someone else's code): the plain way
            logits = self.lm_head(x)
            ce_loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX)
        loss = ce_loss
        if self.config.use_moe and not self.config.use_lossfreebalance and self.config.moe_aux_loss_coef > 0:
            loss = ce_loss + self.config.moe_aux_loss_coef * aux_loss / self.config.num_layers
        return logits, loss, ce_loss

    def _hidden(self, input_ids: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The final normed hidden states (B, T, C) and the summed MoE auxiliary loss."""
        self._check_input(input_ids, start_pos)
        T = input_ids.size(1)
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        x = self.embed_tokens(input_ids)  # (B, T, C)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, block_aux = checkpoint(block, x, cos, sin, start_pos, use_reentrant=False)
            else:
                x, block_aux = block(x, cos, sin, start_pos)
            aux_loss = aux_loss + block_aux
        return self.norm(x), aux_loss

    def _check_input(self, input_ids: torch.Tensor, start_pos: int) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        end = start_pos + input_ids.size(1)
        if start_pos < 0 or end > self.config.context_len:
            raise ValueError(f"positions {start_pos}..{end - 1} exceed context_len="
                             f"{self.config.context_len}; crop the sequence or raise context_len")
        if self.check_inputs and input_ids.numel() and not torch.compiler.is_compiling():  # (a sync: a graph break)
            low, high = torch.aminmax(input_ids)
            low, high = int(low), int(high)
            if low < 0 or high >= self.config.vocab_size:
                bad = high if high >= self.config.vocab_size else low
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    # ---- MoE balancing ------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_moe_bias(self, rate: Optional[float] = None) -> None:
        """Loss-free balancing update; the trainer calls it after each optimizer step."""
        if not self.config.use_lossfreebalance:
            return
        rate = self.config.moe_bias_update_rate if rate is None else rate
        for moe in self.moe_layers():
            moe.update_bias(rate)

    def expert_load(self) -> Optional[torch.Tensor]:
        """Tokens routed to each expert in the last forward, (num_layers, num_experts)."""
        layers = self.moe_layers()
        return torch.stack([m.last_load for m in layers]) if layers else None

    # ---- KV cache and generation ----------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_len: Optional[int] = None,
                       device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Allocate a KV cache for `batch_size` sequences of up to `max_len` positions."""
        max_len = self.config.context_len if max_len is None else min(max_len, self.config.context_len)
        weight = self.embed_tokens.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        for block in self.layers:
            block.self_attn.kv_cache = KVCache(batch_size, max_len, self.config.num_kv_heads,
                                               self.config.head_dim, device, dtype)

    def reset_kv_cache(self) -> None:
        """Drop the KV cache; forward passes are uncached again."""
        for block in self.layers:
            block.self_attn.kv_cache = None

    @torch.no_grad()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None,
                        eos_token_id: Optional[int | Sequence[int]] = None, use_cache: Optional[bool] = None,
                        generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
        """Yield the next token ids (B,) one step at a time for equal-length prompts (B, T).
        Temperature 0 is greedy. Stops early once every sequence has produced `eos_token_id`
        (one id or several: Llama 3 ends with any of three; a finished sequence repeats the first).
        When the sequence outgrows context_len, only its last context_len tokens are seen."""
        if input_ids.dim() != 2 or input_ids.size(1) == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, seq_len) tensor, got {tuple(input_ids.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p}: must be in (0, 1]")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}: must be >= 1")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        context_len = self.config.context_len
        was_training = self.training
        self.eval()
        tokens = input_ids
        finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        stops = None if eos_token_id is None else \
            torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
        if stops is not None and stops.numel() == 0:
            stops = None
        cached = 0  # positions already in the KV cache
        relaid = self._decoding_layout() if self._held_layout is None and max_new_tokens >= LAYOUT_MIN_TOKENS else []
        try:
            if use_cache:  # as long as this generation needs (a Llama 3's context_len is 131072)
                self.setup_kv_cache(input_ids.size(0), min(context_len, input_ids.size(1) + max_new_tokens))
            step_weights = self._decode_step_weights() if use_cache else None
            for _ in range(max_new_tokens):
                if use_cache and cached and tokens.size(1) <= context_len:
                    if step_weights is not None and tokens.size(1) - cached == 1:
                        logits = self._decode_step(tokens[:, cached:], cached, step_weights)
                    else:
                        hidden, _ = self._hidden(tokens[:, cached:], start_pos=cached)
                        logits = self.lm_head(hidden[:, -1])  # (B, V): only the last position is sampled
                else:  # first step, no cache, or the window slid past context_len: recompute
                    hidden, _ = self._hidden(tokens[:, -context_len:], start_pos=0)
                    logits = self.lm_head(hidden[:, -1])
                cached = tokens.size(1) if tokens.size(1) <= context_len else 0
                next_token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
                if stops is not None:
                    next_token = torch.where(finished, torch.full_like(next_token, stops[0]), next_token)
                    finished |= torch.isin(next_token, stops)
                tokens = torch.cat((tokens, next_token[:, None]), dim=1)
                yield next_token
                if stops is not None and bool(finished.all()):
                    break
        finally:
            _restore_layout(relaid)
            if use_cache:
                self.reset_kv_cache()
            self.train(was_training)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Hold the decoding layout (`_decoding_layout`) for a block of generations, such as
        a chat: each `generate` call otherwise relays the weights and puts them back, which
        costs more than a short reply gains (see LAYOUT_MIN_TOKENS). Nothing else may use the
        model inside the block. Nested blocks hold it once."""
        if self._held_layout is not None:
            yield
            return
        self._held_layout = self._decoding_layout()
        try:
            yield
        finally:
            held, self._held_layout = self._held_layout, None
            _restore_layout(held)

    def _decoding_layout(self) -> list[nn.Parameter]:
        """On CPU, while decoding, store the linear weights that widen (out >= in) in a
        column-major layout, with the weights that read the same input (q/k/v,
        gate/up) side by side in one buffer: the same values and shapes, but the transpose
        a one-token matmul x @ Wᵀ reads is contiguous, and q/k/v and gate/up become one
        matmul each (`shared_input_linears`). Streaming a weight from memory runs 1.2-2.3×
        faster so (measured on the 2-core EPYC, weights beyond the cache: a (1408, 512)
        weight 7.7 → 12.9 GB/s, the (8192, 512) head 7.4 → 17.0 GB/s); a narrowing one,
        (512, 1408), runs slower (10.4 → 7.6 GB/s) and is left alone. No memory is added
        beyond one group's weights while converting: each weight is copied into the new
        layout once and back (row-major, contiguous) when generation ends. Returns the
        weights changed. Not done on GPUs, nor for distributed models."""
        if self.embed_tokens.weight.device.type != "cpu" or \
                (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return []
        groups: list[tuple[nn.Module, ...]] = [(self.lm_head,)]
        for module in self.modules():
            if isinstance(module, Attention):
                groups += [(module.q_proj, module.k_proj, module.v_proj), (module.o_proj,)]
            elif isinstance(module, FeedForward):
                groups += [(module.gate_proj, module.up_proj), (module.down_proj,)]
        relaid, seen = [], set()
        for group in groups:
            if not all(type(m) is nn.Linear for m in group):  # LoRA, NF4: not theirs to relay
                continue
            weights = [m.weight for m in group]
            if not all(type(w) is nn.Parameter and w.is_contiguous() and id(w) not in seen for w in weights) \
                    or sum(w.size(0) for w in weights) < weights[0].size(1):
                continue
            with torch.inference_mode(False):  # the weights stay ordinary tensors under a caller's inference mode
                joined = torch.cat([w.data for w in weights]) if len(weights) > 1 else weights[0].data
                buffer = joined.t().contiguous()  # (in, Σ out)
                del joined
            start = 0
            for weight in weights:
                weight.data = buffer[:, start:start + weight.size(0)].t()
                start += weight.size(0)
                seen.add(id(weight))
                relaid.append(weight)
        return relaid

    def _decode_step_weights(self) -> Optional[list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]]:
        """Per block, q/k/v and gate/up as one weight each where they sit side by side
        (`_decoding_layout`), else None in their place; None in all if `_decode_step` does
        not apply: it covers dense blocks of plain bias-free linears with SDPA attention,
        and leaves LoRA, NF4, mixture-of-experts and explicit attention to the modules."""
        if self.config.use_moe:
            return None
        weights = []
        for block in self.layers:
            attention, mlp = block.self_attn, block.mlp
            linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if not attention.use_flash or not all(type(m) is nn.Linear and m.bias is None for m in linears):
                return None
            weights.append((_side_by_side([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
                            _side_by_side([mlp.gate_proj.weight, mlp.up_proj.weight])))
        return weights

    def _decode_step(self, token_ids: torch.Tensor, start_pos: int,
                     weights: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]) -> torch.Tensor:
        """The next-token logits (B, V) for one new token per sequence (B, 1) at `start_pos`,
        with the KV cache set up: the blocks' forward written out for this one case, with the
        same operations in the same order (so the same values as `_hidden` + `lm_head`) but
        without their generality: no module dispatch, checks or auxiliary loss per block, and
        RoPE applied to q and k together when they come out of one matmul. On CPU a token's
        small operations cost about as much as a quarter of its matmuls: at 30M this step took
        10.4-11.0 ms a token where the modules took 12.5."""
        config = self.config
        B, heads, kv_heads, head_dim = token_ids.size(0), config.num_heads, config.num_kv_heads, config.head_dim
        half = head_dim // 2
        cos = self.rope_cos[start_pos:start_pos + 1, :half]
        sin = self.rope_sin[start_pos:start_pos + 1, :half]
        x = self.embed_tokens(token_ids)  # (B, 1, C)
        for block, (qkv_weight, gate_up_weight) in zip(self.layers, weights):
            attention, mlp = block.self_attn, block.mlp
            h = block.input_layernorm(x)
            if qkv_weight is not None:  # q and k are adjacent in one output: one rotation for both
                qkv = F.linear(h, qkv_weight)
                qk = _rotate(qkv[..., :(heads + kv_heads) * head_dim].view(B, 1, heads + kv_heads, head_dim),
                             cos, sin, sign=1.0)
                q, k = qk[:, :, :heads], qk[:, :, heads:]
                v = qkv[..., (heads + kv_heads) * head_dim:].view(B, 1, kv_heads, head_dim)
            else:
                q = _rotate(attention.q_proj(h).view(B, 1, heads, head_dim), cos, sin, sign=1.0)
                k = _rotate(attention.k_proj(h).view(B, 1, kv_heads, head_dim), cos, sin, sign=1.0)
                v = attention.v_proj(h).view(B, 1, kv_heads, head_dim)
            keys, values = attention.kv_cache.update(start_pos, k.transpose(1, 2), v.transpose(1, 2))
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=heads != kv_heads)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, -1), attention.o_proj.weight)
            h = block.post_attention_layernorm(x)
            if gate_up_weight is not None:
                gate, up = F.linear(h, gate_up_weight).chunk(2, dim=-1)
            else:
                gate, up = F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight)
            x = x + F.linear(F.silu(gate).mul_(up), mlp.down_proj.weight)
        return self.lm_head(self.norm(x)[:, -1])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int | Sequence[int]] = None, use_cache: Optional[bool] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prompt followed by up to `max_new_tokens` generated ids, (B, T + new)."""
        new = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p,
                                        eos_token_id, use_cache, generator))
        if not new:
            return input_ids
        return torch.cat((input_ids, torch.stack(new, dim=1)), dim=1)


# A generation shorter than this leaves the weights as they are: relaying them there and back
# took ~0.8 s for the 30M preset's 123 MB here (transposing copies run at 0.3-0.6 GB/s, and
# the time grows with the weights as the per-token gain does), paid back at ~5 ms a token
# faster: after ~160 tokens. `Transformer.decoding()` pays it once for many generations.
LAYOUT_MIN_TOKENS = 128


def _restore_layout(weights: list[nn.Parameter]) -> None:
    """Back to the row-major layout after `Transformer._decoding_layout`."""
    with torch.inference_mode(False):  # (a caller's inference mode must not make them inference tensors)
        for weight in weights:
            weight.data = weight.data.contiguous()


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else top-k / nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
