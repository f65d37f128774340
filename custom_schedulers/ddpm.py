"""Denoising diffusion probabilistic models: ancestral sampling of the reverse Markov chain.

Ho et al. 2020 (DDPM), with the strided sampling and learned-range variances of Nichol & Dhariwal 2021
(improved DDPM) and the v-parameterisation of Salimans & Ho 2022. Timesteps are 0-indexed: timestep t here is
the paper's t + 1, and "timestep -1" is the clean sample x_0. The schedule, the timestep grid and the forward
process are shared with DDIM (`schedules.py`); this file is the reverse step.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .schedules import DiscreteDiffusionScheduler, check_choice

# `fixed_small_log` is `fixed_small` computed through its logarithm: the same standard deviation.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


@dataclass
class ScratchDDPMSchedulerOutput(BaseOutput):
    """The sample one step earlier in the chain and the clean sample predicted on the way."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class ScratchDDPMScheduler(DiscreteDiffusionScheduler):
    """DDPM ancestral sampler; config names, arguments and trajectories match diffusers' `DDPMScheduler`.

    Without `set_timesteps` it steps the whole training chain (`for t in reversed(range(1000))`); after it, the
    chosen timesteps, and a timestep between two of them steps to the next lower one (the DDPM math holds for
    every pair of timesteps).

    One deliberate difference: no noise is added on the step that lands on x_0 (Ho et al., Algorithm 2), where
    diffusers adds it whenever that last timestep is > 0 (trailing or linspace spacing, a `steps_offset`, custom
    timesteps ending above 0); it shows with `fixed_large` and the learned variances. Everywhere else the
    trajectories are identical. `variance_type="fixed_large_log"` is refused: diffusers takes the square root
    of log(beta) < 0 there, which is NaN on every step.
    """

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
        if variance_type == "fixed_large_log":
            raise ValueError(
                "variance_type 'fixed_large_log' is not supported: diffusers' DDPMScheduler returns the log of beta "
                "and then takes its square root, which is NaN; use 'fixed_large' (the same variance, beta) or "
                f"another of {VARIANCE_TYPES}."
            )
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._init_noise_schedule()
        self.variance_type = variance_type

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ScratchDDPMSchedulerOutput | tuple:
        """Sample x_prev ~ p(x_prev | x_t) from the model output at `timestep`."""
        t = self._timestep_int(timestep)
        prev_timestep = self.previous_timestep(t)

        channels = sample.shape[1]
        variance_type = self.config.variance_type
        if variance_type in LEARNED_VARIANCE_TYPES:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type {variance_type!r} needs a model output with 2 x {channels} channels (prediction, "
                    f"variance), got {model_output.shape[1]}."
                )
            model_output, predicted_variance = model_output.split(channels, dim=1)
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
        pred_original_sample = self._clip_or_threshold(pred_original_sample)

        # Posterior mean of q(x_prev | x_t, x_0), Ho et al. eq. 7.
        pred_original_coefficient = alpha_bar_prev**0.5 * beta / one_minus_alpha_bar
        sample_coefficient = alpha**0.5 * one_minus_alpha_bar_prev / one_minus_alpha_bar
        prev_sample = pred_original_coefficient * pred_original_sample + sample_coefficient * sample

        # Ho et al. Algorithm 2: noise on every step but the one that lands on x_0.
        if prev_timestep >= 0:
            # Clamped as in diffusers, so that the log of a zero posterior variance stays finite.
            posterior_variance = (one_minus_alpha_bar_prev / one_minus_alpha_bar * beta).clamp(min=1e-20)
            if variance_type == "fixed_small":
                std = posterior_variance**0.5
            elif variance_type == "fixed_small_log":
                std = (0.5 * posterior_variance.log()).exp()  # the same std, rounded as diffusers rounds it
            elif variance_type == "fixed_large":
                std = beta**0.5
            elif variance_type == "learned":
                # The extra channels are the variance itself (diffusers' "learned"): it must not be negative.
                if bool((predicted_variance < 0).any()):
                    raise ValueError(
                        f"variance_type 'learned' got a negative predicted variance at timestep {t} "
                        f"(min {float(predicted_variance.min()):.3g}); its extra output channels must be variances "
                        "(or use 'learned_range', which cannot go negative)."
                    )
                std = predicted_variance**0.5
            else:
                # Nichol & Dhariwal eq. 15: interpolate log-variances between beta~ and beta with v in [-1, 1].
                fraction = (predicted_variance + 1) / 2
                log_variance = fraction * beta.log() + (1 - fraction) * posterior_variance.log()
                std = (0.5 * log_variance).exp()
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + std * noise

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return ScratchDDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
