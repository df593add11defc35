import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
from data import PackedBlocks
from model import ModelConfig, Transformer
from events import CheckpointSetAside, Eval, Fallback, MetricsLog, NonFinite, Step, Stopped
from trainer import Trainer, TrainerConfig, learning_rate_at, parameter_groups


def blocks(count: int, seq_len: int = 16, seed: int = 0, vocab: int = 64) -> PackedBlocks:
    stream = np.random.default_rng(seed).integers(0, vocab, count * seq_len + 1).astype(np.int32)
    return PackedBlocks.from_stream(stream, seq_len)


def make(tmp_path=None, model_seed: int = 0, data=None, val=None, callback=None, fault_hook=None, **overrides):
    torch.manual_seed(model_seed)
    model = Transformer(ModelConfig.from_name("tiny"))
    config = TrainerConfig(**{"batch_size": 4, "max_seq_len": 16, "learning_rate": 3e-3, "min_lr": 3e-4,
                              "warmup_ratio": 0.1, **overrides})
    return Trainer(model, config, data if data is not None else blocks(32), val if val is not None else blocks(4, seed=1),
                   run_dir=tmp_path, callbacks=[callback] if callback else [], fault_hook=fault_hook)


def step_losses(events) -> list[float]:
    return [e.loss for e in events if isinstance(e, Step)]


def oom(*args):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


# ---- config -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (dict(batch_size=0), "batch_size"), (dict(accumulation_steps=-1), "accumulation_steps"),
    (dict(learning_rate=-1e-3), "learning_rate"), (dict(min_lr=1.0, learning_rate=1e-3), "min_lr"),
    (dict(lr_schedule="step"), "lr_schedule"), (dict(optimizer="sgd"), "optimizer"),
    (dict(device="tpu"), "device"), (dict(use_dtype="int8"), "use_dtype"), (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(betas=(0.9,)), "betas"), (dict(time_limit_s=-1), "time_limit_s"), (dict(max_steps=-2), "max_steps"),
    (dict(use_ddp=True, use_fsdp=True), "use_fsdp"),
])
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        TrainerConfig(**overrides)


def test_config_json_round_trip(tmp_path):
    config = TrainerConfig(num_epochs=3, betas=(0.8, 0.99), lr_schedule="linear", time_limit_s=12.5)
    config.to_json(tmp_path / "trainer.json")
    assert TrainerConfig.from_json(tmp_path / "trainer.json") == config
    with pytest.raises(ValueError, match="nope"):
        TrainerConfig.from_dict({"nope": 1})


def test_schedule_values():
    config = TrainerConfig(learning_rate=1e-3, min_lr=1e-4, warmup_ratio=0.1)
    assert learning_rate_at(0, 100, config) == pytest.approx(1e-4)  # first of 10 warm-up steps
    assert learning_rate_at(9, 100, config) == pytest.approx(1e-3)  # warm-up end: the peak
    assert learning_rate_at(99, 100, config) == pytest.approx(1e-4)  # the last step: min_lr
    middle = learning_rate_at(54, 100, config)
    assert 1e-4 < middle < 1e-3 and middle == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    linear = dataclasses.replace(config, lr_schedule="linear")
    assert learning_rate_at(99, 100, linear) == pytest.approx(1e-4)
    assert learning_rate_at(50, 100, dataclasses.replace(config, lr_schedule="constant")) == 1e-3


def test_weight_decay_groups_skip_norms_and_embeddings(tiny):
    model = Transformer(tiny)
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.embed_tokens.weight) not in decayed
    assert id(model.layers[0].self_attn.q_proj.weight) in decayed
    assert id(model.norm.weight) in {id(p) for p in no_decay["params"]}
    model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    assert id(model.layers[0].mlp.up_proj.weight) not in {id(p) for g in parameter_groups(model, 0.1) for p in g["params"]}


# ---- the loop -------------------------------------------------------------------------
def test_overfits_a_tiny_dataset():
    events = []
    trainer = make(data=blocks(4), val=blocks(4), callback=events.append, num_epochs=150, learning_rate=1e-2,
                   min_lr=1e-3, use_epoch_checkpoints=False)
    result = trainer.fit()
    losses = step_losses(events)
    assert result.status == "finished" and result.global_step == 150
    assert losses[-1] < 0.15 * losses[0]


