"""The loop's evaluation step and the best-checkpoint rule: on the main process, every `eval.every_epochs` (and
`eval.every_steps`), a sample grid (and GIF), the validation loss, optional quality metrics, `last/` and, when
better, `best/`. Everything it needs comes in as arguments; it returns the metrics and the new best record.
"""

import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from .artifacts import card_metrics, save_sample_grid
from .config import RunConfig
from .setup import TrainingSetup, build_pipeline, step_generator, to_model_space


@torch.no_grad()
def validation_loss(model, objective, batches, vae, seed: int) -> float:
    """Mean objective over fixed validation batches with fixed noise: comparable across evaluations."""
    total, count = 0.0, 0
    for index, (pixel_values, condition) in enumerate(batches):
        generator = step_generator(seed, index)
        clean = to_model_space(pixel_values, vae, generator)
        loss = objective(model, clean, condition, generator)
        total += loss.item() * pixel_values.shape[0]
        count += pixel_values.shape[0]
    return total / count


def quality_metrics(pipeline, eval_config, reference_dataset=None) -> dict:
    """FID-MNIST / GAN-test accuracy / ... on MNIST, Inception FID / KID against `reference_dataset` (other data), or
    prompt adherence (text models), from `evaluation` (imported only when asked for)."""
    from evaluation import evaluate_pipeline
    from evaluation.inception_fid import inception_metrics
    from evaluation.metrics import generate_samples

    settings = dict(
        num_samples_per_class=eval_config.fid_n,
        num_inference_steps=eval_config.num_inference_steps,
        guidance_scale=eval_config.guidance_scale,
        seed=eval_config.seed,
        batch_size=eval_config.batch_size,
    )
    if hasattr(pipeline, "encode_prompt"):  # a text model: prompt adherence on the training phrasings
        from evaluation.prompt_adherence import prompt_adherence

        results = prompt_adherence(
            pipeline,
            images_per_prompt=eval_config.fid_n,
            num_inference_steps=eval_config.num_inference_steps,
            guidance_scale=eval_config.guidance_scale,
            seed=eval_config.seed,
            batch_size=max(1, eval_config.batch_size // eval_config.fid_n),  # prompts per call
        )
        return {**results, "gan_test_acc": results["digit_accuracy"]}
    if reference_dataset is None:
        return evaluate_pipeline(pipeline, **settings)
    images, _ = generate_samples(pipeline, **settings)
    results = inception_metrics(
        images, reference_dataset, device=pipeline.device, num_reference_samples=eval_config.fid_reference_samples
    )
    return {**results, "num_samples": results["inception_fid_num_samples"]}


def improves_on(best: dict, results: dict) -> tuple[str, float | None] | None:
    """The criterion `(name, value)` of `results` if they make a new best, else None.

    FID when measured, else the validation loss; lower is better. A change of criterion, or an evaluation with
    neither, makes the newest evaluation the best. Samples with NaN pixels never make a best.
    """
    if results.get("metric_nonfinite_samples"):
        return None
    criterion = ("fid", results["fid"]) if results.get("fid") is not None else ("val_loss", results.get("val_loss"))
    name, value = criterion
    if value is None or best["value"] is None or best["name"] != name or value <= best["value"]:
        return criterion
    return None


def evaluate(
    pipeline,
    *,
    setup: TrainingSetup,
    config: RunConfig,
    step: int,
    sample_name: str,
    best: dict,
    validation_batches: list,
    details: str,
    accelerator: Accelerator,
) -> tuple[dict, dict]:
    """Main process: sample grid (and GIF), validation loss, metrics, `last/` and, if better, `best/`.

    The grid (and GIF) are saved as `samples/<sample_name>.png` (`.gif`). Returns (the metrics row's entries, the
    best record after this evaluation).
    """
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    gif_path = output_dir / "samples" / f"{sample_name}.gif" if config.eval.gif else None
    num_classes = setup.train_dataset.num_classes
    grid = save_sample_grid(pipeline, config.eval, num_classes, output_dir / "samples" / f"{sample_name}.png", gif_path)
    results, metrics = {}, {}
    if validation_batches:
        results["val_loss"] = validation_loss(
            pipeline.denoiser, setup.objective, validation_batches, setup.vae, config.eval.seed
        )
    if config.eval.fid_n > 0:
        metrics = quality_metrics(pipeline, config.eval, setup.reference_dataset)
        results.update(
            fid=metrics.get("fid_mnist", metrics.get("inception_fid")),
            gan_test_acc=metrics.get("gan_test_acc"),
            thickness_acc=metrics.get("thickness_accuracy"),
            slant_acc=metrics.get("slant_accuracy"),
            inception_score=metrics.get("inception_score"),
            metric_num_samples=metrics.get("num_samples"),
            metric_nonfinite_samples=metrics.get("num_nonfinite_samples"),
        )
    card = card_metrics(metrics)
    setup.save_folder(pipeline, output_dir / "last", config=config, grid=grid, metrics=card, details=details)
    criterion = improves_on(best, results)
    if criterion is not None:
        best = {"name": criterion[0], "value": criterion[1], "step": step}
        setup.save_folder(pipeline, output_dir / "best", config=config, grid=grid, metrics=card, details=details)
    values = {f"eval/{k}": v for k, v in {**metrics, **results}.items() if isinstance(v, (int, float))}
    accelerator.log(values, step=step)
    if config.train.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    results["eval_time_s"] = time.perf_counter() - started
    return results, best


@torch.no_grad()
def evaluation_pipeline(setup: TrainingSetup, eval_model, weights: list[torch.Tensor]):
    """A pipeline around the evaluation copy of the model, holding `weights` (the EMA's or the trained ones, whole,
    in `parameters()` order)."""
    for parameter, weight in zip(eval_model.parameters(), weights, strict=True):
        parameter.copy_(weight)
    pipeline = build_pipeline(
        setup.architecture,
        eval_model,
        setup.sampling_scheduler,
        setup.vae,
        setup.train_dataset.id2label,
        objective=setup.pipeline_objective,
        text=setup.text_components,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def validation_batches(setup: TrainingSetup, config: RunConfig, accelerator: Accelerator) -> list:
    """The main process's fixed validation batches on the device (none elsewhere, or without a validation set)."""
    if not accelerator.is_main_process or setup.validation_dataset is None:
        return []
    loader = torch.utils.data.DataLoader(
        setup.validation_dataset,
        batch_size=config.eval.batch_size,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    device = accelerator.device
    conditional = setup.train_dataset.num_classes is not None

    def condition(batch):
        if setup.condition is not None:
            return setup.condition(batch, device)  # every caption, none dropped
        return batch["class_labels"].to(device) if conditional else None

    return [(batch["pixel_values"].to(device), condition(batch)) for batch in loader]
