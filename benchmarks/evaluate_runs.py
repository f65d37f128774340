"""Benchmark: evaluate finished training runs and write the README's results section from the numbers.

    python benchmarks/evaluate_runs.py outputs/quickstart outputs/mnist_dit_gqa \\
        --num_samples_per_class 1000 --output_dir benchmarks/results --readme README.md

For each run it scores the `best/` pipeline with `training.evaluation.evaluate_pipeline` (the run's own eval
sampler steps and guidance from `config.yaml`, unless overridden), and scores the same number of real MNIST
train images the same way: the floor a perfect generator would reach at that sample count. Then it runs
`training.compare` over the runs (table, plots, side-by-side samples) and writes everything into
`--output_dir`. With `--readme`, the block after the `<!-- RESULTS -->` marker (up to `<!-- /RESULTS -->`) is
replaced by the generated section. This is a benchmark, not a test: it takes minutes to hours on a CPU.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training import compare  # noqa: E402
from training.cli import environment_line, load_pipeline, seconds  # noqa: E402
from training.data import load_mnist_arrays  # noqa: E402
from training.evaluate import write_text_atomically  # noqa: E402
from training.evaluation import evaluate_images, evaluate_pipeline, uint8_to_classifier_input  # noqa: E402
from training.mnist_classifier import MNIST_CLASSIFIER_SHA256  # noqa: E402


RESULTS_START, RESULTS_END = "<!-- RESULTS -->", "<!-- /RESULTS -->"


def real_data_floor(num_samples_per_class: int) -> dict:
    """Metrics of real train images (the first `num_samples_per_class` of each digit) scored like samples."""
    images, labels = load_mnist_arrays("train")
    labels = torch.from_numpy(labels)
    keep = torch.cat([torch.nonzero(labels == digit).flatten()[:num_samples_per_class] for digit in range(10)])
    return evaluate_images((uint8_to_classifier_input(images[keep.numpy()]) + 1) / 2, labels[keep], value_range=(0.0, 1.0))


def _value(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"


def metrics_table(rows: list) -> str:
    lines = [
        "| run | sampler | FID-MNIST | GAN-test acc. | IS | precision | recall | KID | N |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sampler, results in rows:
        lines.append(
            f"| {name} | {sampler} | {results['fid_mnist']:.2f} | {results['gan_test_acc']:.4f} | "
            f"{results['inception_score']:.2f} | {_value(results['precision'], 3)} | {_value(results['recall'], 3)} | "
            f"{results['kid_mean']:.3g} | {results['num_samples']:,} |"
        )
    return "\n".join(lines)


def replace_results_block(readme: Path, section: str) -> None:
    """Put `section` between the results markers of the README (adding the end marker after a lone start marker)."""
    text = readme.read_text()
    if RESULTS_START not in text:
        raise ValueError(f"{readme} has no {RESULTS_START} marker: add one where the results section belongs.")
    before, after = text.split(RESULTS_START, 1)
    after = after.split(RESULTS_END, 1)[1] if RESULTS_END in after else after
    write_text_atomically(readme, f"{before}{RESULTS_START}\n{section.strip()}\n{RESULTS_END}{after}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training run folders (with config.yaml, metrics.csv, best/, last/)")
    parser.add_argument("--num_samples_per_class", type=int, default=1000)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: each run's eval.num_inference_steps")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: each run's eval.guidance_scale")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--readme", default=None, help="README to write the results section into")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    rows = []
    for folder in args.runs:
        folder = Path(folder)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        steps = args.num_inference_steps or int(config["eval"]["num_inference_steps"])
        guidance = args.guidance_scale if args.guidance_scale is not None else float(config["eval"]["guidance_scale"])
        pipeline = load_pipeline(str(folder / "best"), args.device)
        results = evaluate_pipeline(
            pipeline, num_samples_per_class=args.num_samples_per_class, num_inference_steps=steps,
            guidance_scale=guidance, seed=args.seed, batch_size=args.batch_size, progress=True,
        )
        results["run"] = str(folder)
        write_text_atomically(output_dir / f"evaluation_{folder.name}.json", json.dumps(results, indent=2) + "\n")
        sampler = f"{results['scheduler']}, {steps} steps, guidance {guidance}"
        rows.append((folder.name, sampler, results))
        print(f"{folder.name}: FID-MNIST {results['fid_mnist']:.2f}, GAN-test {results['gan_test_acc']:.4f} "
              f"(N={results['num_samples']}, sampling {seconds(results['sampling_time_s'])})", flush=True)

    floor = real_data_floor(args.num_samples_per_class)
    write_text_atomically(output_dir / "evaluation_real_train.json", json.dumps(floor, indent=2) + "\n")
    rows.append(("real MNIST train images", "-", floor))

    compare.main([*args.runs, "--output_dir", str(output_dir)] + (["--device", args.device] if args.device else []))
    comparison = (output_dir / "comparison.md").read_text()
    # The README lives at the repository root: point its image links into the output folder.
    relative = output_dir.resolve().relative_to(REPO) if output_dir.resolve().is_relative_to(REPO) else output_dir
    comparison = comparison.replace("](", f"]({relative.as_posix()}/")

    section = "\n".join([
        "## Results",
        "",
        f"Generated by `python benchmarks/evaluate_runs.py {shlex.join(sys.argv[1:] if argv is None else argv)}` on "
        f"{environment_line()}. Metrics are computed in the feature space of the "
        f"shipped MNIST classifier (sha256 `{MNIST_CLASSIFIER_SHA256[:16]}...`), against the 10,000 real test images; "
        "FID-MNIST is not comparable with Inception FID. The real-train row is the floor at the same sample count.",
        "",
        "Best checkpoint of each run:",
        "",
        metrics_table(rows),
        "",
        "Training runs side by side (last checkpoint; metrics from the last evaluation during training):",
        "",
        comparison,
    ])
    write_text_atomically(output_dir / "results_section.md", section + "\n")
    if args.readme:
        replace_results_block(Path(args.readme), section)
        print(f"wrote the results section into {args.readme}")
    print(f"done in {seconds(time.perf_counter() - started)}; wrote {output_dir}")


if __name__ == "__main__":
    main()
