"""Sample-quality metrics for class-conditional MNIST generators, in the shipped classifier's feature space.

Each metric goes by its own name:
- FID-MNIST: Frechet distance between Gaussians fitted to the 128-d features of `MNISTClassifier`
  (`evaluation/mnist_classifier.py`) of generated images and of the real MNIST test split. Not Inception FID
  (that one is `evaluation/inception_fid.py`): the two scales are unrelated.
- GAN-test accuracy (Shmelkov et al., ECCV 2018): the classifier's accuracy on samples of the requested classes.
- Inception Score (Salimans et al. 2016) computed from the MNIST classifier's logits (1 = one class only, 10 = max).
- Improved precision / recall (Kynkaanniemi et al., NeurIPS 2019): k-NN (k=3) manifolds in feature space.
- KID (Binkowski et al., ICLR 2018): unbiased polynomial-kernel MMD over random subsets.

FID, KID and IS use torchmetrics' maths (FID accumulates and solves in float64). Every value depends on the
sample count, so results carry `num_samples`; the real test features are computed once per (classifier,
data) pair and cached on disk.
"""

import hashlib
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from atomic_files import cache_dir, write_file_atomically
from image_data import load_mnist_arrays, shipped_mnist_dir

from .mnist_classifier import MNIST_CLASSIFIER_SHA256, MNISTClassifier, load_mnist_classifier

CLASSIFIER_IMAGE_SIZE = MNISTClassifier.image_size
# MNIST's 28x28 digits padded by 2 px (`image_data`, `pad_to=32`) give 32x32 samples: cropping undoes the pad exactly.
PADDED_IMAGE_SIZE = 32
PRECISION_RECALL_K = 3
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
INCEPTION_SCORE_SPLITS = 10
# Fixed seed for the random subsets of KID, IS and the real subset of precision/recall: metrics are reproducible.
METRIC_SEED = 0
REFERENCE_SPLIT = "test"
# Below this many generated samples FID and KID are strongly biased upward (the covariance is barely estimated):
# such numbers are comparable only with others at the same N, so they come with a warning.
MIN_RELIABLE_SAMPLES = 1000
# The keys of `compute_metrics` that hold a measured value (None when it could not be computed).
METRIC_KEYS = (
    "fid_mnist",
    "gan_test_acc",
    "inception_score",
    "inception_score_std",
    "kid_mean",
    "kid_std",
    "precision",
    "recall",
)


# --------------------------------------------------------------------------------------------------
# Images -> classifier input -> features and logits
# --------------------------------------------------------------------------------------------------
def to_classifier_input(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """`[N, C, H, W]` images in `value_range` -> `[N, 1, 28, 28]` in [-1, 1], quantised to 8 bits like the real data.

    Grey from RGB by channel mean; 32x32 is center-cropped by 2 px (the inverse of the loader's padding, so no
    resampling blur); any other size is resized with antialiased bilinear interpolation.
    """
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"Expected square images [N, C, H, W], got shape {tuple(images.shape)}.")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Expected 1 (grey) or 3 (RGB) channels, got {images.shape[1]}.")
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}.")
    images = ((images.float() - low) / (high - low)).clamp(0.0, 1.0)
    if images.shape[1] == 3:
        images = images.mean(dim=1, keepdim=True)
    size = images.shape[-1]
    if size == PADDED_IMAGE_SIZE:
        margin = (PADDED_IMAGE_SIZE - CLASSIFIER_IMAGE_SIZE) // 2
        images = images[:, :, margin : margin + CLASSIFIER_IMAGE_SIZE, margin : margin + CLASSIFIER_IMAGE_SIZE]
    elif size != CLASSIFIER_IMAGE_SIZE:
        images = F.interpolate(images, size=CLASSIFIER_IMAGE_SIZE, mode="bilinear", antialias=True, align_corners=False)
    # The real digits are uint8: score generated ones as the 8-bit images a user would save.
    return torch.round(images * 255.0) / 127.5 - 1.0


def uint8_to_classifier_input(images) -> torch.Tensor:
    """uint8 `[N, 28, 28]` arrays (e.g. from `image_data.load_mnist_arrays`) -> `[N, 1, 28, 28]` in [-1, 1]."""
    return torch.as_tensor(images).float().div(127.5).sub(1.0).unsqueeze(1)


