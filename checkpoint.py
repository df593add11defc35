"""Checkpoint directories: atomic save, verified load, discovery of the latest one.

A checkpoint is a directory (`epoch_N/`, `step_N/`) holding `model.safetensors`,
`optimizer.pt` (tensors and plain containers only, read with `weights_only=True`),
`trainer_state.json` and `manifest.json` (SHA-256 of every other file). It is written
under a hidden temporary name, fsynced, and renamed into place, so a crash leaves either
the old state or the new one, never half of one. Nothing here unpickles arbitrary
objects.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
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
    clean_stale(directory.parent)
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    try:
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
    except Exception as error:  # noqa: BLE001 - safetensors and torch report a full disk in their own types
        try:
            full = shutil.disk_usage(directory.parent).free < (1 << 20)  # measured before the cleanup frees it
        except OSError:
            full = False
        shutil.rmtree(temporary, ignore_errors=True)
        raise _write_error(directory, error, full) from None
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


STALE_PATTERN = re.compile(r"^\.((?:epoch|step)_\d+)\.(tmp|old)-(\d+)$")  # a save's temporary directories


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(run_dir: str | Path) -> list[str]:
    """Remove the temporary directories of saves whose process died (kill -9, a full disk);
    returns their names. A save killed between its two renames (replacing a checkpoint of
    the same name) left no `step_N` at all: the complete new copy, else the old one, is put
    back in its place instead. Directories of live processes (a save under way) are left."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    stale = [(path, STALE_PATTERN.match(path.name)) for path in run_dir.iterdir()]
    stale = [(path, match) for path, match in stale
             if match and int(match.group(3)) != os.getpid() and not _alive(int(match.group(3)))]
    for path, match in sorted(stale, key=lambda item: item[1].group(2) != "tmp"):  # the new copy first
        final = run_dir / match.group(1)
        if not final.exists() and verify(path) is None:
            path.rename(final)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _write_error(directory: Path, error: BaseException, disk_full: bool) -> OSError:
    """A failed checkpoint write as an OSError that says what happened and that the earlier
    checkpoints are intact (the disk filling up shows as a SafetensorError or a torch
    RuntimeError, not always as ENOSPC)."""
    number = getattr(error, "errno", None)
    if disk_full or number == errno.ENOSPC or "no space" in str(error).lower():
        reason = "the disk is full"
    elif number in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "the directory cannot be written (permissions, or a read-only file system)"
    else:
        reason = f"{type(error).__name__}: {str(error)[:200]}"
    return OSError(number, f"cannot save checkpoint {directory.name}: {reason}. Nothing was half-written: the "
                           f"earlier checkpoints are intact; free space (or fix the permissions) and resume",
                   str(directory))


def verify(directory: str | Path, skip: tuple[str, ...] = ()) -> Optional[str]:
    """None when every file of the checkpoint (but those in `skip`) matches its manifest;
    else what is wrong."""
    directory = Path(directory)
    problem = looks_complete(directory)
    if problem:
        return problem
    for name, expected in json.loads((directory / MANIFEST_FILE).read_text()).items():
        if name not in skip and _sha256(directory / name) != expected:
            return f"{directory.name}: {name} does not match its checksum (corrupt)"
    return None


