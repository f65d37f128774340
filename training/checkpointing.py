"""Atomic checkpoints and output folders: a run killed at any moment never leaves a half-written one in use.

Everything is written into a hidden temporary folder beside its destination, then renamed into place
(a rename is atomic on POSIX file systems). A folder named `checkpoint-<step>` is therefore always complete;
temporary folders left by a killed run are ignored by `latest_checkpoint` and removed on the next save.
"""

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Callable, Optional, Union


CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILENAME = "training_state.json"
TEMPORARY_PREFIX = ".tmp-"
REPLACED_PREFIX = ".old-"
# Test hook: kill the process (SIGKILL) while checkpoint <step> is being written, after its files are on disk
# but before it is renamed into place - the worst moment for a non-atomic scheme.
KILL_DURING_CHECKPOINT_ENV = "SCRATCH_DIFFUSION_DEBUG_KILL_DURING_CHECKPOINT"


def replace_directory(temporary: Path, destination: Path) -> None:
    """Move a finished `temporary` folder to `destination`, replacing any previous one."""
    replaced = destination.with_name(REPLACED_PREFIX + destination.name)
    if replaced.exists():
        shutil.rmtree(replaced)
    if destination.exists():
        os.rename(destination, replaced)
    os.rename(temporary, destination)
    if replaced.exists():
        shutil.rmtree(replaced)


def recover_directory(destination: Path) -> None:
    """Undo a replacement interrupted between its two renames (the previous folder is still complete)."""
    replaced = destination.with_name(REPLACED_PREFIX + destination.name)
    if replaced.exists() and not destination.exists():
        try:
            os.rename(replaced, destination)
        except FileNotFoundError:
            pass  # another process of the same run recovered it first


def write_atomically(destination: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Call `write(folder)` on a temporary folder, then rename it to `destination`."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(TEMPORARY_PREFIX + destination.name)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    write(temporary)
    replace_directory(temporary, destination)
    return destination


def checkpoint_step(path: Union[str, os.PathLike]) -> Optional[int]:
    """The step of a complete checkpoint folder name `checkpoint-<step>`, else None."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Union[str, os.PathLike]) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not folder.is_dir():
        return []
    for entry in folder.iterdir():
        if entry.name.startswith(REPLACED_PREFIX):
            recover_directory(entry.with_name(entry.name[len(REPLACED_PREFIX):]))
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / TRAINING_STATE_FILENAME).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The newest complete checkpoint, or None when there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: Union[str, os.PathLike]) -> Optional[Path]:
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


def read_training_state(checkpoint: Union[str, os.PathLike]) -> dict:
    """The loop's own counters saved beside accelerate's state (step, best metric, ...)."""
    with open(Path(checkpoint) / TRAINING_STATE_FILENAME) as file:
        return json.load(file)


def save_checkpoint(accelerator, output_dir: Union[str, os.PathLike], step: int, training_state: dict,
                    total_limit: Optional[int] = None) -> Path:
    """`accelerator.save_state` (models, optimizer, registered objects, RNG) into `checkpoint-<step>`, atomically.

    Every process writes its RNG state into the same temporary folder (a shared file system is assumed, as
    accelerate does); the main process then adds the loop's counters, renames the folder into place and
    removes the oldest checkpoints beyond `total_limit`.
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
        if os.environ.get(KILL_DURING_CHECKPOINT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        # The counters file is written last: a folder that has it holds everything resume needs.
        with open(temporary / TRAINING_STATE_FILENAME, "w") as file:
            json.dump({**training_state, "step": step}, file, indent=2)
        replace_directory(temporary, destination)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return destination
