"""Code written for diffusers' DDPM / DDIM / FlowMatchEuler schedulers runs unchanged on ours.

Each test drives our scheduler and diffusers' with the same config the way diffusers' own loops and pipelines
do (no `set_timesteps`, custom timesteps, a start part-way down the chain, dynamic shifting, ...) and asserts the
same numbers to 1e-5. The last test runs diffusers' own `DDPMPipeline` and `DDIMPipeline` on both.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from custom_schedulers import ScratchDDIMScheduler, ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler

TOLERANCE = 1e-5
SHAPE = (2, 1, 4, 4)


def fake_model(sample, timestep):
    """A deterministic stand-in for a denoiser, nonlinear in the sample and dependent on the timestep."""
    return torch.sin(sample) + 0.1 * float(timestep) / 1000 * sample


def start_sample():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def loop(scheduler, timesteps, **step_kwargs):
    """The classic sampling loop, as written against diffusers; every prev_sample and x_0 prediction on the way."""
    sample, generator, seen = start_sample(), torch.Generator().manual_seed(1), []
    for t in timesteps:
        output = scheduler.step(fake_model(sample, t), t, sample, generator=generator, **step_kwargs)
        sample = output.prev_sample
        seen.append(sample)
        if getattr(output, "pred_original_sample", None) is not None:
            seen.append(output.pred_original_sample)
    return seen


def assert_same(ours, theirs, compare_x0=True):
    if not compare_x0:  # diffusers' flow scheduler returns no x_0 prediction; compare samples only
        ours = ours[::2]
    assert len(ours) == len(theirs)
    assert torch.isfinite(torch.stack(theirs)).all()
    ours, theirs = torch.stack(ours), torch.stack(theirs)
    # 1e-5, relative where an unclipped trajectory grows past 1 (float32 keeps ~7 digits of a value like 280).
    assert ((ours - theirs).abs() / theirs.abs().clamp(min=1)).max().item() <= TOLERANCE


# --- DDPM: the training chain without set_timesteps


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_small_log"])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_full_loop_without_set_timesteps(prediction_type, clip_sample, variance_type):
    config = dict(prediction_type=prediction_type, clip_sample=clip_sample, variance_type=variance_type)
    ours, theirs = ScratchDDPMScheduler(**config), DDPMScheduler(**config)
    assert torch.equal(ours.timesteps, theirs.timesteps) and len(ours.timesteps) == 1000
    chain = list(reversed(range(ours.config.num_train_timesteps)))
    assert_same(loop(ours, chain), loop(theirs, chain))


def test_ddpm_steps_from_any_timestep():
    """Without set_timesteps a chain may start anywhere (e.g. SDEdit-style from t = 537), as in diffusers."""
    ours, theirs = ScratchDDPMScheduler(), DDPMScheduler()
    chain = list(range(537, -1, -1))
    assert_same(loop(ours, chain), loop(theirs, chain))
    assert [ours.previous_timestep(t) for t in (537, 1, 0)] == [536, 0, -1]
    assert int(theirs.previous_timestep(537)) == 536


def test_ddpm_steps_between_scheduled_timesteps_to_the_next_lower_one():
    scheduler = ScratchDDPMScheduler()
    scheduler.set_timesteps(10)  # 900, 800, ..., 0
    assert scheduler.previous_timestep(900) == 800
    assert scheduler.previous_timestep(850) == 800
    assert scheduler.previous_timestep(999) == 900
    assert scheduler.previous_timestep(5) == 0 and scheduler.previous_timestep(0) == -1
    # Stepping 850 -> 800 is the DDPM posterior between those two timesteps: the same as a custom schedule.
    custom = ScratchDDPMScheduler()
    custom.set_timesteps(timesteps=[850, 800])
    sample = start_sample()
    expected = custom.step(fake_model(sample, 850), 850, sample, generator=torch.Generator().manual_seed(2))
    actual = scheduler.step(fake_model(sample, 850), 850, sample, generator=torch.Generator().manual_seed(2))
    assert torch.equal(actual.prev_sample, expected.prev_sample)


@pytest.mark.parametrize(
    "timesteps, variance_type",
    [([999, 800, 600, 400, 250, 100, 37, 5], "fixed_small"), ([990, 700, 421, 200, 50, 0], "fixed_large")],
)
def test_ddpm_custom_timesteps(timesteps, variance_type):
    ours, theirs = ScratchDDPMScheduler(variance_type=variance_type), DDPMScheduler(variance_type=variance_type)
    ours.set_timesteps(timesteps=timesteps)
    theirs.set_timesteps(timesteps=timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.custom_timesteps
    assert [ours.previous_timestep(t) for t in timesteps] == [int(theirs.previous_timestep(t)) for t in timesteps]
    assert_same(loop(ours, ours.timesteps), loop(theirs, theirs.timesteps))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(timesteps=[100, 500, 10]), "descending"),
        (dict(timesteps=[500, 500, 10]), "descending"),
        (dict(timesteps=[1000, 10]), r"\[0, 999\]"),
        (dict(num_inference_steps=3, timesteps=[500, 10]), "not both"),
    ],
)
@pytest.mark.parametrize("pair", [(ScratchDDPMScheduler, DDPMScheduler)], ids=["ddpm"])
def test_custom_timesteps_that_diffusers_refuses_are_refused(pair, kwargs, message):
    ours_class, theirs_class = pair
    with pytest.raises(ValueError):
        theirs_class().set_timesteps(**kwargs)
    with pytest.raises(ValueError, match=message):
        ours_class().set_timesteps(**kwargs)


def test_ddim_takes_custom_timesteps_too():
    scheduler = ScratchDDIMScheduler()
    scheduler.set_timesteps(timesteps=[900, 450, 0])
    assert scheduler.timesteps.tolist() == [900, 450, 0] and scheduler.previous_timestep(450) == 0
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(start_sample(), 449, start_sample())


# --- Configs diffusers accepts: they load into ours and behave the same


CONFIGS = [
    dict(clip_sample=True, sample_max_value=0.5),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=0.8, prediction_type="sample"),
    dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5),
    dict(trained_betas=list(np.linspace(1e-4, 0.02, 1000))),
    dict(beta_schedule="sigmoid"),
    dict(clip_sample_range=0.7, beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}" for k in c))
@pytest.mark.parametrize(
    "ours_class, theirs_class", [(ScratchDDPMScheduler, DDPMScheduler), (ScratchDDIMScheduler, DDIMScheduler)]
)
def test_diffusers_configs_behave_the_same(ours_class, theirs_class, config):
    if config.get("beta_schedule") == "sigmoid" and theirs_class is DDIMScheduler:
        pytest.skip("diffusers' DDIMScheduler has no sigmoid schedule (ours does)")
    theirs = theirs_class(**config)
    ours = ours_class.from_config(theirs.config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(20)
    step_kwargs = {"eta": 0.5} if theirs_class is DDIMScheduler else {}
    assert_same(loop(ours, ours.timesteps, **step_kwargs), loop(theirs, theirs.timesteps, **step_kwargs))


def test_laplace_schedule_matches_diffusers_betas():
    assert torch.allclose(
        ScratchDDPMScheduler(beta_schedule="laplace").betas, DDPMScheduler(beta_schedule="laplace").betas, atol=1e-6
    )


@pytest.mark.parametrize("shape", [(2,), (2, 1), ()])
@pytest.mark.parametrize("scheduler_class", [ScratchDDPMScheduler, ScratchDDIMScheduler])
def test_add_noise_and_velocity_with_batched_tensor_timesteps(scheduler_class, shape):
    ours, theirs = scheduler_class(), DDPMScheduler()
    x0, noise = start_sample(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    timesteps = torch.tensor([17, 803]).reshape(shape) if shape != () else torch.tensor(417)
    for method in ("add_noise", "get_velocity"):
        expected = getattr(theirs, method)(x0, noise, timesteps)
        actual = getattr(ours, method)(x0, noise, timesteps)
        assert actual.shape == expected.shape == x0.shape
        assert (actual - expected).abs().max() <= TOLERANCE
    # A plain int is one timestep for the whole batch (diffusers needs a tensor there).
    assert torch.equal(ours.add_noise(x0, noise, 417), ours.add_noise(x0, noise, torch.tensor(417)))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (ScratchDDPMScheduler(), DDPMScheduler()),
        (ScratchDDIMScheduler(), DDIMScheduler()),
        (ScratchFlowMatchEulerScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)),
    ],
    ids=["ddpm", "ddim", "flow"],
)
def test_interface_attributes(ours, theirs):
    assert ours.order == theirs.order == 1
    assert ours.init_noise_sigma == getattr(theirs, "init_noise_sigma", 1.0) == 1.0  # diffusers' flow has none
    assert torch.allclose(ours.timesteps.double(), theirs.timesteps.double())
    sample = start_sample()
    assert torch.equal(ours.scale_model_input(sample, ours.timesteps[0]), sample)
    if hasattr(theirs, "sigmas"):
        assert torch.allclose(ours.sigmas, theirs.sigmas)


# --- Flow matching


def test_flow_loop_without_set_timesteps():
    """The constructed training grid is stepped as in diffusers; diffusers runs off its grid on the very last
    step, where ours lands on sigma = 0."""
    ours, theirs = ScratchFlowMatchEulerScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    trajectory = loop(ours, ours.timesteps)
    assert_same(trajectory[: 2 * 999], loop(theirs, theirs.timesteps[:999]), compare_x0=False)
    assert torch.isfinite(trajectory[-2]).all()


@pytest.mark.parametrize(
    "config, kwargs",
    [
        (dict(shift=3.0), dict(timesteps=[950.0, 700.0, 420.0, 100.0])),
        (dict(shift=3.0), dict(sigmas=[1.0, 0.6, 0.3, 0.1], timesteps=[999.0, 640.0, 330.0, 90.0])),
        (dict(shift=2.0), dict(sigmas=[1.0, 0.75, 0.5, 0.25], num_inference_steps=4)),
        (dict(use_dynamic_shifting=True), dict(num_inference_steps=12, mu=0.8)),
        (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=12, mu=1.3)),
        (dict(shift=3.0, shift_terminal=0.05), dict(num_inference_steps=12)),
        (dict(use_dynamic_shifting=True, shift_terminal=0.1), dict(sigmas=[1.0, 0.7, 0.4, 0.2], mu=0.5)),
    ],
)
def test_flow_set_timesteps_variants_match_diffusers(config, kwargs):
    theirs = FlowMatchEulerDiscreteScheduler(**config)
    ours = ScratchFlowMatchEulerScheduler.from_config(theirs.config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(**kwargs)
    assert torch.allclose(ours.timesteps, theirs.timesteps, atol=1e-4, rtol=0)
    assert torch.allclose(ours.sigmas, theirs.sigmas, atol=1e-6, rtol=0)
    assert_same(loop(ours, ours.timesteps), loop(theirs, theirs.timesteps), compare_x0=False)


def test_flow_dynamic_shifting_needs_mu_like_diffusers():
    with pytest.raises(ValueError, match="mu"):
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(10)
    with pytest.raises(ValueError, match="mu"):
        ScratchFlowMatchEulerScheduler(use_dynamic_shifting=True).set_timesteps(10)


def test_flow_begin_index_and_set_shift_as_in_img2img_pipelines():
    """img2img pipelines start part-way: set_timesteps, then set_begin_index(t_start), then step from there."""
    ours, theirs = ScratchFlowMatchEulerScheduler(), FlowMatchEulerDiscreteScheduler()
    for scheduler in (ours, theirs):
        scheduler.set_shift(2.5)
        assert scheduler.shift == 2.5
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(4)
        assert scheduler.begin_index == 4 and scheduler.step_index is None
    assert torch.allclose(ours.sigmas, theirs.sigmas)
    x0 = start_sample()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    start = ours.timesteps[4:5]
    assert (ours.scale_noise(x0, start, noise) - theirs.scale_noise(x0, start, noise)).abs().max() <= TOLERANCE
    assert_same(loop(ours, ours.timesteps[4:]), loop(theirs, theirs.timesteps[4:]), compare_x0=False)
    assert ours.step_index == theirs.step_index == 10


def test_flow_bad_custom_schedules_are_refused():
    scheduler = ScratchFlowMatchEulerScheduler()
    with pytest.raises(ValueError, match="same length"):
        scheduler.set_timesteps(sigmas=[1.0, 0.5], timesteps=[900.0])
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        scheduler.set_timesteps(timesteps=[100.0, 900.0])
    with pytest.raises(ValueError, match="per_token_timesteps"):
        scheduler.step(start_sample(), scheduler.timesteps[0], start_sample(), per_token_timesteps=torch.ones(2))
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(5000)


# --- diffusers' own pipelines, with our schedulers swapped in


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.mark.parametrize(
    "pipeline_class, ours_class, theirs_class, kwargs",
    [
        (DDPMPipeline, ScratchDDPMScheduler, DDPMScheduler, dict(num_inference_steps=20)),
        (DDIMPipeline, ScratchDDIMScheduler, DDIMScheduler, dict(num_inference_steps=20, eta=0.5)),
    ],
    ids=["DDPMPipeline", "DDIMPipeline"],
)
def test_diffusers_pipelines_run_unchanged_on_our_schedulers(pipeline_class, ours_class, theirs_class, kwargs):
    unet = tiny_unet()
    images = []
    for scheduler in (ours_class(), theirs_class()):
        pipeline = pipeline_class(unet=unet, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        output = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
        images.append(output.images)
    assert images[0].shape == (2, 8, 8, 1)
    assert np.abs(images[0] - images[1]).max() <= TOLERANCE
