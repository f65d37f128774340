"""Checks across config keys, those a single field's type and limits cannot see: model presets and overrides,
sampler and objective pairing, the schedule, trackers, metrics that fit the data, text settings. Run by
`training/config.py` on every loaded config, before any training starts.
"""

import dataclasses
import importlib
import importlib.util
import inspect
import warnings
from pathlib import Path

from .config_schema import SAMPLER_FAMILIES, Config, ConfigError, ObjectiveConfig, sampler_family

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
# The data sets the MNIST-classifier metrics fit: the shipped copy and the Hub's.
MNIST_DATASETS = ("mnist", "ylecun/mnist")
# Objective keys that only the DDPM family reads: rectified flow has no beta schedule, always predicts the
# velocity and never clips its samples.
DDPM_ONLY_OBJECTIVE_KEYS = ("prediction_type", "beta_schedule", "beta_start", "beta_end", "clip_sample")


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


def check_sampler_fits(sampler: str, objective: str) -> None:
    """A flow-matching model needs a flow-matching sampler and a DDPM-family model a diffusion one."""
    family = sampler_family(sampler)
    if family is not None and family != objective:
        model = "flow-matching" if objective == "flow_matching" else "DDPM-family"
        fits = ["auto", *SAMPLER_FAMILIES[objective]]
        raise ConfigError(f"eval.sampler {sampler!r} cannot sample a {model} model; use one of {fits}.")


def check_loop_settings(config) -> None:
    """Checks of the sections the training loop reads, shared by full and LoRA training configs."""
    if config.eval.fid_n == 1:
        raise ConfigError(
            "eval.fid_n must be 0 (no metrics) or >= 2 samples per class (FID-MNIST fits a covariance), got 1."
        )
    if config.eval.fid_n > 0 and config.data.dataset not in MNIST_DATASETS:
        # The MNIST classifier cannot score other data: it gets Inception FID / KID against its own images.
        from evaluation.inception_fid import InceptionUnavailableError, find_inception_weights

        try:
            find_inception_weights()
        except InceptionUnavailableError as error:
            raise ConfigError(
                f"eval.fid_n {config.eval.fid_n}: data.dataset {config.data.dataset!r} is not MNIST, so it is scored "
                f"with Inception FID / KID against its own images, and {error}; or set eval.fid_n 0."
            ) from None
    if config.eval.fid_n > 0 and config.data.labels == "ignore" and config.data.dataset in MNIST_DATASETS:
        raise ConfigError(
            "eval.fid_n > 0 needs a class-conditional model (GAN-test accuracy asks for each digit), but "
            "data.labels is 'ignore'; set eval.fid_n 0 or data.labels auto."
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


def check_text_settings(config: Config) -> None:
    """Text conditioning: a denoiser that takes text, captions the data can have, the encoder installed."""
    if config.model.text_encoder is None:
        if config.eval.prompts is not None:
            raise ConfigError("eval.prompts are for text models; set model.text_encoder minilm, or remove them.")
        return
    if config.model.architecture not in ("unet", "mmdit"):
        raise ConfigError(
            f"model.text_encoder: the {config.model.architecture} takes class labels only; use unet (cross-attention) "
            "or mmdit (joint attention) for text."
        )
    if config.data.dataset not in MNIST_DATASETS:
        raise ConfigError(
            f"model.text_encoder: captions are made from MNIST digits' measured style; data.dataset "
            f"{config.data.dataset!r} is not MNIST."
        )
    prompts = config.eval.prompts
    if prompts is not None and (not prompts or not all(isinstance(p, str) for p in prompts)):
        raise ConfigError(f"eval.prompts must be a non-empty list of strings or null, got {prompts!r}.")
    from pipelines.text_encoder import TextEncoderUnavailableError, text_encoder_zip

    try:
        text_encoder_zip()
    except TextEncoderUnavailableError as error:
        raise ConfigError(f"model.text_encoder minilm: {error}") from None


def warn_ignored_ddpm_keys(config: Config) -> None:
    """Warn when a flow-matching run sets DDPM-family objective keys: a warning, not an error, so that a DDPM recipe
    turned into a flow one with `--objective.name flow_matching` still runs (the README's quickstart_flow does)."""
    if config.objective.name != "flow_matching":
        return
    defaults = {f.name: f.default for f in dataclasses.fields(ObjectiveConfig)}
    ignored = [
        f"objective.{key}={getattr(config.objective, key)!r}"
        for key in DDPM_ONLY_OBJECTIVE_KEYS
        if getattr(config.objective, key) != defaults[key]
    ]
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)}: DDPM-family settings, ignored by objective.name flow_matching (rectified flow "
            "predicts the velocity, has no beta schedule and never clips); remove them from the flow recipe.",
            stacklevel=2,
        )


def check_config(config: Config) -> None:
    """Refuse combinations that would fail (or silently mislead) only after training started."""
    check_text_settings(config)
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
    check_sampler_fits(config.eval.sampler, config.objective.name)
    if config.objective.name == "flow_matching" and config.objective.snr_gamma is not None:
        raise ConfigError("objective.snr_gamma (min-SNR weighting) applies to the DDPM family only; set it to null.")
    warn_ignored_ddpm_keys(config)
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
