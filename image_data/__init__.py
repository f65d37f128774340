"""Labeled image data for training and evaluation: the shipped MNIST, Hub datasets and local folders as tensors in
[-1, 1]; the data-parallel batch sampler; the bold-digits transform of the LoRA example task."""

from .loading import (
    SHIPPED_MNIST_DIR,
    ImageTransform,
    LabeledImageDataset,
    load_hf_dataset,
    load_image_dataset,
    load_mnist_arrays,
    shipped_mnist_dir,
)
from .samplers import ShardedBatchSampler
from .transforms import DilatedStrokes, dilate_strokes, mean_ink

__all__ = [
    "SHIPPED_MNIST_DIR",
    "DilatedStrokes",
    "ImageTransform",
    "LabeledImageDataset",
    "ShardedBatchSampler",
    "dilate_strokes",
    "load_hf_dataset",
    "load_image_dataset",
    "load_mnist_arrays",
    "mean_ink",
    "shipped_mnist_dir",
]
