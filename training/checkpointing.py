"""Checkpoints that resume exactly, are written atomically and run no code when loaded.

A checkpoint folder `checkpoints/checkpoint-<step>` holds:

    model.safetensors        the weights (accelerate's `save_state`; under FSDP `pytorch_model_fsdp.bin`, the full
                             state dict, read back with `weights_only` unpickling)
    optimizer.bin            AdamW's state (accelerate; read back with `torch.load(weights_only=True)`)
    random_states_<r>.pkl    each process's RNG states (accelerate; read back through its allow-list of types)
    ema.safetensors          the EMA's shadow weights, when the run keeps an EMA
    metrics.csv              the run's `metrics.csv` as it was at this step
    training_state.json      the loop's counters, the lr scheduler's and the EMA's numbers, the run's config

Checkpoints are shared and downloaded, so a folder is untrusted input: everything this project writes itself is
safetensors or JSON, and `check_checkpoint` reads every file before training starts (through safetensors, JSON or
`weights_only` unpickling, never a full unpickler) and refuses files it does not write, such as the
`custom_checkpoint_*.pkl` pickles that accelerate's `register_for_checkpointing` produces.

Each checkpoint is written into a hidden temporary folder beside its destination, then renamed into place
(`atomic_files`); old checkpoints are renamed away before they are deleted. A folder named `checkpoint-<step>`
is therefore always complete, and hidden leftovers of a killed run are removed on the next start.
"""

import csv
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atomic_files import REPLACED_PREFIX, TEMPORARY_PREFIX, recover_directory, replace_directory, write_text_atomically

from .fsdp import full_tensors, load_full_tensors

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "REPLACED_PREFIX",
    "TEMPORARY_PREFIX",
    "CheckpointError",
    "check_checkpoint",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_training_state",
    "recover_directory",
    "remove_leftovers",
    "resolve_resume_path",
    "restore_metrics_log",
    "save_checkpoint",
]
CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILENAME = "training_state.json"
MODEL_FILENAME = "model.safetensors"
FSDP_MODEL_FILENAME = "pytorch_model_fsdp.bin"  # accelerate's FSDP full state dict (`training/fsdp.py`)
OPTIMIZER_FILENAME = "optimizer.bin"
RNG_FILENAME = "random_states_{}.pkl"
SCALER_FILENAME = "scaler.pt"  # accelerate's GradScaler state, fp16 on GPUs only
EMA_FILENAME = "ema.safetensors"
METRICS_FILENAME = "metrics.csv"
# 1: EMA and lr scheduler as accelerate `custom_checkpoint_*.pkl` pickles (refused: loading them runs code).
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from exactly; the message names the folder, the file and why."""


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint folder name `checkpoint-<step>`, else None."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints under `output_dir/checkpoints` (with their counters file), oldest first."""
    folder = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / TRAINING_STATE_FILENAME).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest committed checkpoint, or None when there is none (not checked: see `resolve_resume_path`)."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_leftovers(output_dir: str | os.PathLike) -> list[str]:
    """Main process, at the start of a run: finish what a killed run left half done in `output_dir`.

    An interrupted replacement of a checkpoint is undone (`recover_directory`); hidden temporaries (a checkpoint
    being written or deleted, a `last/` being written, a `metrics.csv` being replaced) are removed. Returns the
    paths removed, relative to `output_dir`.
    """
    output_dir = Path(output_dir)
    folder = output_dir / CHECKPOINTS_DIRNAME
    if folder.is_dir():
        for entry in list(folder.iterdir()):
            if entry.name.startswith(REPLACED_PREFIX):
                recover_directory(entry.with_name(entry.name[len(REPLACED_PREFIX) :]))
    removed = []
    for parent in (output_dir, folder):
        if not parent.is_dir():
            continue
        for entry in list(parent.iterdir()):
            if entry.name.startswith(TEMPORARY_PREFIX) and entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink()  # `atomic_files.write_file_atomically`'s temporary file
            else:
                continue
            removed.append(str(entry.relative_to(output_dir)))
    return removed


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    """The loop's counters saved with a checkpoint (step, best metric, epoch progress, lr scheduler, EMA, config)."""
    path = Path(checkpoint) / TRAINING_STATE_FILENAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint: it has no {TRAINING_STATE_FILENAME}.")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(state).__name__}.")
    return state


# --------------------------------------------------------------------------------------------------
# Checking a checkpoint before anything is loaded from it
# --------------------------------------------------------------------------------------------------
def _expected_files(state: dict, model_filename: str) -> set[str]:
    files = {TRAINING_STATE_FILENAME, model_filename, OPTIMIZER_FILENAME, METRICS_FILENAME, SCALER_FILENAME}
    files |= {RNG_FILENAME.format(rank) for rank in range(state["num_processes"])}
    if state["ema"] is not None:
        files.add(EMA_FILENAME)
    return files


def _check_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}).") from error
    _check_finite(tensors, path)
    return tensors


def _check_finite(tensors: dict, path: Path) -> None:
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} is not a tensor.")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values.")


