"""The demo page (issue 15): its loading, sampling and error messages, then the real page in headless Chromium."""

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import make_image_grid
from pipeline_helpers import tiny_pipeline

from demo import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny class-conditional UNet pipeline, a flow-matching DiT one, and a LoRA adapter of the DiT."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("demo")
    tiny_pipeline("unet", "ScratchDDPMScheduler").save_pretrained(root / "unet")
    dit = tiny_pipeline("dit", "ScratchFlowMatchEulerScheduler")
    dit.register_to_config(objective="flow_matching")
    dit.save_pretrained(root / "dit")
    targets = dit.transformer.default_lora_target_modules
    dit.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    dit.save_denoiser_lora(root / "dit_lora")
    (root / "empty").mkdir()
    (root / "run" / "best").mkdir(parents=True)
    shutil.copy(root / "unet" / "model_index.json", root / "run" / "best" / "model_index.json")
    return root


def expected_grid(folder, digit: int, count: int, steps: int, guidance: float, seed: int, scheduler=None):
    """What the pipeline itself makes for these settings, as the page lays it out (one row of up to 4)."""
    from diffusers import DiffusionPipeline

    import pipelines  # noqa: F401

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        import custom_schedulers

        pipe.scheduler = getattr(custom_schedulers, scheduler).from_config(pipe.scheduler.config)
    images = pipe(
        class_labels=[digit],
        num_images_per_label=count,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images
    return make_image_grid(images, rows=1, cols=count)


def settings(**overrides):
    values = dict(digit="three", prompt=None, negative_prompt=None, sampler="saved", steps=3, guidance=2.0, seed=5)
    return {**values, "count": 2, **overrides}


def test_the_page_samples_what_the_pipeline_samples_and_compares_samplers_from_the_same_noise(folders):
    pipe = app.load_pipeline(str(folders / "unet"))
    assert app.load_pipeline(str(folders / "unet")) is pipe  # kept for the next call
    assert app.digit_choices(pipe)[3] == "three"
    assert app.sampler_choices(pipe)[:3] == ["saved", "ScratchDDPMScheduler", "ScratchDDIMScheduler"]
    assert "FlowMatchEulerDiscreteScheduler" not in app.sampler_choices(pipe)
    grid, frames = app.sample(pipe, **settings())
    assert np.array_equal(np.asarray(grid), np.asarray(expected_grid(folders / "unet", 3, 2, 3, 2.0, 5)))
    assert len(frames) == 4 and frames[0].size == grid.size  # the starting noise, then one grid per step
    other, other_frames = app.sample(pipe, **settings(sampler="ScratchDDIMScheduler"))
    assert np.array_equal(np.asarray(other_frames[0]), np.asarray(frames[0]))  # same seed, same noise
    assert not np.array_equal(np.asarray(other), np.asarray(grid))
    assert type(pipe.scheduler).__name__ == "ScratchDDPMScheduler"  # the saved sampler is back afterwards
    gif = app.save_gif(frames, str(folders))
    assert Path(gif).read_bytes()[:6] == b"GIF89a"

    flow = app.load_pipeline(str(folders / "dit"))
    assert app.sampler_choices(flow) == [
        "saved",
        "ScratchFlowMatchEulerScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
    ]
    heun, _ = app.sample(flow, **settings(sampler="FlowMatchHeunDiscreteScheduler"))
    assert heun.size == (16, 8)
    # A LoRA adapter at weight 0 gives the base model's images; at weight 1 others; empty switches it off.
    base, _ = app.sample(flow, **settings())
    app.apply_lora(flow, str(folders / "dit_lora"), 0.0)
    assert np.array_equal(np.asarray(app.sample(flow, **settings())[0]), np.asarray(base))
    app.apply_lora(flow, str(folders / "dit_lora"), 1.0)
    assert not np.array_equal(np.asarray(app.sample(flow, **settings())[0]), np.asarray(base))
    app.apply_lora(flow, "", 1.0)
    assert np.array_equal(np.asarray(app.sample(flow, **settings())[0]), np.asarray(base))


@pytest.mark.parametrize(
    "source, message",
    [
        ("", "Enter a pipeline folder"),
        ("{root}/unet/model_index.json", "is a file"),
        ("{root}/empty", "is not a pipeline folder: it has no model_index.json."),
        ("{root}/run", "It looks like a training run: try {root}/run/best"),
        ("{root}/missing", "Pipeline folder not found"),
        ("{root}/run/best", "Could not load {root}/run/best"),
    ],
    ids=["empty", "file", "no-index", "run-folder", "missing", "broken"],
)
def test_bad_pipelines_get_a_readable_message(folders, source, message):
    with pytest.raises(app.DemoError) as error:
        app.load_pipeline(source.format(root=folders))
    assert message.format(root=folders) in str(error.value)
    assert "Traceback" not in app.error_text(error.value)


def test_without_the_quickstart_output_the_page_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no outputs/quickstart/best here
    with pytest.raises(app.DemoError) as error:
        app.load_pipeline(app.DEFAULT_PIPELINE)
    message = app.opening_error(app.DEFAULT_PIPELINE, error.value)
    assert message.startswith("No pipeline at `outputs/quickstart/best` yet") and "configs/quickstart.yaml" in message
    assert app.opening_error("elsewhere", error.value).startswith("**Error:**")


def test_a_text_to_image_pipeline_takes_a_prompt_and_a_negative_prompt(tmp_path):
    from test_text_to_image import build

    pipe = build("unet", tmp_path)
    assert app.is_text_pipeline(pipe) and app.digit_choices(pipe) == []
    text = dict(digit=None, sampler="saved", steps=2, guidance=2.0, seed=1, count=2)
    grid, _ = app.sample(pipe, prompt="a bold 7", negative_prompt=None, **text)
    images = pipe(
        prompt="a bold 7",
        num_images_per_prompt=2,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(1),
    ).images
    assert np.array_equal(np.asarray(grid), np.asarray(make_image_grid(images, rows=1, cols=2)))
    negative, _ = app.sample(pipe, prompt="a bold 7", negative_prompt="a thin 3", **text)
    assert not np.array_equal(np.asarray(negative), np.asarray(grid))
    with pytest.raises(app.DemoError, match="Type a prompt"):
        app.sample(pipe, prompt="  ", negative_prompt=None, **text)


def test_bad_settings_get_a_readable_message(folders):
    pipe = app.load_pipeline(str(folders / "unet"))
    for overrides, message in [
        (dict(digit="eleven"), "Choose a digit: one of zero, one"),
        (dict(count=17), "between 1 and 16"),
        (dict(steps=0), "Steps must be at least 1"),
        (dict(sampler="FlowMatchEulerDiscreteScheduler"), "does not fit this diffusion model"),
    ]:
        with pytest.raises(app.DemoError, match=message):
            app.sample(pipe, **settings(**overrides))
    # An adapter trained for another model: our LoRA loader's reason, in one line.
    with pytest.raises(app.DemoError, match="Could not load the LoRA adapter .*dit_lora"):
        app.apply_lora(pipe, str(folders / "dit_lora"), 1.0)
    with pytest.raises(app.DemoError, match="LoRA adapter not found"):
        app.apply_lora(pipe, str(folders / "nowhere"), 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# The real page, in a real browser
# ----------------------------------------------------------------------------------------------------------------------
def test_the_page_in_headless_chromium(folders, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import demo_browser as browser

    if browser.find_browser() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("chromium / chromium-driver not installed (apt-get install chromium chromium-driver)")
    artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs: the same float sums
    try:
        expected = expected_grid(folders / "unet", 3, 4, 25, 2.0, 5)
        expected_ddim = expected_grid(folders / "unet", 3, 4, 25, 2.0, 5, scheduler="ScratchDDIMScheduler")
    finally:
        torch.set_num_threads(threads)

    with browser.serve_demo(str(folders / "unet"), tmp_path / "server.log") as url, browser.chromium() as driver:
        driver.get(url)
        assert "Loaded" in browser.wait_for_status(driver, "Loaded")
        browser.choose(driver, "digit", "three")
        browser.set_text(driver, "seed", "5")
        browser.open_panel(driver, "compare_panel")
        browser.choose(driver, "second_sampler", "ScratchDDIMScheduler")
        browser.click(driver, "generate")
        status = browser.wait_for_status(driver, "Generated")
        assert "seed 5, 25 steps" in status and "same starting noise" in status
        shown = browser.shown_image(driver, "grid")
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected.convert("RGB")))
        second = browser.shown_image(driver, "second_grid")
        assert np.array_equal(np.asarray(second.convert("RGB")), np.asarray(expected_ddim.convert("RGB")))
        animation = PIL.Image.open(io.BytesIO(browser.shown_file(driver, "animation")))
        assert animation.format == "GIF" and animation.n_frames == 26  # the noise, then 25 steps
        driver.save_screenshot(str(artifacts / "demo.png"))

        # A folder that is not a pipeline: a message in the page, no stack trace.
        browser.set_text(driver, "pipeline", str(folders / "empty"))
        browser.click(driver, "load")
        message = browser.wait_for_status(driver, "is not a pipeline folder")
        assert message.startswith("Error:") and "Traceback" not in driver.page_source
        driver.save_screenshot(str(artifacts / "demo_error.png"))
    assert (artifacts / "demo.png").stat().st_size > 10_000


def test_the_command_line_refuses_a_bad_port(capsys):
    from demo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "70000"])
    assert exit_info.value.code == 2 and "--port must be between 1 and 65535" in capsys.readouterr().err
