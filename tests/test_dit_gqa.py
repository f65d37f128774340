"""DiT-specific tests: grouped-query attention against a written-out reference, patching, adaLN-Zero, tables.

The contract shared by all models (save/load, fp16, LoRA, checkpointing, errors) is in tests/test_models.py.
"""

import inspect
import math

import pytest
import torch

from custom_models.attention import Attention
from custom_models.dit_gqa import PRESETS, RENAMED_PRESETS, ScratchDiTModel, patchify, unpatchify
from custom_models.embeddings import sincos_2d_position_embedding


def reference_attention(x, to_q, to_k, to_v, to_out, num_heads, num_kv_heads):
    """Plain multi-head attention, softmax(Q K^T / sqrt(d)) V, each K/V head repeated for its group of query heads."""
    batch, tokens, dim = x.shape
    head_dim = dim // num_heads
    q = to_q(x).view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    k = to_k(x).view(batch, tokens, num_kv_heads, head_dim).transpose(1, 2)
    v = to_v(x).view(batch, tokens, num_kv_heads, head_dim).transpose(1, 2)
    # Query head h reads K/V head h // (num_heads / num_kv_heads).
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    return to_out((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


@pytest.mark.parametrize("num_kv_heads", [8, 4, 2, 1])
def test_grouped_query_attention_matches_reference(num_kv_heads):
    torch.manual_seed(0)
    attention = Attention(64, num_attention_heads=8, num_kv_heads=num_kv_heads).double()
    assert attention.to_k.weight.shape == attention.to_v.weight.shape == (num_kv_heads * 8, 64)
    assert attention.to_q.weight.shape == attention.to_out.weight.shape == (64, 64)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    expected = reference_attention(x, attention.to_q, attention.to_k, attention.to_v, attention.to_out, 8, num_kv_heads)
    torch.testing.assert_close(attention(x), expected)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights():
    """A GQA layer is the MHA layer whose K/V projections hold each K/V head once per query head of its group."""
    torch.manual_seed(0)
    grouped = Attention(64, num_attention_heads=8, num_kv_heads=2).double()
    full = Attention(64, num_attention_heads=8, num_kv_heads=8).double()
    with torch.no_grad():
        for name in ("to_q", "to_out"):
            getattr(full, name).load_state_dict(getattr(grouped, name).state_dict())
        for name in ("to_k", "to_v"):
            source, target = getattr(grouped, name), getattr(full, name)
            target.weight.copy_(source.weight.view(2, 8, 64).repeat_interleave(4, dim=0).reshape(64, 64))
            target.bias.copy_(source.bias.view(2, 8).repeat_interleave(4, dim=0).reshape(64))
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    torch.testing.assert_close(grouped(x), full(x))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_model_attention_modules_match_reference(num_kv_heads):
    torch.manual_seed(0)
    model = ScratchDiTModel.from_preset("tiny", num_kv_heads=num_kv_heads).double()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    x = torch.randn(2, 49, model.config.hidden_size, dtype=torch.float64)
    for block in model.transformer_blocks:
        attention = block.attn
        assert attention.to_k.out_features == attention.to_v.out_features == num_kv_heads * head_dim
        expected = reference_attention(
            x, attention.to_q, attention.to_k, attention.to_v, attention.to_out, 4, num_kv_heads
        )
        torch.testing.assert_close(attention(x), expected)


def test_kv_heads_shrink_the_parameter_count():
    counts = {
        kv: sum(p.numel() for p in ScratchDiTModel.from_preset("iso-1.7m", num_kv_heads=kv).parameters())
        for kv in (4, 2, 1)
    }
    # Per block, K and V each lose (4 - kv) heads of 32 channels: 2 * (128 + 1) * 32 * (4 - kv) parameters.
    assert counts[4] - counts[2] == 6 * 2 * 129 * 32 * 2
    assert counts[4] - counts[1] == 6 * 2 * 129 * 32 * 3


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_patch_sizes(patch_size):
    model = ScratchDiTModel.from_preset("tiny", patch_size=patch_size, sample_size=32, in_channels=3)
    assert model(torch.randn(2, 3, 32, 32), 1, class_labels=torch.tensor([0, 10])).sample.shape == (2, 3, 32, 32)


def test_unpatchify_inverts_the_token_layout():
    image = torch.randn(2, 3, 8, 8)
    grid, patch = 2, 4
    tokens = (
        image.view(2, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1).reshape(2, grid * grid, patch * patch * 3)
    )
    torch.testing.assert_close(unpatchify(tokens, grid, patch, 3), image, rtol=0, atol=0)
    # Token i of patchify is the patch at row i // grid, column i % grid, as unpatchify places it.
    conv = torch.nn.Conv2d(3, 5, kernel_size=patch, stride=patch)
    patches = patchify(image, conv)
    torch.testing.assert_close(patches[:, grid + 1], conv(image[:, :, patch:, patch:]).flatten(1))


def test_adaln_zero_initialisation_makes_blocks_identities_and_output_zero():
    model = ScratchDiTModel.from_preset("tiny")
    for block in model.transformer_blocks:
        assert not block.adaLN_modulation.weight.any() and not block.adaLN_modulation.bias.any()
        x, conditioning = torch.randn(2, 49, 32), torch.randn(2, 32)
        torch.testing.assert_close(block(x, conditioning), x)
    assert not model.final_layer.linear.weight.any()
    output = model(torch.randn(2, 1, 28, 28), 10, class_labels=torch.tensor([3, 10])).sample
    assert not output.any()


def test_position_table_is_float32_and_exact_after_fp16_loading(tmp_path):
    ScratchDiTModel.from_preset("tiny").save_pretrained(tmp_path)
    model = ScratchDiTModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert model.patch_embed.weight.dtype == torch.float16
    table = model.position_table(torch.device("cpu"))
    assert table.dtype == torch.float32
    assert torch.equal(table, sincos_2d_position_embedding(32, 7, 7))
    assert "position_table" not in str(list(model.state_dict()))
    model(torch.randn(1, 1, 28, 28, dtype=torch.float16), 999, class_labels=torch.tensor([1]))


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        ScratchDiTModel(sample_size=28, patch_size=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        ScratchDiTModel.from_preset("tiny", hidden_size=30, num_attention_heads=6, num_kv_heads=6)
    with pytest.raises(ValueError, match="num_classes"):
        ScratchDiTModel.from_preset("tiny", num_classes=0)
    model = ScratchDiTModel.from_preset("tiny")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(torch.randn(1, 1, 28, 28), 1, class_labels=torch.tensor([1]), encoder_hidden_states=torch.randn(1, 4, 32))


def test_preset_sizes():
    with torch.device("meta"):  # counts only: skip allocating and initialising 27M parameters
        counts = {name: sum(p.numel() for p in ScratchDiTModel.from_preset(name).parameters()) for name in PRESETS}
    assert counts == {"tiny": 48_528, "iso-1.7m": 1_770_000, "small": 3_871_120, "large": 26_923_524}
    assert PRESETS["large"] == dict(patch_size=2, hidden_size=512, num_layers=6, num_attention_heads=8, num_kv_heads=2)
    defaults = inspect.signature(ScratchDiTModel.__init__).parameters
    assert {key: defaults[key].default for key in PRESETS["large"]} == PRESETS["large"]


def test_renamed_preset_still_builds_with_a_warning_naming_the_new_name():
    # A run's config.yaml records `model.preset`: configs saved before the rename keep training and resuming.
    assert RENAMED_PRESETS == {"seed000": "large"} and "seed000" not in PRESETS
    with torch.device("meta"), pytest.warns(FutureWarning, match="DiT preset 'seed000' is now called 'large'"):
        model = ScratchDiTModel.from_preset("seed000", sample_size=28)
    with torch.device("meta"):
        assert dict(model.config) == dict(ScratchDiTModel.from_preset("large", sample_size=28).config)
