"""Class-conditional image generation with classifier-free guidance, for every denoiser in `custom_models`.

One sampling loop serves both pipelines: `ClassConditionalUNetPipeline` (component `unet`) and
`ClassConditionalTransformerPipeline` (component `transformer`), following diffusers' naming. Any scheduler
with the diffusers contract works (ours or diffusers' DDPM / DDIM / FlowMatchEulerDiscrete), and an optional
`AutoencoderKL` turns the pipeline into latent diffusion.
"""

import inspect
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import HfApi, ModelCard

from custom_models.dit_gqa import ScratchDiTModel
from custom_models.mmdit import ScratchMMDiTModel
from custom_models.unet import ScratchUNetModel
from custom_schedulers.schedules import OBJECTIVES, PREDICTION_TYPES

from .lora import TransformerLoraLoaderMixin, UNetLoraLoaderMixin
from .model_card import SAMPLE_GRID_FILENAME, build_model_card

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


@dataclass
class ClassConditionalPipelineOutput(BaseOutput):
    """Generated images and, when asked for, the images after every denoising step.

    `images` is a list of PIL images, a `[N, H, W, C]` float array in [0, 1], a `[N, C, H, W]` tensor in
    [0, 1], or the final latents, following `output_type`. `trajectory[k]` holds the same batch after `k`
    denoising steps (`trajectory[0]` is the starting noise), in the same format.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory: list | None = None


class DenoisingPipeline(DiffusionPipeline):
    """The sampling loop shared by the class-conditional and the text-to-image pipelines: input checks, starting
    noise, classifier-free guidance, scheduler steps, callbacks, the trajectory and decoding. Subclasses name the
    denoiser component and say what the denoiser is conditioned on."""

    denoiser_name: str
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]
    # `save_pretrained(..., self_contained=True)` calls this (pipelines/self_contained.py::write_code_files). `import
    # pipelines` sets it; it stays None in the code generated into a self-contained folder, which runs where only
    # diffusers is installed and has no project source to generate from.
    code_writer: Callable | None = None
    # `push_to_hub(..., space_id=...)` calls this (demo/space.py::write_space_files); set and None in the same way.
    space_writer: Callable | None = None

    def _record_objective(self, objective, prediction_type) -> None:
        if objective not in (None, *OBJECTIVES):
            raise ValueError(f"`objective` must be one of {list(OBJECTIVES)} or None, got {objective!r}.")
        if objective == "diffusion" and prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"A diffusion objective needs its `prediction_type`, one of {list(PREDICTION_TYPES)}; got {prediction_type!r}."
            )
        if objective != "diffusion" and prediction_type is not None:
            raise ValueError(
                f"`prediction_type` belongs to the diffusion objective; got it with objective={objective!r}."
            )
        # Recorded so that model cards, LoRA training and scheduler swaps need not guess it from the scheduler.
        self.register_to_config(objective=objective, prediction_type=prediction_type)
        self.image_processor = VaeImageProcessor(do_normalize=True)

    @property
    def denoiser(self):
        """The denoising network, whatever the component is called in this pipeline."""
        return getattr(self, self.denoiser_name)

    @property
    def guidance_scale(self):
        """The guidance scale of the running (or last) call, for step callbacks."""
        return self._guidance_scale

    @property
    def num_timesteps(self):
        """The number of denoising steps of the running (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self):
        """Set `pipe._interrupt = True` from a step callback to skip the remaining steps."""
        return self._interrupt

    def _check_loop_inputs(self, num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"`guidance_scale` must be a number (1.0 = no guidance), got {guidance_scale!r}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 0 (1.0 = no guidance), got {guidance_scale}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown `output_type` {output_type!r}; choose one of {list(OUTPUT_TYPES)}.")
        unknown_inputs = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown_inputs} not available; choose from {self._callback_tensor_inputs}."
            )

    def _latent_shape(self, batch_size):
        config = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, config.in_channels, height, width)

    def _prepare_latents(self, batch_size, generator, latents, device):
        shape = self._latent_shape(batch_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} images; pass one generator per image "
                "(or a single generator for the whole batch)."
            )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=self.denoiser.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}; this call needs {shape}.")
        return latents.to(device=device, dtype=self.denoiser.dtype)

    def _guide(self, model_output, num_channels, guidance_scale, do_guidance):
        """Combine the conditional and unconditional halves; keep a learned variance only if the scheduler uses it."""
        if model_output.shape[1] not in (num_channels, 2 * num_channels):
            raise ValueError(
                f"The denoiser returned {model_output.shape[1]} channels for {num_channels}-channel samples; "
                f"expected {num_channels}, or {2 * num_channels} with a learned variance."
            )
        prediction, variance = model_output[:, :num_channels], model_output[:, num_channels:]
        if do_guidance:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
            # The variance is not guided: take the conditional pass's (as in DiT).
            variance = variance.chunk(2)[0]
        variance_type = getattr(self.scheduler.config, "variance_type", None)
        if variance.shape[1] and variance_type in LEARNED_VARIANCE_TYPES:
            return torch.cat([prediction, variance], dim=1)
        return prediction

    def _decode(self, latents, output_type):
        """Latents -> images in `output_type`; through the VAE when there is one."""
        if output_type == "latent":
            return latents
        images = latents
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None) is not None:
                latents = latents + self.vae.config.shift_factor
            images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(images, output_type=output_type)

    def _denoise(
        self,
        latents,
        denoiser_kwargs: dict,
        do_guidance: bool,
        num_inference_steps: int,
        generator,
        output_type: str,
        return_trajectory: bool,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ):
        """Run the scheduler from `latents`; `denoiser_kwargs` condition the denoiser (with guidance: the conditional
        then the unconditional half of a doubled batch). Returns (decoded images, decoded trajectory or None)."""
        device = latents.device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator

        trajectory = [self._decode(latents, output_type)] if return_trajectory else None
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents, latents]) if do_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):
                    model_input = self.scheduler.scale_model_input(model_input, t)
                model_output = self.denoiser(
                    model_input, t.expand(model_input.shape[0]), **denoiser_kwargs, return_dict=False
                )[0]
                model_output = self._guide(model_output, latents.shape[1], self._guidance_scale, do_guidance)
                latents = self.scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    step_tensors = {"latents": latents}
                    callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                if return_trajectory:
                    trajectory.append(self._decode(latents, output_type))
                progress_bar.update()
        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return images, trajectory

    # ----------------------------------------------------------------------------------------------
    # Hub (`sample_grid` is the subclass's)
    # ----------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        self_contained: bool | None = None,
        **kwargs,
    ):
        """`DiffusionPipeline.save_pretrained`; `push_to_hub=True` then uploads through `push_to_hub` (with a model card).

        `self_contained=True` also writes the code of the pipeline and of its custom components into the folder
        (generated from this project's source), so that `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` loads it where only diffusers is installed. Where the project is installed (after
        `import pipelines`), its own code loads the folder, without `trust_remote_code`. Unset, the folder is written
        without code and the upload of `push_to_hub=True` with it (as `push_to_hub` does by default).
        """
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "token", "private", "commit_message", "create_pr")
            if key in kwargs
        }
        if self_contained and self.code_writer is None:
            raise ValueError(
                "This pipeline runs the code generated into a self-contained folder; `self_contained=True` generates "
                "that code from the scratch-diffusion project's source, which is not installed here. Copy the folder "
                "you loaded instead, or pass `self_contained=False` (to `save_pretrained` or `push_to_hub`)."
            )
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        if self_contained:
            self.code_writer(save_directory)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(
                repo_id, safe_serialization=safe_serialization, self_contained=self_contained is not False, **hub_kwargs
            )

    def push_to_hub(
        self,
        repo_id: str,
        model_card: ModelCard | None = None,
        sample_grid: PIL.Image.Image | str | os.PathLike | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        self_contained: bool = True,
        space_id: str | None = None,
    ) -> str:
        """Upload the pipeline with a model card and a sample grid; returns the commit URL.

        `self_contained` (default) uploads the code of the pipeline and its components too (see `save_pretrained`),
        so that people with only diffusers load the repo with `trust_remote_code=True`. `model_card` defaults to
        `build_model_card` filled from this pipeline's components (with both ways to load and the code files it
        runs); `sample_grid` (an image or a path) defaults to a freshly sampled grid. `space_id` also creates (or
        updates) a Gradio Space of that id serving the demo page for this repo (demo/space.py). The token is only
        sent to the Hub, never written.
        """
        if space_id is not None and not self_contained:
            raise ValueError(
                "A Space runs with only diffusers installed, so it needs the model repo's generated code: "
                "drop `self_contained=False` or `space_id`."
            )
        if space_id is not None and self.space_writer is None:
            raise ValueError("Writing a demo Space needs the scratch-diffusion project installed (`demo/space.py`).")
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if sample_grid is None:
            sample_grid = self.sample_grid()
        elif not isinstance(sample_grid, PIL.Image.Image):
            sample_grid = PIL.Image.open(sample_grid)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, self_contained=self_contained)
            if model_card is None:
                written = sorted(
                    os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                    for root, _, names in os.walk(folder)
                    for name in names
                    if name.endswith(".py")
                )
                model_card = build_model_card(repo_id, pipeline=self, code_files=written or None, space_id=space_id)
            sample_grid.save(os.path.join(folder, SAMPLE_GRID_FILENAME))
            model_card.save(os.path.join(folder, "README.md"))
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {self.__class__.__name__}",
                create_pr=create_pr,
            )
        if space_id is not None:
            space = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            with tempfile.TemporaryDirectory() as folder:
                self.space_writer(folder, repo_id)
                api.upload_folder(
                    repo_id=space.repo_id,
                    repo_type="space",
                    folder_path=folder,
                    commit_message=f"Demo page for {repo_id}",
                )
        return commit.commit_url


