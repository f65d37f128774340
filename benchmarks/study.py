"""The study (issue 19): DiT with grouped-query attention vs an SD-style UNet with multi-head attention and an
SD3-style MMDiT, at the same CPU budget, on the shipped MNIST.

    python benchmarks/study.py                      # train every run (resuming), evaluate, write the report
    python benchmarks/study.py --runs dit_gqa_kv2   # one run (train + evaluate), then the report of all finished
    python benchmarks/study.py --report_only        # only the report, from the finished runs
    python benchmarks/study.py --render_only        # study.md again from the report's study.json (no run folders)
    python benchmarks/study.py --guidance_sweep unet_mha --guidance_scales 1,1.5,1.75,2,3   # one run's guidance

The runs are the recipes in `configs/study/` (their header says what they share). For each run, in order:
1. train: `python -m training.train --config configs/study/<run>.yaml` in a child process (its log in
   `outputs/study/logs/<run>.log`); a run with checkpoints and unfinished steps resumes from the latest (exactly:
   same weights, data order and noise as an uninterrupted run), a finished run is not trained again;
2. evaluate: the run's `last/` pipeline (the weights at the end of the budget; no selection on noisy in-training
   FIDs) with `--num_samples_per_class` (100: 1,000 samples) images per digit, the run's own sampler and steps,
   written to `outputs/study/<run>/evaluation.json`.
Then the report (`benchmarks/study_report.py`) over every run that has its evaluation: tables, curves of quality vs
training time, samples side by side, GQA's savings, written to `--output_dir` (benchmarks/results/study).

`--guidance_sweep <run>` scores that finished run's `last/` at each of `--guidance_scales` (sampling seed 0), picks
the scale with the lowest FID-MNIST among those whose GAN-test accuracy reaches the issue's 0.99 (the lowest FID of
all if none does), scores that scale again with sampling seed 1 (the choice was made on seed 0's numbers, so the
second seed is the honest number) and writes `guidance_<run>.md` / `.json` into `--output_dir`. Guidance is a
sampler setting: nothing is trained again. Each score is cached in `outputs/study/<run>/guidance/`.

This is a benchmark, not a test: about 20-25 minutes per run on 2 CPU cores.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from atomic_files import write_text_atomically  # noqa: E402
from commands.common import environment_line, load_pipeline, seconds  # noqa: E402
from evaluation.metrics import evaluate_pipeline  # noqa: E402
from training.checkpointing import latest_checkpoint  # noqa: E402
from training.run_folder import flatten_settings  # noqa: E402

STUDY_DIR = REPO / "configs" / "study"
# The order runs are trained in: the question first (DiT-GQA vs UNet-MHA vs MMDiT), then the GQA ablation, the
# objectives, and the second seed.
STUDY_RUNS = (
    "dit_gqa_kv2",
    "unet_mha",
    "mmdit_flow",
    "dit_mha_kv4",
    "dit_mqa_kv1",
    "dit_gqa_kv2_flow",
    "dit_gqa_kv2_eps",
    "dit_gqa_kv2_seed1",
)
EVALUATION_FILE = "evaluation.json"
# The report of the whole study is committed; a report of only some runs (a fresh clone that reran one) must not
# overwrite it, so it goes beside the runs unless --output_dir says otherwise.
REPORT_DIR = REPO / "benchmarks" / "results" / "study"
PARTIAL_REPORT_DIR = REPO / "outputs" / "study" / "report"


def run_config(name: str) -> dict:
    path = STUDY_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"Unknown study run {name!r}: no {path}. Study runs: {', '.join(STUDY_RUNS)}.")
    return yaml.safe_load(path.read_text())


def output_folder(name: str) -> Path:
    return REPO / run_config(name)["output_dir"]


def trained_steps(folder: Path) -> int:
    """Optimizer steps in the run's metrics.csv (0 when it has none)."""
    metrics = folder / "metrics.csv"
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().strip().splitlines()
    if len(lines) < 2:
        return 0
    header, last = lines[0].split(","), lines[-1].split(",")
    return int(last[header.index("step")])


