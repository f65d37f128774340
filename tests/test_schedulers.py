"""Parity of the hand-written schedulers with diffusers' DDPM / DDIM / FlowMatchEulerDiscrete, and their errors.

A trajectory is driven by a fixed deterministic fake model through our scheduler and through diffusers' with
the same config and the same generator seed; every intermediate sample and predicted x_0 must agree to 1e-5.
Steps in {1, 10, 50} run per timestep spacing; 1000 steps (the full chain) run once per remaining combination,
after asserting that every spacing gives that same chain 999..0. Two reference steps are adjusted where
diffusers leaves the papers (documented in `ddpm_reference_step` and `ddim_reference_step`).
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from custom_schedulers import ScratchDDIMScheduler, ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler
from custom_schedulers.schedules import PREDICTION_TYPES

TOLERANCE = 1e-5
SAMPLE_SHAPE = (2, 1, 4, 4)
BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"]
SPACINGS = ["leading", "trailing", "linspace"]
FEW_STEPS = [1, 10, 50]
ETAS = [0.0, 0.5, 1.0]
SHIFTS = [0.5, 1.0, 3.0]
DISCRETE_PAIRS = [(ScratchDDPMScheduler, DDPMScheduler), (ScratchDDIMScheduler, DDIMScheduler)]


def beta_config(beta_schedule):
    """Config kwargs selecting a beta schedule; "trained_betas" passes an explicit (quadratic) beta array."""
    if beta_schedule == "trained_betas":
        return {"trained_betas": (1e-4 + 0.02 * np.linspace(0, 1, 1000) ** 2).tolist()}
    return {"beta_schedule": beta_schedule}


def fake_model(sample, timestep, num_train_timesteps=1000, learned_variance=False):
    """A deterministic stand-in for a denoiser, nonlinear in the sample and dependent on the timestep."""
    output = torch.sin(sample).add_(sample, alpha=0.1 * float(timestep) / num_train_timesteps)
    if learned_variance:
        output = torch.cat([output, torch.tanh(2 * sample)], dim=1)
    return output


def initial_sample():
    return torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))


def run_side_by_side(ours, theirs, num_inference_steps, reference_step=None, learned_variance=False, **step_kwargs):
    """Drive both schedulers along their own trajectories; return the largest difference seen on the way
    (infinite if either produced a NaN)."""
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert torch.allclose(ours.timesteps.double(), theirs.timesteps.double(), rtol=0, atol=1e-4)
    reference_step = reference_step or (lambda scheduler, *args, **kwargs: scheduler.step(*args, **kwargs))
    num_train_timesteps = ours.config.num_train_timesteps
    sample_ours = sample_theirs = initial_sample()
    generator_ours, generator_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    trajectory_ours, trajectory_theirs = [], []
    for index, timestep in enumerate(ours.timesteps):
        out_ours = ours.step(
            fake_model(sample_ours, timestep, num_train_timesteps, learned_variance),
            timestep,
            sample_ours,
            generator=generator_ours,
            **step_kwargs,
        )
        out_theirs = reference_step(
            theirs,
            fake_model(sample_theirs, timestep, num_train_timesteps, learned_variance),
            theirs.timesteps[index],
            sample_theirs,
            generator=generator_theirs,
            **step_kwargs,
        )
        sample_ours, sample_theirs = out_ours.prev_sample, out_theirs.prev_sample
        trajectory_ours.append(sample_ours)
        trajectory_theirs.append(sample_theirs)
        if getattr(out_theirs, "pred_original_sample", None) is not None:
            trajectory_ours.append(out_ours.pred_original_sample)
            trajectory_theirs.append(out_theirs.pred_original_sample)
    difference = (torch.stack(trajectory_ours) - torch.stack(trajectory_theirs)).abs().max().item()
    return difference if difference == difference else float("inf")


def assert_spacings_agree_on_the_full_chain(scheduler_class, **config):
    """set_timesteps(num_train_timesteps) gives the chain 999..0 whatever the spacing."""
    chains = []
    for spacing in SPACINGS:
        scheduler = scheduler_class(timestep_spacing=spacing, **config)
        scheduler.set_timesteps(scheduler.config.num_train_timesteps)
        chains.append(scheduler.timesteps)
    for chain in chains:
        assert torch.equal(chain, torch.arange(999, -1, -1))


# --- DDPM


def ddpm_reference_step(scheduler, model_output, timestep, sample, generator=None):
    """diffusers' DDPM step, except on the last step of a schedule.

    There diffusers still adds noise whenever the timestep is > 0 (`if t > 0`), e.g. with trailing spacing;
    Ho et al. 2020, Algorithm 2 adds none on the step that lands on x_0, and so do we. diffusers' noiseless mean
    there is the step of the same scheduler with `fixed_small`, whose variance on that step is 0 (clamped to 1e-20).
    """
    if int(timestep) != int(scheduler.timesteps[-1]) or scheduler.config.variance_type == "fixed_small":
        return scheduler.step(model_output, timestep, sample, generator=generator)
    noiseless = DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")
    noiseless.set_timesteps(scheduler.num_inference_steps)
    return noiseless.step(model_output[:, : sample.shape[1]], timestep, sample, generator=generator)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("num_inference_steps", FEW_STEPS)
@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_trajectory_matches_diffusers(
    beta_schedule, prediction_type, timestep_spacing, num_inference_steps, variance_type
):
    config = dict(
        beta_config(beta_schedule),
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
        variance_type=variance_type,
    )
    difference = run_side_by_side(
        ScratchDDPMScheduler(**config), DDPMScheduler(**config), num_inference_steps, ddpm_reference_step
    )
    assert difference <= TOLERANCE


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_full_chain_matches_diffusers(beta_schedule, prediction_type):
    config = dict(beta_config(beta_schedule), prediction_type=prediction_type)
    assert_spacings_agree_on_the_full_chain(ScratchDDPMScheduler, **config)
    assert_spacings_agree_on_the_full_chain(DDPMScheduler, **config)
    difference = run_side_by_side(ScratchDDPMScheduler(**config), DDPMScheduler(**config), 1000, ddpm_reference_step)
    assert difference <= TOLERANCE


DDPM_OPTIONS = [
    dict(variance_type="learned_range"),
    dict(variance_type="learned_range", timestep_spacing="trailing"),
    dict(clip_sample=False),
    dict(clip_sample=True, clip_sample_range=0.5),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(steps_offset=1),
    dict(num_train_timesteps=100, beta_start=0.001, beta_end=0.05),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", variance_type="fixed_large"),
]


@pytest.mark.parametrize("num_inference_steps", [10, 50])
@pytest.mark.parametrize("options", DDPM_OPTIONS, ids=str)
def test_ddpm_options_match_diffusers(options, num_inference_steps):
    difference = run_side_by_side(
        ScratchDDPMScheduler(**options),
        DDPMScheduler(**options),
        num_inference_steps,
        ddpm_reference_step,
        learned_variance=options.get("variance_type") == "learned_range",
    )
    assert difference <= TOLERANCE


def test_ddpm_last_step_adds_no_noise():
    """The documented difference from diffusers (which adds noise there whenever t > 0): landing on x_0 from
    t = 99 with fixed_large variance is deterministic and is the posterior mean."""
    config = dict(timestep_spacing="trailing", variance_type="fixed_large")
    ours = ScratchDDPMScheduler(**config)
    ours.set_timesteps(10)
    last = ours.timesteps[-1]
    assert last == 99
    sample = initial_sample()
    model_output = fake_model(sample, last)
    ours_last = ours.step(model_output, last, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    # Ours is deterministic on the last step and equals the posterior mean (Ho et al. eq. 7, abar_prev = 1) ...
    again = ours.step(model_output, last, sample, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(ours_last, again)
    assert torch.allclose(ours_last, ours.step(model_output, last, sample).pred_original_sample, atol=1e-6)


def test_ddpm_and_ddim_add_noise_and_get_velocity_match_diffusers():
    sample, noise = initial_sample(), torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(7))
    timesteps = torch.tensor([0, 999])
    for beta_schedule in BETA_SCHEDULES:
        for rescale in (False, True):
            config = dict(beta_config(beta_schedule), rescale_betas_zero_snr=rescale)
            for ours_class, theirs_class in DISCRETE_PAIRS:
                ours, theirs = ours_class(**config), theirs_class(**config)
                assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=1e-9)
                for batch_timesteps in (timesteps, torch.tensor([500, 1]), torch.randint(0, 1000, (2,))):
                    for method in ("add_noise", "get_velocity"):
                        ours_value = getattr(ours, method)(sample, noise, batch_timesteps)
                        theirs_value = getattr(theirs, method)(sample, noise, batch_timesteps)
                        assert (ours_value - theirs_value).abs().max() <= TOLERANCE, (config, method)


def test_ddpm_add_noise_is_the_forward_process():
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, written out."""
    scheduler = ScratchDDPMScheduler(beta_schedule="squaredcos_cap_v2")
    sample, noise = initial_sample(), torch.randn(SAMPLE_SHAPE)
    timesteps = torch.tensor([3, 700])
    # Nichol & Dhariwal 2021, eq. 17, in closed form: abar(t) = f(t) / f(0); 0-indexed timestep t is their t + 1.
    cosine = lambda fraction: torch.cos((fraction + 0.008) / 1.008 * torch.pi / 2) ** 2  # noqa: E731
    alpha_bar = (cosine((timesteps.double() + 1) / 1000) / cosine(torch.zeros(()))).float().reshape(2, 1, 1, 1)
    expected = alpha_bar.sqrt() * sample + (1 - alpha_bar).sqrt() * noise
    assert torch.allclose(scheduler.add_noise(sample, noise, timesteps), expected, atol=1e-5)
    velocity = scheduler.get_velocity(sample, noise, timesteps)
    assert torch.allclose(velocity, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * sample, atol=1e-5)
    # The three parameterisations describe the same x_0 (Salimans & Ho 2022, Sec. 4).
    noisy = scheduler.add_noise(sample, noise, timesteps)
    assert torch.allclose(alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * velocity, sample, atol=1e-5)


