import dataclasses

import psutil
import pytest
import torch

import budget
from budget import (CostModel, HardwareProfile, Probe, compile_decision, parse_duration, plan, shape,
                    training_memory)

GIB = 2**30


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400),
                                           ("0.001", 3.6), (" 2 min ", 120), ("1.5m", 90), (2, 7200)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "m5", "-1", "0", "0s", "inf", "nan", "-2m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def synthetic_probes(overhead: float = 2e-5, per_flop: float = 3e-11, vocab: int = 8192, seq_len: int = 128):
    """Timings of a machine that needs `overhead + per_flop * flops` seconds per token."""
    probes = []
    for width in (64, 128, 256):
        flops = shape(width, vocab, seq_len).flops_per_token(seq_len)
        probes.append(Probe(width, flops, overhead + per_flop * flops))
    return probes


HARDWARE = HardwareProfile(device="cpu", device_name="test", threads=2, torch_version="x", memory_bytes=16 * GIB)


def test_cost_model_recovers_synthetic_timings():
    probes = synthetic_probes(3e-5, 4e-11)
    cost = CostModel.fit(probes)
    assert cost.overhead == pytest.approx(3e-5, rel=1e-6)
    assert cost.seconds_per_flop == pytest.approx(4e-11, rel=1e-6)
    for probe in probes:
        assert cost.seconds_per_token(probe.flops_per_token) == pytest.approx(probe.seconds_per_token, rel=1e-9)


def test_larger_budgets_never_plan_fewer_tokens_or_smaller_models():
    tokens, params = [], []
    for budget in (30, 60, 180, 600, 1800, 3600, 4 * 3600):
        the_plan = plan(budget, HARDWARE, dataset_tokens=10**9, vocab_size=8192, spent_seconds=5,
                        probes=synthetic_probes(seq_len=128))
        tokens.append(the_plan.tokens)
        params.append(the_plan.params)
        assert the_plan.trainer.time_limit_s == pytest.approx(the_plan.train_seconds)
        assert the_plan.finish_s <= budget
    assert tokens == sorted(tokens) and params == sorted(params)
    assert params[-1] > params[0]  # the planner does scale the model up with the budget


def test_plans_respect_memory():
    roomy = plan(4 * 3600, HARDWARE, 10**9, 8192, probes=synthetic_probes(per_flop=1e-13))
    tight_hardware = dataclasses.replace(HARDWARE, memory_bytes=int(roomy.memory_bytes / 0.6) - 1)
    tight = plan(4 * 3600, tight_hardware, 10**9, 8192, probes=synthetic_probes(per_flop=1e-13))
    assert tight.params < roomy.params
    assert tight.memory_bytes <= 0.6 * tight_hardware.memory_bytes
    assert training_memory(tight.model, tight.trainer.batch_size, tight.trainer.max_seq_len) == tight.memory_bytes
    with pytest.raises(ValueError, match="not even the smallest model .* fits"):
        plan(4 * 3600, dataclasses.replace(HARDWARE, memory_bytes=1000), 10**9, 8192, probes=synthetic_probes())


def test_a_small_dataset_is_not_repeated_for_many_epochs():
    big = plan(4 * 3600, HARDWARE, 10**10, 8192, probes=synthetic_probes(per_flop=1e-12))
    small = plan(4 * 3600, HARDWARE, 200_000, 8192, probes=synthetic_probes(per_flop=1e-12))
    assert small.params > big.params or small.params == big.params  # spend compute on size, not on repeats
    assert small.epochs > 4  # the deadline still runs; beyond 4 epochs the plan counted nothing new
    assert "epochs" in small.reasoning


def test_a_budget_too_short_at_the_planned_batch_trains_smaller_batches():
    """What a busy or slow machine does to LightLM's 3.6-second walkthrough: the steps of
    the smallest shape at the planned batch do not fit, at a smaller one they do."""
    roomy = plan(2, HARDWARE, 10**9, 8192, probes=synthetic_probes(), whole_run=False)
    slow = plan(2, HARDWARE, 10**9, 8192, probes=synthetic_probes(overhead=4e-5, per_flop=6e-11), whole_run=False)
    assert roomy.trainer.batch_size == 16 and slow.trainer.batch_size < roomy.trainer.batch_size
    assert slow.steps >= 3 and slow.train_seconds <= 2


