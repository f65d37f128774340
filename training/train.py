"""Train a class-conditional diffusion model: `accelerate launch -m training.train --config configs/<recipe>.yaml`.

Plain `python -m training.train ...` works too (one process). Any config key can be overridden as
`--section.key value` (see `training/config.py`). The run writes into `output_dir`:

    config.yaml           the resolved config
    metrics.csv           one row per epoch (loss, timings, memory, throughput, validation loss, metrics)
    logs/                 tensorboard
    samples/              a sample grid (one row per class) and a denoising GIF per evaluation
    checkpoints/          `checkpoint-<step>` folders for exact resumption
                          (`--checkpoint.resume_from_checkpoint latest`)
    last/, best/          pipeline folders that `DiffusionPipeline.from_pretrained` loads, with a model card

This file is the loop. What it trains comes from `training/setup.py` (a `TrainingSetup`; LoRA fine-tuning builds
its own), what it writes from `training/artifacts.py`, the checkpoints from `training/checkpointing.py`.
"""

import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from image_data import ShardedBatchSampler

from .artifacts import MetricsLog, card_metrics, peak_memory_mb, push_folder, save_sample_grid, tracker_config
from .checkpointing import (
    list_checkpoints,
    read_training_state,
    recover_directory,
    resolve_resume_path,
    save_checkpoint,
)
from .config import ConfigError, RunConfig, load_config, save_config
from .setup import (
    TrainingSetup,
    build_accelerator,
    build_ema,
    build_optimizer,
    build_pipeline,
    build_training_setup,
    idle_cpu_cores_hint,
    to_model_space,
)


class TrainingCallback:
    """Hooks into the loop (tests use them to log the data order, dump weights or kill the process); every
    method is called on every process and does nothing by default."""

    def on_micro_batch(self, *, rank: int, epoch: int, step: int, indices: list[int]) -> None:
        """Before each micro-batch: the dataset indices this process trains on."""

    def before_checkpoint_commit(self, *, step: int, folder: Path) -> None:
        """Main process only: checkpoint `step` is on disk in `folder` but not yet renamed into place."""

    def on_train_end(self, *, rank: int, model: torch.nn.Module, ema) -> None:
        """After the last step, before the final checkpoint: the trained (unwrapped) model and the EMA or None."""


def step_generator(*counters: int) -> torch.Generator:
    """A CPU generator seeded from (seed, rank, epoch, micro-batch, ...): the step's randomness, the same on resume."""
    seed = np.random.SeedSequence([int(c) for c in counters]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


# --------------------------------------------------------------------------------------------------
# Evaluation and the best-checkpoint rule
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model, objective, batches, vae, seed: int) -> float:
    """Mean objective over fixed validation batches with fixed noise: comparable across evaluations."""
    total, count = 0.0, 0
    for index, (pixel_values, class_labels) in enumerate(batches):
        generator = step_generator(seed, index)
        clean = to_model_space(pixel_values, vae, generator)
        loss = objective(model, clean, class_labels, generator)
        total += loss.item() * pixel_values.shape[0]
        count += pixel_values.shape[0]
    return total / count


def quality_metrics(pipeline, eval_config) -> dict:
    """FID-MNIST / GAN-test accuracy / ... from `evaluation` (imported only when asked for)."""
    from evaluation import evaluate_pipeline

    return evaluate_pipeline(
        pipeline,
        num_samples_per_class=eval_config.fid_n,
        num_inference_steps=eval_config.num_inference_steps,
        guidance_scale=eval_config.guidance_scale,
        seed=eval_config.seed,
        batch_size=eval_config.batch_size,
    )


