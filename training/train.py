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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from image_data import ShardedBatchSampler

from .artifacts import MetricsLog, card_metrics, peak_memory_mb, push_folder, save_sample_grid, tracker_config
from .checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    read_training_state,
    recover_directory,
    remove_leftovers,
    resolve_resume_path,
    restore_metrics_log,
    save_checkpoint,
)
from .config import ConfigError, RunConfig, load_config, parse_yaml, save_config, to_dict
from .run_folder import RunLock, changed_settings, check_fresh_output_dir, check_resume_settings
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
class TrainingDivergedError(ValueError):
    """The loss or the weights became NaN or infinite: the settings (learning rate, ...) made the run diverge."""


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint beside accelerate's state."""

    step: int = 0
    best: dict = field(default_factory=lambda: {"name": None, "value": None})
    # The current epoch so far (process-mean losses): a resumed epoch's metrics row still covers all its steps.
    epoch_loss_sum: float = 0.0
    epoch_steps: int = 0
    epoch_time_s: float = 0.0


def train(config: RunConfig, build_setup=build_training_setup, callbacks: list[TrainingCallback] = ()) -> Path:
    """Run training as configured; returns the output folder. `build_setup(config, accelerator)` supplies the data
    and the model (default: a new denoiser from `config.model`); `callbacks` hook into the loop."""
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(config)
    rank, num_processes, seed = accelerator.process_index, accelerator.num_processes, config.train.seed
    lock = RunLock(output_dir)
    resume_path = _claim_output_dir(config, accelerator, lock)
    try:
        setup = build_setup(config, accelerator)
        model, train_dataset = setup.model, setup.train_dataset
        set_seed(seed, device_specific=True)  # different dropout masks per process; a resume restores the RNG states
        _prepare_model(config, model)
        accum = config.train.gradient_accumulation_steps
        batch_sampler, dataloader = _training_data(config, train_dataset, accelerator)
        steps_per_epoch = batch_sampler.steps_per_epoch
        total_steps = config.train.num_epochs * steps_per_epoch
        if config.train.max_steps is not None:
            total_steps = min(total_steps, config.train.max_steps)
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        # The lr scheduler is not passed to `prepare`: stepped once per optimizer step, whatever the process count.
        optimizer, lr_scheduler = build_optimizer(config.optim, model, total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        ema = build_ema(config.ema, unwrapped)
        state = LoopState()
        if resume_path is not None:
            state = _resume(accelerator, resume_path, config, lr_scheduler, ema, steps_per_epoch)

        if accelerator.is_main_process:
            save_config(config, output_dir / "config.yaml")
            (output_dir / "samples").mkdir(exist_ok=True)
        if config.train.report_to != "none":
            accelerator.init_trackers("train", config=tracker_config(config))
        metrics_log = MetricsLog(output_dir / "metrics.csv", accelerator, fresh=resume_path is None)
        # Evaluation state lives on the main process only: a copy of the model that receives the EMA weights.
        eval_model = copy.deepcopy(unwrapped).eval().requires_grad_(False) if accelerator.is_main_process else None
        validation_batches = _validation_batches(setup, config, accelerator)
        global_batch = config.train.batch_size * num_processes * accum
        accelerator.print(
            f"{type(unwrapped).__name__} ({sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters), "
            f"{len(train_dataset)} images, {steps_per_epoch} steps/epoch x {num_epochs} epochs = {total_steps} "
            f"steps, global batch {global_batch}, {num_processes} process(es) on {accelerator.device}, mixed "
            f"precision {accelerator.mixed_precision}."
        )
        if hint := idle_cpu_cores_hint(accelerator.device, num_processes):
            accelerator.print(hint)

        def checkpoint() -> None:
            _checkpoint(accelerator, config, state, unwrapped, lr_scheduler, ema, steps_per_epoch, callbacks)

        every = config.checkpoint.every_steps
        progress = tqdm(
            total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="steps"
        )
        for epoch in range(state.step // steps_per_epoch, num_epochs):
            if state.step >= total_steps:
                break
            steps_done_in_epoch = state.step - epoch * steps_per_epoch
            batch_sampler.set_epoch(epoch, skip_batches=steps_done_in_epoch * accum)
            model.train()
            window_losses, micro_loss, started = [], 0.0, time.perf_counter()
            for batch_index, batch in enumerate(dataloader, start=steps_done_in_epoch * accum):
                for callback in callbacks:
                    callback.on_micro_batch(
                        rank=rank, epoch=epoch, step=state.step, indices=batch_sampler.batches[batch_index]
                    )
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
                step_loss = _process_mean(accelerator, micro_loss)
                if not math.isfinite(step_loss):
                    raise _diverged(f"The loss became {step_loss}", state.step + 1, output_dir)
                lr_scheduler.step()
                if ema is not None:
                    ema.step(unwrapped.parameters())
                state.step += 1
                state.epoch_loss_sum, state.epoch_steps = state.epoch_loss_sum + step_loss, state.epoch_steps + 1
                window_losses.append(step_loss)
                micro_loss = 0.0
                progress.update(1)
                if state.step % config.train.log_every_steps == 0 or state.step == total_steps:
                    _log_window(accelerator, progress, lr_scheduler, window_losses, state.step)
                    window_losses = []
                # A checkpoint at the end of an epoch waits for the epoch's metrics row (and the one at the last
                # step for the final evaluation), so that it holds them.
                if every and state.step % every == 0 and state.step % steps_per_epoch and state.step < total_steps:
                    state.epoch_time_s, started = state.epoch_time_s + time.perf_counter() - started, None
                    checkpoint()
                    started = time.perf_counter()
                if state.step >= total_steps:
                    break

            state.epoch_time_s += time.perf_counter() - started
            row = _epoch_row(accelerator, state, epoch, lr_scheduler, global_batch)
            if (epoch + 1) % config.eval.every_epochs == 0 or state.step >= total_steps:
                if accelerator.is_main_process:
                    pipeline = _evaluation_pipeline(setup, eval_model, unwrapped, ema)
                    details = (
                        f"Recipe config in `training_config.yaml`: {setup.description}, {state.step} optimizer "
                        f"steps ({epoch + 1} epochs) at global batch {global_batch} on {num_processes} x "
                        f"{accelerator.device.type}; EMA weights: {ema is not None}."
                    )
                    kwargs = dict(validation_batches=validation_batches, details=details, accelerator=accelerator)
                    results, state.best = evaluate(
                        pipeline, setup=setup, config=config, epoch=epoch, step=state.step, best=state.best, **kwargs
                    )
                    row.update(results)
                accelerator.wait_for_everyone()
            metrics_log.log_epoch(row)
            state.epoch_loss_sum, state.epoch_steps, state.epoch_time_s = 0.0, 0, 0.0
            if every and state.step % every == 0 and state.step < total_steps:
                checkpoint()

        progress.close()
        for callback in callbacks:
            callback.on_train_end(rank=rank, model=unwrapped, ema=ema)
        if every:
            checkpoint()  # the final state, for continuing with more epochs later
        push_error = None
        if config.hub.push_to_hub and accelerator.is_main_process:
            push_error = _push_best(output_dir, config.hub, accelerator)
        accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        if accelerator.is_main_process:
            lock.release()
    if push_error is not None:
        raise push_error
    return output_dir


# --------------------------------------------------------------------------------------------------
# The loop's steps, as functions of explicit inputs
# --------------------------------------------------------------------------------------------------
def _claim_output_dir(config: RunConfig, accelerator: Accelerator, lock: RunLock) -> Path | None:
    """Lock `output_dir` (main process), finish what a killed run left half done, check the checkpoint to resume
    from (or that no earlier run's outputs are in the way); returns the checkpoint, on every process."""
    error, resume_path = None, None
    if accelerator.is_main_process:
        try:
            resume_path = _claim_on_main_process(config, lock, accelerator.print)
        except ValueError as exc:
            error = exc
    shared = broadcast_object_list([None if error is None else str(error), resume_path and str(resume_path)])
    if error is not None:
        raise error
    if shared[0] is not None:
        raise ConfigError(shared[0])
    return None if shared[1] is None else Path(shared[1])


def _claim_on_main_process(config: RunConfig, lock: RunLock, say) -> Path | None:
    output_dir = Path(config.output_dir)
    if note := lock.acquire():
        say(note)
    try:
        for name in remove_leftovers(output_dir):
            say(f"Removed {output_dir / name}, left half-written by a killed run.")
        for folder in ("last", "best"):
            recover_directory(output_dir / folder)
        resume_path, skipped = resolve_resume_path(config.checkpoint.resume_from_checkpoint, output_dir)
        for name, reason in skipped:
            say(f"Warning: not resuming from {name}, the newest checkpoint: {reason}")
        if resume_path is not None:
            check_resume_settings(resume_path, read_training_state(resume_path)["config"], to_dict(config))
            return resume_path
        # `latest` with nothing to resume from starts afresh; over this run's own earlier start only.
        restart = config.checkpoint.resume_from_checkpoint == "latest" and _same_run(output_dir, config)
        removed = check_fresh_output_dir(output_dir, overwrite=config.overwrite, restart_of_same_run=restart)
        if removed:
            why = "--overwrite" if config.overwrite else "the same run started again before its first checkpoint"
            say(f"Removed the earlier outputs {removed} from {output_dir} ({why}).")
        return None
    except BaseException:
        lock.release()
        raise


def _same_run(output_dir: Path, config: RunConfig) -> bool:
    """Whether `output_dir/config.yaml` is this run's config (up to the settings a resume may change)."""
    try:
        saved = parse_yaml((output_dir / "config.yaml").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and not changed_settings(saved, to_dict(config))


def _prepare_model(config: RunConfig, model) -> None:
    if model.config.learn_sigma:
        raise ConfigError(
            "model.overrides.learn_sigma: training a learned variance needs the VLB loss term, which "
            "this loop does not implement; set learn_sigma to false."
        )
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.eval.fid_n > 0:
        import evaluation  # noqa: F401  (fail now, not after the first epoch)


def _training_data(config: RunConfig, train_dataset, accelerator: Accelerator):
    """This process's shard of every epoch (resumable mid-epoch) and the DataLoader reading it."""
    batch_sampler = ShardedBatchSampler(
        len(train_dataset),
        config.train.batch_size,
        seed=config.train.seed,
        rank=accelerator.process_index,
        num_processes=accelerator.num_processes,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
    )
    dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_sampler=batch_sampler,
        num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating an iterator must not consume the global RNG that checkpoints restore.
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    return batch_sampler, dataloader


def _resume(accelerator, checkpoint: Path, config: RunConfig, lr_scheduler, ema, steps_per_epoch: int) -> LoopState:
    """Restore a checked checkpoint (weights, optimizer, RNG, lr scheduler, EMA, metrics.csv) and its counters."""
    saved = load_checkpoint(accelerator, checkpoint, lr_scheduler=lr_scheduler, ema=ema)
    if ema is not None:
        ema.to(accelerator.device)
    if saved["num_processes"] != accelerator.num_processes or saved["steps_per_epoch"] != steps_per_epoch:
        accelerator.print(
            f"Warning: {checkpoint} was written by {saved['num_processes']} process(es) with "
            f"{saved['steps_per_epoch']} steps per epoch; this run has {accelerator.num_processes} and "
            f"{steps_per_epoch}: the data order and the random states will not match the interrupted run."
        )
    if accelerator.is_main_process:
        restore_metrics_log(checkpoint, config.output_dir)
    accelerator.print(f"Resumed from {checkpoint} at step {saved['step']}.")
    return LoopState(step=saved["step"], best=saved["best"], **saved["epoch_progress"])


def _checkpoint(accelerator, config, state: LoopState, model, lr_scheduler, ema, steps_per_epoch, callbacks) -> None:
    """Checkpoint the current step with the loop's counters and the run's config."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise _diverged(f"The weights {bad[:3]} became non-finite", state.step, config.output_dir)

    def before_commit(step: int, folder: Path) -> None:
        for callback in callbacks:
            callback.before_checkpoint_commit(step=step, folder=folder)

    progress = {"epoch_loss_sum": state.epoch_loss_sum, "epoch_steps": state.epoch_steps}
    save_checkpoint(
        accelerator,
        config.output_dir,
        state.step,
        {
            "best": state.best,
            "steps_per_epoch": steps_per_epoch,
            "epoch": state.step // steps_per_epoch,
            "epoch_progress": {**progress, "epoch_time_s": state.epoch_time_s},
            "config": to_dict(config),
        },
        lr_scheduler=lr_scheduler,
        ema=ema,
        total_limit=config.checkpoint.checkpoints_total_limit,
        before_commit=before_commit,
    )


def _diverged(what: str, step: int, output_dir) -> TrainingDivergedError:
    latest = latest_checkpoint(output_dir)
    kept = f"the last checkpoint, {latest}, is kept as it was" if latest else "no checkpoint was written"
    return TrainingDivergedError(
        f"{what} at optimizer step {step}: the run diverged and stopped ({kept}; nothing non-finite was saved). "
        "Lower optim.learning_rate, keep optim.max_grad_norm set, or add warm-up (optim.lr_warmup_steps)."
    )


def _process_mean(accelerator: Accelerator, value: float) -> float:
    """The mean of a number over processes (every process gets the same value, so all stop together)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean").item()


def _epoch_row(accelerator, state: LoopState, epoch: int, lr_scheduler, global_batch: int) -> dict:
    steps, seconds = max(state.epoch_steps, 1), max(state.epoch_time_s, 1e-9)
    return {
        "epoch": epoch,
        "step": state.step,
        "loss": state.epoch_loss_sum / steps,
        "lr": lr_scheduler.get_last_lr()[0],
        "epoch_time_s": state.epoch_time_s,
        "step_time_ms": 1000 * state.epoch_time_s / steps,
        "peak_mem_mb": peak_memory_mb(accelerator.device),
        "imgs_per_sec": state.epoch_steps * global_batch / seconds,
    }


def _evaluation_pipeline(setup: TrainingSetup, eval_model, model, ema):
    """A pipeline around the evaluation copy of the model, holding the EMA weights (or the trained ones)."""
    if ema is not None:
        ema.copy_to(eval_model.parameters())
    else:
        eval_model.load_state_dict(model.state_dict())
    pipeline = build_pipeline(
        setup.architecture, eval_model, setup.sampling_scheduler, setup.vae, setup.train_dataset.id2label
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _push_best(output_dir: Path, hub_config, accelerator) -> Exception | None:
    """Push `best/` to the Hub; a failure (unreachable Hub, no token, ...) keeps the outputs and says how to retry."""
    try:
        accelerator.print(f"Pushed {output_dir / 'best'}: {push_folder(output_dir / 'best', hub_config)}")
        return None
    except Exception as error:  # any network or Hub error: training itself succeeded and is kept
        return HubPushError(
            f"Training finished, but pushing {output_dir / 'best'} to {hub_config.hub_model_id} failed "
            f"({type(error).__name__}: {error}). Every output is kept in {output_dir}; push it later with "
            f"`hf upload {hub_config.hub_model_id} {output_dir / 'best'} .`."
        )


class HubPushError(ValueError):
    """Training finished but its push to the Hub failed; the outputs are kept."""


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
    """The mean loss of the steps since the last log (process means already) to the progress bar and trackers."""
    window_loss = float(np.mean(window_losses))
    learning_rate = lr_scheduler.get_last_lr()[0]
    progress.set_postfix(loss=f"{window_loss:.4f}", lr=f"{learning_rate:.2e}")
    accelerator.log({"train/loss": window_loss, "train/lr": learning_rate}, step=step)


def main(argv: list[str] | None = None) -> Path:
    """Parse `--config recipe.yaml --section.key value ...` and train."""
    return train(load_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    from commands import run

    run(main)
