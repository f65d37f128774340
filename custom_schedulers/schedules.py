"""The discrete noise schedule shared by the DDPM and DDIM schedulers.

Both samplers reverse the same forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
(Ho et al. 2020, eq. 4), so everything but the update rule lives here once, in `DiscreteDiffusionScheduler`:
the betas, the config checks, the inference timestep grid, the lookup of the previous timestep, clipping and
dynamic thresholding of x_0, and the forward process. `ddpm.py` and `ddim.py` each hold one sampler's `step`.
(diffusers copies these pieces into every scheduler file, marked `# Copied from`, so that one file can be read
and copied alone; ours are two samplers of one process, and one base says so.)
"""

import bisect
import math
import operator

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The two families of training objectives: diffusion (the DDPM family, one of PREDICTION_TYPES) and rectified flow.
OBJECTIVES = ("diffusion", "flow_matching")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_choice(name: str, value, allowed) -> None:
    """Raise a ValueError naming `value` and the `allowed` ones unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}.")


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The float32 betas of the forward process, one per training timestep."""
    if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}.")
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32).flatten()
        if betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps is {num_train_timesteps}; "
                "they must match."
            )
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            # Ho et al. 2020, Sec. 4: betas rise linearly from beta_start to beta_end.
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            # Latent diffusion (Rombach et al. 2022): linear in sqrt(beta).
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "sigmoid":
            # GeoDiff (Xu et al. 2022): betas follow a sigmoid from beta_start to beta_end.
            betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
        elif beta_schedule == "laplace":
            # Hang et al. 2024 ("Improved noise schedule"): log-SNR Laplace-distributed around 0; diffusers'
            # discretisation of abar(t) = sqrt(snr / (1 + snr)), capped at beta = 0.999 like the cosine schedule.
            grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
            log_snr = -0.5 * torch.sign(0.5 - grid) * torch.log(1 - 2 * (0.5 - grid).abs() + 1e-6)
            alpha_bar = (log_snr.exp() / (1 + log_snr.exp())).sqrt()
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999).to(torch.float32)
        else:
            # Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) with s = 0.008, and
            # beta_t = 1 - abar(t) / abar(t-1) capped at 0.999 so that the last steps stay finite.
            grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
            alpha_bar = torch.cos((grid + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999).to(torch.float32)
    if rescale_betas_zero_snr:
        betas = _rescale_to_zero_terminal_snr(betas)
    _check_betas(betas, rescale_betas_zero_snr)
    return betas


def _check_betas(betas: torch.Tensor, zero_terminal_snr: bool) -> None:
    """Refuse a schedule that cannot be a diffusion: every beta in (0, 1), so that abar_t is positive and falls
    with t. Only the zero-SNR rescale may end on beta = 1 (abar = 0: pure noise at the last timestep)."""
    valid = (betas > 0) & (betas < 1)  # NaN fails every comparison, so it is caught here too
    if zero_terminal_snr:
        valid[-1] = (betas[-1] > 0) & (betas[-1] <= 1)
    if not bool(valid.all()):
        index = int((~valid).nonzero()[0])
        raise ValueError(
            f"beta at timestep {index} is {float(betas[index])!r}; every beta must lie strictly between 0 and 1 "
            "(check beta_start, beta_end and trained_betas)."
        )


def _rescale_to_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so the last timestep has zero SNR."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int
) -> np.ndarray:
    """The descending int64 timesteps visited when sampling in `num_inference_steps` steps.

    The three spacings are those of Lin et al. 2024, Table 2 (0-indexed timesteps).
    """
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    if (
        not isinstance(num_inference_steps, (int, np.integer))
        or isinstance(num_inference_steps, bool)
        or not 1 <= num_inference_steps <= num_train_timesteps
    ):
        raise ValueError(
            f"num_inference_steps must be an int between 1 and num_train_timesteps={num_train_timesteps}, "
            f"got {num_inference_steps!r}."
        )
    steps = np.arange(num_inference_steps)
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
    elif timestep_spacing == "leading":
        timesteps = (steps * (num_train_timesteps // num_inference_steps))[::-1] + steps_offset
    else:
        timesteps = np.round(num_train_timesteps - steps * (num_train_timesteps / num_inference_steps)) - 1
    timesteps = timesteps.astype(np.int64)
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"steps_offset={steps_offset} with {num_inference_steps} leading steps reaches timestep {timesteps[0]}, "
            f"past the last training timestep {num_train_timesteps - 1}; use fewer steps or a smaller steps_offset."
        )
    return timesteps


def forward_coefficients(alphas_cumprod: torch.Tensor, timesteps, like: torch.Tensor):
    """sqrt(abar_t) and sqrt(1 - abar_t) for integer `timesteps`, shaped to broadcast against `like`."""
    timesteps = torch.as_tensor(timesteps, device=like.device)
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers in [0, {len(alphas_cumprod) - 1}], got dtype {timesteps.dtype}.")
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= len(alphas_cumprod)):
        raise ValueError(
            f"timesteps must lie in [0, {len(alphas_cumprod) - 1}], got values from {int(timesteps.min())} "
            f"to {int(timesteps.max())}."
        )
    alpha_bar = alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps].flatten()
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha_bar.sqrt().reshape(shape), (1 - alpha_bar).sqrt().reshape(shape)


