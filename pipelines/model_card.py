"""Model cards for pipelines and LoRA adapters: Hub metadata (licence, tags, data set, metrics), a sample grid and a
usage snippet. Training writes both kinds here; `push_to_hub` uses the pipeline card."""

from pathlib import Path

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
    """`"flow_matching"`, or the prediction type (`"epsilon"`, ...) of a diffusion objective, as the pipeline records
    it; a folder saved before pipelines recorded it falls back on its scheduler's config."""
    config = pipeline.config
    if config.get("objective") == "flow_matching":
        return "flow_matching"
    if config.get("objective") == "diffusion":
        return config["prediction_type"]
    return pipeline.scheduler.config.get("prediction_type") or "flow_matching"


def _usage_snippet(
    repo_id: str,
    num_classes: int | None,
    num_inference_steps: int,
    guidance_scale: float,
    lora: str | None = None,
    text: bool = False,
    load: str = "registered",
) -> str:
    """Code that loads `repo_id` (with adapter `lora` on top, if given) and samples a few images, runnable as written.

    `load`: `"registered"` (the project installed: `import pipelines`, then `DiffusionPipeline.from_pretrained`) or
    `"remote_code"` (only diffusers: `trust_remote_code=True` runs the code generated into a self-contained repo).
    """
    adapter = []
    if lora is not None:
        adapter = [
            f'pipe.load_lora_weights("{lora}", adapter_name="lora")',
            'pipe.set_adapters("lora", adapter_weights=1.0)  # 0.0 gives the base model back; or pipe.fuse_lora()',
        ]
    if text:
        call = (
            f'images = pipe(prompt=["a bold 7", "a thin three leaning left"], num_inference_steps={num_inference_steps}, '
            f"guidance_scale={guidance_scale}, generator=torch.manual_seed(0)).images"
        )
    elif num_classes:
        labels = list(range(min(num_classes, 4)))
        call = (
            f"images = pipe(class_labels={labels}, num_images_per_label=2, num_inference_steps={num_inference_steps}, "
            f"guidance_scale={guidance_scale}, generator=torch.manual_seed(0)).images"
        )
    else:
        call = f"images = pipe(num_images_per_label=4, num_inference_steps={num_inference_steps}, generator=torch.manual_seed(0)).images"
    if load == "registered":
        loading = [
            "from diffusers import DiffusionPipeline",
            "",
            "import pipelines  # registers this project's pipeline and component classes on diffusers",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")',
        ]
    elif load == "remote_code":
        loading = [
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)',
        ]
    else:
        raise ValueError(f"`load` must be 'registered' or 'remote_code', got {load!r}.")
    return "\n".join(["import torch", *loading, *adapter, call, 'images[0].save("sample.png")'])


def _usage_sections(pipeline, repo_id, num_classes, num_inference_steps, guidance_scale, text, code_files) -> list[str]:
    """How to load the repo: with the project installed, and, for a self-contained repo, with only diffusers."""
    settings = (repo_id, num_classes, num_inference_steps, guidance_scale)
    if not code_files:
        return [
            "With this project installed (`pip install .` in its repository), no `trust_remote_code` needed:",
            "```python\n" + _usage_snippet(*settings, text=text) + "\n```",
        ]
    denoiser = pipeline.denoiser_name
    files = ", ".join(f"`{name}`" for name in code_files)
    return [
        "With only diffusers installed (`pip install diffusers transformers peft`), `trust_remote_code=True` runs the "
        f"code this repo carries: {files}. It was generated from the scratch-diffusion project's source when the "
        "repo was pushed and imports only the standard library, torch, numpy, PIL, diffusers, transformers, peft, "
        "safetensors and huggingface_hub; read it before you trust it.",
        "```python\n" + _usage_snippet(*settings, text=text, load="remote_code") + "\n```",
        f'The denoiser alone: `AutoModel.from_pretrained("{repo_id}", subfolder="{denoiser}", '
        "trust_remote_code=True)` (`from diffusers import AutoModel`).",
        "With this project installed (`pip install .` in its repository), its own code loads the repo and nothing in "
        "the repo runs (no `trust_remote_code`):",
        "```python\n" + _usage_snippet(*settings, text=text) + "\n```",
    ]


