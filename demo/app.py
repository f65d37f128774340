"""A Gradio page for this project's pipelines: pick a pipeline, a digit (or a prompt), a sampler and a seed; see the
samples, the denoising animation, and two pipelines or two samplers side by side from the same noise.

Run it with `python -m demo` (the project's checkout), or as a Hugging Face Space's `app.py`: `push_to_hub(...,
space_id=...)` uploads this file unchanged beside a `requirements.txt` and a `demo_config.json` naming the model.
So this file imports only gradio, diffusers, torch, numpy and PIL. Where the project is installed it loads pipelines
with the project's own code (`import pipelines`); elsewhere (a Space) it loads the configured model's self-contained
repo with `trust_remote_code=True`, and only that one: other ids would run code nobody vetted.
"""

import json
import os
import tempfile
import time
from pathlib import Path

import gradio as gr
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image

try:  # the project, when it is installed: its own code, no trust_remote_code
    import pipelines  # noqa: F401  (registers our pipeline classes on diffusers)

    PROJECT_INSTALLED = True
except ImportError:
    PROJECT_INSTALLED = False

HERE = Path(__file__).resolve().parent
DEFAULT_PIPELINE = "outputs/quickstart/best"
CONFIG_FILE = "demo_config.json"  # written into a Space by `push_to_hub(..., space_id=...)`
SAVED_SAMPLER = "saved"
# Samplers per training objective: a flow-matching model needs a flow sampler, a diffusion model a diffusion one.
DIFFUSERS_SAMPLERS = {
    "diffusion": [
        "DDPMScheduler",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "EulerDiscreteScheduler",
    ],
    "flow_matching": ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"],
}
OUR_SAMPLERS = {
    "diffusion": ["ScratchDDPMScheduler", "ScratchDDIMScheduler"],
    "flow_matching": ["ScratchFlowMatchEulerScheduler"],
}
MAX_IMAGES = 16
# Digits are 28 px: shown large with sharp pixels (the image files stay at their true size).
PAGE_CSS = (
    "#grid img, #animation img, #second_grid img, #second_animation img "
    "{ width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated; }"
)
GIF_FRAME_MS = 80
GIF_FINAL_FRAME_MS = 1500


class DemoError(ValueError):
    """A problem with what was entered; its message is shown in the page as it is."""


def configured_pipeline() -> str:
    """The pipeline the page opens on: `$DEMO_PIPELINE`, the Space's `demo_config.json`, else the quickstart output."""
    if os.environ.get("DEMO_PIPELINE"):
        return os.environ["DEMO_PIPELINE"]
    config = HERE / CONFIG_FILE
    if config.is_file():
        return json.loads(config.read_text())["pipeline"]
    return DEFAULT_PIPELINE


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
_loaded: dict[str, DiffusionPipeline] = {}


def load_pipeline(source: str) -> DiffusionPipeline:
    """A pipeline folder or Hub id -> the loaded pipeline (kept for the next call), or a DemoError saying why not."""
    source = (source or "").strip()
    if not source:
        raise DemoError("Enter a pipeline folder (one with model_index.json) or a Hub repo id.")
    if source in _loaded:
        return _loaded[source]
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise DemoError(
                f"{source} is a file; enter a pipeline folder (one with model_index.json) or a Hub repo id."
            )
        if not (path / "model_index.json").is_file():
            inside = [name for name in ("best", "last") if (path / name / "model_index.json").is_file()]
            hint = f" It looks like a training run: try {path / inside[0]}." if inside else ""
            raise DemoError(f"{source} is not a pipeline folder: it has no model_index.json.{hint}")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DemoError(f"Pipeline folder not found: {source}")
    trust = not PROJECT_INSTALLED
    if trust and source != configured_pipeline():
        raise DemoError(
            f"This page runs the code of {configured_pipeline()!r} only (trust_remote_code); install the "
            "scratch-diffusion project to load other pipelines."
        )
    try:
        pipeline = DiffusionPipeline.from_pretrained(source, **({"trust_remote_code": True} if trust else {}))
    except Exception as error:  # diffusers' and the Hub's errors, shown as one readable line
        raise DemoError(f"Could not load {source}: {type(error).__name__}: {first_line(error)}") from error
    if not hasattr(pipeline, "denoiser"):
        raise DemoError(f"{source} holds a {type(pipeline).__name__}, not one of scratch-diffusion's pipelines.")
    pipeline.set_progress_bar_config(disable=True)
    _loaded[source] = pipeline
    return pipeline


