"""Pieces shared by the `sample`, `evaluate` and `compare` commands: loading, scheduler swaps, labels, errors."""

import os
import re
from pathlib import Path

import torch

# A Hub repo id: "name" or "owner/name", letters, digits, '-', '_', '.'.
HUB_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | None) -> str:
    """`name` (None: the default) as a device this machine has; otherwise a ValueError saying what it has."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}); use --device cpu."
            )
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: only cpu, cuda and mps are supported.")
    return name


def load_pipeline(name_or_path: str, device: str | None = None):
    """A saved pipeline folder or Hub repo id -> our class-conditional pipeline on `device`, progress bars off."""
    device = check_device(device)
    path = Path(name_or_path)
    is_folder = path.exists()
    if is_folder:
        if not path.is_dir():
            raise ValueError(
                f"{name_or_path} is a file; pass a pipeline folder (with model_index.json) or a Hub repo id."
            )
        if not (path / "model_index.json").is_file():
            inside = [name for name in ("best", "last") if (path / name / "model_index.json").is_file()]
            hint = f" It looks like a training run folder: pass {path / inside[0]}." if inside else ""
            raise ValueError(f"{name_or_path} is not a pipeline folder: it has no model_index.json.{hint}")
    elif not HUB_ID_PATTERN.match(name_or_path) or name_or_path.startswith("."):
        raise ValueError(f"Pipeline folder not found: {name_or_path}")

    from diffusers import DiffusionPipeline

    import pipelines  # noqa: F401  (registers our pipeline classes and components on diffusers)

    if is_folder:
        try:
            pipeline = DiffusionPipeline.from_pretrained(str(path))
        except OSError as error:  # diffusers' word for unreadable JSON, truncated weights, missing folders
            raise ValueError(
                f"The pipeline folder {path} is damaged or incomplete: {_missing_parts(path) or error}"
            ) from error
    else:
        try:
            pipeline = DiffusionPipeline.from_pretrained(name_or_path)
        except Exception as error:  # every Hub/offline failure gets the same explanation
            raise ValueError(
                f"{name_or_path!r} is not a local folder, and loading it as a Hub repo id failed: {error}"
            ) from error
    if not hasattr(pipeline, "denoiser"):
        raise ValueError(
            f"{name_or_path} holds a {type(pipeline).__name__}, not one of this project's class-conditional pipelines."
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _missing_parts(path: Path) -> str | None:
    """Which component folders `model_index.json` names but the folder lacks, if that is what is wrong."""
    import json

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    components = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]
    missing = [name for name in components if index[name][0] is not None and not (path / name).is_dir()]
    return f"model_index.json names components {missing} that have no folder." if missing else None


def our_scheduler_classes() -> dict:
    from diffusers import SchedulerMixin

    import custom_schedulers

    return {
        name: value
        for name, value in vars(custom_schedulers).items()
        if isinstance(value, type) and issubclass(value, SchedulerMixin)
    }


def diffusers_scheduler_names() -> list[str]:
    import diffusers

    return sorted(name for name in dir(diffusers) if name.endswith("Scheduler") and not name.startswith("Flax"))


def build_scheduler(name: str, config):
    """Scheduler class `name` (ours, or any diffusers scheduler class) built from the pipeline's scheduler config."""
    import diffusers
    from diffusers import SchedulerMixin

    ours = our_scheduler_classes()
    scheduler_class = ours.get(name)
    if scheduler_class is None and name.endswith("Scheduler") and not name.startswith("Flax"):
        try:
            scheduler_class = getattr(diffusers, name)
        except (AttributeError, ImportError):
            scheduler_class = None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(
            f"Unknown scheduler {name!r}. Ours: {', '.join(sorted(ours))}. diffusers: {', '.join(diffusers_scheduler_names())}."
        )
    return scheduler_class.from_config(config)


def scheduler_family(scheduler_class_name: str) -> str:
    """'flow_matching' for flow-matching samplers (ours and diffusers' `FlowMatch*`), else 'diffusion'."""
    return "flow_matching" if "FlowMatch" in scheduler_class_name else "diffusion"


def set_scheduler(pipeline, name: str | None) -> None:
    """Swap the pipeline's scheduler for class `name` (None keeps the saved one).

    The same pairing rule as the training config: a flow-matching model needs a flow-matching sampler and a
    diffusion (DDPM-family) model a diffusion one; the saved scheduler tells which the model was trained for.
    """
    if name is None:
        return
    scheduler = build_scheduler(name, pipeline.scheduler.config)
    saved = type(pipeline.scheduler).__name__
    # Pipelines record their objective; folders saved before they did are judged by their scheduler.
    trained_for = pipeline.config.get("objective") or scheduler_family(saved)
    wanted = scheduler_family(type(scheduler).__name__)
    if trained_for != wanted:
        fits = sorted(
            n for n in [*our_scheduler_classes(), *diffusers_scheduler_names()] if scheduler_family(n) == trained_for
        )
        raise ValueError(
            f"--scheduler {name} is a {wanted.replace('_', '-')} sampler, but this pipeline's model was trained "
            f"for {trained_for.replace('_', '-')} (its saved scheduler is {saved}); its images would be "
            f"meaningless. Use one of: {', '.join(fits[:12])}{' ...' if len(fits) > 12 else ''}."
        )
    pipeline.scheduler = scheduler


def parse_class_labels(text: str | None) -> list | None:
    """ "3,7" -> [3, 7]; label names ("seven") stay strings for the pipeline's `id2label`; None/"" -> every class."""
    if text is None or not text.strip():
        return None
    labels = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"Empty entry in --class_labels {text!r}; use comma-separated ids or names, e.g. 3,7.")
        labels.append(int(item) if re.fullmatch(r"-?\d+", item) else item)
    return labels


def load_lora(pipeline, path: str, scale: float) -> None:
    """Load a LoRA file (diffusers format) into the denoiser and activate it with weight `scale`."""
    if not Path(path).exists() and not HUB_ID_PATTERN.match(path):
        raise ValueError(f"LoRA file or folder not found: {path}")
    pipeline.load_lora_weights(path, adapter_name="lora")
    pipeline.set_adapters(["lora"], adapter_weights=[scale])


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def check_output_path(path: str, suffixes) -> Path:
    """A writable output file path with one of `suffixes`; its folder is created."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{path} must end in one of {', '.join(suffixes)}.")
    if path.exists() and path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def environment_line() -> str:
    """Where a measurement was taken, for reports."""
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    return f"torch {torch.__version__}, {device}"
