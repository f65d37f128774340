"""Benchmark: training-step throughput and peak memory of our models against diffusers' references.

    python benchmarks/bench_models.py                  # full run: batch 128, 15 rounds (~6 min on 2 idle cores)
    python benchmarks/bench_models.py --quick          # batch 16, 2 rounds: checks that it runs (< 1 min)
    python benchmarks/bench_models.py --models dit,gqa --threads 2 --out benchmarks/results/models.md

Each group compares models of about the same parameter count and the same token count:

- unet:  `ScratchUNetModel` preset "medium" vs `UNet2DModel` (channels 32/64/128, attention at 2 levels, class embedding);
- dit:   `ScratchDiTModel` (patch 4, 6 layers x 192, 6 heads) vs `DiTTransformer2DModel` of the same dimensions;
- mmdit: `ScratchMMDiTModel` (patch 4, 6 layers x 192, 4 class tokens) vs `SD3Transformer2DModel` given 4 context
  tokens and a pooled vector of the widths our class tokens and class embedding have;
- gqa:   our DiT at width 192 with 8 query heads and 8 (plain multi-head), 2 or 1 key/value heads.

A training step is forward on a batch of 1x32x32 images, MSE loss, backward, AdamW step and
`zero_grad(set_to_none=True)`, in fp32 by default (`--precision bf16 / fp16`: autocast, fp16 with a loss scaler;
fp16 on CUDA only. bf16 on a CPU is fast only where it has bf16 instructions: on this project's AVX512-BF16 machine
a 2048x2048 bf16 matmul ran 2.1-2.3x the fp32 rate, on CPUs without them it is many times slower). After warm-up
steps, the models of every group take turns in one process, one block of steps each per round, so a
change in the machine's load hits all of them alike. The table reports the median step time, images/s,
and the speed ratio to the group's reference (> 1: faster than the reference).

FLOP utilisation: `torch.utils.flop_counter` counts each model's forward + backward FLOPs of one step (matmuls,
convolutions, attention; the elementwise rest and AdamW are not counted); divided by the median step time that is
the model's achieved GFLOP/s, shown as a share of this machine's matmul peak in the same precision, measured in the same run
(a 2048x2048 matmul, best of its timings before, between and after the rounds).

Peak memory is what one training step needs from PyTorch's allocator: the model's persistent tensors
(parameters, buffers, AdamW state) plus the highest transient allocation during the step (activations,
gradients, temporaries), measured on CUDA with `torch.cuda.max_memory_allocated` and on CPU with
`torch.profiler`'s allocator events. It excludes the input batch (shared by all models), the Python heap,
allocator overhead and the scratch buffers oneDNN/OpenMP allocate on their own, so process RSS is larger.
"""

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DModel
from torch import nn
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from atomic_files import write_text_atomically  # noqa: E402
from custom_models.dit_gqa import ScratchDiTModel  # noqa: E402
from custom_models.mmdit import ScratchMMDiTModel  # noqa: E402
from custom_models.unet import ScratchUNetModel  # noqa: E402

SAMPLE_SIZE = 32
IN_CHANNELS = 1
NUM_CLASSES = 10
PATCH_SIZE = 4
NUM_LAYERS = 6
WIDTH = 192
NUM_HEADS = 6
NUM_CONTEXT_TOKENS = 4
GQA_QUERY_HEADS = 8
GQA_KV_HEADS = (8, 2, 1)
DEFAULT_OUT = REPO / "benchmarks" / "results" / "models.md"
QUICK_OUT = REPO / "benchmarks" / "results" / "models_quick.md"
# Training precisions: fp32, or autocast to a 16-bit type (fp16 with a loss scaler, as a real fp16 run needs).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# What is trained: one shared batch, and each model with its own optimizer
# --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Inputs and regression target of one training step; every model sees the same tensors."""

    sample: torch.Tensor
    target: torch.Tensor
    timestep: torch.Tensor
    class_labels: torch.Tensor
    # For SD3: the context tokens and pooled vector our MMDiT derives from `class_labels` itself.
    context_tokens: torch.Tensor
    pooled: torch.Tensor