# --- DDIM


def ddim_reference_step(scheduler, model_output, timestep, sample, **step_kwargs):
    """diffusers' DDIM step, told to step to the next scheduled timestep.

    diffusers steps to `timestep - num_train_timesteps // num_inference_steps`, which leaves the schedule for
    linspace spacing (diffusers issues #11347, #12633); Song et al. 2021 step along the chosen sub-sequence, as we
    do. Where the two differ, diffusers is given a step count whose integer stride is the true gap, so its own
    arithmetic computes the step we take.
    """
    timesteps = scheduler.timesteps.tolist()
    position = timesteps.index(int(timestep))
    num_train_timesteps = scheduler.config.num_train_timesteps
    gap = timesteps[position] - timesteps[position + 1] if position + 1 < len(timesteps) else num_train_timesteps
    num_inference_steps = scheduler.num_inference_steps
    if num_train_timesteps // num_inference_steps != gap:
        strides = [count for count in range(1, num_train_timesteps + 1) if num_train_timesteps // count == gap]
        assert strides, f"no step count gives diffusers a stride of {gap}"
        scheduler.num_inference_steps = strides[0]
    try:
        return scheduler.step(model_output, timestep, sample, **step_kwargs)
    finally:
        scheduler.num_inference_steps = num_inference_steps


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("num_inference_steps", FEW_STEPS)
@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddim_trajectory_matches_diffusers(beta_schedule, prediction_type, timestep_spacing, num_inference_steps, eta):
    config = dict(beta_config(beta_schedule), prediction_type=prediction_type, timestep_spacing=timestep_spacing)
    difference = run_side_by_side(
        ScratchDDIMScheduler(**config), DDIMScheduler(**config), num_inference_steps, ddim_reference_step, eta=eta
    )
    assert difference <= TOLERANCE


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddim_full_chain_matches_diffusers(beta_schedule, prediction_type, eta):
    config = dict(beta_config(beta_schedule), prediction_type=prediction_type)
    assert_spacings_agree_on_the_full_chain(ScratchDDIMScheduler, **config)
    assert_spacings_agree_on_the_full_chain(DDIMScheduler, **config)
    # No stride correction: with every timestep visited diffusers' stride is the true gap.
    difference = run_side_by_side(ScratchDDIMScheduler(**config), DDIMScheduler(**config), 1000, eta=eta)
    assert difference <= TOLERANCE


DDIM_OPTIONS = [
    (dict(set_alpha_to_one=False), dict(eta=1.0)),
    (dict(clip_sample=False), dict(eta=0.5)),
    (dict(clip_sample=True, clip_sample_range=0.5), dict(eta=0.5, use_clipped_model_output=True)),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), dict(eta=0.0)),
    (dict(steps_offset=1, set_alpha_to_one=False), dict(eta=0.5)),
    (dict(num_train_timesteps=100, beta_start=0.001, beta_end=0.05), dict(eta=1.0)),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), dict(eta=0.0)),
    (dict(rescale_betas_zero_snr=True, prediction_type="sample", timestep_spacing="trailing"), dict(eta=0.5)),
]