@pytest.mark.parametrize("slowdown", [1, 3, 10, 30, 100, 1000])
def test_lightlm_walkthrough_budget_always_trains_a_few_steps(slowdown):
    """0.001 h in the wizard (training time only), on machines from fast to very slow or
    busy (what a cold cache measures): never a refusal, never one step; a fixed few steps
    that the trainer cannot cut short, and an honest note when they exceed the budget."""
    from budget import FLOOR_STEPS, FIXED_STEPS_BELOW

    the_plan = plan(3.6, HARDWARE, 10**6, 8192, probes=synthetic_probes(2e-5 * slowdown, 3e-11 * slowdown),
                    whole_run=False)
    assert the_plan.steps >= FLOOR_STEPS
    if the_plan.steps >= FIXED_STEPS_BELOW:  # a deadline run that a slower machine still cannot cut short
        assert the_plan.trainer.min_steps == FLOOR_STEPS and the_plan.estimate.ends_by == "deadline"
        return
    assert the_plan.trainer.max_steps == the_plan.steps and the_plan.trainer.time_limit_s == 0
    assert the_plan.trainer.schedule_by == "steps" and the_plan.estimate.ends_by == "max_steps"
    assert the_plan.notes and "start-up" not in " ".join(the_plan.notes)  # the wizard's budget starts at training
    if the_plan.train_seconds > 3.6:
        assert "anyway" in the_plan.notes[0] and "by the probes" in the_plan.notes[0]


def test_a_budget_spent_before_training_still_trains_a_few_steps_and_says_why():
    the_plan = plan(8, HARDWARE, 10**9, 8192, spent_seconds=6, probes=synthetic_probes())
    assert the_plan.steps >= 5 and the_plan.trainer.max_steps == the_plan.steps
    assert "start-up and data preparation took 6 s" in the_plan.notes[0] and "anyway" in the_plan.notes[0]
    with pytest.raises(ValueError, match="positive"):
        plan(0, HARDWARE, 10**9, 8192, probes=synthetic_probes())


def test_a_budget_past_what_the_data_can_use_is_capped_and_says_so():
    from budget import MAX_PLANNED_EPOCHS

    the_plan = plan(parse_duration("1e9"), HARDWARE, 3_000_000, 8192, probes=synthetic_probes())
    assert the_plan.epochs == pytest.approx(MAX_PLANNED_EPOCHS, rel=0.01)
    assert the_plan.trainer.time_limit_s == pytest.approx(the_plan.train_seconds)
    assert the_plan.train_seconds < 3600 * 24 * 365
    assert the_plan.steps < 10**6 and any("more than this data can use" in note for note in the_plan.notes)
    text = the_plan.describe()
    assert "16 epochs" in text and "note: the budget is more than this data can use" in text
    assert "e+" not in text and "37498656" not in text


@pytest.mark.parametrize("epochs, text", [(0.0001, "<1% of an epoch"), (0.012, "1% of an epoch"),
                                          (0.25, "0.25 epochs"), (1.0, "1.0 epoch"), (2.46, "2.5 epochs"),
                                          (16.0, "16 epochs"), (37498656.95, "37,498,657 epochs")])
def test_epochs_are_written_with_the_digits_that_matter(epochs, text):
    from budget import epochs_text

    assert epochs_text(epochs) == text


@pytest.mark.parametrize("value, text", [(0.0041, "0.0041"), (0.25, "0.25"), (3.21, "3.2"), (45.2, "45"),
                                         (1234.5, "1,234")])
def test_ratios_never_print_as_zero(value, text):
    from budget import ratio_text

    assert ratio_text(value) == text


def test_plan_figures_say_whether_they_were_measured_interpolated_or_extrapolated():
    from budget import probe_basis

    probes = synthetic_probes()
    assert probe_basis(128, probes, cached=True)[0] == "measured"
    basis, detail = probe_basis(96, probes, cached=True)
    assert basis == "interpolated" and "cached" in detail and "64, 128, 256" in detail
    basis, detail = probe_basis(768, probes, cached=False)
    assert basis == "extrapolated" and "just measured" in detail
    the_plan = plan(600, HARDWARE, 10**9, 8192, probes=probes)
    assert the_plan.estimate.basis == probe_basis(the_plan.model.num_dims, probes, True)[0]
    assert the_plan.estimate.basis in the_plan.reasoning and "measured" not in the_plan.reasoning.split("(")[0]


