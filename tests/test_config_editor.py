"""The config editor: prompts, parsing, the table, load/save and the editing screen, all
driven by io.StringIO input and a recording console."""

import dataclasses
import io
import json
import re
import sys

import pytest
from rich.console import Console

from config_editor import ConfigEditor, EndOfInput, ask, choose, confirm, editor_help, render_table, summary_figures
from config_io import (ConfigError, ConfigIO, apply_overrides, described, fields_of, format_value, load_configs,
                       parse_value, save_configs)
from data import DataConfig
from lora import LoRAConfig
from model import ModelConfig
from trainer import TrainerConfig

EDIT_PROMPT = "Edit: "


def console() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


def output(screen: Console) -> str:
    return screen.file.getvalue()


def edit(configs: dict, section: str, lines: str, **editor_options) -> tuple[dict, str]:
    """Run the editor on `lines` of input; the configs it returns and the screen text."""
    screen = console()
    result = ConfigEditor(screen, io.StringIO(lines), **editor_options).edit(configs, section)
    return result, output(screen)


@pytest.fixture
def configs(tiny) -> dict:
    return {"model": tiny, "trainer": TrainerConfig(), "data": DataConfig()}


@dataclasses.dataclass
class Toy(ConfigIO):
    """A config the editor has never seen: it must list and edit it from the fields alone."""

    size: int = described(3, "how big the toy is")
    mode: str = described("plain", "how it behaves", choices=("plain", "fancy"))
    ratio: float = described(0.5, "a share")
    label: str | None = described(None, "an optional name")

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"Toy.size={self.size}: must be a positive integer")


# ---- ask / choose / confirm --------------------------------------------------------------------
def test_ask_strips_echoes_and_falls_back_to_the_default():
    screen = console()
    stream = io.StringIO("  hello  \n\n")
    assert ask(screen, "Name", stream, default="anon") == "hello"
    assert ask(screen, "Name", stream, default="anon") == "anon"
    assert "Name [anon]: hello" in output(screen)


def test_ask_without_default_returns_an_empty_answer_and_raises_at_end_of_input():
    stream = io.StringIO("\n")
    assert ask(console(), "Name", stream) == ""
    with pytest.raises(EndOfInput):
        ask(console(), "Name", stream)


def test_ask_from_the_terminal_turns_eof_into_end_of_input(monkeypatch):
    screen = console()

    def closed(*args, **kwargs):
        raise EOFError

    monkeypatch.setattr(screen, "input", closed)
    with pytest.raises(EndOfInput):
        ask(screen, "Name")


def test_choose_asks_again_and_returns_the_canonical_option():
    screen = console()
    answer = choose(screen, "Preset", ["tiny", "5M"], io.StringIO("huge\n5m\n"))
    assert answer == "5M"
    assert output(screen).count("Please enter one of: tiny, 5M") == 1


def test_choose_default_and_end_of_input():
    assert choose(console(), "Preset", ["tiny", "5M"], io.StringIO("\n"), default="5M") == "5M"
    with pytest.raises(EndOfInput):
        choose(console(), "Preset", ["tiny", "5M"], io.StringIO("huge\n"))


def test_confirm_asks_again_until_yes_or_no():
    screen = console()
    assert confirm(screen, "Train now?", io.StringIO("maybe\nYES\n")) is True
    assert "(y/n)" in output(screen)
    assert output(screen).count("Please answer y or n.") == 1
    assert confirm(console(), "Train now?", io.StringIO("n\n"), default=True) is False
    assert confirm(console(), "Train now?", io.StringIO("\n"), default=False) is False
    with pytest.raises(EndOfInput):
        confirm(console(), "Train now?", io.StringIO(""))


