"""Class-conditional pipelines: every model x every scheduler family, fresh-process reload, CFG, outputs, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import export_to_gif, make_image_grid
from pipeline_helpers import (
    CALL,
    MODELS,
    SCHEDULER_FAMILIES,
    SCHEDULERS,
    run,
    tiny_denoiser,
    tiny_pipeline,
    tiny_vae,
)
from safetensors.torch import load_file

import pipelines
from pipelines import ClassConditionalTransformerPipeline, ClassConditionalUNetPipeline

ROOT = Path(__file__).resolve().parents[1]
UNCONDITIONAL_CALL = dict(class_labels=None, guidance_scale=1.0, num_images_per_label=2)

# Loads every saved pipeline with nothing but `import pipelines` + `DiffusionPipeline.from_pretrained`, as a user would.
RELOAD_SCRIPT = """
import json, sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
import pipelines

root, calls = sys.argv[1], json.loads(sys.argv[2])
images, loaded = {}, {}
for name, call in calls.items():
    pipe = DiffusionPipeline.from_pretrained(f"{root}/{name}")
    pipe.set_progress_bar_config(disable=True)
    images[name] = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
    loaded[name] = [type(c).__name__ for c in (pipe, pipe.denoiser, pipe.scheduler, pipe.vae)] + [pipe.labels]
save_file(images, f"{root}/reloaded.safetensors")
with open(f"{root}/loaded.json", "w") as f:
    json.dump(loaded, f)
"""


def subprocess_env() -> dict:
    # One thread: tiny models gain nothing from more, and spinning threads stall a shared 2-core machine.
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every model x scheduler, plus a latent (VAE) and an unconditional pipeline: run once, then saved."""
    root = tmp_path_factory.mktemp("saved_pipelines")
    denoisers = {kind: tiny_denoiser(kind) for kind in MODELS}
    cases = {
        f"{kind}-{scheduler}": tiny_pipeline(kind, scheduler, denoiser=denoisers[kind])
        for kind in MODELS
        for scheduler in SCHEDULERS
    }
    cases["dit-vae"] = tiny_pipeline("dit", "FlowMatchEulerDiscreteScheduler", vae=tiny_vae(), in_channels=4)
    cases["dit-unconditional"] = tiny_pipeline("dit", "ScratchDDIMScheduler", num_classes=None, id2label=None)
    calls = {name: {**CALL, **(UNCONDITIONAL_CALL if name == "dit-unconditional" else {})} for name in cases}
    images = {}
    for name, pipe in cases.items():
        images[name] = run(pipe, **calls[name])
        pipe.save_pretrained(root / name)
    return root, cases, calls, images


def test_fresh_process_reload_gives_identical_images(saved):
    root, cases, calls, images = saved
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(root), json.dumps(calls)], check=True, cwd=ROOT, env=subprocess_env()
    )
    reloaded = load_file(root / "reloaded.safetensors")
    loaded = json.loads((root / "loaded.json").read_text())
    for name, pipe in cases.items():
        expected = [type(c).__name__ for c in (pipe, pipe.denoiser, pipe.scheduler, pipe.vae)] + [pipe.labels]
        assert loaded[name] == expected, name
        assert torch.equal(reloaded[name], images[name]), name


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("family", list(SCHEDULER_FAMILIES))
def test_our_scheduler_and_diffusers_give_the_same_images(saved, kind, family):
    _, _, _, images = saved
    ours, theirs = (f"{kind}-{cls.__name__}" for cls in SCHEDULER_FAMILIES[family])
    torch.testing.assert_close(images[ours], images[theirs], rtol=1e-5, atol=1e-6)


def test_latent_pipeline_decodes_through_the_vae(saved):
    _, cases, _, images = saved
    pipe = cases["dit-vae"]
    latents = run(pipe, output_type="latent")
    assert latents.shape == (2, 4, 8, 8) and images["dit-vae"].shape == (2, 1, 16, 16)
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(images["dit-vae"], (decoded / 2 + 0.5).clamp(0, 1))


