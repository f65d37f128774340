"""LoRA fine-tuning of a trained pipeline: `accelerate launch -m training.train_lora --config configs/lora/<task>.yaml`.

The base pipeline (a folder written by `training/train.py` or a Hub id) is loaded and frozen, a peft
`LoraConfig` is added to its denoiser (by default on the attention Q/K/V/out projections; the UNet can add its
residual convolutions), and only the LoRA parameters are trained, by the same loop as full training
(`training.train.train`: objective, checkpoints and exact resume, logging, sample grids). The noise schedule and
prediction target are the base pipeline's. `last/` and `best/` hold the adapter alone, in diffusers' LoRA format
with its `LoraConfig` in the file header and an adapter model card; users load it in one line:

    pipe = DiffusionPipeline.from_pretrained(base)          # after `import pipelines`
    pipe.load_lora_weights("outputs/lora_bold_digits/best", adapter_name="bold")

`data.dilate_strokes` makes the shipped example task on the fly: "bold" digits, MNIST with thickened strokes
(`image_data.DilatedStrokes`).
"""

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DiffusionPipeline
from peft import LoraConfig

import pipelines  # noqa: F401  (registers the pipeline classes on diffusers, so `from_pretrained` finds them)
from custom_schedulers import ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler
from image_data import DilatedStrokes
from pipelines.class_conditional import ClassConditionalPipeline
from pipelines.model_card import infer_architecture, infer_objective

from .artifacts import save_adapter_folder
from .config import (
    ConfigError,
    DataConfig,
    EMAConfig,
    ObjectiveConfig,
    RunConfig,
    bounded,
    check_loop_settings,
    check_sampler_fits,
    described,
    load_config,
)
from .setup import (
    TrainingSetup,
    build_objective,
    build_sampling_scheduler,
    latent_geometry,
    load_datasets,
    pipeline_objective,
)
from .train import train


# --------------------------------------------------------------------------------------------------
# Config: the full-training sections, plus the base pipeline and the adapter
# --------------------------------------------------------------------------------------------------
@dataclass
class BaseModelConfig:
    """The pipeline to fine-tune: a folder written by `training/train.py` (e.g. `outputs/quickstart/best`) or a Hub id."""

    pretrained_model_name_or_path: str | None = described(
        None,
        doc="the pipeline to fine-tune: a folder written by training.train (e.g. outputs/quickstart/best) or a Hub id",
    )
    revision: str | None = described(None, doc="Hub branch, tag or commit of the base; null: the default branch")


@dataclass
class LoraSettings:
    """The adapter (a peft `LoraConfig` on the denoiser): its size, strength and where it goes."""

    rank: int = bounded(4, 1, doc="rank of the update B @ A added to each adapted weight")
    alpha: int = bounded(4, 1, doc="the update B @ A is scaled by alpha / rank")
    dropout: float = bounded(0.0, 0.0, 1.0, doc="dropout on the input of the LoRA branch")
    target_modules: list | None = described(
        None, doc="module names (matched as name suffixes); null means the denoiser's `default_lora_target_modules`"
    )
    include_conv: bool = described(
        False, doc="UNet only: also adapt the residual blocks' convolutions (the model's `lora_conv_target_modules`)"
    )


@dataclass
class LoraDataConfig(DataConfig):
    """The training images, optionally transformed on the fly into the target domain."""

    dilate_strokes: int = bounded(
        0,
        0,
        doc="thicken light strokes on a dark background by this many pixels (grey-scale dilation); 0 keeps the images",
    )


@dataclass
class LoraEMAConfig(EMAConfig):
    """EMA of the weights, off by default: the saved adapter is then exactly the trained one."""

    enabled: bool = described(
        False,
        doc="keep an exponential moving average of the adapter; off: the saved adapter is exactly the trained one",
    )