@pytest.mark.parametrize("num_inference_steps", [10, 50])
@pytest.mark.parametrize("options, step_kwargs", DDIM_OPTIONS, ids=str)
def test_ddim_options_match_diffusers(options, step_kwargs, num_inference_steps):
    difference = run_side_by_side(
        ScratchDDIMScheduler(**options),
        DDIMScheduler(**options),
        num_inference_steps,
        ddim_reference_step,
        **step_kwargs,
    )
    assert difference <= TOLERANCE


def test_ddim_eta_one_at_zero_terminal_snr_stays_finite():
    """At a zero-SNR timestep with eta = 1, 1 - abar_prev - sigma^2 is 0 up to rounding, and its square root could
    be NaN; ours clamps the 0, so the whole trajectory stays finite."""
    config = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    scheduler = ScratchDDIMScheduler(**config)
    scheduler.set_timesteps(10)
    assert float(scheduler.alphas_cumprod[scheduler.timesteps[0]]) == 0.0  # the first step is at zero SNR
    sample = initial_sample()
    for timestep in scheduler.timesteps:
        sample = scheduler.step(fake_model(sample, timestep), timestep, sample, eta=1.0).prev_sample
        assert torch.isfinite(sample).all()


def test_ddim_variance_noise_matches_diffusers():
    ours, theirs = ScratchDDIMScheduler(), DDIMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    sample = initial_sample()
    noise = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(3))
    for timestep in ours.timesteps:
        model_output = fake_model(sample, timestep)
        expected = theirs.step(model_output, timestep, sample, eta=0.7, variance_noise=noise).prev_sample
        actual = ours.step(model_output, timestep, sample, eta=0.7, variance_noise=noise).prev_sample
        assert (actual - expected).abs().max() <= TOLERANCE
        sample = actual


