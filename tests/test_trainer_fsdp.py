"""FSDP2 (`TrainerConfig.use_fsdp`) on two CPU processes with gloo, against one process
with the same global batch: the same per-step losses, checkpoints in the unsharded
format, and resumes on either number of processes that continue the same curve. DDP is
checked against the same reference on the way."""

import datetime
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoint
from data import PackedBlocks
from events import Step
from model import ModelConfig, Transformer
from trainer import Trainer, TrainerConfig

WORLD_SIZE = 2
GLOBAL_BATCH = 8  # blocks per micro-batch over all ranks
SETTINGS = dict(accumulation_steps=2, max_seq_len=16, learning_rate=3e-3, min_lr=3e-4, warmup_ratio=0.1,
                grad_clip=0.25, save_every_n_steps=2, eval_steps=2, keep_last_n=0, seed=7)


def blocks(count: int, seed: int) -> PackedBlocks:
    stream = np.random.default_rng(seed).integers(0, 64, count * 16 + 1).astype(np.int32)
    return PackedBlocks.from_stream(stream, 16)


def trainer_for(run_dir: Path, processes: int, events: list, parallel: str = "fsdp", **overrides) -> Trainer:
    """A tiny model (the same initialisation everywhere) on 64 blocks: 4 optimizer steps of
    2 micro-batches of GLOBAL_BATCH blocks, whatever the number of processes."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", **overrides))
    config = TrainerConfig(batch_size=GLOBAL_BATCH // processes, use_fsdp=processes > 1 and parallel == "fsdp",
                           use_ddp=processes > 1 and parallel == "ddp", **SETTINGS)
    return Trainer(model, config, blocks(64, seed=1), blocks(4, seed=2), run_dir=run_dir, callbacks=[events.append])


def curve(events: list) -> list[tuple[float, float]]:
    return [(e.loss, e.grad_norm) for e in events if isinstance(e, Step)]


def _worker(rank: int, store: str, root: str, overrides: dict) -> None:
    """One of WORLD_SIZE ranks: train 4 steps (saving at 2 and 4), then resume from step 2
    in another run directory and train to the end again; then the same 4 steps under DDP.
    Rank 0 writes the curves."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(minutes=5))  # a rank left waiting fails instead of hanging
    try:
        root = Path(root)
        events: list = []
        trainer_for(root / "fsdp", WORLD_SIZE, events, **overrides).fit()
        dist.barrier()  # rank 0 has written the checkpoints
        if rank == 0:
            for name in ("resumed_fsdp", "resumed_single"):
                shutil.copytree(root / "fsdp" / "step_2", root / name / "step_2")
        dist.barrier()
        resumed_events: list = []
        resumed = trainer_for(root / "resumed_fsdp", WORLD_SIZE, resumed_events, **overrides)
        resumed.load_checkpoint(root / "resumed_fsdp" / "step_2")
        resumed.fit()
        ddp_events: list = []
        trainer_for(None, WORLD_SIZE, ddp_events, parallel="ddp", **overrides).fit()
        if rank == 0:
            (root / "curves.json").write_text(json.dumps({"fsdp": curve(events), "resumed": curve(resumed_events),
                                                          "ddp": curve(ddp_events)}))
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path: Path, **overrides) -> dict:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), overrides), nprocs=WORLD_SIZE, join=True)
    return json.loads((tmp_path / "curves.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """The two-process runs and the one-process reference (its checkpoints in root/single)."""
    root = tmp_path_factory.mktemp("fsdp")
    curves = run_two_processes(root)
    events: list = []
    trainer_for(root / "single", 1, events).fit()
    return root, {**curves, "single": curve(events)}


def test_fsdp_and_ddp_on_two_processes_match_one_process_with_the_whole_batch(runs):
    _, curves = runs
    single = curves["single"]
    assert len(single) == 4 and len(curves["fsdp"]) == 4 and len(curves["ddp"]) == 4
    np.testing.assert_allclose(curves["fsdp"], single, rtol=1e-5)  # losses and clipped gradient norms
    np.testing.assert_allclose(curves["ddp"], single, rtol=1e-5)
    assert all(norm > SETTINGS["grad_clip"] for _, norm in single)  # clipping was at work every step


def test_fsdp_checkpoints_are_whole_and_resume_on_one_or_two_processes(runs):
    root, curves = runs
    model_state, optimizer_state, state = checkpoint.load(root / "fsdp" / "step_2")
    single_model, single_optimizer, _ = checkpoint.load(root / "single" / "step_2")
    assert state["global_step"] == 2 and set(model_state) == set(single_model)
    for name, tensor in model_state.items():  # the unsharded format, tied weights included
        torch.testing.assert_close(tensor, single_model[name], rtol=1e-4, atol=1e-6)
    assert model_state["lm_head.weight"] is model_state["embed_tokens.weight"]
    assert optimizer_state["param_groups"] == single_optimizer["param_groups"]
    assert optimizer_state["state"].keys() == single_optimizer["state"].keys()
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(value, single_optimizer["state"][index][key], rtol=1e-3, atol=1e-7)

    resumed_events: list = []
    single = trainer_for(root / "resumed_single", 1, resumed_events)
    single.load_checkpoint(root / "resumed_single" / "step_2")
    single.fit()
    uninterrupted = curves["fsdp"][2:]
    np.testing.assert_allclose(curves["resumed"], uninterrupted, rtol=1e-6)  # on two processes
    np.testing.assert_allclose(curve(resumed_events), uninterrupted, rtol=1e-5)  # on one


@pytest.mark.slow
def test_fsdp_moe_with_lossfree_balancing_matches_one_process(tmp_path):
    """Buffers are not FSDP's: the balancing bias must follow the global batch's load."""
    moe = dict(use_moe=True, use_lossfreebalance=True)
    curves = run_two_processes(tmp_path, **moe)
    events: list = []
    trainer_for(tmp_path / "single", 1, events, **moe).fit()
    np.testing.assert_allclose(curves["fsdp"], curve(events), rtol=1e-5)
    np.testing.assert_allclose(curves["resumed"], curves["fsdp"][2:], rtol=1e-6)
