"""Faults a hostile or unlucky user meets in training (issue 13): planted payloads, corrupt or foreign checkpoint
files, kills at random moments, divergence, a reused or shared output folder, changed settings on resume."""

import csv
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file
from tiny_runs import tiny_run_args

import pipelines  # noqa: F401  (registers the pipeline classes on diffusers)
from atomic_files import REPLACED_PREFIX, TEMPORARY_PREFIX
from commands import run
from training import train as train_module
from training.checkpointing import CheckpointError, check_checkpoint, list_checkpoints
from training.config import ConfigError, load_config
from training.run_folder import LOCK_FILENAME
from training.setup import build_training_setup
from training.train import TrainingDivergedError, train

REPO = Path(__file__).resolve().parent.parent
HOOKED_TRAIN = str(REPO / "tests" / "train_with_hooks.py")
# 16 images, batch 2: 8 optimizer steps per epoch; a checkpoint every 2 steps, 2 kept.
ARGS = tiny_run_args(
    **{
        "train.batch_size": 2,
        "ema.decay": 0.9,
        "model.overrides.dropout": 0.1,
        "checkpoint.every_steps": 2,
        "checkpoint.checkpoints_total_limit": 2,
    }
)


def _env():
    # Same thread count as this process: CPU kernels may split sums differently with more threads.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _train(output_dir: Path, *extra: str) -> Path:
    return train_module.main([*ARGS, "--output_dir", str(output_dir), *extra])


def _resume(output_dir: Path, checkpoint: str = "latest", *extra: str) -> Path:
    return _train(output_dir, "--checkpoint.resume_from_checkpoint", checkpoint, *extra)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 4 steps (checkpoints 2 and 4), trained once for the tests that copy and tamper with it."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    _train(output_dir, "--train.max_steps", "4")
    return output_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# --------------------------------------------------------------------------------------------------
# Security: nothing planted in a checkpoint, a pipeline folder or a LoRA file runs
# --------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates the marker file (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, kind: str) -> None:
    if kind == "torch":
        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


CHECKPOINT_FILES = [
    "model.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
    "ema.safetensors",
    "metrics.csv",
    "training_state.json",
    # Files this loop never writes, planted beside the real ones:
    "custom_checkpoint_0.pkl",
    "pytorch_model.bin",
    "scheduler.bin",
    "scaler.pt",
]


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_payload_in_any_checkpoint_file_is_refused_naming_the_file_and_never_runs(finished_run, tmp_path, kind):
    for name in CHECKPOINT_FILES:
        run_dir = _copy(finished_run, tmp_path / name)
        checkpoint = run_dir / "checkpoints" / "checkpoint-4"
        marker = tmp_path / f"marker-{name}"
        _plant(checkpoint / name, marker, kind)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            _resume(run_dir, str(checkpoint), "--train.max_steps", "6")
        assert not marker.exists(), name
        # `latest` skips the tampered checkpoint and resumes from the older, intact one.
        _resume(run_dir, "latest", "--train.max_steps", "6")
        assert not marker.exists(), name
        assert list_checkpoints(run_dir)[-1].name == "checkpoint-6"


def test_a_checkpoint_of_the_pickle_format_is_refused_with_the_reason(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    state = json.loads((checkpoint / "training_state.json").read_text())
    del state["format"]
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="format 1.*pickles, which can run code"):
        check_checkpoint(checkpoint)