def test_ddim_steps_along_the_schedule():
    """The documented difference from diffusers (which steps from 999 by 1000 // 10 to 899, off the schedule):
    linspace, 10 steps visits 999, 888, ..., and the step from 999 is eq. 12 of Song et al. with abar_888."""
    ours = ScratchDDIMScheduler(timestep_spacing="linspace", clip_sample=False)
    ours.set_timesteps(10)
    assert ours.timesteps.tolist()[:2] == [999, 888]
    assert ours.previous_timestep(999) == 888 and ours.previous_timestep(0) == -1
    sample = initial_sample()
    eps = fake_model(sample, 999)
    abar, abar_prev = ours.alphas_cumprod[999].double(), ours.alphas_cumprod[888].double()
    x0 = (sample.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
    expected = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps.double()
    assert (ours.step(eps, 999, sample).prev_sample.double() - expected).abs().max() <= TOLERANCE


def test_ddim_eta_one_is_ddpm_posterior_sampling():
    """Song et al. eq. 16: with eta = 1, DDIM's step is DDPM's ancestral step with the posterior variance."""
    config = dict(clip_sample=False, timestep_spacing="trailing")
    ddim, ddpm = ScratchDDIMScheduler(**config), ScratchDDPMScheduler(**config)
    ddim.set_timesteps(20)
    ddpm.set_timesteps(20)
    sample = initial_sample()
    for timestep in ddim.timesteps:
        model_output = fake_model(sample, timestep)
        noise = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(int(timestep)))
        ddim_sample = ddim.step(model_output, timestep, sample, eta=1.0, variance_noise=noise).prev_sample
        ddpm_sample = ddpm.step(
            model_output, timestep, sample, generator=torch.Generator().manual_seed(int(timestep))
        ).prev_sample
        assert torch.allclose(ddim_sample, ddpm_sample, atol=1e-5)
        sample = ddim_sample


