"""Tiny pipelines for the pipeline, LoRA and Hub tests: every model of `custom_models` x every scheduler family."""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from custom_models.dit_gqa import ScratchDiTModel
from custom_models.mmdit import ScratchMMDiTModel
from custom_models.unet import ScratchUNetModel
from custom_schedulers import ScratchDDIMScheduler, ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler
from pipelines import ClassConditionalTransformerPipeline, ClassConditionalUNetPipeline

MODELS = {"unet": ScratchUNetModel, "dit": ScratchDiTModel, "mmdit": ScratchMMDiTModel}
# Ours and the matching diffusers scheduler, per family: they must give the same images.
SCHEDULER_FAMILIES = {
    "ddpm": (ScratchDDPMScheduler, DDPMScheduler),
    "ddim": (ScratchDDIMScheduler, DDIMScheduler),
    "flow": (ScratchFlowMatchEulerScheduler, FlowMatchEulerDiscreteScheduler),
}
SCHEDULERS = {cls.__name__: cls for pair in SCHEDULER_FAMILIES.values() for cls in pair}
ID2LABEL = {
    str(i): name
    for i, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
}
# One short call used everywhere: two labels, CFG on (conditional and null passes batched), two steps.
CALL = dict(class_labels=[3, 7], num_inference_steps=2, guidance_scale=2.0, output_type="pt")


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every weight with seeded noise: zero-initialised output layers would make all outputs equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def tiny_denoiser(kind: str, seed: int = 0, **overrides):
    """A `tiny`-preset denoiser on 8x8 single-channel samples, 10 classes, random weights."""
    config = {"sample_size": 8, "in_channels": 1, "num_classes": 10, **overrides}
    return randomize_(MODELS[kind].from_preset("tiny", **config), seed).eval()


def pipeline_class(kind: str):
    return ClassConditionalUNetPipeline if kind == "unet" else ClassConditionalTransformerPipeline


def tiny_pipeline(kind: str, scheduler: str = "DDPMScheduler", denoiser=None, vae=None, id2label=ID2LABEL, **overrides):
    """A pipeline around `tiny_denoiser(kind)` (or `denoiser`) with a default-config scheduler named `scheduler`."""
    denoiser = denoiser if denoiser is not None else tiny_denoiser(kind, **overrides)
    name = "unet" if kind == "unet" else "transformer"
    pipe = pipeline_class(kind)(**{name: denoiser}, scheduler=SCHEDULERS[scheduler](), vae=vae, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A two-level `AutoencoderKL`: 1x16x16 images <-> 4x8x8 latents, seeded default initialisation."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            latent_channels=4,
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=16,
            scaling_factor=0.5,
        )
    return vae.eval()


def run(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    """`CALL` (overridable) with a fresh seeded CPU generator; returns `images`."""
    return pipe(**{**CALL, **kwargs}, generator=torch.Generator("cpu").manual_seed(seed)).images
