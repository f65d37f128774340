"""Compare training runs: one markdown table, plots and a side-by-side sample grid.

    python -m commands.compare runs/unet runs/dit runs/mmdit --output_dir comparison/

Each run folder is what `training.train` writes: `config.yaml`, `metrics.csv` (a row per epoch and per
`eval.every_steps` evaluation) and the
`last/` pipeline. Per run the table gives the denoiser's parameters, the last evaluation's FID-MNIST, GAN-test
accuracy and Inception Score (with their sample count), the median training images/s and step time over
epochs, the peak memory, and the sampling time per image at `--num_inference_steps` (50), measured here on one
batch of `--images_per_label` images per class, which also forms the run's column of `samples.png`.

The second table measures attention per image (keys and values held, attention and forward FLOPs, K/V
projection parameters): what grouped-query attention saves. Writes `comparison.md`, `comparison.json`,
`quality_vs_time.png` (FID-MNIST and GAN-test accuracy against training minutes), `fid_mnist.png`, `loss.png`,
`throughput.png`, `memory.png` and `samples.png` into `--output_dir`.
"""

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from atomic_files import write_text_atomically
from pipelines.images import image_grid
from training.config import upgrade_saved_config

from . import run
from .common import environment_line, load_pipeline, seconds

PIPELINE_SUBFOLDER = "last"
# Parameter-name parts of the key and value projections in `custom_models` (UNet, DiT, MMDiT image and context).
KEY_VALUE_PROJECTIONS = ("to_k", "to_v", "add_k_proj", "add_v_proj")
TITLE_HEIGHT = 16
# Samples smaller than this are shown at twice their size (nearest neighbour) so that digits are readable.
SMALL_IMAGE_SIZE = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m commands.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="training run folders")
    parser.add_argument("--output_dir", default="comparison")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="steps for the sampling-time measurement")
    parser.add_argument("--images_per_label", type=int, default=4, help="images per class in the timed batch / grid")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: each run's eval.guidance_scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return parser


def _batch_per_step(train_config: dict) -> int | None:
    if train_config.get("batch_size") is None:
        return None
    return int(train_config["batch_size"]) * int(train_config.get("gradient_accumulation_steps") or 1)