def _global_step(directory: Path) -> Optional[int]:
    """The checkpoint's global step, or None when its state file cannot say."""
    try:
        state = read_state(directory)
    except (OSError, ValueError, RecursionError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_state(directory: str | Path) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load(directory: str | Path, map_location: str | torch.device = "cpu",
         with_optimizer: bool = True) -> tuple[dict, Optional[dict], dict]:
    """(model state, optimizer state or None, trainer state) of a verified checkpoint;
    `with_optimizer=False` (generate, eval, export) neither checks nor reads optimizer.pt."""
    directory = Path(directory)
    problem = verify(directory, skip=() if with_optimizer else (OPTIMIZER_FILE,))
    if problem:
        raise CheckpointError(problem)
    try:
        state = read_state(directory)
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{directory.name}: {STATE_FILE} cannot be read ({str(error)[:120]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"{directory.name}: {STATE_FILE} holds no global_step")
    model_state = load_file(str(directory / MODEL_FILE), device=str(map_location))
    from safetensors import safe_open

    with safe_open(str(directory / MODEL_FILE), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        model_state[name] = model_state[target]
    optimizer_state = None
    if with_optimizer and (directory / OPTIMIZER_FILE).exists():
        try:
            optimizer_state = torch.load(directory / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(f"{directory.name}: {OPTIMIZER_FILE} holds something other than tensors and plain "
                                  f"containers ({type(error).__name__}); refused, since unpickling it could run "
                                  f"code") from None
    return model_state, optimizer_state, state


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run (not temporary ones), oldest first by global step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name)]

    def order(path: Path) -> tuple[int, int]:
        step = _global_step(path)
        return (-1, 0) if step is None else (step, path.stat().st_mtime_ns)

    return sorted(found, key=order)


def looks_complete(directory: str | Path) -> Optional[str]:
    """What `verify` finds without reading the files' contents: a readable manifest naming
    files that exist. None when nothing is visibly missing."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"{directory.name}: no {MANIFEST_FILE} (partial write?)"
    except (OSError, ValueError, RecursionError):
        return f"{directory.name}: {MANIFEST_FILE} is corrupt"
    if not isinstance(manifest, dict) or not {MODEL_FILE, STATE_FILE} <= set(manifest):
        return f"{directory.name}: {MANIFEST_FILE} lacks {MODEL_FILE} or {STATE_FILE}"
    if not set(manifest) <= {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE} or \
            not all(isinstance(digest, str) for digest in manifest.values()):
        return f"{directory.name}: {MANIFEST_FILE} names files a checkpoint does not have"
    missing = [name for name in manifest if not (directory / name).is_file()]
    return f"{directory.name}: {missing[0]} is missing" if missing else None


def latest(run_dir: str | Path, on_skip: Optional[Callable[[str], None]] = None,
           verify_contents: bool = True) -> Optional[Path]:
    """The newest checkpoint that verifies (every checksum; with `verify_contents=False`
    only that its files are there, for listings); each skipped one is reported."""
    check = verify if verify_contents else looks_complete
    for path in reversed(candidates(run_dir)):
        problem = check(path)
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(f"skipping checkpoint {problem}")
    return None


def load_latest(run_dir: str | Path, name: Optional[str] = None, on_skip: Optional[Callable[[str], None]] = None,
                with_optimizer: bool = True) -> tuple[Path, dict, Optional[dict], dict]:
    """(path, model state, optimizer state, trainer state) of the checkpoint `name`, or of
    the newest one that verifies; each checkpoint is hashed once, as it is loaded."""
    run_dir = Path(run_dir)
    if name:
        path = run_dir / name
        if not path.is_dir():
            raise CheckpointError(f"{name}: no such checkpoint in {run_dir}")
        return (path, *load(path, with_optimizer=with_optimizer))
    complete = []
    for path in candidates(run_dir):  # every broken one is named, wherever it sorts
        problem = looks_complete(path)
        if problem is None and _global_step(path) is None:
            problem = f"{path.name}: {STATE_FILE} holds no global_step"
        if problem is None:
            complete.append(path)
        elif on_skip is not None:
            on_skip(f"skipping checkpoint {problem}")
    for path in reversed(complete):
        try:
            return (path, *load(path, with_optimizer=with_optimizer))
        except CheckpointError as error:
            if on_skip is not None:
                on_skip(f"skipping checkpoint {error}")
    raise CheckpointError(f"{run_dir} has no complete checkpoint")


def set_aside_later(run_dir: str | Path, resumed_from: Path, step: int) -> list[str]:
    """Resuming from an older checkpoint abandons the later ones: hide them (renamed, not
    deleted) so `latest` and pruning never mistake them for this run's future. A checkpoint
    whose state cannot be read is left where it is (`latest` skips it). Returns the names."""
    moved = []
    for other in candidates(run_dir):
        try:
            later = other != resumed_from and int(read_state(other)["global_step"]) > step
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if later:
            other.rename(other.with_name(f".abandoned-{other.name}-{int(time.time())}"))
            moved.append(other.name)
    return moved


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
