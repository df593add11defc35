"""Checkpoint directories: atomic save, verified load, discovery of the latest one.

A checkpoint is a directory (`epoch_N/`, `step_N/`) holding `model.safetensors`,
`optimizer.pt` (tensors and plain containers only, read with `weights_only=True`),
`trainer_state.json` and `manifest.json` (SHA-256 of every other file). It is written
under a hidden temporary name, fsynced, and renamed into place, so a crash leaves either
the old state or the new one, never half of one. Nothing here unpickles arbitrary
objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, MANIFEST_FILE = (
    "model.safetensors", "optimizer.pt", "trainer_state.json", "manifest.json")
NAME_PATTERN = re.compile(r"^(epoch|step)_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupt."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights), remembering
    which: safetensors stores each storage once."""
    unique, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.device.type != "meta" and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def save(directory: str | Path, model_state: dict[str, torch.Tensor], optimizer_state: Optional[dict],
         trainer_state: dict, before_rename: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a checkpoint atomically to `directory`. `before_rename` (for tests) runs
    after the files are written and before the directory is renamed into place."""
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    unique, aliases = split_aliases(model_state)
    save_file(unique, str(temporary / MODEL_FILE), metadata={"aliases": json.dumps(aliases)})
    files = [MODEL_FILE]
    if optimizer_state is not None:
        torch.save(optimizer_state, temporary / OPTIMIZER_FILE)
        files.append(OPTIMIZER_FILE)
    (temporary / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    files.append(STATE_FILE)
    manifest = {name: _sha256(temporary / name) for name in files}
    (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    for name in files + [MANIFEST_FILE]:
        _fsync(temporary / name)
    _fsync(temporary)
    if before_rename is not None:
        before_rename(temporary)
    if directory.exists():  # replacing a checkpoint of the same name: move the old one aside first
        stale = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(stale)
        temporary.rename(directory)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        temporary.rename(directory)
    _fsync(directory.parent)
    return directory


def verify(directory: str | Path) -> Optional[str]:
    """None when every file of the checkpoint matches its manifest; else what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        return f"{directory.name}: no {MANIFEST_FILE} (partial write?)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return f"{directory.name}: {MANIFEST_FILE} is corrupt"
    for required in (MODEL_FILE, STATE_FILE):
        if required not in manifest:
            return f"{directory.name}: manifest lacks {required}"
    for name, expected in manifest.items():
        path = directory / name
        if not path.exists():
            return f"{directory.name}: {name} is missing"
        if _sha256(path) != expected:
            return f"{directory.name}: {name} does not match its checksum (corrupt)"
    return None


def read_state(directory: str | Path) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Optional[dict], dict]:
    """(model state, optimizer state or None, trainer state) of a verified checkpoint."""
    directory = Path(directory)
    problem = verify(directory)
    if problem:
        raise CheckpointError(problem)
    model_state = load_file(str(directory / MODEL_FILE), device=str(map_location))
    from safetensors import safe_open

    with safe_open(str(directory / MODEL_FILE), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        model_state[name] = model_state[target]
    optimizer_state = None
    if (directory / OPTIMIZER_FILE).exists():
        optimizer_state = torch.load(directory / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
    return model_state, optimizer_state, read_state(directory)


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run (not temporary ones), oldest first by global step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name)]

    def order(path: Path) -> tuple[int, int]:
        try:
            return int(read_state(path).get("global_step", -1)), path.stat().st_mtime_ns
        except (OSError, json.JSONDecodeError):
            return -1, 0

    return sorted(found, key=order)


def latest(run_dir: str | Path, on_skip: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest checkpoint whose manifest verifies; each skipped one is reported."""
    for path in reversed(candidates(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(f"skipping checkpoint {problem}")
    return None


def prune(run_dir: str | Path, keep_last_n: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Delete all but the newest `keep_last_n` checkpoints, never those named in `protect`
    (the best one). Returns the names removed."""
    if keep_last_n <= 0:
        return []
    existing = candidates(run_dir)
    removed = []
    for path in existing[:-keep_last_n]:
        if path.name not in protect:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed
