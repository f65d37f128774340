"""Typed training configuration: YAML recipes plus dotted command-line overrides, checked before training.

A recipe is a YAML file whose sections mirror the dataclasses below. Any key can be overridden on the
command line as `--section.key value` (or `--section.key=value`); values are parsed as YAML, so `64`,
`1e-3`, `true` and `null` mean what they look like (booleans are only `true` / `false`, as in YAML 1.2:
`no`, `off` and `yes` stay words, so `--train.mixed_precision no` means accelerate's "no"). Unknown keys,
wrong types and values outside their allowed set stop the run with a `ConfigError` that names the key and
lists what is allowed.
"""

import dataclasses
import importlib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from atomic_files import write_text_atomically
from custom_schedulers.schedules import BETA_SCHEDULES, PREDICTION_TYPES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"
ARCHITECTURES = ("unet", "dit", "mmdit")
OBJECTIVES = ("diffusion", "flow_matching")
# Old spellings of objective.name: refused with the new name ("ddpm" is also a sampler, which confused the two).
RENAMED_OBJECTIVES = {"ddpm": "diffusion"}
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSSES = ("mse", "l1")
SAMPLERS = ("auto", "ddpm", "ddim", "flow_match_euler")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# Every tracker accelerate supports (`accelerate.utils.LoggerType` but "all"); the chosen one must be installed.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "none")


class ConfigError(ValueError):
    """A recipe or override that cannot be trained; the message names the key and what is allowed."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: PyYAML follows YAML 1.1, where `no` / `off` / `yes` / `on` are
    booleans, which would turn accelerate's `mixed_precision: no` into `False`."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping_without_duplicates(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys without a word: a recipe would train with one of two values.
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"Duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line {seen[key]}); "
                "give each key once."
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text, source: str = "the YAML text") -> Any:
    """A YAML document (string or file) as Python values, with YAML 1.2 booleans; duplicate keys are refused."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{source} is not valid YAML{line}: {problem}.") from None


def upgrade_saved_config(data: dict) -> dict:
    """A config saved by an earlier version (a run's `config.yaml`), in today's names, for comparing and showing.

    Recipes and overrides with an old name are refused instead (`_coerce`), so that they are rewritten once.
    """
    objective = data.get("objective")
    if isinstance(objective, dict) and objective.get("name") in RENAMED_OBJECTIVES:
        data = {**data, "objective": {**objective, "name": RENAMED_OBJECTIVES[objective["name"]]}}
    return data


def choice(default, choices, doc=""):
    return field(default=default, metadata={"choices": choices, "doc": doc})


def bounded(default, minimum=None, maximum=None, doc=""):
    return field(default=default, metadata={"min": minimum, "max": maximum, "doc": doc})


def described(default=dataclasses.MISSING, doc="", default_factory=dataclasses.MISSING):
    """A key with no limits; `doc` is its line in `--help`."""
    return field(default=default, default_factory=default_factory, metadata={"doc": doc})


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The denoiser: an architecture, one of its size presets, and config keys overriding the preset."""

    architecture: str = choice(
        "unet",
        ARCHITECTURES,
        doc="the denoiser: ScratchUNetModel, ScratchDiTModel (grouped-query attention), ScratchMMDiTModel",
    )
    preset: str = described(
        "small", doc="a size preset of the architecture (`PRESETS` in custom_models/unet.py, dit_gqa.py, mmdit.py)"
    )
    overrides: dict = described(
        default_factory=dict,
        doc="constructor arguments of the model class replacing the preset's, e.g. {dropout: 0.1}",
    )
    vae: str | None = described(
        None,
        doc="folder of a trained AutoencoderKL (`python -m training.train_vae`): train in its latent space; null: pixels",
    )


@dataclass
class ObjectiveOptions:
    """How the denoiser's errors are weighted and on which timesteps: what full and LoRA training both choose."""

    snr_gamma: float | None = bounded(
        None, 0.0, doc="min-SNR-gamma loss weighting (Hang et al. 2023), DDPM family only; null disables it"
    )
    timestep_sampling: str = choice(
        "uniform", TIMESTEP_SAMPLINGS, doc="flow matching: how sigma in (0, 1) is drawn (SD3's choices)"
    )
    logit_mean: float = described(0.0, doc="flow matching, logit_normal: mean of the normal whose sigmoid is sigma")
    logit_std: float = bounded(1.0, 0.0, doc="flow matching, logit_normal: standard deviation of that normal")
    mode_scale: float = described(1.29, doc="flow matching, mode: SD3's scale of the mode density (0 is uniform)")
    loss: str = choice("mse", LOSSES, doc="the per-pixel error: squared (mse) or absolute (l1)")
    label_dropout: float = bounded(
        0.1, 0.0, 1.0, doc="probability of replacing a label by the null label, for classifier-free guidance"
    )


@dataclass
class ObjectiveConfig(ObjectiveOptions):
    """What the denoiser learns to predict, on which timesteps, and how its errors are weighted."""

    name: str = choice(
        "diffusion",
        OBJECTIVES,
        doc="diffusion: the DDPM family (noise schedule + prediction target); flow_matching: rectified flow",
    )
    prediction_type: str = choice(
        "epsilon",
        PREDICTION_TYPES,
        doc="DDPM family: the model predicts the noise (epsilon), v (Salimans & Ho 2022) or the clean image (sample)",
    )
    num_train_timesteps: int = bounded(
        1000, 1, doc="DDPM family: steps of the noise schedule; flow matching: the model sees timestep sigma x this"
    )
    beta_schedule: str = choice(
        "linear",
        BETA_SCHEDULES,
        doc="DDPM family: how the noise variances beta rise (squaredcos_cap_v2: the cosine schedule)",
    )
    beta_start: float = bounded(
        0.0001, 0.0, 1.0, doc="DDPM family: the first beta of the linear and scaled_linear schedules"
    )
    beta_end: float = bounded(
        0.02, 0.0, 1.0, doc="DDPM family: the last beta of the linear and scaled_linear schedules"
    )


@dataclass
class DataConfig:
    """The training images: the shipped MNIST, a Hub dataset id, or a local image folder (one subfolder per class)."""

    dataset: str = described(
        "mnist",
        doc="mnist (the shipped copy), a Hub dataset id, or a local folder (a subfolder per class, or a saved dataset)",
    )
    train_split: str = described("train", doc="the split to train on")
    validation_split: str | None = described(
        "test", doc="split for the EMA validation loss; null holds out the last num_validation_samples training images"
    )
    num_validation_samples: int = bounded(
        256,
        0,
        doc="validation images: the first of validation_split (0: all of it), or held-out training images (0: none)",
    )
    image_column: str | None = described(None, doc="name of the image column; null finds it (image / img)")
    label_column: str | None = described(None, doc="name of the label column; null finds it (label / labels)")
    channels: int = choice(1, (1, 3), doc="image channels the model sees: 1 (grey) or 3 (RGB); images are converted")
    resolution: int | None = bounded(
        None, 1, doc="resize (shorter side) and centre-crop to this size; null keeps the images' size"
    )
    pad_to: int | None = bounded(
        None,
        1,
        doc="zero-pad to this size after resizing (MNIST 28 -> 32 for models that halve it 3 times); null: no padding",
    )
    random_flip: bool = described(
        False, doc="mirror training images left-right with probability 1/2 (leave off for digits)"
    )
    max_train_samples: int | None = bounded(
        None, 1, doc="use only the first N training images (tests, quick experiments); null uses them all"
    )
    num_workers: int = bounded(0, 0, doc="DataLoader worker processes; 0 loads in the training process")
    unreadable_images: str = choice(
        "stop", ("stop", "skip"), doc="an image that does not decode: stop (an error naming it) or skip (a warning)"
    )


@dataclass
class OptimConfig:
    """AdamW, a warmup + decay learning-rate schedule from `diffusers.optimization`, gradient clipping."""

    learning_rate: float = bounded(1e-3, 0.0, doc="AdamW's learning rate after warm-up")
    adam_beta1: float = bounded(0.9, 0.0, 1.0, doc="AdamW's decay of the gradient average")
    adam_beta2: float = bounded(0.999, 0.0, 1.0, doc="AdamW's decay of the squared-gradient average")
    adam_epsilon: float = bounded(1e-8, 0.0, doc="AdamW's term added to the denominator")
    weight_decay: float = bounded(0.0, 0.0, doc="AdamW's decoupled weight decay")
    lr_scheduler: str = choice(
        "cosine", LR_SCHEDULERS, doc="the learning-rate schedule after warm-up (`diffusers.optimization.get_scheduler`)"
    )
    lr_warmup_steps: int = bounded(0, 0, doc="optimizer steps of linear warm-up from 0")
    max_grad_norm: float | None = bounded(
        1.0, 0.0, doc="clip the global gradient norm to this value; null disables clipping"
    )


@dataclass
class TrainConfig:
    """Batch, length and hardware switches of the run."""

    batch_size: int = bounded(
        128,
        1,
        doc="images per step and process; the global batch is batch_size x processes x gradient_accumulation_steps",
    )
    gradient_accumulation_steps: int = bounded(1, 1, doc="batches whose gradients add up to one optimizer step")
    num_epochs: int = bounded(10, 1, doc="passes over the training images")
    max_steps: int | None = bounded(
        None, 1, doc="stop after this many optimizer steps even if epochs remain; null trains all epochs"
    )
    seed: int = bounded(
        0, 0, 2**32 - 1, doc="seed of the initial weights, the data order, the noise and the label dropout"
    )
    mixed_precision: str = choice(
        "auto",
        MIXED_PRECISIONS,
        doc="accelerate's mixed precision; auto: no on CPU, bf16 on GPUs that support it, else fp16",
    )
    gradient_checkpointing: bool = described(
        False, doc="recompute activations in the backward pass: less memory, more time"
    )
    compile: bool = described(False, doc="`torch.compile` the model")
    allow_tf32: bool = described(True, doc="allow TF32 matrix multiplications and convolutions on GPUs that have them")
    log_every_steps: int = bounded(50, 1, doc="log the mean loss and the learning rate every N optimizer steps")
    report_to: str = choice(
        "tensorboard", TRACKERS, doc="accelerate tracker for the logs (tensorboard writes to output_dir/logs/), or none"
    )


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (`diffusers.training_utils.EMAModel`)."""

    enabled: bool = described(
        True, doc="keep an exponential moving average of the weights; evaluation and best/, last/ use it"
    )
    decay: float = bounded(0.9999, 0.0, 1.0, doc="the EMA's decay (its highest, with warm-up)")
    use_warmup: bool = described(
        True, doc="warm-up decay 1 - (1 + step / inv_gamma) ** -power: short runs need it to leave the initial weights"
    )
    inv_gamma: float = bounded(1.0, 0.0, doc="warm-up: the step scale inv_gamma")
    power: float = bounded(0.75, 0.0, doc="warm-up: the exponent power")
    update_after_step: int = bounded(0, 0, doc="start averaging after this many optimizer steps")


@dataclass
class EvalConfig:
    """Sample grids, denoising GIFs, validation loss and (optional) quality metrics, every few epochs."""

    every_epochs: int = bounded(1, 1, doc="evaluate every N epochs, and at the end")
    sampler: str = choice(
        "auto", SAMPLERS, doc="the sampling scheduler; auto: DDIM for the DDPM family, Euler for flow matching"
    )
    num_inference_steps: int = bounded(50, 1, doc="sampling steps")
    guidance_scale: float = bounded(2.0, 0.0, doc="classifier-free guidance scale; 1 is a single conditional pass")
    images_per_class: int = bounded(8, 1, doc="samples per class in the grid (one row per class)")
    seed: int = bounded(0, 0, 2**32 - 1, doc="seed of the sampling noise (the same at every evaluation)")
    gif: bool = described(True, doc="also write a GIF of the denoising")
    fid_n: int = bounded(
        0,
        0,
        doc="samples per class for FID-MNIST and GAN-test accuracy (the shipped MNIST classifier); 0 skips the metrics",
    )
    batch_size: int = bounded(256, 1, doc="images per batch when sampling and computing the validation loss")


@dataclass
class CheckpointConfig:
    """Resumable training state (safetensors, JSON and accelerate's weights-only pickles), written atomically."""

    every_steps: int = bounded(500, 0, doc="save the resumable training state every N optimizer steps; 0 saves none")
    checkpoints_total_limit: int | None = bounded(3, 1, doc="keep only the newest N checkpoints; null keeps all")
    resume_from_checkpoint: str | None = described(
        None,
        doc="'latest' (the newest complete checkpoint in output_dir, if any) or a checkpoint folder; null starts afresh",
    )


@dataclass
class HubConfig:
    """Publishing `best/` to the Hugging Face Hub at the end of training."""

    push_to_hub: bool = described(False, doc="upload best/ with its model card to the Hub at the end")
    hub_model_id: str | None = described(None, doc="the repo to push to, e.g. user/mnist-dit")
    private: bool = described(False, doc="create the repo as private")


@dataclass
class RunConfig:
    """The sections the training loop reads, shared by full training (`Config`) and LoRA fine-tuning
    (`training.train_lora.LoraTrainingConfig`); each adds what it trains."""

    output_dir: str = described(
        "outputs/run",
        doc="folder for config.yaml, metrics.csv, logs/, samples/, checkpoints/ and the best/ and last/ pipelines",
    )
    overwrite: bool = described(
        False,
        doc="replace the outputs of an earlier run in output_dir (refused without it); `--overwrite` alone is true",
    )
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)