# ---- parse_value / apply_overrides -------------------------------------------------------------
@pytest.mark.parametrize("cls, name, text, expected", [
    (ModelConfig, "num_layers", "1e3", 1000),
    (ModelConfig, "num_layers", " 6 ", 6),
    (TrainerConfig, "learning_rate", "3e-4", 3e-4),
    (TrainerConfig, "use_compile", "Yes", True),
    (TrainerConfig, "use_compile", "off", False),
    (TrainerConfig, "betas", "0.9, 0.95", (0.9, 0.95)),
    (TrainerConfig, "betas", "[0.8,0.99]", (0.8, 0.99)),
    (LoRAConfig, "target_modules", "wq, wv, w2", ("wq", "wv", "w2")),
    (DataConfig, "subset_size", "none", None),
    (DataConfig, "subset_size", "-", None),
    (DataConfig, "subset_size", "", None),
    (DataConfig, "hub_config", "wikitext-2-raw-v1", "wikitext-2-raw-v1"),
    (ModelConfig, "rope_scaling", '{"rope_type": "llama3", "factor": 8}', {"rope_type": "llama3", "factor": 8}),
    (TrainerConfig, "lr_schedule", "bogus", "bogus"),  # choices are the editor's and __post_init__'s job
])
def test_parse_value_by_field_type(cls, name, text, expected):
    value = parse_value(cls, name, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("cls, name, text, message", [
    (ModelConfig, "num_layers", "six", "expected an integer"),
    (ModelConfig, "num_layers", "2.5", "expected an integer"),
    (TrainerConfig, "learning_rate", "fast", "expected a number"),
    (TrainerConfig, "use_compile", "perhaps", "expected yes/no"),
    (TrainerConfig, "betas", "0.9", "expected 2 comma-separated values"),
    (TrainerConfig, "betas", "0.9, x", "expected 2 numbers"),
    (ModelConfig, "rope_scaling", "[1, 2]", "expected a JSON object"),
    (ModelConfig, "num_layer", "6", "has no field 'num_layer'"),
])
def test_parse_value_names_the_field_and_what_is_allowed(cls, name, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_value(cls, name, text)
    assert name in str(error.value)


def test_apply_overrides_validates_each_section_once_after_all_its_overrides(tiny):
    configs = {"model": tiny, "trainer": TrainerConfig()}
    updated = apply_overrides(configs, ["model.num_heads=8", "model.num_kv_heads=8", "trainer.learning_rate=3e-4"])
    assert (updated["model"].num_heads, updated["model"].num_kv_heads) == (8, 8)
    assert updated["trainer"].learning_rate == 3e-4
    assert configs["model"] is tiny  # the input is not modified


@pytest.mark.parametrize("override, message", [
    ("num_layers=6", "SECTION.FIELD=VALUE"),
    ("optimizer.lr=1", "unknown section 'optimizer'"),
    ("model.num_kv_heads=3", "num_kv_heads=3: must divide"),
    ("trainer.learning_rate=-1", "learning_rate"),
])
def test_apply_overrides_refuses_with_a_clear_error(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({"model": tiny, "trainer": TrainerConfig()}, [override])


# ---- format_value / fields_of / render_table ---------------------------------------------------
@pytest.mark.parametrize("value, text", [
    (True, "yes"), (False, "no"), (3e-4, "0.0003"), (1e-5, "1e-05"), (10000.0, "10000"),
    ((0.9, 0.95), "0.9, 0.95"), (None, "-"), (8192, "8192"), ("cosine", "cosine"),
])
def test_format_value(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize("config", [ModelConfig(), TrainerConfig(), DataConfig(), LoRAConfig(), Toy(label="x")])
def test_every_shown_value_reads_back_as_itself(config):
    for field in fields_of(config):
        value = getattr(config, field.name)
        assert parse_value(type(config), field.name, format_value(value)) == value, field.name


def test_fields_of_keeps_declaration_order():
    assert [f.name for f in fields_of(Toy)] == ["size", "mode", "ratio", "label"]
    assert [f.name for f in fields_of(ModelConfig())][:3] == ["vocab_size", "num_dims", "num_heads"]


@pytest.mark.parametrize("config", [ModelConfig(), TrainerConfig()])
def test_render_table_lists_every_field_with_its_help(config):
    screen = Console(file=io.StringIO(), width=200, color_system=None)
    screen.print(render_table(config, "section", [("parameters", "1.23M")]))
    text = output(screen)
    for field in fields_of(config):
        assert field.name in text
    assert config.__dataclass_fields__[fields_of(config)[0].name].metadata["help"] in text
    assert "parameters" in text and "1.23M" in text


def test_render_table_shows_choices():
    screen = Console(file=io.StringIO(), width=200, color_system=None)
    screen.print(render_table(TrainerConfig(), "trainer"))
    assert "choices: cosine, linear, constant" in output(screen)


def test_a_new_config_class_is_rendered_and_edited_without_editor_changes():
    screen = Console(file=io.StringIO(), width=200, color_system=None)
    screen.print(render_table(Toy(), "toy"))
    assert all(word in output(screen) for word in ("size", "how big the toy is", "choices: plain, fancy", "label"))
    result, text = edit({"toy": Toy()}, "toy", "size=5 ratio=0.25\nmode\nFANCY\n4\nbox\n\n")
    assert result["toy"] == Toy(size=5, mode="fancy", ratio=0.25, label="box")
    assert "size: 3 -> 5" in text and "mode: plain -> fancy" in text


# ---- the editor: changes ------------------------------------------------------------------------
def row_of(config, name: str) -> int:
    return [f.name for f in fields_of(config)].index(name) + 1


def test_editor_sets_by_row_number_and_by_name(configs):
    row = row_of(configs["model"], "num_layers")
    result, text = edit(configs, "model", f"{row}\n6\nnum_dims\n64\n\n")
    assert result["model"] == dataclasses.replace(configs["model"], num_layers=6, num_dims=64)
    assert "num_layers: 2 -> 6" in text and "num_dims: 32 -> 64" in text
    assert "transformer blocks" in text  # the field's help is shown before asking
    assert result["trainer"] is configs["trainer"]


def test_editor_accepts_scientific_learning_rate_and_prints_derived_figures(configs):
    result, text = edit(configs, "trainer", "learning_rate\n3e-4\nbatch_size=4 accumulation_steps=2\n\n",
                        derived=summary_figures)
    assert result["trainer"].learning_rate == 3e-4
    assert "learning_rate: 0.001 -> 0.0003" in text
    assert "tokens per optimizer step: 2,048" in text  # 4 * 2 * 256, printed after the change


def test_editor_enter_keeps_a_value_and_choices_match_case_insensitively(configs):
    result, text = edit(configs, "trainer", "learning_rate\n\nlr_schedule=Linear\ndone\n")
    assert result["trainer"] == TrainerConfig(lr_schedule="linear")
    assert "learning_rate unchanged" in text


@pytest.mark.parametrize("section, valid, invalid, expected_message", [
    ("model", "num_layers=6", "num_heads=abc", "num_heads='abc': expected an integer"),
    ("model", "num_layers=6", "num_kv_heads=3", "num_kv_heads=3: must divide num_heads=4"),
    ("model", "num_layers=6", "num_laayers=3", "Unknown field 'num_laayers'"),
    ("model", "num_layers=6", "99", "No row 99: rows are 1-"),
    ("model", "num_layers=6", "num_layers=8 wat", "num_layers='8 wat': expected an integer"),
    ("model", "num_layers=6", "=5", "Cannot read '=5'"),
    ("trainer", "batch_size=16", "learning_rate=-1e-3", "learning_rate=-0.001: must be a number in (0, 10)"),
    ("trainer", "batch_size=16", "learning_rate=0", "learning_rate=0.0: must be a number in (0, 10)"),
    ("trainer", "batch_size=16", "lr_schedule=bogus", "lr_schedule='bogus': must be one of cosine, linear, constant"),
    ("trainer", "batch_size=16", "batch_size=32 optimizer=sgd", "optimizer='sgd': must be one of"),
])
def test_an_invalid_change_is_refused_and_the_last_valid_state_kept(configs, section, valid, invalid,
                                                                    expected_message):
    result, text = edit(configs, section, f"{valid}\n{invalid}\n\n")
    name, _, value = valid.partition("=")
    assert result[section] == dataclasses.replace(configs[section], **{name: int(value)})
    assert expected_message in " ".join(text.split())
    assert text.count(EDIT_PROMPT) == 3  # asked again after the refusal


def test_an_invalid_value_for_one_field_asks_for_that_field_again(configs):
    result, text = edit(configs, "trainer", "batch_size=16\nlearning_rate\n-1\nabc\n3e-4\n\n")
    assert result["trainer"] == TrainerConfig(batch_size=16, learning_rate=3e-4)
    assert text.count("New learning_rate") == 3
    assert "expected a number" in text


def test_heads_and_kv_heads_change_together_where_each_alone_is_invalid():
    model = ModelConfig.from_name("tiny", num_dims=96, num_heads=4, num_kv_heads=4)
    result, text = edit({"model": model}, "model", "num_heads=6\nnum_kv_heads=3\nnum_heads=6 num_kv_heads=3\n\n")
    assert text.count("Not changed") == 2
    assert (result["model"].num_heads, result["model"].num_kv_heads) == (6, 3)
    assert "num_heads: 4 -> 6" in text and "num_kv_heads: 4 -> 3" in text


def test_a_cross_field_refusal_suggests_changing_both_and_the_value_prompt_takes_them():
    model = ModelConfig.from_name("tiny", num_dims=96, num_heads=4, num_kv_heads=4)
    result, text = edit({"model": model}, "model", "num_heads\n6\nnum_heads=6 num_kv_heads=3\n\n")
    assert "Change them together, e.g. num_heads=6 num_kv_heads=..." in " ".join(text.split())
    assert (result["model"].num_heads, result["model"].num_kv_heads) == (6, 3)


def test_lightlm_aliases_set_the_one_home_of_each_switch(configs, tmp_path):
    """LightLM keeps use_moe, use_flash, ... in both ModelConfig and TrainerConfig; here each
    lives in one config and the other name means the same setting."""
    assert not hasattr(configs["trainer"], "use_moe") and not hasattr(configs["model"], "use_flash")
    updated = apply_overrides(configs, ["trainer.use_moe=yes", "model.gradient_checkpointing=yes"])
    assert updated["model"].use_moe and updated["trainer"].gradient_checkpointing
    with pytest.raises(ConfigError, match="two values"):
        apply_overrides(configs, ["model.use_flash=no", "trainer.use_flash=yes"])
    assert not apply_overrides(configs, ["model.use_flash=no", "trainer.use_flash=no"])["trainer"].use_flash

    result, text = edit(configs, "trainer", "use_moe=yes learning_rate=3e-4\n\n")
    assert result["model"].use_moe and result["trainer"].learning_rate == 3e-4
    assert "trainer.use_moe is model.use_moe" in text and "use_moe: no -> yes" in text
    result, text = edit(configs, "model", "use_flash\nno\n\n")  # the one-field prompt follows the alias too
    assert not result["trainer"].use_flash and "model.use_flash is trainer.use_flash" in " ".join(text.split())

    path = tmp_path / "moe.json"
    path.write_text(json.dumps({"trainer": {"use_lossfreebalance": True}}))
    loaded, ignored = load_configs(path, configs)
    assert loaded["model"].use_lossfreebalance and not ignored


def test_a_run_json_that_kept_both_sides_loads_as_the_run_used_it(configs, tmp_path):
    """run.json files written while both configs held the switches: the trainer's use_flash
    and gradient_checkpointing were the ones applied, the model's use_moe the one built."""
    old = {"model": {**configs["model"].to_dict(), "use_moe": True, "gradient_checkpointing": False,
                     "use_flash": True},
           "trainer": {**configs["trainer"].to_dict(), "use_moe": False, "gradient_checkpointing": True,
                       "use_flash": False}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(old))
    moe_now = apply_overrides(configs, ["model.use_moe=yes"])
    for current in (configs, moe_now):  # whatever is loaded now
        loaded, ignored = load_configs(path, current)
        assert loaded["model"].use_moe and loaded["trainer"].gradient_checkpointing
        assert not loaded["trainer"].use_flash and not ignored
    assert ModelConfig.from_dict(old["model"]).use_moe  # a section read alone skips what lives elsewhere


def test_reset_to_a_preset(configs):
    presets = {name: (lambda name=name: ModelConfig.from_name(name)) for name in ("tiny", "2M")}
    result, text = edit(configs, "model", "num_layers=7\nreset\n2M\n\n", presets=presets)
    assert result["model"] == ModelConfig.from_name("2M")
    assert "reset to preset 2M" in text
    result, _ = edit(configs, "model", "num_layers=7\nreset\n\n\n", presets=presets)  # default: the first
    assert result["model"] == ModelConfig.from_name("tiny")


def test_reset_without_presets_keeps_the_config(configs):
    result, text = edit(configs, "model", "num_layers=7\nreset\n\n")
    assert result["model"].num_layers == 7
    assert "no presets" in text


def test_help_and_show(configs):
    _, text = edit(configs, "model", "help\nshow\nq\n")
    assert "save PATH" in text and "reset" in text
    assert text.count("model (ModelConfig)") == 2  # shown at the start and on `show`


def test_end_of_input_goes_up_one_level_and_keeps_accepted_changes(configs):
    """Ctrl-D (or a closed input) at a value prompt drops that value; at the Edit prompt it
    leaves the table with what was accepted."""
    result, text = edit(configs, "model", "num_layers=6\n")
    assert result["model"].num_layers == 6
    result, text = edit(configs, "model", "num_layers=6\nnum_dims\n")
    assert result["model"] == dataclasses.replace(configs["model"], num_layers=6)
    assert "Nothing changed" in text
    result, _ = edit(configs, "model", "reset\n", presets={"tiny": lambda: ModelConfig.from_name("tiny")})
    assert result["model"] == configs["model"]


class Keys(io.StringIO):
    """Input lines where the line "^C" is a Ctrl-C (KeyboardInterrupt, as a terminal raises it)."""

    def readline(self, *args) -> str:
        line = super().readline(*args)
        if line == "^C\n":
            raise KeyboardInterrupt
        return line


def test_ctrl_c_drops_the_value_being_typed_then_leaves_the_table_saying_so(configs):
    screen = console()
    editor = ConfigEditor(screen, Keys("num_layers=6\nnum_dims\n^C\n^C\n"))
    result = editor.edit(configs, "model")
    text = output(screen)
    assert result["model"] == dataclasses.replace(configs["model"], num_layers=6)
    assert "Ctrl-C: cancelled; nothing changed" in text
    assert "Ctrl-C: left the table; the changes shown above are kept" in text


@pytest.mark.parametrize("back", ["b", "back", "\x1b", ""])
def test_b_esc_and_enter_leave_the_table_and_keep_the_value(configs, back):
    result, text = edit(configs, "model", f"num_layers\n{back}\n{back}\nnum_dims=64\n")
    assert result["model"] == configs["model"]
    assert "num_layers unchanged" in text and "num_dims" not in text.split("num_layers unchanged")[1]


# ---- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_then_load_round_trip(tmp_path, suffix):
    original = {"model": ModelConfig.from_name("tiny", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                     "original_max_position_embeddings": 16}),
                "trainer": TrainerConfig(betas=(0.8, 0.99), learning_rate=3e-4, min_lr=1e-5),
                "data": DataConfig(subset_size=100),
                "lora": LoRAConfig(target_modules=("wq", "wv"))}
    path = save_configs(tmp_path / f"run{suffix}", original)
    assert [p.name for p in tmp_path.iterdir()] == [f"run{suffix}"]  # no temporary file left behind
    defaults = {"model": ModelConfig(), "trainer": TrainerConfig(), "data": DataConfig(), "lora": LoRAConfig()}
    loaded, ignored = load_configs(path, defaults)
    assert loaded == original and ignored == []
    assert isinstance(loaded["trainer"].betas, tuple)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_editor_save_then_load_in_another_session(configs, tmp_path, suffix):
    path = tmp_path / f"configs{suffix}"
    saved, text = edit(configs, "model", f"num_layers=6\nsave {path}\n\n")
    assert "Saved model, trainer, data" in text
    fresh = {"model": ModelConfig(), "trainer": TrainerConfig(batch_size=2), "data": DataConfig()}
    loaded, text = edit(fresh, "model", f"load {path}\n\n")
    assert loaded == saved
    assert "num_layers: 4 -> 6" in text and "trainer: 1 field(s) changed" in text


def test_load_reports_unknown_keys_and_skips_run_bookkeeping(configs, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"num_layers": 3, "num_experts_typo": 8}, "optimizer": {"lr": 1},
                                "created": "2025-01-01 00:00:00", "torch": "2.11.0"}))
    loaded, ignored = load_configs(path, configs)
    assert ignored == ["model.num_experts_typo", "optimizer"]
    assert loaded["model"] == dataclasses.replace(configs["model"], num_layers=3)
    result, text = edit(configs, "model", f"load {path}\n\n")
    assert "Ignored unknown keys: model.num_experts_typo, optimizer" in text
    assert result["model"].num_layers == 3


