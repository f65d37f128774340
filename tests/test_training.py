"""The training loop: every recipe trains and saves a loadable pipeline; exact resume after a kill; atomic
checkpoints; two CPU processes; refusals at the command line."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from hub_server import FakeHub
from PIL import Image
from safetensors.torch import load_file
from tiny_runs import tiny_run_args, two_process_launch

import pipelines  # noqa: F401  (registers the pipeline classes on diffusers)
from atomic_files import REPLACED_PREFIX, TEMPORARY_PREFIX, recover_directory, write_atomically
from commands import run
from image_data import ShardedBatchSampler
from training import train as train_module
from training.artifacts import METRICS_COLUMNS
from training.checkpointing import latest_checkpoint
from training.config import RECIPES_DIR, ConfigError
from training.setup import idle_cpu_cores_hint
from training.train_vae import main as train_vae_main

REPO = Path(__file__).resolve().parent.parent
# `training.train` with test hooks (kill while checkpointing, dump data order and weights) as loop callbacks.
HOOKED_TRAIN = str(Path(__file__).resolve().parent / "train_with_hooks.py")
HUB_TOKEN = "hf_fakeTokenForLoopbackTestsOnly0123456789"
# A few optimizer steps of a tiny model on a few images, evaluated cheaply.
TINY = tiny_run_args()


def _subprocess_env(**extra):
    # Same thread count as this process: CPU kernels may split sums differently with more threads.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads()), **extra}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A local 32x32 RGB image folder with one subfolder per class, standing in for CIFAR-10."""
    root = tmp_path_factory.mktemp("cifar_like")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A VAE trained for 2 steps by `training/train_vae.py`, as the LDM recipe needs."""
    output = tmp_path_factory.mktemp("vae") / "mnist_vae"
    train_vae_main(
        [
            "--output_dir",
            str(output),
            "--model.block_out_channels",
            "[8, 8]",
            "--model.norm_num_groups",
            "4",
            "--data.max_train_samples",
            "16",
            "--train.batch_size",
            "8",
            "--train.max_steps",
            "2",
            "--train.scaling_samples",
            "16",
        ]
    )
    return output


def _recipe_args(recipe: Path, output_dir: Path, image_folder: Path, vae: Path) -> list[str]:
    args = ["--config", str(recipe), *TINY, "--train.max_steps", "2", "--output_dir", str(output_dir)]
    if recipe.stem.startswith("cifar10"):
        args += ["--data.dataset", str(image_folder), "--data.validation_split", "null"]
    if recipe.stem == "mnist_ldm":
        args += ["--model.vae", str(vae)]
    if recipe.stem == "quickstart":
        # One recipe also exercises the GIF, tensorboard, checkpoint and quality-metric outputs.
        args += [
            "--eval.gif",
            "true",
            "--train.report_to",
            "tensorboard",
            "--checkpoint.every_steps",
            "1",
            "--eval.fid_n",
            "2",
            "--checkpoint.checkpoints_total_limit",
            "1",
        ]
    return args


@pytest.mark.parametrize("recipe", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_trains_and_writes_a_loadable_pipeline(recipe, tmp_path, image_folder, tiny_vae):
    output_dir = tmp_path / recipe.stem
    train_module.main(_recipe_args(recipe, output_dir, image_folder, tiny_vae))

    rows = list(csv.DictReader(open(output_dir / "metrics.csv")))
    assert list(rows[0]) == list(METRICS_COLUMNS)
    assert rows[-1]["step"] == "2" and float(rows[-1]["loss"]) > 0 and float(rows[-1]["val_loss"]) > 0
    assert float(rows[-1]["imgs_per_sec"]) > 0 and float(rows[-1]["peak_mem_mb"]) > 0
    assert (output_dir / "config.yaml").is_file()
    assert (output_dir / "samples" / "epoch_0000.png").is_file()
    saved_objective = yaml.safe_load((output_dir / "config.yaml").read_text())["objective"]
    for folder in ("last", "best"):
        pipe = DiffusionPipeline.from_pretrained(output_dir / folder)
        index = json.loads((output_dir / folder / "model_index.json").read_text())
        assert index["objective"] == saved_objective["name"]
        assert index["prediction_type"] == (
            saved_objective["prediction_type"] if saved_objective["name"] == "diffusion" else None
        )
        assert "Usage" in (output_dir / folder / "README.md").read_text()
        if saved_objective["name"] == "diffusion":  # the recipe's clipping is saved (never for latents)
            assert pipe.scheduler.config.clip_sample == (saved_objective["clip_sample"] and pipe.vae is None)
        assert (output_dir / folder / "samples.png").is_file()
        if recipe.stem.endswith("_text"):
            assert type(pipe).__name__.startswith("TextToImage") and pipe.text_encoder.config.hidden_size == 384
            images = pipe(prompt=["a bold 7"], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
        else:
            num_classes = pipe.denoiser.config.num_classes
            images = pipe(class_labels=[num_classes - 1], num_inference_steps=2, output_type="np").images
        channels = 3 if recipe.stem.startswith("cifar10") else 1
        size = 32 if recipe.stem.startswith("cifar10") or recipe.stem == "mnist_ldm" else 28
        assert images.shape[1:] == (size, size, channels) and np.isfinite(images).all()
    assert (pipe.vae is not None) == (recipe.stem == "mnist_ldm")
    if recipe.stem == "quickstart":
        grid = Image.open(output_dir / "samples" / "epoch_0000.png")
        assert grid.size == (28, 28 * 10)  # one row per class, one column
        gif = Image.open(output_dir / "samples" / "epoch_0000.gif")
        assert gif.n_frames == 3  # the noise and the 2 denoising steps
        assert list((output_dir / "logs").rglob("events.out.tfevents.*"))
        assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-2"]  # total limit 1
        # FID-MNIST and GAN-test accuracy from evaluation/metrics.py, on 2 samples per class; best/ chosen by FID.
        assert (
            float(rows[-1]["fid"]) > 0
            and 0 <= float(rows[-1]["gan_test_acc"]) <= 1
            and rows[-1]["metric_num_samples"] == "20"
        )
        assert "| FID-MNIST |" in (output_dir / "best" / "README.md").read_text()
        state = json.loads((output_dir / "checkpoints" / "checkpoint-2" / "training_state.json").read_text())
        assert state["best"]["name"] == "fid" and state["best"]["value"] == pytest.approx(
            float(rows[-1]["fid"]), rel=1e-5
        )


def _weights(checkpoint: Path) -> dict:
    """Every tensor and counter a checkpoint holds: weights, EMA, optimizer, lr scheduler."""
    tensors = {f"model.{k}": v for k, v in load_file(checkpoint / "model.safetensors").items()}
    tensors.update({f"ema.{k}": v for k, v in load_file(checkpoint / "ema.safetensors").items()})
    state = json.loads((checkpoint / "training_state.json").read_text())
    tensors["ema.optimization_step"] = torch.tensor(state["ema"]["optimization_step"])
    tensors["lr_scheduler.last_epoch"] = torch.tensor(state["lr_scheduler"]["last_epoch"])
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    for index, values in optimizer["state"].items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    return tensors


def test_killed_run_resumes_exactly_and_a_kill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    # 16 images, batch 2 x 2 accumulation steps: 4 optimizer steps per epoch; 6 steps cross an epoch boundary.
    args = [
        *TINY,
        "--train.batch_size",
        "2",
        "--train.gradient_accumulation_steps",
        "2",
        "--train.max_steps",
        "6",
        "--checkpoint.every_steps",
        "2",
        "--eval.every_epochs",
        "100",
        "--ema.decay",
        "0.9",
        "--model.overrides.dropout",
        "0.1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_module.main([*args, "--output_dir", str(straight)])
    # A fresh run into a folder with checkpoints would mix two runs: refused, resuming is the way on.
    with pytest.raises(ConfigError, match="already holds the outputs and resumable checkpoints of an earlier run"):
        train_module.main([*args, "--output_dir", str(straight)])

    # A real process, killed (SIGKILL) while checkpoint-4 is being written: after step 4, mid-epoch 1.
    killed = subprocess.run(
        [sys.executable, HOOKED_TRAIN, "--kill-during-checkpoint", "4", "--", *args, "--output_dir", str(resumed)],
        cwd=REPO,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = resumed / "checkpoints"
    assert (checkpoints / f"{TEMPORARY_PREFIX}checkpoint-4").is_dir()  # the half-written one
    assert latest_checkpoint(resumed) == checkpoints / "checkpoint-2"

    train_module.main([*args, "--output_dir", str(resumed), "--checkpoint.resume_from_checkpoint", "latest"])
    assert not list(checkpoints.glob(TEMPORARY_PREFIX + "*"))
    expected, actual = _weights(straight / "checkpoints" / "checkpoint-6"), _weights(checkpoints / "checkpoint-6")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert json.loads((checkpoints / "checkpoint-6" / "training_state.json").read_text())["step"] == 6
    # The EMA weights are what the saved pipeline holds.
    for folder in ("last", "best"):
        a = load_file(straight / folder / "unet" / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / folder / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [row["step"] for row in rows] == ["4", "6"]  # epoch 0 before the kill, epoch 1 after the resume


def test_evaluations_every_n_steps_end_metrics_rows_and_resume_exactly(tmp_path):
    # 16 images, batch 4: 4 steps per epoch. Evaluations every 2 steps (step 4 is an epoch end: evaluated although
    # eval.every_epochs is not due), checkpoints every 3 steps (inside a row at 3, after the row at 6).
    args = [
        *TINY,
        "--train.max_steps",
        "8",
        "--eval.every_steps",
        "2",
        "--eval.every_epochs",
        "100",
        "--checkpoint.every_steps",
        "3",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_module.main([*args, "--output_dir", str(straight)])
    rows = list(csv.DictReader(open(straight / "metrics.csv")))
    assert [(row["epoch"], row["step"]) for row in rows] == [("0", "2"), ("0", "4"), ("1", "6"), ("1", "8")]
    assert all(row["val_loss"] and row["eval_time_s"] for row in rows)  # every row ends with an evaluation
    # Each row covers the steps since the previous one: images = steps x batch 4.
    images = [float(row["imgs_per_sec"]) * float(row["epoch_time_s"]) for row in rows]
    assert images == pytest.approx([8, 8, 8, 8], rel=1e-3)
    samples = sorted(path.name for path in (straight / "samples").glob("*.png"))
    assert samples == ["epoch_0000.png", "epoch_0001.png", "step_0000002.png", "step_0000006.png"]
    checkpoints = straight / "checkpoints"
    state = json.loads((checkpoints / "checkpoint-3" / "training_state.json").read_text())
    assert state["epoch_progress"]["epoch_steps"] == 1  # step 3, after the row that ended at step 2
    assert [row["step"] for row in csv.DictReader(open(checkpoints / "checkpoint-3" / "metrics.csv"))] == ["2"]
    state = json.loads((checkpoints / "checkpoint-6" / "training_state.json").read_text())
    assert state["epoch_progress"]["epoch_steps"] == 0  # the row at step 6 was written before the checkpoint

    # Killed while writing checkpoint-6, resumed from checkpoint-3: the same rows, the same losses, the same weights.
    killed = subprocess.run(
        [sys.executable, HOOKED_TRAIN, "--kill-during-checkpoint", "6", "--", *args, "--output_dir", str(resumed)],
        cwd=REPO,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    train_module.main([*args, "--output_dir", str(resumed), "--checkpoint.resume_from_checkpoint", "latest"])
    resumed_rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    columns = ("epoch", "step", "loss", "lr", "val_loss")
    assert [[row[c] for c in columns] for row in resumed_rows] == [[row[c] for c in columns] for row in rows]
    expected, actual = _weights(checkpoints / "checkpoint-8"), _weights(resumed / "checkpoints" / "checkpoint-8")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_bf16_mixed_precision_runs_the_forward_in_bf16_and_keeps_float32_weights(tmp_path):
    # bf16 autocast works on CPUs too (slowly): four steps of the tiny UNet, the same seed and data in both runs, at
    # a learning rate high enough that the zero-initialised output moves and precision shows in the loss.
    # The bf16 run gets a process of its own: accelerate's state (mixed precision included) is set once per process.
    args = [
        "--config",
        str(RECIPES_DIR / "quickstart.yaml"),
        *TINY,
        "--train.max_steps",
        "4",
        "--optim.lr_warmup_steps",
        "0",
        "--optim.learning_rate",
        "0.01",
    ]
    train_module.main([*args, "--train.mixed_precision", "no", "--output_dir", str(tmp_path / "no")])
    bf16 = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            *args,
            "--train.mixed_precision",
            "bf16",
            "--output_dir",
            str(tmp_path / "bf16"),
        ],
        cwd=REPO,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    assert "mixed precision bf16" in bf16.stdout + bf16.stderr
    losses = {
        precision: float(list(csv.DictReader(open(tmp_path / precision / "metrics.csv")))[-1]["loss"])
        for precision in ("no", "bf16")
    }
    assert losses["bf16"] != losses["no"]  # the forward pass ran in bf16: the rounding shows in the loss
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.05)
    weights = load_file(tmp_path / "bf16" / "last" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # master weights stay fp32


def test_two_cpu_processes_share_weights_visit_each_image_once_and_push_once(tmp_path):
    debug_dir = tmp_path / "debug"
    debug_dir.mkdir()
    command = [
        *two_process_launch("--multi_gpu"),
        HOOKED_TRAIN,
        "--debug-dir",
        str(debug_dir),
        "--",
        *TINY,
        "--train.num_epochs",
        "2",
        "--output_dir",
        str(tmp_path / "run"),
        "--checkpoint.every_steps",
        "2",
        "--hub.push_to_hub",
        "true",
        "--hub.hub_model_id",
        "user/mnist-tiny",
        "--hub.private",
        "true",
    ]
    # One thread per process (two processes fill the two cores); a loopback Hub, read from HF_ENDPOINT at import.
    env = {k: v for k, v in _subprocess_env(OMP_NUM_THREADS="1").items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"})
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    rank0, rank1 = (load_file(debug_dir / f"weights_rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    seen = {0: [], 1: []}
    for rank in (0, 1):
        for line in open(debug_dir / f"samples_rank{rank}.jsonl"):
            record = json.loads(line)
            assert len(record["indices"]) == 4  # the per-process batch; global batch 8
            seen[record["epoch"]].extend(record["indices"])
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(16)), epoch
    # One writer: one metrics row per epoch, every process's RNG state in the checkpoint, one push.
    assert [row["epoch"] for row in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))] == ["0", "1"]
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / "checkpoint-4").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert hub.unrouted == [], hub.unrouted
    assert [r for r in hub.requests if r.startswith("POST /api/models/user/mnist-tiny/commit")] == [
        "POST /api/models/user/mnist-tiny/commit/main"
    ]
    files = hub.repos["user/mnist-tiny"].resolve("main")[1]
    assert {"model_index.json", "README.md", "samples.png", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    # A pushing run writes best/ self-contained: the generated code travels with it, and the card says how to load it.
    assert {"pipeline_class_conditional.py", "unet/scratch_unet.py"} <= set(files)
    card = files["README.md"].decode()
    assert (
        'from_pretrained("user/mnist-tiny")' in card
        and 'from_pretrained("user/mnist-tiny", trust_remote_code=True)' in card
    )
    assert f"Bearer {HUB_TOKEN}" in hub.authorizations


def test_sharded_sampler_partitions_each_epoch_and_resumes_mid_epoch():
    samplers = [
        ShardedBatchSampler(50, 3, seed=1, rank=r, num_processes=2, gradient_accumulation_steps=2) for r in (0, 1)
    ]
    assert samplers[0].steps_per_epoch == 4 and len(samplers[0]) == 8  # 50 // (2 * 3 * 2) steps of 2 micro-batches
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        indices = [i for sampler in samplers for batch in sampler for i in batch]
        assert len(indices) == len(set(indices)) == 48
    assert samplers[0].epoch_batches(0) != samplers[0].epoch_batches(1)  # reshuffled every epoch
    full = samplers[0].epoch_batches(1)
    samplers[0].set_epoch(1, skip_batches=3)
    assert list(samplers[0]) == full[3:] and len(samplers[0]) == 5
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        ShardedBatchSampler(10, 4, seed=0, num_processes=2, gradient_accumulation_steps=2)


def test_folders_are_replaced_atomically_and_an_interrupted_replacement_is_recovered(tmp_path):
    destination = tmp_path / "last"
    write_atomically(destination, lambda folder: (folder / "weights").write_text("v1"))
    write_atomically(destination, lambda folder: (folder / "weights").write_text("v2"))
    assert (destination / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    # Killed between the two renames: the previous complete folder is put back.
    destination.rename(tmp_path / (REPLACED_PREFIX + "last"))
    recover_directory(destination)
    assert (destination / "weights").read_text() == "v2"
    # Killed while writing: the destination keeps its previous content.
    with pytest.raises(RuntimeError):
        write_atomically(destination, lambda folder: (_ for _ in ()).throw(RuntimeError("killed")))
    assert (destination / "weights").read_text() == "v2"


def test_command_line_refuses_bad_config_before_training(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run(
            train_module.main,
            ["--config", "configs/quickstart.yaml", "--train.batch_sise", "8", "--output_dir", str(tmp_path)],
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Unknown key(s) ['train.batch_sise']") and "'batch_size'" in error
    assert not list(tmp_path.iterdir())  # stopped before writing anything


def test_idle_cpu_cores_hint_names_the_accelerate_flag(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    hint = idle_cpu_cores_hint(torch.device("cpu"), num_processes=1)
    assert "1 of 4 CPU cores" in hint and "--num_cpu_threads_per_process 4" in hint
    two_processes = idle_cpu_cores_hint(torch.device("cpu"), num_processes=2)
    assert "2 of 4 CPU cores" in two_processes and "--num_cpu_threads_per_process 2" in two_processes
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert idle_cpu_cores_hint(torch.device("cpu"), num_processes=2) is None  # all cores busy
    assert idle_cpu_cores_hint(torch.device("cuda"), num_processes=1) is None


def test_best_checkpoint_rule():
    from training.evaluation_step import improves_on

    best = {"name": "fid", "value": 10.0, "step": 5}
    assert improves_on(best, {"fid": 9.0, "val_loss": 0.5}) == ("fid", 9.0)
    assert improves_on(best, {"fid": 11.0}) is None
    # A change of criterion (no FID measured this time) makes the newest evaluation the best.
    assert improves_on(best, {"fid": None, "val_loss": 0.5}) == ("val_loss", 0.5)
    # Samples with NaN pixels never make a best, whatever the other numbers say.
    assert improves_on(best, {"fid": None, "val_loss": 0.1, "metric_nonfinite_samples": 3}) is None