def first_line(error: Exception) -> str:
    text = str(error).strip() or repr(error)
    return text.splitlines()[0][:500]


def is_text_pipeline(pipeline) -> bool:
    return hasattr(pipeline, "encode_prompt")


def objective(pipeline) -> str:
    """'flow_matching' or 'diffusion': what the model was trained for (recorded by the pipeline, else its scheduler)."""
    recorded = pipeline.config.get("objective")
    if recorded:
        return recorded
    return "flow_matching" if "FlowMatch" in type(pipeline.scheduler).__name__ else "diffusion"


def sampler_choices(pipeline) -> list[str]:
    family = objective(pipeline)
    ours = OUR_SAMPLERS[family] if PROJECT_INSTALLED else []
    return [SAVED_SAMPLER, *ours, *DIFFUSERS_SAMPLERS[family]]


def digit_choices(pipeline) -> list[str]:
    """The class names of a class-conditional pipeline (`id2label`, else the ids); empty for the other kinds."""
    if is_text_pipeline(pipeline) or not pipeline.denoiser.config.num_classes:
        return []
    id2label = pipeline.config.get("id2label") or {}
    return [id2label.get(str(i), str(i)) for i in range(pipeline.denoiser.config.num_classes)]


def with_sampler(pipeline, name: str):
    """The pipeline's saved scheduler, or a fresh `name` built from its config (checked against the objective)."""
    import diffusers

    if not name or name == SAVED_SAMPLER:
        return pipeline.scheduler
    if name not in sampler_choices(pipeline):
        raise DemoError(
            f"Sampler {name!r} does not fit this {objective(pipeline).replace('_', '-')} model; "
            f"choose one of {', '.join(sampler_choices(pipeline))}."
        )
    if name in OUR_SAMPLERS["diffusion"] + OUR_SAMPLERS["flow_matching"]:
        import custom_schedulers

        return getattr(custom_schedulers, name).from_config(pipeline.scheduler.config)
    return getattr(diffusers, name).from_config(pipeline.scheduler.config)


def apply_lora(pipeline, adapter: str, weight: float) -> None:
    """Activate `adapter` (a folder, file or Hub id) at `weight`, or switch every adapter off when it is empty."""
    adapter = (adapter or "").strip()
    denoiser = pipeline.denoiser
    if not adapter:
        if getattr(denoiser, "peft_config", None):
            denoiser.disable_adapters()
        return
    name = "adapter_" + str(abs(hash(adapter)))
    if name not in (getattr(denoiser, "peft_config", None) or {}):
        if not Path(adapter).exists() and (adapter.startswith((".", "/", "~")) or adapter.count("/") > 1):
            raise DemoError(f"LoRA adapter not found: {adapter}")
        try:
            pipeline.load_lora_weights(adapter, adapter_name=name)
        except Exception as error:  # a foreign or broken adapter: our loader says which and why
            raise DemoError(f"Could not load the LoRA adapter {adapter}: {first_line(error)}") from error
    denoiser.enable_adapters()
    pipeline.set_adapters([name], adapter_weights=[float(weight)])