def make_batch(batch_size: int, device: torch.device) -> Batch:
    """A fixed random batch: data loading is not what is measured."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, IN_CHANNELS, SAMPLE_SIZE, SAMPLE_SIZE)
    tensors = Batch(
        sample=torch.randn(shape, generator=generator),
        target=torch.randn(shape, generator=generator),
        # Float timesteps in [0, 1000): the one scale every model here accepts.
        timestep=torch.rand(batch_size, generator=generator) * 1000,
        class_labels=torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        context_tokens=torch.randn(batch_size, NUM_CONTEXT_TOKENS, WIDTH, generator=generator),
        pooled=torch.randn(batch_size, WIDTH, generator=generator),
    )
    return Batch(**{name: value.to(device) for name, value in vars(tensors).items()})


@dataclass
class Contender:
    """One model in a comparison, with its AdamW optimizer and the measurements taken so far."""

    name: str
    model: nn.Module
    predict: Callable[[nn.Module, Batch], torch.Tensor]
    device: torch.device
    precision: str = "fp32"  # a key of PRECISIONS
    step_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    flops: int = 0  # forward + backward of one training step, as torch's FLOP counter counts them
    largest_batch: int | None = None  # with --largest_batch: the largest batch tried whose step fitted

    def __post_init__(self):
        self.model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.set_precision(self.precision)

    def set_precision(self, precision: str) -> None:
        """Weights and optimizer stay fp32 (mixed precision); forward and loss run under autocast."""
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def persistent_bytes(self) -> int:
        """Bytes of the tensors that live between steps: parameters, buffers and AdamW state."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [
            value for state in self.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Group:
    """Models compared side by side; speed and memory ratios are taken against `reference`."""

    title: str
    candidates: list[Contender]
    reference: Contender

    @property
    def contenders(self) -> list[Contender]:
        return [*self.candidates, self.reference]


