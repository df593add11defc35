"""Training: the threaded data loader, and for now a minimal time-limited loop that the
main job uses; the full `Trainer` (accumulation, precision, evaluation, OOM fallback,
checkpoints, exact resume) replaces the loop with the trainer issue."""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from model import Transformer


class _Failure:
    """Carries an exception raised in the loader thread to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()  # the worker finished the epoch


class ThreadedDataLoader:
    """Batches of a token dataset (`data.PackedBlocks` or `data.MaskedSamples`), prepared
    by a background thread into a bounded queue so the training step never waits on
    indexing and collation.

    The order is a function of (seed, epoch) alone — a fresh permutation of the blocks
    each epoch — so `state_dict()` (epoch, position) restores the exact batch sequence.
    With `world_size` > 1 each rank reads a disjoint shard of the same permutation.
    Iterating yields the rest of the current epoch; the next iteration starts the next.

    LightLM's constructor shape works too: `ThreadedDataLoader(config, subset_size,
    queue_size, dataset)` with `config` carrying `batch_size` and `seed`.
    """

    def __init__(self, config=None, subset_size: Optional[int] = None, queue_size: int = 8, dataset=None, *,
                 batch_size: Optional[int] = None, seed: Optional[int] = None, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 pin_memory: Optional[bool] = None):
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        if dataset is None:
            raise ValueError("ThreadedDataLoader needs a dataset (data.prepare(...).train)")
        batch_size = batch_size if batch_size is not None else getattr(config, "batch_size", None)
        seed = seed if seed is not None else getattr(config, "seed", 0)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size!r}: must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"subset_size={subset_size!r}: must be a positive integer")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.queue_size = queue_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.num_blocks = len(dataset) if subset_size is None else min(subset_size, len(dataset))
        per_rank = self.num_blocks // world_size
        if per_rank < 1 or (drop_last and per_rank < batch_size):
            raise ValueError(f"{self.num_blocks} block(s) cannot fill a batch of {batch_size} on each of "
                             f"{world_size} rank(s)")
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    # ---- order ------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches (steps) per epoch on this rank."""
        per_rank = self.num_blocks // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Block indices this rank reads in `epoch`, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))[:self.num_blocks]
        else:
            order = np.arange(self.num_blocks)
        usable = (self.num_blocks // self.world_size) * self.world_size  # equal steps on every rank
        return order[:usable][self.rank::self.world_size]

    # ---- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))

    # ---- the worker ------------------------------------------------------------------
    def _work(self, epoch: int, start: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            indices = self.epoch_indices(epoch)
            for step in range(start, len(self)):
                batch = self.dataset.batch(indices[step * self.batch_size:(step + 1) * self.batch_size])
                if self.pin_memory:
                    batch = tuple(t.pin_memory() for t in batch)
                if not self._put(out, batch, stop):
                    return
            self._put(out, _END, stop)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(out, _Failure(error), stop)

    @staticmethod
    def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.queue_size)
        self._thread = threading.Thread(target=self._work, args=(self.epoch, self.position, self._queue, self._stop),
                                        name="ThreadedDataLoader", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= len(self):  # a finished epoch: move on to the next
            self.epoch, self.position = self.epoch + 1, 0
        self.close()
        self._start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.error
                self.position += 1
                yield item
            self.epoch, self.position = self.epoch + 1, 0
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker thread and wait for it (well under a second)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
        self._queue = None

    def __enter__(self) -> "ThreadedDataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@torch.no_grad()
def evaluate(model: Transformer, dataset, batch_size: int, max_batches: Optional[int] = None) -> float:
    """Mean cross-entropy over (the first `max_batches` batches of) a dataset, in order."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        if max_batches is not None and count >= max_batches:
            break
        x, y = dataset.batch(np.arange(start, min(start + batch_size, len(dataset))))
        _, _, ce_loss = model(x, y)
        total += ce_loss.item()
        count += 1
    model.train(was_training)
    return total / max(count, 1)


def train_until(model: Transformer, batches, seconds: float, learning_rate: float = 3e-3,
                warmup_steps: int = 20, on_step: Optional[Callable[[int, float, float], None]] = None) -> int:
    """AdamW on `batches` until `seconds` have passed; calls on_step(step, loss, elapsed).
    Returns the number of steps taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start = time.perf_counter()
    step = 0
    for x, y in batches:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        for group in optimizer.param_groups:  # linear warm-up, then cosine decay over the time budget
            progress = min(elapsed / seconds, 1.0)
            group["lr"] = learning_rate * min((step + 1) / warmup_steps, 0.5 * (1 + math.cos(math.pi * progress)))
        _, loss, _ = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if on_step is not None:
            on_step(step, loss.item(), time.perf_counter() - start)
    return step
