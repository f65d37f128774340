"""Rectified flow (Liu et al. 2022) sampled with Euler steps, with the time shift of SD3 (Esser et al. 2024).

The forward process is the straight line x_sigma = (1 - sigma) x_0 + sigma eps for sigma in [0, 1]; the model
predicts its velocity dx/dsigma = eps - x_0, and sampling integrates that ODE from sigma = 1 down to 0.
The model sees timestep = sigma * num_train_timesteps, a float, so training may draw sigma continuously.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .schedules import check_choice

TIME_SHIFT_TYPES = ("exponential", "linear")


def shift_sigmas(sigmas, shift: float):
    """Esser et al. 2024, Sec. 5.3.2: sigma -> shift * sigma / (1 + (shift - 1) * sigma); shift > 1 adds noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass
class ScratchFlowMatchEulerSchedulerOutput(BaseOutput):
    """The sample at the next (lower) noise level and the clean sample predicted on the way."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class ScratchFlowMatchEulerScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for rectified flow; config names, arguments and trajectories match diffusers'
    `FlowMatchEulerDiscreteScheduler` for the options it supports: `shift`, resolution-dependent
    `use_dynamic_shifting` (with `mu` and `time_shift_type`, as Flux and SD3.5 configure it), `shift_terminal`
    and `stochastic_sampling`. Karras, exponential and beta sigmas and `invert_sigmas` are refused.

    As in diffusers, the constructed scheduler holds the training grid (`timesteps`, `sigmas`) and can step it
    without `set_timesteps`; its last step lands on sigma = 0 (where diffusers runs off the end of its grid).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        # diffusers' other sigma schedules are registered so that a config asking for one fails loudly here
        # instead of being dropped silently by `from_config`.
        unsupported = {
            "invert_sigmas": invert_sigmas,
            "use_karras_sigmas": use_karras_sigmas,
            "use_exponential_sigmas": use_exponential_sigmas,
            "use_beta_sigmas": use_beta_sigmas,
        }
        requested = {name: value for name, value in unsupported.items() if value}
        if requested:
            raise ValueError(
                f"{type(self).__name__} does not support {requested}; the supported options are "
                "num_train_timesteps, shift, use_dynamic_shifting (base_shift, max_shift, base_image_seq_len, "
                "max_image_seq_len, time_shift_type), shift_terminal and stochastic_sampling (use diffusers' "
                "FlowMatchEulerDiscreteScheduler for the others)."
            )
        is_int = isinstance(num_train_timesteps, int) and not isinstance(num_train_timesteps, bool)
        if not is_int or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}.")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}.")
        check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in [0, 1) (the last sigma), got {shift_terminal!r}.")

        # The training grid sigma = i / T, i = T..1, shifted (unless the shift is chosen per resolution at
        # sampling time); its smallest value ends the sampling grid.
        sigmas = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift_sigmas(sigmas, shift)
        self._shift = shift
        self.sigmas = sigmas
        self.timesteps = sigmas * num_train_timesteps
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self._schedule = self.timesteps.tolist()
        self._step_index = None
        self._begin_index = None

    @property
    def shift(self) -> float:
        """The shift the next `set_timesteps` applies (the config's, unless changed with `set_shift`)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}.")
        self._shift = shift

    @property
    def step_index(self) -> int | None:
        """The position in the schedule of the next step, None before the first one."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The position of the first step, when a pipeline starts part-way (img2img) and says so."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        if not isinstance(begin_index, int) or not 0 <= begin_index < len(self._schedule):
            raise ValueError(f"begin_index must be an int in [0, {len(self._schedule) - 1}], got {begin_index!r}.")
        self._begin_index = begin_index

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        """The resolution-dependent shift of Flux / SD3.5: exponential exp(mu) / (exp(mu) + (1/t - 1)^sigma),
        or linear mu / (mu + (1/t - 1)^sigma)."""
        scale = math.exp(mu) if self.config.time_shift_type == "exponential" else mu
        return scale / (scale + (1 / t - 1) ** sigma)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | None = None) -> torch.Tensor:
        """The flow model sees x_sigma unscaled; present for interchangeability with other schedulers."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Choose the noise levels to sample with: `num_inference_steps` evenly spaced ones, or `sigmas` given in
        descending order in (0, 1], or `timesteps` (sigma * num_train_timesteps; used as given, their sigmas
        shifted). Sigmas then go through the shift (`mu` with `use_dynamic_shifting`), and a terminal 0 is
        appended. With both `sigmas` and `timesteps`, the model sees the given timesteps."""
        num_train_timesteps = self.config.num_train_timesteps
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting needs `mu` in set_timesteps (the shift for this resolution).")
        given = {
            name: np.asarray(values, dtype=np.float64).flatten()
            for name, values in (("sigmas", sigmas), ("timesteps", timesteps))
            if values is not None
        }
        lengths = {len(values) for values in given.values()}
        if len(lengths) > 1:
            raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)}.")
        if given and num_inference_steps is not None and lengths != {num_inference_steps}:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} but {lengths.pop()} {' and '.join(given)} were given."
            )
        if "timesteps" in given:
            custom = given["timesteps"]
            if (
                len(custom) == 0
                or not ((custom > 0) & (custom <= num_train_timesteps)).all()
                or (np.diff(custom) >= 0).any()
            ):
                raise ValueError(
                    f"timesteps must be strictly decreasing values in (0, {num_train_timesteps}], got {custom.tolist()}."
                )
        if "sigmas" in given:
            unshifted = given["sigmas"]
            if len(unshifted) == 0 or not ((unshifted > 0) & (unshifted <= 1)).all() or (np.diff(unshifted) >= 0).any():
                raise ValueError(f"sigmas must be strictly decreasing values in (0, 1], got {unshifted.tolist()}.")
            unshifted = unshifted.astype(np.float32)
        elif "timesteps" in given:
            unshifted = given["timesteps"].astype(np.float32) / num_train_timesteps
        else:
            if (
                not isinstance(num_inference_steps, (int, np.integer))
                or isinstance(num_inference_steps, bool)
                or num_inference_steps < 1
            ):
                raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
            # Evenly spaced from sigma_max down to the smallest noise level of the (already shifted) training
            # grid, which the shift below moves once more: diffusers' grid, kept so that trajectories match.
            first, last = self.sigma_max * num_train_timesteps, self.sigma_min * num_train_timesteps
            unshifted = np.linspace(first, last, num_inference_steps) / num_train_timesteps

        if self.config.use_dynamic_shifting:
            shifted = self.time_shift(mu, 1.0, unshifted)
        else:
            shifted = shift_sigmas(unshifted, self.shift)
        if self.config.shift_terminal:
            # Stretch so that the last sigma is exactly shift_terminal (LTX-Video's schedule).
            one_minus = 1 - shifted
            shifted = 1 - one_minus / (one_minus[-1] / (1 - self.config.shift_terminal))
        sigmas_tensor = torch.from_numpy(np.asarray(shifted)).to(dtype=torch.float32, device=device)

        self.num_inference_steps = len(sigmas_tensor)
        if "timesteps" in given:
            self.timesteps = torch.from_numpy(given["timesteps"].astype(np.float32)).to(device)
        else:
            self.timesteps = sigmas_tensor * num_train_timesteps
        self.sigmas = torch.cat([sigmas_tensor, torch.zeros(1, device=sigmas_tensor.device)])
        self._schedule = self.timesteps.tolist()
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The position of `timestep` in `schedule_timesteps` (default: the current schedule)."""
        schedule = self._schedule if schedule_timesteps is None else schedule_timesteps.tolist()
        value = float(timestep)
        for index, scheduled in enumerate(schedule):
            if scheduled == value:
                return index
        raise ValueError(f"timestep {value!r} is not in the schedule ({len(schedule)} steps).")

    def _index_of(self, timestep: float | torch.Tensor) -> int:
        """The position of `timestep` in the schedule, searching from the current step onwards."""
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError(
                f"timestep {timestep!r} is an integer; pass a float timestep from `scheduler.timesteps` "
                "(sigma * num_train_timesteps), not a loop index."
            )
        if torch.is_tensor(timestep) and timestep.numel() != 1:
            raise ValueError(f"step takes one timestep for the whole batch, got shape {tuple(timestep.shape)}.")
        value = float(timestep)
        start = self._step_index if self._step_index is not None else (self._begin_index or 0)
        for index in range(start, len(self._schedule)):
            if self._schedule[index] == value:
                return index
        raise ValueError(
            f"timestep {value!r} is not in the remaining schedule ({len(self._schedule)} steps from "
            f"{self._schedule[0]!r} down to {self._schedule[-1]!r}; next expected "
            f"{self._schedule[start] if start < len(self._schedule) else 'none, the schedule is finished'!r})."
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ScratchFlowMatchEulerSchedulerOutput | tuple:
        """One Euler step of dx/dsigma = v from the current sigma to the next one.

        `s_churn`, `s_tmin`, `s_tmax` and `s_noise` are accepted and unused, as in diffusers' flow-matching Euler
        scheduler (they belong to its Karras-style Euler sampler)."""
        if per_token_timesteps is not None:
            raise ValueError(f"{type(self).__name__} does not support per_token_timesteps; one timestep per step.")
        index = self._index_of(timestep)
        sigma = self.sigmas[index]
        sigma_next = self.sigmas[index + 1] if index + 1 < len(self.sigmas) else torch.zeros(())

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
