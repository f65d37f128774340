"""Installed like any package: a built wheel, installed outside the checkout, finds the shipped MNIST and trains."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process whose cwd is outside the checkout and whose PYTHONPATH is the wheel's install folder.
SCRIPT = r"""
import sys, pathlib
target = pathlib.Path(sys.argv[1]).resolve()
import image_data, training, evaluation, pipelines, custom_models, custom_schedulers
for module in (image_data, training, evaluation, pipelines, custom_models, custom_schedulers):
    assert target in pathlib.Path(module.__file__).resolve().parents, (module.__name__, module.__file__)
from image_data import load_mnist_arrays
images, labels = load_mnist_arrays("test")
assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
from training.config import load_config
from training.train import train
config = load_config([
    "--output_dir", sys.argv[2], "--model.architecture", "unet", "--model.preset", "tiny",
    "--train.batch_size", "4", "--train.max_steps", "1", "--train.num_epochs", "1",
    "--data.max_train_samples", "8", "--data.num_validation_samples", "4", "--eval.num_inference_steps", "2",
    "--eval.fid_n", "0", "--checkpoint.every_steps", "0", "--train.report_to", "none",
])
train(config)
print("trained", sorted(p.name for p in pathlib.Path(sys.argv[2]).iterdir()))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    wheel_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        cwd=wheel_dir,
    )
    (wheel,) = wheel_dir.glob("scratch_diffusion-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    return wheel, target


def test_wheel_ships_mnist_and_the_classifier(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "image_data/mnist/train-00000-of-00001.parquet" in names
    assert "image_data/mnist/test-00000-of-00001.parquet" in names
    assert "evaluation/assets/mnist_classifier.safetensors" in names


def test_installed_wheel_loads_mnist_and_trains_outside_the_checkout(installed, tmp_path):
    _, target = installed
    env = {**os.environ, "PYTHONPATH": str(target)}
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(target), str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "trained" in completed.stdout and "last" in completed.stdout