def test_accumulation_equals_a_larger_batch():
    one = make(batch_size=8, accumulation_steps=1, max_steps=1, warmup_ratio=0.0, data=blocks(8))
    two = make(batch_size=4, accumulation_steps=2, max_steps=1, warmup_ratio=0.0, data=blocks(8))
    assert one.total_steps == two.total_steps == 1
    gradients = {}
    for trainer in (one, two):
        step = trainer.optimizer.step

        def capture(*args, trainer=trainer, step=step, **kwargs):
            gradients[id(trainer)] = [p.grad.clone() for p in trainer.model.parameters()]
            return step(*args, **kwargs)

        trainer.optimizer.step = capture
        trainer.fit()
    names = [name for name, _ in one.model.named_parameters()]
    for name, a, b in zip(names, gradients[id(one)], gradients[id(two)]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5, msg=name)  # the same gradient
    for name, a, b in zip(names, one.model.parameters(), two.model.parameters()):
        # Adam's first step divides by |g|, which amplifies rounding where g is tiny
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_partial_accumulation_group_at_epoch_end():
    events = []
    trainer = make(data=blocks(20), batch_size=4, accumulation_steps=2, callback=events.append)  # 5 batches
    assert trainer.steps_per_epoch == 3
    result = trainer.fit()
    assert result.global_step == 3 and result.tokens_seen == 20 * 16


def test_events_metrics_file_and_checkpoints(tmp_path):
    events = []
    trainer = make(tmp_path, callback=events.append, num_epochs=2, eval_interval=2, save_every_n_steps=3,
                   keep_last_n=2)
    trainer.callbacks.append(MetricsLog(tmp_path / "metrics.jsonl"))
    result = trainer.fit()
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished"
    assert {"step", "eval", "checkpoint", "epoch_end"} <= set(kinds)
    step = next(e.to_dict() for e in events if isinstance(e, Step))
    assert {"epoch", "step", "loss", "lr", "tokens_per_s", "grad_norm", "eta_s"} <= set(step)
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["type"] for e in written] == kinds
    assert result.global_step == 16 and result.last_checkpoint == "epoch_2"
    names = sorted(p.name for p in checkpoint.candidates(tmp_path))
    assert "epoch_2" in names and len(names) <= 3  # keep_last_n=2, plus the best if older
    state = checkpoint.read_state(tmp_path / "epoch_2")
    assert state["global_step"] == 16 and state["loader"]["epoch"] == 2


def test_best_checkpoint_is_never_pruned(tmp_path):
    trainer = make(tmp_path, num_epochs=3, keep_last_n=1, learning_rate=5e-2, min_lr=5e-2, warmup_ratio=0.0,
                   grad_clip=0.0)
    trainer.fit()
    best = trainer.state.best_checkpoint
    assert best is not None and (tmp_path / best).exists()
    remaining = [p.name for p in checkpoint.candidates(tmp_path)]
    assert remaining[-1] == "epoch_3" and len(remaining) <= 2


def test_early_stopping(tmp_path):
    events = []
    trainer = make(tmp_path, callback=events.append, num_epochs=50, learning_rate=9.0, min_lr=9.0, warmup_ratio=0.0,
                   grad_clip=0.0, eval_interval=1, early_stopping_patience=2)
    result = trainer.fit()
    assert result.status == "early_stop"
    evals = [e for e in events if isinstance(e, Eval)]
    assert [e.improved for e in evals[-2:]] == [False, False]


def test_deadline_stops_within_one_step(tmp_path):
    events = []
    slow = lambda step, size: __import__("time").sleep(0.05)  # noqa: E731
    trainer = make(tmp_path, callback=events.append, num_epochs=0, schedule_by="time", time_limit_s=0.5, fault_hook=slow)
    result = trainer.fit()
    step_seconds = 0.05 * 1  # one micro-batch per step
    assert result.status == "deadline"
    assert result.elapsed_s < 0.5 + 10 * step_seconds + 1.0  # the step in flight, an evaluation and a save
    assert checkpoint.read_state(tmp_path / result.last_checkpoint)["global_step"] == result.global_step
    assert any(isinstance(e, Eval) and e.step == result.global_step for e in events)


