"""Data pipeline speed on the built-in corpus.

1. Tokenization throughput (tokens/s) of the trained BPE over the whole corpus,
   in-process (the Rust tokenizer batches across threads) vs `datasets.map(num_proc=N)`.
2. Start-up of `data.prepare`: the first run (BPE training + tokenization + packing) vs
   a second run over the same data (arrays from the cache).
3. Loader wait per step: time the training loop spends waiting for the next batch from
   `ThreadedDataLoader`, as a share of a real training step (forward + backward + AdamW)
   of the given preset. Target: <= 5%.

    python -m bench.bench_data [--preset 5M --batch-size 8 --seq-len 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from data import DataConfig, _tokenize, builtin_documents, prepare
from model import ModelConfig, Transformer
from loader import ThreadedDataLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="5M")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")

    with tempfile.TemporaryDirectory() as cache:
        config = DataConfig(cache_dir=cache)
        start = time.perf_counter()
        first = prepare(config, args.seq_len)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        second = prepare(config, args.seq_len)
        warm = time.perf_counter() - start
        assert second.report.cached
    report = first.report
    print(f"corpus: {report.documents_kept} documents, {report.train_tokens + report.val_tokens:,} tokens "
          f"(vocab {len(first.tokenizer)})")
    print(f"prepare, first run (train BPE + tokenize + pack): {cold:6.1f} s")
    print(f"prepare, second run (from cache):                 {warm:6.2f} s")

    documents = [d for d in builtin_documents() if d.strip()]
    for num_proc in (0, args.num_proc):
        start = time.perf_counter()
        ids = _tokenize(documents, first.tokenizer, num_proc)
        seconds = time.perf_counter() - start
        total = sum(len(x) for x in ids)
        label = "in-process" if num_proc == 0 else f"num_proc={num_proc}"
        print(f"tokenize {label:>11}: {total / seconds:12,.0f} tokens/s ({seconds:.1f} s)")

    model_config = ModelConfig.from_name(args.preset, vocab_size=len(first.tokenizer),
                                         context_len=max(args.seq_len, 16))
    model = Transformer(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = ThreadedDataLoader(dataset=first.train, batch_size=args.batch_size, seed=0)
    waits, steps = [], []
    batches = iter(loader)
    for step in range(args.steps + 2):
        start = time.perf_counter()
        x, y = next(batches)
        waited = time.perf_counter() - start
        _, loss, _ = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:  # the first batches include thread start-up
            waits.append(waited)
            steps.append(time.perf_counter() - start)
    loader.close()
    share = sum(waits) / sum(steps)
    print(f"loader wait: {1e3 * sum(waits) / len(waits):.2f} ms per step of {1e3 * sum(steps) / len(steps):.0f} ms "
          f"({share:.2%} of step time; preset {args.preset}, batch {args.batch_size} x {args.seq_len})")


if __name__ == "__main__":
    main()