def predict_class_conditional(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Our three models, `UNet2DModel` and `DiTTransformer2DModel` share `(sample, timestep, class_labels=)`."""
    return model(batch.sample, batch.timestep, class_labels=batch.class_labels).sample


def predict_sd3(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(
        batch.sample,
        encoder_hidden_states=batch.context_tokens,
        pooled_projections=batch.pooled,
        timestep=batch.timestep,
    ).sample


# --------------------------------------------------------------------------------------------------
# The groups
# --------------------------------------------------------------------------------------------------
def unet_group(device: torch.device) -> Group:
    ours = ScratchUNetModel.from_preset(
        "medium", sample_size=SAMPLE_SIZE, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES
    )
    # Our UNet has 4 heads everywhere, diffusers a fixed head width: 16 gives the same 4 heads on the
    # 16x16 level, where the attention over 256 tokens costs most (8 heads instead of 4 on 8x8).
    theirs = UNet2DModel(
        sample_size=SAMPLE_SIZE,
        in_channels=IN_CHANNELS,
        out_channels=IN_CHANNELS,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=NUM_CLASSES,
    )
    return Group(
        "UNet 32/64/128, self-attention on 16x16 and 8x8 tokens, class embedding",
        [Contender('ours ScratchUNetModel "medium"', ours, predict_class_conditional, device)],
        Contender("diffusers UNet2DModel", theirs, predict_class_conditional, device),
    )


def dit_group(device: torch.device) -> Group:
    # Plain multi-head attention like the reference: the gqa group measures what fewer K/V heads change.
    ours = ScratchDiTModel.from_preset(
        "small",
        sample_size=SAMPLE_SIZE,
        in_channels=IN_CHANNELS,
        num_classes=NUM_CLASSES,
        patch_size=PATCH_SIZE,
        hidden_size=WIDTH,
        num_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_kv_heads=NUM_HEADS,
    )
    # 0.44M more parameters than ours: every diffusers DiT block has its own timestep/label embedding MLP
    # (0.53M in all, run on [batch] vectors: negligible compute), where ours shares one.
    theirs = DiTTransformer2DModel(
        sample_size=SAMPLE_SIZE,
        in_channels=IN_CHANNELS,
        out_channels=IN_CHANNELS,
        patch_size=PATCH_SIZE,
        num_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        attention_head_dim=WIDTH // NUM_HEADS,
        num_embeds_ada_norm=NUM_CLASSES,
    )
    return Group(
        f"DiT, patch {PATCH_SIZE} ({(SAMPLE_SIZE // PATCH_SIZE) ** 2} tokens), {NUM_LAYERS} layers x {WIDTH}, "
        f"{NUM_HEADS} heads",
        [Contender("ours ScratchDiTModel", ours, predict_class_conditional, device)],
        Contender("diffusers DiTTransformer2DModel", theirs, predict_class_conditional, device),
    )


def mmdit_group(device: torch.device) -> Group:
    ours = ScratchMMDiTModel.from_preset(
        "small",
        sample_size=SAMPLE_SIZE,
        in_channels=IN_CHANNELS,
        num_classes=NUM_CLASSES,
        patch_size=PATCH_SIZE,
        hidden_size=WIDTH,
        num_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_kv_heads=NUM_HEADS,
        num_class_tokens=NUM_CONTEXT_TOKENS,
    )
    # Our class tokens and class embedding are WIDTH wide: SD3 gets context and pooled inputs of that width.
    theirs = SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE,
        patch_size=PATCH_SIZE,
        in_channels=IN_CHANNELS,
        out_channels=IN_CHANNELS,
        num_layers=NUM_LAYERS,
        attention_head_dim=WIDTH // NUM_HEADS,
        num_attention_heads=NUM_HEADS,
        joint_attention_dim=WIDTH,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        pos_embed_max_size=SAMPLE_SIZE // PATCH_SIZE,
        qk_norm="rms_norm",
    )
    return Group(
        f"MMDiT, {(SAMPLE_SIZE // PATCH_SIZE) ** 2} image + {NUM_CONTEXT_TOKENS} context tokens, {NUM_LAYERS} layers x "
        f"{WIDTH}, {NUM_HEADS} heads, RMSNorm on Q/K",
        [Contender("ours ScratchMMDiTModel", ours, predict_class_conditional, device)],
        Contender("diffusers SD3Transformer2DModel", theirs, predict_sd3, device),
    )


def gqa_group(device: torch.device) -> Group:
    def dit(num_kv_heads: int) -> Contender:
        model = ScratchDiTModel.from_preset(
            "small",
            sample_size=SAMPLE_SIZE,
            in_channels=IN_CHANNELS,
            num_classes=NUM_CLASSES,
            patch_size=PATCH_SIZE,
            hidden_size=WIDTH,
            num_layers=NUM_LAYERS,
            num_attention_heads=GQA_QUERY_HEADS,
            num_kv_heads=num_kv_heads,
        )
        return Contender(f"ours ScratchDiTModel, {num_kv_heads} kv heads", model, predict_class_conditional, device)

    mha, *grouped = (dit(num_kv_heads) for num_kv_heads in GQA_KV_HEADS)
    return Group(
        f"our DiT, {(SAMPLE_SIZE // PATCH_SIZE) ** 2} tokens, {NUM_LAYERS} layers x {WIDTH}, {GQA_QUERY_HEADS} query "
        f"heads: grouped K/V heads vs multi-head",
        grouped,
        mha,
    )


GROUP_BUILDERS: dict[str, Callable[[torch.device], Group]] = {
    "unet": unet_group,
    "dit": dit_group,
    "mmdit": mmdit_group,
    "gqa": gqa_group,
}


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def train_step(contender: Contender, batch: Batch) -> None:
    """Forward, MSE loss, backward, AdamW step, gradients freed."""
    with contender.autocast():
        output = contender.predict(contender.model, batch)
        loss = F.mse_loss(output.float(), batch.target)
    if contender.scaler is None:
        loss.backward()
        contender.optimizer.step()
    else:
        contender.scaler.scale(loss).backward()
        contender.scaler.step(contender.optimizer)
        contender.scaler.update()
    contender.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_train_step(contender: Contender, batch: Batch) -> float:
    """Seconds of one training step, GPU work included."""
    synchronize(contender.device)
    start = time.perf_counter()
    train_step(contender, batch)
    synchronize(contender.device)
    return time.perf_counter() - start


def transient_peak_bytes(contender: Contender, batch: Batch) -> int:
    """Highest allocation during one training step above what was allocated before it."""
    device = contender.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(contender, batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(contender, batch)
    # The trace's "[memory]" events are the allocator's allocations (+bytes) and frees (-bytes) in time order.
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace_path)
        with open(trace_path) as trace_file:
            events = json.load(trace_file)["traceEvents"]
    memory_events = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    return max(itertools.accumulate(e["args"]["Bytes"] for e in memory_events), default=0)


def train_step_flops(contender: Contender, batch: Batch) -> int:
    """FLOPs of one step's forward and backward (the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, contender.autocast():
        output = contender.predict(contender.model, batch)
        F.mse_loss(output.float(), batch.target).backward()
    contender.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, precision: str = "fp32", size: int = 2048, repeats: int = 5) -> float:
    """This machine's matmul rate in `precision`: the best of `repeats` timed `size`x`size` products, in GFLOP/s."""
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.randn(size, size, generator=generator).to(device, PRECISIONS[precision]) for _ in range(2))
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def run_groups(groups: list[Group], batch: Batch, warmup_steps: int, rounds: int, steps_per_round: int) -> float:
    """Warm up, count FLOPs, measure memory, then time all models in alternating rounds; returns the matmul peak
    (GFLOP/s, in the models' precision) measured before, halfway through and after the rounds."""
    contenders = [c for group in groups for c in group.contenders]
    device, precision = contenders[0].device, contenders[0].precision
    peaks = [matmul_gflops(device, precision)]
    for contender in contenders:
        for _ in range(warmup_steps):
            train_step(contender, batch)
        contender.flops = train_step_flops(contender, batch)
        # After warm-up, so AdamW's state exists and counts as persistent.
        contender.peak_bytes = contender.persistent_bytes() + transient_peak_bytes(contender, batch)
    start = time.perf_counter()
    for round_index in range(rounds):
        if round_index == rounds // 2:
            peaks.append(matmul_gflops(device, precision))
        for group in groups:
            # Reverse the order every other round: neither model always runs right after the other.
            order = group.contenders if round_index % 2 == 0 else group.contenders[::-1]
            for contender in order:
                contender.step_seconds += [timed_train_step(contender, batch) for _ in range(steps_per_round)]
        print(
            f"round {round_index + 1}/{rounds} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True
        )
    peaks.append(matmul_gflops(device, precision))
    return max(peaks)