def _float(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def read_metrics(path: Path) -> list:
    """metrics.csv rows as dicts of floats (None for empty cells)."""
    with open(path, newline="") as f:
        return [{key: _float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def read_run(folder: str) -> dict:
    """Config, per-epoch metrics and the summary numbers of one run folder."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"Run folder not found: {folder}")
    missing = [
        name
        for name in ("config.yaml", "metrics.csv", f"{PIPELINE_SUBFOLDER}/model_index.json")
        if not (path / name).is_file()
    ]
    if missing:
        raise ValueError(f"{folder} is not a training run folder: missing {', '.join(missing)}.")
    config = upgrade_saved_config(yaml.safe_load((path / "config.yaml").read_text()) or {})
    rows = read_metrics(path / "metrics.csv")
    if not rows:
        raise ValueError(f"{path / 'metrics.csv'} has no rows: the run finished no epoch.")

    def column(name):
        return [row[name] for row in rows if row.get(name) is not None]

    evaluated = [row for row in rows if row.get("fid") is not None]
    last_eval = evaluated[-1] if evaluated else {}
    return {
        "name": path.name,
        "folder": str(path),
        "config": config,
        "rows": rows,
        "architecture": config.get("model", {}).get("architecture"),
        "preset": config.get("model", {}).get("preset"),
        "objective": config.get("objective", {}).get("name"),
        "epochs": int(rows[-1]["epoch"]) + 1 if rows[-1].get("epoch") is not None else len(rows),
        "steps": int(rows[-1]["step"]) if rows[-1].get("step") is not None else None,
        # Images per optimizer step on each process (the global batch also multiplies by the process count).
        "batch_per_step": _batch_per_step(config.get("train", {})),
        "fid_mnist": last_eval.get("fid"),
        "gan_test_acc": last_eval.get("gan_test_acc"),
        "inception_score": last_eval.get("inception_score"),
        "metric_num_samples": int(last_eval["metric_num_samples"]) if last_eval.get("metric_num_samples") else None,
        "metric_epoch": int(last_eval["epoch"]) + 1 if last_eval.get("epoch") is not None else None,
        # Rows cover consecutive stretches of steps (an epoch, or up to an `eval.every_steps` evaluation): their
        # epoch_time_s add up to the training time, evaluations excluded.
        "train_time_s": sum(column("epoch_time_s")) if column("epoch_time_s") else None,
        "imgs_per_sec": statistics.median(column("imgs_per_sec")) if column("imgs_per_sec") else None,
        "step_time_ms": statistics.median(column("step_time_ms")) if column("step_time_ms") else None,
        "peak_mem_mb": max(column("peak_mem_mb")) if column("peak_mem_mb") else None,
    }


@torch.no_grad()
def measure_sampling(run_info: dict, args) -> Image.Image:
    """Load the run's `last/` pipeline, time one batch at `num_inference_steps`, and return its labelled grid."""
    pipeline = load_pipeline(str(Path(run_info["folder"]) / PIPELINE_SUBFOLDER), args.device)
    num_classes = pipeline.denoiser.config.num_classes
    guidance_scale = args.guidance_scale
    if guidance_scale is None:
        guidance_scale = float(run_info["config"].get("eval", {}).get("guidance_scale", 1.0))
    if not num_classes:
        guidance_scale = 1.0
    run_info["parameters"] = sum(parameter.numel() for parameter in pipeline.denoiser.parameters())
    run_info.update(attention_cost(pipeline))
    run_info["scheduler"] = type(pipeline.scheduler).__name__
    run_info["sampling_guidance_scale"] = guidance_scale
    call = dict(num_images_per_label=args.images_per_label, guidance_scale=guidance_scale, output_type="pil")
    # Warm-up (allocations, lazy init) so the timed call measures steady-state sampling.
    pipeline(num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(args.seed), **call)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    images = pipeline(
        num_inference_steps=args.num_inference_steps, generator=torch.Generator("cpu").manual_seed(args.seed), **call
    ).images
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    run_info["sampling_s_per_image"] = elapsed / len(images)
    run_info["sampling_batch"] = len(images)
    grid = image_grid(images, cols=args.images_per_label).convert("RGB")
    if images[0].width < SMALL_IMAGE_SIZE:
        grid = grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST)
    titled = Image.new("RGB", (grid.width, grid.height + TITLE_HEIGHT), "white")
    titled.paste(grid, (0, TITLE_HEIGHT))
    ImageDraw.Draw(titled).text((2, 2), run_info["name"], fill="black")
    return titled


class _AttentionCounter(TorchFunctionMode):
    """Counts what every `scaled_dot_product_attention` call reads as keys and values, and its FLOPs."""

    def __init__(self):
        super().__init__()
        self.key_value_bytes, self.flops = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = args[:3]
            self.key_value_bytes += (key.numel() + value.numel()) * key.element_size()
            # Q K^T and the weighted sum of V: 2 matmuls of 2 * Lq * Lk * head_dim FLOPs per query head.
            *batch, query_tokens, head_dim = query.shape
            self.flops += 4 * math.prod(batch) * query_tokens * key.shape[-2] * head_dim
        return func(*args, **kwargs)


@torch.no_grad()
def attention_cost(pipeline) -> dict:
    """Per image, one denoiser forward (no guidance), measured: the keys and values its attention layers hold
    (what grouped K/V heads shrink), the attention FLOPs (Q K^T and A V) and the forward's total FLOPs
    (`torch.utils.flop_counter`: matmuls, convolutions, attention), plus the K/V projection parameters."""
    num_classes = pipeline.denoiser.config.num_classes
    call = dict(num_inference_steps=1, guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(0))
    images = num_classes or 1
    counter, flop_counter = _AttentionCounter(), FlopCounterMode(display=False)
    with flop_counter, counter:
        pipeline(num_images_per_label=1, **call)
    key_value_parameters = sum(
        parameter.numel()
        for name, parameter in pipeline.denoiser.named_parameters()
        if any(part in name.split(".") for part in KEY_VALUE_PROJECTIONS)
    )
    config = pipeline.denoiser.config
    query_heads = config.get("num_attention_heads")
    return {
        "query_heads": query_heads,
        "kv_heads": config.get("num_kv_heads") or query_heads,
        "kv_kib_per_image": counter.key_value_bytes / images / 1024,
        "attention_mflop_per_image": counter.flops / images / 1e6,
        "forward_mflop_per_image": flop_counter.get_total_flops() / images / 1e6,
        "kv_projection_parameters": key_value_parameters,
    }


def side_by_side(grids: list, gap: int = 8) -> Image.Image:
    width = sum(grid.width for grid in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, max(grid.height for grid in grids)), "white")
    x = 0
    for grid in grids:
        canvas.paste(grid, (x, 0))
        x += grid.width + gap
    return canvas


def _cell(value, digits: int, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def format_markdown(runs: list, args) -> str:
    """The comparison table plus the notes a reader needs to trust it."""
    lines = [
        "| run | model | objective | trained (steps x batch) | parameters | FID-MNIST | GAN-test acc. | IS | "
        "train img/s | step ms | peak mem MB | "
        f"sampling s/img ({args.num_inference_steps} steps) | training min |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for info in runs:
        fid = _cell(info["fid_mnist"], 2)
        if info["fid_mnist"] is not None and info["metric_num_samples"]:
            fid += f" (N={info['metric_num_samples']:,})"
        lines.append(
            f"| {info['name']} | {info['architecture']} `{info['preset']}` | {info['objective']} | "
            f"{_cell(info['steps'], 0)} x {_cell(info['batch_per_step'], 0)} | "
            f"{info['parameters'] / 1e6:.2f}M | {fid} | {_cell(info['gan_test_acc'], 3)} | "
            f"{_cell(info['inception_score'], 2)} | {_cell(info['imgs_per_sec'], 1)} | {_cell(info['step_time_ms'], 0)} | "
            f"{_cell(info['peak_mem_mb'], 0)} | {_cell(info['sampling_s_per_image'], 4)} | "
            f"{_cell(info['train_time_s'] and info['train_time_s'] / 60, 1)} |"
        )
    evaluated_at = ", ".join(
        f"{info['name']}: epoch {info['metric_epoch']} of {info['epochs']}"
        if info["metric_epoch"]
        else f"{info['name']}: none"
        for info in runs
    )
    lines += [
        "",
        f"FID-MNIST, GAN-test accuracy and IS (MNIST-classifier Inception Score, max 10) come from each run's last "
        f"evaluation ({evaluated_at}); N is the number of generated samples, scored against the 10,000 real test "
        "images. Trained: optimizer steps x images per step and process. Train img/s and step ms are medians over "
        "epochs; peak memory is the maximum. Sampling time: one "
        f"batch of {runs[0]['sampling_batch']} images per run (`{PIPELINE_SUBFOLDER}/` pipeline, its saved scheduler, "
        f"seed {args.seed}) on {environment_line()}.",
        "",
        "Attention per image, one denoiser forward without guidance, measured on the `last/` pipeline: the keys and "
        "values its attention layers read (fp32; what grouped K/V heads shrink), the FLOPs of Q K^T and A V, all the "
        "forward's FLOPs (`torch.utils.flop_counter`) and the K/V projection parameters.",
        "",
        "| run | query / K/V heads | K/V KiB | attention MFLOP | forward MFLOP | K/V projection parameters |",
        "|---|---|---:|---:|---:|---:|",
        *(
            f"| {info['name']} | {info['query_heads']} / {info['kv_heads']} | {info['kv_kib_per_image']:,.1f} | "
            f"{info['attention_mflop_per_image']:,.2f} | {info['forward_mflop_per_image']:,.1f} | "
            f"{info['kv_projection_parameters']:,} |"
            for info in runs
        ),
        "",
        "Training min: the rows' training time added up (evaluations and checkpoints excluded).",
        "",
        "![quality vs training time](quality_vs_time.png)",
        "",
        "![FID-MNIST](fid_mnist.png) ![loss](loss.png) ![throughput](throughput.png) ![memory](memory.png)",
        "",
        "![samples](samples.png)",
        "",
    ]
    return "\n".join(lines)


def plot_all(runs: list, output_dir: Path) -> list:
    """Line plots (FID-MNIST and loss vs step, FID-MNIST and GAN-test vs training time) and bar charts (throughput,
    memory); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(output_dir / name, dpi=120)
        plt.close(figure)
        paths.append(output_dir / name)

    for name, column, ylabel in (
        ("fid_mnist.png", "fid", "FID-MNIST (log scale)"),
        ("loss.png", "loss", "training loss (log scale)"),
    ):
        figure, axis = plt.subplots(figsize=(6, 4))
        for info in runs:
            points = [(row["step"], row[column]) for row in info["rows"] if row.get(column) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=info["name"])
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        if axis.get_lines():
            axis.set_yscale("log")
            axis.legend()
        save(figure, name)

    # Quality against the training time spent (the rows' epoch_time_s added up): what a CPU budget buys.
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for column, axis, ylabel in (
        ("fid", axes[0], "FID-MNIST (log scale)"),
        ("gan_test_acc", axes[1], "GAN-test accuracy"),
    ):
        for info in runs:
            elapsed, points = 0.0, []
            for row in info["rows"]:
                elapsed += row.get("epoch_time_s") or 0.0
                if row.get(column) is not None:
                    points.append((elapsed / 60, row[column]))
            if points:
                axis.plot(*zip(*points), marker="o", label=info["name"])
        axis.set_xlabel("training time (min)")
        axis.set_ylabel(ylabel)
        if axis.get_lines():
            axis.legend(fontsize="small")
            if column == "fid":
                axis.set_yscale("log")
    save(figure, "quality_vs_time.png")

    for name, key, ylabel in (
        ("throughput.png", "imgs_per_sec", "training images / s"),
        ("memory.png", "peak_mem_mb", "peak memory (MB)"),
    ):
        figure, axis = plt.subplots(figsize=(6, 4))
        names = [info["name"] for info in runs]
        values = [info[key] or 0.0 for info in runs]
        bars = axis.bar(names, values, color="tab:blue")
        axis.bar_label(bars, labels=[_cell(info[key], 1) for info in runs])
        axis.set_ylabel(ylabel)
        axis.tick_params(axis="x", labelrotation=20)
        save(figure, name)
    return paths


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_inference_steps < 1 or args.images_per_label < 1:
        raise ValueError("--num_inference_steps and --images_per_label must be at least 1.")
    names = [Path(folder).name for folder in args.runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Run folder names must differ (they label the table and plots): {duplicates} repeat.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file.")
    started = time.perf_counter()
    runs = [read_run(folder) for folder in args.runs]

    grids = []
    for info in runs:
        grids.append(measure_sampling(info, args))
        print(f"{info['name']}: {info['sampling_s_per_image']:.4f} s/image at {args.num_inference_steps} steps")

    output_dir.mkdir(parents=True, exist_ok=True)
    side_by_side(grids).save(output_dir / "samples.png")
    plot_paths = plot_all(runs, output_dir)
    write_text_atomically(output_dir / "comparison.md", format_markdown(runs, args))
    summary = [{key: value for key, value in info.items() if key not in ("rows", "config")} for info in runs]
    write_text_atomically(output_dir / "comparison.json", json.dumps(summary, indent=2) + "\n")
    written = [output_dir / "comparison.md", output_dir / "comparison.json", output_dir / "samples.png", *plot_paths]
    print(
        f"compared {len(runs)} runs in {seconds(time.perf_counter() - started)}; wrote {', '.join(str(p) for p in written)}"
    )
    return {"runs": summary, "files": [str(path) for path in written]}


if __name__ == "__main__":
    run(main)
