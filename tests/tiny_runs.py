"""The command-line arguments of tiny training runs, shared by the tests that train (seconds per run on CPU)."""

import sys

from demo_browser import free_port

# 16 MNIST images (4 more for validation), the `tiny` preset, no tracker, cheap evaluations, no checkpoints.
TINY_RUN_SETTINGS = {
    "model.preset": "tiny",
    "data.max_train_samples": 16,
    "data.num_validation_samples": 4,
    "train.batch_size": 4,
    "train.report_to": "none",
    "eval.num_inference_steps": 2,
    "eval.images_per_class": 1,
    "eval.gif": "false",
    "checkpoint.every_steps": 0,
}


def tiny_run_args(**settings) -> list[str]:
    """`--key value` arguments of a tiny run; `settings` (dotted keys, e.g. `**{"train.batch_size": 8}`) override."""
    merged = {**TINY_RUN_SETTINGS, **settings}
    return [item for key, value in merged.items() for item in (f"--{key}", str(value))]


def two_process_launch(*strategy: str) -> list[str]:
    """The command prefix that runs a script as two CPU processes under `accelerate launch` (gloo on a machine
    without GPUs), fp32, no compile; `strategy` picks DDP (`--multi_gpu`) or FSDP (`--use_fsdp ...`).

    Each launch gets its own rendezvous port: with the default (29500) two launches running at once in the two
    pytest-xdist workers collide, and one fails with EADDRINUSE or, worse, its processes join the other's group."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *strategy,
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
