"""Scripted walkthroughs of the wizard: a test names each step (the menu item by its label,
the prompt it answers), and the keyboard checks that the wizard is asking that question
before it types the answer. A step the wizard does not ask for stops the test there with
the screen so far, instead of typing a key into the wrong prompt.

    walk = Walkthrough(tmp_path)
    walk.main("Manage dataset/configuration")
    walk.manage("Optimize for training time")
    walk.answer("desired training time", "0.001")
    walk.main("Exit")
    code, wizard, screen = walk.run()
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console

from wizard import DATASET_MENU, MAIN_MENU, MANAGE_MENU, Wizard

CTRL_C = "<Ctrl-C>"  # the terminal raises KeyboardInterrupt in the read
CTRL_D = "<Ctrl-D>"  # the terminal's read returns nothing, once
ESC = "\x1b"  # Esc, then Enter


class WrongPrompt(BaseException):
    """The wizard asked something else than the script's next step (a BaseException, so
    no menu turns it into an error message and carries on)."""


@dataclass
class Step:
    name: str  # what the step does, for the failure message
    prompt: str  # text the line being asked must contain
    key: str  # the line typed, or CTRL_C / CTRL_D


class Keyboard(io.TextIOBase):
    """Types the steps' keys, each after checking the prompt on the screen."""

    def __init__(self, steps: list[Step], screen: io.StringIO, closes: bool):
        self.steps = list(steps)
        self.screen = screen
        self.closes = closes  # after the last step the input ends (else: a further read is a failure)
        self.typed: list[str] = []
        self.prompts: list[str] = []  # each prompt as it stood when its answer was typed

    def readline(self, size: int = -1) -> str:
        asked = self.screen.getvalue().rsplit("\n", 1)[-1]
        if not self.steps:
            if self.closes:
                return ""
            raise WrongPrompt(f"the script has ended but the wizard asks {asked!r}\n--- screen ---\n"
                              f"{self.screen.getvalue()[-3000:]}")
        step = self.steps.pop(0)
        self.prompts.append(asked)
        if step.prompt not in asked:
            raise WrongPrompt(f"step {step.name!r} expects a prompt with {step.prompt!r}, the wizard asks "
                              f"{asked!r}\n--- screen ---\n{self.screen.getvalue()[-3000:]}")
        self.typed.append(step.key)
        if step.key == CTRL_C:
            raise KeyboardInterrupt
        if step.key == CTRL_D:
            return ""
        return step.key + "\n"


def key_of(items: tuple, label: str) -> str:
    keys = [key for key, text in items if text == label or text.split(" (")[0] == label]
    assert len(keys) == 1, f"no menu item {label!r} in {[text for _, text in items]}"
    return keys[0]


class Walkthrough:
    """A person at the wizard, step by step (see the module's docstring)."""

    def __init__(self, tmp_path: Path, width: int = 120):
        self.tmp_path = tmp_path
        self.width = width
        self.steps: list[Step] = []
        self.closes = False
        self.keyboard: Optional[Keyboard] = None

    # ---- steps ----
    def main(self, label: str) -> "Walkthrough":
        return self._step(f"main menu: {label}", f"Select option (1-{len(MAIN_MENU)})", key_of(MAIN_MENU, label))

    def manage(self, label: str) -> "Walkthrough":
        return self._step(f"configuration menu: {label}", f"Select option (1-{len(MANAGE_MENU)})",
                          key_of(MANAGE_MENU, label))

    def dataset(self, label: str) -> "Walkthrough":
        return self._step(f"dataset menu: {label}", f"Select option (1-{len(DATASET_MENU)})",
                          key_of(DATASET_MENU, label))

    def table(self, section: str) -> "Walkthrough":
        sections = ("model", "trainer", "data", "lora")
        return self._step(f"edit table {section}", "Select table", str(sections.index(section) + 1))

    def edit(self, *lines: str) -> "Walkthrough":
        """Lines typed at the table editor's Edit prompt."""
        for line in lines:
            self._step(f"edit: {line!r}", "Edit", line)
        return self

    def answer(self, prompt: str, text: str) -> "Walkthrough":
        return self._step(f"answer {text!r} to {prompt!r}", prompt, text)

    def press(self, prompt: str, key: str) -> "Walkthrough":
        """CTRL_C, CTRL_D or ESC at a prompt."""
        names = {CTRL_C: "Ctrl-C", CTRL_D: "Ctrl-D", ESC: "Esc"}
        return self._step(f"{names.get(key, key)} at {prompt!r}", prompt, key)

    def end_of_input(self) -> "Walkthrough":
        """The input closes after the last step (stdin at its end)."""
        self.closes = True
        return self

    def use_corpus(self, path: Path) -> "Walkthrough":
        """Manage → Change dataset → a local file (the configuration menu stays open)."""
        self.main("Manage dataset/configuration").manage("Change dataset")
        return self.dataset("a local file or folder").answer("Path to the file or folder", str(path))

    def _step(self, name: str, prompt: str, key: str) -> "Walkthrough":
        self.steps.append(Step(name, prompt, key))
        return self

    # ---- running ----
    def run(self, **options) -> tuple[int, Wizard, str]:
        """The wizard from its first menu to its end; (exit code, wizard, screen). Every step
        must have been asked."""
        screen = io.StringIO()
        self.keyboard = Keyboard(self.steps, screen, self.closes)
        console = Console(file=screen, width=self.width, color_system=None)
        options = {"out_dir": self.tmp_path / "runs", "cache_dir": str(self.tmp_path / "cache"),
                   "run_checks": False, **options}
        wizard = Wizard(console, self.keyboard, **options)
        code = wizard.run()
        left = [step.name for step in self.keyboard.steps]
        assert not left, f"the wizard ended before these steps: {left}\n--- screen ---\n{screen.getvalue()[-3000:]}"
        return code, wizard, screen.getvalue()

    @property
    def typed(self) -> list[str]:
        return self.keyboard.typed if self.keyboard else []

    @property
    def prompts(self) -> list[str]:
        return self.keyboard.prompts if self.keyboard else []