def find_largest_batch(contender: Contender, start: int, limit: int) -> int | None:
    """The largest of start, 2 * start, 4 * start, ... <= `limit` whose training step fits in GPU memory (None: not
    even `start`). Each size is tried once, after the timed rounds (the steps change the weights)."""
    largest, size = None, start
    while size <= limit:
        try:
            train_step(contender, make_batch(size, contender.device))
            synchronize(contender.device)
            largest = size
        except torch.OutOfMemoryError:
            break
        finally:
            contender.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        size *= 2
    return largest


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------
def median_step(contender: Contender) -> float:
    return statistics.median(contender.step_seconds)


def interquartile_range(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return high - low


def results_table(groups: list[Group], batch_size: int, matmul_peak_gflops: float) -> str:
    with_largest = any(c.largest_batch is not None for group in groups for c in group.contenders)
    header = (
        "| group | model | params (M) | ms/step (median) | IQR (ms) | img/s | speed vs ref | GFLOP/step | GFLOP/s "
        "| % of matmul peak | peak MiB | memory ref/this |" + (" largest batch |" if with_largest else "") + "\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_largest else "") + "\n"
    )
    rows = []
    for group_index, group in enumerate(groups, start=1):
        reference_step = median_step(group.reference)
        for contender in group.contenders:
            is_reference = contender is group.reference
            step = median_step(contender)
            speed = "ref" if is_reference else f"{reference_step / step:.2f}"
            memory = "ref" if is_reference else f"{group.reference.peak_bytes / contender.peak_bytes:.2f}"
            achieved = contender.flops / step / 1e9
            rows.append(
                f"| {group_index} | {contender.name} | {contender.num_parameters / 1e6:.2f} | {step * 1e3:.0f} | "
                f"{interquartile_range(contender.step_seconds) * 1e3:.0f} | {batch_size / step:.1f} | {speed} | "
                f"{contender.flops / 1e9:.1f} | {achieved:.0f} | {100 * achieved / matmul_peak_gflops:.0f}% | "
                f"{contender.peak_bytes / 2**20:.0f} | {memory} |"
                + (f" {contender.largest_batch or 'none'} |" if with_largest else "")
            )
    legend = "\n".join(f"{i}. {group.title}" for i, group in enumerate(groups, start=1))
    return header + "\n".join(rows) + "\n\nGroups:\n\n" + legend + "\n"


def report(groups: list[Group], settings: str, batch_size: int, matmul_peak_gflops: float, precision: str) -> str:
    largest = any(c.largest_batch is not None for group in groups for c in group.contenders)
    return (
        "# Model training-step benchmark\n\n"
        f"{settings}\n\n"
        + results_table(groups, batch_size, matmul_peak_gflops)
        + "\n`speed vs ref` = img/s of the row / img/s of the group's reference (> 1: faster). "
        "`GFLOP/step`: forward + backward FLOPs counted by `torch.utils.flop_counter` (matmuls, convolutions, "
        f"attention); `GFLOP/s` = that / median step time; `% of matmul peak` = that / {matmul_peak_gflops:.0f} "
        f"GFLOP/s, this machine's {precision} 2048x2048 matmul measured in the same run (the elementwise work, GroupNorm, "
        "activations and AdamW take time but count no FLOPs, so 100% is out of reach). "
        "`memory ref/this` = reference peak / row peak (> 1: less memory). Peak = parameters, buffers and AdamW "
        "state plus the highest transient allocation of one step (activations, gradients, temporaries) as "
        "requested from PyTorch's allocator; it excludes the shared input batch, allocator overhead and "
        "oneDNN/OpenMP scratch buffers, so process RSS is larger."
        + (
            " `largest batch`: the largest of batch x 1, 2, 4, ... (up to --max_batch) whose training step fitted in "
            "GPU memory, each tried once after the timed rounds."
            if largest
            else ""
        )
        + "\n"
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def model_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUP_BUILDERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown model group(s) {unknown or [text]}; choose from {list(GROUP_BUILDERS)}"
        )
    return names


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def resolve_device(parser: argparse.ArgumentParser, choice: str, precision: str, flag: str) -> torch.device:
    """`--device auto|cpu|cuda` (auto: CUDA if present) as a device; refuses CUDA without a GPU and fp16 on CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")
    if precision == "fp16" and device.type != "cuda":
        parser.error(f"{flag} fp16 needs a CUDA device: CPUs run fp16 matmuls without fast kernels (minutes a step)")
    return device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 16, 2 rounds: check that the script runs (< 1 min)")
    parser.add_argument("--batch_size", type=positive_int, help="images per step (default 128; 16 with --quick)")
    parser.add_argument("--rounds", type=positive_int, help="alternating timing rounds (default 15; 2 with --quick)")
    parser.add_argument("--steps_per_round", type=positive_int, default=1, help="timed steps per model per round")
    parser.add_argument(
        "--warmup_steps",
        type=positive_int,
        default=1,
        help="untimed steps per model before measuring (>= 1: AdamW state must exist when memory is measured)",
    )
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if present")
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="fp32, or autocast to bf16 / fp16 (fp16 with a loss scaler); weights and AdamW stay fp32",
    )
    parser.add_argument(
        "--largest_batch",
        action="store_true",
        help="CUDA only: after timing, double the batch until a step no longer fits in GPU memory",
    )
    parser.add_argument("--max_batch", type=positive_int, default=65536, help="largest batch --largest_batch tries")
    parser.add_argument(
        "--models", type=model_list, default=list(GROUP_BUILDERS), help=f"comma list from {list(GROUP_BUILDERS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"markdown file (default {DEFAULT_OUT.relative_to(REPO)}; {QUICK_OUT.relative_to(REPO)} with --quick)",
    )
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (16 if args.quick else 128)
    args.rounds = args.rounds or (2 if args.quick else 15)
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    args.device = resolve_device(parser, args.device, args.precision, "--precision")
    if args.largest_batch and args.device.type != "cuda":
        parser.error(
            "--largest_batch needs a CUDA device: on CPU a batch too large for RAM swaps or is killed instead of "
            "raising an out-of-memory error"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    torch.manual_seed(0)
    wall_start = time.perf_counter()

    groups = [GROUP_BUILDERS[name](device) for name in args.models]
    for group in groups:
        for contender in group.contenders:
            contender.set_precision(args.precision)
            ratio = contender.num_parameters / group.reference.num_parameters
            print(f"{contender.name}: {contender.num_parameters / 1e6:.3f}M parameters ({ratio:.2f}x the reference)")
    batch = make_batch(args.batch_size, device)

    matmul_peak = run_groups(groups, batch, args.warmup_steps, args.rounds, args.steps_per_round)
    if args.largest_batch:
        del batch
        for contender in (c for group in groups for c in group.contenders):
            contender.largest_batch = find_largest_batch(contender, args.batch_size, args.max_batch)
            print(f"{contender.name}: largest batch {contender.largest_batch}", file=sys.stderr, flush=True)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    precision = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + loss scaling"}[args.precision]
    if device.type == "cuda" and args.precision == "fp32":
        precision += f" (TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
    settings = (
        f"{device_name}; {precision}; batch {args.batch_size} of {IN_CHANNELS}x{SAMPLE_SIZE}x{SAMPLE_SIZE}; step = forward, MSE, "
        f"backward, AdamW, zero_grad; {args.warmup_steps} warm-up step(s), then {args.rounds} alternating rounds x "
        f"{args.steps_per_round} step(s) per model; torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"{args.precision} matmul peak {matmul_peak:.0f} GFLOP/s; wall time {time.perf_counter() - wall_start:.0f} s."
    )
    text = report(groups, settings, args.batch_size, matmul_peak, args.precision)
    write_text_atomically(args.out, text)
    print(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    from commands import run

    run(main)
