"""Benchmark: sampling speed of our pipelines + models against diffusers' models of the same size (issue 17).

    python benchmarks/bench_sampling.py                 # 100 images, 50 steps, CFG, 3 rounds (~5 min on 2 cores)
    python benchmarks/bench_sampling.py --quick         # 8 images, 4 steps, 1 round: checks that it runs
    python benchmarks/bench_sampling.py --device cuda --dtype bf16   # on a GPU, weights and sampling in bf16

The models are those of `bench_models.py` (same sizes, same token counts, random weights: speed does not depend
on what was learned). Ours sample through our pipeline (`ClassConditionalUNetPipeline` /
`ClassConditionalTransformerPipeline`, our DDIM scheduler, output as a tensor). diffusers has no class-conditional
pipeline for `UNet2DModel` or pixel-space DiT, so its models are driven by the loop of `DiTPipeline.__call__` (CFG as
one doubled batch, `scale_model_input`, `DDIMScheduler.step`) minus the VAE decode. Both sides do the same work:
one denoiser call on 2N images per step. The table gives images/s, the ratio to the reference, and our pipeline's
overhead: the share of its wall time spent outside the denoiser's forward (input checks, guidance, scheduler, decode).
`--dtype bf16 / fp16` casts both sides' weights (as `from_pretrained(torch_dtype=...)` does); on CUDA every timing
synchronizes the device first.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_models import (  # noqa: E402
    NUM_CLASSES,
    NUM_CONTEXT_TOKENS,
    PRECISIONS,
    WIDTH,
    dit_group,
    mmdit_group,
    resolve_device,
    synchronize,
    unet_group,
)

from atomic_files import write_text_atomically  # noqa: E402
from custom_models.unet import ScratchUNetModel  # noqa: E402
from custom_schedulers import ScratchDDIMScheduler  # noqa: E402
from pipelines import ClassConditionalTransformerPipeline, ClassConditionalUNetPipeline  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "sampling.md"
GUIDANCE = 2.0


def our_pipeline(model, device: torch.device, dtype: torch.dtype):
    if isinstance(model, ScratchUNetModel):
        pipe = ClassConditionalUNetPipeline(unet=model.eval(), scheduler=ScratchDDIMScheduler())
    else:
        pipe = ClassConditionalTransformerPipeline(transformer=model.eval(), scheduler=ScratchDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def reference_sampling(model, predict, labels: torch.Tensor, steps: int, generator) -> torch.Tensor:
    """`DiTPipeline.__call__`'s loop (CFG batched) with `DDIMScheduler`, without the VAE."""
    scheduler = DDIMScheduler()
    config = model.config
    latents = torch.randn(
        (len(labels), config.in_channels, config.sample_size, config.sample_size), generator=generator
    ).to(model.device, model.dtype)
    null = torch.zeros_like(labels) if predict.__name__ == "predict_sd3" else torch.full_like(labels, NUM_CLASSES - 1)
    class_input = torch.cat([labels, null])
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        output = predict(model, model_input, t.to(model.device).expand(model_input.shape[0]), class_input)
        conditional, unconditional = output[:, : config.in_channels].chunk(2)
        guided = unconditional + GUIDANCE * (conditional - unconditional)
        latents = scheduler.step(guided, t, latents).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1)


def predict_class_conditional(model, sample, timestep, class_labels):
    return model(sample, timestep, class_labels=class_labels).sample


def predict_sd3(model, sample, timestep, class_labels):
    batch = sample.shape[0]
    context = sample.new_zeros(batch, NUM_CONTEXT_TOKENS, WIDTH)
    pooled = sample.new_zeros(batch, WIDTH)
    return model(sample, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep).sample