def _check_pickle(path: Path, what: str) -> dict:
    """Read accelerate's pickle through `weights_only` unpickling (tensors, numbers, containers and accelerate's
    allow-list of numpy types): a payload that would run code is refused, never executed."""
    try:
        content = accelerate_load(path, map_location="cpu")
    except Exception as error:  # UnpicklingError, EOFError, RuntimeError, ...: all mean "not a state we wrote"
        raise CheckpointError(f"{path} ({what}) cannot be read safely: {type(error).__name__}: {error}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} ({what}) must hold a dict, got {type(content).__name__}.")
    return content


# The keys of training_state.json and the JSON types of their values.
STATE_SCHEMA = {
    "step": int,
    "num_processes": int,
    "steps_per_epoch": int,
    "epoch": int,
    "best": dict,
    "epoch_progress": dict,
    "lr_scheduler": dict,
    "ema": (dict, type(None)),
    "config": dict,
}
EPOCH_PROGRESS_KEYS = ("epoch_loss_sum", "epoch_steps", "epoch_time_s")


def _check_state_schema(state: dict, path: Path) -> None:
    missing = [k for k in STATE_SCHEMA if k not in state]
    wrong = [k for k, kind in STATE_SCHEMA.items() if k in state and not isinstance(state[k], kind)]
    progress = state.get("epoch_progress")
    if isinstance(progress, dict) and (
        sorted(progress) != sorted(EPOCH_PROGRESS_KEYS)
        or not all(isinstance(v, (int, float)) for v in progress.values())
    ):
        wrong.append("epoch_progress")
    if missing or wrong or state["step"] < 0 or state["num_processes"] < 1 or state["steps_per_epoch"] < 1:
        raise CheckpointError(
            f"{path} is not a training state this loop wrote (missing keys {missing}, ill-typed or out-of-range "
            f"values {wrong or [k for k in ('step', 'num_processes', 'steps_per_epoch')]})."
        )


