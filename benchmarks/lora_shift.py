"""Benchmark (not a test): how far the "bold digits" LoRA adapter moves a pipeline towards its domain.

Trains the shipped adapter recipe (`configs/lora/bold_digits.yaml`) on a base pipeline folder, then samples the
same classes from the same noise with the base, and with the adapter at weights 0, 0.5 and 1, and reports the
mean ink per image (mean brightness in [0, 1] of light-on-dark digits) and stroke area, next to the same
statistics on real MNIST test digits, plain and made bold. Writes `lora_shift.md` (the table), `lora_shift.png`
(one row per condition, one column per class) and the images (`lora_shift_images.safetensors`) into `--output_dir`.

    python benchmarks/lora_shift.py --base outputs/quickstart/best --max_steps 600

The run time is set by `--max_steps` (training), `--images_per_class` and `--num_inference_steps` (sampling);
any other `--section.key value` goes to the LoRA recipe (e.g. `--train.batch_size 32 --lora.rank 4`).
`--skip_training` measures an adapter already trained in `<output_dir>/adapter`.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers import DiffusionPipeline  # noqa: E402

from image_data import dilate_strokes, load_image_dataset, mean_ink  # noqa: E402
from training.train_lora import data_description, load_lora_config  # noqa: E402
from training.train_lora import main as train_lora  # noqa: E402

ADAPTER_WEIGHTS = (0.0, 0.5, 1.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="base pipeline folder (e.g. outputs/quickstart/best) or Hub id")
    parser.add_argument("--config", default=str(REPO / "configs" / "lora" / "bold_digits.yaml"), help="LoRA recipe")
    parser.add_argument("--output_dir", default="outputs/lora_shift")
    parser.add_argument("--max_steps", type=int, default=600, help="LoRA training steps")
    parser.add_argument(
        "--skip_training", action="store_true", help="measure the adapter already in <output_dir>/adapter"
    )
    parser.add_argument("--images_per_class", type=int, default=20, help="samples per class and condition")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=100, help="images per sampling call")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_known_args(argv)


@torch.no_grad()
def sample(pipe, class_labels: torch.Tensor, noise: torch.Tensor, args) -> torch.Tensor:
    """Images `[N, C, H, W]` in [0, 1] for `class_labels`, from the given starting noise, in batches."""
    images = []
    for index, start in enumerate(range(0, len(class_labels), args.batch_size)):
        labels = class_labels[start : start + args.batch_size]
        images.append(
            pipe(
                class_labels=labels,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                latents=noise[start : start + args.batch_size],
                output_type="pt",
                generator=torch.Generator("cpu").manual_seed(args.seed * 1000 + index),  # stochastic samplers
            ).images
        )
    return torch.cat(images)


def real_digits(data_config, images_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `images_per_class` test images of each class, as the recipe's data settings shape them, in [0, 1]."""
    dataset = load_image_dataset(
        dataset_name=None if data_config.dataset == "mnist" else data_config.dataset,
        split="test",
        resolution=data_config.resolution,
        pad_to=data_config.pad_to,
        channels=data_config.channels,
    )
    picked = {label: [] for label in range(dataset.num_classes)}
    for index in range(len(dataset)):
        item = dataset[index]
        if len(picked[item["class_labels"]]) < images_per_class:
            picked[item["class_labels"]].append(item["pixel_values"])
        if all(len(images) == images_per_class for images in picked.values()):
            break
    plain = torch.stack([image for label in picked for image in picked[label]])
    return (plain + 1) / 2, (dilate_strokes(plain, data_config.dilate_strokes) + 1) / 2


