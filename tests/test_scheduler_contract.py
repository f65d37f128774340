"""diffusers' common scheduler contract (its upstream `SchedulerCommonTest`), checked on our three schedulers."""

import inspect
import json
import logging
import os

import numpy as np
import pytest
import torch
from diffusers.utils import DummyObject
from diffusers.utils import logging as diffusers_logging

from custom_schedulers import ScratchDDIMScheduler, ScratchDDPMScheduler, ScratchFlowMatchEulerScheduler

SAMPLE_SHAPE = (2, 3, 4, 4)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

CONFIG_VARIATIONS = {
    ScratchDDPMScheduler: [
        dict(num_train_timesteps=100),
        dict(beta_start=0.001, beta_end=0.05, beta_schedule="scaled_linear"),
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
        dict(variance_type="fixed_large", clip_sample=False),
        dict(thresholding=True, sample_max_value=2.0, prediction_type="sample"),
        dict(timestep_spacing="trailing", rescale_betas_zero_snr=True),
        dict(timestep_spacing="linspace", steps_offset=1, clip_sample_range=2.0),
    ],
    ScratchDDIMScheduler: [
        dict(num_train_timesteps=100),
        dict(beta_start=0.001, beta_end=0.05, beta_schedule="scaled_linear"),
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", set_alpha_to_one=False),
        dict(thresholding=True, sample_max_value=2.0, prediction_type="sample"),
        dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False),
        dict(timestep_spacing="linspace", steps_offset=1, clip_sample_range=2.0),
    ],
    ScratchFlowMatchEulerScheduler: [
        dict(num_train_timesteps=100),
        dict(shift=3.0),
        dict(shift=0.5, stochastic_sampling=True),
    ],
}
SCHEDULERS = list(CONFIG_VARIATIONS)
CASES = [(cls, config) for cls, configs in CONFIG_VARIATIONS.items() for config in [{}] + configs]


def case_id(value):
    return value.__name__ if isinstance(value, type) else ",".join(f"{k}={v}" for k, v in value.items()) or "default"


def sample_tensor(device="cpu", dtype=torch.float32):
    return torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def step_seeded(scheduler, timestep, sample, **kwargs):
    """One step with the fake model output 0.1 * sample (as in diffusers' scheduler tests) and a fresh seed."""
    return scheduler.step(0.1 * sample, timestep, sample, generator=torch.Generator().manual_seed(0), **kwargs)


def public_config(scheduler):
    """The config without `_`-prefixed bookkeeping keys (`_use_default_values` vanishes on a round trip)."""
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


@pytest.mark.parametrize("scheduler_class, config", CASES, ids=case_id)
def test_outputs_equal_after_save_and_load_over_config_variations(scheduler_class, config, tmp_path):
    scheduler = scheduler_class(**config)
    scheduler.save_config(tmp_path)
    reloaded = scheduler_class.from_pretrained(tmp_path)
    assert public_config(reloaded) == public_config(scheduler)
    for instance in (scheduler, reloaded):
        instance.set_timesteps(10)
    sample = sample_tensor()
    for timestep in (scheduler.timesteps[0], scheduler.timesteps[-1]):
        # The same scheduled timesteps on both sides, since a step outside the schedule is refused.
        assert timestep in reloaded.timesteps
        expected = step_seeded(scheduler, timestep, sample).prev_sample
        assert torch.equal(step_seeded(reloaded, timestep, sample).prev_sample, expected)


@pytest.mark.parametrize("num_inference_steps", [1, 2, 10, 50, 100])
@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_forward_over_inference_step_counts(scheduler_class, num_inference_steps, tmp_path):
    scheduler = scheduler_class(num_train_timesteps=100)
    scheduler.save_pretrained(tmp_path)
    reloaded = scheduler_class.from_pretrained(tmp_path)
    scheduler.set_timesteps(num_inference_steps)
    reloaded.set_timesteps(num_inference_steps)
    assert len(scheduler.timesteps) == num_inference_steps
    assert torch.equal(scheduler.timesteps, reloaded.timesteps)
    sample = sample_tensor()
    for timestep in scheduler.timesteps:
        expected = step_seeded(scheduler, timestep, sample).prev_sample
        assert torch.equal(step_seeded(reloaded, timestep, sample).prev_sample, expected)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_save_pretrained_from_pretrained_round_trip(scheduler_class, tmp_path):
    scheduler = scheduler_class(**CONFIG_VARIATIONS[scheduler_class][1])
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert os.listdir(tmp_path) == ["scheduler_config.json"]
    assert saved["_class_name"] == scheduler_class.__name__
    reloaded = scheduler_class.from_pretrained(tmp_path)
    assert type(reloaded) is scheduler_class
    assert public_config(reloaded) == public_config(scheduler)
    assert "_use_default_values" in scheduler.config and "_use_default_values" not in reloaded.config
    from_config = scheduler_class.from_config(scheduler.config)
    assert public_config(from_config) == public_config(scheduler)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 deprecations inside diffusers schedulers
