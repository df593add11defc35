"""Rendering trainer events: the curves, the PNG, the plain and live displays."""

import dataclasses
import io

import pytest
from rich.console import Console

from display import History, LiveDisplay, PlainDisplay, expert_shares, format_seconds, save_plot, text_curve
from events import CheckpointSaved, Eval, Finished, Start, Step
from model import ModelConfig, Transformer
from test_trainer import blocks
from trainer import Trainer, TrainerConfig

START = Start(total_steps=4, steps_per_epoch=4, step=0, epoch=0, effective_batch=8, time_left_s=None,
              schedule_by="steps", device="cpu", dtype="float32", params=2_000_000, trainable=2_000_000)
EVENTS = [
    START,
    *[Step(epoch=0, step=s, total_steps=4, loss=5.0 - s, lr=1e-3, grad_norm=1.0, tokens_per_s=1000.0,
           tokens_seen=64 * s, eta_s=4 - s, **(dict(memory={"rss_mb": 300.0}, expert_load=[[48, 16], [40, 24]])
                                               if s == 2 else {})) for s in range(1, 5)],
    Eval(step=4, val_loss=1.5, best_val_loss=1.5, improved=True, seconds=0.1),
    CheckpointSaved(name="step_4", step=4, seconds=0.1, removed=[]),
    Finished(status="finished", global_step=4, epoch=1, last_loss=1.0, best_val_loss=1.5, last_checkpoint="step_4",
             elapsed_s=1.0, tokens_seen=256),
]


def test_text_curve_puts_high_values_on_top_and_labels_the_range():
    lines = text_curve([5.0, 4.0, 3.0, 2.0], width=10, height=4).splitlines()
    assert len(lines) == 5  # 4 rows and the axis
    assert lines[0].startswith("5.00") and lines[3].startswith("2.00")
    assert lines[0].index("•") < lines[3].index("•")  # the first point is top left, the last bottom right
    assert text_curve([1.0]) == ""  # nothing to draw from one point


def test_text_curve_averages_into_at_most_width_columns():
    curve = text_curve([float(i % 7) for i in range(1000)], width=40, height=5)
    assert max(len(line) for line in curve.splitlines()) <= len("6.00 │") + 40
    assert curve.count("•") == 40