def labeled_grid(rows: dict, columns: int, scale: int = 3) -> Image.Image:
    """One row per entry of `rows` (name -> images `[N, C, H, W]` in [0, 1]), its name written on the left."""
    tiles = []
    for images in rows.values():
        for image in images[:columns]:
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
            tile = Image.fromarray(array).convert("RGB")
            tiles.append(tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST))
    grid = make_image_grid(tiles, rows=len(rows), cols=columns)
    margin = 110
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(rows):
        draw.text((4, row * tiles[0].height + tiles[0].height // 2 - 6), name, fill="black")
    return canvas


def stroke_fraction(images: torch.Tensor) -> torch.Tensor:
    """Per-image fraction of pixels brighter than mid-grey: the stroke area."""
    return (images > 0.5).float().mean(dim=(1, 2, 3))


def shift_table(reference: dict, results: dict) -> str:
    """Markdown table: mean ink and stroke area per condition; shifts vs the base, as a share of the real shift."""
    statistics = {"ink": mean_ink, "stroke area": stroke_fraction}
    real_plain, real_bold = reference.values()
    target = {key: (f(real_bold).mean() - f(real_plain).mean()).item() for key, f in statistics.items()}
    base = {key: f(results["base (no adapter)"]).mean().item() for key, f in statistics.items()}
    lines = [
        "| images | mean ink per image | ink shift | stroke area | stroke-area shift |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, images in {**reference, **results}.items():
        ink, area = mean_ink(images), stroke_fraction(images)
        if name in reference:
            shifts = [f"target {target[key]:+.4f}" if images is real_bold else "" for key in statistics]
        else:
            shifts = [
                f"{value - base[key]:+.4f} ({(value - base[key]) / target[key]:.0%})"
                for key, value in (("ink", ink.mean().item()), ("stroke area", area.mean().item()))
            ]
        lines.append(f"| {name} | {ink.mean():.4f} ± {ink.std():.4f} | {shifts[0]} | {area.mean():.4f} | {shifts[1]} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    args, recipe_overrides = parse_args(argv)
    output_dir = Path(args.output_dir)
    adapter_run = output_dir / "adapter"
    lora_args = [
        "--config",
        args.config,
        "--base.pretrained_model_name_or_path",
        args.base,
        "--output_dir",
        str(adapter_run),
        "--train.max_steps",
        str(args.max_steps),
        *recipe_overrides,
    ]
    config = load_lora_config(lora_args)
    train_seconds = None
    if not args.skip_training:
        started = time.perf_counter()
        train_lora(lora_args)
        train_seconds = time.perf_counter() - started
    adapter = adapter_run / "last"

    pipe = DiffusionPipeline.from_pretrained(args.base)
    pipe.denoiser.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.denoiser.config.num_classes
    class_labels = torch.arange(num_classes).repeat_interleave(args.images_per_class)
    denoiser_config = pipe.denoiser.config
    noise = torch.randn(
        (len(class_labels), denoiser_config.in_channels, denoiser_config.sample_size, denoiser_config.sample_size),
        generator=torch.Generator("cpu").manual_seed(args.seed),
    )
    started = time.perf_counter()
    results = {"base (no adapter)": sample(pipe, class_labels, noise, args)}
    pipe.load_lora_weights(adapter, adapter_name="bold")
    for weight in ADAPTER_WEIGHTS:
        pipe.set_adapters("bold", adapter_weights=weight)
        results[f"adapter weight {weight:g}"] = sample(pipe, class_labels, noise, args)
    sample_seconds = time.perf_counter() - started
    zero_difference = (results["adapter weight 0"] - results["base (no adapter)"]).abs().max().item()

    plain, bold = real_digits(config.data, args.images_per_class)
    reference = {"MNIST test": plain, "bold MNIST test": bold}
    table = shift_table(reference, results)
    save_file(
        {name.replace(" ", "_"): images.contiguous() for name, images in {**reference, **results}.items()},
        output_dir / "lora_shift_images.safetensors",
    )

    grid_rows = {name: images[:: args.images_per_class] for name, images in {**reference, **results}.items()}
    grid_path = output_dir / "lora_shift.png"
    labeled_grid(grid_rows, num_classes).save(grid_path)
    trained = f"{train_seconds:.0f} s" if train_seconds is not None else "not timed (--skip_training)"
    report = "\n".join(
        [
            f"LoRA adapter (rank {config.lora.rank}, alpha {config.lora.alpha}, convolutions: {config.lora.include_conv}) "
            f"on `{args.base}`, trained {config.train.max_steps} steps at batch {config.train.batch_size} on "
            f"{data_description(config.data)}: training {trained}, sampling {sample_seconds:.0f} s "
            f"({len(class_labels)} images per condition, {args.num_inference_steps} steps, guidance {args.guidance_scale:g}, "
            f"{torch.get_num_threads()} threads). Mean ink per image = mean brightness in [0, 1] (± std over images); "
            f"stroke area = share of pixels above 0.5; shifts are against the base, in brackets as a share of the shift "
            f"between real and bold MNIST. Weight 0 vs base: max |difference| {zero_difference:.1e}.",
            "",
            table,
            "",
            f"![rows: real and bold MNIST test digits, then samples of the base and of the adapter at weights "
            f"{', '.join(f'{w:g}' for w in ADAPTER_WEIGHTS)}, from the same noise]({grid_path.name})",
        ]
    )
    (output_dir / "lora_shift.md").write_text(report + "\n")
    print(report)
    return report


if __name__ == "__main__":
    from commands import run

    run(main)
