"""GGUF export: file size and export time per tensor type, and llama.cpp's decoding speed
against ours on the same model, in one run.

A model of `--config` with a byte-level BPE trained on a slice of the built-in corpus is
fitted for `--steps` steps (so its predictions are decisive), exported once per type, and
each file's top-1 agreement with our logits over `--positions` teacher-forced positions is
measured in llama.cpp (llama-cpp-python). Then both decode `--new-tokens` greedy tokens
after the same prompt on the same threads (best of 3, prompt included); the table says for
how many of them llama.cpp's greedy ids equal ours.

    python -m bench.bench_gguf --config 5M
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from data import builtin_documents, train_bpe
from gguf_io import QUANTS, save_gguf
from model import ModelConfig, Transformer


def fitted_model(config: ModelConfig, ids: torch.Tensor, steps: int, seq_len: int = 128) -> Transformer:
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    starts = torch.arange(0, len(ids) - seq_len - 1, seq_len)[:512]
    for step in range(steps):
        batch = starts[torch.randint(0, len(starts), (8,))]
        x = torch.stack([ids[s:s + seq_len] for s in batch])
        y = torch.stack([ids[s + 1:s + seq_len + 1] for s in batch])
        _, loss, _ = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def llama_decode(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="5M")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE tokens (the model's vocabulary is the preset's)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    text = "".join(islice(builtin_documents(), 60))
    tokenizer = train_bpe([text], vocab_size=args.vocab_size)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    config = ModelConfig.from_name(args.config, tie_embeddings=False)
    started = time.perf_counter()
    model = fitted_model(config, ids, args.steps)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}; config {args.config} ({config.num_params() / 1e6:.1f}M "
          f"parameters), fitted {args.steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    held_out = ids[-args.positions - args.prompt_len:]
    with torch.no_grad():
        ours_top1 = model(held_out[None, :args.positions])[0][0].argmax(-1).numpy()
    prompt = held_out[:args.prompt_len].tolist()
    ours_ids = model.generate(torch.tensor([prompt]), args.new_tokens, temperature=0)[0, len(prompt):].tolist()

    def ours_decode() -> float:
        start = time.perf_counter()
        model.generate(torch.tensor([prompt]), args.new_tokens, temperature=0)
        return time.perf_counter() - start

    ours_speeds = []
    print(f"{'type':>5} {'size MB':>8} {'export s':>9} {'top-1 agree':>12} {'llama.cpp tok/s':>16} "
          f"{'/ ours':>7} {'greedy ids = ours':>18}", flush=True)  # ours: fp32 PyTorch with its KV cache
    with tempfile.TemporaryDirectory() as root:
        for quant in QUANTS:
            start = time.perf_counter()
            path = save_gguf(model, Path(root) / f"{quant}.gguf", tokenizer, quant, add_bos=False)
            seconds = time.perf_counter() - start
            llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=config.context_len,
                                  n_batch=config.context_len, n_threads=args.threads, verbose=False)
            llm.eval(held_out[:args.positions].tolist())
            theirs_top1 = np.array(llm.scores[:args.positions]).argmax(-1)
            agreement = float((theirs_top1 == ours_top1).mean())
            # llama-cpp-python keeps logits only with logits_all (one row per decoded token here)
            llama_decode(llm, prompt, 8)  # warm-up
            theirs_best, ours_best, same = float("inf"), float("inf"), 0
            for _ in range(3):  # alternating, so other load on the machine slows both alike
                out, elapsed = llama_decode(llm, prompt, args.new_tokens)
                theirs_best, ours_best = min(theirs_best, elapsed), min(ours_best, ours_decode())
                same = next((i for i, (a, b) in enumerate(zip(out, ours_ids)) if a != b), len(out))
            speed, ours_speed = args.new_tokens / theirs_best, args.new_tokens / ours_best
            ours_speeds.append(ours_speed)
            print(f"{quant:>5} {path.stat().st_size / 1e6:8.2f} {seconds:9.2f} {agreement:12.1%} {speed:16.1f} "
                  f"{speed / ours_speed:7.2f} {same:>11} / {args.new_tokens}", flush=True)
            del llm
    print(f"ours (fp32 PyTorch, KV cache), measured beside each: {min(ours_speeds):.1f} … {max(ours_speeds):.1f} "
          f"tokens/s; greedy, {args.new_tokens} new tokens after {args.prompt_len}")


if __name__ == "__main__":
    main()
