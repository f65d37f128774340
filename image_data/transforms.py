"""The shipped fine-tuning task, "bold digits": MNIST with strokes thickened on the fly, and how to measure it."""

import torch
import torch.nn.functional as F


def dilate_strokes(pixel_values: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grey-scale dilation of `[C, H, W]` (or `[N, C, H, W]`) images: a (2 * pixels + 1)-wide square max filter."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
        raise ValueError(f"pixels must be an int >= 0, got {pixels!r}.")
    if pixels == 0:
        return pixel_values
    batched = pixel_values if pixel_values.ndim == 4 else pixel_values.unsqueeze(0)
    dilated = F.max_pool2d(batched, kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return dilated if pixel_values.ndim == 4 else dilated.squeeze(0)


class DilatedStrokes(torch.utils.data.Dataset):
    """A labeled image dataset whose light strokes are thickened by `pixels` (MNIST -> "bold" digits)."""

    def __init__(self, dataset, pixels: int):
        self.dataset, self.pixels = dataset, pixels
        self.num_classes, self.id2label = dataset.num_classes, dataset.id2label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["pixel_values"] = dilate_strokes(item["pixel_values"], self.pixels)
        return item


def mean_ink(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean brightness in [0, 1] of `[N, C, H, W]` images in [0, 1]: the ink of light-on-dark digits."""
    return images.float().mean(dim=(1, 2, 3))
