"""Benchmark: what `torch.compile` gives our models on this machine, for the training step and for sampling (issue 17).

    python benchmarks/bench_compile.py --threads 2          # batch 64, 7 rounds (~8 min on 2 cores, mostly compiling)
    python benchmarks/bench_compile.py --quick              # batch 8, 2 rounds, DiT only: checks that it runs
    python benchmarks/bench_compile.py --device cuda --precision bf16 --batch_size 256   # on a GPU

For each of our models (the sizes of `bench_models.py`), an eager copy and a `torch.compile`d copy with the same
weights take turns in one process: a training step (forward, MSE, backward, AdamW) and a sampling step (one
denoiser forward on a CFG-doubled batch under `torch.inference_mode`). The table gives the median times, the
speed-up (eager / compiled) and the one-off compile warm-up, which is excluded from the medians. The project's rule
(issue 17): recipes turn `train.compile` on by default only if it gives at least 10% here. `--precision bf16 / fp16`
runs both copies under autocast (training as in `bench_models.py`, sampling forward too); on CUDA every timing
synchronizes the device first.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_models import (  # noqa: E402
    GROUP_BUILDERS,
    PRECISIONS,
    Contender,
    make_batch,
    resolve_device,
    synchronize,
    timed_train_step,
    train_step,
)

from atomic_files import write_text_atomically  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "compile.md"


def timed_forward(contender: Contender, batch) -> float:
    synchronize(contender.device)
    start = time.perf_counter()
    with torch.inference_mode(), contender.autocast():
        contender.predict(contender.model, batch)
    synchronize(contender.device)
    return time.perf_counter() - start


def measure(name: str, batch_size: int, rounds: int, device: torch.device, precision: str) -> dict:
    eager = GROUP_BUILDERS[name](device).candidates[0]
    eager.set_precision(precision)
    compiled = Contender(eager.name + " (compiled)", copy.deepcopy(eager.model), eager.predict, device, precision)
    compiled.model = torch.compile(compiled.model)
    train_batch, sample_batch = make_batch(batch_size, device), make_batch(2 * batch_size, device)
    warmup = {}
    for contender in (eager, compiled):
        synchronize(device)
        start = time.perf_counter()
        train_step(contender, train_batch)
        timed_forward(contender, sample_batch)
        warmup[contender.name] = time.perf_counter() - start
        train_step(contender, train_batch)
    times = {(c.name, kind): [] for c in (eager, compiled) for kind in ("train", "sample")}
    for round_index in range(rounds):
        order = (eager, compiled) if round_index % 2 == 0 else (compiled, eager)
        for contender in order:
            times[contender.name, "train"].append(timed_train_step(contender, train_batch))
            times[contender.name, "sample"].append(timed_forward(contender, sample_batch))
        print(f"{name}: round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "model": eager.name,
        "train_eager": median[eager.name, "train"],
        "train_compiled": median[compiled.name, "train"],
        "sample_eager": median[eager.name, "sample"],
        "sample_compiled": median[compiled.name, "sample"],
        "warmup": warmup[compiled.name] - warmup[eager.name],
    }


def report(rows: list[dict], settings: str) -> str:
    lines = [
        "# torch.compile benchmark\n",
        settings + "\n",
        "| model | train step eager / compiled (ms) | train speed-up | sampling forward eager / compiled (ms) "
        "| sampling speed-up | compile warm-up (s) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['train_eager'] * 1e3:.0f} / {row['train_compiled'] * 1e3:.0f} | "
            f"{row['train_eager'] / row['train_compiled']:.2f} | {row['sample_eager'] * 1e3:.0f} / "
            f"{row['sample_compiled'] * 1e3:.0f} | {row['sample_eager'] / row['sample_compiled']:.2f} | "
            f"{row['warmup']:.0f} |"
        )
    lines.append(
        "\nSpeed-up = eager time / compiled time (> 1: compile helps). Warm-up: the compiled copy's first training "
        "step and forward minus the eager copy's, i.e. the compile time; not in the medians."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 rounds, DiT only")
    parser.add_argument("--batch_size", type=int, default=None, help="training images per step (default 64)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="auto: CUDA if present")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="fp32, or bf16 / fp16 autocast")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"markdown file (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (8 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 7)
    if batch_size < 1 or rounds < 1:
        parser.error("--batch_size and --rounds must be >= 1")
    device = resolve_device(parser, args.device, args.precision, "--precision")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    names = ("dit",) if args.quick else ("unet", "dit", "mmdit")
    rows = [measure(name, batch_size, rounds, device, args.precision) for name in names]
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    settings = (
        f"{device_name}; {args.precision}; training batch {batch_size}, sampling batch {2 * batch_size} "
        f"(CFG-doubled) of 1x32x32; median of {rounds} alternating rounds; torch {torch.__version__} "
        f"(inductor), diffusers {diffusers.__version__}; wall time {time.perf_counter() - start:.0f} s."
    )
    text = report(rows, settings)
    out = args.out or (REPO / "benchmarks" / "results" / "compile_quick.md" if args.quick else DEFAULT_OUT)
    write_text_atomically(out, text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
