"""Captions from measured handwriting style: the measurements on drawn strokes of known width, angle and size."""

import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from image_data import load_mnist_arrays
from image_data.captions import (
    ATTRIBUTE_WORDS,
    HELD_OUT_TEMPLATES,
    HELD_OUT_WORDS,
    NUMBER_WORDS,
    TEMPLATES,
    DigitStyle,
    caption,
    measure_style,
    style_bin_shares,
)


def bar(width: int, height: int, size: int = 28) -> np.ndarray:
    image = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    image[top : top + height, left : left + width] = 255
    return image


def slanted_line(degrees: float, width: int = 3, length: int = 20, size: int = 56) -> np.ndarray:
    """A stroke `length` px tall leaning `degrees` to the right (drawn at 2x and kept grey-free)."""
    image = Image.new("L", (size, size))
    dx = length * math.tan(math.radians(degrees)) / 2
    centre = size / 2
    ImageDraw.Draw(image).line(
        [(centre - dx, centre + length / 2), (centre + dx, centre - length / 2)], fill=255, width=width
    )
    return np.asarray(image)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_the_thickness_of_a_bar_is_its_width_and_its_height_is_exact(width):
    style = measure_style(bar(width, 20))
    assert style.thickness == pytest.approx(width, abs=0.2)
    assert style.height == 20 and style.slant == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("degrees", [-25, -10, 0, 15, 30])
def test_the_slant_of_a_drawn_line_is_its_angle_and_thickness_ranks_widths_at_any_angle(degrees):
    styles = [measure_style(slanted_line(degrees, width=width, length=40)) for width in (2, 3, 5)]
    assert all(style.slant == pytest.approx(degrees, abs=2.0) for style in styles)
    assert styles[0].thickness < styles[1].thickness < styles[2].thickness
    assert [style.thickness for style in styles] == pytest.approx([2, 3, 5], abs=0.7)


def test_bins_and_bad_images():
    assert DigitStyle(thickness=1.5, slant=-12.0, height=15).bins() == {
        "thickness": "thin",
        "slant": "left",
        "size": "small",
    }
    assert DigitStyle(thickness=3.5, slant=20.0, height=20).bins() == {
        "thickness": "bold",
        "slant": "right",
        "size": "large",
    }
    with pytest.raises(ValueError, match="no ink"):
        measure_style(np.zeros((28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"grey image \[H, W\]"):
        measure_style(np.zeros((28, 28, 3), dtype=np.uint8))


def _attribute_words(text: str, words: dict) -> set[str]:
    return {bin_word for bin_word, phrases in words.items() for phrase in phrases if phrase in text}


def test_captions_name_the_digit_and_only_true_attributes_in_training_and_held_out_phrasings():
    style = DigitStyle(thickness=3.5, slant=20.0, height=20)  # bold, right, large
    rng = random.Random(0)
    training = [caption(7, style, rng) for _ in range(200)]
    held_out = [caption(7, style, rng, held_out=True) for _ in range(200)]
    for text in training + held_out:
        assert "7" in text or NUMBER_WORDS[7] in text
    assert set().union(*(_attribute_words(t, ATTRIBUTE_WORDS) for t in training)) == {"bold", "right", "large"}
    assert set().union(*(_attribute_words(t, HELD_OUT_WORDS) for t in held_out)) == {"bold", "right", "large"}
    # Many phrasings, attributes sometimes omitted; numerals and words both used.
    assert len(set(training)) > 30 and any("seven" in t for t in training) and any("7" in t for t in training)
    assert any(len(_attribute_words(t, ATTRIBUTE_WORDS)) == 1 for t in training)
    # Held-out phrasings share no template or attribute phrase with training.
    training_phrases = {p for phrases in ATTRIBUTE_WORDS.values() for p in phrases}
    assert not training_phrases & {p for phrases in HELD_OUT_WORDS.values() for p in phrases}
    assert not set(TEMPLATES) & set(HELD_OUT_TEMPLATES)
    assert caption(7, style, random.Random(3)) == caption(7, style, random.Random(3))
    with pytest.raises(ValueError, match="label must be a digit"):
        caption(10, style, rng)


def test_thickness_splits_the_shipped_training_digits_into_terciles():
    images, _ = load_mnist_arrays("train")
    shares = style_bin_shares(images[:3000])
    assert all(0.27 < share < 0.40 for share in shares["thickness"].values()), shares
    assert set(shares["slant"]) == {"left", "upright", "right"} and set(shares["size"]) == {"small", "medium", "large"}