def manual_sampling(denoiser, scheduler, labels, guidance_scale, num_inference_steps, seed=0):
    """The textbook loop, one forward per pass: what the pipeline must reproduce."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((len(labels), 1, 8, 8), generator=generator)
    scheduler.set_timesteps(num_inference_steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            prediction = denoiser(latents, t, class_labels=labels).sample
            if guidance_scale != 1.0:
                unconditional = denoiser(latents, t, class_labels=torch.full_like(labels, 10)).sample
                prediction = unconditional + guidance_scale * (prediction - unconditional)
            latents = scheduler.step(prediction, t, latents, generator=generator).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize(
    "scheduler", ["ScratchDDPMScheduler", "ScratchDDIMScheduler", "ScratchFlowMatchEulerScheduler"]
)
def test_guidance_matches_separate_conditional_and_null_passes(scheduler):
    pipe = tiny_pipeline("dit", scheduler)
    labels = torch.tensor(CALL["class_labels"])
    unguided = run(pipe, guidance_scale=1.0)
    assert torch.equal(unguided, manual_sampling(pipe.transformer, pipe.scheduler, labels, 1.0, 2))
    guided = run(pipe, guidance_scale=3.0)
    torch.testing.assert_close(
        guided, manual_sampling(pipe.transformer, pipe.scheduler, labels, 3.0, 2), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(guided, unguided, atol=1e-3)


def test_fixed_generator_is_reproducible_and_seeds_differ():
    pipe = tiny_pipeline("dit", "ScratchDDPMScheduler")
    assert torch.equal(run(pipe, seed=1), run(pipe, seed=1))
    assert not torch.allclose(run(pipe, seed=1), run(pipe, seed=2))


def test_output_types_agree():
    pipe = tiny_pipeline("mmdit", "ScratchDDIMScheduler")
    as_pt = run(pipe, output_type="pt")
    as_np = run(pipe, output_type="np")
    as_pil = run(pipe, output_type="pil")
    as_latent = run(pipe, output_type="latent")
    assert as_pt.shape == (2, 1, 8, 8) and as_np.shape == (2, 8, 8, 1) and as_np.dtype == np.float32
    np.testing.assert_array_equal(as_np, as_pt.permute(0, 2, 3, 1).numpy())
    assert all(isinstance(image, PIL.Image.Image) and image.mode == "L" and image.size == (8, 8) for image in as_pil)
    np.testing.assert_array_equal(
        np.stack([np.asarray(image) for image in as_pil]), (as_np[..., 0] * 255).round().astype(np.uint8)
    )
    torch.testing.assert_close((as_latent / 2 + 0.5).clamp(0, 1), as_pt)
    (as_tuple,) = pipe(**CALL, generator=torch.manual_seed(0), return_dict=False)
    assert torch.equal(as_tuple, as_pt)


def test_class_labels_by_name_by_id_and_default_every_class():
    pipe = tiny_pipeline(
        "dit", "ScratchDDIMScheduler", id2label={**{str(i): str(i) for i in range(10)}, "7": "seven, 7"}
    )
    assert pipe.labels["seven"] == pipe.labels["7"] == 7 and pipe.get_label_ids(["3", "seven"]) == [3, 7]
    by_id = run(pipe, class_labels=[3, 7])
    assert torch.equal(run(pipe, class_labels=["3", "seven"]), by_id)
    assert torch.equal(run(pipe, class_labels=torch.tensor([3, 7])), by_id)
    every_class = run(pipe, class_labels=None)
    assert every_class.shape[0] == 10 and torch.equal(every_class, run(pipe, class_labels=list(range(10))))
    # Images of one label are consecutive.
    assert torch.equal(run(pipe, class_labels=[3, 7], num_images_per_label=2), run(pipe, class_labels=[3, 3, 7, 7]))


def test_learned_variance_is_passed_only_to_a_scheduler_that_uses_it():
    denoiser = tiny_denoiser("dit", learn_sigma=True)
    images = {}
    for name in ("ScratchDDPMScheduler", "DDPMScheduler"):
        for variance_type in ("learned_range", "fixed_small"):
            pipe = tiny_pipeline("dit", name, denoiser=denoiser)
            pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, variance_type=variance_type)
            images[name, variance_type] = run(pipe)
    for variance_type in ("learned_range", "fixed_small"):
        torch.testing.assert_close(
            images["ScratchDDPMScheduler", variance_type], images["DDPMScheduler", variance_type], rtol=1e-5, atol=1e-6
        )
    assert not torch.allclose(
        images["DDPMScheduler", "learned_range"], images["DDPMScheduler", "fixed_small"], atol=1e-3
    )


def test_trajectory_and_step_callback(tmp_path):
    pipe = tiny_pipeline("dit", "ScratchFlowMatchEulerScheduler")
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    output = pipe(
        **{**CALL, "num_inference_steps": 3, "output_type": "latent"},
        generator=torch.manual_seed(0),
        return_trajectory=True,
        callback_on_step_end=record,
    )
    assert len(output.trajectory) == 4 and torch.equal(output.trajectory[-1], output.images)
    assert all(torch.equal(a, b) for a, b in zip(seen, output.trajectory[1:]))

    def zero_at_last_step(pipeline, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == pipeline.num_timesteps - 1 else {}

    images = pipe(**CALL, generator=torch.manual_seed(0), callback_on_step_end=zero_at_last_step).images
    assert torch.equal(images, torch.full_like(images, 0.5))

    frames = pipe(**{**CALL, "output_type": "pil"}, generator=torch.manual_seed(0), return_trajectory=True).trajectory
    gif = export_to_gif([make_image_grid(step, rows=1, cols=2) for step in frames], str(tmp_path / "trajectory.gif"))
    assert PIL.Image.open(gif).n_frames == len(frames) == 3


def test_from_pipe_and_scheduler_swap_keep_the_denoiser():
    pipe = tiny_pipeline("unet", "ScratchDDIMScheduler")
    again = ClassConditionalUNetPipeline.from_pipe(pipe)
    assert again.unet is pipe.unet and again.labels == pipe.labels
    pipe.scheduler = SCHEDULERS["DDIMScheduler"].from_config(pipe.scheduler.config)
    assert pipe.config.scheduler == ("diffusers", "DDIMScheduler")


def test_import_registers_on_diffusers_without_shadowing():
    assert diffusers.ClassConditionalUNetPipeline is ClassConditionalUNetPipeline
    assert diffusers.ClassConditionalTransformerPipeline is ClassConditionalTransformerPipeline
    for module in ("custom_models.unet", "custom_schedulers.ddpm", "custom_schedulers.flow_match_euler"):
        assert getattr(diffusers.pipelines, module) is sys.modules[module]
    with pytest.raises(ImportError, match="refusing to shadow"):
        pipelines._register(diffusers, "DDPMPipeline", ClassConditionalUNetPipeline)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[3, 10]), r"Class label\(s\) \[10\] out of range.*0\.\.9"),
        (dict(class_labels=["three", "cat"]), r"Unknown label name\(s\) \['cat'\]"),
        (dict(class_labels=[1.5]), "ints or label names"),
        (dict(num_inference_steps=0), "num_inference_steps.*got 0"),
        (dict(num_images_per_label=0), "num_images_per_label"),
        (dict(latents=torch.randn(2, 1, 4, 4)), r"latents.*\(2, 1, 4, 4\).*\(2, 1, 8, 8\)"),
        (dict(output_type="jpg"), "Unknown `output_type` 'jpg'"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=float("nan")), r"`guidance_scale` must be a finite number >= 0 .* got nan"),
        (dict(guidance_scale=float("inf")), r"`guidance_scale` must be a finite number >= 0 .* got inf"),
        (dict(guidance_scale="2"), r"`guidance_scale` must be a number .* got '2'"),
        (dict(generator=[torch.Generator()] * 3), r"list of 3 generators for 2 images; pass one generator per image"),
        (
            dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]),
            r"\['noise'\] not available",
        ),
    ],
)
def test_bad_call_arguments_raise_value_errors(kwargs, message):
    pipe = tiny_pipeline("dit", "ScratchDDIMScheduler")
    with pytest.raises(ValueError, match=message):
        pipe(**{**CALL, **kwargs})


def test_unconditional_denoiser_refuses_labels_and_guidance():
    pipe = tiny_pipeline("dit", "ScratchDDIMScheduler", num_classes=None, id2label=None)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(**{**CALL, "guidance_scale": 1.0})
    with pytest.raises(ValueError, match="guidance_scale` must be 1.0"):
        pipe(**{**CALL, "class_labels": None})
    with pytest.raises(ValueError, match="unconditional"):
        tiny_pipeline("dit", "ScratchDDIMScheduler", num_classes=None)


def test_id2label_must_name_existing_classes():
    with pytest.raises(ValueError, match=r"ids \[12\] outside"):
        tiny_pipeline("dit", id2label={"12": "twelve"})


def test_a_compiled_denoiser_samples_the_same_images_and_saves_as_the_plain_model(tmp_path):
    """`pipe.unet = torch.compile(pipe.unet)` (the README's advice for long sampling jobs on CPU)."""
    pipe = tiny_pipeline("unet", "ScratchDDIMScheduler")
    eager = run(pipe)
    pipe.unet = torch.compile(pipe.unet)
    # Compiled kernels may reorder float sums: equal to float32 rounding, not bit for bit.
    torch.testing.assert_close(run(pipe), eager, atol=1e-5, rtol=0)
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["unet"] == [
        "custom_models.unet",
        "ScratchUNetModel",
    ]
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(reloaded), eager)
