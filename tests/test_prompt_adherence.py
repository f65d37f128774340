"""Prompt adherence: an oracle that returns real digits of the asked style scores high, noise scores chance."""

import random
from types import SimpleNamespace

import pytest
import torch

from evaluation.prompt_adherence import adherence_prompts, prompt_adherence
from image_data import load_mnist_arrays
from image_data.captions import HELD_OUT_WORDS, prompt_for
from image_data.captions import measure_style as measure


class OraclePipeline:
    """Answers each adherence prompt with real test digits of the asked digit and style (noise when it has none)."""

    def __init__(self, held_out: bool, noise: bool = False):
        self.cases = {prompt: (digit, wanted) for prompt, digit, wanted in adherence_prompts(held_out)}
        images, labels = load_mnist_arrays("test")
        self.pool = {}
        for image, label in zip(images[:3000], labels[:3000]):
            bins = measure(image).bins()
            self.pool.setdefault((int(label), bins["thickness"], bins["slant"]), []).append(image)
        self.noise = noise

    def encode_prompt(self, prompt):  # marks this as a text-to-image pipeline
        raise NotImplementedError

    def __call__(self, prompt, num_images_per_prompt, generator, **settings):
        images = []
        for text in prompt:
            digit, wanted = self.cases[text]
            found = self.pool.get((digit, wanted["thickness"], wanted["slant"]), [])
            for index in range(num_images_per_prompt):
                if self.noise or not found:
                    images.append(torch.rand(1, 28, 28, generator=generator))
                else:
                    images.append(torch.from_numpy(found[index % len(found)]).float()[None] / 255)
        return SimpleNamespace(images=torch.stack(images))


@pytest.mark.parametrize("held_out", [False, True])
def test_real_digits_of_the_asked_style_score_high_and_noise_scores_chance(held_out):
    cases = adherence_prompts(held_out)
    assert len(cases) == 90 and len({prompt for prompt, _, _ in cases}) == 90
    oracle = OraclePipeline(held_out)
    missing = sum(1 for _, d, w in cases if (d, w["thickness"], w["slant"]) not in oracle.pool)
    results = prompt_adherence(oracle, images_per_prompt=2, held_out=held_out)
    assert results["num_samples"] == 180 and results["held_out_phrasings"] is held_out
    share = 1 - missing / 90
    assert results["thickness_accuracy"] >= share - 1e-9 and results["slant_accuracy"] >= share - 1e-9
    assert results["digit_accuracy"] > 0.9 * share
    noise = prompt_adherence(OraclePipeline(held_out, noise=True), images_per_prompt=2, held_out=held_out)
    assert noise["digit_accuracy"] < 0.3 and noise["thickness_accuracy"] < 0.5


def test_prompts_ask_for_exactly_the_wanted_attributes_in_held_out_words():
    rng = random.Random(0)
    text = prompt_for(7, {"thickness": "bold", "slant": "right"}, rng, held_out=True)
    assert any(word in text for word in HELD_OUT_WORDS["bold"]) and any(w in text for w in HELD_OUT_WORDS["right"])
    with pytest.raises(ValueError, match="wanted must map some of"):
        prompt_for(7, {"colour": "red"}, rng)
    with pytest.raises(ValueError, match="needs a text-to-image pipeline"):
        prompt_adherence(object())
