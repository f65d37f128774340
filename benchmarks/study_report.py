"""The study's report (issue 19), from finished study runs: `python benchmarks/study.py --report_only` writes it.

`write_report(names, output_dir, num_samples_per_class)` reads each run's folder (`metrics.csv`, `config.yaml`,
`last/`, the `evaluation.json` written by `benchmarks/study.py`), runs `commands.compare` over the runs (the table
of training numbers, the attention table, quality vs training-time curves, samples side by side), scores the real
MNIST train images at the same sample count (the floor), checks the issue's quality targets, and writes
`study.md`, `study.json`, the compare outputs and one denoising GIF per run (`gifs/`) into `output_dir`.

`render_report(output_dir)` writes `study.md` again from the `study.json` and `comparison.md` already there
(`python benchmarks/study.py --render_only`): a change of the report's wording or of how targets are checked reaches
the committed report without the hours of training behind it.
"""

import json
from pathlib import Path

from PIL import Image, ImageSequence
from study import EVALUATION_FILE, output_folder, run_config

from atomic_files import write_text_atomically
from commands import compare
from commands.common import environment_line
from evaluation.metrics import real_data_floor

# Issue 19's targets (1,000 samples, the shipped classifier; floor = real train images at the same N).
BEST_GAN_TEST, BEST_FID_OVER_FLOOR, EVERY_GAN_TEST = 0.99, 3.0, 0.95
SEED_PAIR = ("dit_gqa_kv2", "dit_gqa_kv2_seed1")
# Samples per digit kept in the report's denoising GIFs (the runs' own GIFs keep all of eval.images_per_class).
GIF_SAMPLES_PER_DIGIT = 2


def real_train_floor(output_dir: Path, num_samples_per_class: int) -> dict:
    """The real-train floor at this N, cached in `output_dir/real_train_floor.json`."""
    path = output_dir / "real_train_floor.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("num_samples_per_class") == num_samples_per_class:
            return saved
    floor = {**real_data_floor(num_samples_per_class), "num_samples_per_class": num_samples_per_class}
    write_text_atomically(path, json.dumps(floor, indent=2) + "\n")
    return floor


