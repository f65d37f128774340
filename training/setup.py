"""What a training run is made of, built from its config: the accelerator, the data, the denoiser (in pixel or VAE
latent space), the objective, the sampling scheduler, the optimizer with its lr schedule, and the EMA.

`TrainingSetup` is what the loop (`training/train.py`) trains; `build_training_setup` makes one for a new
denoiser, `training/train_lora.py` makes one around a frozen base pipeline.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

import custom_schedulers
from custom_schedulers import ScratchDDIMScheduler, ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler
from image_data import load_image_dataset
from image_data.loading import SplitNotFoundError
from pipelines import (
    ClassConditionalTransformerPipeline,
    ClassConditionalUNetPipeline,
    TextToImageTransformerPipeline,
    TextToImageUNetPipeline,
)

from .artifacts import save_pipeline_folder
from .config import MNIST_DATASETS, Config, ConfigError, RunConfig, model_class
from .fsdp import deepspeed_requested, fsdp_plugin, fsdp_requested, route_cpu_processes_to_fsdp
from .objectives import DiffusionObjective, FlowMatchingObjective


# --------------------------------------------------------------------------------------------------
# Accelerator
# --------------------------------------------------------------------------------------------------
def resolve_mixed_precision(setting: str) -> str:
    """`auto`: no on CPU, bf16 on GPUs that support it, else fp16. Explicit settings are kept."""
    if setting != "auto":
        return setting
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if forced_cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_accelerator(config: RunConfig) -> Accelerator:
    """The run's `Accelerator` (mixed precision, accumulation, trackers, compile), refusing fp16 on CPU."""
    output_dir = config.output_dir
    mixed_precision = resolve_mixed_precision(config.train.mixed_precision)
    # `accelerate launch --multi_gpu` (or `--use_fsdp`) on a machine without GPUs: run the processes on CPU, gloo.
    cpu_processes = os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available()
    plugin, routed = None, False
    if fsdp_requested():
        plugin = fsdp_plugin(mixed_precision)
        if cpu_processes:
            route_cpu_processes_to_fsdp()
            routed = True
    elif deepspeed_requested():
        raise ConfigError(
            "DeepSpeed was requested; this training loop does not run under DeepSpeed: its engine owns the optimizer "
            "step and writes checkpoints as pickles (which can run code when loaded) that the loop's checkpoint rules "
            "refuse, and ZeRO-3 partitions the parameters the EMA averages. Use FSDP2, the same sharding (ZeRO-3 "
            "like; `--fsdp_reshard_after_forward false` is ZeRO-2 like): `accelerate launch --use_fsdp "
            "--fsdp_version 2 --num_processes N ...`, or DDP with `--multi_gpu`."
        )
    accelerator = Accelerator(
        cpu=cpu_processes,
        fsdp_plugin=plugin,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=None if config.train.report_to == "none" else config.train.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=os.path.join(output_dir, "logs")),
        dynamo_backend="inductor" if config.train.compile else "no",
    )
    if routed:  # accelerate sets the plugin only for GPU-type processes
        accelerator.state.fsdp_plugin = plugin
    if accelerator.device.type == "cpu" and mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision 'fp16' needs a GPU; use 'no' (or 'bf16', slow on most CPUs) on CPU.")
    if config.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def idle_cpu_cores_hint(device: torch.device, num_processes: int) -> str | None:
    """A hint when a CPU run leaves cores idle: `accelerate launch` sets OMP_NUM_THREADS=1 unless it is told
    otherwise, which on a 2-core machine makes single-process training ~1.8x slower than it needs to be."""
    if device.type != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    if threads * num_processes >= cores:
        return None
    return (
        f"{num_processes} process(es) x {threads} thread(s) use {threads * num_processes} of {cores} CPU cores. "
        f"`accelerate launch` sets OMP_NUM_THREADS=1 unless given `--num_cpu_threads_per_process "
        f"{max(cores // num_processes, 1)}` (or OMP_NUM_THREADS in the environment)."
    )


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def load_datasets(data_config):
    """(train dataset, validation dataset or None) as `{"pixel_values", "class_labels"}` items."""
    kwargs = dict(data_config.image_loading_kwargs(), label_column=data_config.label_column, labels=data_config.labels)
    train_dataset = load_image_dataset(split=data_config.train_split, random_flip=data_config.random_flip, **kwargs)
    num_validation = data_config.num_validation_samples
    validation_dataset = None
    if data_config.validation_split is not None:
        try:
            validation_dataset = load_image_dataset(split=data_config.validation_split, **kwargs)
        except SplitNotFoundError as error:
            raise ConfigError(
                f"data.validation_split {data_config.validation_split!r}: {error} Set data.validation_split to one of "
                "them, or to null to hold out the last data.num_validation_samples training images."
            ) from None
        if num_validation:
            validation_dataset = _subset(validation_dataset, range(min(num_validation, len(validation_dataset))))
    elif num_validation:
        # No validation split: hold out the last images of the training split.
        if num_validation >= len(train_dataset):
            raise ValueError(
                f"data.num_validation_samples ({num_validation}) leaves no training images out of {len(train_dataset)}."
            )
        held_out = load_image_dataset(split=data_config.train_split, **kwargs)
        validation_dataset = _subset(held_out, range(len(train_dataset) - num_validation, len(train_dataset)))
        train_dataset = _subset(train_dataset, range(len(train_dataset) - num_validation))
    if data_config.max_train_samples is not None and data_config.max_train_samples < len(train_dataset):
        train_dataset = _subset(train_dataset, range(data_config.max_train_samples))
    if validation_dataset is not None and len(validation_dataset) == 0:
        validation_dataset = None
    return train_dataset, validation_dataset