def clean_and_noise(model_output: torch.Tensor, sample: torch.Tensor, signal, noise_level, prediction_type: str):
    """(x_0, eps) that a model output implies at x_t = signal * x_0 + noise_level * eps.

    Eq. 9 of Song et al. 2021 for epsilon; for v, Salimans & Ho 2022, Sec. 4 (x = alpha z - sigma v,
    eps = alpha v + sigma z); for x_0, the forward process inverted for eps.
    """
    if prediction_type == "epsilon":
        return (sample - noise_level * model_output) / signal, model_output
    if prediction_type == "v_prediction":
        return signal * sample - noise_level * model_output, signal * model_output + noise_level * sample
    return model_output, (sample - signal * model_output) / noise_level


def dynamic_threshold(pred_original_sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen), Sec. 2.3: clip x_0 to [-s, s] and divide by s, where s is the `ratio`
    quantile of |x_0| per sample, kept in [1, max_value]."""
    dtype = pred_original_sample.dtype
    flat = pred_original_sample.flatten(1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32 or float64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(pred_original_sample.shape).to(dtype)


class DiscreteDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """What DDPM and DDIM share: the forward process over `num_train_timesteps` integer timesteps and the grid
    of timesteps a sampler visits. Subclasses call `_init_noise_schedule()` from their `__init__` and write `step`.

    Before `set_timesteps` the schedule is the whole training chain T-1, ..., 0, as in diffusers.
    """

    _compatibles = [scheduler.name for scheduler in KarrasDiffusionSchedulers]
    order = 1

    def _init_noise_schedule(self) -> None:
        config = self.config
        check_choice("prediction_type", config.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
        steps_offset = config.steps_offset
        if not isinstance(steps_offset, int) or isinstance(steps_offset, bool) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}.")
        if config.clip_sample and not config.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {config.clip_sample_range!r}.")
        if config.thresholding and not (0 <= config.dynamic_thresholding_ratio <= 1 and config.sample_max_value > 0):
            raise ValueError(
                "thresholding needs 0 <= dynamic_thresholding_ratio <= 1 and sample_max_value > 0, got "
                f"{config.dynamic_thresholding_ratio!r} and {config.sample_max_value!r}."
            )
        self.betas = make_betas(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._schedule = None  # None: the training chain, each timestep followed by the one below it
        self._position = {}

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The model sees x_t unscaled; present for interchangeability with other schedulers."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps to sample with: `num_inference_steps` of them, spaced per
        `config.timestep_spacing`, or a custom strictly descending list `timesteps` in [0, num_train_timesteps)."""
        num_train_timesteps = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("Pass either `num_inference_steps` or custom `timesteps` to set_timesteps, not both.")
            schedule = np.asarray(timesteps.cpu() if torch.is_tensor(timesteps) else timesteps)
            if schedule.ndim != 1 or len(schedule) == 0 or not np.issubdtype(schedule.dtype, np.integer):
                raise ValueError(f"custom timesteps must be a non-empty list of ints, got {timesteps!r}.")
            if (np.diff(schedule) >= 0).any():
                raise ValueError(f"custom timesteps must be in strictly descending order, got {schedule.tolist()}.")
            if schedule[0] >= num_train_timesteps or schedule[-1] < 0:
                raise ValueError(
                    f"custom timesteps must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps="
                    f"{num_train_timesteps}), got {schedule.tolist()}."
                )
            schedule = schedule.astype(np.int64)
            self.custom_timesteps = True
        else:
            config = self.config
            schedule = inference_timesteps(
                num_train_timesteps, num_inference_steps, config.timestep_spacing, config.steps_offset
            )
            self.custom_timesteps = False
        self.num_inference_steps = len(schedule)
        self.timesteps = torch.from_numpy(schedule).to(device)
        self._schedule = schedule.tolist()
        self._position = {t: i for i, t in enumerate(self._schedule)}

    def _timestep_int(self, timestep: int | torch.Tensor) -> int:
        """`timestep` (a Python or numpy int, or a one-element integer tensor) as an int in [0, T)."""
        if torch.is_tensor(timestep) and timestep.numel() == 1 and not timestep.is_floating_point():
            timestep = timestep.item()
        try:
            value = operator.index(timestep)
        except TypeError:
            value = None
        if value is None or isinstance(timestep, bool) or not 0 <= value < self.config.num_train_timesteps:
            raise ValueError(
                f"timestep must be one integer in [0, {self.config.num_train_timesteps - 1}] (an entry of "
                f"`scheduler.timesteps`), got {timestep!r}."
            )
        return value

    def _scheduled_timestep(self, timestep: int | torch.Tensor) -> int:
        """`timestep` as an int, refusing anything that is not in the schedule set by `set_timesteps`."""
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before `step`.")
        try:
            value = self._timestep_int(timestep)
        except ValueError:
            value = None
        if value not in self._position:
            raise ValueError(
                f"timestep {timestep!r} is not in the schedule set by set_timesteps ({self.num_inference_steps} "
                f"integer steps, from {self._schedule[0]} down to {self._schedule[-1]})."
            )
        return value

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep the chain goes to from `timestep`, -1 meaning the clean sample x_0: the next one of the
        schedule, the next lower one for a timestep between two scheduled ones, t - 1 before `set_timesteps`."""
        t = self._timestep_int(timestep)
        if self._schedule is None:
            return t - 1
        position = self._position.get(t)
        if position is not None:
            position += 1
        else:
            # The schedule descends; bisect on its negation finds the first scheduled timestep below t.
            position = bisect.bisect_right([-s for s in self._schedule], -t)
        return self._schedule[position] if position < len(self._schedule) else -1

    def _clip_or_threshold(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        """Keep the predicted x_0 in the data range: dynamic thresholding, or clipping to +-clip_sample_range."""
        config = self.config
        if config.thresholding:
            return dynamic_threshold(pred_original_sample, config.dynamic_thresholding_ratio, config.sample_max_value)
        if config.clip_sample:
            return pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)
        return pred_original_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process, Ho et al. 2020 eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        signal, noise_level = forward_coefficients(self.alphas_cumprod, timesteps, original_samples)
        return signal * original_samples + noise_level * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target, Salimans & Ho 2022, Sec. 4: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        signal, noise_level = forward_coefficients(self.alphas_cumprod, timesteps, sample)
        return signal * noise - noise_level * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