@dataclass
class Config(RunConfig):
    """A whole training run: a new denoiser from a preset, trained with a full objective."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


# --------------------------------------------------------------------------------------------------
# Building a config from nested dicts, with checks
# --------------------------------------------------------------------------------------------------
def _is_union(annotation) -> bool:
    """`X | None` (types.UnionType) and `Optional[X]` (typing.Union) alike."""
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _type_name(annotation) -> str:
    if _is_union(annotation):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    return "null" if annotation is type(None) else annotation.__name__


def _coerce(key: str, value: Any, annotation, metadata) -> Any:
    """Check `value` against the field's type and limits; return it (ints accepted where floats are)."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} expects type {_type_name(annotation)}, got null.")
    base = next(option for option in options if option is not type(None))
    if base is float and isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string; a float field accepts any number spelled as text.
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }[base]
    if not ok:
        hint = " (booleans are spelled true / false)" if base is bool and isinstance(value, str) else ""
        raise ConfigError(f"{key} expects type {_type_name(annotation)}, got {value!r} ({type(value).__name__}){hint}.")
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}.")
    if key.endswith("objective.name") and value in RENAMED_OBJECTIVES:
        raise ConfigError(
            f"{key} {value!r} is now called {RENAMED_OBJECTIVES[value]!r} (the DDPM family of objectives; 'ddpm' "
            f"names a sampler); write `name: {RENAMED_OBJECTIVES[value]}`."
        )
    if "choices" in metadata and value not in metadata["choices"]:
        raise ConfigError(f"{key} must be one of {list(metadata['choices'])}, got {value!r}.")
    if metadata.get("min") is not None and value < metadata["min"]:
        raise ConfigError(f"{key} must be >= {metadata['min']}, got {value!r}.")
    if metadata.get("max") is not None and value > metadata["max"]:
        raise ConfigError(f"{key} must be <= {metadata['max']}, got {value!r}.")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, refusing unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the config"
        raise ConfigError(f"Unknown key(s) {[prefix + k for k in unknown]} in {where}; allowed keys: {sorted(fields)}.")
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = from_dict(annotation, value if value is not None else {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(prefix + name, value, annotation, fields[name].metadata)
    return cls(**values)


def to_dict(config) -> dict:
    """Plain nested dict of a config (the form saved beside the outputs)."""
    return dataclasses.asdict(config)


def _set_dotted(data: dict, dotted_key: str, value) -> None:
    *sections, last = dotted_key.split(".")
    node = data
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted_key}: '{section}' is a value, not a section.")
        node = child
    node[last] = value


# Boolean keys that may be given without a value (`--overwrite` means `--overwrite true`).
BARE_FLAGS = ("overwrite",)


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """Split `--config path` from `--section.key value` pairs; values are parsed as YAML."""
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        argument = argv[i]
        if not argument.startswith("--") or len(argument) == 2:
            raise ConfigError(f"Expected '--key value' arguments, got {argument!r}.")
        if "=" in argument:
            key, raw = argument[2:].split("=", 1)
            i += 1
        elif argument[2:] in BARE_FLAGS and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            key, raw = argument[2:], "true"
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"Missing value after {argument!r}.")
            key, raw = argument[2:], argv[i + 1]
            i += 2
        if key == "config":
            config_path = raw
        else:
            _set_dotted(overrides, key, parse_yaml(raw, f"The value {raw!r} of --{key}"))
    return config_path, overrides


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | os.PathLike) -> dict:
    """The nested dict of a YAML recipe; a missing file names the recipes that exist."""
    path = Path(path)
    if not path.is_file():
        available = sorted(str(p.relative_to(RECIPES_DIR.parent)) for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"Recipe file '{path}' not found; available recipes: {available}.")
    with open(path) as file:
        data = parse_yaml(file, f"Recipe '{path}'") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe '{path}' must hold a mapping of sections, got {type(data).__name__}.")
    return data


