"""Sample quality against the number of model evaluations, for several samplers on one trained pipeline.

    python benchmarks/quality_vs_steps.py outputs/quickstart/best --num_samples_per_class 20 \
        --samplers DDPMScheduler,DDIMScheduler,DPMSolverMultistepScheduler,UniPCMultistepScheduler \
        --steps 4,8,16,32,50 --output_dir benchmarks/results --name quickstart

Every sampler is built from the pipeline's saved scheduler config (so it shares the training noise schedule) and
must fit the model's objective (flow models get flow samplers). A budget of B model evaluations per image runs each
sampler with the most steps whose timestep list (one denoiser call per entry: Heun-type samplers make 2 per step but
1 on the last) is at most B long, and the table records the count actually used; classifier-free guidance batches
both branches into one forward, so it does not change the count. Each cell: GAN-test accuracy and FID-MNIST of the same seeded samples, scored with the
shipped classifier (`evaluation.evaluate_images`). Writes `quality_vs_steps_<name>.md`, `.json` and `.png`.

A grid at 1,000 samples takes hours on a CPU: the JSON is rewritten (atomically) after every cell, and a run whose
JSON already exists keeps its cells and samples only the missing ones, so an interrupted grid resumes and a grid can
be grown by a sampler or a budget. The existing cells must come from the same pipeline, guidance, samples per class,
seed and batch size (the seeds are per batch); otherwise the run stops and says which setting differs.
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch

from atomic_files import write_file_atomically, write_text_atomically
from commands import run
from commands.common import environment_line, load_pipeline, set_scheduler
from evaluation.metrics import evaluate_images, generate_samples

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def steps_for_budget(scheduler, budget: int) -> tuple[int, int] | None:
    """(steps, model evaluations) of the longest run of `scheduler` with at most `budget` evaluations per image."""
    for steps in range(budget, 0, -1):
        scheduler.set_timesteps(steps)
        if len(scheduler.timesteps) <= budget:
            return steps, len(scheduler.timesteps)
    return None


def load_earlier_cells(path: Path, setting: dict) -> tuple[list[dict], float]:
    """(rows, seconds spent) of an earlier run written to `path`, or ([], 0) when there is none; refuses one made
    with a different setting, since its cells would not be comparable with the new ones."""
    if not path.exists():
        return [], 0.0
    try:
        earlier = json.loads(path.read_text())
        earlier_setting, rows = earlier["setting"], earlier["rows"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} exists but is not a quality-vs-steps result ({error}); move it away.") from None
    differing = [key for key in setting if earlier_setting.get(key) != setting[key]]
    if differing:
        described = ", ".join(f"{key} {earlier_setting.get(key)!r} there, {setting[key]!r} now" for key in differing)
        raise ValueError(
            f"{path} holds cells made with another setting ({described}); its cells are kept only when the "
            "setting is the same. Pass another --name, or move the file away to start the grid afresh."
        )
    return rows, float(earlier_setting.get("wall_seconds", 0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--samplers", required=True, help="comma-separated scheduler class names (ours or diffusers')")
    parser.add_argument("--steps", default="4,8,16,32,50", help="model evaluations per image, comma-separated")
    parser.add_argument("--num_samples_per_class", type=int, default=100)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--output_dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", required=True, help="suffix of the output files, e.g. quickstart")
    args = parser.parse_args(argv)
    samplers = [name.strip() for name in args.samplers.split(",") if name.strip()]
    budgets = [int(value) for value in args.steps.split(",")]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / f"quality_vs_steps_{args.name}"
    setting = dict(
        pipeline=args.pipeline,
        guidance_scale=args.guidance_scale,
        num_samples_per_class=args.num_samples_per_class,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    # Before loading the pipeline: a grid that cannot be resumed is refused at once.
    rows, earlier_seconds = load_earlier_cells(Path(f"{stem}.json"), setting)
    torch.set_grad_enabled(False)
    pipeline = load_pipeline(args.pipeline, "cpu")
    pipeline.set_progress_bar_config(disable=True)
    saved_scheduler = pipeline.scheduler
    started_all = time.perf_counter()

    def save():
        setting.update(
            num_samples=rows[0]["num_samples"] if rows else 0,
            environment=environment_line(),
            wall_seconds=round(earlier_seconds + time.perf_counter() - started_all),
        )
        write_text_atomically(f"{stem}.json", json.dumps(dict(setting=setting, rows=rows), indent=2) + "\n")

    for sampler in samplers:
        pipeline.scheduler = saved_scheduler  # each sampler is built from the saved config, not the last one's
        set_scheduler(pipeline, sampler)  # refuses a sampler of the wrong family, with the list of fitting ones
        for budget in budgets:
            fitted = steps_for_budget(pipeline.scheduler, budget)
            if fitted is None:
                continue
            steps, evaluations = fitted
            if any(r["sampler"] == sampler and r["budget"] == budget for r in rows):
                print(f"{sampler} at <= {budget} evaluations: kept from {stem}.json", flush=True)
                continue
            started = time.perf_counter()
            images, labels = generate_samples(
                pipeline,
                num_samples_per_class=args.num_samples_per_class,
                num_inference_steps=steps,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                batch_size=args.batch_size,
            )
            metrics = evaluate_images(images, labels, value_range=(0.0, 1.0))
            row = dict(
                sampler=sampler,
                budget=budget,
                evaluations=evaluations,
                steps=steps,
                gan_test_acc=metrics["gan_test_acc"],
                fid_mnist=metrics["fid_mnist"],
                num_samples=metrics["num_samples"],
                seconds=round(time.perf_counter() - started, 1),
            )
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
    save()

    def cell(sampler, budget, key, fmt):
        row = next((r for r in rows if r["sampler"] == sampler and r["budget"] == budget), None)
        if row is None or row[key] is None:
            return "-"
        # A Heun-type sampler may use fewer evaluations than the budget: say how many.
        used = "" if row["evaluations"] == budget else f" ({row['evaluations']})"
        return format(row[key], fmt) + used

    batch_argument = "" if args.batch_size == parser.get_default("batch_size") else f" --batch_size {args.batch_size}"
    header = "| sampler | " + " | ".join(f"<= {b} evals" for b in budgets) + " |"
    rule = "|---|" + "---:|" * len(budgets)
    lines = [
        f"# Quality vs model evaluations: `{args.pipeline}`",
        "",
        f"Generated by `python benchmarks/quality_vs_steps.py {args.pipeline} --num_samples_per_class "
        f"{args.num_samples_per_class} --samplers {args.samplers} --steps {args.steps} --guidance_scale "
        f"{args.guidance_scale:g} --seed {args.seed}{batch_argument} --name {args.name}` on "
        f"{setting['environment']}, {setting['wall_seconds'] / 60:.0f} min in all. {setting['num_samples']} samples per "
        f"cell (the same seeds in every cell), guidance {args.guidance_scale}; each sampler built from the saved "
        "scheduler config. FID-MNIST at this N is comparable only with other cells of this table.",
        "",
        "GAN-test accuracy (shipped MNIST classifier):",
        "",
        header,
        rule,
        *(f"| {s} | " + " | ".join(cell(s, b, "gan_test_acc", ".3f") for b in budgets) + " |" for s in samplers),
        "",
        "FID-MNIST:",
        "",
        header,
        rule,
        *(f"| {s} | " + " | ".join(cell(s, b, "fid_mnist", ".1f") for b in budgets) + " |" for s in samplers),
        "",
    ]
    write_text_atomically(f"{stem}.md", "\n".join(lines))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for sampler in samplers:
        mine = sorted(
            (r for r in rows if r["sampler"] == sampler and r["budget"] in budgets), key=lambda r: r["budget"]
        )
        x = [r["evaluations"] for r in mine]
        for axis, key in ((left, "gan_test_acc"), (right, "fid_mnist")):
            axis.plot(x, [float("nan") if r[key] is None else r[key] for r in mine], marker="o", label=sampler)
    for axis, title in ((left, "GAN-test accuracy (higher is better)"), (right, "FID-MNIST (lower is better)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.set_xlabel("model evaluations per image")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    figure.suptitle(f"{args.name}: {setting['num_samples']} samples per point, guidance {args.guidance_scale}")
    figure.tight_layout()
    write_file_atomically(f"{stem}.png", lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    print("\n".join(lines))


if __name__ == "__main__":
    run(main)