def test_one_estimate_follows_the_trainer_rules():
    from budget import estimate_run
    from trainer import TrainerConfig

    epochs = estimate_run(TrainerConfig(num_epochs=2, batch_size=4, max_seq_len=16), 100, 640.0, "measured", "x")
    assert (epochs.steps, epochs.ends_by, epochs.seconds) == (50, "epochs", pytest.approx(50 * 64 / 640))
    capped = estimate_run(TrainerConfig(num_epochs=2, batch_size=4, max_seq_len=16, max_steps=7), 100, 640.0, "m", "x")
    assert (capped.steps, capped.ends_by) == (7, "max_steps")
    timed = estimate_run(TrainerConfig(num_epochs=2, batch_size=4, max_seq_len=16, time_limit_s=1.0), 100, 640.0,
                         "m", "x")
    assert (timed.steps, timed.ends_by, timed.seconds) == (10, "deadline", 1.0)
    assert "~10 optimizer steps" in timed.describe() and "640 tokens/s (m: x)" in timed.describe()


@pytest.mark.slow
def test_a_real_planned_run_finishes_inside_its_budget(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", "train", "--budget", "45s", "--out", str(tmp_path),
                             "--cache-dir", str(tmp_path / "cache"), "data.subset_size=60"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "plan for 45 s" in result.stdout
    assert wall <= 45 * 1.1


def test_an_explicit_sequence_length_is_planned_for():
    the_plan = plan(600, HARDWARE, 10**9, 8192, probes=synthetic_probes(seq_len=64), seq_len=64)
    assert the_plan.trainer.max_seq_len == 64 and the_plan.model.context_len == 64


def test_finetune_sequence_length_covers_the_data_but_not_its_outliers():
    from budget import finetune_seq_len

    assert finetune_seq_len([30, 41, 57], 512) == (56, 0)  # the longest (57 tokens = 56 inputs), to a multiple of 8
    lengths = [60] * 199 + [1000]  # one outlier would make every batch 16 times as wide
    seq_len, cut = finetune_seq_len(lengths, 2048)
    assert seq_len == 64 and cut == 1
    assert finetune_seq_len([5000, 6000], 1024) == (1024, 2)  # never beyond the context
    with pytest.raises(ValueError):
        finetune_seq_len([], 64)


def test_finetune_plans_fit_the_budget_and_halve_the_batch_for_enough_steps():
    from budget import FINETUNE_MIN_STEPS, plan_finetune

    plan = plan_finetune(300, spent_s=20, samples=54, seq_len=96, eval_seconds=4.0, step_seconds={8: 2.0}, finish_s=8)
    used = plan.spent_s + plan.evaluations * plan.eval_seconds + plan.steps * plan.step_seconds + plan.finish_s
    assert used <= 300 and used > 0.95 * 300  # the time is used, not exceeded
    assert plan.train_seconds == pytest.approx(300 - 20 - 8)
    assert plan.eval_interval * plan.evaluations >= plan.steps and plan.evaluations >= 2
    assert plan.trainer_settings()["schedule_by"] == "time"
    # slow steps at 8: the smaller measured batch that gives enough steps wins
    plan = plan_finetune(120, spent_s=20, samples=54, seq_len=96, eval_seconds=2.0,
                         step_seconds={8: 30.0, 4: 8.0}, finish_s=5)
    assert plan.batch_size == 4 and plan.steps >= FINETUNE_MIN_STEPS
    with pytest.raises(ValueError, match="too short"):
        plan_finetune(30, spent_s=25, samples=54, seq_len=96, eval_seconds=2.0, step_seconds={8: 2.0}, finish_s=5)


def test_disturbed_or_busy_probes_are_used_but_not_cached(tmp_path, monkeypatch):
    import budget
    from budget import HardwareProfile, Probe, probe, probes_look_sane

    sane = [Probe(64, 1e6, 1e-6), Probe(128, 4e6, 3e-6), Probe(256, 16e6, 9e-6)]
    disturbed = [Probe(64, 1e6, 5e-6), Probe(128, 4e6, 3e-6), Probe(256, 16e6, 9e-6)]  # the smallest slowed
    assert probes_look_sane(sane) and not probes_look_sane(disturbed)
    hardware = HardwareProfile("cpu", "test cpu", 2, "0", 8 << 30)
    rates = iter([5e-6, 3e-6, 9e-6] * 2)  # disturbed twice: measured again, then used uncached
    monkeypatch.setattr(budget, "measure", lambda *args, **kwargs: next(rates))
    monkeypatch.setattr(budget, "machine_busy", lambda threads: False)
    probes, cached = probe(hardware, 8192, 128, 2, 0.1, tmp_path)
    assert not cached and [p.seconds_per_token for p in probes] == [5e-6, 3e-6, 9e-6]
    assert not (tmp_path / "probes.json").exists()
    # sane but taken while the machine was busy: not cached either
    monkeypatch.setattr(budget, "measure", lambda *args, **kwargs: 1e-6)
    monkeypatch.setattr(budget, "machine_busy", lambda threads: True)
    probe(hardware, 8192, 128, 2, 0.1, tmp_path)
    assert not (tmp_path / "probes.json").exists()
    # a quiet machine caches; --remeasure measures again anyway
    monkeypatch.setattr(budget, "machine_busy", lambda threads: False)
    probe(hardware, 8192, 128, 2, 0.1, tmp_path)
    assert probe(hardware, 8192, 128, 2, 0.1, tmp_path)[1] is True
    monkeypatch.setattr(budget, "measure", lambda *args, **kwargs: 2e-6)
    probes, cached = probe(hardware, 8192, 128, 2, 0.1, tmp_path, remeasure=True)
    assert not cached and probes[0].seconds_per_token == 2e-6


def test_the_thread_count_is_the_faster_one_measured(monkeypatch):
    import budget

    before = torch.get_num_threads()
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    seen = []

    def fake_measure(config, batch_size, seq_len, device, seconds, dtype=None):
        seen.append(torch.get_num_threads())
        return 1e-5 if torch.get_num_threads() == 1 else 4e-5  # a busy machine: one thread wins

    monkeypatch.setattr(budget, "measure", fake_measure)
    threads, timings = budget.best_thread_count()
    assert threads == 1 and set(timings) == {1, 2} and sorted(seen) == [1, 2]
    assert torch.get_num_threads() == before  # the caller's count is left as it was


def test_probing_reports_progress_per_probe_and_a_retake_extends_the_total(tmp_path, monkeypatch):
    """Probes measured of all, as Progress events: 1..3 of 3; a disturbed set taken again
    goes on to 6 of 6; probes from the cache measure nothing and report nothing."""
    import budget
    from events import Progress

    monkeypatch.setattr(budget, "machine_busy", lambda threads: False)
    sane = [synthetic_probes()[i].seconds_per_token for i in range(3)]
    rates = iter([sane[2], sane[1], sane[0]] + sane)  # the first set disturbed (the smallest slowest)
    monkeypatch.setattr(budget, "measure", lambda *args, **kwargs: next(rates))
    events = []
    plan(60, HARDWARE, dataset_tokens=10**9, vocab_size=8192, cache_dir=tmp_path, progress=events.append)
    assert all(isinstance(e, Progress) and e.unit == "probes" and e.task == budget.PROBE_TASK for e in events)
    assert [(e.done, e.total) for e in events] == [(1, 3), (2, 3), (3, 3), (4, 6), (5, 6), (6, 6)]
    again = []
    plan(60, HARDWARE, dataset_tokens=10**9, vocab_size=8192, cache_dir=tmp_path, progress=again.append)
    assert again == []  # cached


def test_compile_is_planned_only_where_its_measured_gain_outweighs_compiling(monkeypatch):
    gains = {"cpu": (1.0, 30.0), "cuda": (1.25, 60.0)}
    assert compile_decision("cpu", 3600, gains)[0] is False  # no speed-up: never
    assert compile_decision("cuda", 120, gains)[0] is False  # saves 24 s < 60 s
    use, note = compile_decision("cuda", 600, gains)  # saves 120 s > 60 s
    assert use and "on" in note
    assert compile_decision("mps", 10**6, gains) == (False, "torch.compile off: its gain on mps has not been "
                                                            "measured yet")
    monkeypatch.setitem(budget.COMPILE_GAIN, "cpu", (1.5, 20.0))  # a CPU where it pays: the plan turns it on
    long = plan(3600, HARDWARE, 10**9, 8192, probes=synthetic_probes(seq_len=128))
    assert long.trainer.use_compile and any("torch.compile on" in note for note in long.notes)
    monkeypatch.setitem(budget.COMPILE_GAIN, "cpu", (1.0, 20.0))
    plain = plan(3600, HARDWARE, 10**9, 8192, probes=synthetic_probes(seq_len=128))
    assert not plain.trainer.use_compile and not any("compile" in note for note in plain.notes)
    # the compiled plan counts the compile time out and the faster steps in
    assert long.tokens == pytest.approx((long.train_seconds - 20.0) / (long.train_seconds / plain.tokens) * 1.5,
                                        rel=0.02)


def test_the_cpu_precision_is_cached_next_to_the_probes_and_measured_again_on_request(tmp_path, monkeypatch):
    import json

    import trainer

    monkeypatch.delenv(trainer.CPU_DTYPE_VARIABLE)
    monkeypatch.setattr(trainer, "_bf16_kernels", lambda: True)
    found = iter([1.6, 0.9])
    calls = []
    monkeypatch.setattr(trainer, "bf16_speedup", lambda: calls.append(1) or next(found))
    choice = budget.precision(HARDWARE, tmp_path)
    assert choice.dtype == "bfloat16" and choice.source == "measured" and len(calls) == 1
    stored = json.loads((tmp_path / "precision.json").read_text())
    assert list(stored.values()) == [{"dtype": "bfloat16", "speedup": 1.6}]
    trainer.remember_cpu_precision(None)  # a new process: the cache answers, nothing is measured
    choice = budget.precision(HARDWARE, tmp_path)
    assert choice.dtype == "bfloat16" and choice.source == "cached" and len(calls) == 1
    assert trainer.resolve_dtype(trainer.TrainerConfig(), torch.device("cpu")) == torch.bfloat16
    choice = budget.precision(HARDWARE, tmp_path, remeasure=True)  # plan --remeasure
    assert choice.dtype == "float32" and len(calls) == 2
    assert list(json.loads((tmp_path / "precision.json").read_text()).values())[0]["dtype"] == "float32"
    assert trainer.resolve_dtype(trainer.TrainerConfig(), torch.device("cpu")) == torch.float32
    cuda = dataclasses.replace(HARDWARE, device="cuda")
    assert budget.precision(cuda, tmp_path) is None  # CUDA's rule needs no measurement


def test_a_precision_set_by_the_environment_is_not_cached(tmp_path):
    assert budget.precision(HARDWARE, tmp_path).source == "environment"  # (the tests pin fp32)
    assert not (tmp_path / "precision.json").exists()


def test_probes_are_cached_per_precision(tmp_path, monkeypatch):
    """A plan probes in the precision the run will train in: probes cached in fp32 are not
    used for a bf16 run."""
    import trainer

    monkeypatch.setattr(budget, "machine_busy", lambda threads: False)
    seen = []

    def fake_measure(config, batch_size, seq_len, device, seconds, dtype=None):
        seen.append(dtype)
        return {64: 1e-6, 128: 3e-6, 256: 9e-6}[config.num_dims] / (2 if dtype == torch.bfloat16 else 1)

    monkeypatch.setattr(budget, "measure", fake_measure)
    fp32, cached = budget.probe(HARDWARE, 8192, 128, 2, 0.1, tmp_path, dtype=torch.float32)
    assert not cached and seen == [torch.float32] * 3
    bf16, cached = budget.probe(HARDWARE, 8192, 128, 2, 0.1, tmp_path, dtype=torch.bfloat16)
    assert not cached and seen[3:] == [torch.bfloat16] * 3
    assert [p.seconds_per_token for p in bf16] == [p.seconds_per_token / 2 for p in fp32]
    assert budget.probe(HARDWARE, 8192, 128, 2, 0.1, tmp_path, dtype=torch.float32) == (fp32, True)
    assert budget.probe(HARDWARE, 8192, 128, 2, 0.1, tmp_path)[0] == fp32  # auto: fp32 here (pinned)
    monkeypatch.delenv(trainer.CPU_DTYPE_VARIABLE)
    trainer.remember_cpu_precision(trainer.CpuPrecision("bfloat16", 1.7))  # auto: bf16 on this CPU
    assert budget.probe(HARDWARE, 8192, 128, 2, 0.1, tmp_path)[0] == bf16
    assert len(seen) == 6