def test_a_payload_in_any_pipeline_or_lora_file_never_runs(finished_run, tmp_path):
    pipeline_dir = finished_run / "last"
    files = [p.relative_to(pipeline_dir) for p in pipeline_dir.rglob("*") if p.is_file()]
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json"} <= set(map(str, files))
    planted = [*files, Path("unet/diffusion_pytorch_model.bin")]
    for relative in planted:
        folder = tmp_path / f"pipeline-{str(relative).replace('/', '-')}"
        shutil.copytree(pipeline_dir, folder)
        marker = tmp_path / f"marker-{relative.name}"
        if relative.suffix == ".bin":
            (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        _plant(folder / relative, marker, "torch")
        try:
            DiffusionPipeline.from_pretrained(folder)
        except Exception:
            pass  # refused: what matters is that nothing ran
        assert not marker.exists(), relative
    # Code placed in a folder is not imported by a load without trust_remote_code.
    folder = tmp_path / "pipeline-with-code"
    shutil.copytree(pipeline_dir, folder)
    marker = tmp_path / "marker-code"
    for module in ("pipeline.py", "unet/unet.py", "scheduler/scheduler.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w')\n")
    DiffusionPipeline.from_pretrained(folder)
    assert not marker.exists()
    # A LoRA file replaced by a payload.
    lora = tmp_path / "lora"
    lora.mkdir()
    marker = tmp_path / "marker-lora"
    _plant(lora / "pytorch_lora_weights.safetensors", marker, "torch")
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir)
    with pytest.raises(Exception):
        pipeline.load_lora_weights(lora)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Inexact resume is refused before training (items 8, 11)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "random_states_0.pkl").unlink(), r"incomplete: \['random_states_0.pkl'\] missing"),
        (lambda c: (c / "random_states_0.pkl").write_bytes(b"\x80\x04trunc"), r"random_states_0\.pkl.*cannot be read"),
        (lambda c: (c / "ema.safetensors").unlink(), r"incomplete: \['ema.safetensors'\] missing"),
        (
            lambda c: save_file({"shadow.0": torch.zeros(3)}, c / "ema.safetensors"),
            r"ema\.safetensors does not match the model",
        ),
        (
            lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]),
            r"model\.safetensors is not a readable safetensors file",
        ),
        (
            lambda c: save_file(
                {k: v * float("nan") for k, v in load_file(c / "model.safetensors").items()}, c / "model.safetensors"
            ),
            "NaN or infinite",
        ),
        (lambda c: (c / "training_state.json").write_text("{"), r"training_state\.json is not valid JSON"),
        (lambda c: (c / "metrics.csv").write_text("step\nfour\n"), r"metrics\.csv is not the metrics log"),
    ],
)
def test_a_damaged_checkpoint_is_refused_before_training_and_latest_falls_back(finished_run, tmp_path, damage, message):
    run_dir = _copy(finished_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        _resume(run_dir, str(checkpoint), "--train.max_steps", "6")
    assert list_checkpoints(run_dir)[-1].name == "checkpoint-4"  # nothing was trained or saved


def test_latest_skips_a_corrupt_newest_checkpoint_says_so_and_resumes_exactly(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    newest = run_dir / "checkpoints" / "checkpoint-4"
    # Copies: the loaded tensors may map the file, which is about to be overwritten in place.
    expected = {k: v.clone() for k, v in load_file(newest / "model.safetensors").items()}
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:-100])
    _resume(run_dir, "latest", "--train.max_steps", "4")  # from checkpoint-2, to the same end as the first time
    assert "not resuming from checkpoint-4, the newest checkpoint" in capsys.readouterr().out
    actual = load_file(newest / "model.safetensors")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    _resume(run_dir, "latest", "--train.max_steps", "6")
    # Every checkpoint is damaged: an error that names each one and why.
    (run_dir / "checkpoints" / "checkpoint-6" / "optimizer.bin").write_bytes(b"")
    (run_dir / "checkpoints" / "checkpoint-4" / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="No checkpoint .* can be resumed from.*checkpoint-6.*checkpoint-4"):
        _resume(run_dir, "latest", "--train.max_steps", "8")


def test_leftovers_of_a_kill_during_pruning_are_removed_on_the_next_start(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    checkpoints = run_dir / "checkpoints"
    # What a kill inside `shutil.rmtree` of a pruned checkpoint leaves: a hidden, half-deleted folder.
    half = checkpoints / f"{TEMPORARY_PREFIX}pruned-checkpoint-2"
    os.rename(checkpoints / "checkpoint-2", half)
    (half / "model.safetensors").unlink()
    _resume(run_dir, "latest", "--train.max_steps", "6")
    assert "left half-written by a killed run" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]