def build_model_card(
    repo_id: str,
    pipeline=None,
    *,
    architecture: str | None = None,
    objective: str | None = None,
    dataset: str | None = None,
    metrics: list[dict] | None = None,
    license: str = "apache-2.0",
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    training_details: str | None = None,
    code_files: list[str] | None = None,
    space_id: str | None = None,
) -> ModelCard:
    """A Hub model card for a class-conditional or text-to-image pipeline.

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
        code_files: the generated code files of a self-contained repo (`push_to_hub`); the card then shows how to
            load it with only diffusers (`trust_remote_code=True`) and with the project installed.
        space_id: the Gradio Space serving the demo page for this repo (`push_to_hub(..., space_id=...)`), linked.
    """
    if code_files and pipeline is None:
        raise ValueError("`code_files` describe a pipeline's repo: pass `pipeline` too.")
    if pipeline is None and (architecture is None or objective is None):
        raise ValueError("Pass `pipeline`, or both `architecture` and `objective`.")
    architecture = architecture or infer_architecture(pipeline)
    objective = objective or infer_objective(pipeline)
    if objective not in OBJECTIVE_TAGS:
        raise ValueError(f"Unknown objective {objective!r}; choose one of {list(OBJECTIVE_TAGS)}.")
    metrics = _check_metrics(metrics)
    num_classes = pipeline.denoiser.config.num_classes if pipeline is not None else None
    text = pipeline is not None and hasattr(pipeline, "encode_prompt")
    model_name = repo_id.split("/")[-1]
    kind = "text-to-image" if text else "class-conditional" if num_classes else "unconditional"
    tags = ["diffusers", architecture, OBJECTIVE_TAGS[objective], kind]
    pipeline_tag = "text-to-image" if text else PIPELINE_TAG
    eval_results = None
    if metrics and dataset:
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
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
        pipeline_tag=pipeline_tag,
        tags=tags,
        datasets=[dataset] if dataset else None,
        model_name=model_name,
        eval_results=eval_results,
    )

    summary = f"{'An' if kind == 'unconditional' else 'A'} {kind} diffusion model with a {ARCHITECTURE_NAMES.get(architecture, architecture)} denoiser"
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
        f"![Samples{', one row per prompt' if text else ', one row per class' if num_classes else ''}]({SAMPLE_GRID_FILENAME})",
        *([f"Try it in the browser: [{space_id}](https://huggingface.co/spaces/{space_id})."] if space_id else []),
        "## Usage",
        *_usage_sections(pipeline, repo_id, num_classes, num_inference_steps, guidance_scale, text, code_files),
    ]
    sections += _metrics_section(metrics)
    if training_details:
        sections += ["## Training", training_details]
    details = (
        [] if text else [f"- Hub task tag: `{PIPELINE_TAG}` (the Hub has no class-conditional image generation task)."]
    )
    if pipeline is not None:
        details.insert(
            0,
            f"- Pipeline: `{pipeline.__class__.__name__}`, denoiser `{pipeline.denoiser.__class__.__name__}`, "
            f"scheduler `{pipeline.scheduler.__class__.__name__}`.",
        )
        if text:
            encoder = pipeline.text_encoder
            details.append(
                f"- Text encoder: `{type(encoder).__name__}` ({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M "
                f"parameters, width {encoder.config.hidden_size}), frozen; the empty prompt is the unconditional branch."
            )
        if pipeline.config.get("id2label"):
            names = ", ".join(f"{k}: {v}" for k, v in pipeline.config["id2label"].items())
            details.append(f"- Classes (`class_labels` accepts ids or these names): {names}.")
    sections += ["## Model details", "\n".join(details)]
    return _render(card_data, sections)


def _check_metrics(metrics: list[dict] | None) -> list[dict]:
    metrics = metrics or []
    for metric in metrics:
        if not {"name", "value", "num_samples"} <= set(metric):
            raise ValueError(f"Each metric needs 'name', 'value' and 'num_samples'; got {metric}.")
    return metrics


def _metrics_section(metrics: list[dict]) -> list[str]:
    if not metrics:
        return []
    rows = "\n".join(f"| {m['name']} | {m['value']:.4g} | {m['num_samples']} |" for m in metrics)
    return ["## Evaluation", "| metric | value | samples |\n|---|---|---|\n" + rows]


def _render(card_data: ModelCardData, sections: list[str]) -> ModelCard:
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def build_lora_model_card(
    repo_id: str,
    pipeline,
    *,
    base: str,
    lora_config,
    training_data: str,
    dataset: str | None = None,
    metrics: list[dict] | None = None,
    license: str = "apache-2.0",
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    training_details: str | None = None,
) -> ModelCard:
    """A Hub model card for a LoRA adapter of a class-conditional pipeline.

    Args:
        repo_id: the Hub repo of the adapter (used in the usage snippet).
        pipeline: the base pipeline with the adapter loaded into its denoiser (parameters counted from it).
        base: the base pipeline's folder or Hub id; a Hub id also becomes the card's `base_model`.
        lora_config: the adapter's peft `LoraConfig` (rank, alpha, dropout, target modules).
        training_data: what the adapter was trained on, in words.
        dataset, metrics, license, num_inference_steps, guidance_scale, training_details: as in `build_model_card`.
    """
    metrics = _check_metrics(metrics)
    denoiser = pipeline.denoiser
    architecture = infer_architecture(pipeline)
    trainable = sum(p.numel() for n, p in denoiser.named_parameters() if ".lora_" in n)
    base_count = sum(p.numel() for p in denoiser.parameters()) - trainable
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=["diffusers", "lora", architecture, "class-conditional"],
        base_model=None if Path(base).exists() else base,
        datasets=[dataset] if dataset else None,
        model_name=repo_id.split("/")[-1],
    )
    snippet = _usage_snippet(base, denoiser.config.num_classes, num_inference_steps, guidance_scale, lora=repo_id)
    rows = [
        ("Base model", f"`{base}`"),
        (
            "Denoiser",
            f"`{type(denoiser).__name__}` ({ARCHITECTURE_NAMES.get(architecture, architecture)}, "
            f"component `{pipeline.denoiser_name}`)",
        ),
        ("Rank / alpha / dropout", f"{lora_config.r} / {lora_config.lora_alpha} / {lora_config.lora_dropout}"),
        ("Target modules", ", ".join(f"`{m}`" for m in sorted(lora_config.target_modules))),
        ("Trainable parameters", f"{trainable:,} ({100 * trainable / base_count:.2f}% of the base's {base_count:,})"),
        ("Training data", training_data),
    ]
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"A LoRA adapter for the class-conditional diffusion pipeline `{base}`, trained on {training_data}. "
        f"It holds only the adapter weights (`pytorch_lora_weights.safetensors`, diffusers' LoRA format with its "
        f"`LoraConfig` in the file header).",
        f"![Samples with the adapter, one row per class]({SAMPLE_GRID_FILENAME})",
        "## Usage",
        "With this project installed (`pip install .` in its repository):",
        "```python\n" + snippet + "\n```",
        "## Adapter",
        "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows),
    ]
    sections += _metrics_section(metrics)
    if training_details:
        sections += ["## Training", training_details]
    return _render(card_data, sections)
