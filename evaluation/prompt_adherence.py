"""Prompt adherence of text-to-image pipelines on MNIST: does the image show the digit and the style asked for?

For every digit and every thickness x slant combination, prompts ask for the digit with those two attributes, in
the training phrasings and in held-out phrasings never used in training (`image_data.captions`). Scores, each
with its sample count:

- digit accuracy: the shipped MNIST classifier's accuracy on the requested digits (GAN-test accuracy);
- attribute accuracy: the share of images whose measured bin (`measure_style`) is the requested one, per attribute.

`caption_fid` gives a text model the sample metrics of the class-conditional ones (FID-MNIST, GAN-test accuracy, IS,
precision / recall, KID), prompted as text-to-image models are scored on COCO: with captions of real images.

The chance levels are 0.1 for the digit and about 1/3 for each attribute.
"""

import random

import numpy as np
import torch

from image_data import load_mnist_arrays
from image_data.captions import SLANT_BINS, THICKNESS_BINS, caption, measure_style, prompt_for

from .metrics import (
    check_fid_sample_count,
    classifier_outputs,
    default_classifier,
    evaluate_images,
    to_classifier_input,
)

# The attributes prompts ask for (size is left to the model: MNIST's sizes are 87% one bin).
ASKED_ATTRIBUTES = ("thickness", "slant")


def adherence_prompts(held_out: bool, seed: int = 0) -> list[tuple[str, int, dict]]:
    """(prompt, digit, wanted bins) for every digit x thickness x slant, one phrasing each."""
    rng = random.Random(f"{seed}-{held_out}")
    cases = []
    for digit in range(10):
        for thickness, _ in THICKNESS_BINS:
            for slant, _ in SLANT_BINS:
                wanted = {"thickness": thickness, "slant": slant}
                cases.append((prompt_for(digit, wanted, rng, held_out), digit, wanted))
    return cases


def _measured_bins(images: torch.Tensor) -> list[dict]:
    """Bins of each image `[N, 1, H, W]` in [0, 1] as 8-bit digits (32 px samples cropped back to 28)."""
    pixels = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if pixels.shape[-1] == 32:
        pixels = pixels[:, 2:30, 2:30]
    bins = []
    for image in pixels:
        try:
            bins.append(measure_style(image).bins())
        except ValueError:  # a blank sample has no ink: no attribute is right
            bins.append({})
    return bins


def _sample_prompts(
    pipeline, prompts: list[str], *, images_per_prompt, num_inference_steps, guidance_scale, seed, batch_size
) -> torch.Tensor:
    """`[len(prompts) * images_per_prompt, C, H, W]` images in [0, 1], `batch_size` prompts per pipeline call, the
    call's noise seeded by `seed` + its index."""
    images = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        images.append(
            pipeline(
                prompt=prompts[start : start + batch_size],
                num_images_per_prompt=images_per_prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed + index),
                output_type="pt",
            )
            .images.float()
            .cpu()
        )
    return torch.cat(images)


@torch.no_grad()
def prompt_adherence(
    pipeline,
    *,
    images_per_prompt: int = 4,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.0,
    seed: int = 0,
    held_out: bool = False,
    batch_size: int = 90,
) -> dict:
    """Digit and attribute accuracy of `pipeline` (a text-to-image pipeline) on the adherence prompts."""
    if not hasattr(pipeline, "encode_prompt"):
        raise ValueError(f"Prompt adherence needs a text-to-image pipeline, got {type(pipeline).__name__}.")
    cases = adherence_prompts(held_out, seed)
    images = _sample_prompts(
        pipeline,
        [prompt for prompt, _, _ in cases],
        images_per_prompt=images_per_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
    )
    digits = torch.tensor([digit for _, digit, _ in cases]).repeat_interleave(images_per_prompt)
    wanted = [bins for _, _, bins in cases for _ in range(images_per_prompt)]
    if images.shape[1] != 1:
        raise ValueError(
            f"Prompt adherence scores grey MNIST digits; this pipeline makes {images.shape[1]}-channel images."
        )
    _, logits = classifier_outputs(to_classifier_input(images), default_classifier())
    measured = _measured_bins(images)
    results = {
        "digit_accuracy": float((logits.argmax(dim=1) == digits).double().mean()),
        "num_samples": int(images.shape[0]),
        "num_prompts": len(cases),
        "held_out_phrasings": held_out,
        "example_prompts": [prompt for prompt, _, _ in cases[:3]],
    }
    for attribute in ASKED_ATTRIBUTES:
        hits = [m.get(attribute) == w[attribute] for m, w in zip(measured, wanted)]
        results[f"{attribute}_accuracy"] = float(np.mean(hits))
    return results


def captions_of_test_images(num_samples_per_class: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Training-phrasing captions of the first `num_samples_per_class` MNIST test images of each digit (images the
    model never trained on, captioned from their label and measured style as training captions are), and the digits."""
    images, labels = load_mnist_arrays("test")
    prompts, digits = [], []
    for digit in range(10):
        for index in np.flatnonzero(labels == digit)[:num_samples_per_class].tolist():
            rng = random.Random(f"{seed}-test-{index}")
            prompts.append(caption(digit, measure_style(images[index]), rng))
            digits.append(digit)
    if len(prompts) != 10 * num_samples_per_class:
        raise ValueError(f"The MNIST test split has fewer than {num_samples_per_class} images of some digit.")
    return prompts, torch.tensor(digits)


@torch.no_grad()
def caption_fid(
    pipeline,
    *,
    num_samples_per_class: int = 100,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 250,
) -> dict:
    """FID-MNIST, GAN-test accuracy, IS, precision / recall and KID of `pipeline` (a text-to-image pipeline), one
    image per caption of `captions_of_test_images`, scored against the 10,000 real test images like class-conditional
    samples (the floor: real train images at the same count, `evaluation.metrics.real_data_floor`)."""
    if not hasattr(pipeline, "encode_prompt"):
        raise ValueError(f"Caption FID needs a text-to-image pipeline, got {type(pipeline).__name__}.")
    check_fid_sample_count(num_samples_per_class)
    prompts, digits = captions_of_test_images(num_samples_per_class, seed)
    images = _sample_prompts(
        pipeline,
        prompts,
        images_per_prompt=1,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
    )
    if images.shape[1] != 1:
        raise ValueError(f"Caption FID scores grey MNIST digits; this pipeline makes {images.shape[1]}-channel images.")
    results = evaluate_images(images, digits, value_range=(0.0, 1.0), classifier=default_classifier())
    results.update(num_samples_per_class=num_samples_per_class, example_prompts=prompts[::num_samples_per_class][:3])
    return results
