"""Denoising diffusion probabilistic models: ancestral sampling of the reverse Markov chain.

Ho et al. 2020 (DDPM), with the strided sampling and learned-range variances of Nichol & Dhariwal 2021
(improved DDPM) and the v-parameterisation of Salimans & Ho 2022. Timesteps are 0-indexed: timestep t here is
the paper's t + 1, and "timestep -1" is the clean sample x_0.
"""

import operator
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .schedules import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    check_choice,
    dynamic_threshold,
    forward_coefficients,
    inference_timesteps,
    make_betas,
)

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


@dataclass
class ScratchDDPMSchedulerOutput(BaseOutput):
    """The sample one step earlier in the chain and the clean sample predicted on the way."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class ScratchDDPMScheduler(SchedulerMixin, ConfigMixin):
    """DDPM ancestral sampler; config names match diffusers' `DDPMScheduler`.

    One deliberate difference: no noise is added on the step that lands on x_0 (Ho et al., Algorithm 2), where
    diffusers adds it whenever that last timestep is > 0 (trailing or linspace spacing, or a `steps_offset`);
    it shows with `fixed_large` and `learned_range`. Everywhere else the trajectories are identical.
    """

    _compatibles = [scheduler.name for scheduler in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type == "learned":
            raise ValueError(
                "variance_type 'learned' (extra channels read as the variance itself, which a network can make "
                "negative) is not supported; use 'learned_range' (Nichol & Dhariwal 2021, eq. 15), the "
                f"parameterisation of learn_sigma models, or another of {VARIANCE_TYPES}."
            )
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}.")
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}.")
        if thresholding and not (0 < dynamic_thresholding_ratio <= 1 and sample_max_value >= 1):
            raise ValueError(
                "thresholding needs 0 < dynamic_thresholding_ratio <= 1 and sample_max_value >= 1, got "
                f"{dynamic_thresholding_ratio!r} and {sample_max_value!r}."
            )

        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0

        # Until `set_timesteps` is called, `timesteps` lists the training chain, but `step` refuses to run.
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._schedule = []
        self._position = {}

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM feeds the model x_t unscaled; present for interchangeability with other schedulers."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the `num_inference_steps` timesteps to sample with, spaced per `config.timestep_spacing`."""
        config = self.config
        timesteps = inference_timesteps(
            config.num_train_timesteps, num_inference_steps, config.timestep_spacing, config.steps_offset
        )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._schedule = timesteps.tolist()
        self._position = {t: i for i, t in enumerate(self._schedule)}

    def _scheduled_timestep(self, timestep: int | torch.Tensor) -> int:
        """`timestep` as an int, refusing anything that is not in the sampling schedule."""
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before `step`.")
        try:
            key = operator.index(timestep)
        except TypeError:
            key = None
        if key not in self._position:
            raise ValueError(
                f"timestep {timestep!r} is not in the schedule set by set_timesteps ({self.num_inference_steps} "
                f"integer steps, from {self._schedule[0]} down to {self._schedule[-1]})."
            )
        return key

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep after `timestep` in the sampling schedule, or -1 (the clean sample) after the last one."""
        position = self._position[self._scheduled_timestep(timestep)] + 1
        return self._schedule[position] if position < len(self._schedule) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ScratchDDPMSchedulerOutput | tuple:
        """Sample x_prev ~ p(x_prev | x_t) from the model output at `timestep`."""
        t = self._scheduled_timestep(timestep)
        prev_timestep = self.previous_timestep(t)

        channels = sample.shape[1]
        if self.config.variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type 'learned_range' needs a model output with 2 x {channels} channels (prediction, "
                    f"variance interpolation), got {model_output.shape[1]}."
                )
            model_output, variance_interpolation = model_output.split(channels, dim=1)
        elif model_output.shape[1] != channels:
            raise ValueError(
                f"model_output has {model_output.shape[1]} channels but sample has {channels}; a model with "
                "learn_sigma=True needs variance_type='learned_range'."
            )

        # Strided sampling (Nichol & Dhariwal 2021, Sec. 4): between two scheduled timesteps the chain behaves
        # like a DDPM with beta = 1 - abar_t / abar_prev.
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else torch.tensor(1.0)
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha
        one_minus_alpha_bar, one_minus_alpha_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev

        # Predicted x_0: Ho et al. eq. 15 for epsilon, Salimans & Ho 2022, Sec. 4 (x = alpha z - sigma v) for v.
        if self.config.prediction_type == "epsilon":
            pred_original_sample = (sample - one_minus_alpha_bar**0.5 * model_output) / alpha_bar**0.5
        elif self.config.prediction_type == "v_prediction":
            pred_original_sample = alpha_bar**0.5 * sample - one_minus_alpha_bar**0.5 * model_output
        else:
            pred_original_sample = model_output

        if self.config.thresholding:
            pred_original_sample = dynamic_threshold(
                pred_original_sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value
            )
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range
            )

        # Posterior mean of q(x_prev | x_t, x_0), Ho et al. eq. 7.
        pred_original_coefficient = alpha_bar_prev**0.5 * beta / one_minus_alpha_bar
        sample_coefficient = alpha**0.5 * one_minus_alpha_bar_prev / one_minus_alpha_bar
        prev_sample = pred_original_coefficient * pred_original_sample + sample_coefficient * sample

        # Ho et al. Algorithm 2: noise on every step but the one that lands on x_0.
        if prev_timestep >= 0:
            posterior_variance = one_minus_alpha_bar_prev / one_minus_alpha_bar * beta
            if self.config.variance_type == "fixed_small":
                std = posterior_variance**0.5
            elif self.config.variance_type == "fixed_large":
                std = beta**0.5
            else:
                # Nichol & Dhariwal eq. 15: interpolate log-variances between beta~ and beta with v in [-1, 1].
                fraction = (variance_interpolation + 1) / 2
                log_variance = fraction * beta.log() + (1 - fraction) * posterior_variance.clamp(min=1e-20).log()
                std = (0.5 * log_variance).exp()
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + std * noise

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return ScratchDDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process, Ho et al. eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        signal, noise_level = forward_coefficients(self.alphas_cumprod, timesteps, original_samples)
        return signal * original_samples + noise_level * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target, Salimans & Ho 2022, Sec. 4: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        signal, noise_level = forward_coefficients(self.alphas_cumprod, timesteps, sample)
        return signal * noise - noise_level * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