def crop_gif(source: Path, target: Path, images_per_row: int, keep: int = GIF_SAMPLES_PER_DIGIT) -> None:
    """Copy a denoising GIF (one row per digit, `images_per_row` samples each) keeping the first `keep` columns:
    every frame and its timing, a fraction of the size to commit."""
    with Image.open(source) as gif:
        width = gif.width * min(keep, images_per_row) // images_per_row
        frames, durations = [], []
        for frame in ImageSequence.Iterator(gif):
            frames.append(frame.convert("L").crop((0, 0, width, gif.height)))
            durations.append(frame.info.get("duration", 80))
    temporary = target.with_name(f".{target.name}.tmp")
    frames[0].save(temporary, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    temporary.replace(target)


def _objective(config: dict) -> str:
    objective = config["objective"]
    if objective["name"] == "flow_matching":
        return "flow (rectified)"
    return {"v_prediction": "v", "epsilon": "epsilon", "sample": "x0"}[objective["prediction_type"]]


def targets(rows: list, floor: dict) -> list:
    """The issue's quality targets, each as (what, value, met).

    The best run is the one with the lowest FID-MNIST among those that draw the asked-for digit (GAN-test >= 0.99),
    the rule the guidance sweep chooses by: a lower FID from a run that draws a wrong digit in 1 of 30 samples is not
    the better class-conditional recipe. When no run reaches 0.99, the best is the lowest FID-MNIST of all."""
    reaching = [row for row in rows if row["gan_test_acc"] >= BEST_GAN_TEST]
    best = min(reaching or rows, key=lambda row: row["fid_mnist"])
    rule = f"lowest FID-MNIST with GAN-test >= {BEST_GAN_TEST}" if reaching else "lowest FID-MNIST; none reaches"
    fid_ratio = best["fid_mnist"] / floor["fid_mnist"]
    worst = min(rows, key=lambda row: row["gan_test_acc"])
    return [
        (f"best run ({best['name']}, {rule}): GAN-test >= {BEST_GAN_TEST}", best["gan_test_acc"],
         best["gan_test_acc"] >= BEST_GAN_TEST),
        (f"best run ({best['name']}): FID-MNIST <= {BEST_FID_OVER_FLOOR:g}x the floor", fid_ratio,
         fid_ratio <= BEST_FID_OVER_FLOOR),
        (f"every run: GAN-test >= {EVERY_GAN_TEST} (lowest: {worst['name']})", worst["gan_test_acc"],
         worst["gan_test_acc"] >= EVERY_GAN_TEST),
    ]  # fmt: skip


def write_report(names: list, output_dir: Path, num_samples_per_class: int) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    folders = [output_folder(name) for name in names]
    comparison = compare.main(
        [*map(str, folders), "--output_dir", str(output_dir), "--num_inference_steps", "16", "--images_per_label", "4"]
    )
    training = {run["name"]: run for run in comparison["runs"]}
    floor = real_train_floor(output_dir, num_samples_per_class)

    rows = []
    for name, folder in zip(names, folders):
        config, evaluation = run_config(name), json.loads((folder / EVALUATION_FILE).read_text())
        info = training[folder.name]
        rows.append(
            {
                "name": name,
                "model": f"{config['model']['architecture']} `{config['model']['preset']}`",
                "heads": f"{info['query_heads']} / {info['kv_heads']}",
                "objective": _objective(config),
                "seed": config["train"]["seed"],
                "parameters": info["parameters"],
                "steps": info["steps"],
                "batch": info["batch_per_step"],
                "train_min": info["train_time_s"] / 60,
                "imgs_per_sec": info["imgs_per_sec"],
                "peak_mem_mb": info["peak_mem_mb"],
                "sampler": f"{evaluation['scheduler']} {evaluation['num_inference_steps']} steps, "
                f"guidance {evaluation['guidance_scale']:g}",
                **{key: evaluation[key] for key in ("fid_mnist", "gan_test_acc", "precision", "recall", "num_samples")},
            }
        )
        gifs = sorted((folder / "samples").glob("*.gif"))
        if gifs:  # the last evaluation's denoising GIF
            (output_dir / "gifs").mkdir(exist_ok=True)
            latest = max(gifs, key=lambda path: path.stat().st_mtime)
            crop_gif(latest, output_dir / "gifs" / f"{name}.gif", int(config["eval"]["images_per_class"]))

    summary = {
        "runs": rows,
        "floor": floor,
        "num_samples_per_class": num_samples_per_class,
        "environment": environment_line(),
    }
    write_text_atomically(output_dir / "study.json", json.dumps(summary, indent=2) + "\n")
    return render_report(output_dir)


def render_report(output_dir: Path) -> dict:
    """Write `study.md` from `study.json` and `comparison.md` in `output_dir` (the targets checked anew); returns
    the summary with its targets, which `study.json` then holds too."""
    summary_path = output_dir / "study.json"
    keys = ("runs", "floor", "num_samples_per_class", "environment")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    missing = ["study.json"] if summary is None else [f"study.json's {key!r}" for key in keys if key not in summary]
    if not (output_dir / "comparison.md").is_file():
        missing.append("comparison.md")
    if missing:
        raise ValueError(
            f"{output_dir} holds no complete study report to render again (missing: {', '.join(missing)}); "
            "write one with `python benchmarks/study.py`."
        )
    rows, floor, num_samples_per_class = summary["runs"], summary["floor"], summary["num_samples_per_class"]
    lines = [
        "# The study: DiT with grouped-query attention vs UNet with multi-head attention vs MMDiT",
        "",
        f"`python benchmarks/study.py` on {summary['environment']}: the recipes in `configs/study/` (shipped MNIST, "
        "batch 64, max_steps set to 15 minutes of training at the architecture's step time measured in its first "
        "study run; the training minutes below are what each run took), "
        f"each run's `last/` pipeline scored with {floor['num_samples']:,} samples ({num_samples_per_class} per "
        "digit, seed 0) by the shipped MNIST classifier against the 10,000 real test images. Floor: real MNIST train "
        "images scored the same way at the same N.",
        "",
        "| run | model | query / K/V heads | objective | seed | parameters | steps x batch | training min | "
        "train img/s | peak MB | sampler | FID-MNIST | GAN-test | precision | recall | N |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['model']} | {row['heads']} | {row['objective']} | {row['seed']} | "
            f"{row['parameters'] / 1e6:.2f}M | {row['steps']:,} x {row['batch']} | {row['train_min']:.1f} | "
            f"{row['imgs_per_sec']:.0f} | {row['peak_mem_mb']:,.0f} | {row['sampler']} | {row['fid_mnist']:.2f} | "
            f"{row['gan_test_acc']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | {row['num_samples']:,} |"
        )
    lines.append(
        f"| real MNIST train images | - | - | - | - | - | - | - | - | - | - | {floor['fid_mnist']:.2f} | "
        f"{floor['gan_test_acc']:.3f} | {floor['precision']:.3f} | {floor['recall']:.3f} | {floor['num_samples']:,} |"
    )
    checks = targets(rows, floor)
    lines += ["", "Targets (issue 19):", ""]
    lines += [f"- {what}: {value:.3f}, {'met' if met else 'missed'}" for what, value, met in checks]
    lowest = min(rows, key=lambda row: row["fid_mnist"])
    if lowest["gan_test_acc"] < BEST_GAN_TEST:
        lines += [
            "",
            f"Lowest FID-MNIST of all: {lowest['name']} ({lowest['fid_mnist']:.2f}, "
            f"{lowest['fid_mnist'] / floor['fid_mnist']:.2f}x the floor) with GAN-test {lowest['gan_test_acc']:.3f}, "
            f"below {BEST_GAN_TEST}.",
        ]
    by_name = {row["name"]: row for row in rows}
    if all(name in by_name for name in SEED_PAIR):
        a, b = (by_name[name] for name in SEED_PAIR)
        lines += [
            "",
            f"Spread between two seeds of the same recipe ({SEED_PAIR[0]} vs {SEED_PAIR[1]}): FID-MNIST "
            f"{a['fid_mnist']:.2f} vs {b['fid_mnist']:.2f} ({abs(a['fid_mnist'] - b['fid_mnist']):.2f} apart), "
            f"GAN-test {a['gan_test_acc']:.3f} vs {b['gan_test_acc']:.3f}: differences of this size between runs "
            "are inside the noise.",
        ]
    lines += [
        "",
        "## Training side by side (`commands.compare`; in-training metrics at N = 100)",
        "",
        (output_dir / "comparison.md").read_text().strip(),
        "",
        "Denoising GIFs (last evaluation of each run): "
        + ", ".join(f"[{row['name']}](gifs/{row['name']}.gif)" for row in rows),
        "",
    ]
    write_text_atomically(output_dir / "study.md", "\n".join(lines))
    summary["targets"] = [list(check) for check in checks]
    write_text_atomically(output_dir / "study.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {output_dir / 'study.md'}")
    return summary
