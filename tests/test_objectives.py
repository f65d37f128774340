"""Training objectives: targets from the scheduler's forward process, timestep densities, weights, label dropout."""

import math

import pytest
import torch

from custom_schedulers import ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler
from training.objectives import (
    DiffusionObjective,
    FlowMatchingObjective,
    drop_labels,
    elementwise_loss,
    min_snr_weights,
)


def _batch(seed=0, shape=(6, 1, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddpm_targets_come_from_the_scheduler(beta_schedule):
    clean, noise = _batch()
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = ScratchDDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
        noisy, target = DiffusionObjective(scheduler).noisy_input_and_target(clean, noise, timesteps)
        abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, abar.sqrt() * clean + (1 - abar).sqrt() * noise)
        expected = {
            "epsilon": noise,
            "v_prediction": scheduler.get_velocity(clean, noise, timesteps),
            "sample": clean,
        }[prediction_type]
        assert torch.equal(target, expected)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), independently of the scheduler's method.
    torch.testing.assert_close(
        DiffusionObjective(
            ScratchDDPMScheduler(beta_schedule=beta_schedule, prediction_type="v_prediction")
        ).noisy_input_and_target(clean, noise, timesteps)[1],
        abar.sqrt() * noise - (1 - abar).sqrt() * clean,
    )


def test_flow_target_and_interpolation():
    clean, noise = _batch(1)
    scheduler = ScratchFlowMatchEulerScheduler()
    sigmas = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
    noisy, target = FlowMatchingObjective(scheduler).noisy_input_and_target(clean, noise, sigmas * 1000)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * clean + s * noise)
    assert torch.equal(target, noise - clean)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_formula(prediction_type):
    scheduler = ScratchDDPMScheduler(prediction_type=prediction_type)
    objective = DiffusionObjective(scheduler, snr_gamma=5.0)
    timesteps = torch.tensor([0, 10, 100, 400, 999])
    weights = objective.loss_weights(timesteps)
    for t, weight in zip(timesteps.tolist(), weights.tolist()):
        abar = scheduler.alphas_cumprod[t].item()
        snr = abar / (1 - abar)
        expected = {"epsilon": min(snr, 5) / snr, "v_prediction": min(snr, 5) / (snr + 1), "sample": min(snr, 5)}[
            prediction_type
        ]
        assert weight == pytest.approx(expected, rel=1e-5)
    # Low-noise steps (huge SNR) are clipped: weight gamma / SNR for epsilon, i.e. far below 1.
    if prediction_type == "epsilon":
        assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0)
    assert DiffusionObjective(scheduler).loss_weights(timesteps) is None
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(torch.ones(2), 5.0, "x0")


def test_logit_normal_and_mode_samplers_match_their_distributions():
    scheduler = ScratchFlowMatchEulerScheduler()
    n = 200_000
    generator = torch.Generator().manual_seed(0)
    sigmas = FlowMatchingObjective(
        scheduler, timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8
    ).sample_sigmas(n, generator)
    logits = torch.logit(sigmas.double())
    assert logits.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)
    # Median of sigmoid(N(m, s)) is sigmoid(m).
    assert sigmas.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.005)

    uniform = FlowMatchingObjective(scheduler).sample_sigmas(n, generator)
    assert uniform.min() >= 0 and uniform.max() < 1
    assert torch.quantile(uniform, torch.tensor([0.1, 0.5, 0.9])).tolist() == pytest.approx([0.1, 0.5, 0.9], abs=0.005)

    # Mode sampling: sigma = f(u) with f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) is decreasing, so the q-quantile
    # of sigma is f(1 - q). With s > 0 the density piles up in the middle.
    scale = 1.29
    mode = FlowMatchingObjective(scheduler, timestep_sampling="mode", mode_scale=scale).sample_sigmas(n, generator)
    f = lambda u: 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)  # noqa: E731
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert torch.quantile(mode, q).item() == pytest.approx(f(1 - q), abs=0.005)
    assert mode.min() >= 0 and mode.max() <= 1
    assert ((mode > 0.3) & (mode < 0.7)).float().mean() > 0.5
    with pytest.raises(ValueError, match="mode_scale"):
        FlowMatchingObjective(scheduler, timestep_sampling="mode", mode_scale=3.0)


