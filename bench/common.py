"""Helpers shared by the benchmarks (run them from the repository root as `python -m bench.NAME`): thread pinning, a matmul peak, peers from transformers."""

from __future__ import annotations

import statistics
import time

import torch

from export import hf_config, to_hf_state_dict
from model import Transformer


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                      sizes: tuple[int, ...] = (1024, 2048), seconds: float = 1.5) -> float:
    """Best FLOP/s of square matmuls on this device: the roofline MFU is measured against."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_peer(model: Transformer, training: bool = True):
    """`transformers.LlamaForCausalLM` at the identical configuration with identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = hf_config(model.config)
    values.pop("architectures"), values.pop("model_type"), values.pop("torch_dtype")
    values["use_cache"] = not training
    config = LlamaConfig(**values)
    config._attn_implementation = "sdpa"
    peer = LlamaForCausalLM(config)
    peer.load_state_dict(to_hf_state_dict(model), strict=not model.config.tie_embeddings)
    if model.config.tie_embeddings:
        peer.tie_weights()
    return peer.to(next(model.parameters()).device)


def median(values: list[float]) -> float:
    return statistics.median(values)
