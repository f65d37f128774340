"""Where a training step's time goes: our models and diffusers' references, op by op, side by side.

    python benchmarks/profile_models.py --threads 2      # batch 64, 3 rounds x 2 profiled steps per model (~2 min)
    python benchmarks/profile_models.py --quick          # batch 8, 1 round of 1 step: checks that it runs

The models and the step are `bench_models.py`'s (same groups, same sizes and token counts). For each model, the
forward and backward of a few steps run under `torch.profiler` and every op's self CPU time is put in one of a few
kinds (matmul, convolution, attention kernel, normalization, activation, copies and layout, the elementwise rest);
the AdamW step is timed on its own. The models take turns in rounds (a change in the machine's load hits all of them
alike) and each kind's median over the rounds is reported. The table gives milliseconds per step of each kind and, per group, how much
more (+) or less (-) time our model spends on it than the reference: that is where one wins or loses, which the
plain step times of `bench_models.py` do not say. The profiler adds a little overhead to every op, so the totals
are a bit above `bench_models.py`'s step times; compare kinds, not totals, across the two scripts.
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models  # noqa: E402  (the groups, the batch and the step; it puts the repository on sys.path)

from atomic_files import write_text_atomically  # noqa: E402

REPO = bench_models.REPO
DEFAULT_OUT = REPO / "benchmarks" / "results" / "profile.md"
QUICK_OUT = REPO / "benchmarks" / "results" / "profile_quick.md"

# Op kinds, by the aten op's name (first match wins). Views (transpose, view, expand) take no time of their own.
KINDS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("convolution", ("conv",)),
    ("attention kernel", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "aten::softmax")),
    ("normalization", ("layer_norm", "group_norm", "rms_norm", "batch_norm")),
    ("activation", ("gelu", "silu", "sigmoid", "tanh", "relu")),
    ("copies and layout", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "_to_copy", "aten::index")),
]
COLUMNS = [kind for kind, _ in KINDS] + ["elementwise rest", "AdamW step"]


def op_kind(name: str) -> str:
    for kind, patterns in KINDS:
        if any(pattern in name for pattern in patterns):
            return kind
    return "elementwise rest"


def profile_contender(contender, batch, steps: int) -> dict[str, float]:
    """Milliseconds per step by kind for one model (one untimed step first, so AdamW's state exists)."""
    bench_models.train_step(contender, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            output = contender.predict(contender.model, batch)
            F.mse_loss(output, batch.target).backward()
            contender.model.zero_grad(set_to_none=True)
    per_kind = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            per_kind[op_kind(event.key)] += event.self_cpu_time_total / 1000 / steps
    # The optimizer step alone (gradients of one more backward in place), timed without the profiler.
    output = contender.predict(contender.model, batch)
    F.mse_loss(output, batch.target).backward()
    started = time.perf_counter()
    for _ in range(steps):
        contender.optimizer.step()
    per_kind["AdamW step"] = (time.perf_counter() - started) * 1000 / steps
    contender.optimizer.zero_grad(set_to_none=True)
    return dict(per_kind)


def median_per_kind(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {kind: statistics.median(r.get(kind, 0.0) for r in rounds) for kind in COLUMNS}


def table(groups, results: dict) -> str:
    header = "| group | model | total ms | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for index, group in enumerate(groups, start=1):
        reference = results[group.reference.name]
        for contender in group.contenders:
            row = results[contender.name]
            total = sum(row.get(kind, 0.0) for kind in COLUMNS)
            cells = []
            for kind in COLUMNS:
                value = row.get(kind, 0.0)
                if contender is group.reference:
                    cells.append(f"{value:.0f}")
                else:
                    cells.append(f"{value:.0f} ({value - reference.get(kind, 0.0):+.0f})")
            lines.append(f"| {index} | {contender.name} | {total:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 step: check that the script runs")
    parser.add_argument("--batch_size", type=bench_models.positive_int, help="images per step (default 64)")
    parser.add_argument(
        "--steps", type=bench_models.positive_int, help="profiled steps per model and round (default 2)"
    )
    parser.add_argument("--rounds", type=bench_models.positive_int, help="alternating rounds (default 3)")
    parser.add_argument("--threads", type=bench_models.positive_int, help="torch intra-op threads")
    parser.add_argument(
        "--models",
        type=bench_models.model_list,
        default=["unet", "dit", "mmdit"],
        help=f"comma list from {list(bench_models.GROUP_BUILDERS)}",
    )
    parser.add_argument("--out", type=Path, help=f"markdown file (default {DEFAULT_OUT.relative_to(REPO)})")
    args = parser.parse_args(argv)
    batch_size = args.batch_size or (8 if args.quick else 64)
    steps = args.steps or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 3)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")  # the kinds are CPU op names; on a GPU use torch.profiler's CUDA view instead
    torch.manual_seed(0)
    started = time.perf_counter()
    groups = [bench_models.GROUP_BUILDERS[name](device) for name in args.models]
    batch = bench_models.make_batch(batch_size, device)
    measured = defaultdict(list)
    for round_index in range(rounds):
        for group in groups:
            for contender in group.contenders:
                measured[contender.name].append(profile_contender(contender, batch, steps))
                total = sum(measured[contender.name][-1].values())
                print(f"round {round_index + 1}/{rounds} {contender.name}: {total:.0f} ms per step", flush=True)
    results = {name: median_per_kind(per_round) for name, per_round in measured.items()}
    text = (
        "# Where the training step's time goes\n\n"
        f"CPU, {torch.get_num_threads()} threads; fp32; batch {batch_size} of 1x32x32; forward + MSE + backward "
        f"under `torch.profiler` ({rounds} alternating rounds x {steps} steps per model; median per kind over the "
        f"rounds), self CPU time per op, put in kinds by op name; AdamW step timed alone; torch {torch.__version__}, diffusers {diffusers.__version__}; wall time "
        f"{time.perf_counter() - started:.0f} s. Generated by `python benchmarks/profile_models.py"
        f"{' --quick' if args.quick else ''}{f' --threads {args.threads}' if args.threads else ''}`.\n\n"
        "Milliseconds per training step; in brackets, ours minus the group's reference (diffusers' model of the "
        "same size, the last row of each group): + where ours spends more.\n\n" + table(groups, results) + "\n\n"
        "Kinds: matmul = `mm` / `addmm` / `bmm` (linear layers, incl. their backward); convolution = every "
        "`conv*` op; attention kernel = the fused scaled-dot-product kernels (forward and backward); "
        "normalization = layer / group / RMS norm and their backward; activation = GELU / SiLU and their "
        "backward; copies and layout = `copy_`, `clone`, `cat`, `_to_copy`, indexing (what layout changes and "
        "concatenations cost); elementwise rest = every other op (adds, multiplies, reductions, the adaLN "
        "modulation, ...).\n"
    )
    write_text_atomically(out, text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    from commands import run  # importable: bench_models put the repository on sys.path

    run(main)