def _subset(dataset, indices):
    """A `Subset` that keeps the class metadata of the dataset it views."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    subset.num_classes, subset.id2label, subset.columns = dataset.num_classes, dataset.id2label, dataset.columns
    return subset


def load_vae(path: str) -> AutoencoderKL:
    """A frozen `AutoencoderKL` (trained by `training/train_vae.py`) whose config holds its measured scaling factor."""
    vae = AutoencoderKL.from_pretrained(path)
    vae.requires_grad_(False)
    return vae.eval()


def latent_geometry(vae: AutoencoderKL, image_size: int) -> tuple[int, int]:
    """(latent side length, latent channels) of `image_size` images."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(
            f"Image size {image_size} is not divisible by the VAE's downsampling factor {factor}; set data.pad_to."
        )
    return image_size // factor, vae.config.latent_channels


@torch.no_grad()
def to_model_space(pixel_values: torch.Tensor, vae: AutoencoderKL | None, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1], or their scaled VAE latents for latent diffusion."""
    if vae is None:
        return pixel_values
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator=generator)
    return (latents * vae.config.scaling_factor).to(pixel_values.dtype)


# --------------------------------------------------------------------------------------------------
# Model, schedulers, objective, pipeline
# --------------------------------------------------------------------------------------------------
def build_model(model_config, *, sample_size: int, in_channels: int, num_classes: int | None, **text_widths):
    """The denoiser from its architecture preset, sized for the data (or latents) and, for text, the encoder."""
    cls = model_class(model_config.architecture)
    overrides = {
        **model_config.overrides,
        "sample_size": sample_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        **text_widths,
    }
    return cls.from_preset(model_config.preset, **overrides)


def _text_setup(config, train_dataset, validation_dataset, accelerator):
    """Captioned data, the frozen encoder with its caption cache, and the denoiser's text widths."""
    from image_data.captions import CaptionedDigits
    from pipelines.text_encoder import load_text_encoder

    from .text_conditioning import TextConditioning

    tokenizer, encoder = load_text_encoder(accelerator.device)
    width = encoder.config.hidden_size
    # Both take the prompt's masked mean besides its tokens: the MMDiT in adaLN (SD3), the UNet in its FiLM
    # embedding (SDXL). The pooled sentence embedding is what all-MiniLM-L6-v2 was trained to make similar for
    # paraphrases, so it carries the held-out phrasings that the token sequence alone does not.
    if config.model.architecture == "unet":
        widths = {"cross_attention_dim": width, "pooled_projection_dim": width}
    else:
        widths = {"joint_attention_dim": width, "pooled_projection_dim": width}
    condition = TextConditioning(
        tokenizer,
        encoder,
        uses_pooled=True,
        caption_dropout=config.objective.label_dropout,
    )
    train_dataset = CaptionedDigits(train_dataset, seed=config.train.seed)
    if validation_dataset is not None:
        validation_dataset = CaptionedDigits(validation_dataset, seed=config.train.seed)
    return train_dataset, validation_dataset, condition, (tokenizer, encoder), widths