def improves_on(best: dict, results: dict) -> tuple[str, float | None] | None:
    """The criterion `(name, value)` of `results` if they make a new best, else None.

    FID when measured, else the validation loss; lower is better. A change of criterion, or an evaluation with
    neither, makes the newest evaluation the best.
    """
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
    epoch: int,
    step: int,
    best: dict,
    validation_batches: list,
    details: str,
    accelerator: Accelerator,
) -> tuple[dict, dict]:
    """Main process: sample grid (and GIF), validation loss, metrics, `last/` and, if better, `best/`.

    Returns (the epoch's metrics row entries, the best record after this evaluation).
    """
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    name = f"epoch_{epoch:04d}"
    gif_path = output_dir / "samples" / f"{name}.gif" if config.eval.gif else None
    num_classes = setup.train_dataset.num_classes
    grid = save_sample_grid(pipeline, config.eval, num_classes, output_dir / "samples" / f"{name}.png", gif_path)
    results, metrics = {}, {}
    if validation_batches:
        results["val_loss"] = validation_loss(
            pipeline.denoiser, setup.objective, validation_batches, setup.vae, config.eval.seed
        )
    if config.eval.fid_n > 0:
        metrics = quality_metrics(pipeline, config.eval)
        results.update(
            fid=metrics.get("fid_mnist", metrics.get("fid")),
            gan_test_acc=metrics.get("gan_test_acc"),
            inception_score=metrics.get("inception_score"),
            metric_num_samples=metrics.get("num_samples"),
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


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def train(config: RunConfig, build_setup=build_training_setup, callbacks: list[TrainingCallback] = ()) -> Path:
    """Run training as configured; returns the output folder. `build_setup(config, accelerator)` supplies the data
    and the model (default: a new denoiser from `config.model`); `callbacks` hook into the loop."""
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(config)
    rank, num_processes, seed = accelerator.process_index, accelerator.num_processes, config.train.seed
    resume_path = resolve_resume_path(config.checkpoint.resume_from_checkpoint, output_dir)
    if resume_path is None and list_checkpoints(output_dir):
        raise ConfigError(
            f"{output_dir} already holds checkpoints of an earlier run ({list_checkpoints(output_dir)[-1].name}); "
            "continue it with --checkpoint.resume_from_checkpoint latest, or choose another output_dir."
        )

    setup = build_setup(config, accelerator)
    model, train_dataset = setup.model, setup.train_dataset
    set_seed(seed, device_specific=True)  # different dropout masks per process; a resume restores the RNG states
    if model.config.learn_sigma:
        raise ConfigError(
            "model.overrides.learn_sigma: training a learned variance needs the VLB loss term, which "
            "this loop does not implement; set learn_sigma to false."
        )
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.eval.fid_n > 0:
        import evaluation  # noqa: F401  (fail now, not after the first epoch)

    accum = config.train.gradient_accumulation_steps
    batch_sampler = ShardedBatchSampler(
        len(train_dataset),
        config.train.batch_size,
        seed=seed,
        rank=rank,
        num_processes=num_processes,
        gradient_accumulation_steps=accum,
    )
    steps_per_epoch = batch_sampler.steps_per_epoch
    total_steps = config.train.num_epochs * steps_per_epoch
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_sampler=batch_sampler,
        num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating an iterator must not consume the global RNG that checkpoints restore.
        generator=torch.Generator().manual_seed(seed),
    )
    # The lr scheduler is not passed to `prepare`: stepped once per optimizer step, whatever the process count.
    optimizer, lr_scheduler = build_optimizer(config.optim, model, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = build_ema(config.ema, unwrapped)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    global_step, best = 0, {"name": None, "value": None}
    if accelerator.is_main_process:
        for folder in ("last", "best"):
            recover_directory(output_dir / folder)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        if ema is not None:
            ema.to(accelerator.device)  # accelerate loads registered objects onto the CPU
        state = read_training_state(resume_path)
        global_step, best = state["step"], state["best"]
        if state["steps_per_epoch"] != steps_per_epoch:
            accelerator.print(
                f"Warning: {resume_path} was written with {state['steps_per_epoch']} steps per epoch, this run has "
                f"{steps_per_epoch} (batch size or process count changed): the data order will not match exactly."
            )
        accelerator.print(f"Resumed from {resume_path} at step {global_step}.")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        (output_dir / "samples").mkdir(exist_ok=True)
    if config.train.report_to != "none":
        accelerator.init_trackers("train", config=tracker_config(config))
    metrics_log = MetricsLog(output_dir / "metrics.csv", accelerator, resume_step=global_step)
    # Evaluation state lives on the main process only: a copy of the model that receives the EMA weights.
    eval_model = copy.deepcopy(unwrapped).eval().requires_grad_(False) if accelerator.is_main_process else None
    validation_batches = _validation_batches(setup, config, accelerator)
    global_batch = config.train.batch_size * num_processes * accum
    accelerator.print(
        f"{type(unwrapped).__name__} ({sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters), "
        f"{len(train_dataset)} images, {steps_per_epoch} steps/epoch x {num_epochs} epochs = {total_steps} steps, "
        f"global batch {global_batch}, {num_processes} process(es) on {accelerator.device}, mixed precision "
        f"{accelerator.mixed_precision}."
    )
    if hint := idle_cpu_cores_hint(accelerator.device, num_processes):
        accelerator.print(hint)

    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps")
    for epoch in range(global_step // steps_per_epoch, num_epochs):
        if global_step >= total_steps:
            break
        steps_done_in_epoch = global_step - epoch * steps_per_epoch
        batch_sampler.set_epoch(epoch, skip_batches=steps_done_in_epoch * accum)
        model.train()
        epoch_loss, epoch_steps, window_losses, micro_loss = 0.0, 0, [], 0.0
        epoch_started = time.perf_counter()
        for batch_index, batch in enumerate(dataloader, start=steps_done_in_epoch * accum):
            indices = batch_sampler.batches[batch_index]
            for callback in callbacks:
                callback.on_micro_batch(rank=rank, epoch=epoch, step=global_step, indices=indices)
            generator = step_generator(seed, rank, epoch, batch_index)
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            class_labels = batch["class_labels"].to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                clean = to_model_space(pixel_values, setup.vae, generator)
                loss = setup.objective(model, clean, class_labels, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_loss += loss.item() / accum
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            if ema is not None:
                ema.step(unwrapped.parameters())
            global_step += 1
            epoch_loss, epoch_steps = epoch_loss + micro_loss, epoch_steps + 1
            window_losses.append(micro_loss)
            micro_loss = 0.0
            progress.update(1)
            if global_step % config.train.log_every_steps == 0 or global_step == total_steps:
                _log_window(accelerator, progress, lr_scheduler, window_losses, global_step)
                window_losses = []
            # The last step's checkpoint waits until after the final evaluation, so that it records the best result.
            every = config.checkpoint.every_steps
            if every and global_step % every == 0 and global_step < total_steps:
                _checkpoint(accelerator, config, global_step, best, steps_per_epoch, callbacks)
            if global_step >= total_steps:
                break

        train_time = time.perf_counter() - epoch_started
        mean_loss = torch.tensor(epoch_loss / max(epoch_steps, 1), device=accelerator.device)
        mean_loss = accelerator.reduce(mean_loss, "mean")
        row = {
            "epoch": epoch,
            "step": global_step,
            "loss": mean_loss.item(),
            "lr": lr_scheduler.get_last_lr()[0],
            "epoch_time_s": train_time,
            "step_time_ms": 1000 * train_time / max(epoch_steps, 1),
            "peak_mem_mb": peak_memory_mb(accelerator.device),
            "imgs_per_sec": epoch_steps * global_batch / train_time,
        }
        if (epoch + 1) % config.eval.every_epochs == 0 or global_step >= total_steps:
            if accelerator.is_main_process:
                if ema is not None:
                    ema.copy_to(eval_model.parameters())
                else:
                    eval_model.load_state_dict(unwrapped.state_dict())
                pipeline = build_pipeline(
                    setup.architecture, eval_model, setup.sampling_scheduler, setup.vae, setup.train_dataset.id2label
                )
                pipeline.set_progress_bar_config(disable=True)
                details = (
                    f"Recipe config in `training_config.yaml`: {setup.description}, {global_step} optimizer steps "
                    f"({epoch + 1} epochs) at global batch {global_batch} on {num_processes} x "
                    f"{accelerator.device.type}; EMA weights: {ema is not None}."
                )
                results, best = evaluate(
                    pipeline,
                    setup=setup,
                    config=config,
                    epoch=epoch,
                    step=global_step,
                    best=best,
                    validation_batches=validation_batches,
                    details=details,
                    accelerator=accelerator,
                )
                row.update(results)
            accelerator.wait_for_everyone()
        metrics_log.log_epoch(row)

    progress.close()
    for callback in callbacks:
        callback.on_train_end(rank=rank, model=unwrapped, ema=ema)
    if config.checkpoint.every_steps:
        # The final state, for continuing with more epochs later.
        _checkpoint(accelerator, config, global_step, best, steps_per_epoch, callbacks)
    if config.hub.push_to_hub and accelerator.is_main_process:
        push_folder(output_dir / "best", config.hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def _checkpoint(accelerator, config: RunConfig, step: int, best: dict, steps_per_epoch: int, callbacks) -> None:
    """Checkpoint `step` with the loop's counters (the best record, the epoch length) beside accelerate's state."""

    def before_commit(step: int, folder: Path) -> None:
        for callback in callbacks:
            callback.before_checkpoint_commit(step=step, folder=folder)

    save_checkpoint(
        accelerator,
        config.output_dir,
        step,
        {"best": best, "steps_per_epoch": steps_per_epoch, "epoch": step // steps_per_epoch},
        total_limit=config.checkpoint.checkpoints_total_limit,
        before_commit=before_commit,
    )


def _validation_batches(setup: TrainingSetup, config: RunConfig, accelerator: Accelerator) -> list:
    """The main process's fixed validation batches on the device (none elsewhere, or without a validation set)."""
    if not accelerator.is_main_process or setup.validation_dataset is None:
        return []
    loader = torch.utils.data.DataLoader(
        setup.validation_dataset,
        batch_size=config.eval.batch_size,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    device = accelerator.device
    return [(batch["pixel_values"].to(device), batch["class_labels"].to(device)) for batch in loader]


def _log_window(accelerator: Accelerator, progress, lr_scheduler, window_losses: list[float], step: int) -> None:
    """The mean loss of the steps since the last log, averaged over processes, to the progress bar and trackers."""
    window_loss = accelerator.reduce(torch.tensor(np.mean(window_losses), device=accelerator.device), "mean").item()
    learning_rate = lr_scheduler.get_last_lr()[0]
    progress.set_postfix(loss=f"{window_loss:.4f}", lr=f"{learning_rate:.2e}")
    accelerator.log({"train/loss": window_loss, "train/lr": learning_rate}, step=step)


def main(argv: list[str] | None = None) -> Path:
    """Parse `--config recipe.yaml --section.key value ...` and train."""
    return train(load_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    from commands import run

    run(main)