# --- Flow


@pytest.mark.parametrize("stochastic_sampling", [False, True])
@pytest.mark.parametrize("num_inference_steps", [1, 10, 50, 1000])
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_trajectory_matches_diffusers(shift, num_inference_steps, stochastic_sampling):
    config = dict(shift=shift, stochastic_sampling=stochastic_sampling)
    ours, theirs = ScratchFlowMatchEulerScheduler(**config), FlowMatchEulerDiscreteScheduler(**config)
    assert run_side_by_side(ours, theirs, num_inference_steps) <= TOLERANCE
    assert ours.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, ours.sigmas[:-1] * 1000) and ours.sigmas[-1] == 0


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_custom_sigmas_and_train_timesteps_match_diffusers(shift):
    for num_train_timesteps in (100, 1000):
        config = dict(num_train_timesteps=num_train_timesteps, shift=shift)
        ours, theirs = ScratchFlowMatchEulerScheduler(**config), FlowMatchEulerDiscreteScheduler(**config)
        assert run_side_by_side(ours, theirs, 7) <= TOLERANCE
        sigmas = [1.0, 0.8, 0.5, 0.25, 0.1]
        ours.set_timesteps(sigmas=sigmas)
        theirs.set_timesteps(sigmas=sigmas)
        assert torch.allclose(ours.sigmas, theirs.sigmas, atol=1e-7)
        assert torch.allclose(ours.timesteps, theirs.timesteps, atol=1e-4)
    # More steps than training timesteps is fine in continuous time.
    ours = ScratchFlowMatchEulerScheduler(num_train_timesteps=10, shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=10, shift=shift)
    assert run_side_by_side(ours, theirs, 25) <= TOLERANCE


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_scale_noise_matches_diffusers(shift):
    sample, noise = initial_sample(), torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(7))
    ours, theirs = ScratchFlowMatchEulerScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
    # Training schedule (before set_timesteps), then an inference schedule.
    for num_inference_steps in (None, 30):
        if num_inference_steps:
            ours.set_timesteps(num_inference_steps)
            theirs.set_timesteps(num_inference_steps)
        schedule = theirs.timesteps
        for indices in ([0, len(schedule) - 1], [3, 17], [len(schedule) // 2] * 2):
            timesteps = schedule[indices]
            assert torch.allclose(ours.timesteps[indices], timesteps)
            expected = theirs.scale_noise(sample, timesteps, noise)
            assert (ours.scale_noise(sample, timesteps, noise) - expected).abs().max() <= TOLERANCE


def test_flow_scale_noise_takes_any_float_timestep():
    scheduler = ScratchFlowMatchEulerScheduler(shift=3.0)
    sample, noise = initial_sample(), torch.randn(SAMPLE_SHAPE)
    timesteps = torch.tensor([123.456, 999.9])
    sigma = (timesteps / 1000).reshape(2, 1, 1, 1)
    assert torch.allclose(scheduler.scale_noise(sample, timesteps, noise), (1 - sigma) * sample + sigma * noise)
    assert torch.equal(scheduler.scale_noise(sample, 0.0, noise), sample)
    assert torch.equal(scheduler.scale_noise(sample, torch.tensor(1000.0), noise), noise)
    # The velocity target is the derivative of the path: d x_sigma / d sigma = eps - x_0.
    step = 1e-2
    ahead = scheduler.scale_noise(sample, 500.0 + 1000 * step, noise)
    finite_difference = (ahead - scheduler.scale_noise(sample, 500.0, noise)) / step
    assert torch.allclose(finite_difference, scheduler.get_velocity(sample, noise, timesteps), atol=1e-3)


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_euler_with_the_true_velocity_recovers_the_data(shift):
    """Rectified flow paths are straight, so Euler with the exact velocity eps - x_0 is exact (Liu et al. 2022)."""
    scheduler = ScratchFlowMatchEulerScheduler(shift=shift)
    data, noise = initial_sample(), torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(9))
    scheduler.set_timesteps(7)
    sample = noise
    for timestep in scheduler.timesteps:
        sample = scheduler.step(noise - data, timestep, sample).prev_sample
    assert torch.allclose(sample, data, atol=1e-5)


def test_flow_step_integrates_in_float32_and_returns_model_dtype():
    scheduler = ScratchFlowMatchEulerScheduler()
    scheduler.set_timesteps(4)
    sample = initial_sample().to(torch.bfloat16)
    output = scheduler.step(torch.ones_like(sample), scheduler.timesteps[0], sample)
    assert output.prev_sample.dtype == torch.bfloat16
    assert output.pred_original_sample.dtype == torch.bfloat16


# --- Config round trips


ROUND_TRIP_CASES = [
    (
        ScratchDDPMScheduler,
        DDPMScheduler,
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            variance_type="fixed_large",
            clip_sample=False,
        ),
        ddpm_reference_step,
        {},
    ),
    (
        ScratchDDIMScheduler,
        DDIMScheduler,
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            set_alpha_to_one=False,
            steps_offset=1,
            clip_sample=False,
        ),
        None,
        {"eta": 0.5},
    ),
    (ScratchFlowMatchEulerScheduler, FlowMatchEulerDiscreteScheduler, dict(shift=3.0), None, {}),
]


