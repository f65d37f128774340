"""Generate a sample grid (and optionally a denoising GIF) from a pipeline folder or Hub repo id.

    python -m commands.sample runs/quickstart/best --class_labels 3,7 --num_images_per_label 8 \\
        --scheduler ScratchDDIMScheduler --num_inference_steps 50 --guidance_scale 2.0 --seed 0 \\
        --out grid.png --gif trajectory.gif

Text-to-image pipelines take `--prompt` (repeatable, one grid row each) instead of `--class_labels`.
`--scheduler` takes our classes (ScratchDDPMScheduler, ScratchDDIMScheduler, ScratchFlowMatchEulerScheduler) or
any diffusers scheduler class name, built from the saved scheduler's config. One row per label in the grid.
"""

import argparse
import time

import torch

from pipelines.images import GIF_FRAME_MS, image_grid, save_trajectory_gif

from . import run
from .common import check_output_path, load_lora, load_pipeline, parse_class_labels, seconds, set_scheduler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m commands.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline", help="pipeline folder (with model_index.json) or Hub repo id")
    parser.add_argument("--scheduler", default=None, help="scheduler class name (default: the saved one)")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance; 1.0 disables it")
    parser.add_argument(
        "--class_labels", default=None, help="comma-separated class ids or label names (default: every class)"
    )
    parser.add_argument(
        "--prompt", action="append", default=None, help="text-to-image pipelines: a prompt, one grid row (repeatable)"
    )
    parser.add_argument("--negative_prompt", default=None, help="text-to-image pipelines: steer away from this")
    parser.add_argument("--num_images_per_label", type=int, default=8, help="images per class (or per prompt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", default=None, help="LoRA file, folder or Hub repo id (diffusers format)")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="adapter weight of --lora")
    parser.add_argument("--out", default="grid.png", help="where to write the grid (.png, .jpg, .webp)")
    parser.add_argument("--gif", default=None, help="also write the denoising trajectory as this GIF")
    parser.add_argument("--gif_frame_ms", type=int, default=GIF_FRAME_MS, help="milliseconds per GIF frame")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return parser


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_images_per_label < 1:
        raise ValueError(f"--num_images_per_label must be at least 1, got {args.num_images_per_label}.")
    if args.lora is None and args.lora_scale != 1.0:
        raise ValueError("--lora_scale needs --lora.")
    out_path = check_output_path(args.out, (".png", ".jpg", ".jpeg", ".webp"))
    gif_path = check_output_path(args.gif, (".gif",)) if args.gif else None
    class_labels = parse_class_labels(args.class_labels)

    started = time.perf_counter()
    pipeline = load_pipeline(args.pipeline, args.device)
    set_scheduler(pipeline, args.scheduler)
    if args.lora:
        load_lora(pipeline, args.lora, args.lora_scale)
    load_seconds = time.perf_counter() - started

    if hasattr(pipeline, "encode_prompt"):
        if not args.prompt or class_labels is not None:
            raise ValueError(
                f"{args.pipeline} is a text-to-image pipeline: pass --prompt (one per row), not --class_labels."
            )
        condition = dict(
            prompt=args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images_per_label
        )
    else:
        if args.prompt or args.negative_prompt:
            raise ValueError(f"{args.pipeline} is class-conditional: pass --class_labels, not --prompt.")
        condition = dict(class_labels=class_labels, num_images_per_label=args.num_images_per_label)

    started = time.perf_counter()
    output = pipeline(
        **condition,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        output_type="pil",
        return_trajectory=gif_path is not None,
    )
    sampling_seconds = time.perf_counter() - started
    rows = len(output.images) // args.num_images_per_label
    image_grid(output.images, cols=args.num_images_per_label).save(out_path)
    if gif_path is not None:
        save_trajectory_gif(output.trajectory, args.num_images_per_label, gif_path, frame_ms=args.gif_frame_ms)

    width, height = output.images[0].size
    print(
        f"{len(output.images)} images ({width}x{height}, {rows} rows) with {type(pipeline.scheduler).__name__}, "
        f"{args.num_inference_steps} steps, guidance {args.guidance_scale}: sampled in {seconds(sampling_seconds)} "
        f"({sampling_seconds / len(output.images):.3f} s/image) on {pipeline.device}, loaded in {seconds(load_seconds)}"
    )
    print(f"wrote {out_path}")
    if gif_path is not None:
        print(f"wrote {gif_path} ({len(output.trajectory)} frames)")
    return {
        "grid": str(out_path),
        "gif": str(gif_path) if gif_path else None,
        "num_images": len(output.images),
        "sampling_time_s": sampling_seconds,
    }


if __name__ == "__main__":
    run(main)
