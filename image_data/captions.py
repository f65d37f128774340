"""Captions for MNIST digits that carry more than the label: the handwriting style measured on each image.

MNIST has no captions. Each digit gets one from its label and three measurements of its ink (pixels >= 128):

- stroke thickness: the width `w` of the stroke in pixels. A stroke of length L and width w has ink area A = wL and
  outline P = 2(L + w) (measured with marching squares, so that a slanted stroke's staircase does not count extra),
  so w is the smaller root of w^2 - (P/2) w + A = 0: close for straight and curved strokes alike.
- slant: the angle in degrees by which the digit leans right (positive) or left (negative) from upright, from the
  ink's second moments: a digit that leans by s pixels sideways per pixel upwards has cov(x, y) = -s var(y), so the
  slant is atan(-cov(x, y) / var(y)) (image y grows downwards).
- size: the height in pixels of the ink's bounding box. MNIST digits are scaled to fit a 20 x 20 box, so most are
  20 px tall; the small ones are those scaled down to fit their width.

Each measurement falls into one of three bins (`THICKNESS_BINS`, `SLANT_BINS`, `SIZE_BINS`). Thickness splits the
shipped training set into terciles; slant and size use thresholds that mean what their words say, so their bins are
uneven (MNIST leans right and is mostly 20 px tall): `style_bin_shares` measures the split of any image set. A caption names the digit as a numeral
or a word and some of the attributes, in one of several phrasings (`TEMPLATES`), in any order; `HELD_OUT_TEMPLATES`
and `HELD_OUT_WORDS` are phrasings never used in training, for testing what a pretrained text encoder generalises.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

INK_THRESHOLD = 128
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# (word, upper bound): a value belongs to the first bin whose bound it is below.
THICKNESS_BINS = (("thin", 2.25), ("regular", 2.85), ("bold", math.inf))
SLANT_BINS = (("left", -5.0), ("upright", 10.0), ("right", math.inf))
SIZE_BINS = (("small", 17.5), ("medium", 19.5), ("large", math.inf))
ATTRIBUTES = ("thickness", "slant", "size")

# Training phrasings. `{digit}` is "7" or "seven"; `{attributes}` the chosen attribute phrases.
TEMPLATES = (
    "a {attributes} {digit}",
    "the digit {digit}, {attributes}",
    "a handwritten {digit} that is {attributes}",
    "{digit}, written {attributes}",
    "an image of a {attributes} number {digit}",
)
ATTRIBUTE_WORDS = {
    "thin": ("thin", "thin-stroked"),
    "regular": ("regular", "normal-weight"),
    "bold": ("bold", "thick"),
    "left": ("slanted left", "leaning left"),
    "upright": ("upright", "straight"),
    "right": ("slanted right", "leaning right"),
    "small": ("small",),
    "medium": ("medium-sized",),
    "large": ("large", "big"),
}
# Phrasings never seen in training: synonyms and word orders only a pretrained encoder can map.
HELD_OUT_TEMPLATES = ("{attributes} handwriting showing the number {digit}", "picture: {digit} ({attributes})")
HELD_OUT_WORDS = {
    "thin": ("hairline", "with fine strokes"),
    "regular": ("of ordinary weight",),
    "bold": ("heavy", "with heavy strokes"),
    "left": ("leaning backward", "tilted to the left"),
    "upright": ("vertical", "not tilted"),
    "right": ("leaning forward", "tilted to the right"),
    "small": ("tiny",),
    "medium": ("mid-sized",),
    "large": ("huge",),
}


@dataclass(frozen=True)
class DigitStyle:
    """Measurements of one digit's ink (see the module docstring)."""

    thickness: float
    slant: float
    height: int

    def bins(self) -> dict[str, str]:
        """The bin word of each attribute, e.g. `{"thickness": "bold", "slant": "upright", "size": "large"}`."""
        return {
            "thickness": _bin(self.thickness, THICKNESS_BINS),
            "slant": _bin(self.slant, SLANT_BINS),
            "size": _bin(self.height, SIZE_BINS),
        }


def _bin(value: float, bins) -> str:
    return next(word for word, upper in bins if value < upper)


# Marching squares: the outline's length inside each 2x2 window of pixels, by how many and which of them are ink.
# One ink pixel (or three) cuts a corner (sqrt(2)/2); two side by side make a straight piece (1); two diagonal
# ones, two corners. Unlike counting pixel edges, this does not lengthen a slanted stroke's staircase outline.
_CORNER = math.sqrt(2) / 2
_WINDOW_LENGTHS = np.array([0, _CORNER, _CORNER, 1, _CORNER, 1, 2 * _CORNER, _CORNER] * 2)
_WINDOW_LENGTHS[8:] = _WINDOW_LENGTHS[7::-1]  # the complement of a window has the same outline


