import threading
import time
import types

import numpy as np
import pytest
import torch

from data import MaskedSamples, PackedBlocks
from loader import ThreadedDataLoader


def blocks(count: int = 50, seq_len: int = 4) -> PackedBlocks:
    return PackedBlocks.from_stream(np.arange(count * seq_len + 1, dtype=np.int32), seq_len)


def collect(loader, limit=None) -> list[torch.Tensor]:
    out = []
    for x, _ in loader:
        out.append(x.clone())
        if limit is not None and len(out) == limit:
            break
    return out


def test_len_and_epoch_coverage():
    data = blocks(50)
    loader = ThreadedDataLoader(dataset=data, batch_size=8, seed=1)
    assert len(loader) == 7  # 6 full batches and a last one of 2
    seen = torch.cat(collect(loader))[:, 0]
    assert sorted(seen.tolist()) == [i * 4 for i in range(50)]  # every block exactly once
    assert loader.state_dict()["epoch"] == 1
    assert len(ThreadedDataLoader(dataset=data, batch_size=8, seed=1, drop_last=True)) == 6


def test_order_depends_on_seed_and_epoch_only():
    data = blocks(40)
    a = ThreadedDataLoader(dataset=data, batch_size=4, seed=7)
    b = ThreadedDataLoader(dataset=data, batch_size=4, seed=7)
    epoch0_a, epoch0_b = collect(a), collect(b)
    assert all(torch.equal(x, y) for x, y in zip(epoch0_a, epoch0_b))
    epoch1 = collect(a)
    assert not all(torch.equal(x, y) for x, y in zip(epoch0_a, epoch1))  # reshuffled per epoch
    other_seed = collect(ThreadedDataLoader(dataset=data, batch_size=4, seed=8))
    assert not all(torch.equal(x, y) for x, y in zip(epoch0_a, other_seed))


def test_resume_mid_epoch_reproduces_the_rest():
    data = blocks(40)
    uninterrupted = ThreadedDataLoader(dataset=data, batch_size=4, seed=3)
    reference = collect(uninterrupted) + collect(uninterrupted)  # two epochs
    first = ThreadedDataLoader(dataset=data, batch_size=4, seed=3)
    head = collect(first) + collect(first, limit=3)  # stops inside the second epoch
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 3, "seed": 3, "batch_size": 4, "world_size": 1}
    resumed = ThreadedDataLoader(dataset=data, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    tail = collect(resumed)
    assert len(head) + len(tail) == len(reference)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, reference))


def test_resume_on_another_number_of_ranks_continues_with_the_next_blocks():
    """2 ranks x batch 4 saved after 3 batches (24 blocks read); 1 process x batch 8 and
    4 ranks x batch 2 continue from block 24 of the same permutation."""
    data = blocks(64)
    whole = torch.cat(collect(ThreadedDataLoader(dataset=data, batch_size=8, seed=5)))[:, 0].tolist()
    pair = [ThreadedDataLoader(dataset=data, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    read = [torch.cat(collect(loader, limit=3))[:, 0].tolist() for loader in pair]
    assert sorted(read[0] + read[1]) == sorted(whole[:24])  # the ranks together read a prefix
    single = ThreadedDataLoader(dataset=data, batch_size=8, seed=5)
    single.load_state_dict(pair[0].state_dict())
    assert single.position == 3 and torch.cat(collect(single))[:, 0].tolist() == whole[24:]
    quads = [ThreadedDataLoader(dataset=data, batch_size=2, seed=5, rank=r, world_size=4) for r in range(4)]
    for loader in quads:
        loader.load_state_dict(pair[1].state_dict())
    rest = [torch.cat(collect(loader))[:, 0].tolist() for loader in quads]
    assert sorted(sum(rest, [])) == sorted(whole[24:])
    odd = ThreadedDataLoader(dataset=data, batch_size=5, seed=5)
    with pytest.raises(ValueError, match="not a whole number of batches"):
        odd.load_state_dict(pair[0].state_dict())
    finished = ThreadedDataLoader(dataset=data, batch_size=4, seed=5, rank=0, world_size=2)
    collect(finished)
    state = {**finished.state_dict(), "epoch": 0, "position": len(finished)}  # the end of epoch 0
    single.load_state_dict(state)
    assert (single.epoch, single.position) == (0, len(single))


def test_shards_are_disjoint_and_equal_sized():
    data = blocks(41)
    shards = [ThreadedDataLoader(dataset=data, batch_size=5, seed=0, rank=r, world_size=3) for r in range(3)]
    rows = [torch.cat(collect(s))[:, 0].tolist() for s in shards]
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) == 13
    assert not set(rows[0]) & set(rows[1]) and not set(rows[1]) & set(rows[2])
    assert len(set(rows[0] + rows[1] + rows[2])) == 39


def test_lightlm_constructor_shape_and_subset():
    config = types.SimpleNamespace(batch_size=4, seed=5, max_seq_len=4)
    loader = ThreadedDataLoader(config, subset_size=12, queue_size=2, dataset=blocks(40))
    assert len(loader) == 3
    assert torch.cat(collect(loader)).shape == (12, 4)


def test_masked_samples_batches():
    inputs = np.arange(12, dtype=np.int32).reshape(3, 4)
    targets = np.full((3, 4), -100, dtype=np.int32)
    loader = ThreadedDataLoader(dataset=MaskedSamples(inputs, targets), batch_size=3, seed=0, shuffle=False)
    ((x, y),) = list(loader)
    assert torch.equal(x, torch.from_numpy(inputs).long()) and (y == -100).all()


def test_worker_exception_reraises_with_its_traceback():
    class Broken(PackedBlocks):
        def batch(self, indices):
            raise KeyError("corrupt block")

    data = blocks(20)
    loader = ThreadedDataLoader(dataset=Broken(data.tokens, 4), batch_size=4, seed=0)
    with pytest.raises(KeyError, match="corrupt block") as error:
        collect(loader)
    assert any(frame.name == "batch" for frame in error.traceback)
    assert not any(t.name == "ThreadedDataLoader" for t in threading.enumerate())


def test_shutdown_is_prompt_and_leaves_no_thread():
    class Slow(PackedBlocks):
        def batch(self, indices):
            time.sleep(0.01)
            return super().batch(indices)

    data = blocks(200)
    loader = ThreadedDataLoader(dataset=Slow(data.tokens, 4), batch_size=2, seed=0, queue_size=2)
    iterator = iter(loader)
    next(iterator)
    time.sleep(0.1)  # the worker is now blocked on a full queue
    start = time.perf_counter()
    iterator.close()
    assert time.perf_counter() - start < 1.0
    assert not any(t.name == "ThreadedDataLoader" for t in threading.enumerate())


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset"):
        ThreadedDataLoader(batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ThreadedDataLoader(dataset=blocks(), batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        ThreadedDataLoader(dataset=blocks(), batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot fill"):
        ThreadedDataLoader(dataset=blocks(3), batch_size=4, drop_last=True)
