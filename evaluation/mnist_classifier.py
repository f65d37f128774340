"""The MNIST feature network behind FID-MNIST, GAN-test accuracy and the other sample metrics.

A small CNN (two 5x5 conv + BatchNorm + max-pool stages, a 128-d feature layer, a 10-way head), trained by
`evaluation/train_mnist_classifier.py` on the shipped MNIST train split. Metric values are comparable only under
one fixed feature network, so the shipped weights are pinned by their sha256 and any other file is refused.
"""

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from atomic_files import write_file_atomically

MNIST_CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "mnist_classifier.safetensors"
# Printed by `python -m evaluation.train_mnist_classifier`; a retrained file needs this line updated with it.
MNIST_CLASSIFIER_SHA256 = "198b3ef592be6dc3b00b198a5da52abd4211737eb4d588fbf1fe508374a16d9a"


class MNISTClassifier(nn.Module):
    """28x28 grey digits in [-1, 1] -> 128-d features (the FID-MNIST space) and 10 class logits."""

    image_size = 28
    num_classes = 10
    # torchmetrics' FID/KID read the feature width from this attribute.
    num_features = 128

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.conv_stages = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.feature_layer = nn.Linear(32 * 7 * 7, self.num_features)
        self.dropout = nn.Dropout(dropout)
        self.classifier_head = nn.Linear(self.num_features, self.num_classes)

    def _check_images(self, images: torch.Tensor):
        expected = (1, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"MNISTClassifier expects images of shape [N, {', '.join(map(str, expected))}], got {tuple(images.shape)}."
            )

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads from one pass: the post-ReLU 128-d features and the class logits."""
        self._check_images(images)
        features = torch.relu(self.feature_layer(self.conv_stages(images).flatten(1)))
        return features, self.classifier_head(self.dropout(features))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The 128-d feature vector FID-MNIST, KID and precision/recall are computed on."""
        return self.features_and_logits(images)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.features_and_logits(images)[1]


def sha256_of_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_mnist_classifier(
    path: str | Path | None = None,
    expected_sha256: str | None = MNIST_CLASSIFIER_SHA256,
    device: str | torch.device = "cpu",
) -> MNISTClassifier:
    """Load the classifier in eval mode, frozen, after checking the file's sha256 (`expected_sha256=None` skips it)."""
    path = Path(path) if path is not None else MNIST_CLASSIFIER_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST classifier weights not found at {path}. They ship with the package; "
            "`python -m evaluation.train_mnist_classifier` rebuilds them."
        )
    data = path.read_bytes()
    actual_sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and actual_sha256 != expected_sha256:
        raise ValueError(
            f"Refusing MNIST classifier weights {path}: sha256 {actual_sha256} differs from the pinned "
            f"{expected_sha256}. FID-MNIST values are comparable only under the pinned network."
        )
    model = MNISTClassifier()
    model.load_state_dict(load_safetensors_bytes(data), strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def save_mnist_classifier(model: MNISTClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write the weights as safetensors atomically (temp file + rename) and return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_file_atomically(path, lambda temporary: save_file(state, temporary, metadata=metadata))
    return sha256_of_file(path)