@dataclass
class LoraTrainingConfig(RunConfig):
    """A whole LoRA fine-tuning run: the loop's sections (`RunConfig`), the base pipeline and the adapter. The
    objective's noise schedule and prediction target are the base pipeline's; its other options are free."""

    output_dir: str = described(
        "outputs/lora",
        doc="folder for the config, metrics.csv, logs/, samples/, checkpoints/ and the best/ and last/ adapters",
    )
    data: LoraDataConfig = field(default_factory=LoraDataConfig)
    ema: LoraEMAConfig = field(default_factory=LoraEMAConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


def check_lora_config(config: LoraTrainingConfig) -> None:
    """Refuse what cannot run, before loading anything."""
    if not config.base.pretrained_model_name_or_path:
        raise ConfigError(
            "base.pretrained_model_name_or_path is not set; give the pipeline to fine-tune, a folder written by "
            "training/train.py (e.g. outputs/quickstart/best) or a Hub repo id."
        )
    check_loop_settings(config)


# --------------------------------------------------------------------------------------------------
# Base pipeline + adapter
# --------------------------------------------------------------------------------------------------
def load_base_pipeline(base_config: BaseModelConfig) -> ClassConditionalPipeline:
    """The base pipeline from a folder or Hub id, with every weight frozen."""
    pipeline = DiffusionPipeline.from_pretrained(
        base_config.pretrained_model_name_or_path, revision=base_config.revision
    )
    if not isinstance(pipeline, ClassConditionalPipeline):
        raise ConfigError(
            f"base.pretrained_model_name_or_path {base_config.pretrained_model_name_or_path!r} holds a "
            f"{type(pipeline).__name__}; LoRA training needs one of this project's class-conditional pipelines."
        )
    pipeline.denoiser.requires_grad_(False)
    if pipeline.vae is not None:
        pipeline.vae.requires_grad_(False).eval()
    return pipeline


def lora_target_modules(denoiser, lora_settings: LoraSettings) -> list[str]:
    """The module names the adapter targets, checked against the denoiser's linear and convolution layers."""
    targets = list(lora_settings.target_modules or denoiser.default_lora_target_modules)
    if lora_settings.include_conv:
        conv_targets = getattr(denoiser, "lora_conv_target_modules", None)
        if not conv_targets:
            raise ConfigError(
                f"lora.include_conv: {type(denoiser).__name__} has no convolution targets (`lora_conv_target_modules`); "
                "only the UNet has; set it to false."
            )
        targets += [name for name in conv_targets if name not in targets]
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    available = sorted({name.split(".")[-1] for name, module in denoiser.named_modules() if isinstance(module, layers)})
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise ConfigError(
            f"lora.target_modules {unknown} match no layer of {type(denoiser).__name__}; available: {available}."
        )
    return targets


def add_lora(denoiser, lora_settings: LoraSettings, seed: int) -> LoraConfig:
    """Add the trainable adapter ("default") to the frozen denoiser; B starts at zero, so the output is unchanged."""
    config = LoraConfig(
        r=lora_settings.rank,
        lora_alpha=lora_settings.alpha,
        lora_dropout=lora_settings.dropout,
        target_modules=lora_target_modules(denoiser, lora_settings),
        init_lora_weights=True,
    )
    set_seed(seed)  # identical A matrices on every process
    denoiser.add_adapter(config)
    return config


def count_parameters(denoiser) -> tuple[int, int]:
    """(trainable LoRA parameters, parameters of the base model)."""
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in denoiser.parameters()) - trainable


def base_noise_scheduler(pipeline):
    """The training noise schedule of the base pipeline: its scheduler's config as DDPM, or as rectified flow."""
    if infer_objective(pipeline) == "flow_matching":
        return ScratchFlowMatchEulerScheduler.from_config(pipeline.scheduler.config)
    return ScratchDDPMScheduler.from_config(pipeline.scheduler.config)


def _check_data_fits(pipeline, train_dataset) -> None:
    denoiser = pipeline.denoiser.config
    channels, image_size, _ = train_dataset[0]["pixel_values"].shape
    sample_size, in_channels = image_size, channels
    if pipeline.vae is not None:
        sample_size, in_channels = latent_geometry(pipeline.vae, image_size)
    if (in_channels, sample_size) != (denoiser.in_channels, denoiser.sample_size):
        where = "latents" if pipeline.vae is not None else "images"
        raise ConfigError(
            f"The data gives {where} of {in_channels} channel(s) and size {sample_size}, but the base denoiser takes "
            f"{denoiser.in_channels} channel(s) of size {denoiser.sample_size}; match data.channels, data.resolution "
            "and data.pad_to to the base's training config."
        )
    if train_dataset.num_classes != denoiser.num_classes:
        raise ConfigError(
            f"The data has {train_dataset.num_classes} classes but the base denoiser was trained for "
            f"{denoiser.num_classes}; fine-tune on data with the same classes."
        )


