"""LoRA / QLoRA memory and speed for a ~100M-parameter configuration.

1. Weight memory: fp32 vs bf16 vs NF4 (double quantization) for the linears QLoRA
   quantizes, and for the whole model (embedding and norms stay in full precision).
2. Trainable share with rank 16 on all linears.
3. Peak memory of a training step (forward + backward + AdamW) for full fine-tuning,
   LoRA and QLoRA: process RSS on CPU sampled every 2 ms, each variant in its own
   process (the model is built on the meta device and materialised in place, so the
   fp32 weights QLoRA quantizes away are not counted twice).
4. Step time of LoRA vs QLoRA with the native NF4 path and with bitsandbytes' kernels.

    python -m bench.bench_lora [--batch-size 2 --seq-len 128 --steps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time

import psutil
import torch

from bench.common import median
from lora import Linear4bit, LoRAConfig, apply_lora, parameter_report
from model import ModelConfig, Transformer, rope_cache

CONFIG = dict(vocab_size=32000, num_dims=768, num_heads=12, num_kv_heads=4, num_layers=12, ffn_hidden_dims=2048,
              context_len=512)
VARIANTS = {"full": None, "lora": LoRAConfig(rank=16, dropout=0.0),
            "qlora-native": LoRAConfig(rank=16, dropout=0.0, quantize_base=True, quant_backend="native"),
            "qlora-bitsandbytes": LoRAConfig(rank=16, dropout=0.0, quantize_base=True, quant_backend="bitsandbytes")}


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values()
               if not any(t is b for b in (getattr(model, "rope_cos", None), getattr(model, "rope_sin", None))))


def memory_report() -> None:
    config = ModelConfig(**CONFIG)
    model = Transformer(config)
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    fp32 = weight_bytes(model)
    rest = fp32 - 4 * linear_params
    apply_lora(model, LoRAConfig(rank=16, quantize_base=True))
    nf4_linears = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, Linear4bit)
                      for b in m.buffers())
    report = parameter_report(model)
    print(f"configuration: {config.num_params() / 1e6:.1f}M parameters, {linear_params / 1e6:.1f}M of them in the "
          f"{7 * config.num_layers} linears QLoRA quantizes")
    print(f"linears:     fp32 {4 * linear_params / 2**20:7.1f} MB, bf16 {2 * linear_params / 2**20:7.1f} MB, "
          f"NF4+DQ {nf4_linears / 2**20:7.1f} MB = {nf4_linears / (4 * linear_params):.3f}x fp32, "
          f"{8 * nf4_linears / linear_params:.3f} bits per parameter")
    print(f"whole model: fp32 {fp32 / 2**20:7.1f} MB, bf16 {fp32 / 2 / 2**20:7.1f} MB, "
          f"NF4 linears + fp32 rest {(nf4_linears + rest) / 2**20:7.1f} MB = {(nf4_linears + rest) / fp32:.3f}x fp32")
    print(f"LoRA rank 16 on all linears: {report['trainable']:,} trainable of {report['total']:,} "
          f"({report['share']:.2%})")


class RssSampler:
    """The highest resident set size seen while active, sampled every 2 ms."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_variant(name: str, batch_size: int, seq_len: int, steps: int) -> dict:
    """One variant in this process: memory held by the model, the peak during training
    steps (both as RSS above the process after imports) and the median step time."""
    torch.manual_seed(0)
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    with torch.device("meta"):  # build without allocating, then materialise (and quantize) layer by layer
        model = Transformer(ModelConfig(**CONFIG))
    model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_cache(model.config.head_dim, model.config.context_len, model.config.rope_theta)
    model.apply(model._init_weights)
    if VARIANTS[name] is not None:
        apply_lora(model, VARIANTS[name])
    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, CONFIG["vocab_size"], (batch_size, seq_len))
    held = psutil.Process().memory_info().rss
    times = []
    with RssSampler() as sampler:
        for _ in range(steps + 1):
            start = time.perf_counter()
            _, loss, _ = model(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    mb = 2**20
    return {"variant": name, "model_mb": (held - baseline) / mb, "peak_mb": (sampler.peak - baseline) / mb,
            "step_s": median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch_size, args.seq_len, args.steps)))
        return
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} device=cpu")
    memory_report()
    print(f"training step, batch {args.batch_size} x {args.seq_len} (median of {args.steps}), each variant in its "
          f"own process:")
    results = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "bench.bench_lora", "--variant", name, "--batch-size",
                              str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:>19}: model + optimizer {r['model_mb']:6.0f} MB, peak during steps {r['peak_mb']:6.0f} MB "
              f"(RSS above the process after imports), step {r['step_s']:.2f} s", flush=True)
    lora = results["lora"]["step_s"]
    print(f"QLoRA step time / LoRA: native {results['qlora-native']['step_s'] / lora:.2f}x, "
          f"bitsandbytes {results['qlora-bitsandbytes']['step_s'] / lora:.2f}x")


if __name__ == "__main__":
    main()
