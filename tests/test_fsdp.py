"""FSDP2 through `accelerate launch --use_fsdp`, run for real on two CPU processes (gloo): the model is sharded,
trains to the weights DDP reaches, checkpoints hold the full state read back safely, and a killed run resumes to
bit-identical weights (`training/fsdp.py`)."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_runs import tiny_run_args, two_process_launch
from training.checkpointing import TEMPORARY_PREFIX, check_checkpoint, latest_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")

from tests.test_training import HOOKED_TRAIN, REPO, _subprocess_env  # noqa: E402

# 16 images, 4 per process and step: 2 optimizer steps per epoch, 6 steps = 3 epochs; dropout and EMA on, so the
# random states and the EMA must be restored for a resume to be exact.
ARGS = [
    *tiny_run_args(),
    "--train.max_steps",
    "6",
    "--checkpoint.every_steps",
    "2",
    "--ema.decay",
    "0.9",
    "--model.overrides.dropout",
    "0.1",
]


def _launch(strategy: list[str], *hooks: str, args=(), output_dir, check=True):
    command = [
        *two_process_launch(*strategy),
        HOOKED_TRAIN,
        # At least one hook: `accelerate launch` drops a "--" that directly follows the script.
        *(hooks or ["--count-events", str(output_dir.parent / f"{output_dir.name}_events.txt")]),
        "--",
        *ARGS,
        *args,
        "--output_dir",
        str(output_dir),
    ]
    # One thread per process: two processes fill the two cores.
    result = subprocess.run(
        command, cwd=REPO, env=_subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# Each UNet block (the model's `_no_split_modules`) is its own FSDP unit, as on a real multi-GPU run.
FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
DDP = ["--multi_gpu"]


def _fsdp_weights(checkpoint) -> dict:
    return torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)


def test_fsdp_shards_the_model_trains_like_ddp_and_a_killed_run_resumes_bit_identically(tmp_path):
    runs = {name: tmp_path / name for name in ("ddp", "fsdp", "resumed")}
    debug = {name: tmp_path / f"debug_{name}" for name in runs}
    for folder in debug.values():
        folder.mkdir()
    _launch(DDP, "--debug-dir", str(debug["ddp"]), output_dir=runs["ddp"])
    result = _launch(FSDP, "--debug-dir", str(debug["fsdp"]), output_dir=runs["fsdp"])
    assert "2 process(es) (FSDP)" in result.stdout + result.stderr

    # Sharded: each process holds about half of every large parameter, the two halves make it whole.
    shards = [json.loads((debug["fsdp"] / f"shards_rank{r}.json").read_text()) for r in (0, 1)]
    total = sum(full for _, full in shards[0].values())
    held = [sum(local for local, _ in shard.values()) for shard in shards]
    assert sum(held) == total and max(held) < 0.6 * total, (held, total)
    unsharded = json.loads((debug["ddp"] / "shards_rank0.json").read_text())
    assert sum(local for local, _ in unsharded.values()) == total

    # The same data order, noise and updates as DDP: the same model and EMA up to float rounding (the gradient
    # norm for clipping is summed over shards in another order).
    ddp, fsdp = (load_file(debug[name] / "weights_rank0.safetensors") for name in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() and any(k.startswith("ema.") for k in ddp)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-6, msg=key)

    # The checkpoint holds the full weights and optimizer state, written by the main process, checked safely.
    checkpoint = runs["fsdp"] / "checkpoints" / "checkpoint-6"
    assert {p.name for p in checkpoint.iterdir()} == {
        "pytorch_model_fsdp.bin",
        "optimizer.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "ema.safetensors",
        "metrics.csv",
        "training_state.json",
    }
    assert check_checkpoint(checkpoint)["num_processes"] == 2
    weights = _fsdp_weights(checkpoint)
    assert {k: v.shape for k, v in weights.items()} == {
        k[len("model.") :]: v.shape for k, v in ddp.items() if k.startswith("model.")
    }
    # The saved pipeline is the plain model holding the EMA weights (`ema.<i>`: the i-th parameter), as without FSDP.
    saved = load_file(runs["fsdp"] / "last" / "unet" / "diffusion_pytorch_model.safetensors")
    assert sorted(saved) == sorted(shards[0])
    for i, name in enumerate(shards[0]):
        assert torch.equal(saved[name], fsdp[f"ema.{i}"]), name

    # Killed while checkpoint-4 is written: resumed from checkpoint-2, it ends where the straight run ended.
    killed = _launch(FSDP, "--kill-during-checkpoint", "4", output_dir=runs["resumed"], check=False)
    assert killed.returncode != 0
    assert latest_checkpoint(runs["resumed"]) == runs["resumed"] / "checkpoints" / "checkpoint-2"
    _launch(FSDP, args=["--checkpoint.resume_from_checkpoint", "latest"], output_dir=runs["resumed"])
    assert not list((runs["resumed"] / "checkpoints").glob(TEMPORARY_PREFIX + "*"))
    expected, actual = _fsdp_weights(checkpoint), _fsdp_weights(runs["resumed"] / "checkpoints" / "checkpoint-6")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    a, b = (
        load_file(run / "checkpoints" / "checkpoint-6" / "ema.safetensors") for run in (runs["fsdp"], runs["resumed"])
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Resuming an FSDP checkpoint without FSDP is refused with the reason (the weights are stored differently).
    refused = _launch(
        DDP,
        args=["--checkpoint.resume_from_checkpoint", "latest", "--train.max_steps", "8"],
        output_dir=runs["fsdp"],
        check=False,
    )
    # (the launcher exits 1 when a process exits with the user-error status 2)
    assert refused.returncode != 0 and "error: " in refused.stderr, refused.stderr[-2000:]
    assert "was written by a run with FSDP and this run does not use FSDP" in refused.stderr, refused.stderr[-2000:]


def test_fsdp_settings_the_loop_cannot_honour_are_refused_before_training(tmp_path):
    version1 = _launch(["--use_fsdp", "--fsdp_version", "1"], output_dir=tmp_path / "v1", check=False)
    assert version1.returncode != 0 and "supports FSDP2 only" in version1.stderr, version1.stderr[-2000:]
    sharded = _launch(
        [*FSDP, "--fsdp_state_dict_type", "SHARDED_STATE_DICT"], output_dir=tmp_path / "sharded", check=False
    )
    assert sharded.returncode != 0 and "FULL_STATE_DICT" in sharded.stderr, sharded.stderr[-2000:]
    assert not (tmp_path / "v1" / "checkpoints").exists() and not (tmp_path / "sharded" / "checkpoints").exists()


def test_lora_fine_tuning_under_fsdp_matches_ddp_and_resumes_bit_identically(tmp_path):
    import shutil

    from tests.test_train_lora import TINY as LORA_TINY
    from tests.test_train_lora import save_base

    base = save_base("dit", tmp_path / "base")
    args = [
        *LORA_TINY,
        "--lora.include_conv",
        "false",
        "--train.num_epochs",
        "2",
        "--checkpoint.every_steps",
        "2",
        "--ema.enabled",
        "true",
        "--ema.decay",
        "0.9",
        "--base.pretrained_model_name_or_path",
        str(base),
    ]

    def launch(strategy, output_dir):
        command = [*two_process_launch(*strategy), "-m", "training.train_lora", *args, "--output_dir", str(output_dir)]
        env = _subprocess_env(OMP_NUM_THREADS="1")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    assert "(FSDP)" in launch(FSDP, tmp_path / "fsdp").stdout
    launch(DDP, tmp_path / "ddp")
    adapter = "best/pytorch_lora_weights.safetensors"
    fsdp, ddp = load_file(tmp_path / "fsdp" / adapter), load_file(tmp_path / "ddp" / adapter)
    assert fsdp.keys() == ddp.keys() and all(".lora_" in k for k in fsdp)
    for key in fsdp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-6, msg=key)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    args += ["--checkpoint.resume_from_checkpoint", "latest"]
    launch(FSDP, resumed)
    for file in (
        "checkpoints/checkpoint-4/pytorch_model_fsdp.bin",
        "checkpoints/checkpoint-4/ema.safetensors",
        adapter,
    ):
        load = (lambda p: torch.load(p, weights_only=True)) if file.endswith(".bin") else load_file
        expected, actual = load(tmp_path / "fsdp" / file), load(resumed / file)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected), file


def test_deepspeed_is_refused_before_training_with_what_to_use_instead(tmp_path, monkeypatch):
    from training.config import ConfigError
    from training.train import main

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(
        ConfigError,
        match=r"DeepSpeed was requested; this training loop does not run under DeepSpeed.*--use_fsdp --fsdp_version 2",
    ):
        main([*tiny_run_args(), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()