# ---- out of memory ---------------------------------------------------------------------
def test_injected_oom_halves_the_micro_batch_without_losing_samples():
    reference_events, events = [], []
    make(callback=reference_events.append, batch_size=8, num_epochs=2, data=blocks(32)).fit()
    failures = {"left": 2}

    def hook(step, micro_batch_size):
        if step == 3 and micro_batch_size > 2 and failures["left"]:
            failures["left"] -= 1
            oom()

    trainer = make(callback=events.append, fault_hook=hook, batch_size=8, num_epochs=2, data=blocks(32))
    result = trainer.fit()
    fallbacks = [e for e in events if isinstance(e, Fallback)]
    assert [f.micro_batch_size for f in fallbacks] == [4, 2]
    assert all(f.effective_batch == 8 for f in fallbacks)
    assert result.tokens_seen == 2 * 32 * 16  # every sample once per epoch, none twice
    np.testing.assert_allclose(step_losses(events), step_losses(reference_events), rtol=1e-4)


def test_oom_at_micro_batch_one_falls_back_to_cpu():
    events = []
    trainer = make(callback=events.append, batch_size=4, max_steps=3)

    def hook(step, micro_batch_size):
        if trainer.device.type == "cuda":  # pretend the accelerator is full whatever we do
            oom()

    trainer.fault_hook = hook
    trainer._place_model()  # on the CPU, for real
    trainer.device = torch.device("cuda")  # then the trainer believes it is on a GPU
    result = trainer.fit()
    actions = [e.action for e in events if isinstance(e, Fallback)]
    assert actions == ["halve_micro_batch", "halve_micro_batch", "move_to_cpu"]
    assert trainer.device.type == "cpu" and result.global_step == 3