@pytest.mark.parametrize(
    "ours_class, theirs_class, config, reference_step, step_kwargs", ROUND_TRIP_CASES, ids=["ddpm", "ddim", "flow"]
)
def test_config_round_trip_with_diffusers(ours_class, theirs_class, config, reference_step, step_kwargs):
    """`Ours.from_config(theirs.config)` and `Theirs.from_config(ours.config)` keep every option and trajectory."""
    ours_from_theirs = ours_class.from_config(theirs_class(**config).config)
    theirs_from_ours = theirs_class.from_config(ours_class(**config).config)
    for key, value in config.items():
        assert ours_from_theirs.config[key] == value and theirs_from_ours.config[key] == value
    reference = run_side_by_side(ours_class(**config), theirs_class(**config), 10, reference_step, **step_kwargs)
    assert reference <= TOLERANCE
    assert run_side_by_side(ours_from_theirs, theirs_from_ours, 10, reference_step, **step_kwargs) <= TOLERANCE


def test_full_diffusers_configs_load_into_ours():
    """Every key of diffusers' default configs is either ours or ignored without error."""
    for ours_class, theirs_class in (
        (ScratchDDPMScheduler, DDPMScheduler),
        (ScratchDDIMScheduler, DDIMScheduler),
        (ScratchFlowMatchEulerScheduler, FlowMatchEulerDiscreteScheduler),
        (ScratchDDIMScheduler, DDPMScheduler),
    ):
        loaded = ours_class.from_config(theirs_class().config)
        assert isinstance(loaded, ours_class)


# --- Errors

DISCRETE = [ScratchDDPMScheduler, ScratchDDIMScheduler]
ALL = DISCRETE + [ScratchFlowMatchEulerScheduler]


@pytest.mark.parametrize("scheduler_class", DISCRETE)
@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("beta_schedule", "cosine", "squaredcos_cap_v2"),
        ("prediction_type", "x0", "v_prediction"),
        ("timestep_spacing", "uniform", "trailing"),
    ],
)
def test_unknown_option_names_value_and_allowed_ones(scheduler_class, option, value, allowed):
    with pytest.raises(ValueError, match=rf"'{value}'.*'{allowed}'"):
        scheduler_class(**{option: value})


