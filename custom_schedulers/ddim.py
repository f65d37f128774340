"""Denoising diffusion implicit models: the non-Markovian sampler of Song et al. 2021.

Same forward process and training as DDPM (Ho et al. 2020), sampled along a sub-sequence of timesteps with
eq. 12 of Song et al.; `eta` = 0 is deterministic, `eta` = 1 has the DDPM posterior variance (eq. 16).
Timesteps are 0-indexed: "timestep -1" is the clean sample x_0. The schedule, the timestep grid and the
forward process are shared with DDPM (`schedules.py`); this file is the update rule.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .schedules import DiscreteDiffusionScheduler, clean_and_noise


@dataclass
class ScratchDDIMSchedulerOutput(BaseOutput):
    """The sample one step earlier in the schedule and the clean sample predicted on the way."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class ScratchDDIMScheduler(DiscreteDiffusionScheduler):
    """DDIM sampler; config names, arguments and trajectories match diffusers' `DDIMScheduler`.

    As in diffusers, `step` needs `set_timesteps` first (`timesteps=[...]` takes a custom schedule) and refuses a
    timestep that is not on the schedule.

    One deliberate difference: each step goes to the next timestep of the schedule (Song et al., Sec. 4.2),
    where diffusers subtracts `num_train_timesteps // num_inference_steps`, which leaves the schedule for
    `timestep_spacing="linspace"` and for "trailing" with a step count that does not divide
    `num_train_timesteps` (diffusers issues #11347, #12633). Everywhere else the trajectories are identical.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_noise_schedule()
        # abar after the last step: 1 lands exactly on x_0; otherwise abar_0, as in Stable Diffusion.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ScratchDDIMSchedulerOutput | tuple:
        """Move x_t to the previous scheduled timestep with DDIM's generalised update (eq. 12)."""
        t = self._scheduled_timestep(timestep)
        prev_timestep = self.previous_timestep(t)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}.")
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass either `generator` or `variance_noise`, not both.")
        if variance_noise is not None and variance_noise.shape != model_output.shape:
            raise ValueError(
                f"variance_noise has shape {tuple(variance_noise.shape)}, model_output {tuple(model_output.shape)}."
            )

        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        signal, noise_level = alpha_bar**0.5, (1 - alpha_bar) ** 0.5  # x_t = signal * x_0 + noise_level * eps

        pred_original_sample, pred_epsilon = clean_and_noise(
            model_output, sample, signal, noise_level, self.config.prediction_type
        )

        pred_original_sample = self._clip_or_threshold(pred_original_sample)
        if use_clipped_model_output:
            # Recompute eps from the clipped x_0 so that x_0 and eps stay consistent with x_t (as in GLIDE).
            pred_epsilon = (sample - signal * pred_original_sample) / noise_level

        # eq. 16: sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
        std = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)) ** 0.5

        # eq. 12: x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z. With eta = 1 and a
        # zero-SNR timestep, 1 - abar_prev - sigma^2 is 0 up to rounding: clamp so it cannot turn into NaN.
        direction_scale = (1 - alpha_bar_prev - std**2).clamp(min=0) ** 0.5
        prev_sample = alpha_bar_prev**0.5 * pred_original_sample + direction_scale * pred_epsilon
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std * variance_noise

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return ScratchDDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
