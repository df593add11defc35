"""`ThreadedDataLoader`: batches of a token dataset prepared by a background thread.

The order is a function of (seed, epoch) alone, so a loader's `state_dict()` restores the
exact batch sequence after a resume; with several ranks each reads a disjoint shard.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Iterator, Optional

import numpy as np
import torch


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
        """Where the order stands; `batch_size` and `world_size` let a loader of another
        shape (a run resumed on a different number of processes) find the same place."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stood. Saved by loaders of another batch size or number of
        ranks, the position is converted through the blocks all ranks had read: the ranks
        together read a prefix of the epoch's permutation, whatever the shape, so a
        different shape continues with the same next block when its global batch divides
        the blocks read (a finished epoch stays finished)."""
        self.close()
        epoch, position = int(state["epoch"]), int(state["position"])
        batch_size = int(state.get("batch_size", self.batch_size))  # older states: this loader's shape
        world_size = int(state.get("world_size", self.world_size))
        if (batch_size, world_size) != (self.batch_size, self.world_size):
            per_rank = self.num_blocks // world_size
            steps = per_rank // batch_size if self.drop_last else math.ceil(per_rank / batch_size)
            read = position * batch_size * world_size
            if position >= steps:
                position = len(self)
            elif read % (self.batch_size * self.world_size):
                raise ValueError(f"the saved position ({read} blocks into epoch {epoch}, read {batch_size} per batch "
                                 f"on each of {world_size} rank(s)) is not a whole number of batches of "
                                 f"{self.batch_size} x {self.world_size} rank(s); choose a batch size whose global "
                                 f"batch divides {read}")
            else:
                position = read // (self.batch_size * self.world_size)
        self.epoch, self.position = epoch, position
        self.seed = int(state.get("seed", self.seed))

    # ---- the worker ------------------------------------------------------------------
    def _work(self, epoch: int, start: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            indices = self.epoch_indices(epoch)
            for step in range(start, len(self)):
                rows = indices[step * self.batch_size:(step + 1) * self.batch_size]
                batch = self.dataset.batch(rows, epoch) if getattr(self.dataset, "epoch_dependent", False) \
                    else self.dataset.batch(rows)
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
        if self._queue is not None:  # unblock a worker waiting on a full queue
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
        self._queue = None

    def __enter__(self) -> "ThreadedDataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
