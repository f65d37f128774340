"""Score a pipeline: FID-MNIST, GAN-test accuracy, IS, precision / recall, KID; prompt adherence; Inception FID / KID.

    python -m commands.evaluate runs/quickstart/best --num_samples_per_class 100 \\
        --scheduler ScratchDDIMScheduler --num_inference_steps 50 --guidance_scale 2.0 --output_dir eval/

Writes `evaluation.json`, `evaluation.md` and `samples.png` (the first samples of each class) into `--output_dir`.
A text-to-image pipeline gets prompt adherence instead (digit and attribute accuracy, training and held-out
phrasings; `--num_samples_per_class` images per prompt) and, with `--caption_fid_per_digit N`, FID-MNIST and the
other sample metrics of one image per caption of the first N test images of each digit, beside the real-data floor;
`--reference_data` scores any pipeline with Inception FID / KID against that data's own images.
`--inception` adds Inception FID when the optional extra is installed (`pip install "scratch-diffusion[inception]"`)
and says it was skipped otherwise. The training loop computes the same metrics with the same function
(`evaluation.evaluate_pipeline`).
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from atomic_files import write_file_atomically, write_text_atomically
from evaluation import evaluate_pipeline
from pipelines.images import image_grid

from . import run
from .common import default_device, environment_line, load_pipeline, seconds, set_scheduler

GRID_IMAGES_PER_CLASS = 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m commands.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline", help="pipeline folder (with model_index.json) or Hub repo id")
    parser.add_argument("--num_samples_per_class", type=int, default=100, help="N samples of each class (>= 2)")
    parser.add_argument("--scheduler", default=None, help="scheduler class name (default: the saved one)")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=256, help="images per pipeline call")
    parser.add_argument("--output_dir", default="evaluation", help="folder for evaluation.json / .md / samples.png")
    parser.add_argument("--inception", action="store_true", help="also compute Inception FID (optional extra)")
    parser.add_argument(
        "--inception_reference_samples",
        type=int,
        default=None,
        help="real test images for Inception statistics (default: all 10,000; ~0.5 s each on CPU, cached)",
    )
    parser.add_argument(
        "--reference_data",
        default=None,
        help="score against this data set's own images with Inception FID / KID (a folder, Hub id or 'mnist'; "
        "needs the inception extra) instead of the MNIST-classifier metrics: for any data, conditional or not",
    )
    parser.add_argument("--reference_split", default="train", help="split of --reference_data (default: train)")
    parser.add_argument(
        "--caption_fid_per_digit",
        type=int,
        default=0,
        help="text pipelines: also FID-MNIST, GAN-test, ... of one image per caption of the first N test images of "
        "each digit (>= 2), beside real train images at the same count; 0 skips it",
    )
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return parser


def _number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_std(mean, std, mean_format: str, std_format: str) -> str:
    return "n/a" if mean is None else f"{mean:{mean_format}} ± {std:{std_format}}"


def format_markdown(results: dict, title: str) -> str:
    """A small markdown report: the metrics with their sample counts and the settings that produced them."""
    n, n_ref = results["num_samples"], results["num_reference_samples"]
    rows = [
        ("FID-MNIST (lower is better)", _number(results["fid_mnist"], 2), f"{n} generated vs {n_ref} real test"),
        ("GAN-test accuracy", _number(results["gan_test_acc"], 4), f"{n} generated"),
        (
            "Inception Score (MNIST classifier, max 10)",
            _mean_std(results["inception_score"], results["inception_score_std"], ".2f", ".2f"),
            f"{n} generated, 10 splits",
        ),
        (
            f"Precision (k={results['precision_recall_k']})",
            _number(results["precision"], 4),
            f"{n} generated vs {min(n, n_ref)} real",
        ),
        (
            f"Recall (k={results['precision_recall_k']})",
            _number(results["recall"], 4),
            f"{n} generated vs {min(n, n_ref)} real",
        ),
        (
            "KID (MNIST-classifier features)",
            _mean_std(results["kid_mean"], results["kid_std"], ".4g", ".2g"),
            f"{results['kid_subsets']} subsets of {results['kid_subset_size']}",
        ),
    ]
    if results.get("inception_fid") is not None:
        rows.append(
            (
                "Inception FID",
                _number(results["inception_fid"], 2),
                f"{results['inception_fid_num_samples']} generated vs {results['inception_fid_num_reference_samples']} real test",
            )
        )
    lines = [f"# Evaluation of `{title}`", ""]
    for problem in (results.get("not_computable"), results.get("small_sample_warning")):
        if problem:
            lines += [f"**Warning: {problem}.**", ""]
    lines += ["| metric | value | samples |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {count} |" for name, value, count in rows]
    if results.get("inception_fid_skipped"):
        lines += ["", f"Inception FID skipped: {results['inception_fid_skipped']}"]
    per_class = " ".join(f"{label}: {accuracy:.3f}" for label, accuracy in results["gan_test_acc_per_class"].items())
    lines += [
        "",
        f"GAN-test accuracy per class: {per_class or 'n/a'}",
        "",
        f"Sampling: {results['scheduler']}, {results['num_inference_steps']} steps, guidance scale "
        f"{results['guidance_scale']}, seed {results['seed']}, {results['num_samples_per_class']} per class, "
        f"{results['image_size']}x{results['image_size']} samples; {results['seconds_per_image']:.4f} s/image on "
        f"{results['environment']}.",
        f"Feature network: `evaluation/mnist_classifier.py`, sha256 `{results['classifier_sha256']}`.",
        "",
    ]
    return "\n".join(lines)


def summary_line(results: dict) -> str:
    """One line of the headline numbers, each with the sample count it was computed on."""
    n = results["num_samples"]
    return (
        f"FID-MNIST {_number(results['fid_mnist'], 2)} (N={n}) | GAN-test accuracy "
        f"{_number(results['gan_test_acc'], 4)} (N={n}) | IS {_number(results['inception_score'], 2)} (N={n}) | "
        f"precision {_number(results['precision'], 3)} | recall {_number(results['recall'], 3)} | "
        f"KID {_number(results['kid_mean'], 4)} ({results['kid_subsets']} x {results['kid_subset_size']})"
    )


def write_report(output_dir: Path, results: dict, markdown: str, grid=None) -> list[Path]:
    """`evaluation.json`, `evaluation.md` and (given a grid image) `samples.png` in `output_dir`, atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "evaluation.json", output_dir / "evaluation.md"]
    write_text_atomically(paths[0], json.dumps(results, indent=2) + "\n")
    write_text_atomically(paths[1], markdown)
    if grid is not None:
        paths.append(output_dir / "samples.png")
        write_file_atomically(paths[2], lambda temporary: grid.save(temporary, format="PNG"))
    return paths