def check_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """Read every file of a checkpoint folder safely and return its training state; raise CheckpointError naming
    the file when the folder cannot be resumed from exactly (missing, corrupt, foreign or non-finite content)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a checkpoint folder.")
    state = read_training_state(checkpoint)
    present = {p.name for p in checkpoint.iterdir()}
    pickles = sorted(name for name in present if name.startswith("custom_checkpoint_"))
    if state.get("format") != FORMAT_VERSION or pickles:
        raise CheckpointError(
            f"{checkpoint} was not written by this version of the training loop (format {state.get('format', 1)}, "
            f"this version reads format {FORMAT_VERSION}){f' and holds pickles {pickles}' if pickles else ''}: "
            "older checkpoints kept the EMA and the lr scheduler as pickles, which can run code when loaded, so "
            "they are not resumed. Its model.safetensors holds the weights; start a new run to continue training."
        )
    _check_state_schema(state, checkpoint / TRAINING_STATE_FILENAME)
    model_filename = FSDP_MODEL_FILENAME if FSDP_MODEL_FILENAME in present else MODEL_FILENAME
    expected = _expected_files(state, model_filename)
    foreign = sorted(present - expected)
    if foreign:
        raise CheckpointError(
            f"{checkpoint} holds files this training loop never writes: {foreign}. A checkpoint is loaded only "
            f"when it holds exactly what was saved ({sorted(expected - {SCALER_FILENAME})}); remove them if you "
            "trust their origin, else discard the checkpoint."
        )
    missing = sorted(expected - present - {SCALER_FILENAME})
    if missing:
        raise CheckpointError(f"{checkpoint} is incomplete: {missing} missing.")
    if model_filename == MODEL_FILENAME:
        _check_tensors(checkpoint / MODEL_FILENAME)
    else:
        _check_finite(
            _check_pickle(checkpoint / FSDP_MODEL_FILENAME, "the model weights"), checkpoint / FSDP_MODEL_FILENAME
        )
    if state["ema"] is not None:
        _check_tensors(checkpoint / EMA_FILENAME)
    _check_pickle(checkpoint / OPTIMIZER_FILENAME, "the optimizer state")
    if SCALER_FILENAME in present:
        _check_pickle(checkpoint / SCALER_FILENAME, "the gradient scaler state")
    for rank in range(state["num_processes"]):
        rng = _check_pickle(checkpoint / RNG_FILENAME.format(rank), f"the random states of process {rank}")
        absent = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed") if k not in rng]
        if absent:
            raise CheckpointError(f"{checkpoint / RNG_FILENAME.format(rank)} lacks the random states {absent}.")
    try:
        with open(checkpoint / METRICS_FILENAME, newline="") as file:
            [int(row["step"]) for row in csv.DictReader(file)]
    except (ValueError, KeyError, TypeError, csv.Error, UnicodeDecodeError) as error:
        raise CheckpointError(f"{checkpoint / METRICS_FILENAME} is not the metrics log this loop writes ({error}).")
    return state


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> tuple[Path | None, list]:
    """The checkpoint to resume from and the newer ones skipped as `(name, reason)`.

    `"latest"` is the newest checkpoint that passes `check_checkpoint` (None if there is none yet); a path must
    pass it itself.
    """
    if resume_from_checkpoint is None:
        return None, []
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        check_checkpoint(path)
        return path, []
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            check_checkpoint(path)
        except CheckpointError as error:
            skipped.append((path.name, str(error)))
            continue
        return path, skipped
    if skipped:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise CheckpointError(f"No checkpoint in {output_dir} can be resumed from. {reasons}")
    return None, []


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------
def _json_numbers(value):
    """A state dict's values as JSON (floats as they are: JSON's repr round-trips them exactly)."""
    if isinstance(value, dict):
        return {str(k): _json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_numbers(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Non-finite number {value} in the training state.")
        return value
    raise TypeError(f"{type(value).__name__} in a state dict has no JSON form.")


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    training_state: dict,
    *,
    lr_scheduler,
    ema=None,
    total_limit: int | None = None,
    before_commit: Callable[[int, Path], None] | None = None,
) -> Path:
    """Save `checkpoint-<step>` atomically: accelerate's state (weights, optimizer, RNG of every process), the
    EMA's shadow weights, a copy of `metrics.csv`, and the loop's `training_state` with the lr scheduler's and
    the EMA's numbers.

    Every process writes its RNG state into the same temporary folder (a shared file system is assumed, as
    accelerate does); the main process then adds the rest, renames the folder into place and removes the oldest
    checkpoints beyond `total_limit`. `before_commit(step, temporary_folder)` runs on the main process when every
    file but the counters is on disk, just before the rename (tests kill the process there).
    """
    folder = Path(output_dir) / CHECKPOINTS_DIRNAME
    destination = folder / f"checkpoint-{step}"
    temporary = folder / (TEMPORARY_PREFIX + destination.name)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    shadow = full_tensors(ema.shadow_params) if ema is not None else None  # FSDP: gathered by every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema_numbers = None
        if ema is not None:
            ema_numbers = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            save_file(
                {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(shadow)}, temporary / EMA_FILENAME
            )
        metrics = Path(output_dir) / METRICS_FILENAME
        shutil.copyfile(metrics, temporary / METRICS_FILENAME)
        if before_commit is not None:
            before_commit(step, temporary)
        state = {
            **training_state,
            "format": FORMAT_VERSION,
            "step": step,
            "num_processes": accelerator.num_processes,
            "lr_scheduler": lr_scheduler.state_dict(),
            "ema": ema_numbers,
        }
        # The counters file is written last: a folder that has it holds everything resume needs.
        (temporary / TRAINING_STATE_FILENAME).write_text(json.dumps(_json_numbers(state), indent=2))
        replace_directory(temporary, destination)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                # Renamed away first: a kill during the deletion leaves a hidden leftover, never a half checkpoint.
                doomed = old.with_name(f"{TEMPORARY_PREFIX}pruned-{old.name}")
                os.rename(old, doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return destination


def load_checkpoint(accelerator, checkpoint: Path, *, lr_scheduler, ema=None) -> dict:
    """Restore a checked checkpoint into the prepared model and optimizer, the RNG states, the lr scheduler and
    the EMA; return its training state. The caller ran `check_checkpoint` (through `resolve_resume_path`)."""
    state = read_training_state(checkpoint)
    if (ema is None) != (state["ema"] is None):
        raise CheckpointError(
            f"{checkpoint} was saved {'with' if state['ema'] is not None else 'without'} an EMA and this run has "
            f"ema.enabled {ema is not None}: resume with the setting the run was started with."
        )
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if (MODEL_FILENAME if sharded else FSDP_MODEL_FILENAME) in {p.name for p in checkpoint.iterdir()}:
        written, this = ("without", "uses") if sharded else ("with", "does not use")
        raise CheckpointError(
            f"{checkpoint} was written by a run {written} FSDP and this run {this} FSDP: the weights are stored "
            "differently. Resume with the launch settings the run was started with (`accelerate launch --use_fsdp "
            "--fsdp_version 2 ...` or not)."
        )
    accelerator.load_state(str(checkpoint))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        shadow = load_file(checkpoint / EMA_FILENAME)
        if len(shadow) != len(ema.shadow_params) or any(
            shadow[f"shadow.{i}"].shape != p.shape for i, p in enumerate(ema.shadow_params)
        ):
            raise CheckpointError(f"{checkpoint / EMA_FILENAME} does not match the model's parameters.")
        ema.load_state_dict(state["ema"])
        # FSDP: each process keeps its shard of the saved full weights.
        load_full_tensors([p.data for p in ema.shadow_params], [shadow[f"shadow.{i}"] for i in range(len(shadow))])
    return state


def restore_metrics_log(checkpoint: Path, output_dir: str | os.PathLike) -> None:
    """Main process: `metrics.csv` back to the rows the checkpoint saw (later rows belong to the lost part)."""
    text = (checkpoint / METRICS_FILENAME).read_text()
    write_text_atomically(Path(output_dir) / METRICS_FILENAME, text)