def test_diffusion_timesteps_follow_the_chosen_density():
    scheduler = ScratchDDPMScheduler(num_train_timesteps=1000)
    n = 200_000
    # Uniform draws keep torch.randint's stream: runs recorded before the densities existed resume unchanged.
    uniform = DiffusionObjective(scheduler).sample_timesteps(n, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(3)))

    objective = DiffusionObjective(scheduler, timestep_sampling="logit_normal", logit_mean=-0.5, logit_std=1.0)
    timesteps = objective.sample_timesteps(n, torch.Generator().manual_seed(0))
    assert timesteps.dtype == torch.long and timesteps.min() >= 0 and timesteps.max() <= 999
    # t = floor(1000 sigmoid(z)), z ~ N(-0.5, 1): the q-quantile of t is floor(1000 sigmoid(-0.5 + z_q)).
    for q, z in ((0.1, -1.2816), (0.5, 0.0), (0.9, 1.2816)):
        expected = 1000 / (1 + math.exp(0.5 - z))
        assert torch.quantile(timesteps.double(), q).item() == pytest.approx(expected, abs=3)
    # The density is not uniform: almost nothing at the ends, where the task is easy (t ~ 0) or trivial (t ~ T).
    assert (timesteps < 20).float().mean() < 0.005 and (timesteps > 980).float().mean() < 0.001

    mode = DiffusionObjective(scheduler, timestep_sampling="mode", mode_scale=1.29).sample_timesteps(
        n, torch.Generator().manual_seed(1)
    )
    assert ((mode > 300) & (mode < 700)).float().mean() > 0.5
    with pytest.raises(ValueError, match="timestep_sampling"):
        DiffusionObjective(scheduler, timestep_sampling="cosine")
    with pytest.raises(ValueError, match="logit_std"):
        DiffusionObjective(scheduler, timestep_sampling="logit_normal", logit_std=0.0)


def test_label_dropout_rate_and_null_label():
    labels = torch.arange(10).repeat(10_000)
    dropped = drop_labels(labels, 0.1, null_label=10, generator=torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(drop_labels(labels, 0.0, 10, torch.Generator()), labels)
    assert (drop_labels(labels, 1.0, 10, torch.Generator()) == 10).all()


def test_losses_and_weighted_objective_value():
    prediction = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    target = torch.zeros(2, 2)
    assert elementwise_loss(prediction, target, "mse").tolist() == [1.0, 0.25]
    assert elementwise_loss(prediction, target, "l1").tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="loss"):
        elementwise_loss(prediction, target, "huber")

    # The objective's value equals the hand-computed weighted loss with the same draws.
    scheduler = ScratchDDPMScheduler(prediction_type="v_prediction")
    objective = DiffusionObjective(scheduler, loss="l1", snr_gamma=5.0, label_dropout=0.5, num_classes=10)
    clean = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 2, 3, 4])
    seen = {}

    def model(sample, timestep, class_labels=None, return_dict=True):
        seen.update(sample=sample, timestep=timestep, class_labels=class_labels)
        return (0.5 * sample,)

    loss = objective(model, clean, labels, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    timesteps = torch.randint(0, 1000, (4,), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    dropped = drop_labels(labels, 0.5, 10, generator)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    per_sample = (0.5 * noisy - scheduler.get_velocity(clean, noise, timesteps)).abs().flatten(1).mean(1)
    expected = (per_sample * objective.loss_weights(timesteps)).mean()
    assert torch.equal(seen["timestep"], timesteps) and torch.equal(seen["class_labels"], dropped)
    torch.testing.assert_close(loss, expected)


def test_flow_objective_feeds_float_timesteps_in_scheduler_scale():
    objective = FlowMatchingObjective(ScratchFlowMatchEulerScheduler(), timestep_sampling="logit_normal")
    seen = {}

    def model(sample, timestep, class_labels=None, return_dict=True):
        seen["timestep"] = timestep
        return (torch.zeros_like(sample),)

    objective(model, torch.zeros(3, 1, 4, 4), None, torch.Generator().manual_seed(0))
    assert seen["timestep"].dtype == torch.float32
    assert ((seen["timestep"] > 0) & (seen["timestep"] < 1000)).all()


def test_bad_objective_arguments_are_refused():
    with pytest.raises(ValueError, match="snr_gamma"):
        DiffusionObjective(ScratchDDPMScheduler(), snr_gamma=0.0)
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatchingObjective(ScratchFlowMatchEulerScheduler(), timestep_sampling="cosine")
    with pytest.raises(ValueError, match="num_classes"):
        DiffusionObjective(ScratchDDPMScheduler(), label_dropout=0.1)(
            lambda *a, **k: (a[0],), torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), torch.Generator()
        )