def sampling_settings(args) -> dict:
    """The sampling arguments of `evaluation.evaluate_pipeline` / `generate_samples` from the command line."""
    return dict(
        num_samples_per_class=args.num_samples_per_class,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
    )


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.inception_reference_samples is not None and args.inception_reference_samples < 2:
        raise ValueError(f"--inception_reference_samples must be at least 2, got {args.inception_reference_samples}.")
    if args.caption_fid_per_digit == 1 or args.caption_fid_per_digit < 0:
        raise ValueError(f"--caption_fid_per_digit must be 0 (skip) or >= 2, got {args.caption_fid_per_digit}.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file.")

    started = time.perf_counter()
    pipeline = load_pipeline(args.pipeline, args.device)
    set_scheduler(pipeline, args.scheduler)
    if args.reference_data is not None:
        return evaluate_against_data(pipeline, args, output_dir, started)
    if hasattr(pipeline, "encode_prompt"):
        return evaluate_prompt_adherence(pipeline, args, output_dir, started)
    if args.caption_fid_per_digit:
        raise ValueError(
            f"--caption_fid_per_digit prompts with captions; {type(pipeline).__name__} takes class labels, and its "
            "FID-MNIST is computed without it (--num_samples_per_class per class)."
        )
    num_classes = pipeline.denoiser.config.num_classes
    print(
        f"sampling {args.num_samples_per_class} x {num_classes} classes with {type(pipeline.scheduler).__name__}, "
        f"{args.num_inference_steps} steps, guidance {args.guidance_scale} on {pipeline.device}"
    )

    with warnings.catch_warnings():
        # Printed below as `warning:` lines, and written into the report.
        warnings.filterwarnings("ignore", message=r"(only N = |.*no metric is computable)")
        results, images, _ = evaluate_pipeline(pipeline, **sampling_settings(args), return_samples=True)
    results.update(pipeline=args.pipeline, environment=environment_line())
    for problem in (results["not_computable"], results["small_sample_warning"]):
        if problem:
            print(f"warning: {problem}.", file=sys.stderr)
    if args.inception and results["not_computable"]:
        results["inception_fid_skipped"] = results["not_computable"]
    elif args.inception:
        from evaluation.inception_fid import InceptionUnavailableError, inception_fid

        try:
            results.update(
                inception_fid(
                    images,
                    device=args.device or default_device(),
                    num_reference_samples=args.inception_reference_samples,
                    progress=True,
                )
            )
        except InceptionUnavailableError as error:
            results["inception_fid_skipped"] = str(error)
            print(f"Inception FID skipped: {error}")

    per_class = min(GRID_IMAGES_PER_CLASS, args.num_samples_per_class)
    keep = [c * args.num_samples_per_class + i for c in range(num_classes) for i in range(per_class)]
    paths = write_report(
        output_dir, results, format_markdown(results, args.pipeline), image_grid(images[keep], cols=per_class)
    )

    print(summary_line(results))
    print(
        f"wrote {', '.join(map(str, paths))} in {seconds(time.perf_counter() - started)} "
        f"(sampling {seconds(results['sampling_time_s'])})"
    )
    return results