def test_save_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = History()
    for event in EVENTS:
        history.record(event)
    path = save_plot(history, tmp_path / "run" / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_plot(History(), tmp_path / "empty.png") is None


def test_plain_display_writes_the_important_events():
    lines = []
    display = PlainDisplay(every=2, write=lines.append)
    for event in EVENTS:
        display(event)
    text = "\n".join(lines)
    assert "2.00M parameters" in text and "step     2/4" in text and "step     4/4" in text
    assert "step     1/4" not in text and "val loss 1.500" in text and "saved checkpoint step_4" in text
    assert display.history.losses == [4.0, 3.0, 2.0, 1.0] and display.history.val_losses == [1.5]


def test_live_display_shows_loss_memory_validation_and_expert_load():
    output = io.StringIO()
    console = Console(file=output, width=120, color_system=None, force_terminal=True)
    with LiveDisplay(console) as display:
        for event in EVENTS:
            display(event)
    text = output.getvalue()
    for expected in ("loss 1.000", "1,000 tok/s", "300 MB RSS", "val loss 1.500", "expert load 69% 31%",
                     "saved checkpoint step_4", "step 4/4"):
        assert expected in text
    assert display.history.steps == [1, 2, 3, 4]


@pytest.mark.parametrize("seconds, text", [(3.6, "3.6s"), (42.4, "42s"), (75, "1m15s"), (7300, "2h01m"), (-1, "0.0s")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_the_start_line_says_how_long_the_run_trains():
    start = dataclasses.replace(START, total_steps=4000)
    lines = []
    PlainDisplay(write=lines.append)(start)
    PlainDisplay(write=lines.append)(dataclasses.replace(start, time_left_s=3.6, schedule_by="time"))
    PlainDisplay(write=lines.append)(dataclasses.replace(start, time_left_s=90.0, schedule_by="steps"))
    assert "4,000 optimizer steps" in lines[0]
    assert "3.6s of training (the deadline ends the run)" in lines[1] and "4,000" not in lines[1]
    assert "4,000 optimizer steps or 1m30s of training, whichever ends first" in lines[2]


def test_live_display_draws_the_expert_load_a_real_moe_trainer_reports():
    output = io.StringIO()
    console = Console(file=output, width=160, color_system=None, force_terminal=True)
    config = ModelConfig.from_name("tiny", use_moe=True, moe_num_experts=4, moe_active_experts=2)
    display = LiveDisplay(console)
    trainer = Trainer(Transformer(config), TrainerConfig(batch_size=4, max_seq_len=16, max_steps=3,
                                                         use_epoch_checkpoints=False), blocks(32), callbacks=[display])
    with display:
        trainer.fit()
    load = display.metrics["expert_load"]
    assert len(load) == config.num_layers and sum(map(sum, load)) == 2 * 4 * 16 * config.num_layers
    assert sum(expert_shares(load)) == pytest.approx(1.0)
    assert "expert load" in output.getvalue() and "all 2 MoE layers" in output.getvalue()


def test_an_interrupted_run_leaves_the_bar_where_it_stopped():
    console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=True)
    with LiveDisplay(console) as display:
        for event in EVENTS[:3]:
            display(event)
        display(dataclasses.replace(EVENTS[-1], status="interrupted", global_step=2))
    task = display.progress.tasks[0]
    assert (task.completed, task.total) == (2, 4)


def test_the_bar_starts_at_the_estimate_and_labels_a_reestimate():
    from events import Reestimate

    output = io.StringIO()
    console = Console(file=output, width=160, color_system=None, force_terminal=True)
    start = dataclasses.replace(START, total_steps=0, time_left_s=60.0, schedule_by="time", estimated_steps=395,
                                estimated_seconds=60.0, estimate_basis="interpolated: between probes")
    with LiveDisplay(console) as display:
        display(start)
        task = display.progress.tasks[0]
        assert (task.total, task.fields["count"], task.description) == (395, "step 0/~395", "training (estimated)")
        display(Reestimate(step=3, steps=114, previous_steps=395, seconds_left=55.0, tokens_per_s=900.0, from_steps=3))
        assert (task.total, task.fields["count"]) == (114, "step 0/~114")
        assert task.description == "training (re-estimated)"
    text = " ".join(output.getvalue().split())
    assert "estimated ~395 steps in 1m00s (interpolated: between probes)" in text
    assert "re-estimated from the real speed of 3 steps (900 tokens/s): ~114 steps (was ~395), 55s left" in text
    lines = []
    plain = PlainDisplay(write=lines.append, every=1)
    plain(Step(epoch=0, step=4, total_steps=114, loss=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=900.0, tokens_seen=1,
               eta_s=50.0, total_estimated=True))
    assert lines[0].startswith("step     4/~114")


def test_waits_before_training_are_a_bar_on_a_terminal_and_spaced_lines_in_a_pipe(monkeypatch):
    """Tokenizing before a run: the live display shows its own bar (n/N and an ETA) until it
    is done; the plain display writes the first line, one per `every_s` seconds and the last."""
    import display as display_module
    from display import ProgressLines
    from events import Progress

    events = [Progress(task="tokenizing documents", done=done, total=10, unit="documents", elapsed_s=done)
              for done in range(1, 11)]
    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=True)
    with LiveDisplay(console) as live:
        live(events[3])
        wait = live.progress.tasks[-1]
        assert (wait.description, wait.completed, wait.fields["count"]) == ("tokenizing documents", 4,
                                                                            "4/10 documents")
        assert wait.fields["eta"] == "6.0s"
        live(events[-1])
        assert [task.description for task in live.progress.tasks] == ["training"]
    clock = iter([0.0, 0.5, 1.0, 2.1, 2.5, 3.0, 4.0, 4.2, 4.3, 4.4])  # one reading per event
    monkeypatch.setattr(display_module.time, "monotonic", lambda: next(clock))
    lines = []
    plain = PlainDisplay(write=lines.append, waiting=ProgressLines(lines.append, every_s=2.0))
    for event in events:
        plain(event)
    assert [line.split(",")[0] for line in lines] == ["tokenizing documents: 1/10 documents",
                                                     "tokenizing documents: 4/10 documents",
                                                     "tokenizing documents: 8/10 documents",
                                                     "tokenizing documents: 10/10 documents"]
    assert lines[-1].endswith("eta 0.0s")


def test_the_start_line_says_which_precision_auto_chose_and_why():
    lines = []
    note = "measured 1.74x as fast as fp32 on this CPU"
    PlainDisplay(write=lines.append)(dataclasses.replace(START, dtype="bfloat16", dtype_note=note))
    PlainDisplay(write=lines.append)(START)
    assert f"on cpu (bfloat16: {note})" in lines[0] and "on cpu (float32)," in lines[1]
    output = io.StringIO()
    with LiveDisplay(Console(file=output, width=200, color_system=None, force_terminal=True)) as display:
        display(dataclasses.replace(START, dtype="bfloat16", dtype_note=note))
    assert f"on cpu (bfloat16: {note})" in output.getvalue()
