"""Sample quality of class-conditional generators: FID-MNIST, GAN-test accuracy, Inception Score, precision /
recall and KID in the pinned MNIST classifier's feature space (`metrics`), the classifier and its trainer,
and optional offline Inception FID (`inception_fid`). Knows nothing of the training loop."""

from .metrics import compute_metrics, evaluate_images, evaluate_pipeline, generate_samples, reference_features
from .mnist_classifier import MNIST_CLASSIFIER_PATH, MNIST_CLASSIFIER_SHA256, MNISTClassifier, load_mnist_classifier

__all__ = [
    "MNIST_CLASSIFIER_PATH",
    "MNIST_CLASSIFIER_SHA256",
    "MNISTClassifier",
    "compute_metrics",
    "evaluate_images",
    "evaluate_pipeline",
    "generate_samples",
    "load_mnist_classifier",
    "reference_features",
]
