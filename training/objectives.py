"""Training objectives: which timesteps are drawn, what the denoiser sees, what it must predict, how errors weigh.

The forward process is always asked of the scheduler (`add_noise`, `get_velocity`, `scale_noise`), so the
noise schedule is defined once, in `custom_schedulers`. All randomness comes from the `generator` passed in,
which makes a training step a pure function of (weights, batch, generator seed): the loop relies on that
for exact resumption.
"""

import math
from dataclasses import dataclass

import torch

from custom_schedulers.schedules import PREDICTION_TYPES

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSSES = ("mse", "l1")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {list(allowed)}.")


@dataclass(frozen=True)
class TimestepDensity:
    """How training draws points in (0, 1), from SD3's timestep densities (Esser et al. 2024, Sec. 3.1): the noise
    level sigma of a flow model, or t / num_train_timesteps of a DDPM-family model. One object serves both
    objectives; the values are checked when it is made."""

    name: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        _check("timestep_sampling", self.name, TIMESTEP_SAMPLINGS)
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}.")
        # Outside this range f(u) below is not monotone and leaves [0, 1].
        if not -1 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ValueError(f"mode_scale must lie in [-1, {2 / (math.pi - 2):.4f}], got {self.mode_scale}.")

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        shape, device = (batch_size,), generator.device
        if self.name == "logit_normal":
            normal = torch.randn(shape, generator=generator, device=device) * self.logit_std + self.logit_mean
            return torch.sigmoid(normal)
        uniform = torch.rand(shape, generator=generator, device=device)
        if self.name == "mode":
            # Mode sampling with heavy tails, eq. 20: f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u).
            return 1 - uniform - self.mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
        return uniform


def drop_labels(
    class_labels: torch.Tensor, probability: float, null_label: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace each label by `null_label` with `probability`: classifier-free guidance training (Ho & Salimans 2022)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"label dropout probability must lie in [0, 1], got {probability}.")
    drop = torch.rand(class_labels.shape, generator=generator, device=generator.device) < probability
    return torch.where(drop.to(class_labels.device), torch.full_like(class_labels, null_label), class_labels)


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss `[batch]`: mean squared or mean absolute error over all non-batch dimensions, in float32."""
    _check("loss", loss, LOSSES)
    error = prediction.float() - target.float()
    per_element = error.square() if loss == "mse" else error.abs()
    return per_element.flatten(1).mean(dim=1)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), expressed for each prediction target.

    The paper weights the x0-space error by min(SNR, gamma). An epsilon error equals the x0 error times SNR,
    and a v error equals it times (SNR + 1), so those targets get min(SNR, gamma) / SNR and
    min(SNR, gamma) / (SNR + 1).
    """
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class _Conditioning:
    """What both objectives do with the condition: drop labels for classifier-free guidance, pass text on."""

    def _conditioning(self, condition, generator) -> dict:
        if isinstance(condition, dict):
            return condition
        return {"class_labels": _maybe_drop(condition, self.label_dropout, self.num_classes, generator)}


class DiffusionObjective(_Conditioning):
    """DDPM-family training (Ho et al. 2020): integer t (uniform, or from one of SD3's densities over t / T), x_t
    from `add_noise`, target eps, v or x0."""

    def __init__(
        self,
        scheduler,
        *,
        loss: str = "mse",
        snr_gamma: float | None = None,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ):
        _check("loss", loss, LOSSES)
        self.density = TimestepDensity(timestep_sampling, logit_mean, logit_std, mode_scale)
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (or None to disable min-SNR weighting), got {snr_gamma}.")
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        _check("prediction_type", self.prediction_type, PREDICTION_TYPES)
        self.loss = loss
        self.snr_gamma = snr_gamma
        self.label_dropout = label_dropout
        self.num_classes = num_classes

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Integer timesteps in [0, num_train_timesteps): uniform (DDPM), or floor(u * T) with u from the density."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if self.density.name == "uniform":
            # torch.randint, as before the densities existed: uniform runs keep their exact random stream.
            return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=generator.device)
        unit = self.density.sample(batch_size, generator)
        return (unit * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)

    def noisy_input_and_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """(x_t, what the denoiser should output) for this prediction type."""
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = clean
        return noisy, target

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample min-SNR weights, or None when weighting is off."""
        if self.snr_gamma is None:
            return None
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        return min_snr_weights(snr, self.snr_gamma, self.prediction_type)

    def __call__(self, model, clean: torch.Tensor, class_labels, generator: torch.Generator):
        """The batch's mean training loss. `class_labels`: labels, None (unconditional), or a dict of the text
        inputs of the denoiser (`encoder_hidden_states`, ...; captions are dropped before they are encoded)."""
        timesteps = self.sample_timesteps(clean.shape[0], generator).to(clean.device)
        noise = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=clean.dtype).to(
            clean.device
        )
        noisy, target = self.noisy_input_and_target(clean, noise, timesteps)
        prediction = model(noisy, timesteps, **self._conditioning(class_labels, generator), return_dict=False)[0]
        per_sample = elementwise_loss(prediction, target, self.loss)
        weights = self.loss_weights(timesteps)
        return (per_sample * weights).mean() if weights is not None else per_sample.mean()


class FlowMatchingObjective(_Conditioning):
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_s = (1 - s) x0 + s eps, target eps - x0.

    sigma is continuous in (0, 1) and the denoiser sees timestep = sigma * num_train_timesteps.
    """

    def __init__(
        self,
        scheduler,
        *,
        loss: str = "mse",
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ):
        _check("loss", loss, LOSSES)
        self.density = TimestepDensity(timestep_sampling, logit_mean, logit_std, mode_scale)
        self.scheduler = scheduler
        self.loss = loss
        self.label_dropout = label_dropout
        self.num_classes = num_classes

    def sample_sigmas(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels in (0, 1) from the chosen density."""
        return self.density.sample(batch_size, generator)

    def noisy_input_and_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """(x_sigma, velocity eps - x0) at float timesteps sigma * num_train_timesteps."""
        noisy = self.scheduler.scale_noise(clean, timesteps, noise)
        return noisy, noise - clean

    def __call__(self, model, clean: torch.Tensor, class_labels, generator: torch.Generator):
        """The batch's mean training loss. `class_labels`: labels, None (unconditional), or a dict of the text
        inputs of the denoiser (`encoder_hidden_states`, ...; captions are dropped before they are encoded)."""
        sigmas = self.sample_sigmas(clean.shape[0], generator)
        timesteps = (sigmas * self.scheduler.config.num_train_timesteps).to(clean.device)
        noise = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=clean.dtype).to(
            clean.device
        )
        noisy, target = self.noisy_input_and_target(clean, noise, timesteps)
        prediction = model(noisy, timesteps, **self._conditioning(class_labels, generator), return_dict=False)[0]
        return elementwise_loss(prediction, target, self.loss).mean()


def _maybe_drop(class_labels, probability, num_classes, generator):
    if class_labels is None or probability == 0:
        return class_labels
    if not num_classes:
        raise ValueError("label dropout needs num_classes (the null label is index num_classes).")
    return drop_labels(class_labels, probability, num_classes, generator)
