"""LoRA / QLoRA fine-tuning: ours against `transformers` + `peft` (+ `bitsandbytes` 4-bit)
on the same Hugging Face directory.

The directory holds a SmolLM-135M-shaped Llama (vocab 49152, 576 wide, 30 layers, 9 / 3
heads, FFN 1536, tied embeddings) with random weights, written by
`LlamaForCausalLM.save_pretrained` (or pass `--hf-dir`). Ours loads it with
`export.load_hf`; the peers with `from_pretrained`. Rank 16 on all seven linears of each
block, AdamW, fp32; one step is forward + loss (mean over the non-ignored next-token
labels, the same for both) + backward + AdamW.

1. Weight memory of the quantized linears: fp32 vs bf16 vs NF4 (double quantization).
2. Step time: ours and the peer alternate step by step in one process (LoRA: ours vs
   peft; QLoRA: ours with native NF4 vs peft + bitsandbytes NF4), medians, tokens/s;
   also the process CPU time per step, steadier than wall time on a shared machine.
3. Peak memory: each contender in its own process, the highest RSS (sampled every 2 ms)
   during the steps, above the process's RSS after its imports.

    python -m bench.bench_lora [--batch-size 4 --seq-len 128 --steps 4 --dropout 0.05]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from bench.common import median

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOLLM_135M = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True,
                   max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
PAIRS = {"LoRA": ("ours-lora", "peft-lora"), "QLoRA": ("ours-qlora", "peft-bnb-qlora")}


def write_hf_dir(path: Path) -> Path:
    """A random-weight SmolLM-135M-shaped LlamaForCausalLM saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM_135M)).save_pretrained(path)
    return path


def batch(vocab_size: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and our next-token targets (the last position has none: -100)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    y = torch.cat((x[:, 1:], torch.full((batch_size, 1), -100)), dim=1)
    return x, y


def build(name: str, hf_dir: Path, seq_len: int, dropout: float):
    """(model, step function) for one contender; the step returns the loss."""
    if name.startswith("ours"):
        from export import load_hf
        from lora import LoRAConfig, apply_lora

        model = load_hf(hf_dir, context_len=seq_len)
        apply_lora(model, LoRAConfig(rank=16, alpha=32, dropout=dropout, target_modules=TARGETS,
                                     quantize_base=name == "ours-qlora", quant_backend="native"))
    else:
        import transformers
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        transformers.logging.set_verbosity_error()
        options = {}
        if name == "peft-bnb-qlora":
            options = dict(device_map="cpu", quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32))
        base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **options)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                                target_modules=list(TARGETS)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        if name.startswith("ours"):
            _, loss, _ = model(x, y)
        else:
            loss = model(input_ids=x, labels=x).loss  # shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


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


def measure_memory(name: str, args) -> dict:
    """One contender in this process: RSS held after loading, and the peak during steps."""
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    model, step = build(name, args.hf_dir, args.seq_len, args.dropout)
    x, y = batch(model.config.vocab_size, args.batch_size, args.seq_len)
    gc.collect()
    held = psutil.Process().memory_info().rss
    with RssSampler() as sampler:
        losses = [step(x, y) for _ in range(2)]  # the second step runs with the optimizer state allocated
    mb = 2**20
    return dict(name=name, held_mb=(held - baseline) / mb, peak_mb=(sampler.peak - baseline) / mb, loss=losses[0])


def measure_speed(pair: str, args) -> dict:
    """The pair's two contenders in this process, alternating step by step."""
    contenders = {name: build(name, args.hf_dir, args.seq_len, args.dropout)[1] for name in PAIRS[pair]}
    x, y = batch(SMOLLM_135M["vocab_size"], args.batch_size, args.seq_len)
    first = {name: step(x, y) for name, step in contenders.items()}  # warm-up; B = 0, so both see the base
    times = {name: [] for name in contenders}
    cpu_times = {name: [] for name in contenders}
    for _ in range(args.steps):
        for name, step in contenders.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step(x, y)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return dict(pair=pair, first_loss=first, step_s={name: median(t) for name, t in times.items()},
                cpu_s={name: median(t) for name, t in cpu_times.items()}, all_s=times)