def _outline_length(ink: np.ndarray) -> float:
    padded = np.pad(ink, 1).astype(np.int64)
    code = padded[:-1, :-1] + 2 * padded[:-1, 1:] + 4 * padded[1:, :-1] + 8 * padded[1:, 1:]
    return float(_WINDOW_LENGTHS[code].sum())


def measure_style(image) -> DigitStyle:
    """Thickness, slant and size of a grey digit (uint8 `[H, W]`, white ink on black, as MNIST)."""
    pixels = np.asarray(image)
    if pixels.ndim != 2:
        raise ValueError(f"Expected a grey image [H, W], got shape {pixels.shape}.")
    ink = pixels >= INK_THRESHOLD
    area = int(ink.sum())
    if area == 0:
        raise ValueError("The image has no ink (no pixel >= 128): nothing to measure.")
    half = _outline_length(ink) / 2
    discriminant = half * half - 4 * area
    thickness = (half - math.sqrt(discriminant)) / 2 if discriminant > 0 else math.sqrt(area)
    ys, xs = np.nonzero(ink)
    var_y = float(np.var(ys))
    cov_xy = float(np.mean((xs - xs.mean()) * (ys - ys.mean())))
    slant = math.degrees(math.atan(-cov_xy / var_y)) if var_y > 0 else 0.0
    height = int(ys.max() - ys.min() + 1)
    return DigitStyle(thickness=thickness, slant=slant, height=height)


def _phrasing(label: int, held_out: bool) -> tuple[tuple, dict]:
    """(templates, attribute words) of the training or the held-out phrasings, for digit `label`."""
    if not 0 <= label <= 9:
        raise ValueError(f"label must be a digit 0..9, got {label!r}.")
    return (HELD_OUT_TEMPLATES, HELD_OUT_WORDS) if held_out else (TEMPLATES, ATTRIBUTE_WORDS)


def _sentence(label: int, phrases: list[str], templates, rng: random.Random) -> str:
    """The digit as a numeral or a word, with `phrases`, in a random template."""
    digit = str(label) if rng.random() < 0.5 else NUMBER_WORDS[label]
    return rng.choice(templates).format(digit=digit, attributes=", ".join(phrases))


def caption(label: int, style: DigitStyle, rng: random.Random, held_out: bool = False) -> str:
    """A caption for digit `label` with `style`: a random phrasing naming the digit (numeral or word) and a random
    non-empty subset of the attributes in random order; `held_out` uses only the phrasings kept out of training."""
    templates, words = _phrasing(label, held_out)
    bins = style.bins()
    chosen = rng.sample(ATTRIBUTES, rng.randint(1, len(ATTRIBUTES)))
    return _sentence(label, [rng.choice(words[bins[attribute]]) for attribute in chosen], templates, rng)


def prompt_for(label: int, wanted: dict[str, str], rng: random.Random, held_out: bool = False) -> str:
    """A prompt asking for digit `label` with the attribute bins `wanted` (e.g. `{"thickness": "bold"}`), in a
    random training (or held-out) phrasing: what prompt-adherence evaluation asks a model for."""
    templates, words = _phrasing(label, held_out)
    unknown = {
        attribute: word for attribute, word in wanted.items() if attribute not in ATTRIBUTES or word not in words
    }
    if unknown or not wanted:
        raise ValueError(f"wanted must map some of {list(ATTRIBUTES)} to their bin words; got {wanted!r}.")
    phrases = [rng.choice(words[word]) for word in wanted.values()]
    rng.shuffle(phrases)
    return _sentence(label, phrases, templates, rng)


def style_bin_shares(images) -> dict[str, dict[str, float]]:
    """Share of `images` (uint8 `[N, H, W]`) in each bin of each attribute: how the thresholds split a data set."""
    counts = {attribute: {} for attribute in ATTRIBUTES}
    for image in images:
        for attribute, word in measure_style(image).bins().items():
            counts[attribute][word] = counts[attribute].get(word, 0) + 1
    total = len(images)
    return {attribute: {w: n / total for w, n in sorted(c.items())} for attribute, c in counts.items()}


class CaptionedDigits:
    """A digit dataset (items `{"pixel_values" in [-1, 1], "class_labels"}`) whose items also carry a `caption`: one
    per image, fixed by `seed` and the image's index, from its label and the style measured on its pixels."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.num_classes, self.id2label = None, None  # conditioned on text, not on labels
        self.columns = getattr(dataset, "columns", [])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        # Back to the 8-bit pixels the measurements are defined on; zero padding does not change them.
        pixels = ((item["pixel_values"][0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        rng = random.Random(f"{self.seed}-{int(index)}")
        item["caption"] = caption(int(item["class_labels"]), measure_style(pixels), rng)
        return item
