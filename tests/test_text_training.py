"""Training on captions: captions that match the measured style, the encoder cache and caption dropout, text
recipes' refusals, and a text run that resumes exactly."""

import random

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import tiny_run_args

from image_data import load_image_dataset
from image_data.captions import ATTRIBUTE_WORDS, CaptionedDigits, caption, measure_style
from pipelines import text_encoder as text
from training.config import ConfigError, load_config
from training.train import main as train_main


@pytest.fixture(scope="module")
def encoder(minilm):
    return minilm


def test_each_digit_gets_a_fixed_caption_that_tells_its_true_style():
    digits = load_image_dataset(split="test")
    captioned = CaptionedDigits(digits, seed=3)
    for index in range(40):
        item = captioned[index]
        pixels = ((item["pixel_values"][0] + 1) * 127.5).round().to(torch.uint8).numpy()
        bins = measure_style(pixels).bins()
        named = {word for word, phrases in ATTRIBUTE_WORDS.items() for phrase in phrases if phrase in item["caption"]}
        assert named and named <= set(bins.values()), (item["caption"], bins)
        assert item["caption"] == caption(int(item["class_labels"]), measure_style(pixels), random.Random(f"3-{index}"))
        assert captioned[index]["caption"] == item["caption"]  # the same caption every epoch
    assert captioned.num_classes is None and len(captioned) == len(digits)


def test_captions_are_encoded_once_and_dropped_to_the_empty_prompt_from_the_step_generator(encoder, monkeypatch):
    from training.text_conditioning import TextConditioning

    tokenizer, model = encoder
    conditioning = TextConditioning(tokenizer, model, uses_pooled=True, caption_dropout=0.5)
    calls = []
    original = text.encode_prompts
    monkeypatch.setattr(
        "training.text_conditioning.encode_prompts", lambda *a, **k: calls.append(list(a[2])) or original(*a, **k)
    )
    batch = {"caption": ["a bold 7", "a thin 1", "a bold 7", "the digit 3"]}
    inputs = conditioning(batch, "cpu")
    assert set(inputs) == {"encoder_hidden_states", "encoder_attention_mask", "pooled_projections"}
    # Padding after the batch's longest caption is cut (attention masks it anyway): 5 tokens with [CLS] and [SEP].
    longest = max(len(ids) for ids in tokenizer(batch["caption"])["input_ids"])
    assert longest == 5
    assert inputs["encoder_hidden_states"].shape == (4, longest, 384)
    assert inputs["encoder_attention_mask"].shape == (4, longest) and inputs["encoder_attention_mask"][:, -1].any()
    torch.testing.assert_close(inputs["encoder_hidden_states"][0], inputs["encoder_hidden_states"][2])
    conditioning(batch, "cpu")
    assert calls == [["a bold 7", "a thin 1", "the digit 3"]]  # unique captions, once
    first = conditioning(batch, "cpu", torch.Generator().manual_seed(0))
    again = conditioning(batch, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(first["encoder_hidden_states"], again["encoder_hidden_states"])
    empty = conditioning({"caption": [""]}, "cpu")["pooled_projections"][0]
    dropped = [torch.equal(row, empty) for row in first["pooled_projections"]]
    assert 0 < sum(dropped) < 4  # seed 0 drops some of four at p = 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.architecture": "dit"}, "the dit takes class labels only"),
        ({"data.dataset": "some/images"}, "captions are made from MNIST digits"),
        ({"eval.prompts": "[]"}, "non-empty list of strings"),
    ],
)
def test_text_settings_that_cannot_work_are_refused(encoder, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_run_args(**{"model.text_encoder": "minilm", **overrides}))


def test_prompts_without_a_text_model_and_a_missing_extra_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="eval.prompts are for text models"):
        load_config(tiny_run_args(**{"eval.prompts": "[a 7]"}))
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"model.text_encoder minilm: .*scratch-diffusion\[text\]"):
        load_config(tiny_run_args(**{"model.text_encoder": "minilm"}))