class ClassConditionalPipeline(DenoisingPipeline):
    """Shared sampler of the class-conditional pipelines; subclasses only name the denoiser component."""

    def _setup(self, denoiser, scheduler, vae, id2label, objective, prediction_type):
        self.register_modules(**{self.denoiser_name: denoiser}, scheduler=scheduler, vae=vae)
        self._record_objective(objective, prediction_type)
        num_classes = denoiser.config.num_classes
        if id2label:
            if not num_classes:
                raise ValueError("`id2label` was given but the denoiser is unconditional (`num_classes` is None).")
            # JSON object keys are strings: store them that way so the config survives a save/load round trip.
            id2label = {str(int(key)): str(value) for key, value in id2label.items()}
            bad_ids = sorted(int(key) for key in id2label if not 0 <= int(key) < num_classes)
            if bad_ids:
                raise ValueError(f"`id2label` has ids {bad_ids} outside the denoiser's classes 0..{num_classes - 1}.")
        self.register_to_config(id2label=id2label or None)
        # Label name -> id, with comma-separated synonyms, the same mapping as diffusers' `DiTPipeline.labels`.
        self.labels = {}
        for key, value in (id2label or {}).items():
            for name in value.split(","):
                self.labels[name.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map label names (from `id2label`) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            known = list(self.labels) or "none: this pipeline has no `id2label`, pass class ids"
            raise ValueError(f"Unknown label name(s) {unknown}; known names: {known}.")
        return [self.labels[name] for name in names]

    # ----------------------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------------------
    def _resolve_class_labels(self, class_labels, num_images_per_label, device):
        """Turn ids, names or a tensor into a `[batch]` long tensor, each label repeated `num_images_per_label` times."""
        if not isinstance(num_images_per_label, int) or num_images_per_label < 1:
            raise ValueError(f"`num_images_per_label` must be a positive integer, got {num_images_per_label!r}.")
        num_classes = self.denoiser.config.num_classes
        if not num_classes:
            if class_labels is not None:
                raise ValueError(
                    "This pipeline's denoiser is unconditional (`num_classes` is None): leave `class_labels` as None."
                )
            return None
        if class_labels is None:
            ids = list(range(num_classes))
        else:
            if torch.is_tensor(class_labels):
                class_labels = class_labels.reshape(-1).tolist()
            elif isinstance(class_labels, (int, str)):
                class_labels = [class_labels]
            if len(class_labels) == 0:
                raise ValueError("`class_labels` is empty.")
            ids = []
            for label in class_labels:
                if isinstance(label, str):
                    ids.extend(self.get_label_ids(label))
                elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                    ids.append(int(label))
                else:
                    raise ValueError(
                        f"Class labels must be ints or label names, got {label!r} ({type(label).__name__})."
                    )
        bad = sorted({i for i in ids if not 0 <= i < num_classes})
        if bad:
            raise ValueError(f"Class label(s) {bad} out of range: this model has classes 0..{num_classes - 1}.")
        return torch.tensor(ids, dtype=torch.long, device=device).repeat_interleave(num_images_per_label)

    def _check_inputs(self, num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs):
        self._check_loop_inputs(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        if not self.denoiser.config.num_classes and guidance_scale != 1.0:
            raise ValueError(
                f"Classifier-free guidance needs a class-conditional denoiser; this one is unconditional, so "
                f"`guidance_scale` must be 1.0 (got {guidance_scale})."
            )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        num_images_per_label: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        batch_size: int | None = None,
    ):
        """Generate images of the given classes.

        Args:
            class_labels: class ids, label names from `id2label` (e.g. `"7"`), or a mix; `None` means every
                class once. Must be `None` for an unconditional denoiser.
            num_images_per_label: images per label, consecutive in the output (for an unconditional denoiser:
                the number of images).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight `w` in `uncond + w * (cond - uncond)`; 1.0 disables
                guidance (a single conditional pass), otherwise the conditional and null-label passes run as one
                batch.
            generator: torch generator(s) for the starting noise and stochastic scheduler steps.
            latents: starting noise of shape `[batch, in_channels, sample_size, sample_size]`.
            output_type: "pil", "np" (`[N, H, W, C]` in [0, 1]), "pt" (`[N, C, H, W]` in [0, 1]) or "latent".
            return_dict: return a `ClassConditionalPipelineOutput` instead of a tuple.
            return_trajectory: also return the decoded batch after every step (for GIFs).
            batch_size: for an unconditional denoiser, the number of images (diffusers' name for it in its
                unconditional pipelines); the same as `num_images_per_label`.
            callback_on_step_end: `callback(pipeline, step, timestep, callback_kwargs) -> dict` called after each
                step with the tensors named in `callback_on_step_end_tensor_inputs`; returned tensors replace them.

        Returns:
            `ClassConditionalPipelineOutput`, or `(images,)` / `(images, trajectory)` when `return_dict=False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self._check_inputs(num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        if batch_size is not None:
            if self.denoiser.config.num_classes:
                raise ValueError(
                    "`batch_size` is the image count of an unconditional denoiser; this one is class-conditional: "
                    "pass `class_labels` and `num_images_per_label`."
                )
            if num_images_per_label != 1:
                raise ValueError("Pass `batch_size` or `num_images_per_label`, not both.")
            num_images_per_label = batch_size
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        denoiser = self.denoiser

        labels = self._resolve_class_labels(class_labels, num_images_per_label, device)
        batch_size = num_images_per_label if labels is None else labels.shape[0]
        latents = self._prepare_latents(batch_size, generator, latents, device)
        do_guidance = labels is not None and guidance_scale != 1.0
        model_labels = labels
        if do_guidance:
            model_labels = torch.cat([labels, torch.full_like(labels, denoiser.config.num_classes)])  # null label
        images, trajectory = self._denoise(
            latents,
            {"class_labels": model_labels},
            do_guidance,
            num_inference_steps,
            generator,
            output_type,
            return_trajectory,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        output = ClassConditionalPipelineOutput(images=images, trajectory=trajectory)
        return output if return_dict else output.to_tuple()

    # ----------------------------------------------------------------------------------------------
    # Hub
    # ----------------------------------------------------------------------------------------------
    def sample_grid(
        self, num_images_per_label: int = 4, num_inference_steps: int = 25, guidance_scale: float = 1.0, seed: int = 0
    ):
        """One row per class (or one row for an unconditional denoiser), as a single PIL image."""
        images = self(
            num_images_per_label=num_images_per_label,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale if self.denoiser.config.num_classes else 1.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images
        return make_image_grid(images, rows=len(images) // num_images_per_label, cols=num_images_per_label)


class ClassConditionalUNetPipeline(UNetLoraLoaderMixin, ClassConditionalPipeline):
    """Class-conditional sampling with a `ScratchUNetModel` denoiser (component `unet`)."""

    denoiser_name = "unet"
    model_cpu_offload_seq = "unet->vae"

    def __init__(
        self,
        unet: ScratchUNetModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict[str, str] | None = None,
        objective: str | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        self._setup(unet, scheduler, vae, id2label, objective, prediction_type)


class ClassConditionalTransformerPipeline(TransformerLoraLoaderMixin, ClassConditionalPipeline):
    """Class-conditional sampling with a `ScratchDiTModel` or `ScratchMMDiTModel` denoiser (component `transformer`)."""

    denoiser_name = "transformer"
    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer: ScratchDiTModel | ScratchMMDiTModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict[str, str] | None = None,
        objective: str | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        self._setup(transformer, scheduler, vae, id2label, objective, prediction_type)