def train(name: str) -> None:
    """Train the run to its max_steps: fresh, resumed from its latest checkpoint, or not at all when finished."""
    config, folder = run_config(name), output_folder(name)
    target = int(config["train"]["max_steps"])
    if (folder / "config.yaml").is_file():
        # The budget sets the lr schedule (cosine over max_steps), and every other setting shapes the run too: a run
        # started with other settings can neither count as this one nor be resumed into it. Its outputs are the
        # user's: moved away by hand, never deleted.
        started_with = flatten_settings(yaml.safe_load((folder / "config.yaml").read_text()))
        for key, value in flatten_settings(config).items():
            if key != "output_dir" and started_with.get(key) != value:
                what = (
                    f"a run of {started_with.get(key)} steps"
                    if key == "train.max_steps"
                    else f"a run trained with {key} = {started_with.get(key)!r}"
                )
                raise ValueError(
                    f"{name}: {folder} holds {what}, but configs/study/{name}.yaml now asks for {value!r}. Move "
                    "that folder away (or restore the recipe) and run the study again."
                )
    if trained_steps(folder) >= target and (folder / "last" / "model_index.json").is_file():
        print(f"{name}: trained ({target} steps); not training again", flush=True)
        return
    command = [sys.executable, "-m", "training.train", "--config", str(STUDY_DIR / f"{name}.yaml")]
    resume = latest_checkpoint(folder) is not None
    if resume:
        command += ["--checkpoint.resume_from_checkpoint", "latest"]
    log = folder.parent / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name}: {'resuming' if resume else 'training'} ({target} steps), log in {log}", flush=True)
    started = time.perf_counter()
    with open(log, "a") as output:
        result = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: training failed (exit {result.returncode}); see {log}")
    print(f"{name}: trained in {seconds(time.perf_counter() - started)}", flush=True)


def evaluate(
    name: str,
    num_samples_per_class: int,
    batch_size: int,
    guidance_scale: float | None = None,
    seed: int = 0,
    path: Path | None = None,
) -> dict:
    """Score the run's `last/` pipeline with its own sampler and steps (and its guidance unless given); cached in
    `path` (default: the run folder's evaluation.json) and scored again only when its settings or steps differ."""
    config, folder = run_config(name), output_folder(name)
    guidance_scale = float(config["eval"]["guidance_scale"]) if guidance_scale is None else guidance_scale
    path = folder / EVALUATION_FILE if path is None else path
    if path.is_file():
        saved = json.loads(path.read_text())
        settings = (num_samples_per_class, trained_steps(folder), guidance_scale, seed)
        if tuple(saved.get(key) for key in ("num_samples_per_class", "step", "guidance_scale", "seed")) == settings:
            print(
                f"{name}: evaluated before (N={saved['num_samples']}, guidance {guidance_scale:g}, seed {seed})",
                flush=True,
            )
            return saved
    pipeline = load_pipeline(str(folder / "last"), None)
    started = time.perf_counter()
    results = evaluate_pipeline(
        pipeline,
        num_samples_per_class=num_samples_per_class,
        num_inference_steps=int(config["eval"]["num_inference_steps"]),
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        progress=True,
    )
    results.update(
        run=name,
        step=trained_steps(folder),
        num_samples_per_class=num_samples_per_class,
        evaluation_time_s=time.perf_counter() - started,
        environment=environment_line(),
    )
    write_text_atomically(path, json.dumps(results, indent=2) + "\n")
    print(
        f"{name}: FID-MNIST {results['fid_mnist']:.2f}, GAN-test {results['gan_test_acc']:.4f} "
        f"(N={results['num_samples']}, guidance {guidance_scale:g}, seed {seed}, "
        f"{seconds(results['evaluation_time_s'])})",
        flush=True,
    )
    return results