def test_oom_on_cpu_at_micro_batch_one_is_raised():
    trainer = make(batch_size=1, max_steps=2, fault_hook=oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        trainer.fit()


def test_other_errors_are_not_swallowed():
    def broken(step, size):
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        make(max_steps=2, fault_hook=broken).fit()


# ---- non-finite losses ---------------------------------------------------------------------
def poison(trainer: Trainer, steps: set[int], times: int = 1_000_000) -> None:
    """NaN outputs at the given steps, `times` times at most."""
    left = {"times": times}

    def hook(module, inputs, output):
        if trainer.global_step in steps and left["times"] > 0 and module.training:
            left["times"] -= 1
            return output * float("nan")
        return output

    trainer.model.norm.register_forward_hook(hook)


def test_nonfinite_loss_skips_the_step(tmp_path):
    events = []
    trainer = make(callback=events.append, max_steps=4)
    poison(trainer, {2}, times=1)
    result = trainer.fit()
    skipped = [e for e in events if isinstance(e, NonFinite)]
    assert len(skipped) == 1 and trainer.state.nonfinite_steps == 1
    assert result.global_step == 4 and all(math.isfinite(p.sum().item()) for p in trainer.model.parameters())


def test_repeated_nonfinite_losses_stop_and_save(tmp_path):
    events = []
    trainer = make(tmp_path, callback=events.append, max_steps=50, max_nonfinite_steps=3)
    poison(trainer, set(range(2, 100)))
    result = trainer.fit()
    assert result.status == "nonfinite" and result.global_step == 2
    assert any(isinstance(e, Stopped) and "non-finite" in e.reason for e in events)
    model_state, _, state = checkpoint.load(checkpoint.latest(tmp_path))
    assert state["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in model_state.values())


# ---- checkpoints and resume ------------------------------------------------------------------
def test_resume_mid_epoch_reproduces_the_loss_curve(tmp_path):
    reference = []
    make(callback=reference.append, num_epochs=2, accumulation_steps=2).fit()

    first_events = []
    first = make(tmp_path, callback=first_events.append, num_epochs=2, accumulation_steps=2)

    def interrupt_at_step_3(event):
        first_events.append(event)
        if isinstance(event, Step) and event.step == 3:
            first._session.interrupts = 1  # what Ctrl-C does

    first.callbacks = [interrupt_at_step_3]
    assert first.fit().status == "interrupted"
    resumed_events = []
    second = make(tmp_path, model_seed=123, callback=resumed_events.append, num_epochs=2, accumulation_steps=2)
    second.load_checkpoint(checkpoint.latest(tmp_path))
    result = second.fit()
    assert result.status == "finished"
    assert step_losses(first_events) + step_losses(resumed_events) == step_losses(reference)


def test_resume_from_epoch_checkpoint_continues_next_epoch(tmp_path):
    reference = []
    make(callback=reference.append, num_epochs=3).fit()
    make(tmp_path, num_epochs=3, max_steps=8).fit()  # stops at the end of epoch 1 (8 steps)
    assert checkpoint.latest(tmp_path).name == "epoch_1"
    events = []
    trainer = make(tmp_path, callback=events.append, num_epochs=3)
    trainer.load_checkpoint(tmp_path / "epoch_1")
    trainer.fit()
    # max_steps shortened the first run's schedule, so compare where the schedules agree: data order
    assert [e.epoch for e in events if isinstance(e, Step)] == [1] * 8 + [2] * 8


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    trainer = make(tmp_path, max_steps=2)
    trainer.fit()
    good = checkpoint.latest(tmp_path)

    def crash(temporary):
        raise KeyboardInterrupt("killed during the write")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "step_99", trainer.model.state_dict(), trainer.optimizer.state_dict(),
                        {"global_step": 99}, before_rename=crash)
    assert not (tmp_path / "step_99").exists()
    assert checkpoint.latest(tmp_path) == good
    # a half-written directory under a final name (no manifest) is skipped with a message
    (tmp_path / "step_100").mkdir()
    (tmp_path / "step_100" / "trainer_state.json").write_text('{"global_step": 100}')
    messages = []
    assert checkpoint.latest(tmp_path, on_skip=messages.append) == good
    assert "step_100" in messages[0] and "manifest" in messages[0]


def test_corrupted_checkpoint_is_detected(tmp_path):
    trainer = make(tmp_path, max_steps=2, save_every_n_steps=1, keep_last_n=0)
    trainer.fit()
    newest = checkpoint.latest(tmp_path)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "checksum" in checkpoint.verify(newest)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(newest)
    messages = []
    assert checkpoint.latest(tmp_path, on_skip=messages.append).name == "step_1"
    assert newest.name in messages[0]


def test_checkpoint_round_trip_keeps_tied_weights(tmp_path, tiny):
    model = Transformer(tiny)
    checkpoint.save(tmp_path / "step_1", model.state_dict(), None, {"global_step": 1})
    state, optimizer_state, _ = checkpoint.load(tmp_path / "step_1")
    assert optimizer_state is None
    fresh = Transformer(tiny)
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh.embed_tokens.weight, model.embed_tokens.weight)


def test_adamw8bit_trains_on_cpu():
    pytest.importorskip("bitsandbytes")
    events = []
    trainer = make(callback=events.append, optimizer="adamw8bit", max_steps=30, data=blocks(4), val=blocks(4),
                   num_epochs=100, learning_rate=1e-2, min_lr=1e-3)
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    trainer.fit()
    losses = step_losses(events)
    assert losses[-1] < 0.8 * losses[0]


def test_precision_choice():
    from trainer import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype(TrainerConfig(), cpu) == torch.float32
    assert resolve_dtype(TrainerConfig(use_dtype="bfloat16"), cpu) == torch.bfloat16


@pytest.fixture
def chooser(monkeypatch):
    """auto's CPU precision measured by a fake: `chooser.speedup` is what the measurement
    finds (bf16's speed over fp32's), `chooser.calls` how often it ran."""
    import trainer

    monkeypatch.delenv(trainer.CPU_DTYPE_VARIABLE)
    monkeypatch.setattr(trainer, "_bf16_kernels", lambda: True)
    fake = type("Chooser", (), {"speedup": 1.0, "calls": 0})()

    def measured() -> float:
        fake.calls += 1
        return fake.speedup

    monkeypatch.setattr(trainer, "bf16_speedup", measured)
    return fake


@pytest.mark.parametrize("speedup, dtype", [(1.74, torch.bfloat16), (1.2, torch.bfloat16), (1.19, torch.float32),
                                            (0.077, torch.float32)])
