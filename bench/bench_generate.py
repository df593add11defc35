"""Generation speed: our KV-cache decoding vs no cache, and vs transformers' generate.

Greedy decoding of `--new-tokens` tokens after a `--prompt-len` prompt, same weights
for every contender (ours also without its decoding layout, to show what it gives, and with
the layout held across calls by `Transformer.decoding()`, as a chat session holds it, so
relaying the weights is not timed); the outputs are checked to be identical. The contenders alternate
for `--repeats` rounds and the median of each is reported.

    python -m bench.bench_generate --config 30M
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.common import hf_peer, median, sync
from model import ModelConfig, Transformer


def timed(fn, repeats: int, device) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="30M")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uncached", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our decoding without the KV cache (slow: recomputes the prefix every token)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = ModelConfig.from_name(args.config)
    model = Transformer(config).to(device).eval()
    peer = hf_peer(model, training=False).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_len), device=device)
    n = args.new_tokens

    def hf_generate(use_cache: bool):
        with torch.no_grad():
            return peer.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=use_cache, pad_token_id=0)

    def ours_row_major():  # the weights left as stored, without the decoding layout (for the comparison)
        relayout, model._decoding_layout = model._decoding_layout, lambda: []
        try:
            return model.generate(prompt, n, temperature=0, use_cache=True)
        finally:
            model._decoding_layout = relayout

    def ours_held():  # the layout held by `decoding()` (as a chat session holds it): its cost not timed
        return model.generate(prompt, n, temperature=0, use_cache=True)

    contenders = {
        "ours, KV cache": lambda: model.generate(prompt, n, temperature=0, use_cache=True),
        "ours, layout held": ours_held,
        "ours, row-major weights": ours_row_major,
        "ours, no cache": lambda: model.generate(prompt, n, temperature=0, use_cache=False),
        "transformers, cache": lambda: hf_generate(True),
    }
    if not args.uncached:
        del contenders["ours, no cache"]
    print(f"device={device} threads={args.threads} torch={torch.__version__} config={args.config} "
          f"({config.num_params() / 1e6:.1f}M) batch={args.batch_size} prompt={args.prompt_len} new={n}")
    held = {"ours, layout held"}
    outputs = {}
    for name, fn in contenders.items():  # warm-up
        with model.decoding() if name in held else contextlib.nullcontext():
            outputs[name] = fn()
    times = {name: [] for name in contenders}
    for _ in range(args.repeats):  # the contenders alternate, so each sees the same machine conditions
        for name, fn in contenders.items():
            with model.decoding() if name in held else contextlib.nullcontext():
                seconds, outputs[name] = timed(fn, 1, device)
            times[name].append(seconds)
    results = {name: args.batch_size * n / median(seconds) for name, seconds in times.items()}
    reference = outputs["ours, KV cache"]
    for name, out in outputs.items():
        same = torch.equal(out, reference)
        print(f"{name:>22}: {results[name]:8.1f} tokens/s   output identical to ours+cache: {same}")
    if "ours, no cache" in results:
        print(f"KV cache speed-up: {results['ours, KV cache'] / results['ours, no cache']:.1f}x")
    print(f"ours+cache / transformers+cache: {results['ours, KV cache'] / results['transformers, cache']:.2f} "
          f"(layout held: {results['ours, layout held'] / results['transformers, cache']:.2f})")


if __name__ == "__main__":
    main()