@pytest.mark.parametrize("variance_type", ["fixed_large_log", "big"])
def test_ddpm_unsupported_variance_type(variance_type):
    with pytest.raises(ValueError, match=rf"'{variance_type}'.*learned_range"):
        ScratchDDPMScheduler(variance_type=variance_type)


@pytest.mark.parametrize(
    "option",
    [
        dict(use_karras_sigmas=True),
        dict(invert_sigmas=True),
        dict(use_exponential_sigmas=True),
        dict(use_beta_sigmas=True),
    ],
)
def test_flow_unsupported_option(option):
    (name,) = option
    with pytest.raises(ValueError, match=name):
        ScratchFlowMatchEulerScheduler(**option)
    with pytest.raises(ValueError, match=name):
        ScratchFlowMatchEulerScheduler.from_config(FlowMatchEulerDiscreteScheduler(**option).config)


@pytest.mark.parametrize(
    "config",
    [
        dict(num_train_timesteps=0),
        dict(trained_betas=[0.1, 0.2]),
        dict(num_train_timesteps=2, trained_betas=[0.1, 1.5]),
        dict(steps_offset=-1),
    ],
)
@pytest.mark.parametrize("scheduler_class", DISCRETE)
def test_bad_discrete_config(scheduler_class, config):
    with pytest.raises(ValueError):
        scheduler_class(**config)


@pytest.mark.parametrize(
    "config",
    [
        dict(num_train_timesteps=0),
        dict(shift=0.0),
        dict(shift=-2.0),
        dict(time_shift_type="cubic"),
        dict(shift_terminal=1.0),
    ],
)
def test_bad_flow_config(config):
    with pytest.raises(ValueError, match=str(next(iter(config.values())))):
        ScratchFlowMatchEulerScheduler(**config)


@pytest.mark.parametrize("num_inference_steps", [0, -3, 1001, 2.5, None])
@pytest.mark.parametrize("scheduler_class", DISCRETE)
def test_bad_num_inference_steps(scheduler_class, num_inference_steps):
    with pytest.raises(ValueError, match=rf"between 1 and num_train_timesteps=1000, got {num_inference_steps}"):
        scheduler_class().set_timesteps(num_inference_steps)


@pytest.mark.parametrize("num_inference_steps", [0, -3, 2.5, None])
def test_bad_flow_num_inference_steps(num_inference_steps):
    with pytest.raises(ValueError, match=rf"got {num_inference_steps}"):
        ScratchFlowMatchEulerScheduler().set_timesteps(num_inference_steps)


@pytest.mark.parametrize("scheduler_class", DISCRETE)
def test_leading_steps_past_the_last_training_timestep(scheduler_class):
    """diffusers raises an IndexError deep in `step` for this; we refuse it in set_timesteps."""
    with pytest.raises(ValueError, match="steps_offset=1"):
        scheduler_class(steps_offset=1).set_timesteps(1000)


def test_ddim_step_before_set_timesteps():
    """As in diffusers, DDIM needs a schedule (DDPM and flow matching step the training grid without one)."""
    scheduler = ScratchDDIMScheduler()
    sample = initial_sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, scheduler.timesteps[0], sample)


@pytest.mark.parametrize("timestep", [5, 981.0, torch.tensor(5), torch.tensor([980, 960]), -1])
def test_ddim_timestep_not_in_schedule(timestep):
    scheduler = ScratchDDIMScheduler()
    scheduler.set_timesteps(50)
    sample = initial_sample()
    with pytest.raises(ValueError, match="not in the schedule.*980 down to 0"):
        scheduler.step(sample, timestep, sample)


@pytest.mark.parametrize("timestep", [981.0, torch.tensor(5.0), torch.tensor([980, 960]), -1, 1000, True])
def test_ddpm_timestep_must_be_one_integer_in_range(timestep):
    scheduler = ScratchDDPMScheduler()
    scheduler.set_timesteps(50)
    sample = initial_sample()
    with pytest.raises(ValueError, match=r"one integer in \[0, 999\]"):
        scheduler.step(sample, timestep, sample)