def forward_seconds(model, device: torch.device):
    """A list that collects the wall time of every forward call of `model` (hooks), and the hook handles."""
    spent, starts = [], []

    def before(module, args):
        synchronize(device)
        starts.append(time.perf_counter())

    def after(module, args, output):
        synchronize(device)
        spent.append(time.perf_counter() - starts.pop())

    return spent, [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


def measure(groups, num_images: int, steps: int, rounds: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    labels = (torch.arange(num_images) % NUM_CLASSES).to(device)
    rows = []
    for group in groups:
        ours, theirs = group.candidates[0], group.reference
        pipe = our_pipeline(ours.model, device, dtype)
        theirs.model.to(device, dtype).eval()
        predict = predict_sd3 if "SD3" in theirs.name else predict_class_conditional
        timings = {"ours": [], "theirs": [], "overhead": []}
        with torch.inference_mode():
            # Warm-up: one short call each (oneDNN picks its kernels on first use).
            pipe(class_labels=labels.tolist(), num_inference_steps=2, guidance_scale=GUIDANCE, output_type="pt")
            reference_sampling(theirs.model, predict, labels, 2, torch.Generator().manual_seed(0))
            for round_index in range(rounds):
                order = ("ours", "theirs") if round_index % 2 == 0 else ("theirs", "ours")
                for side in order:
                    synchronize(device)
                    start = time.perf_counter()
                    if side == "ours":
                        spent, handles = forward_seconds(pipe.denoiser, device)
                        pipe(
                            class_labels=labels.tolist(),
                            num_inference_steps=steps,
                            guidance_scale=GUIDANCE,
                            generator=torch.Generator().manual_seed(round_index),
                            output_type="pt",
                        )
                        for handle in handles:
                            handle.remove()
                        synchronize(device)
                        total = time.perf_counter() - start
                        timings["overhead"].append((total - sum(spent)) / total)
                    else:
                        reference_sampling(theirs.model, predict, labels, steps, torch.Generator().manual_seed(0))
                        synchronize(device)
                        total = time.perf_counter() - start
                    timings[side].append(total)
                    print(f"{group.title[:40]} {side}: {total:.1f} s", file=sys.stderr, flush=True)
        ours_s, theirs_s = statistics.median(timings["ours"]), statistics.median(timings["theirs"])
        rows.append(
            {
                "group": group.title,
                "ours": ours.name,
                "theirs": theirs.name,
                "ours_img_s": num_images / ours_s,
                "theirs_img_s": num_images / theirs_s,
                "ratio": theirs_s / ours_s,
                "overhead": statistics.median(timings["overhead"]),
            }
        )
    return rows


def report(rows: list[dict], settings: str) -> str:
    lines = [
        "# Sampling benchmark\n",
        settings + "\n",
        "| model (ours vs diffusers) | ours img/s | diffusers img/s | speed vs diffusers | our pipeline's overhead |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ours']} vs {row['theirs']} | {row['ours_img_s']:.2f} | {row['theirs_img_s']:.2f} | "
            f"{row['ratio']:.2f} | {100 * row['overhead']:.1f}% |"
        )
    lines.append(
        "\n`speed vs diffusers` > 1: ours is faster. Overhead: share of our pipeline's wall time outside the "
        "denoiser's forward calls."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 images, 4 steps, 1 round")
    parser.add_argument("--num_images", type=int, default=None, help="images per run (default 100)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="auto: CUDA if present")
    parser.add_argument("--dtype", choices=tuple(PRECISIONS), default="fp32", help="weights and sampling dtype")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"markdown file (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    args = parser.parse_args(argv)
    num_images = args.num_images or (8 if args.quick else 100)
    steps = args.steps or (4 if args.quick else 50)
    rounds = args.rounds or (1 if args.quick else 3)
    for name, value in (("--num_images", num_images), ("--steps", steps), ("--rounds", rounds)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    device = resolve_device(parser, args.device, args.dtype, "--dtype")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    groups = [unet_group(device), dit_group(device), mmdit_group(device)]
    rows = measure(groups, num_images, steps, rounds, device, PRECISIONS[args.dtype])
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    settings = (
        f"{device_name}; {args.dtype}, inference mode; {num_images} images, {steps} DDIM steps, CFG "
        f"{GUIDANCE} (one doubled batch of {2 * num_images} per step); median of {rounds} alternating round(s); "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}; wall time {time.perf_counter() - start:.0f} s."
    )
    text = report(rows, settings)
    out = args.out or (REPO / "benchmarks" / "results" / "sampling_quick.md" if args.quick else DEFAULT_OUT)
    write_text_atomically(out, text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