@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_compatible_schedulers_round_trip_the_config(scheduler_class):
    # Non-default values, on a short chain because some compatible schedulers do per-timestep work in numpy.
    scheduler = scheduler_class(**CONFIG_VARIATIONS[scheduler_class][0], **CONFIG_VARIATIONS[scheduler_class][1])
    compatibles = scheduler.compatibles
    assert compatibles and all(compatible is not None for compatible in compatibles)
    assert {compatible.__name__ for compatible in compatibles} == set(scheduler_class._compatibles)
    init_keys = set(inspect.signature(scheduler_class.__init__).parameters) - {"self"}
    for compatible_class in compatibles:
        if isinstance(compatible_class, DummyObject):
            continue  # a diffusers scheduler whose optional dependency (e.g. torchsde) is not installed
        compatible = compatible_class.from_config(scheduler.config)
        back = scheduler_class.from_config(compatible.config)
        # Keys we share come back unchanged; the compatible's extra keys never become ours.
        assert public_config(back) == public_config(scheduler), compatible_class.__name__
        assert set(public_config(back)) == init_keys


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_step_output_shape(scheduler_class):
    scheduler = scheduler_class()
    scheduler.set_timesteps(10)
    sample = sample_tensor()
    for timestep in (scheduler.timesteps[0], scheduler.timesteps[-1]):
        output = step_seeded(scheduler, timestep, sample)
        assert output.prev_sample.shape == sample.shape
        assert output.pred_original_sample.shape == sample.shape


@pytest.mark.parametrize("scheduler_class, config", CASES, ids=case_id)
def test_tuple_and_dataclass_outputs_are_equal(scheduler_class, config):
    sample = sample_tensor()
    outputs = []
    for return_dict in (True, False):
        scheduler = scheduler_class(**config)
        scheduler.set_timesteps(50)
        output = step_seeded(scheduler, scheduler.timesteps[0], sample, return_dict=return_dict)
        outputs.append(output.to_tuple() if return_dict else output)
    as_dict, as_tuple = outputs
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict) == 2
    for from_dict, from_tuple in zip(as_dict, as_tuple):
        assert torch.equal(from_dict, from_tuple)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_public_api(scheduler_class):
    scheduler = scheduler_class()
    assert scheduler.config_name == "scheduler_config.json"
    assert scheduler.order == 1
    assert scheduler.init_noise_sigma == 1.0
    assert len(scheduler) == scheduler.config.num_train_timesteps
    sample = sample_tensor()
    assert scheduler.scale_model_input(sample, 0.0) is sample
    for name in ("set_timesteps", "step", "scale_model_input", "save_pretrained", "from_pretrained", "from_config"):
        assert callable(getattr(scheduler, name))
    parameters = inspect.signature(scheduler.step).parameters
    assert list(parameters)[:3] == ["model_output", "timestep", "sample"]
    assert {"generator", "return_dict"} <= set(parameters)
    set_timesteps = inspect.signature(scheduler.set_timesteps).parameters
    assert list(set_timesteps)[:2] == ["num_inference_steps", "device"]
    scheduler.set_timesteps(10)
    expected_dtype = torch.float32 if scheduler_class is ScratchFlowMatchEulerScheduler else torch.int64
    assert scheduler.timesteps.dtype == expected_dtype
    assert scheduler.timesteps.shape == (10,) and bool((scheduler.timesteps[:-1] > scheduler.timesteps[1:]).all())


def test_class_names_do_not_shadow_diffusers():
    import diffusers

    for scheduler_class in SCHEDULERS:
        assert not hasattr(diffusers, scheduler_class.__name__)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_add_noise_on_the_sample_device_and_dtype(scheduler_class, dtype, device):
    scheduler = scheduler_class()
    scheduler.set_timesteps(100, device=device)
    assert scheduler.timesteps.device.type == device
    sample = sample_tensor(device, dtype)
    noise = torch.randn_like(sample)
    timesteps = scheduler.timesteps[[5, 50]]
    if scheduler_class is ScratchFlowMatchEulerScheduler:
        noised = scheduler.scale_noise(sample, timesteps, noise)
        target = scheduler.get_velocity(sample, noise, timesteps)
    else:
        noised = scheduler.add_noise(sample, noise, timesteps)
        target = scheduler.get_velocity(sample, noise, timesteps)
        noised_on_cpu = scheduler.add_noise(sample, noise, timesteps.cpu())
        assert torch.equal(noised, noised_on_cpu)
    for value in (noised, target):
        assert value.shape == sample.shape and value.dtype == dtype and value.device.type == device
    assert not torch.equal(noised, sample)


@pytest.mark.parametrize("scheduler_class", [ScratchDDPMScheduler, ScratchDDIMScheduler], ids=case_id)
def test_trained_betas_round_trip(scheduler_class, tmp_path):
    scheduler = scheduler_class(num_train_timesteps=2, trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    reloaded = scheduler_class.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == reloaded.betas.tolist() == torch.tensor([0.1, 0.3]).tolist()
    assert reloaded.config.trained_betas == [0.1, 0.3]


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_no_deprecated_kwargs(scheduler_class):
    assert "kwargs" not in inspect.signature(scheduler_class.__init__).parameters
    assert not scheduler_class._deprecated_kwargs


class RecordWarnings(logging.Handler):
    """Collects the records of diffusers' logger, which does not propagate to the root logger."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=case_id)
def test_getattr_of_config_values(scheduler_class):
    scheduler = scheduler_class(num_train_timesteps=123)
    assert scheduler.config.num_train_timesteps == 123
    assert scheduler.config["num_train_timesteps"] == 123

    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    recorder = RecordWarnings()
    diffusers_logging.get_logger("diffusers").addHandler(recorder)
    try:
        assert getattr(scheduler, "dummy_attribute") == 5
        assert getattr(scheduler, "save_pretrained") == scheduler.save_pretrained
        scheduler_class.from_config(scheduler_class().config)
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(recorder)
    assert [record.getMessage() for record in recorder.records] == []
    # Config values reached as attributes work, with diffusers' deprecation warning.
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.warns(FutureWarning):
        assert getattr(scheduler, "test_attribute") == 5
    with pytest.raises(AttributeError, match=f"'{scheduler_class.__name__}' object has no attribute 'does_not_exist'"):
        scheduler.does_not_exist