# --------------------------------------------------------------------------------------------------
# Divergence (item 3)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_a_non_finite_learning_rate_is_refused(value):
    with pytest.raises(ConfigError, match="optim.learning_rate must be a finite number"):
        load_config(["--optim.learning_rate", value])


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    output_dir = tmp_path / "run"
    calls = []

    def setup_with_a_loss_that_diverges(config, accelerator):
        setup = build_training_setup(config, accelerator)

        def objective(*args):
            calls.append(1)
            loss = setup.objective(*args)
            return loss * float("nan") if len(calls) >= 5 else loss

        return replace(setup, objective=objective)

    config = load_config([*ARGS, "--output_dir", str(output_dir), "--train.max_steps", "8"])
    with pytest.raises(TrainingDivergedError, match=r"The loss became nan at optimizer step 5.*checkpoint-4"):
        train(config, build_setup=setup_with_a_loss_that_diverges)
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-4"]
    check_checkpoint(output_dir / "checkpoints" / "checkpoint-4")  # intact and finite
    assert not (output_dir / "last").exists() and not (output_dir / "best").exists()
    assert not (output_dir / LOCK_FILENAME).exists()


# --------------------------------------------------------------------------------------------------
# The output folder: earlier runs, concurrent runs, changed settings (items 5, 6, 10)
# --------------------------------------------------------------------------------------------------
def test_an_earlier_run_without_checkpoints_is_not_overwritten_unless_asked(tmp_path, capsys):
    output_dir = tmp_path / "run"
    no_checkpoints = ["--checkpoint.every_steps", "0", "--train.max_steps", "2"]
    _train(output_dir, *no_checkpoints)
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds the outputs of an earlier run \(config.yaml, metrics.csv"):
        _train(output_dir, *no_checkpoints, "--train.seed", "1")
    assert {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before
    # The command line says it in one line, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, [*ARGS, "--output_dir", str(output_dir), *no_checkpoints])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    # `latest` with a different config is refused too; the same run started again replaces its own outputs.
    with pytest.raises(ConfigError, match="already holds the outputs"):
        _resume(output_dir, "latest", *no_checkpoints, "--train.seed", "1")
    _resume(output_dir, "latest", *no_checkpoints)
    # --overwrite (a bare flag) replaces them.
    _train(output_dir, *no_checkpoints, "--train.seed", "1", "--overwrite")
    assert "seed: 1" in (output_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="exclude each other"):
        _resume(output_dir, "latest", "--overwrite")


def test_a_second_run_in_a_folder_in_use_is_refused_and_a_stale_lock_is_replaced(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    lock = output_dir / LOCK_FILENAME
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = __import__("socket").gethostname()
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": host, "started": 0}))
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {sleeper.pid}"):
            _train(output_dir, "--train.max_steps", "2")
        assert lock.is_file() and not (output_dir / "config.yaml").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone (killed): its lock is stale, replaced, and removed when this run ends.
    _train(output_dir, "--train.max_steps", "2")
    assert "Replaced the stale lock" in capsys.readouterr().out
    assert not lock.exists() and (output_dir / "last").is_dir()


def test_resume_refuses_changed_settings_and_lists_them(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    with pytest.raises(ConfigError, match=r"optim.learning_rate: 0.001 -> 0.5; train.seed: 0 -> 3"):
        _resume(run_dir, "latest", "--train.max_steps", "6", "--optim.learning_rate", "0.5", "--train.seed", "3")
    assert list_checkpoints(run_dir)[-1].name == "checkpoint-4"
    # Training longer and evaluating differently are fine.
    _resume(run_dir, "latest", "--train.max_steps", "6", "--eval.num_inference_steps", "3")
    assert list_checkpoints(run_dir)[-1].name == "checkpoint-6"


# --------------------------------------------------------------------------------------------------
# Kills at random moments (items 9, 11 and the kill loop)
# --------------------------------------------------------------------------------------------------
def _hooked(output_dir: Path, *hooks: str, resume: bool) -> subprocess.CompletedProcess:
    extra = ["--checkpoint.resume_from_checkpoint", "latest"] if resume else []
    command = [sys.executable, HOOKED_TRAIN, *hooks, "--", *ARGS, "--train.max_steps", "12"]
    return subprocess.run(
        [*command, "--output_dir", str(output_dir), *extra],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_random_kills_resume_to_bit_identical_weights_and_a_complete_metrics_log(tmp_path):
    # 12 steps over 2 epochs (8 + 4): checkpoints every 2 steps (2 kept, so pruning runs), last/ and best/ every
    # epoch. A kill lands before a random one of the run's file-system events and micro-batches.
    straight = tmp_path / "straight"
    counted = _hooked(straight, "--count-events", str(tmp_path / "events"), resume=False)
    assert counted.returncode == 0, counted.stderr[-3000:]
    events = int((tmp_path / "events").read_text())
    assert events > 60  # micro-batches, checkpoint writes and prunes, last/ and best/ replacements, metrics.csv

    rng = random.Random(13)
    killed = tmp_path / "killed"
    kills = []
    for attempt in range(5):
        kill_at = rng.randint(1, events)
        result = _hooked(killed, "--kill-at-event", str(kill_at), resume=attempt > 0)
        kills.append((kill_at, result.returncode))
        assert result.returncode in (-9, 0), (kills, result.stderr[-3000:])
    result = _hooked(killed, resume=True)
    assert result.returncode == 0, (kills, result.stderr[-3000:])
    assert sum(rc == -9 for _, rc in kills) >= 3, kills

    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_file(straight / "checkpoints" / "checkpoint-12" / name)
        actual = load_file(killed / "checkpoints" / "checkpoint-12" / name)
        assert all(torch.equal(expected[k], actual[k]) for k in expected), (name, kills)
    for folder in ("last", "best"):
        expected = load_file(straight / folder / "unet" / "diffusion_pytorch_model.safetensors")
        actual = load_file(killed / folder / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(expected[k], actual[k]) for k in expected), (folder, kills)
    # One row per epoch, each averaging all of its steps, as in the uninterrupted run.
    rows = [list(csv.DictReader(open(run_dir / "metrics.csv"))) for run_dir in (straight, killed)]
    columns = ("epoch", "step", "loss", "lr", "val_loss")
    assert [[row[c] for c in columns] for row in rows[1]] == [[row[c] for c in columns] for row in rows[0]], kills
    assert [row["step"] for row in rows[0]] == ["8", "12"]
    leftovers = [p for p in killed.rglob("*") if p.name.startswith((TEMPORARY_PREFIX, REPLACED_PREFIX, ".metrics"))]
    assert not leftovers and not (killed / LOCK_FILENAME).exists(), (leftovers, kills)


def test_an_unreachable_hub_at_the_end_keeps_the_outputs_and_says_how_to_push_later(tmp_path, capsys):
    # This test process is offline (conftest.py): the push fails as it would against an unreachable Hub.
    output_dir = tmp_path / "run"
    push = ["--train.max_steps", "2", "--hub.push_to_hub", "true", "--hub.hub_model_id", "user/digits"]
    with pytest.raises(SystemExit) as exit_info:
        run(train_module.main, [*ARGS, "--output_dir", str(output_dir), *push])
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(error) == 1
    assert "Every output is kept" in error[0] and f"hf upload user/digits {output_dir / 'best'}" in error[0]
    assert (output_dir / "best" / "model_index.json").is_file() and list_checkpoints(output_dir)
    assert not (output_dir / LOCK_FILENAME).exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda state: state.pop("config"),
        lambda state: state.update(step="4"),
        lambda state: state.update(num_processes=0),
        lambda state: state["epoch_progress"].update(extra=1),
    ],
)
def test_a_tampered_training_state_is_refused(finished_run, tmp_path, edit):
    checkpoint = _copy(finished_run, tmp_path) / "checkpoints" / "checkpoint-4"
    state = json.loads((checkpoint / "training_state.json").read_text())
    edit(state)
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="is not a training state this loop wrote"):
        check_checkpoint(checkpoint)


def test_weights_that_turn_non_finite_on_the_last_step_are_never_saved_as_a_pipeline(tmp_path):
    output_dir = tmp_path / "run"
    calls = []

    def setup_whose_last_step_breaks_the_weights(config, accelerator):
        setup = build_training_setup(config, accelerator)

        def objective(model, *args):
            calls.append(1)
            loss = setup.objective(model, *args)  # finite: the loss check cannot see what comes next
            if len(calls) == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))
            return loss

        return replace(setup, objective=objective)

    config = load_config([*ARGS, "--output_dir", str(output_dir), "--train.max_steps", "3"])
    with pytest.raises(TrainingDivergedError, match=r"The weights \[.*\] became non-finite at optimizer step 3"):
        train(config, build_setup=setup_whose_last_step_breaks_the_weights)
    assert not (output_dir / "last").exists() and [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-2"]