def memory_report(hf_dir: Path) -> None:
    from export import load_hf
    from lora import Linear4bit, LoRAConfig, apply_lora, parameter_report

    model = load_hf(hf_dir, context_len=128)
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    apply_lora(model, LoRAConfig(rank=16, target_modules=TARGETS, quantize_base=True, quant_backend="native"))
    nf4 = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, Linear4bit) for b in m.buffers())
    report = parameter_report(model)
    print(f"model: {report['total'] / 1e6:.1f}M parameters, {linear_params / 1e6:.1f}M in the "
          f"{sum(isinstance(m, Linear4bit) for m in model.modules())} linears QLoRA quantizes: fp32 "
          f"{4 * linear_params / 2**20:.1f} MB, bf16 {2 * linear_params / 2**20:.1f} MB, NF4+DQ {nf4 / 2**20:.1f} MB "
          f"({nf4 / (4 * linear_params):.3f}x fp32, {8 * nf4 / linear_params:.3f} bits per parameter)")
    print(f"LoRA rank 16 on all linears: {report['trainable']:,} trainable ({report['share']:.2%})")


def child(args, *flags: str) -> dict:
    command = [sys.executable, "-m", "bench.bench_lora", "--hf-dir", str(args.hf_dir), "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--dropout", str(args.dropout), *flags]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        return dict(error=(out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", type=Path, default=None, help="a Llama HF directory (default: a random "
                        "SmolLM-135M-shaped one in a temporary directory)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per contender (after one warm-up)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout, both sides")
    parser.add_argument("--pairs", default="LoRA,QLoRA")
    parser.add_argument("--speed", default=None, help=argparse.SUPPRESS)  # internal: one pair, JSON out
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)  # internal: one contender, JSON out
    args = parser.parse_args()
    if args.speed or args.memory:
        print(json.dumps(measure_speed(args.speed, args) if args.speed else measure_memory(args.memory, args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        if args.hf_dir is None:
            args.hf_dir = write_hf_dir(Path(scratch) / "smollm-135m-random")
        import bitsandbytes
        import peft
        import transformers

        print(f"threads={torch.get_num_threads()} torch={torch.__version__} transformers={transformers.__version__} "
              f"peft={peft.__version__} bitsandbytes={bitsandbytes.__version__} batch={args.batch_size}x{args.seq_len} "
              f"dropout={args.dropout}")
        memory_report(args.hf_dir)
        tokens = args.batch_size * args.seq_len
        for pair in args.pairs.split(","):
            ours, peer = PAIRS[pair]
            speed = child(args, "--speed", pair)
            memory = {name: child(args, "--memory", name) for name in (ours, peer)}
            for name in (ours, peer):
                if "error" in memory[name] or "error" in speed:
                    print(f"{name:>15}: failed: {memory[name].get('error') or speed.get('error')}")
                    continue
                step_s = speed["step_s"][name]
                steps = ", ".join(f"{t:.1f}" for t in speed["all_s"][name])
                print(f"{name:>15}: {step_s:6.2f} s/step ({steps}; CPU {speed['cpu_s'][name]:.2f} s), "
                      f"{tokens / step_s:6.1f} tokens/s, peak {memory[name]['peak_mb']:6.0f} MB (held after loading "
                      f"{memory[name]['held_mb']:5.0f} MB), first loss {speed['first_loss'][name]:.4f}", flush=True)
            if "error" not in speed and not any("error" in m for m in memory.values()):
                print(f"{pair}: ours / peer speed {speed['step_s'][peer] / speed['step_s'][ours]:.2f}x "
                      f"(CPU time {speed['cpu_s'][peer] / speed['cpu_s'][ours]:.2f}x), "
                      f"peak memory {memory[ours]['peak_mb'] / memory[peer]['peak_mb']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