def describe_keys(cls, prefix: str = "") -> list[str]:
    """Two lines per configurable key of dataclass `cls`: dotted name, type, default and allowed values; its doc.

    Each section starts with a heading line: its name and the first line of its class docstring."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            lines += ["", f"{prefix}{f.name}: {inspect.getdoc(annotation).splitlines()[0]}"]
            lines += describe_keys(annotation, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
        line = f"  --{prefix}{f.name} ({type_name}, default {default!r})"
        if "choices" in f.metadata:
            line += f" one of {list(f.metadata['choices'])}"
        lines += [line, f"      {f.metadata.get('doc', '')}"]
    return lines


def load_config(argv: list[str], cls=Config):
    """`[--config recipe.yaml] [--section.key value ...]` -> a checked config of dataclass `cls`."""
    if "-h" in argv or "--help" in argv:
        print("usage: [--config recipe.yaml] [--section.key value ...]  (values are YAML; recipes in configs/)\n")
        print("\n".join(describe_keys(cls)))
        raise SystemExit(0)
    config_path, overrides = parse_overrides(list(argv))
    data = load_recipe(config_path) if config_path is not None else {}
    config = from_dict(cls, _merge(data, overrides))
    if cls is Config:
        check_config(config)
    return config


# --------------------------------------------------------------------------------------------------
# Checks across keys (those a single field cannot see)
# --------------------------------------------------------------------------------------------------
MODEL_CLASSES = {
    "unet": ("custom_models.unet", "ScratchUNetModel"),
    "dit": ("custom_models.dit_gqa", "ScratchDiTModel"),
    "mmdit": ("custom_models.mmdit", "ScratchMMDiTModel"),
}
# Set by the loop from the data and the VAE, never by a recipe.
DATA_DERIVED_MODEL_KEYS = ("sample_size", "in_channels", "num_classes")


def model_class(architecture: str):
    """The model class of an architecture name (imported on first use)."""
    module_name, class_name = MODEL_CLASSES[architecture]
    return getattr(importlib.import_module(module_name), class_name)


def check_tracker(report_to: str) -> None:
    """Refuse a tracker whose package is not installed, naming the package and the installed ones."""
    if report_to == "none":
        return
    from accelerate.tracking import get_available_trackers

    available = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    if report_to not in available:
        raise ConfigError(
            f"train.report_to {report_to!r}: the {report_to} package is not installed (pip install {report_to}). "
            f"Installed trackers: {sorted(available) + ['none']}."
        )


def check_loop_settings(config) -> None:
    """Checks of the sections the training loop reads, shared by full and LoRA training configs."""
    if config.eval.fid_n == 1:
        raise ConfigError(
            "eval.fid_n must be 0 (no metrics) or >= 2 samples per class (FID-MNIST fits a covariance), got 1."
        )
    if config.hub.push_to_hub and not config.hub.hub_model_id:
        raise ConfigError(
            "hub.push_to_hub is true but hub.hub_model_id is not set; give the repo id, e.g. 'user/mnist-dit'."
        )
    check_tracker(config.train.report_to)
    resume = config.checkpoint.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise ConfigError(f"checkpoint.resume_from_checkpoint {resume!r} is neither 'latest' nor a checkpoint folder.")
    if resume is not None and config.overwrite:
        raise ConfigError(
            "overwrite and checkpoint.resume_from_checkpoint exclude each other: resuming continues the earlier run, "
            "overwrite replaces it. Give one of them."
        )


def check_config(config: Config) -> None:
    """Refuse combinations that would fail (or silently mislead) only after training started."""
    model_cls = model_class(config.model.architecture)
    module = importlib.import_module(model_cls.__module__)
    presets, renamed = module.PRESETS, getattr(module, "RENAMED_PRESETS", {})
    if config.model.preset not in presets and config.model.preset not in renamed:
        raise ConfigError(
            f"model.preset {config.model.preset!r} is not a {config.model.architecture} preset; available: {sorted(presets)}."
        )
    allowed = [name for name in inspect.signature(model_cls.__init__).parameters if name != "self"]
    for key in config.model.overrides:
        if key in DATA_DERIVED_MODEL_KEYS:
            raise ConfigError(f"model.overrides.{key} is set from the data (and VAE); remove it from the recipe.")
        if key not in allowed:
            raise ConfigError(
                f"Unknown key model.overrides.{key} for {model_cls.__name__}; allowed keys: "
                f"{sorted(set(allowed) - set(DATA_DERIVED_MODEL_KEYS))}."
            )
    objective, sampler = config.objective.name, config.eval.sampler
    if objective == "flow_matching" and sampler not in ("auto", "flow_match_euler"):
        raise ConfigError(
            f"eval.sampler {sampler!r} cannot sample a flow-matching model; use 'auto' or 'flow_match_euler'."
        )
    if objective == "diffusion" and sampler == "flow_match_euler":
        raise ConfigError(
            "eval.sampler 'flow_match_euler' cannot sample a DDPM-family model; use 'auto', 'ddpm' or 'ddim'."
        )
    if objective == "flow_matching" and config.objective.snr_gamma is not None:
        raise ConfigError("objective.snr_gamma (min-SNR weighting) applies to the DDPM family only; set it to null.")
    if config.objective.beta_start >= config.objective.beta_end:
        raise ConfigError(
            f"objective.beta_start ({config.objective.beta_start}) must be below objective.beta_end ({config.objective.beta_end})."
        )
    check_loop_settings(config)
    if config.model.vae is not None and not Path(config.model.vae).is_dir():
        raise ConfigError(
            f"model.vae folder {config.model.vae!r} does not exist; train it first with "
            f"`python -m training.train_vae --output_dir {config.model.vae}`."
        )


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def save_config(config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    write_text_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False))
