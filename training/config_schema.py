"""The training configuration's schema: one dataclass per recipe section, each key with its type, limits and
the line `--help` shows. `training/config.py` reads recipes and overrides into these classes and checks them.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from custom_schedulers.schedules import BETA_SCHEDULES, OBJECTIVES, PREDICTION_TYPES
from image_data.loading import LABEL_CHOICES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"
ARCHITECTURES = ("unet", "dit", "mmdit")
# Old spellings of objective.name: refused with the new name ("ddpm" is also a sampler, which confused the two).
RENAMED_OBJECTIVES = {"ddpm": "diffusion"}
TEXT_ENCODERS = (None, "minilm")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSSES = ("mse", "l1")
# eval.sampler: our schedulers by short name or class name, or a diffusers scheduler that follows the standard
# sampling loop (`scale_model_input`, `step(model_output, t, sample)`), per family. "auto": DDIM / flow Euler.
SAMPLER_FAMILIES = {
    "diffusion": (
        "ddpm",
        "ddim",
        "ScratchDDPMScheduler",
        "ScratchDDIMScheduler",
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "LMSDiscreteScheduler",
    ),
    "flow_matching": (
        "flow_match_euler",
        "ScratchFlowMatchEulerScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
    ),
}
SAMPLERS = ("auto", *SAMPLER_FAMILIES["diffusion"], *SAMPLER_FAMILIES["flow_matching"])


def sampler_family(sampler: str) -> str | None:
    """'diffusion' or 'flow_matching': the models `sampler` can sample (None for 'auto', which fits both)."""
    return next((family for family, names in SAMPLER_FAMILIES.items() if sampler in names), None)


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# Every tracker accelerate supports (`accelerate.utils.LoggerType` but "all"); the chosen one must be installed.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "none")


class ConfigError(ValueError):
    """A recipe or override that cannot be trained; the message names the key and what is allowed."""


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
    text_encoder: str | None = choice(
        None,
        TEXT_ENCODERS,
        doc="minilm: condition on captions of MNIST's measured style through the pretrained all-MiniLM-L6-v2 "
        "(the text extra; unet or mmdit); null: on class labels",
    )


@dataclass
class ObjectiveOptions:
    """How the denoiser's errors are weighted and on which timesteps: what full and LoRA training both choose."""

    snr_gamma: float | None = bounded(
        None, 0.0, doc="min-SNR-gamma loss weighting (Hang et al. 2023), DDPM family only; null disables it"
    )
    timestep_sampling: str = choice(
        "uniform",
        TIMESTEP_SAMPLINGS,
        doc="how training noise levels are drawn (SD3's densities): flow matching's sigma in (0, 1), or the DDPM "
        "family's t / num_train_timesteps",
    )
    logit_mean: float = described(
        0.0, doc="logit_normal: mean of the normal whose sigmoid is sigma (flow) or t / T (DDPM family)"
    )
    logit_std: float = bounded(1.0, 0.0, doc="logit_normal: standard deviation of that normal")
    mode_scale: float = described(1.29, doc="mode: SD3's scale of the mode density (0 is uniform)")
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
    clip_sample: bool = described(
        True,
        doc="DDPM family, saved in the pipeline's scheduler config: samplers clip the predicted clean image to [-1, 1] "
        "at every step (DDIM then recomputes the noise from it; never for latent models; README, Quickstart)",
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
    labels: str = choice(
        "auto",
        LABEL_CHOICES,
        doc="auto: class-conditional if the data has a label column, else unconditional; use: require labels; "
        "ignore: train unconditionally",
    )
    unreadable_images: str = choice(
        "stop", ("stop", "skip"), doc="an image that does not decode: stop (an error naming it) or skip (a warning)"
    )

    def image_loading_kwargs(self) -> dict:
        """`image_data.load_image_dataset` arguments that say which images, and how they become tensors."""
        return dict(
            dataset_name=None if self.dataset == "mnist" else self.dataset,
            image_column=self.image_column,
            resolution=self.resolution,
            pad_to=self.pad_to,
            channels=self.channels,
            unreadable_images=self.unreadable_images,
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
    every_steps: int = bounded(
        0,
        0,
        doc="also evaluate every N optimizer steps inside epochs (quality-vs-time curves of runs shorter than an "
        "epoch); each evaluation ends a metrics.csv row; 0: at epoch ends only",
    )
    sampler: str = choice(
        "auto",
        SAMPLERS,
        doc="the sampling scheduler: auto (DDIM for the DDPM family, Euler for flow matching), ours (ddpm, ddim, "
        "flow_match_euler) or a diffusers scheduler class of the model's family (DPMSolverMultistepScheduler, "
        "UniPCMultistepScheduler, HeunDiscreteScheduler, FlowMatchHeunDiscreteScheduler, ...)",
    )
    num_inference_steps: int = bounded(50, 1, doc="sampling steps")
    guidance_scale: float = bounded(2.0, 0.0, doc="classifier-free guidance scale; 1 is a single conditional pass")
    images_per_class: int = bounded(8, 1, doc="samples per class in the grid (one row per class, or per prompt)")
    prompts: list | None = described(
        None, doc="text models: the grid's prompts, one row each; null: 'a handwritten 0' ... 'a handwritten 9'"
    )
    seed: int = bounded(0, 0, 2**32 - 1, doc="seed of the sampling noise (the same at every evaluation)")
    gif: bool = described(True, doc="also write a GIF of the denoising")
    fid_n: int = bounded(
        0,
        0,
        doc="samples per class (unconditional: in all; text: per prompt) for the metrics: FID-MNIST, GAN-test "
        "accuracy, ... on MNIST; Inception FID / KID against the training images on other data (the inception "
        "extra); prompt adherence for text models; 0 skips them",
    )
    fid_reference_samples: int = bounded(
        10000, 2, doc="other data: training images whose Inception features are the reference (computed once, cached)"
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
