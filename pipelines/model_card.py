"""Model cards for pushed pipelines: Hub metadata (licence, tags, data set, metrics), a sample grid and a usage snippet."""

from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData


SAMPLE_GRID_FILENAME = "samples.png"
# The Hub has no class-conditional image generation task; this is the closest one it knows.
PIPELINE_TAG = "unconditional-image-generation"
ARCHITECTURE_NAMES = {"unet": "UNet", "dit": "DiT (grouped-query attention)", "mmdit": "MMDiT"}
OBJECTIVE_TAGS = {
    "epsilon": "epsilon-prediction",
    "v_prediction": "v-prediction",
    "sample": "x0-prediction",
    "flow_matching": "flow-matching",
}


def infer_architecture(pipeline) -> str:
    """`"unet"`, `"dit"`, `"mmdit"`, ... from the denoiser's class name (`ScratchDiTModel` -> `"dit"`)."""
    return pipeline.denoiser.__class__.__name__.removeprefix("Scratch").removesuffix("Model").lower()


def infer_objective(pipeline) -> str:
    """The scheduler's `prediction_type`, or `"flow_matching"` for a flow scheduler (which has none)."""
    return pipeline.scheduler.config.get("prediction_type") or "flow_matching"


def _usage_snippet(repo_id: str, num_classes: Optional[int], num_inference_steps: int, guidance_scale: float) -> str:
    if num_classes:
        labels = list(range(min(num_classes, 4)))
        call = (
            f"images = pipe(class_labels={labels}, num_images_per_label=2, num_inference_steps={num_inference_steps}, "
            f"guidance_scale={guidance_scale}, generator=torch.manual_seed(0)).images"
        )
    else:
        call = f"images = pipe(num_images_per_label=4, num_inference_steps={num_inference_steps}, generator=torch.manual_seed(0)).images"
    return "\n".join(
        [
            "import torch",
            "from diffusers import DiffusionPipeline",
            "",
            "import pipelines  # registers this project's pipeline and component classes on diffusers",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")',
            call,
            'images[0].save("sample.png")',
        ]
    )


def build_model_card(
    repo_id: str,
    pipeline=None,
    *,
    architecture: Optional[str] = None,
    objective: Optional[str] = None,
    dataset: Optional[str] = None,
    metrics: Optional[list[dict]] = None,
    license: str = "apache-2.0",
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    training_details: Optional[str] = None,
) -> ModelCard:
    """A Hub model card for a class-conditional pipeline.

    Args:
        repo_id: the Hub repo the card describes (used in the usage snippet).
        pipeline: the pipeline; fills in architecture, objective, class names and parameter count.
        architecture: `"unet"`, `"dit"`, `"mmdit"`; inferred from `pipeline` when omitted.
        objective: the scheduler's `prediction_type` (`"epsilon"`, `"v_prediction"`, `"sample"`) or
            `"flow_matching"`; inferred from `pipeline` when omitted.
        dataset: Hub id of the training data set (e.g. `"ylecun/mnist"`).
        metrics: dicts `{"name": "FID-MNIST", "value": 3.1, "num_samples": 10000}` (optional `"type"`, the
            Hub metric id, default the lower-cased name); FID values compare only at one sample count.
        license: the weights' licence (a Hub licence id).
        num_inference_steps, guidance_scale: the settings shown in the usage snippet.
        training_details: free text (recipe, steps, hardware) added under "Training".
    """
    if pipeline is None and (architecture is None or objective is None):
        raise ValueError("Pass `pipeline`, or both `architecture` and `objective`.")
    architecture = architecture or infer_architecture(pipeline)
    objective = objective or infer_objective(pipeline)
    if objective not in OBJECTIVE_TAGS:
        raise ValueError(f"Unknown objective {objective!r}; choose one of {list(OBJECTIVE_TAGS)}.")
    metrics = metrics or []
    for metric in metrics:
        if not {"name", "value", "num_samples"} <= set(metric):
            raise ValueError(f"Each metric needs 'name', 'value' and 'num_samples'; got {metric}.")
    num_classes = pipeline.denoiser.config.num_classes if pipeline is not None else None
    model_name = repo_id.split("/")[-1]

    tags = ["diffusers", architecture, OBJECTIVE_TAGS[objective], "class-conditional" if num_classes else "unconditional"]
    eval_results = None
    if metrics and dataset:
        eval_results = [
            EvalResult(
                task_type=PIPELINE_TAG,
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=metric.get("type", metric["name"].lower()),
                metric_value=metric["value"],
                metric_name=f"{metric['name']} ({metric['num_samples']} samples)",
            )
            for metric in metrics
        ]
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        datasets=[dataset] if dataset else None,
        model_name=model_name,
        eval_results=eval_results,
    )

    kind = "class-conditional" if num_classes else "unconditional"
    summary = f"A {kind} diffusion model with a {ARCHITECTURE_NAMES.get(architecture, architecture)} denoiser"
    if pipeline is not None:
        num_parameters = sum(p.numel() for p in pipeline.denoiser.parameters())
        summary += f" ({num_parameters / 1e6:.2f}M parameters)"
    summary += f", trained with the {OBJECTIVE_TAGS[objective].replace('-', ' ')} objective"
    if dataset:
        summary += f" on [{dataset}](https://huggingface.co/datasets/{dataset})"
    summary += ", written from scratch as diffusers components."

    sections = [
        f"# {model_name}",
        summary,
        f"![Samples{', one row per class' if num_classes else ''}]({SAMPLE_GRID_FILENAME})",
        "## Usage",
        "With this project installed (`pip install -e .` in its repository), no `trust_remote_code` needed:",
        "```python\n" + _usage_snippet(repo_id, num_classes, num_inference_steps, guidance_scale) + "\n```",
    ]
    if metrics:
        rows = "\n".join(f"| {m['name']} | {m['value']:.4g} | {m['num_samples']} |" for m in metrics)
        sections += ["## Evaluation", "| metric | value | samples |\n|---|---|---|\n" + rows]
    if training_details:
        sections += ["## Training", training_details]
    details = [f"- Hub task tag: `{PIPELINE_TAG}` (the Hub has no class-conditional image generation task)."]
    if pipeline is not None:
        details.insert(0, f"- Pipeline: `{pipeline.__class__.__name__}`, denoiser `{pipeline.denoiser.__class__.__name__}`, "
                       f"scheduler `{pipeline.scheduler.__class__.__name__}`.")
        if pipeline.config.get("id2label"):
            names = ", ".join(f"{k}: {v}" for k, v in pipeline.config["id2label"].items())
            details.append(f"- Classes (`class_labels` accepts ids or these names): {names}.")
    sections += ["## Model details", "\n".join(details)]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
