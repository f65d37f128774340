"""benchmarks/text_probe.py: linear probes on the real text encoder, read per held-out phrase."""

import importlib.util
from pathlib import Path

import pytest

from image_data.captions import HELD_OUT_WORDS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text_probe():
    spec = importlib.util.spec_from_file_location("text_probe", REPO / "benchmarks" / "text_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_longest_held_out_phrase_in_a_prompt_is_the_one_it_uses(text_probe):
    assert text_probe.held_out_phrase("picture: 7 (with heavy strokes)", "bold") == "with heavy strokes"
    assert text_probe.held_out_phrase("heavy handwriting showing the number 7", "bold") == "heavy"


def test_prompts_ask_for_the_labelled_bins(text_probe):
    prompts, labels = text_probe.make_prompts(60, held_out=True, seed=3)
    assert len(prompts) == 60 and all(len(values) == 60 for values in labels.values())
    for prompt, index in zip(prompts, labels["slant"].tolist()):
        bin_word = text_probe.PROBED["slant"][index]
        assert any(phrase in prompt for phrase in HELD_OUT_WORDS[bin_word])
    assert text_probe.make_prompts(60, held_out=True, seed=3)[0] == prompts  # seeded


def test_probes_on_the_real_encoder_read_training_phrasings_and_report_every_held_out_phrase(
    text_probe, minilm, monkeypatch, tmp_path
):
    monkeypatch.setattr(text_probe, "load_text_encoder", lambda: minilm)
    output = tmp_path / "probe.md"
    text = text_probe.main(["--num_train_prompts", "150", "--num_test_prompts", "300", "--output", str(output)])
    assert output.read_text() == text
    rows = [
        line.split(" | ") for line in text.splitlines() if line.startswith("| mean |") or line.startswith("| max |")
    ]
    assert len(rows) == 4
    # New prompts in the training phrasings use the words the probe was fitted on: far above chance (0.33).
    assert all(float(row[2]) > 0.8 for row in rows)
    phrase_rows = [
        line for line in text.splitlines() if line.startswith("| thickness |") or line.startswith("| slant |")
    ]
    phrases = {
        phrase for bins in ("thin", "regular", "bold", "left", "upright", "right") for phrase in HELD_OUT_WORDS[bins]
    }
    assert {row.split('"')[1] for row in phrase_rows} == phrases
    # Every held-out prompt is counted once per attribute, under the phrase it uses.
    for attribute in ("thickness", "slant"):
        counts = [int(row.split(" | ")[3]) for row in phrase_rows if row.startswith(f"| {attribute} |")]
        assert sum(counts) == 300


def test_too_few_prompts_is_a_usage_error(text_probe):
    with pytest.raises(SystemExit):
        text_probe.main(["--num_train_prompts", "5"])
