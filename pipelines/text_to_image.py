"""Text-to-image generation with classifier-free guidance, for the denoisers that take text: the SD1-style UNet
(cross-attention to the prompt's tokens) and the SD3-style MMDiT (joint attention, pooled prompt in adaLN).

Components follow diffusers' text-to-image pipelines: `tokenizer`, `text_encoder` (a frozen `transformers` encoder,
saved and loaded as a transformers component), `unet` or `transformer`, `scheduler`, optional `vae`. Arguments
follow them too: `prompt`, `negative_prompt`, `num_images_per_prompt`, `prompt_embeds` / `negative_prompt_embeds`
(with their attention masks and, for the MMDiT, pooled variants), `guidance_scale`, `generator`, `latents`,
`output_type`, callbacks. The empty prompt is the unconditional branch of guidance (training drops captions to it).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, make_image_grid
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from custom_models.mmdit import ScratchMMDiTModel
from custom_models.unet import ScratchUNetModel

from .class_conditional import DenoisingPipeline
from .lora import TransformerLoraLoaderMixin, UNetLoraLoaderMixin
from .text_encoder import DEFAULT_MAX_LENGTH, drop_shared_padding, encode_prompts

DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_LENGTH


@dataclass
class TextToImagePipelineOutput(BaseOutput):
    """Generated images (and, when asked for, the images after every denoising step), as in the class-conditional
    pipelines' output."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory: list | None = None