def build_noise_scheduler(objective_config, *, clip_sample: bool = True):
    """The training-time noise schedule: DDPM (with its prediction type) or rectified flow."""
    if objective_config.name == "flow_matching":
        return ScratchFlowMatchEulerScheduler(num_train_timesteps=objective_config.num_train_timesteps)
    return ScratchDDPMScheduler(
        num_train_timesteps=objective_config.num_train_timesteps,
        beta_schedule=objective_config.beta_schedule,
        beta_start=objective_config.beta_start,
        beta_end=objective_config.beta_end,
        prediction_type=objective_config.prediction_type,
        clip_sample=clip_sample,
    )


SAMPLER_CLASSES = {
    "ddpm": ScratchDDPMScheduler,
    "ddim": ScratchDDIMScheduler,
    "flow_match_euler": ScratchFlowMatchEulerScheduler,
}


def build_sampling_scheduler(sampler: str, noise_scheduler):
    """The scheduler the saved pipeline samples with (a short name, or our or diffusers' class name, see
    `SAMPLER_FAMILIES`), sharing the training noise schedule."""
    if sampler == "auto":
        sampler = "flow_match_euler" if isinstance(noise_scheduler, ScratchFlowMatchEulerScheduler) else "ddim"
    if sampler in SAMPLER_CLASSES:
        scheduler_class = SAMPLER_CLASSES[sampler]
    else:
        scheduler_class = getattr(custom_schedulers, sampler, None) or getattr(diffusers, sampler)
    return scheduler_class.from_config(noise_scheduler.config)


def build_objective(objective_config, noise_scheduler, num_classes: int | None):
    """The training objective object (`objective(model, clean, class_labels, generator) -> loss`)."""
    common = dict(
        loss=objective_config.loss,
        timestep_sampling=objective_config.timestep_sampling,
        logit_mean=objective_config.logit_mean,
        logit_std=objective_config.logit_std,
        mode_scale=objective_config.mode_scale,
        label_dropout=objective_config.label_dropout,
        num_classes=num_classes,
    )
    if objective_config.name == "flow_matching":
        return FlowMatchingObjective(noise_scheduler, **common)
    return DiffusionObjective(noise_scheduler, snr_gamma=objective_config.snr_gamma, **common)


def build_pipeline(architecture: str, denoiser, scheduler, vae=None, id2label=None, objective=None, text=None):
    """The project's pipeline for a denoiser: `unet` for the UNet, `transformer` for DiT and MMDiT; with
    `text=(tokenizer, text_encoder)` the text-to-image one.

    `objective` is `{"objective": ..., "prediction_type": ...}`, recorded in the saved `model_index.json`.
    """
    if text is not None:
        tokenizer, text_encoder = text
        kwargs = dict(tokenizer=tokenizer, text_encoder=text_encoder, scheduler=scheduler, vae=vae, **(objective or {}))
        if architecture == "unet":
            return TextToImageUNetPipeline(unet=denoiser, **kwargs)
        return TextToImageTransformerPipeline(transformer=denoiser, **kwargs)
    kwargs = dict(scheduler=scheduler, vae=vae, id2label=id2label, **(objective or {}))
    if architecture == "unet":
        return ClassConditionalUNetPipeline(unet=denoiser, **kwargs)
    return ClassConditionalTransformerPipeline(transformer=denoiser, **kwargs)


def pipeline_objective(objective_name: str, prediction_type: str | None) -> dict:
    """What a saved pipeline records of its training objective (`build_pipeline`'s `objective`)."""
    return {
        "objective": objective_name,
        "prediction_type": prediction_type if objective_name == "diffusion" else None,
    }


# --------------------------------------------------------------------------------------------------
# What the loop trains
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainingSetup:
    """What the loop trains and how it saves it; `training/train_lora.py` builds one around a frozen base model."""

    train_dataset: torch.utils.data.Dataset
    validation_dataset: torch.utils.data.Dataset | None
    # Only its parameters that require grad are optimized.
    model: torch.nn.Module
    vae: AutoencoderKL | None
    objective: Callable
    sampling_scheduler: object
    architecture: str
    # What was trained, for the model card: e.g. "unet `small`, diffusion objective".
    description: str
    # Recorded in every saved pipeline (`pipeline_objective`).
    pipeline_objective: dict
    # Other data than MNIST with `eval.fid_n > 0`: the unflipped training images, Inception FID's reference.
    reference_dataset: torch.utils.data.Dataset | None = None
    # `save_folder(pipeline, destination, *, config, grid, metrics, details)` writes `last/` and `best/`.
    save_folder: Callable = save_pipeline_folder
    # Text models: `condition(batch, device, generator)` -> the denoiser's text inputs (`TextConditioning`), and
    # the (tokenizer, text encoder) their pipelines carry. None: class labels (or none) condition the model.
    condition: Callable | None = None
    text_components: tuple | None = None