def test_load_reads_hand_written_yaml_numbers(configs, tmp_path):
    path = tmp_path / "hand.yaml"
    path.write_text("trainer:\n  learning_rate: 3e-4\n  betas: [0.9, 0.99]\n  max_steps: 1e3\n")
    loaded, _ = load_configs(path, configs)  # YAML reads 3e-4 and 1e3 as strings
    assert loaded["trainer"] == TrainerConfig(learning_rate=3e-4, betas=(0.9, 0.99), max_steps=1000)


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "no such file"),
    ("broken.json", '{"model": {"num_layers": 3,', "not valid JSON"),
    ("broken.yaml", "model:\n  num_layers: [3\n", "not valid YAML"),
    ("list.json", "[1, 2]", "expected sections"),
    ("section.json", '{"model": 3}', "section 'model' must hold field: value pairs"),
    ("invalid.json", '{"model": {"num_kv_heads": 3}}', "num_kv_heads=3: must divide"),
    ("wrong_type.json", '{"model": {"use_moe": 3}}', "ModelConfig.use_moe=3: expected bool"),
    ("text.json", '{"model": {"num_layers": "many"}}', "num_layers='many': expected an integer"),
])
def test_load_errors_name_the_file_and_the_reason(configs, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        load_configs(path, configs)
    assert str(path) in str(error.value)


def test_a_failed_load_keeps_the_state_and_prints_the_error(configs, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    result, text = edit(configs, "model", f"num_layers=6\nload {path}\n\n")
    assert result["model"] == dataclasses.replace(configs["model"], num_layers=6)
    assert "Not loaded, nothing changed" in text and "not valid JSON" in text


def test_save_refuses_unknown_suffixes_and_missing_pyyaml(configs, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"\.json, \.yaml or \.yml"):
        save_configs(tmp_path / "run.toml", configs)
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(ConfigError, match="PyYAML"):
        save_configs(tmp_path / "run.yaml", configs)
    result, text = edit(configs, "model", f"num_layers=6\nsave {tmp_path / 'run.yaml'}\n\n")
    assert "Not saved" in text and "use a .json file" in text
    assert result["model"].num_layers == 6
    assert not list(tmp_path.iterdir())


def test_summary_figures_count_parameters_and_tokens(configs):
    figures = dict(summary_figures(configs))
    assert figures["head dim"] == "8"
    assert figures["tokens per optimizer step"] == "2,048"
    assert figures["parameters"].endswith("K")
    assert "active parameters" in dict(summary_figures({"model": ModelConfig.from_name("tiny", use_moe=True)}))


def test_the_editor_refuses_a_model_that_cannot_fit_in_memory(configs):
    result, text = edit(configs, "model", "num_layers=10000000\n\n")
    assert result["model"].num_layers == configs["model"].num_layers
    assert "Not changed: this model needs" in " ".join(text.split()) and "GiB" in text


# ---- 80 columns, help on request, checks at entry ---------------------------------------------
@pytest.mark.parametrize("config", [ModelConfig(), TrainerConfig(), DataConfig(), LoRAConfig()])
def test_the_brief_table_is_one_line_a_field_at_80_columns(config):
    screen = Console(file=io.StringIO(), width=80, color_system=None)
    screen.print(render_table(config, "section", brief=True))
    lines = output(screen).splitlines()
    rows = [line for line in lines if re.match(r"│\s+\d+ │", line)]
    assert len(rows) == len(fields_of(config))
    continued = [line for line in lines if re.match(r"│\s+│", line)]  # a long value wraps in its column ...
    assert all(line.split("│")[-2].strip() == "" for line in continued)  # ... the help never does
    assert max(map(len, lines)) <= 80


def test_help_field_shows_the_whole_help_and_the_choices(configs):
    _, text = edit(configs, "trainer", "help lr_schedule\n? device\nuse_dtype?\n\n")
    words = " ".join(text.split())
    assert "lr_schedule: " + TrainerConfig.__dataclass_fields__["lr_schedule"].metadata["help"] in words
    assert "choices: cosine, linear, constant" in words and "choices: auto, cpu, cuda" in words
    assert "use_dtype:" in words


@pytest.mark.parametrize("config", [ModelConfig(), TrainerConfig(), LoRAConfig()])
def test_the_commands_example_names_a_row_and_its_own_field(config):
    text = editor_help(config)
    row, name = re.search(r"(\d+)\[/cyan\] or \[cyan\](\w+)", text).groups()
    assert fields_of(config)[int(row) - 1].name == name


def test_reset_to_the_current_values_says_so_once(configs):
    presets = {"tiny": lambda: ModelConfig.from_name("tiny")}
    _, text = edit(configs, "model", "reset\ntiny\n\n", presets=presets)
    assert "already is preset tiny: nothing changed" in text
    assert "reset to preset" not in text and "No change" not in text


def test_a_device_this_machine_lacks_is_refused_when_typed(configs, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result, text = edit(configs, "trainer", "device=cuda\ndevice\ncuda\ncpu\n\n")
    assert result["trainer"].device == "cpu"
    assert " ".join(text.split()).count("Not changed: TrainerConfig.device='cuda' but no CUDA device") == 2


def test_a_data_source_that_does_not_exist_is_refused_when_typed(configs, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.docx").write_text("x")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text")
    lines = [f"source={tmp_path / 'nonexistent'}", f"source={tmp_path / 'empty'}", f"source={tmp_path / 'notes.docx'}",
             "source=wikitext", f"source={corpus}", ""]
    result, text = edit(configs, "data", "\n".join(lines) + "\n")
    words = " ".join(text.split())
    assert "no such file or folder" in words and "holds no" in words and "is not one of" in words
    assert result["data"].source == str(corpus)  # a hub name and a real file are accepted
    assert "source: builtin -> wikitext" in words


def test_lora_targets_that_match_nothing_are_refused_when_typed(configs):
    configs = {**configs, "lora": LoRAConfig()}
    result, text = edit(configs, "lora", "target_modules=wq,wv\ntarget_modules=q_proj,v_proj\n\n")
    assert result["lora"].target_modules == ("q_proj", "v_proj")
    words = " ".join(text.split())
    assert "'wq', 'wv' match no linear layer" in words and "q_proj" in words
