"""A run's `output_dir`: one run at a time, never over an earlier run's outputs, resumed only with its own settings.

- A lock file (`.run.lock`, the pid and host of the run holding it) is taken for the life of a run; a lock left
  by a killed run on this host is detected as stale and replaced.
- A fresh run refuses a folder that holds an earlier run's outputs unless told `--overwrite` (or to resume).
- A resumed run refuses settings that differ from the checkpoint's run, except those that only say how long to
  train, where to log and how to evaluate (`RESUMABLE_CHANGES`).
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .checkpointing import read_training_state, recover_directory, remove_leftovers, resolve_resume_path
from .config import ConfigError, RunConfig, parse_yaml, to_dict, upgrade_saved_config

LOCK_FILENAME = ".run.lock"
# What a run writes into its output_dir (`training.train`'s docstring lists them).
RUN_OUTPUTS = ("config.yaml", "metrics.csv", "checkpoints", "last", "best", "samples", "logs")
# Settings a resumed run may change: they do not alter the training trajectory up to the checkpoint.
# (A longer run with a decaying lr schedule continues on the longer schedule.)
RESUMABLE_CHANGES = (
    "output_dir",
    "overwrite",
    "train.num_epochs",
    "train.max_steps",
    "train.log_every_steps",
    "train.report_to",
    "data.num_workers",
    "checkpoint.",
    "eval.",
    "hub.",
)


def earlier_outputs(output_dir: Path) -> list[str]:
    """The names of an earlier run's outputs in `output_dir` (empty folders do not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def check_fresh_output_dir(output_dir: Path, *, overwrite: bool, restart_of_same_run: bool) -> list[str]:
    """Main process, before a fresh (not resumed) run: refuse an earlier run's outputs, or with `overwrite` (or
    when the same run is started again and never checkpointed) remove them. Returns the names removed."""
    outputs = earlier_outputs(output_dir)
    if not outputs:
        return []
    if not (overwrite or restart_of_same_run):
        checkpoints = " and resumable checkpoints" if "checkpoints" in outputs else ""
        raise ConfigError(
            f"{output_dir} already holds the outputs{checkpoints} of an earlier run ({', '.join(outputs)}); continue "
            "it with --checkpoint.resume_from_checkpoint latest, replace it with --overwrite, or choose another "
            "output_dir."
        )
    for name in outputs:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return outputs


def flatten_settings(data: dict, prefix: str = "") -> dict:
    """{"optim.learning_rate": 0.001, ...}: every leaf setting of a (saved or recipe) config."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting outside `RESUMABLE_CHANGES` that differs."""
    saved, current = flatten_settings(upgrade_saved_config(saved)), flatten_settings(current)
    changes = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith(RESUMABLE_CHANGES) or saved.get(key) == current.get(key):
            continue
        changes.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return changes


def check_resume_settings(checkpoint: Path, saved_config: dict, current_config: dict) -> None:
    """Refuse to resume `checkpoint` with settings that would not take effect consistently."""
    changes = changed_settings(saved_config, current_config)
    if changes:
        raise ConfigError(
            f"Resuming {checkpoint} with settings that differ from the run that wrote it: {'; '.join(changes)}. "
            "A resumed run keeps the checkpoint's model, optimizer and data order, so these would not apply (or "
            "apply only from here on); resume with the original settings, or start a new run in another "
            "output_dir. Only how long to train, logging, evaluation, checkpointing and the Hub may change."
        )


class RunLock:
    """`output_dir/.run.lock` held by the main process for the life of a run."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILENAME
        self.held, self.created_folder = False, False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None  # half-written by a killed process, or removed meanwhile: not a live run's lock

    @staticmethod
    def _is_alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another machine's process: cannot tell, so assume it runs
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was replaced. Raises ConfigError when a live run holds
        it."""
        # A run refused before it wrote anything leaves no folder behind: `release` removes the one made here.
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._is_alive(holder):
                    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    raise ConfigError(
                        f"{self.path.parent} is in use by another run (pid {holder['pid']} on "
                        f"{holder.get('host')}, started {started}); two runs in one folder would mix their outputs. "
                        f"Wait for it to finish or choose another output_dir; if no run uses it, delete {self.path}."
                    )
                note = f"Replaced the stale lock {self.path} of a run that no longer runs ({holder})."
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as file:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, file)
            self.held = True
            return note
        raise ConfigError(f"Could not take the lock {self.path}: other runs keep taking it.")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                os.remove(self.path)
            self.held = False
            if self.created_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()


def claim_output_dir(config: RunConfig, accelerator: Accelerator, lock: RunLock) -> Path | None:
    """Lock `output_dir` (main process), finish what a killed run left half done, check the checkpoint to resume
    from (or that no earlier run's outputs are in the way); returns the checkpoint, on every process."""
    error, resume_path = None, None
    if accelerator.is_main_process:
        try:
            resume_path = _claim_on_main_process(config, lock, accelerator.print)
        except ValueError as exc:
            error = exc
    shared = broadcast_object_list([None if error is None else str(error), resume_path and str(resume_path)])
    if error is not None:
        raise error
    if shared[0] is not None:
        raise ConfigError(shared[0])
    return None if shared[1] is None else Path(shared[1])


def _claim_on_main_process(config: RunConfig, lock: RunLock, say) -> Path | None:
    output_dir = Path(config.output_dir)
    if note := lock.acquire():
        say(note)
    try:
        for name in remove_leftovers(output_dir):
            say(f"Removed {output_dir / name}, left half-written by a killed run.")
        for folder in ("last", "best"):
            recover_directory(output_dir / folder)
        resume_path, skipped = resolve_resume_path(config.checkpoint.resume_from_checkpoint, output_dir)
        for name, reason in skipped:
            say(f"Warning: not resuming from {name}, the newest checkpoint: {reason}")
        if resume_path is not None:
            check_resume_settings(resume_path, read_training_state(resume_path)["config"], to_dict(config))
            return resume_path
        # `latest` with nothing to resume from starts afresh; over this run's own earlier start only.
        restart = config.checkpoint.resume_from_checkpoint == "latest" and _same_run(output_dir, config)
        removed = check_fresh_output_dir(output_dir, overwrite=config.overwrite, restart_of_same_run=restart)
        if removed:
            why = "--overwrite" if config.overwrite else "the same run started again before its first checkpoint"
            say(f"Removed the earlier outputs {removed} from {output_dir} ({why}).")
        return None
    except BaseException:
        lock.release()
        raise


def _same_run(output_dir: Path, config: RunConfig) -> bool:
    """Whether `output_dir/config.yaml` is this run's config (up to the settings a resume may change)."""
    try:
        saved = parse_yaml((output_dir / "config.yaml").read_text(), str(output_dir / "config.yaml"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and not changed_settings(saved, to_dict(config))