def build_training_setup(config: Config, accelerator: Accelerator) -> TrainingSetup:
    """The data and a new denoiser from its preset, in pixel or VAE latent space, saved as pipeline folders."""
    train_dataset, validation_dataset = load_datasets(config.data)
    num_classes = train_dataset.num_classes
    if num_classes is None and config.data.labels == "auto":
        accelerator.print(
            f"The data has no label column (its columns: {train_dataset.columns}): training an unconditional model. Set "
            "data.label_column to train on labels, or data.labels ignore to say that this is what you want."
        )
    if num_classes is None and config.eval.fid_n > 0 and config.data.dataset in MNIST_DATASETS:
        raise ConfigError(
            f"eval.fid_n {config.eval.fid_n}: the data has no labels (an unconditional model), and GAN-test accuracy "
            "asks for each digit; set eval.fid_n 0, or give the data a label column (data.label_column)."
        )
    image_channels, image_size, _ = train_dataset[0]["pixel_values"].shape
    vae = None
    sample_size, in_channels = image_size, image_channels
    if config.model.vae is not None:
        vae = load_vae(config.model.vae).to(accelerator.device)
        sample_size, in_channels = latent_geometry(vae, image_size)

    condition, text_components, text_overrides = None, None, {}
    if config.model.text_encoder is not None:
        train_dataset, validation_dataset, condition, text_components, text_overrides = _text_setup(
            config, train_dataset, validation_dataset, accelerator
        )
        num_classes = None
    set_seed(config.train.seed)  # identical initial weights on every process
    model = build_model(
        config.model, sample_size=sample_size, in_channels=in_channels, num_classes=num_classes, **text_overrides
    )
    # Latents are not bounded to [-1, 1]: never clip them.
    noise_scheduler = build_noise_scheduler(config.objective, clip_sample=config.objective.clip_sample and vae is None)
    return TrainingSetup(
        condition=condition,
        text_components=text_components,
        train_dataset=train_dataset,
        validation_dataset=validation_dataset,
        model=model,
        vae=vae,
        objective=build_objective(config.objective, noise_scheduler, num_classes),
        sampling_scheduler=build_sampling_scheduler(config.eval.sampler, noise_scheduler),
        architecture=config.model.architecture,
        description=f"{config.model.architecture} `{config.model.preset}`, {config.objective.name} objective",
        pipeline_objective=pipeline_objective(config.objective.name, config.objective.prediction_type),
        reference_dataset=reference_images(config),
    )


def reference_images(config) -> torch.utils.data.Dataset | None:
    """The training split without random flips, as the Inception reference of other data than MNIST (else None)."""
    if config.eval.fid_n == 0 or config.data.dataset in MNIST_DATASETS:
        return None
    return load_image_dataset(split=config.data.train_split, labels="ignore", **config.data.image_loading_kwargs())


def build_optimizer(optim_config, model: torch.nn.Module, total_steps: int):
    """AdamW over the parameters that require grad, and its warm-up + decay lr schedule over `total_steps`."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=optim_config.learning_rate,
        betas=(optim_config.adam_beta1, optim_config.adam_beta2),
        eps=optim_config.adam_epsilon,
        weight_decay=optim_config.weight_decay,
    )
    lr_scheduler = get_scheduler(
        optim_config.lr_scheduler,
        optimizer,
        num_warmup_steps=optim_config.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    return optimizer, lr_scheduler


def build_ema(ema_config, model: torch.nn.Module) -> EMAModel | None:
    """`diffusers.training_utils.EMAModel` of the model's parameters, or None when disabled."""
    if not ema_config.enabled:
        return None
    return EMAModel(
        model.parameters(),
        decay=ema_config.decay,
        use_ema_warmup=ema_config.use_warmup,
        inv_gamma=ema_config.inv_gamma,
        power=ema_config.power,
        update_after_step=ema_config.update_after_step,
    )


def step_generator(*counters: int) -> torch.Generator:
    """A CPU generator seeded from (seed, rank, epoch, micro-batch, ...): the step's randomness, the same on resume."""
    seed = np.random.SeedSequence([int(c) for c in counters]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))