def test_auto_on_a_cpu_trains_in_bf16_only_when_measured_faster_by_the_margin(chooser, speedup, dtype):
    from trainer import cpu_precision, resolve_dtype

    chooser.speedup = speedup
    assert resolve_dtype(TrainerConfig(), torch.device("cpu")) == dtype
    choice = cpu_precision()
    assert choice.speedup == speedup and choice.source == "measured"
    assert f"{speedup:.2f}x" in choice.reason()
    assert choice.describe().startswith("bf16 autocast" if dtype == torch.bfloat16 else "fp32 (")


def test_the_cpu_precision_is_measured_once_a_process_and_again_on_request(chooser):
    from trainer import cpu_precision, resolve_dtype

    chooser.speedup = 1.5
    cpu = torch.device("cpu")
    assert resolve_dtype(TrainerConfig(), cpu) == torch.bfloat16
    chooser.speedup = 0.9  # the machine changed its mind: nothing asks again ...
    assert resolve_dtype(TrainerConfig(), cpu) == torch.bfloat16 and cpu_precision().speedup == 1.5
    assert chooser.calls == 1
    assert cpu_precision(remeasure=True).dtype == "float32"  # ... until a re-measurement
    assert resolve_dtype(TrainerConfig(), cpu) == torch.float32 and chooser.calls == 2


def test_a_cpu_without_bf16_kernels_trains_in_fp32_without_measuring(chooser, monkeypatch):
    import trainer

    monkeypatch.setattr(trainer, "_bf16_kernels", lambda: False)
    chooser.speedup = 5.0
    choice = trainer.cpu_precision()
    assert choice.dtype == "float32" and choice.source == "unsupported" and chooser.calls == 0


def test_the_environment_pins_the_cpu_precision_without_measuring(chooser, monkeypatch):
    from trainer import CPU_DTYPE_VARIABLE, cpu_precision, resolve_dtype

    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "bfloat16")
    assert resolve_dtype(TrainerConfig(), torch.device("cpu")) == torch.bfloat16
    assert cpu_precision(remeasure=True).source == "environment" and chooser.calls == 0
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "fp8")
    with pytest.raises(ValueError, match=CPU_DTYPE_VARIABLE):
        cpu_precision()


@pytest.mark.parametrize("speedup", [1.74, 0.5])
def test_an_explicit_use_dtype_always_wins(chooser, speedup):
    from trainer import resolve_dtype

    chooser.speedup = speedup
    cpu = torch.device("cpu")
    assert resolve_dtype(TrainerConfig(use_dtype="float32"), cpu) == torch.float32
    assert resolve_dtype(TrainerConfig(use_dtype="bfloat16"), cpu) == torch.bfloat16
    assert make(use_dtype="float32").dtype == torch.float32 and make(use_dtype="bfloat16").dtype == torch.bfloat16


def test_a_resumed_run_keeps_its_precision_whatever_auto_would_choose_now(tmp_path, chooser):
    from events import Start

    chooser.speedup = 1.74
    first = make(tmp_path, max_steps=2)
    assert first.dtype == torch.bfloat16
    first.fit()
    saved = checkpoint.latest(tmp_path)
    assert json.loads((saved / checkpoint.STATE_FILE).read_text())["dtype"] == "bfloat16"
    chooser.speedup = 1.0  # re-measured on a busier day: auto now says fp32
    import trainer

    assert trainer.cpu_precision(remeasure=True).dtype == "float32"
    events = []
    resumed = make(tmp_path, callback=events.append, max_steps=4)
    assert resumed.dtype == torch.float32
    resumed.load_checkpoint(saved)
    assert resumed.dtype == torch.bfloat16
    resumed.fit()
    start = next(e for e in events if isinstance(e, Start))
    assert start.dtype == "bfloat16" and "resumed run keeps its precision" in start.dtype_note
    assert json.loads((checkpoint.latest(tmp_path) / checkpoint.STATE_FILE).read_text())["dtype"] == "bfloat16"
    # an explicit use_dtype wins over the recorded one
    explicit = make(tmp_path, use_dtype="float32", max_steps=6)
    explicit.load_checkpoint(checkpoint.latest(tmp_path))
    assert explicit.dtype == torch.float32


