"""Rectified flow (Liu et al. 2022) sampled with Euler steps, with the time shift of SD3 (Esser et al. 2024).

The forward process is the straight line x_sigma = (1 - sigma) x_0 + sigma eps for sigma in [0, 1]; the model
predicts its velocity dx/dsigma = eps - x_0, and sampling integrates that ODE from sigma = 1 down to 0.
The model sees timestep = sigma * num_train_timesteps, a float, so training may draw sigma continuously.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class ScratchFlowMatchEulerSchedulerOutput(BaseOutput):
    """The sample at the next (lower) noise level and the clean sample predicted on the way."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class ScratchFlowMatchEulerScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for rectified flow; config names and trajectories match diffusers'
    `FlowMatchEulerDiscreteScheduler` for the options it supports (`shift`, `stochastic_sampling`)."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        stochastic_sampling: bool = False,
        use_dynamic_shifting: bool = False,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
    ):
        # diffusers' schedule variants are registered so that a config asking for one fails loudly here
        # instead of being dropped silently by `from_config`.
        unsupported = {
            "use_dynamic_shifting": use_dynamic_shifting,
            "invert_sigmas": invert_sigmas,
            "shift_terminal": shift_terminal,
            "use_karras_sigmas": use_karras_sigmas,
            "use_exponential_sigmas": use_exponential_sigmas,
            "use_beta_sigmas": use_beta_sigmas,
        }
        requested = {name: value for name, value in unsupported.items() if value}
        if requested:
            raise ValueError(
                f"{type(self).__name__} does not support {requested}; the supported options are "
                "num_train_timesteps, shift and stochastic_sampling (use diffusers' FlowMatchEulerDiscreteScheduler "
                "for the others)."
            )
        is_int = isinstance(num_train_timesteps, int) and not isinstance(num_train_timesteps, bool)
        if not is_int or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}.")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}.")

        # The training grid sigma = i / T, i = T..1, shifted; its smallest value ends the sampling grid.
        sigmas = self._shift(torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps)
        self.sigmas = sigmas
        self.timesteps = sigmas * num_train_timesteps
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self._schedule = []
        self._step_index = None

    def _shift(self, sigmas):
        """Esser et al. 2024, Sec. 5.3.2: sigma -> shift * sigma / (1 + (shift - 1) * sigma); shift > 1 adds noise."""
        shift = self.config.shift
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | None = None) -> torch.Tensor:
        """The flow model sees x_sigma unscaled; present for interchangeability with other schedulers."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Choose the noise levels to sample with: `num_inference_steps` evenly spaced ones, or `sigmas` given in
        descending order in (0, 1]; both then go through the shift, and a terminal sigma = 0 is appended."""
        if sigmas is None:
            if (
                not isinstance(num_inference_steps, (int, np.integer))
                or isinstance(num_inference_steps, bool)
                or num_inference_steps < 1
            ):
                raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
            # Evenly spaced from sigma = 1 down to the smallest noise level of the (already shifted) training grid,
            # which the shift below moves once more: diffusers' grid, kept so that trajectories match.
            num_train_timesteps = self.config.num_train_timesteps
            first, last = self.sigma_max * num_train_timesteps, self.sigma_min * num_train_timesteps
            sigmas = np.linspace(first, last, num_inference_steps) / num_train_timesteps
        else:
            sigmas = np.asarray(sigmas, dtype=np.float64).flatten()
            if num_inference_steps is not None and num_inference_steps != len(sigmas):
                raise ValueError(f"num_inference_steps={num_inference_steps!r} but {len(sigmas)} sigmas were given.")
            if len(sigmas) == 0 or not ((sigmas > 0) & (sigmas <= 1)).all() or (np.diff(sigmas) >= 0).any():
                raise ValueError(f"sigmas must be strictly decreasing values in (0, 1], got {sigmas.tolist()}.")
            sigmas = sigmas.astype(np.float32)
        sigmas = torch.from_numpy(self._shift(sigmas)).to(dtype=torch.float32, device=device)

        self.num_inference_steps = len(sigmas)
        self.timesteps = sigmas * self.config.num_train_timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        self._schedule = self.timesteps.tolist()
        self._step_index = None

    def _index_of(self, timestep: float | torch.Tensor) -> int:
        """The position of `timestep` in the schedule, searching from the current step onwards."""
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before `step`.")
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError(
                f"timestep {timestep!r} is an integer; pass a float timestep from `scheduler.timesteps` "
                "(sigma * num_train_timesteps), not a loop index."
            )
        if torch.is_tensor(timestep) and timestep.numel() != 1:
            raise ValueError(f"step takes one timestep for the whole batch, got shape {tuple(timestep.shape)}.")
        value = float(timestep)
        start = self._step_index or 0
        for index in range(start, len(self._schedule)):
            if self._schedule[index] == value:
                return index
        raise ValueError(
            f"timestep {value!r} is not in the remaining schedule set by set_timesteps ({self.num_inference_steps} "
            f"steps from {self._schedule[0]!r} down to {self._schedule[-1]!r}; next expected "
            f"{self._schedule[start] if start < len(self._schedule) else 'none, the schedule is finished'!r})."
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ScratchFlowMatchEulerSchedulerOutput | tuple:
        """One Euler step of dx/dsigma = v from the current sigma to the next one."""
        index = self._index_of(timestep)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]

        # Integrate in float32 whatever the model's precision; return the model's dtype.
        sample = sample.to(torch.float32)
        velocity = model_output.to(torch.float32)
        pred_original_sample = sample - sigma * velocity
        if self.config.stochastic_sampling:
            # Re-noise the predicted x_0 to the next noise level with fresh noise instead of following the ODE.
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (1 - sigma_next) * pred_original_sample + sigma_next * noise
        else:
            prev_sample = sample + (sigma_next - sigma) * velocity
        self._step_index = index + 1

        prev_sample = prev_sample.to(model_output.dtype)
        pred_original_sample = pred_original_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return ScratchFlowMatchEulerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _sigma(self, timestep, like: torch.Tensor) -> torch.Tensor:
        """sigma = timestep / num_train_timesteps for any float timestep(s), shaped to broadcast against `like`."""
        num_train_timesteps = self.config.num_train_timesteps
        compute_dtype = torch.promote_types(like.dtype, torch.float32)
        timestep = torch.as_tensor(timestep, device=like.device).to(compute_dtype)
        if timestep.numel() and (float(timestep.min()) < 0 or float(timestep.max()) > num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {num_train_timesteps}] (sigma * num_train_timesteps), got values from "
                f"{float(timestep.min())} to {float(timestep.max())}."
            )
        sigma = (timestep / num_train_timesteps).flatten().to(like.dtype)
        return sigma.reshape((-1,) + (1,) * (like.ndim - 1))

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process (Liu et al. 2022, Sec. 2): x_sigma = (1 - sigma) x_0 + sigma eps, with `sample` = x_0."""
        sigma = self._sigma(timestep, sample)
        return sigma * noise + (1 - sigma) * sample

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps=None) -> torch.Tensor:
        """The training target dx/dsigma = eps - x_0, the same at every timestep (`timesteps` is unused)."""
        return noise - sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
