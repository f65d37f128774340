"""Why does deterministic sampling fail on a model where ancestral sampling works? Measure it by timestep.

    python benchmarks/ddim_diagnosis.py outputs/quickstart/best --output benchmarks/results/ddim_diagnosis.md

1. The denoiser on real MNIST test images noised to timestep t (same noise for every t): the least-squares slope of
   the predicted noise on the true noise (1 = unbiased; < 1 = the noise is under-predicted, which a deterministic
   sampler never corrects), the relative noise error, and the RMS error of the predicted clean image (clipped to
   [-1, 1] as the samplers do).
2. Hybrid samplers on the same 50-step grid, same seeds: DDPM (ancestral) steps above a switch timestep and DDIM
   (deterministic) steps below, and the other way round, scored by GAN-test accuracy with the shipped classifier.
   Which half of the trajectory breaks DDIM shows where the model's error matters.
3. Ancestral (DDPM) sampling started from real test images noised to t, with their own labels and no guidance: how
   often the classifier still reads the source digit at the end, and how far the result is from the source image.
   Single-step errors (section 1) can be small while the sampler's own trajectory still drifts; the lowest t from
   which digits stop surviving shows where the iterated errors break them.
"""

import argparse
import time
from pathlib import Path

import torch

from commands.common import load_pipeline
from custom_schedulers import ScratchDDIMScheduler, ScratchDDPMScheduler
from custom_schedulers.schedules import clean_and_noise, forward_coefficients
from evaluation.metrics import (
    classifier_outputs,
    default_classifier,
    gan_test_accuracy,
    to_classifier_input,
    uint8_to_classifier_input,
)
from image_data import load_mnist_arrays

TIMESTEPS = (1, 5, 10, 20, 50, 100, 200, 300, 500, 700, 900, 980)