def guidance_sweep(name: str, scales: list, num_samples_per_class: int, batch_size: int, output_dir: Path) -> dict:
    """Score a finished run at several guidance scales (seed 0), confirm the chosen one with seed 1, write a table."""
    from study_report import BEST_FID_OVER_FLOOR, BEST_GAN_TEST, real_train_floor

    folder = output_folder(name)
    if not (folder / "last" / "model_index.json").is_file():
        raise ValueError(f"--guidance_sweep {name}: {folder / 'last'} does not exist; train the run first.")

    def score(scale: float, seed: int) -> dict:
        path = folder / "guidance" / f"g{scale:g}_seed{seed}.json"
        path.parent.mkdir(exist_ok=True)
        return evaluate(name, num_samples_per_class, batch_size, guidance_scale=scale, seed=seed, path=path)

    rows = [score(scale, 0) for scale in scales]
    reaching = [row for row in rows if row["gan_test_acc"] >= BEST_GAN_TEST]
    chosen = min(reaching or rows, key=lambda row: row["fid_mnist"])
    confirmation = score(chosen["guidance_scale"], 1)
    floor = real_train_floor(output_dir, num_samples_per_class)

    def line(row: dict) -> str:
        return (
            f"| {row['guidance_scale']:g} | {row['seed']} | {row['fid_mnist']:.2f} | "
            f"{row['fid_mnist'] / floor['fid_mnist']:.2f} | {row['gan_test_acc']:.3f} | {row['precision']:.3f} | "
            f"{row['recall']:.3f} |"
        )

    met = confirmation["gan_test_acc"] >= BEST_GAN_TEST and (
        confirmation["fid_mnist"] <= BEST_FID_OVER_FLOOR * floor["fid_mnist"]
    )
    first = rows[0]
    lines = [
        f"# Guidance sweep of {name}",
        "",
        f"`python benchmarks/study.py --guidance_sweep {name} --guidance_scales {','.join(f'{s:g}' for s in scales)}` "
        f"on {first.get('environment', environment_line())}: the run's `last/` pipeline ({first['scheduler']}, {first['num_inference_steps']} "
        f"steps), {first['num_samples']:,} samples per row, scored as in the study; floor FID-MNIST "
        f"{floor['fid_mnist']:.2f} (real train images, same N).",
        "",
        "| guidance | sampling seed | FID-MNIST | x floor | GAN-test | precision | recall |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(line(row) for row in rows),
        line(confirmation),
        "",
        f"Chosen on seed 0 (lowest FID-MNIST with GAN-test >= {BEST_GAN_TEST}"
        f"{'' if reaching else ': none reaches it, so the lowest FID-MNIST'}): guidance "
        f"{chosen['guidance_scale']:g}. Seed 1 at that scale (the last row): GAN-test >= {BEST_GAN_TEST} and "
        f"FID-MNIST <= {BEST_FID_OVER_FLOOR:g}x the floor {'both met' if met else 'not both met'}.",
        f"The two sampling seeds of guidance {chosen['guidance_scale']:g} differ by "
        f"{abs(confirmation['fid_mnist'] - chosen['fid_mnist']):.2f} FID-MNIST and "
        f"{abs(confirmation['gan_test_acc'] - chosen['gan_test_acc']):.3f} GAN-test: the spread that sampling alone "
        "gives at this N.",
        "",
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / f"guidance_{name}.md", "\n".join(lines))
    keep = ("guidance_scale", "seed", "fid_mnist", "gan_test_acc", "precision", "recall", "num_samples")
    summary = {
        "run": name,
        "rows": [{key: row[key] for key in keep} for row in [*rows, confirmation]],
        "chosen_guidance_scale": chosen["guidance_scale"],
        "floor_fid_mnist": floor["fid_mnist"],
        "targets_met_on_seed_1": met,
    }
    write_text_atomically(output_dir / f"guidance_{name}.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output_dir / f'guidance_{name}.md'}", flush=True)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(STUDY_RUNS), help="comma-separated study runs (default: all)")
    parser.add_argument("--num_samples_per_class", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--report_only", action="store_true", help="write the report from the finished runs")
    parser.add_argument(
        "--render_only",
        action="store_true",
        help="write study.md again from the study.json and comparison.md in --output_dir (default "
        "benchmarks/results/study), targets checked anew; needs no run folders",
    )
    parser.add_argument("--guidance_sweep", default=None, help="a finished run to score at --guidance_scales")
    parser.add_argument("--guidance_scales", default="1,1.5,1.75,2,3", help="comma-separated guidance scales")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="report folder (default: benchmarks/results/study when every study run is finished, else "
        "outputs/study/report)",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    for name in names:
        run_config(name)  # unknown names fail before anything runs
    if args.num_samples_per_class < 1:
        raise ValueError("--num_samples_per_class must be at least 1.")
    started = time.perf_counter()
    if args.render_only:
        from study_report import render_report

        render_report(Path(args.output_dir) if args.output_dir else REPORT_DIR)
        return
    if args.guidance_sweep is not None:
        run_config(args.guidance_sweep)
        scales = [float(scale) for scale in args.guidance_scales.split(",") if scale.strip()]
        if not scales or min(scales) < 1:
            raise ValueError(f"--guidance_scales must be scales >= 1 (1: no guidance); got {args.guidance_scales!r}.")
        output_dir = Path(args.output_dir) if args.output_dir else REPORT_DIR
        guidance_sweep(args.guidance_sweep, scales, args.num_samples_per_class, args.batch_size, output_dir)
        return
    if not args.report_only:
        for name in names:
            train(name)
            evaluate(name, args.num_samples_per_class, args.batch_size)
    from study_report import write_report

    finished = [name for name in STUDY_RUNS if (output_folder(name) / EVALUATION_FILE).is_file()]
    if finished:
        output_dir = args.output_dir
        if output_dir is None:
            output_dir = REPORT_DIR if len(finished) == len(STUDY_RUNS) else PARTIAL_REPORT_DIR
        if len(finished) < len(STUDY_RUNS):
            print(
                f"report of {len(finished)} of {len(STUDY_RUNS)} study runs (the others are not finished)", flush=True
            )
        write_report(finished, Path(output_dir), args.num_samples_per_class)
        print(f"report in {output_dir}", flush=True)
    print(f"study done in {seconds(time.perf_counter() - started)}", flush=True)


if __name__ == "__main__":
    from commands import run

    run(main)