def test_a_checkpoint_from_before_the_precision_was_recorded_resumes_in_fp32_on_a_cpu(tmp_path, chooser):
    chooser.speedup = 1.0
    first = make(tmp_path, max_steps=2)
    first.fit()
    model_state, optimizer_state, saved = checkpoint.load(checkpoint.latest(tmp_path))
    del saved["dtype"]  # as trainer_state.json was written before it held the precision
    chooser.speedup = 1.74
    import trainer

    trainer.cpu_precision(remeasure=True)
    resumed = make(tmp_path, max_steps=4)
    assert resumed.dtype == torch.bfloat16
    resumed.restore(checkpoint.latest(tmp_path), model_state, optimizer_state, saved)
    assert resumed.dtype == torch.float32


def test_bf16_autocast_on_cpu_trains():
    events = []
    trainer = make(callback=events.append, use_dtype="bfloat16", max_steps=20, data=blocks(4), val=blocks(4),
                   num_epochs=100, learning_rate=1e-2, min_lr=1e-3)
    assert trainer.dtype == torch.bfloat16
    trainer.fit()
    losses = step_losses(events)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert trainer.model.embed_tokens.weight.dtype == torch.float32  # autocast: master weights stay fp32


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A real SIGKILL between writing the files and the rename."""
    import subprocess
    import sys
    import textwrap

    trainer = make(tmp_path, max_steps=2)
    trainer.fit()
    good = checkpoint.latest(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, torch, checkpoint
        from model import ModelConfig, Transformer
        model = Transformer(ModelConfig.from_name("tiny"))
        checkpoint.save({str(tmp_path / "step_50")!r}, model.state_dict(), None, {{"global_step": 50}},
                        before_rename=lambda path: os.kill(os.getpid(), signal.SIGKILL))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=str(Path(checkpoint.__file__).parent), timeout=120)
    assert result.returncode == -9
    assert any(p.name.startswith(".step_50.tmp") for p in tmp_path.iterdir())  # the orphaned partial write
    assert checkpoint.latest(tmp_path) == good
    model_state, _, state = checkpoint.load(good)
    assert state["global_step"] == 2


def test_moe_lossfree_bias_is_updated_and_load_reported():
    events = []
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", use_moe=True, moe_num_experts=4, moe_active_experts=1,
                                   use_lossfreebalance=True, moe_bias_update_rate=0.01)
    trainer = Trainer(Transformer(config), TrainerConfig(batch_size=4, max_seq_len=16, max_steps=5), blocks(32),
                      callbacks=[events.append])
    trainer.fit()
    bias = trainer.model.layers[0].mlp.expert_bias
    assert bias.abs().sum() > 0 and bias.abs().max() <= 5 * 0.01 + 1e-9
    loads = [e.expert_load for e in events if isinstance(e, Step)]
    assert len(loads) == 5 and sum(loads[0][0]) == 4 * 16  # one expert per token


def test_constructing_a_trainer_writes_nothing_and_changes_nothing_it_was_given(tmp_path, tiny):
    model = Transformer(tiny)
    model_config, weights = dataclasses.replace(tiny), {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainerConfig(batch_size=4, max_seq_len=16, max_steps=1, use_flash=False, gradient_checkpointing=True)
    run_dir = tmp_path / "run"
    trainer = Trainer(model, config, blocks(8), run_dir=run_dir)
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []
    assert model.config == model_config and config == TrainerConfig(batch_size=4, max_seq_len=16, max_steps=1,
                                                                     use_flash=False, gradient_checkpointing=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not model.gradient_checkpointing and all(block.self_attn.use_flash for block in model.layers)
    trainer.fit()  # training applies the runtime switches to the model, and writes its checkpoint
    assert model.gradient_checkpointing and not any(block.self_attn.use_flash for block in model.layers)
    assert checkpoint.latest(run_dir).name == "step_1"


def test_accumulation_weights_micro_batches_by_target_tokens():
    """With prompt-masked data, micro-batches hold unequal numbers of targets; the loss of
    a split batch must still be the mean over all of its targets."""
    from data import MaskedSamples

    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 64, (8, 16)).astype(np.int32)
    targets = rng.integers(0, 64, (8, 16)).astype(np.int32)
    for row, kept in enumerate([16, 1, 3, 16, 2, 9, 16, 5]):  # very different target counts
        targets[row, :16 - kept] = -100
    data = MaskedSamples(inputs, targets)
    gradients = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        trainer = make(data=data, batch_size=batch_size, accumulation_steps=accumulation, max_steps=1,
                       warmup_ratio=0.0)
        step = trainer.optimizer.step

        def capture(*args, trainer=trainer, step=step, **kwargs):
            gradients.append([p.grad.clone() for p in trainer.model.parameters()])
            return step(*args, **kwargs)

        trainer.optimizer.step = capture
        trainer.fit()
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    make(tmp_path, max_steps=4, save_every_n_steps=1, keep_last_n=0).fit()
    assert checkpoint.latest(tmp_path).name == "step_4"
    events = []
    trainer = make(tmp_path, callback=events.append, max_steps=4, save_every_n_steps=1, keep_last_n=0)
    trainer.load_checkpoint(tmp_path / "step_2")
    assert checkpoint.latest(tmp_path).name == "step_2"
    assert sorted(e.name for e in events if isinstance(e, CheckpointSetAside)) == ["step_3", "step_4"]
    assert any(p.name.startswith(".abandoned-step_4") for p in tmp_path.iterdir())


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    make(tmp_path, max_steps=1).fit()
    torch.manual_seed(0)
    other = Trainer(Transformer(ModelConfig.from_name("tiny", num_layers=3)), TrainerConfig(batch_size=4, max_seq_len=16),
                    blocks(8))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
        other.load_checkpoint(checkpoint.latest(tmp_path))


def test_the_step_total_starts_from_the_estimate_and_changes_only_when_reestimated(tmp_path):
    """A deadline run shows the plan's estimate until the real speed of its first steps
    corrects it; every later change of the total is announced by a Reestimate event. (The
    deadline is far, max_steps ends the run: the same on a slow or busy machine.)"""
    from budget import estimate_run
    from events import Reestimate, Start

    events = []
    trainer = make(tmp_path, callback=events.append, num_epochs=0, schedule_by="time", time_limit_s=60.0,
                   max_steps=8, eval_steps=1)
    trainer.estimate = dataclasses.replace(estimate_run(trainer.config, 32, 1000.0, "interpolated", "test probes"),
                                           steps=100)  # far off: max_steps ends the run at 8
    trainer.fit()
    (start,) = [e for e in events if isinstance(e, Start)]
    assert start.estimated_steps == 100 and "interpolated" in start.estimate_basis
    steps = [e for e in events if isinstance(e, Step)]
    assert len(steps) == 8 and all(e.total_estimated for e in steps)
    assert [e.total_steps for e in steps[:2]] == [100, 100]  # the estimate until real speed is measured
    shown, announced = 100, []
    for event in events:
        if isinstance(event, Reestimate):
            assert event.previous_steps == shown
            shown = event.steps
            announced.append(event)
        elif isinstance(event, Step):
            assert event.total_steps == shown  # never changed without an announcement
    assert announced[0].step == 3 and announced[0].steps == 8 and shown == 8


def test_min_steps_holds_off_the_deadline_for_a_few_steps(tmp_path):
    result = make(tmp_path, num_epochs=0, schedule_by="time", time_limit_s=0.001, min_steps=3).fit()
    assert result.status == "deadline" and result.global_step == 3


@pytest.mark.parametrize("rate, shift", [(1e12, 3 * 10.0), (1.0, 0.0)])
def test_a_machine_slower_than_measured_keeps_more_of_the_deadline_for_finishing(tmp_path, rate, shift):
    """The work after the deadline (finish_s at the estimated speed) grows with the real
    speed's shortfall, capped at 4x: an estimate no real machine reaches moves the deadline
    3 x finish_s earlier; an estimate every machine beats leaves it where it was."""
    from budget import estimate_run

    trainer = make(tmp_path, num_epochs=0, schedule_by="time", time_limit_s=1000.0, max_steps=4)
    trainer.estimate = estimate_run(trainer.config, 32, rate, "measured", "test")
    trainer.finish_s = 10.0
    trainer.fit()
    session = trainer._session
    assert session.finish_checked
    assert session.deadline == pytest.approx(session.started + 1000.0 - shift, abs=1e-6)