def build_lora_setup(config: LoraTrainingConfig, accelerator: Accelerator) -> TrainingSetup:
    """The frozen base pipeline's denoiser with a trainable adapter, the (transformed) data, the base's objective."""
    pipeline = load_base_pipeline(config.base)
    denoiser = pipeline.denoiser
    train_dataset, validation_dataset = load_datasets(config.data)
    if config.data.dilate_strokes:
        train_dataset = DilatedStrokes(train_dataset, config.data.dilate_strokes)
        if validation_dataset is not None:
            validation_dataset = DilatedStrokes(validation_dataset, config.data.dilate_strokes)
    _check_data_fits(pipeline, train_dataset)

    objective_name = infer_objective(pipeline)
    family = "flow_matching" if objective_name == "flow_matching" else "diffusion"
    if family == "flow_matching" and config.objective.snr_gamma is not None:
        raise ConfigError(
            "objective.snr_gamma (min-SNR weighting) applies to DDPM-family bases only; this base is flow matching."
        )
    noise_scheduler = base_noise_scheduler(pipeline)
    objective_config = ObjectiveConfig(name=family, **vars(config.objective))
    objective = build_objective(objective_config, noise_scheduler, denoiser.config.num_classes)
    if config.eval.sampler == "auto":
        sampling_scheduler = pipeline.scheduler
    else:
        check_sampler_fits(config.eval.sampler, family)
        sampling_scheduler = build_sampling_scheduler(config.eval.sampler, noise_scheduler)

    lora_config = add_lora(denoiser, config.lora, config.train.seed)
    trainable, base_count = count_parameters(denoiser)
    accelerator.print(
        f"LoRA rank {lora_config.r}, alpha {lora_config.lora_alpha} on {sorted(lora_config.target_modules)} of "
        f"{type(denoiser).__name__}: {trainable:,} trainable parameters, {100 * trainable / base_count:.2f}% of the "
        f"base's {base_count:,}."
    )
    vae = pipeline.vae.to(accelerator.device) if pipeline.vae is not None else None
    source = config.base.pretrained_model_name_or_path
    return TrainingSetup(
        train_dataset=train_dataset,
        validation_dataset=validation_dataset,
        model=denoiser,
        vae=vae,
        objective=objective,
        sampling_scheduler=sampling_scheduler,
        architecture=infer_architecture(pipeline),
        pipeline_objective=pipeline_objective(family, noise_scheduler.config.get("prediction_type")),
        description=(
            f"LoRA rank {lora_config.r} / alpha {lora_config.lora_alpha} on {sorted(lora_config.target_modules)} of "
            f"`{source}` ({type(denoiser).__name__}), {objective_name} objective"
        ),
        save_folder=partial(
            save_adapter_folder, base=source, lora_config=lora_config, training_data=data_description(config.data)
        ),
    )


def data_description(data_config: LoraDataConfig) -> str:
    dataset = "MNIST" if data_config.dataset == "mnist" else f"`{data_config.dataset}`"
    if data_config.dilate_strokes:
        width = 2 * data_config.dilate_strokes + 1
        return f"{dataset} with strokes thickened by a {width}x{width} grey-scale dilation (made on the fly)"
    return dataset


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def load_lora_config(argv: list[str]) -> LoraTrainingConfig:
    """`--config recipe.yaml --section.key value ...` -> a checked `LoraTrainingConfig`."""
    config = load_config(argv, cls=LoraTrainingConfig)
    check_lora_config(config)
    return config


def main(argv: list[str] | None = None) -> Path:
    """Parse the arguments and fine-tune; returns the output folder."""
    return train(load_lora_config(sys.argv[1:] if argv is None else argv), build_setup=build_lora_setup)


if __name__ == "__main__":
    from commands import run

    run(main)