@dataclass
class PromptEncoding:
    """A batch of encoded prompts: token states `[B, T, D]`, attention mask `[B, T]` and masked mean `[B, D]`."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor

    def repeat(self, times: int) -> "PromptEncoding":
        """Each prompt `times` times in a row (`num_images_per_prompt`)."""
        return PromptEncoding(
            *(t.repeat_interleave(times, dim=0) for t in (self.embeds, self.attention_mask, self.pooled))
        )

    @staticmethod
    def cat(first: "PromptEncoding", second: "PromptEncoding") -> "PromptEncoding":
        return PromptEncoding(
            torch.cat([first.embeds, second.embeds]),
            torch.cat([first.attention_mask, second.attention_mask]),
            torch.cat([first.pooled, second.pooled]),
        )


class TextToImagePipeline(DenoisingPipeline):
    """Shared sampler of the text-to-image pipelines; subclasses name the denoiser component."""

    model_cpu_offload_seq = "text_encoder->denoiser->vae"

    def _setup(self, tokenizer, text_encoder, denoiser, scheduler, vae, objective, prediction_type):
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            **{self.denoiser_name: denoiser},
            scheduler=scheduler,
            vae=vae,
        )
        self._record_objective(objective, prediction_type)
        width = getattr(denoiser.config, "cross_attention_dim", None) or getattr(
            denoiser.config, "joint_attention_dim", None
        )
        if width != text_encoder.config.hidden_size:
            raise ValueError(
                f"The {type(denoiser).__name__} attends to text of width {width}, but the text encoder's hidden size "
                f"is {text_encoder.config.hidden_size}; build the denoiser with that width."
            )
        if getattr(denoiser.config, "num_classes", None):
            raise ValueError(
                f"The {type(denoiser).__name__} is class-conditional (num_classes={denoiser.config.num_classes}); a "
                "text-to-image pipeline needs one conditioned on text only (num_classes=None)."
            )

    @property
    def _uses_pooled(self) -> bool:
        return getattr(self.denoiser.config, "pooled_projection_dim", None) is not None

    # ----------------------------------------------------------------------------------------------
    # Prompts
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        """Token states, attention mask and masked mean of `prompt` (one or a list), on the execution device.

        Padding is masked out of the mean and (by the mask) out of the denoiser's attention. A prompt longer than
        `max_sequence_length` tokens is truncated with a warning.
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        encoded = encode_prompts(self.tokenizer, self.text_encoder, list(prompts), max_sequence_length)
        return PromptEncoding(*(tensor.to(self._execution_device) for tensor in encoded))

    def _given_encoding(self, embeds, mask, pooled, name: str) -> PromptEncoding:
        if embeds.ndim != 3:
            raise ValueError(f"`{name}_embeds` must be [batch, tokens, width], got shape {tuple(embeds.shape)}.")
        batch, tokens, _ = embeds.shape
        mask = torch.ones(batch, tokens, dtype=torch.bool) if mask is None else mask.bool()
        if tuple(mask.shape) != (batch, tokens):
            raise ValueError(f"`{name}_attention_mask` must be [{batch}, {tokens}], got {tuple(mask.shape)}.")
        if pooled is None:
            if self._uses_pooled:
                raise ValueError(f"This denoiser also needs `pooled_{name}_embeds` with `{name}_embeds`.")
            weights = mask.to(embeds.dtype)
            pooled = (embeds * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
        if pooled.shape[0] != batch:
            raise ValueError(f"`pooled_{name}_embeds` has {pooled.shape[0]} rows for {batch} prompts.")
        device = self._execution_device
        return PromptEncoding(embeds.to(device), mask.to(device), pooled.to(device))

    def _denoiser_kwargs(self, encoding: PromptEncoding) -> dict:
        embeds, mask = drop_shared_padding(encoding.embeds, encoding.attention_mask)
        kwargs = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if self._uses_pooled:
            kwargs["pooled_projections"] = encoding.pooled
        return kwargs

    # ----------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ):
        """Generate images from text.

        Args:
            prompt: a prompt or a list of them (or pass `prompt_embeds`).
            negative_prompt: what to steer away from, one per prompt or one for all; default the empty prompt.
            num_images_per_prompt: images per prompt, consecutive in the output.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight `w` in `uncond + w * (cond - uncond)`; 1.0 is a single
                conditional pass.
            generator: torch generator(s) for the starting noise and stochastic scheduler steps.
            latents: starting noise `[batch, in_channels, sample_size, sample_size]`.
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds: precomputed prompt encodings
                (`encode_prompt`) instead of `prompt`; the same for the negative prompt.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a `TextToImagePipelineOutput` instead of a tuple.
            return_trajectory: also return the decoded batch after every step (for GIFs).
            callback_on_step_end: `callback(pipeline, step, timestep, callback_kwargs) -> dict` after each step.
            max_sequence_length: tokens per prompt; longer prompts are truncated with a warning.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self._check_loop_inputs(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device

        if prompt_embeds is None:
            encoding = self.encode_prompt(prompt, max_sequence_length)
        else:
            encoding = self._given_encoding(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, "prompt")
        num_prompts = encoding.embeds.shape[0]
        do_guidance = guidance_scale != 1.0
        if do_guidance:
            if negative_prompt_embeds is not None:
                negative = self._given_encoding(
                    negative_prompt_embeds,
                    negative_prompt_attention_mask,
                    negative_pooled_prompt_embeds,
                    "negative_prompt",
                )
            else:
                negatives = negative_prompt if negative_prompt is not None else ""
                negatives = [negatives] * num_prompts if isinstance(negatives, str) else list(negatives)
                if len(negatives) != num_prompts:
                    raise ValueError(f"Got {len(negatives)} negative prompts for {num_prompts} prompts.")
                negative = self.encode_prompt(negatives, max_sequence_length)
            if negative.embeds.shape[0] != num_prompts or negative.embeds.shape[2] != encoding.embeds.shape[2]:
                raise ValueError(
                    f"The negative prompt encodings {tuple(negative.embeds.shape)} do not match the prompts' "
                    f"{tuple(encoding.embeds.shape)} (batch and width)."
                )
            if negative.embeds.shape[1] != encoding.embeds.shape[1]:
                raise ValueError("Prompt and negative prompt encodings must have the same number of tokens.")
            encoding = PromptEncoding.cat(
                encoding.repeat(num_images_per_prompt), negative.repeat(num_images_per_prompt)
            )
        else:
            encoding = encoding.repeat(num_images_per_prompt)

        batch_size = num_prompts * num_images_per_prompt
        latents = self._prepare_latents(batch_size, generator, latents, device)
        images, trajectory = self._denoise(
            latents,
            self._denoiser_kwargs(encoding),
            do_guidance,
            num_inference_steps,
            generator,
            output_type,
            return_trajectory,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        output = TextToImagePipelineOutput(images=images, trajectory=trajectory)
        return output if return_dict else output.to_tuple()

    def sample_grid(
        self,
        num_images_per_prompt: int = 4,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        seed: int = 0,
        prompts: list[str] | None = None,
    ):
        """One row per prompt (default: "a handwritten 0" ... "a handwritten 9"), as a single PIL image."""
        prompts = prompts or [f"a handwritten {digit}" for digit in range(10)]
        images = self(
            prompt=prompts,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images
        return make_image_grid(images, rows=len(prompts), cols=num_images_per_prompt)


class TextToImageUNetPipeline(UNetLoraLoaderMixin, TextToImagePipeline):
    """Text-to-image with a `ScratchUNetModel` that cross-attends to the prompt's tokens (component `unet`)."""

    denoiser_name = "unet"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        unet: ScratchUNetModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        objective: str | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        self._setup(tokenizer, text_encoder, unet, scheduler, vae, objective, prediction_type)


class TextToImageTransformerPipeline(TransformerLoraLoaderMixin, TextToImagePipeline):
    """Text-to-image with a `ScratchMMDiTModel` (joint attention; pooled prompt in adaLN), component `transformer`."""

    denoiser_name = "transformer"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        transformer: ScratchMMDiTModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        objective: str | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        self._setup(tokenizer, text_encoder, transformer, scheduler, vae, objective, prediction_type)
