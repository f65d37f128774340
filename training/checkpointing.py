"""Atomic checkpoints: a run killed at any moment never leaves a half-written one in use.

Each checkpoint is written into a hidden temporary folder beside its destination, then renamed into place
(`atomic_files`). A folder named `checkpoint-<step>` is therefore always complete; temporary folders left by a
killed run are ignored by `latest_checkpoint` and removed on the next save.
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from atomic_files import REPLACED_PREFIX, TEMPORARY_PREFIX, recover_directory, replace_directory, write_atomically

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "REPLACED_PREFIX",
    "TEMPORARY_PREFIX",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "read_training_state",
    "recover_directory",
    "resolve_resume_path",
    "save_checkpoint",
    "write_atomically",
]
CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILENAME = "training_state.json"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a complete checkpoint folder name `checkpoint-<step>`, else None."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not folder.is_dir():
        return []
    for entry in folder.iterdir():
        if entry.name.startswith(REPLACED_PREFIX):
            recover_directory(entry.with_name(entry.name[len(REPLACED_PREFIX) :]))
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / TRAINING_STATE_FILENAME).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None when there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`"latest"` -> the newest complete checkpoint (None if there is none yet); a path -> that checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILENAME).is_file():
        raise ValueError(
            f"'{path}' is not a complete checkpoint (no {TRAINING_STATE_FILENAME}); complete ones in {output_dir}: "
            f"{[p.name for p in list_checkpoints(output_dir)]}."
        )
    return path


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    """The loop's own counters saved beside accelerate's state (step, best metric, ...)."""
    with open(Path(checkpoint) / TRAINING_STATE_FILENAME) as file:
        return json.load(file)


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    training_state: dict,
    total_limit: int | None = None,
    before_commit: Callable[[int, Path], None] | None = None,
) -> Path:
    """`accelerator.save_state` (models, optimizer, registered objects, RNG) into `checkpoint-<step>`, atomically.

    Every process writes its RNG state into the same temporary folder (a shared file system is assumed, as
    accelerate does); the main process then adds the loop's counters, renames the folder into place and
    removes the oldest checkpoints beyond `total_limit`. `before_commit(step, temporary_folder)` runs on the main
    process when every file but the counters is on disk, just before the rename (tests kill the process there).
    """
    folder = Path(output_dir) / CHECKPOINTS_DIRNAME
    destination = folder / f"checkpoint-{step}"
    temporary = folder / (TEMPORARY_PREFIX + destination.name)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        # Leftovers of a run killed while saving: never complete, never resumed from.
        for leftover in folder.glob(TEMPORARY_PREFIX + "*"):
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if before_commit is not None:
            before_commit(step, temporary)
        # The counters file is written last: a folder that has it holds everything resume needs.
        with open(temporary / TRAINING_STATE_FILENAME, "w") as file:
            json.dump({**training_state, "step": step}, file, indent=2)
        replace_directory(temporary, destination)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return destination