@pytest.mark.parametrize("architecture", ["unet", "mmdit"])
def test_a_text_run_resumes_to_bit_identical_weights(encoder, tmp_path, architecture):
    settings = {
        "model.text_encoder": "minilm",
        "model.architecture": architecture,
        "checkpoint.every_steps": 2,
        "eval.every_epochs": 10,
        # The schedule must not depend on max_steps, which differs between the halves.
        "optim.lr_scheduler": "constant",
        "optim.lr_warmup_steps": 0,
    }
    train_main(tiny_run_args(**settings, **{"train.max_steps": 4, "output_dir": str(tmp_path / "whole")}))
    train_main(tiny_run_args(**settings, **{"train.max_steps": 2, "output_dir": str(tmp_path / "parts")}))
    train_main(
        tiny_run_args(
            **settings,
            **{
                "train.max_steps": 4,
                "output_dir": str(tmp_path / "parts"),
                "checkpoint.resume_from_checkpoint": "latest",
            },
        )
    )
    whole = load_file(tmp_path / "whole" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    parts = load_file(tmp_path / "parts" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    first = load_file(tmp_path / "parts" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(first[k], parts[k]) for k in first)  # it did train after the resume


def test_a_trained_text_model_samples_from_prompts_on_the_command_line(encoder, tmp_path, capsys):
    import csv

    from PIL import Image

    from commands import sample

    # With eval.fid_n, each evaluation records prompt adherence (2 images for each of the 90 prompts).
    train_main(
        tiny_run_args(
            **{"model.text_encoder": "minilm", "train.max_steps": 2, "eval.fid_n": 2, "output_dir": str(tmp_path)}
        )
    )
    row = list(csv.DictReader(open(tmp_path / "metrics.csv")))[-1]
    assert row["metric_num_samples"] == "180" and row["fid"] == ""
    assert all(0 <= float(row[key]) <= 1 for key in ("gan_test_acc", "thickness_acc", "slant_acc"))
    card = (tmp_path / "best" / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and 'pipe(prompt=["a bold 7"' in card
    grid = tmp_path / "grid.png"
    sample.main(
        [str(tmp_path / "best"), "--prompt", "a bold 7", "--prompt", "a thin 1", "--num_images_per_label", "3"]
        + ["--num_inference_steps", "2", "--out", str(grid)]
    )
    assert Image.open(grid).size == (3 * 28, 2 * 28) and "6 images (28x28, 2 rows)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is a text-to-image pipeline: pass --prompt"):
        sample.main([str(tmp_path / "best"), "--class_labels", "3", "--out", str(grid)])

    from commands import evaluate

    results = evaluate.main(
        [str(tmp_path / "best"), "--num_samples_per_class", "1", "--num_inference_steps", "1"]
        + ["--output_dir", str(tmp_path / "eval")]
    )
    for phrasing in ("training_phrasings", "held_out_phrasings"):
        assert results[phrasing]["num_samples"] == 90 and 0 <= results[phrasing]["digit_accuracy"] <= 1
    assert "| held out phrasings |" in (tmp_path / "eval" / "evaluation.md").read_text()
    assert "caption_fid" not in results  # off unless asked for

    # Sample metrics from captions of real test digits, beside the floor at the same count.
    results = evaluate.main(
        [str(tmp_path / "best"), "--num_samples_per_class", "1", "--num_inference_steps", "1"]
        + ["--caption_fid_per_digit", "3", "--output_dir", str(tmp_path / "eval")]
    )
    fid, floor = results["caption_fid"], results["real_data_floor"]
    assert fid["num_samples"] == floor["num_samples"] == 30 and fid["fid_mnist"] > floor["fid_mnist"] > 0
    report = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "| samples from test-image captions |" in report and "| real MNIST train images (floor) |" in report


def test_caption_fid_prompts_with_the_captions_of_the_first_test_images_of_each_digit():
    from evaluation.prompt_adherence import captions_of_test_images
    from image_data import load_mnist_arrays
    from image_data.captions import (
        ATTRIBUTE_WORDS,
        NUMBER_WORDS,
        SIZE_BINS,
        SLANT_BINS,
        THICKNESS_BINS,
        measure_style,
    )

    prompts, digits = captions_of_test_images(2, seed=0)
    assert digits.tolist() == [d for d in range(10) for _ in range(2)]
    images, labels = load_mnist_arrays("test")
    first_sevens = [i for i in range(len(labels)) if labels[i] == 7][:2]
    for prompt, index in zip(prompts[14:16], first_sevens):
        assert "7" in prompt or NUMBER_WORDS[7] in prompt
        # The caption names some of the image's measured bins and none of the other bins.
        bins = measure_style(images[index]).bins()
        right = [word for name in bins.values() for word in ATTRIBUTE_WORDS[name]]
        wrong = [
            word
            for attribute, names in (("thickness", THICKNESS_BINS), ("slant", SLANT_BINS), ("size", SIZE_BINS))
            for name, _ in names
            if name != bins[attribute]
            for word in ATTRIBUTE_WORDS[name]
        ]
        assert any(word in prompt for word in right) and not any(word in prompt for word in wrong), prompt
    assert captions_of_test_images(2, seed=0)[0] == prompts and captions_of_test_images(2, seed=1)[0] != prompts