# ----------------------------------------------------------------------------------------------------------------------
# Generating
# ----------------------------------------------------------------------------------------------------------------------
def sample(pipeline, *, digit, prompt, negative_prompt, sampler, steps, guidance, seed, count, progress=None):
    """(grid, [trajectory grids]) for one setting; the same seed gives the same starting noise on every pipeline."""
    steps, count, seed = int(steps), int(count), int(seed)
    if not 1 <= count <= MAX_IMAGES:
        raise DemoError(f"Number of images must be between 1 and {MAX_IMAGES}, got {count}.")
    if steps < 1:
        raise DemoError(f"Steps must be at least 1, got {steps}.")
    saved_scheduler = pipeline.scheduler
    pipeline.scheduler = with_sampler(pipeline, sampler)

    def report(pipe, step, timestep, tensors):
        if progress is not None:
            progress((step + 1) / pipe.num_timesteps, desc=f"step {step + 1} of {pipe.num_timesteps}")
        return tensors

    settings = dict(
        num_inference_steps=steps,
        guidance_scale=float(guidance),
        generator=torch.Generator("cpu").manual_seed(seed),
        return_trajectory=True,
        callback_on_step_end=report,
    )
    try:
        if is_text_pipeline(pipeline):
            if not (prompt or "").strip():
                raise DemoError("Type a prompt, e.g. 'a bold 7 leaning right'.")
            negative = (negative_prompt or "").strip() or None
            output = pipeline(prompt=prompt, negative_prompt=negative, num_images_per_prompt=count, **settings)
        elif digit_choices(pipeline):
            names = digit_choices(pipeline)
            if digit not in names:
                raise DemoError(f"Choose a digit: one of {', '.join(names)}.")
            output = pipeline(class_labels=[names.index(digit)], num_images_per_label=count, **settings)
        else:
            settings["guidance_scale"] = 1.0  # an unconditional model has no guidance
            output = pipeline(num_images_per_label=count, **settings)
    finally:
        pipeline.scheduler = saved_scheduler
    cols = min(count, 4) if count % min(count, 4) == 0 else count
    rows = count // cols
    grid = make_image_grid(output.images, rows=rows, cols=cols)
    frames = [make_image_grid(step_images, rows=rows, cols=cols) for step_images in output.trajectory]
    return grid, frames


def save_gif(frames: list[Image.Image], folder: str) -> str:
    """The denoising trajectory as a looping GIF (the final grid held longer); returns its path."""
    path = os.path.join(folder, f"denoising-{time.time_ns()}.gif")
    durations = [GIF_FRAME_MS] * (len(frames) - 1) + [GIF_FINAL_FRAME_MS]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def describe(pipeline, source: str) -> str:
    kind = (
        "text-to-image"
        if is_text_pipeline(pipeline)
        else "class-conditional"
        if digit_choices(pipeline)
        else "unconditional"
    )
    count = sum(p.numel() for p in pipeline.denoiser.parameters()) / 1e6
    return (
        f"Loaded **{source}**: {kind} {type(pipeline).__name__}, denoiser {type(pipeline.denoiser).__name__} "
        f"({count:.2f}M parameters), {objective(pipeline).replace('_', ' ')}, saved sampler "
        f"{type(pipeline.scheduler).__name__}."
    )


# ----------------------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------------------
def error_text(error: Exception) -> str:
    """What the page shows for a failure: the message, never a stack trace."""
    if isinstance(error, DemoError):
        return f"**Error:** {error}"
    return f"**Error:** {type(error).__name__}: {first_line(error)}"


def opening_error(source: str, error: Exception) -> str:
    """The message for a pipeline that did not load; for the quickstart output not made yet, how to make it."""
    if (source or "").strip() == DEFAULT_PIPELINE and not Path(DEFAULT_PIPELINE).exists():
        return (
            f"No pipeline at `{DEFAULT_PIPELINE}` yet. Make one with `python -m training.train --config "
            "configs/quickstart.yaml` (the README's quickstart, about 10 minutes on 2 CPU cores), or enter a pipeline "
            "folder or Hub id."
        )
    return error_text(error)


