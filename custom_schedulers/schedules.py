"""The discrete noise schedule shared by the DDPM and DDIM schedulers.

Both samplers reverse the same forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
(Ho et al. 2020, eq. 4), so the betas, the inference timestep grid, the forward-process coefficients and
dynamic thresholding live here once; each sampler's own update rule lives in its own file.
"""

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
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
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("trained_betas must all lie strictly between 0 and 1.")
    else:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if beta_schedule == "linear":
            # Ho et al. 2020, Sec. 4: betas rise linearly from beta_start to beta_end.
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            # Latent diffusion (Rombach et al. 2022): linear in sqrt(beta).
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            # Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) with s = 0.008, and
            # beta_t = 1 - abar(t) / abar(t-1) capped at 0.999 so that the last steps stay finite.
            grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
            alpha_bar = torch.cos((grid + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999).to(torch.float32)
    if rescale_betas_zero_snr:
        betas = _rescale_to_zero_terminal_snr(betas)
    return betas


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


def dynamic_threshold(pred_original_sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen), Sec. 2.3: clip x_0 to [-s, s] and divide by s, where s is the `ratio`
    quantile of |x_0| per sample, kept in [1, max_value]."""
    dtype = pred_original_sample.dtype
    flat = pred_original_sample.flatten(1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32 or float64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(pred_original_sample.shape).to(dtype)
