"""Training throughput of our Transformer vs transformers.LlamaForCausalLM.

Identical configuration, weights, batch, sequence length, dtype and thread count; one
step is forward + cross-entropy + backward + AdamW (the fused kernel for both: Sprat's
trainer uses it, and so does transformers' Trainer by default with torch >= 2.8). The two models alternate for
`--repeats` rounds of `--steps` steps each (so both see the same machine conditions);
the median tokens/s of each is reported, the median of the rounds' ratios, and MFU
against a matmul peak measured in the same run.

    python -m bench.bench_train --configs 5M,30M
    python -m bench.bench_train --configs 5M,30M --tuned-allocator

Each configuration runs in a fresh process, as a training run would: glibc's malloc
adapts its thresholds to what a process has freed before, so a configuration measured
after a larger one would see a different allocator (measured after the 30M run in the
same process, the 5M ratio was 1.03; in fresh processes 1.13-1.21). On CPU, a large part of the step outside the matmuls is
fresh memory (page faults) rather than arithmetic; `--tuned-allocator` sets glibc's
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_ for both contenders,
which removes most of them, so the ratio printed then is the one without that effect.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import hf_peer, matmul_peak_flops, median, sync
from model import ModelConfig, Transformer


def autocast(x: torch.Tensor):
    """bf16 autocast on CUDA, as the trainer runs there; fp32 on the CPU, the same precision
    for both contenders (the trainer picks bf16 on a CPU only where it measures faster)."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")


def ours_step(model, optimizer, x, y):
    with autocast(x):
        _, loss, _ = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_step(model, optimizer, x, y):
    with autocast(x):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tokens_per_second(step, model, optimizer, x, y, steps: int, device) -> tuple[float, float]:
    """Tokens per second of wall time and per second of this process's CPU time (the
    latter is steadier on a machine other work shares)."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(model, optimizer, x, y)
    sync(device)
    return steps * x.numel() / (time.perf_counter() - start), steps * x.numel() / (time.process_time() - cpu_start)


def bench_config(name: str, args, device, peak: float) -> dict:
    config = ModelConfig.from_name(name, context_len=max(args.seq_len, ModelConfig.from_name(name).context_len))
    torch.manual_seed(0)
    ours = Transformer(config).to(device).train()
    peer = hf_peer(ours).train()
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=True)
    runner = torch.compile(ours) if args.compile else ours  # the optimizer holds the same parameters
    start = time.perf_counter()
    ours_step(runner, opt_ours, x, y)  # compiles here with --compile
    first_step_s = time.perf_counter() - start
    hf_step(peer, opt_peer, x, y)
    for _ in range(args.warmup - 1):  # warm-up: allocator, optimizer state
        ours_step(runner, opt_ours, x, y)
        hf_step(peer, opt_peer, x, y)
    ours_rates, peer_rates = [], []
    for _ in range(args.repeats):
        ours_rates.append(tokens_per_second(ours_step, runner, opt_ours, x, y, args.steps, device))
        peer_rates.append(tokens_per_second(hf_step, peer, opt_peer, x, y, args.steps, device))
    ours_tps, peer_tps = median([r[0] for r in ours_rates]), median([r[0] for r in peer_rates])
    # each round's two measurements are adjacent in time: the median of their ratios follows
    # a machine whose speed drifts (other jobs) better than the ratio of the two medians
    ratio = median([o[0] / p[0] for o, p in zip(ours_rates, peer_rates)])
    cpu_ratio = median([o[1] / p[1] for o, p in zip(ours_rates, peer_rates)])
    flops = config.flops_per_token(args.seq_len)
    return dict(config=name, params=config.num_params(), ours=ours_tps, hf=peer_tps, first_step_s=first_step_s,
                cpu_ratio=cpu_ratio,
                ratio=ratio, mfu_ours=ours_tps * flops / peak, mfu_hf=peer_tps * flops / peak)


def bench_optimizers(name: str, args, device) -> None:
    """One AdamW step over the preset's parameters with each kernel (fused, foreach,
    one tensor at a time), alternating, median of `--repeats` rounds."""
    model = Transformer(ModelConfig.from_name(name)).to(device)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    kernels = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single-tensor": dict(foreach=False)}
    optimizers = {kind: torch.optim.AdamW(model.parameters(), lr=1e-6, **kw) for kind, kw in kernels.items()}
    times = {kind: [] for kind in kernels}
    for round_ in range(args.repeats + 1):
        for kind, optimizer in optimizers.items():
            sync(device)
            start = time.perf_counter()
            optimizer.step()
            sync(device)
            if round_:  # round 0 creates the optimizer state
                times[kind].append(time.perf_counter() - start)
    print(f"{name:>7} AdamW step: " + ", ".join(f"{kind} {median(t) * 1e3:.1f} ms" for kind, t in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="5M,30M", help="comma-separated model presets")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per timed round")
    parser.add_argument("--repeats", type=int, default=9, help="alternating rounds per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (at least 1)")
    parser.add_argument("--compile", action="store_true", help="run ours through torch.compile (opt-in; the "
                        "first step, compilation included, is printed)")
    parser.add_argument("--optimizers", action="store_true", help="time one AdamW step per kernel (fused, "
                        "foreach, single-tensor) instead")
    parser.add_argument("--tuned-allocator", action="store_true", help="run with glibc malloc tuned against "
                        "page faults (for both contenders)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one config, this process
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.optimizers:
        for name in args.configs.split(","):
            bench_optimizers(name.strip(), args, device)
        return
    if not args.in_process:  # one fresh process per configuration (see the module docstring)
        env = dict(os.environ)
        if args.tuned_allocator:
            env.update(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 40),
                       MALLOC_TOP_PAD_=str(256 << 20))
        print(f"device={device} threads={args.threads} torch={torch.__version__} batch={args.batch_size} "
              f"seq_len={args.seq_len} compile={args.compile} tuned allocator={args.tuned_allocator}")
        print(f"{'config':>7} {'params':>8} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} {'MFU ours':>9} "
              f"{'MFU hf':>7} {'ours 1st step':>13} {'CPU-time ratio':>14} {'peak GFLOP/s':>12}", flush=True)
        forwarded = [a for a in sys.argv[1:] if a != "--tuned-allocator"]
        for name in args.configs.split(","):
            command = [sys.executable, "-m", "bench.bench_train", *forwarded, "--configs", name.strip(), "--in-process"]
            subprocess.run(command, env=env, check=True)
        return
    peak = matmul_peak_flops(device)
    r = bench_config(args.configs.strip(), args, device, peak)
    print(f"{r['config']:>7} {r['params'] / 1e6:>7.1f}M {r['ours']:>11.0f} {r['hf']:>10.0f} {r['ratio']:>6.2f} "
          f"{r['mfu_ours']:>9.1%} {r['mfu_hf']:>7.1%} {r['first_step_s']:>12.1f}s {r['cpu_ratio']:>14.2f} "
          f"{peak / 1e9:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