def build_demo(default_pipeline: str | None = None) -> gr.Blocks:
    default_pipeline = default_pipeline or configured_pipeline()
    work = tempfile.mkdtemp(prefix="scratch-diffusion-demo-")

    def on_load(source):
        """Load a pipeline; fill the digit / prompt fields and the samplers that fit it."""
        try:
            pipeline = load_pipeline(source)
        except Exception as error:
            hidden = gr.update(choices=[], value=None)
            return (
                opening_error(source, error),
                hidden,
                gr.update(visible=False),
                gr.update(visible=False),
                hidden,
                hidden,
            )
        digits, text = digit_choices(pipeline), is_text_pipeline(pipeline)
        samplers = sampler_choices(pipeline)
        return (
            describe(pipeline, source.strip()),
            gr.update(choices=digits, value=digits[7 % len(digits)] if digits else None, visible=bool(digits)),
            gr.update(visible=text),
            gr.update(visible=text),
            gr.update(choices=samplers, value=SAVED_SAMPLER),
            gr.update(choices=["", *samplers], value=""),
        )

    def on_generate(
        source,
        digit,
        prompt,
        negative_prompt,
        sampler,
        steps,
        guidance,
        seed,
        count,
        adapter,
        adapter_weight,
        second_source,
        second_sampler,
        progress=gr.Progress(),
    ):
        try:
            pipeline = load_pipeline(source)
            apply_lora(pipeline, adapter, adapter_weight)
            settings = dict(
                digit=digit,
                prompt=prompt,
                negative_prompt=negative_prompt,
                steps=steps,
                guidance=guidance,
                seed=seed,
                count=count,
            )
            grid, frames = sample(pipeline, sampler=sampler, progress=progress, **settings)
            outputs = [grid, save_gif(frames, work)]
            status = f"Generated {int(count)} image(s), seed {int(seed)}, {int(steps)} steps, sampler {sampler}."
            if (second_source or "").strip() or second_sampler:
                second = load_pipeline(second_source) if (second_source or "").strip() else pipeline
                second_grid, second_frames = sample(
                    second, sampler=second_sampler or sampler, progress=progress, **settings
                )
                outputs += [second_grid, save_gif(second_frames, work)]
                status += " Side by side: the same seed, so the same starting noise."
            else:
                outputs += [None, None]
            return [status, *outputs]
        except Exception as error:
            return [error_text(error), None, None, None, None]

    with gr.Blocks(title="scratch-diffusion") as demo:
        gr.Markdown(
            "# scratch-diffusion\nDiffusion models written from scratch as diffusers components: pick a pipeline, "
            "a digit (or a prompt), a sampler and a seed."
        )
        with gr.Row():
            source = gr.Textbox(label="Pipeline folder or Hub id", value=default_pipeline, elem_id="pipeline", scale=4)
            load_button = gr.Button("Load", elem_id="load", scale=1)
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            digit = gr.Dropdown(label="Digit", choices=[], elem_id="digit")
            prompt = gr.Textbox(label="Prompt", value="a bold 7", visible=False, elem_id="prompt")
            negative_prompt = gr.Textbox(label="Negative prompt", visible=False, elem_id="negative_prompt")
        with gr.Row():
            sampler = gr.Dropdown(label="Sampler", choices=[SAVED_SAMPLER], value=SAVED_SAMPLER, elem_id="sampler")
            steps = gr.Slider(1, 200, value=25, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(0.0, 10.0, value=2.0, step=0.1, label="Guidance", elem_id="guidance")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
            count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images", elem_id="count")
        with gr.Accordion("LoRA adapter", open=False, elem_id="lora_panel"):
            adapter = gr.Textbox(label="Adapter folder, file or Hub id (empty: none)", elem_id="adapter")
            adapter_weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter weight", elem_id="adapter_weight")
        with gr.Accordion(
            "Side by side: a second pipeline or sampler, same noise", open=False, elem_id="compare_panel"
        ):
            second_source = gr.Textbox(label="Second pipeline (empty: the same one)", elem_id="second_pipeline")
            second_sampler = gr.Dropdown(
                label="Second sampler (empty: the same)", choices=[""], elem_id="second_sampler"
            )
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            grid = gr.Image(label="Samples", type="pil", format="png", elem_id="grid", height=320)
            animation = gr.Image(label="Denoising", type="filepath", elem_id="animation", height=320)
        with gr.Row():
            second_grid = gr.Image(label="Second: samples", type="pil", format="png", elem_id="second_grid", height=320)
            second_animation = gr.Image(
                label="Second: denoising", type="filepath", elem_id="second_animation", height=320
            )

        loaded = [status, digit, prompt, negative_prompt, sampler, second_sampler]
        load_button.click(on_load, inputs=source, outputs=loaded)
        source.submit(on_load, inputs=source, outputs=loaded)
        demo.load(on_load, inputs=source, outputs=loaded)
        generate.click(
            on_generate,
            inputs=[
                source,
                digit,
                prompt,
                negative_prompt,
                sampler,
                steps,
                guidance,
                seed,
                count,
                adapter,
                adapter_weight,
                second_source,
                second_sampler,
            ],
            outputs=[status, grid, animation, second_grid, second_animation],
        )
    return demo


def serve(default_pipeline: str | None = None, **launch_kwargs) -> None:
    """Build the page and serve it (gradio's `launch` settings: `server_name`, `server_port`, ...)."""
    build_demo(default_pipeline).launch(css=PAGE_CSS, show_error=False, **launch_kwargs)


if __name__ == "__main__":  # a Hugging Face Space runs `python app.py`
    serve()