def real_images(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` shipped MNIST test digits in [-1, 1], padded with background to `size`, and their labels."""
    images, labels = load_mnist_arrays("test")
    images = uint8_to_classifier_input(images[:count])
    pad = (size - 28) // 2
    images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=-1.0) if pad else images
    return images, torch.as_tensor(labels[:count])


@torch.inference_mode()
def error_by_timestep(denoiser, scheduler, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for t in TIMESTEPS:
        timesteps = torch.full((images.shape[0],), t, dtype=torch.long)
        signal, noise_level = forward_coefficients(scheduler.alphas_cumprod, timesteps, images)
        noisy = signal * images + noise_level * noise
        output = torch.cat(
            [
                denoiser(noisy[i : i + 256], timesteps[i : i + 256], class_labels=labels[i : i + 256]).sample
                for i in range(0, images.shape[0], 256)
            ]
        )
        # The scheduler's own conversion, so that v and x0 models are measured in noise terms too.
        clean, predicted = clean_and_noise(output, noisy, signal, noise_level, scheduler.config.prediction_type)
        slope = float((predicted * noise).sum() / (noise * noise).sum())
        relative_error = float((predicted - noise).pow(2).mean() / noise.pow(2).mean())
        error = clean.clamp(-1, 1) - images
        residual = float(error[images < -0.99].std())
        x0_rmse = float(error.pow(2).mean().sqrt())
        rows.append(dict(t=t, slope=slope, relative_error=relative_error, x0_rmse=x0_rmse, background_std=residual))
    return rows


@torch.inference_mode()
def hybrid_sample(
    denoiser, scheduler_config, labels, steps, switch, ancestral_above: bool, guidance: float, seed: int, size: int
):
    """DDPM steps where `t >= switch` (if ancestral_above) else DDIM steps; the other way round otherwise."""
    ddpm, ddim = ScratchDDPMScheduler.from_config(scheduler_config), ScratchDDIMScheduler.from_config(scheduler_config)
    ddpm.set_timesteps(steps)
    ddim.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn((labels.shape[0], 1, size, size), generator=generator)
    null = torch.full_like(labels, denoiser.config.num_classes)
    for t in ddim.timesteps:
        both = denoiser(
            torch.cat([sample, sample]),
            torch.full((2 * labels.shape[0],), int(t)),
            class_labels=torch.cat([null, labels]),
        ).sample
        unconditional, conditional = both.chunk(2)
        guided = unconditional + guidance * (conditional - unconditional)
        if (int(t) >= switch) == ancestral_above:
            sample = ddpm.step(guided, t, sample, generator=generator).prev_sample
        else:
            sample = ddim.step(guided, t, sample).prev_sample
    return (sample.clamp(-1, 1) + 1) / 2


@torch.inference_mode()
def denoise_from(denoiser, scheduler_config, images, labels, start: int, steps: int, seed: int) -> torch.Tensor:
    """DDPM steps on the `steps`-step grid from its first timestep <= `start`, from `images` noised to that
    timestep, conditioned on `labels`, no guidance; the results in [-1, 1]."""
    scheduler = ScratchDDPMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    timesteps = [t for t in scheduler.timesteps if int(t) <= start]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator)
    first = torch.full((images.shape[0],), int(timesteps[0]), dtype=torch.long)
    signal, noise_level = forward_coefficients(scheduler.alphas_cumprod, first, images)
    sample = signal * images + noise_level * noise
    for t in timesteps:
        output = denoiser(sample, torch.full((images.shape[0],), int(t)), class_labels=labels).sample
        sample = scheduler.step(output, t, sample, generator=generator).prev_sample
    return sample.clamp(-1, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--samples_per_class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--switches", default="0,50,100,200,400,1000")
    parser.add_argument("--starts", default="100,200,300,400,600,800,1000", help="timesteps section 3 starts from")
    parser.add_argument("--num_start_images", type=int, default=200, help="test images section 3 denoises")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipeline = load_pipeline(args.pipeline, "cpu")
    denoiser = pipeline.denoiser.eval()
    size = denoiser.config.sample_size
    latent = getattr(pipeline, "vae", None) is not None
    if latent or denoiser.config.in_channels != 1 or size not in (28, 32):
        raise ValueError(
            f"{args.pipeline}: the diagnosis noises real MNIST digits, so it needs a grey pixel model of 28 or 32 px "
            f"(the shipped digits, padded for 32); this one takes {denoiser.config.in_channels}-channel {size} px "
            f"{'latents' if latent else 'images'}."
        )
    if "prediction_type" not in pipeline.scheduler.config:
        raise ValueError(
            f"{args.pipeline}: the diagnosis is for DDPM-family models; this one samples with "
            f"{type(pipeline.scheduler).__name__}."
        )
    starts = [int(value) for value in args.starts.split(",") if value.strip()]
    if not starts or not all(0 <= start <= pipeline.scheduler.config.num_train_timesteps for start in starts):
        raise ValueError(
            f"--starts must be timesteps from 0 to {pipeline.scheduler.config.num_train_timesteps}; got {args.starts!r}."
        )
    images, labels = real_images(args.num_images, size)
    lines = [f"# DDIM diagnosis: `{args.pipeline}`", "", "## The denoiser on noised real test images", ""]
    lines += [
        f"{args.num_images} test images, conditional (no guidance), one noise draw. slope: least-squares slope of "
        "predicted on true noise. x0 RMSE: clipped predicted clean image vs the real one (pixels in [-1, 1]). "
        "background std: that error on the real background pixels.",
        "",
        "| t | slope | relative noise MSE | x0 RMSE | background std |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in error_by_timestep(denoiser, pipeline.scheduler, images, labels):
        lines.append(
            f"| {row['t']} | {row['slope']:.3f} | {row['relative_error']:.3f} | {row['x0_rmse']:.3f} | "
            f"{row['background_std']:.3f} |"
        )
        print(lines[-1], flush=True)
    classifier = default_classifier()
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    lines += [
        "",
        f"## Hybrid samplers ({args.steps} steps, guidance {args.guidance_scale}, {labels.shape[0]} samples, GAN-test)",
        "",
        "| switch t | DDPM above, DDIM below | DDIM above, DDPM below |",
        "|---:|---:|---:|",
    ]
    for switch in [int(value) for value in args.switches.split(",")]:
        scores = []
        for ancestral_above in (True, False):
            started = time.perf_counter()
            images = hybrid_sample(
                denoiser,
                pipeline.scheduler.config,
                labels,
                args.steps,
                switch,
                ancestral_above,
                args.guidance_scale,
                0,
                size,
            )
            _, logits = classifier_outputs(to_classifier_input(images), classifier)
            scores.append(gan_test_accuracy(logits, labels))
            print(
                f"switch {switch} ancestral_above={ancestral_above}: {scores[-1]:.3f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        lines.append(f"| {switch} | {scores[0]:.3f} | {scores[1]:.3f} |")
    sources, source_labels = real_images(args.num_start_images, size)
    lines += [
        "",
        f"## DDPM from noised real test images ({args.steps}-step grid, conditional, no guidance, "
        f"{args.num_start_images} images)",
        "",
        "Started at the grid's first timestep <= t from the test images noised to it. source digit kept: the "
        "classifier reads the source label in the result. RMSE: result vs source image (pixels in [-1, 1]).",
        "",
        "| start t | source digit kept | RMSE to source |",
        "|---:|---:|---:|",
    ]
    for start in starts:
        denoised = denoise_from(denoiser, pipeline.scheduler.config, sources, source_labels, start, args.steps, 0)
        _, logits = classifier_outputs(to_classifier_input((denoised + 1) / 2), classifier)
        kept = gan_test_accuracy(logits, source_labels)
        rmse = float((denoised - sources).pow(2).mean().sqrt())
        lines.append(f"| {start} | {kept:.3f} | {rmse:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    from commands import run

    run(main)