def test_flow_timestep_not_in_schedule():
    scheduler = ScratchFlowMatchEulerScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sample = initial_sample()
    with pytest.raises(ValueError, match="not in the remaining schedule"):
        scheduler.step(sample, 500.0, sample)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(sample, 1000, sample)
    with pytest.raises(ValueError, match="one timestep"):
        scheduler.step(sample, scheduler.timesteps[:2], sample)
    for timestep in scheduler.timesteps:
        scheduler.step(sample, timestep, sample)
    with pytest.raises(ValueError, match="schedule is finished"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)


def test_flow_bad_sigmas_and_timesteps():
    scheduler = ScratchFlowMatchEulerScheduler()
    for sigmas in ([1.0, 1.0, 0.5], [0.5, 0.8], [1.5, 0.5], [], [0.5, 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            scheduler.set_timesteps(sigmas=sigmas)
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        scheduler.set_timesteps(3, sigmas=[1.0, 0.5])
    sample = initial_sample()
    for timestep in (-1.0, 1000.5, torch.tensor([10.0, 2000.0])):
        with pytest.raises(ValueError, match=r"\[0, 1000\]"):
            scheduler.scale_noise(sample, timestep, sample)


@pytest.mark.parametrize("scheduler_class", DISCRETE)
def test_bad_add_noise_timesteps(scheduler_class):
    scheduler = scheduler_class()
    sample = initial_sample()
    for timesteps in (torch.tensor([0, 1000]), torch.tensor([-1, 3])):
        with pytest.raises(ValueError, match=r"\[0, 999\]"):
            scheduler.add_noise(sample, sample, timesteps)
    with pytest.raises(ValueError, match="integers"):
        scheduler.get_velocity(sample, sample, torch.tensor([0.5, 3.0]))


def test_ddpm_model_output_channels_must_match_variance_type():
    sample = initial_sample()
    for variance_type, channels in (("learned_range", 1), ("fixed_small", 2)):
        scheduler = ScratchDDPMScheduler(variance_type=variance_type)
        scheduler.set_timesteps(10)
        with pytest.raises(ValueError, match="learned_range"):
            scheduler.step(sample.repeat(1, channels, 1, 1), scheduler.timesteps[0], sample)


def test_ddim_bad_step_arguments():
    scheduler = ScratchDDIMScheduler()
    scheduler.set_timesteps(10)
    sample = initial_sample()
    timestep = scheduler.timesteps[0]
    with pytest.raises(ValueError, match=r"eta must be >= 0.*got -0.5"):
        scheduler.step(sample, timestep, sample, eta=-0.5)
    with pytest.raises(ValueError, match="either `generator` or `variance_noise`"):
        scheduler.step(sample, timestep, sample, eta=1.0, generator=torch.Generator(), variance_noise=sample)
    with pytest.raises(ValueError, match="variance_noise has shape"):
        scheduler.step(sample, timestep, sample, eta=1.0, variance_noise=sample[:1])


@pytest.mark.parametrize(
    "config",
    [
        dict(beta_end=2.0),
        dict(beta_end=1.0),
        dict(beta_start=0.0),
        dict(beta_start=-0.01),
        dict(beta_schedule="scaled_linear", beta_end=1.5),
        dict(trained_betas=[0.5, float("nan")], num_train_timesteps=2),
    ],
)
@pytest.mark.parametrize("scheduler_class", DISCRETE)
def test_schedule_that_cannot_be_a_diffusion_is_refused(scheduler_class, config):
    """Every beta must lie in (0, 1): abar_t then stays positive and falls with t (beta_end = 1 samples NaN)."""
    with pytest.raises(ValueError, match=r"beta at timestep \d+ is .*strictly between 0 and 1"):
        scheduler_class(**config)


def test_zero_terminal_snr_may_end_on_beta_one():
    scheduler = ScratchDDPMScheduler(rescale_betas_zero_snr=True)
    assert float(scheduler.betas[-1]) == 1.0 and float(scheduler.alphas_cumprod[-1]) == 0.0
    assert bool((scheduler.alphas_cumprod[:-1] > 0).all()) and bool((scheduler.alphas_cumprod.diff() < 0).all())