def evaluate_prompt_adherence(pipeline, args, output_dir: Path, started: float) -> dict:
    """Digit and attribute accuracy of a text-to-image pipeline, on training and on held-out phrasings."""
    from evaluation.metrics import real_data_floor
    from evaluation.prompt_adherence import caption_fid, prompt_adherence

    results = {"pipeline": args.pipeline, "environment": environment_line()}
    settings = dict(
        images_per_prompt=args.num_samples_per_class,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    for name, held_out in (("training_phrasings", False), ("held_out_phrasings", True)):
        print(f"prompt adherence, {name.replace('_', ' ')}: 90 prompts x {args.num_samples_per_class} images")
        results[name] = prompt_adherence(pipeline, held_out=held_out, **settings)
    rows = [
        f"| {name.replace('_', ' ')} | {r['digit_accuracy']:.3f} | {r['thickness_accuracy']:.3f} | "
        f"{r['slant_accuracy']:.3f} | {r['num_samples']} |"
        for name, r in ((n, results[n]) for n in ("training_phrasings", "held_out_phrasings"))
    ]
    lines = [
        f"# Prompt adherence of `{args.pipeline}`",
        "",
        "| prompts | digit accuracy | thickness accuracy | slant accuracy | samples |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Chance: 0.1 for the digit, about 1/3 per attribute. Digits scored by the shipped MNIST classifier, "
        "attributes measured as in `image_data/captions.py`.",
        f"Sampling: {type(pipeline.scheduler).__name__}, {args.num_inference_steps} steps, guidance "
        f"{args.guidance_scale}, seed {args.seed}, on {results['environment']}.",
        "",
    ]
    if args.caption_fid_per_digit:
        per_digit = args.caption_fid_per_digit
        print(f"caption FID: one image per caption of the first {per_digit} test images of each digit")
        results["caption_fid"] = caption_fid(
            pipeline,
            num_samples_per_class=per_digit,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        results["real_data_floor"] = real_data_floor(per_digit)
        fid_rows = [
            f"| {name} | {r['fid_mnist']:.2f} | {r['gan_test_acc']:.3f} | {r['inception_score']:.2f} | "
            f"{_number(r['precision'], 3)} | {_number(r['recall'], 3)} | {r['num_samples']} |"
            for name, r in (
                ("samples from test-image captions", results["caption_fid"]),
                ("real MNIST train images (floor)", results["real_data_floor"]),
            )
        ]
        rows += fid_rows
        lines += [
            "## Sample quality from captions of real digits",
            "",
            "| images | FID-MNIST | GAN-test acc. | IS | precision | recall | samples |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *fid_rows,
            "",
            f"One image per training-phrasing caption of the first {per_digit} MNIST test images of each digit (e.g. "
            f"{', '.join(repr(p) for p in results['caption_fid']['example_prompts'])}), scored against the 10,000 real "
            "test images in the shipped classifier's feature space; the floor is real train images scored the same way.",
            "",
        ]
    paths = write_report(output_dir, results, "\n".join(lines))
    for row in rows:
        print(row)
    print(f"wrote {', '.join(map(str, paths))} in {seconds(time.perf_counter() - started)}")
    return results


def evaluate_against_data(pipeline, args, output_dir: Path, started: float) -> dict:
    """Inception FID / KID of the pipeline's samples against `--reference_data`'s images (at the samples' size)."""
    from evaluation.inception_fid import InceptionUnavailableError, inception_metrics
    from evaluation.metrics import generate_samples
    from image_data import load_image_dataset

    num_classes = pipeline.denoiser.config.num_classes
    what = f"{args.num_samples_per_class} x {num_classes} classes" if num_classes else f"{args.num_samples_per_class}"
    print(f"sampling {what} with {type(pipeline.scheduler).__name__}, {args.num_inference_steps} steps")
    sampling_started = time.perf_counter()
    images, _ = generate_samples(pipeline, **sampling_settings(args))
    sampling_time = time.perf_counter() - sampling_started
    channels, size = int(images.shape[1]), int(images.shape[-1])
    reference = load_image_dataset(
        None if args.reference_data == "mnist" else args.reference_data,
        split=args.reference_split,
        resolution=None if args.reference_data == "mnist" else size,
        pad_to=size if args.reference_data == "mnist" else None,
        channels=channels,
        labels="ignore",
    )
    try:
        results = inception_metrics(
            images,
            reference,
            device=args.device or default_device(),
            num_reference_samples=args.inception_reference_samples,
            progress=True,
        )
    except InceptionUnavailableError as error:
        raise ValueError(f"--reference_data scores with Inception features: {error}") from None
    results.update(
        pipeline=args.pipeline,
        reference_data=args.reference_data,
        reference_split=args.reference_split,
        scheduler=type(pipeline.scheduler).__name__,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale if num_classes else 1.0,
        seed=args.seed,
        image_size=size,
        sampling_time_s=sampling_time,
        environment=environment_line(),
    )
    for problem in (results["not_computable"], results["small_sample_warning"]):
        if problem:
            print(f"warning: {problem}.", file=sys.stderr)
    n, n_ref = results["inception_fid_num_samples"], results["inception_fid_num_reference_samples"]
    lines = [
        f"# Evaluation of `{args.pipeline}` against `{args.reference_data}` ({args.reference_split})",
        "",
        *[f"**Warning: {p}.**\n" for p in (results["not_computable"], results["small_sample_warning"]) if p],
        "| metric | value | samples |",
        "|---|---|---|",
        f"| Inception FID (lower is better) | {_number(results['inception_fid'], 2)} | {n} generated vs {n_ref} real |",
        f"| Inception KID | {_mean_std(results['inception_kid_mean'], results['inception_kid_std'], '.4g', '.2g')} | "
        f"{n} generated vs {n_ref} real |",
        "",
        f"Sampling: {results['scheduler']}, {args.num_inference_steps} steps, guidance {results['guidance_scale']}, "
        f"seed {args.seed}, {size}x{size} samples, on {results['environment']}.",
        "",
    ]
    # Up to GRID_IMAGES_PER_CLASS full rows of GRID_IMAGES_PER_CLASS samples.
    cols = min(GRID_IMAGES_PER_CLASS, images.shape[0])
    rows = min(GRID_IMAGES_PER_CLASS, images.shape[0] // cols)
    paths = write_report(output_dir, results, "\n".join(lines), image_grid(images[: rows * cols], cols=cols))
    print(
        f"Inception FID {_number(results['inception_fid'], 2)} (N={n} vs {n_ref} real) | KID "
        f"{_number(results['inception_kid_mean'], 4)} (N={n})"
    )
    print(f"wrote {', '.join(map(str, paths))} in {seconds(time.perf_counter() - started)}")
    return results


if __name__ == "__main__":
    run(main)
