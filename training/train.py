"""Train a diffusion model, class-conditional (unconditional on unlabelled images):
`accelerate launch -m training.train --config configs/<recipe>.yaml`.

Plain `python -m training.train ...` works too (one process). Any config key can be overridden as
`--section.key value` (see `training/config.py`). The run writes into `output_dir`:

    config.yaml           the resolved config
    metrics.csv           one row per epoch, and per `eval.every_steps` evaluation inside one (loss, timings,
                          memory, throughput, validation loss, metrics; the rows' epoch_time_s add up to the
                          training time)
    logs/                 tensorboard
    samples/              a sample grid (one row per class) and a denoising GIF per evaluation
    checkpoints/          `checkpoint-<step>` folders for exact resumption
                          (`--checkpoint.resume_from_checkpoint latest`), checked file by file before use
    last/, best/          pipeline folders that `DiffusionPipeline.from_pretrained` loads, with a model card
    .run.lock             held while the run runs: a second run into the same folder is refused

A fresh run refuses a folder holding an earlier run's outputs (`--overwrite` replaces them); a resumed run refuses
settings that differ from the checkpoint's run; a NaN or infinite loss stops the run with the last checkpoint kept.

This file is the loop. What it trains comes from `training/setup.py` (a `TrainingSetup`; LoRA fine-tuning builds
its own), the evaluation step from `training/evaluation_step.py`, what it writes from `training/artifacts.py`, the
checkpoints from `training/checkpointing.py`, the output folder's rules from `training/run_folder.py`.
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
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from image_data import ShardedBatchSampler

from .artifacts import MetricsLog, peak_memory_mb, push_folder, tracker_config
from .checkpointing import latest_checkpoint, load_checkpoint, restore_metrics_log, save_checkpoint
from .config import ConfigError, RunConfig, load_config, save_config, to_dict
from .evaluation_step import evaluate, evaluation_pipeline, validation_batches
from .fsdp import full_tensors, local_tensor
from .run_folder import RunLock, claim_output_dir
from .setup import (
    build_accelerator,
    build_ema,
    build_optimizer,
    build_training_setup,
    idle_cpu_cores_hint,
    step_generator,
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
    resume_path = claim_output_dir(config, accelerator, lock)
    try:
        setup = build_setup(config, accelerator)
        model, train_dataset = setup.model, setup.train_dataset
        conditional = train_dataset.num_classes is not None  # an unlabelled data set trains an unconditional model
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
        # Evaluation state lives on the main process only: a plain copy of the model (taken before `prepare`, which
        # may shard it) that receives the EMA weights.
        eval_model = copy.deepcopy(model).eval().requires_grad_(False) if accelerator.is_main_process else None
        model_name, num_parameters = type(model).__name__, sum(p.numel() for p in model.parameters())
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        sharded = accelerator.distributed_type == DistributedType.FSDP
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
        eval_batches = validation_batches(setup, config, accelerator)
        global_batch = config.train.batch_size * num_processes * accum
        accelerator.print(
            f"{model_name} ({num_parameters / 1e6:.2f}M parameters), {len(train_dataset)} images, "
            f"{steps_per_epoch} steps/epoch x {num_epochs} epochs = {total_steps} steps, global batch {global_batch}, "
            f"{num_processes} process(es){' (FSDP)' if sharded else ''} on {accelerator.device}, mixed precision "
            f"{accelerator.mixed_precision}."
        )
        if hint := idle_cpu_cores_hint(accelerator.device, num_processes):
            accelerator.print(hint)

        def checkpoint() -> None:
            _checkpoint(accelerator, config, state, unwrapped, lr_scheduler, ema, steps_per_epoch, callbacks)

        def end_row(epoch: int, evaluate_now: bool, sample_name: str) -> None:
            """Write the metrics row of the steps since the last row, evaluating first if asked."""
            row = _epoch_row(accelerator, state, epoch, lr_scheduler, global_batch)
            if evaluate_now:
                # The weights to evaluate, whole on every process (FSDP shards are gathered: all processes take part).
                weights = full_tensors(ema.shadow_params if ema is not None else unwrapped.parameters())
                _check_finite_weights(accelerator, unwrapped, state.step, output_dir)  # last/, best/ never NaN
                if accelerator.is_main_process:
                    pipeline = evaluation_pipeline(setup, eval_model, weights)
                    details = (
                        f"Recipe config in `training_config.yaml`: {setup.description}, {state.step} optimizer "
                        f"steps ({state.step / steps_per_epoch:.3g} epochs) at global batch {global_batch} on "
                        f"{num_processes} x {accelerator.device.type}; EMA weights: {ema is not None}."
                    )
                    kwargs = dict(validation_batches=eval_batches, details=details, accelerator=accelerator)
                    results, state.best = evaluate(
                        pipeline,
                        setup=setup,
                        config=config,
                        step=state.step,
                        best=state.best,
                        **kwargs,
                        sample_name=sample_name,
                    )
                    row.update(results)
                del weights
                accelerator.wait_for_everyone()
            metrics_log.log_epoch(row)
            state.epoch_loss_sum, state.epoch_steps, state.epoch_time_s = 0.0, 0, 0.0

        every, eval_every = config.checkpoint.every_steps, config.eval.every_steps
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
                if setup.condition is not None:  # text: the captions' encodings, some dropped to the empty prompt
                    condition = setup.condition(batch, accelerator.device, generator)
                else:
                    condition = batch["class_labels"].to(accelerator.device, non_blocking=True) if conditional else None
                with accelerator.accumulate(model):
                    clean = to_model_space(pixel_values, setup.vae, generator)
                    loss = setup.objective(model, clean, condition, generator)
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
                # Inside an epoch: an `eval.every_steps` evaluation ends a metrics row, and a checkpoint at the same
                # step follows it so that it holds the row. A checkpoint at the end of an epoch waits for the epoch's
                # row (and the one at the last step for the final evaluation) for the same reason.
                inside_epoch = state.step % steps_per_epoch and state.step < total_steps
                evaluate_inside = inside_epoch and eval_every and state.step % eval_every == 0
                checkpoint_inside = inside_epoch and every and state.step % every == 0
                if evaluate_inside or checkpoint_inside:
                    state.epoch_time_s += time.perf_counter() - started
                    if evaluate_inside:
                        end_row(epoch, True, sample_name=f"step_{state.step:07d}")
                    if checkpoint_inside:
                        checkpoint()
                    started = time.perf_counter()
                if state.step >= total_steps:
                    break

            state.epoch_time_s += time.perf_counter() - started
            evaluate_now = (
                (epoch + 1) % config.eval.every_epochs == 0
                or state.step >= total_steps
                or bool(eval_every and state.step % eval_every == 0)
            )
            end_row(epoch, evaluate_now, sample_name=f"epoch_{epoch:04d}")
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
    _check_finite_weights(accelerator, model, state.step, config.output_dir)

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


def _check_finite_weights(accelerator, model, step: int, output_dir) -> None:
    """Every process: stop (all together) if any process holds a non-finite weight (of its shard, under FSDP)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(local_tensor(p)).all()]
    bad_anywhere = len(bad)
    if accelerator.num_processes > 1:
        bad_anywhere = int(accelerator.reduce(torch.tensor(len(bad), device=accelerator.device), "sum").item())
    if bad_anywhere:
        raise _diverged(f"The weights {bad[:3] or '(of another process)'} became non-finite", step, output_dir)


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