@torch.no_grad()
def classifier_outputs(
    images: torch.Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 features `[N, 128]`, logits `[N, 10]`) of classifier-ready images (see `to_classifier_input`)."""
    classifier = classifier if classifier is not None else default_classifier()
    device = next(classifier.parameters()).device
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        batch_features, batch_logits = classifier.features_and_logits(images[start : start + batch_size].to(device))
        features.append(batch_features.float().cpu())
        logits.append(batch_logits.float().cpu())
    return torch.cat(features), torch.cat(logits)


_DEFAULT_CLASSIFIER = None


def default_classifier() -> MNISTClassifier:
    """The shipped, hash-checked classifier on CPU, loaded once per process."""
    global _DEFAULT_CLASSIFIER
    if _DEFAULT_CLASSIFIER is None:
        _DEFAULT_CLASSIFIER = load_mnist_classifier()
    return _DEFAULT_CLASSIFIER


def state_dict_sha256(module: nn.Module) -> str:
    """Content hash of a module's tensors (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Reference statistics of the real test split (cached)
# --------------------------------------------------------------------------------------------------
def _shipped_split_sha256(split: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(shipped_mnist_dir().glob(f"{split}-*.parquet")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


_REFERENCE_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


def reference_features(
    classifier: MNISTClassifier | None = None, cache_directory: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Features, logits and labels of the shipped MNIST test split, cached per (classifier, data) content hash."""
    classifier = classifier if classifier is not None else default_classifier()
    key = f"mnist-{REFERENCE_SPLIT}-{state_dict_sha256(classifier)[:16]}-{_shipped_split_sha256(REFERENCE_SPLIT)[:16]}"
    if key in _REFERENCE_MEMORY:
        return _REFERENCE_MEMORY[key]
    path = Path(cache_directory or cache_dir()) / f"{key}.safetensors"
    if path.is_file():
        reference = load_file(path)
    else:
        images, labels = load_mnist_arrays(REFERENCE_SPLIT)
        features, logits = classifier_outputs(uint8_to_classifier_input(images), classifier)
        reference = {"features": features, "logits": logits, "labels": torch.from_numpy(labels)}
        write_file_atomically(path, lambda temporary: save_file(reference, temporary))
    _REFERENCE_MEMORY[key] = reference
    return reference


# --------------------------------------------------------------------------------------------------
# Metrics on features / logits
# --------------------------------------------------------------------------------------------------
@contextmanager
def _seeded_quietly(seed: int):
    """Fix torchmetrics' subset sampling (global RNG) and silence its feature-buffer notices."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        warnings.filterwarnings("ignore", message=".*degrees of freedom is <= 0.*")
        torch.manual_seed(seed)
        yield


class _PrecomputedFeatures(nn.Module):
    """Identity "feature network" so torchmetrics' metrics run on features computed once for all of them."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def count_nonfinite(rows: torch.Tensor) -> int:
    """How many rows (samples: images or feature vectors) hold a NaN or infinite value."""
    return int((~torch.isfinite(rows.reshape(rows.shape[0], -1))).any(dim=1).sum())


def _check_feature_sets(real_features: torch.Tensor, fake_features: torch.Tensor, metric: str, minimum: int = 2):
    for name, features in (("real", real_features), ("generated", fake_features)):
        if features.ndim != 2:
            raise ValueError(f"{metric}: {name} features must be [N, D], got shape {tuple(features.shape)}.")
        if features.shape[0] < minimum:
            raise ValueError(f"{metric} needs at least {minimum} {name} samples, got {features.shape[0]}.")
        # NaN reaching the matrix square root crashes inside LAPACK (a segfault, no traceback): refuse it here.
        nonfinite = count_nonfinite(features)
        if nonfinite:
            raise ValueError(
                f"{metric}: {nonfinite} of {features.shape[0]} {name} feature rows are not finite (NaN or inf)."
            )
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"{metric}: feature widths differ ({real_features.shape[1]} vs {fake_features.shape[1]}).")


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID formula on two feature sets (torchmetrics, float64): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2)."""
    _check_feature_sets(real_features, fake_features, "The Frechet distance")
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real_features.shape[1]))
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def kernel_inception_distance(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = METRIC_SEED,
) -> tuple[float, float]:
    """(mean, std) of the unbiased cubic-kernel MMD^2 over `subsets` random subsets (torchmetrics), float64."""
    _check_feature_sets(real_features, fake_features, "KID")
    subset_size = min(subset_size, real_features.shape[0], fake_features.shape[0])
    with _seeded_quietly(seed):
        metric = KernelInceptionDistance(
            feature=_PrecomputedFeatures(real_features.shape[1]), subsets=subsets, subset_size=subset_size
        )
        metric.update(real_features.double(), real=True)
        metric.update(fake_features.double(), real=False)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(
    logits: torch.Tensor, splits: int = INCEPTION_SCORE_SPLITS, seed: int = METRIC_SEED
) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(E_x KL(p(y|x) || p(y))) from classifier logits (torchmetrics)."""
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"Inception Score needs logits of shape [N >= 1, num_classes], got {tuple(logits.shape)}.")
    with _seeded_quietly(seed):
        metric = InceptionScore(
            feature=_PrecomputedFeatures(logits.shape[1]), splits=min(splits, logits.shape[0]), normalize=False
        )
        metric.update(logits.double())
        mean, std = metric.compute()
    # One split has no spread: torchmetrics returns NaN for its std.
    return float(mean), float(std) if torch.isfinite(std) else 0.0


def gan_test_accuracy(logits: torch.Tensor, class_labels: torch.Tensor) -> float:
    """Share of samples the classifier assigns to the class they were generated for."""
    class_labels = torch.as_tensor(class_labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != class_labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(
            f"Need logits [N, C] and N class labels with N > 0, got {tuple(logits.shape)} and {tuple(class_labels.shape)}."
        )
    return logits.argmax(dim=1).eq(class_labels.to(logits.device)).double().mean().item()


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, features.shape[0], chunk_size):
        distances = torch.cdist(features[start : start + chunk_size], features)
        # Position k (0-based) skips the point itself at distance 0.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int) -> float:
    """Share of `points` inside at least one ball (centre, radius)."""
    inside = []
    for start in range(0, points.shape[0], chunk_size):
        distances = torch.cdist(points[start : start + chunk_size], centres)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def improved_precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    k: int = PRECISION_RECALL_K,
    seed: int = METRIC_SEED,
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), in float64.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest
    neighbour. Precision: share of generated points inside the real manifold; recall: share of real points
    inside the generated manifold. The estimator assumes equally sized sets, so a larger real set is
    subsampled (seeded) to the generated set's size.
    """
    _check_feature_sets(real_features, fake_features, "Precision/recall", minimum=k + 1)
    real_features, fake_features = real_features.double(), fake_features.double()
    if real_features.shape[0] > fake_features.shape[0]:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(real_features.shape[0], generator=generator)[: fake_features.shape[0]]
        real_features = real_features[keep]
    real_radii = _kth_neighbour_radii(real_features, k, chunk_size)
    fake_radii = _kth_neighbour_radii(fake_features, k, chunk_size)
    precision = _fraction_inside(fake_features, real_features, real_radii, chunk_size)
    recall = _fraction_inside(real_features, fake_features, fake_radii, chunk_size)
    return precision, recall


def small_sample_warning(num_samples: int) -> str | None:
    """The warning that goes with metrics of fewer than `MIN_RELIABLE_SAMPLES` samples, else None."""
    if num_samples >= MIN_RELIABLE_SAMPLES:
        return None
    return (
        f"only N = {num_samples} generated samples: FID and KID are biased upward below "
        f"N = {MIN_RELIABLE_SAMPLES:,}; compare them only with numbers at the same N"
    )


def _common_results(num_samples: int, num_reference_samples: int) -> dict:
    return {
        "num_samples": num_samples,
        "num_reference_samples": num_reference_samples,
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(KID_SUBSET_SIZE, num_reference_samples, num_samples),
        "precision_recall_k": PRECISION_RECALL_K,
        "small_sample_warning": small_sample_warning(num_samples),
    }


def not_computable_results(num_samples: int, num_nonfinite: int, num_reference_samples: int) -> dict:
    """The results of a sample set holding non-finite images: every metric None, and why."""
    return {
        **dict.fromkeys(METRIC_KEYS),
        **_common_results(num_samples, num_reference_samples),
        "gan_test_acc_per_class": {},
        "num_nonfinite_samples": num_nonfinite,
        "not_computable": (
            f"{num_nonfinite} of {num_samples} generated samples hold NaN or infinite pixels (a diverged model or "
            "broken weights): no metric is computable"
        ),
    }


def compute_metrics(
    features: torch.Tensor, logits: torch.Tensor, class_labels: torch.Tensor, reference: dict[str, torch.Tensor]
) -> dict:
    """Every metric of generated samples against the reference set, with the sample counts they were computed on."""
    if features.shape[0] < 2:
        raise ValueError(f"FID-MNIST needs at least 2 generated samples, got {features.shape[0]}.")
    real = reference["features"]
    nonfinite = count_nonfinite(features)
    if nonfinite:
        return not_computable_results(int(features.shape[0]), nonfinite, int(real.shape[0]))
    kid_mean, kid_std = kernel_inception_distance(real, features)
    is_mean, is_std = inception_score(logits)
    class_labels = torch.as_tensor(class_labels).reshape(-1)
    per_class = {}
    for label in sorted(set(class_labels.tolist())):
        chosen = class_labels == label
        per_class[str(label)] = gan_test_accuracy(logits[chosen], class_labels[chosen])
    results = {
        "fid_mnist": frechet_distance(real, features),
        "gan_test_acc": gan_test_accuracy(logits, class_labels),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        **_common_results(int(features.shape[0]), int(real.shape[0])),
        "gan_test_acc_per_class": per_class,
        "num_nonfinite_samples": 0,
        "not_computable": None,
    }
    if features.shape[0] > PRECISION_RECALL_K:
        results["precision"], results["recall"] = improved_precision_recall(real, features)
    else:
        results["precision"] = results["recall"] = None
    return results


def evaluate_images(
    images: torch.Tensor,
    class_labels: torch.Tensor,
    value_range: tuple[float, float] = (0.0, 1.0),
    classifier: MNISTClassifier | None = None,
) -> dict:
    """All metrics for images `[N, C, H, W]` in `value_range` that were generated (or picked) for `class_labels`."""
    classifier = classifier if classifier is not None else default_classifier()
    class_labels = torch.as_tensor(class_labels).reshape(-1)
    if class_labels.shape[0] != images.shape[0]:
        raise ValueError(f"Got {images.shape[0]} images but {class_labels.shape[0]} class labels.")
    bad = sorted({int(label) for label in class_labels.tolist() if not 0 <= label < classifier.num_classes})
    if bad:
        raise ValueError(
            f"Class labels {bad} out of range: the MNIST classifier knows 0..{classifier.num_classes - 1}."
        )
    reference = reference_features(classifier)
    # Detected before any metric: a NaN image would otherwise reach the FID matrix square root.
    nonfinite = count_nonfinite(images)
    if nonfinite:
        return not_computable_results(int(images.shape[0]), nonfinite, int(reference["features"].shape[0]))
    features, logits = classifier_outputs(to_classifier_input(images, value_range), classifier)
    return compute_metrics(features, logits, class_labels, reference)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
def generate_samples(
    pipeline,
    *,
    num_samples_per_class: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 256,
    class_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[N, C, H, W]` images in [0, 1] on CPU, labels): `num_samples_per_class` per class, batch `i` seeded `seed + i`.

    An unconditional pipeline (one "class") makes `num_samples_per_class` images, labelled -1, without guidance.
    """
    denoiser = getattr(pipeline, "denoiser", None)
    if denoiser is None:
        raise ValueError(
            f"Evaluation needs a pipeline of this project (one with a `denoiser`), got {type(pipeline).__name__}."
        )
    num_classes = denoiser.config.num_classes
    if (
        isinstance(num_samples_per_class, bool)
        or not isinstance(num_samples_per_class, int)
        or num_samples_per_class < 1
    ):
        raise ValueError(f"num_samples_per_class must be a positive integer, got {num_samples_per_class!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not num_classes:
        labels = torch.full((num_samples_per_class,), -1, dtype=torch.long)
    else:
        class_ids = list(range(num_classes)) if class_ids is None else list(class_ids)
        labels = torch.tensor(class_ids, dtype=torch.long).repeat_interleave(num_samples_per_class)
    images = []
    starts = range(0, labels.shape[0], batch_size)
    for index, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not progress)):
        generator = torch.Generator("cpu").manual_seed(seed + index)
        chunk = labels[start : start + batch_size]
        batch = pipeline(
            **(dict(class_labels=chunk.tolist()) if num_classes else dict(batch_size=chunk.shape[0])),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale if num_classes else 1.0,
            generator=generator,
            output_type="pt",
        ).images
        images.append(batch.float().cpu())
    return torch.cat(images), labels


def check_fid_sample_count(num_samples_per_class) -> None:
    """Refuse a per-class sample count FID-MNIST cannot use (it fits a covariance to the samples)."""
    if (
        isinstance(num_samples_per_class, bool)
        or not isinstance(num_samples_per_class, int)
        or num_samples_per_class < 2
    ):
        raise ValueError(
            f"num_samples_per_class must be an integer >= 2 (FID-MNIST fits a covariance), got {num_samples_per_class!r}."
        )


def evaluate_pipeline(
    pipeline,
    *,
    num_samples_per_class: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    return_samples: bool = False,
):
    """Generate `num_samples_per_class` images of every class and score them; returns metrics and settings.

    With `return_samples=True`, returns `(results, images, labels)` (images `[N, C, H, W]` in [0, 1]).
    """
    vae, denoiser = getattr(pipeline, "vae", None), getattr(pipeline, "denoiser", None)
    if denoiser is None:
        raise ValueError(
            f"Evaluation needs a pipeline of this project (one with a `denoiser`), got {type(pipeline).__name__}."
        )
    channels = vae.config.out_channels if vae is not None else denoiser.config.in_channels
    if channels != 1:
        raise ValueError(
            f"FID-MNIST and the other metrics score grey MNIST digits with the shipped MNIST classifier; this pipeline "
            f"makes {channels}-channel images, which it was not trained on, so the numbers would be meaningless."
        )
    classifier = default_classifier()
    num_classes = denoiser.config.num_classes
    if not num_classes:
        raise ValueError(
            "FID-MNIST and GAN-test accuracy need a class-conditional pipeline (GAN-test asks for each digit); this "
            "one is unconditional. Score it against its data's own images: `--reference_data` (Inception FID / KID)."
        )
    if num_classes != classifier.num_classes:
        raise ValueError(
            f"The MNIST classifier scores {classifier.num_classes} classes; this pipeline has num_classes={num_classes}."
        )
    check_fid_sample_count(num_samples_per_class)
    started = time.perf_counter()
    images, labels = generate_samples(
        pipeline,
        num_samples_per_class=num_samples_per_class,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    sampling_time = time.perf_counter() - started
    started = time.perf_counter()
    results = evaluate_images(images, labels, value_range=(0.0, 1.0), classifier=classifier)
    for problem in (results["not_computable"], results["small_sample_warning"]):
        if problem:
            warnings.warn(f"{problem}.", UserWarning, stacklevel=2)
    results.update(
        num_samples_per_class=num_samples_per_class,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        scheduler=type(pipeline.scheduler).__name__,
        image_size=int(images.shape[-1]),
        sampling_time_s=sampling_time,
        seconds_per_image=sampling_time / images.shape[0],
        metric_time_s=time.perf_counter() - started,
        classifier_sha256=MNIST_CLASSIFIER_SHA256,
    )
    return (results, images, labels) if return_samples else results


def real_data_floor(num_samples_per_class: int) -> dict:
    """Metrics of real train images (the first `num_samples_per_class` of each digit) scored like samples: what a
    perfect generator would reach at that sample count."""
    images, labels = load_mnist_arrays("train")
    labels = torch.from_numpy(labels)
    keep = torch.cat([torch.nonzero(labels == digit).flatten()[:num_samples_per_class] for digit in range(10)])
    return evaluate_images(
        (uint8_to_classifier_input(images[keep.numpy()]) + 1) / 2, labels[keep], value_range=(0.0, 1.0)
    )
