"""MMDiT-specific tests: joint attention against a written-out reference, both context modes, their errors.

The contract shared by all models (save/load, fp16, LoRA, checkpointing, errors) is in tests/test_models.py.
"""

import math

import pytest
import torch

from custom_models.embeddings import sincos_2d_position_embedding
from custom_models.mmdit import PRESETS, JointAttention, ScratchMMDiTModel

TEXT = dict(num_classes=None, joint_attention_dim=24, pooled_projection_dim=16)


def randomized(model):
    """Random values in the zero-initialised layers, so every weight reaches the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.05)
    return model


def reference_joint_attention(attention, image, context, num_heads, num_kv_heads):
    """softmax(Q K^T / sqrt(d)) V over [image; context] tokens, per-stream projections and RMSNorms, K/V heads repeated."""
    batch, num_image_tokens, dim = image.shape
    head_dim = dim // num_heads

    def project(linear, norm, x, heads):
        x = linear(x).view(batch, x.shape[1], heads, head_dim)
        if norm is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
        return x.transpose(1, 2)

    q = torch.cat(
        [
            project(attention.to_q, attention.norm_q, image, num_heads),
            project(attention.add_q_proj, attention.norm_added_q, context, num_heads),
        ],
        dim=2,
    )
    k = torch.cat(
        [
            project(attention.to_k, attention.norm_k, image, num_kv_heads),
            project(attention.add_k_proj, attention.norm_added_k, context, num_kv_heads),
        ],
        dim=2,
    )
    v = torch.cat(
        [
            project(attention.to_v, None, image, num_kv_heads),
            project(attention.add_v_proj, None, context, num_kv_heads),
        ],
        dim=2,
    )
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, -1, dim)
    image_out = attention.to_out(out[:, :num_image_tokens])
    context_out = None if attention.to_add_out is None else attention.to_add_out(out[:, num_image_tokens:])
    return image_out, context_out


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("context_pre_only", [False, True])
def test_joint_attention_matches_reference(num_kv_heads, context_pre_only):
    torch.manual_seed(0)
    attention = JointAttention(32, 4, num_kv_heads, context_pre_only=context_pre_only).double()
    with torch.no_grad():
        for norm in (attention.norm_q, attention.norm_k, attention.norm_added_q, attention.norm_added_k):
            norm.weight.uniform_(0.5, 1.5)
    for name in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
        assert getattr(attention, name).out_features == num_kv_heads * 8
    image, context = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 3, 32, dtype=torch.float64)
    image_out, context_out = attention(image, context)
    expected_image, expected_context = reference_joint_attention(attention, image, context, 4, num_kv_heads)
    torch.testing.assert_close(image_out, expected_image)
    if context_pre_only:
        assert context_out is None and attention.to_add_out is None
    else:
        torch.testing.assert_close(context_out, expected_context)


def test_last_block_only_reads_the_context():
    model = ScratchMMDiTModel.from_preset("tiny")
    *earlier, last = model.transformer_blocks
    assert last.context_pre_only and last.attn.to_add_out is None and not hasattr(last, "ff_context")
    assert last.adaLN_modulation_context.out_features == 2 * model.config.hidden_size
    assert all(hasattr(block, "ff_context") and block.attn.to_add_out is not None for block in earlier)


def test_class_tokens_condition_the_image_through_joint_attention():
    model = randomized(ScratchMMDiTModel.from_preset("tiny"))
    sample, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 10])
    with torch.no_grad():
        before = model(sample, 50, class_labels=labels).sample
        model.class_tokens.weight[3].normal_()  # only the context tokens of class 3 change
        after = model(sample, 50, class_labels=labels).sample
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    assert model.class_tokens.weight.shape == (11, model.config.num_class_tokens * model.config.hidden_size)


def test_text_context_any_length():
    model = randomized(ScratchMMDiTModel.from_preset("tiny", **TEXT))
    sample, pooled = torch.randn(2, 1, 28, 28), torch.randn(2, 16)
    assert not hasattr(model, "class_tokens")
    with torch.no_grad():
        short = model(sample, 0.5, encoder_hidden_states=torch.randn(2, 3, 24), pooled_projections=pooled).sample
        long = model(sample, 0.5, encoder_hidden_states=torch.randn(2, 7, 24), pooled_projections=pooled).sample
    assert short.shape == long.shape == sample.shape
    assert not torch.allclose(short, long)


def test_class_and_text_modes_in_one_model():
    model = randomized(
        ScratchMMDiTModel.from_preset("tiny", num_classes=10, joint_attention_dim=24, pooled_projection_dim=16)
    )
    sample = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        by_class = model(sample, 5, class_labels=torch.tensor([1, 2])).sample
        by_text = model(
            sample, 5, encoder_hidden_states=torch.randn(2, 4, 24), pooled_projections=torch.randn(2, 16)
        ).sample
    assert by_class.shape == by_text.shape == sample.shape
    with pytest.raises(ValueError, match="either"):
        model(
            sample,
            5,
            class_labels=torch.tensor([1, 2]),
            encoder_hidden_states=torch.randn(2, 4, 24),
            pooled_projections=torch.randn(2, 16),
        )


def test_context_errors():
    sample = torch.randn(2, 1, 28, 28)
    text_model = ScratchMMDiTModel.from_preset("tiny", **TEXT)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        text_model(sample, 5)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        text_model(sample, 5, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="pooled_projections"):
        text_model(sample, 5, encoder_hidden_states=torch.randn(2, 4, 24))
    with pytest.raises(ValueError, match="pooled_projections"):
        text_model(sample, 5, encoder_hidden_states=torch.randn(2, 4, 24), pooled_projections=torch.randn(2, 15))
    with pytest.raises(ValueError, match="joint_attention_dim=24"):
        text_model(sample, 5, encoder_hidden_states=torch.randn(2, 4, 23), pooled_projections=torch.randn(2, 16))
    class_model = ScratchMMDiTModel.from_preset("tiny")
    with pytest.raises(ValueError, match="joint_attention_dim is None"):
        class_model(sample, 5, encoder_hidden_states=torch.randn(2, 4, 24), pooled_projections=torch.randn(2, 16))


def test_masked_padding_of_the_text_context_changes_nothing():
    model = randomized(ScratchMMDiTModel.from_preset("tiny", sample_size=8, in_channels=1, **TEXT)).eval()
    sample, states, pooled = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 24), torch.randn(2, 16)
    padded = torch.cat([states, 50 * torch.randn(2, 4, 24)], dim=1)
    mask = torch.tensor([[True] * 3 + [False] * 4] * 2)
    with torch.no_grad():
        short = model(sample, 5, encoder_hidden_states=states, pooled_projections=pooled).sample
        masked = model(
            sample, 5, encoder_hidden_states=padded, pooled_projections=pooled, encoder_attention_mask=mask
        ).sample
        unmasked = model(sample, 5, encoder_hidden_states=padded, pooled_projections=pooled).sample
    torch.testing.assert_close(masked, short, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, short, atol=1e-3)
    with pytest.raises(ValueError, match="pass them too"):
        ScratchMMDiTModel.from_preset("tiny", sample_size=8, in_channels=1)(
            sample, 5, class_labels=torch.tensor([0, 1]), encoder_attention_mask=mask
        )


def test_an_unconditional_mmdit_attends_to_one_learned_context_sequence():
    model = ScratchMMDiTModel.from_preset("tiny", num_classes=None, sample_size=8, in_channels=1).eval()
    assert model.unconditional_tokens.weight.shape == (1, 2 * 32) and not hasattr(model, "class_tokens")
    torch.nn.init.normal_(model.final_layer.linear.weight)  # adaLN-Zero would make every output 0
    sample = torch.randn(3, 1, 8, 8)
    out = model(sample, torch.tensor([1, 500, 999])).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()
    # The context is the same for every image: a batch equals its images one by one.
    single = torch.cat([model(sample[i : i + 1], torch.tensor([t])).sample for i, t in enumerate([1, 500, 999])])
    torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unconditional .*pass no `class_labels`"):
        model(sample, 5, class_labels=torch.tensor([0, 1, 2]))


def test_config_errors():
    with pytest.raises(ValueError, match="both joint_attention_dim and pooled_projection_dim"):
        ScratchMMDiTModel.from_preset("tiny", joint_attention_dim=24)
    with pytest.raises(ValueError, match="num_class_tokens"):
        ScratchMMDiTModel.from_preset("tiny", num_class_tokens=0)
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        ScratchMMDiTModel.from_preset("tiny", patch_size=8)


def test_adaln_zero_initialisation_gives_zero_output():
    model = ScratchMMDiTModel.from_preset("tiny")
    assert not model(torch.randn(2, 1, 28, 28), 10, class_labels=torch.tensor([3, 10])).sample.any()


def test_position_table_is_float32_and_exact_after_fp16_loading(tmp_path):
    ScratchMMDiTModel.from_preset("tiny", sample_size=32, patch_size=2).save_pretrained(tmp_path)
    model = ScratchMMDiTModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    table = model.position_table(torch.device("cpu"))
    assert table.dtype == torch.float32 and torch.equal(table, sincos_2d_position_embedding(32, 16, 16))
    assert (
        model(torch.randn(1, 1, 32, 32, dtype=torch.float16), 999, class_labels=torch.tensor([1])).sample.dtype
        == torch.float16
    )


def test_preset_sizes():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in ScratchMMDiTModel.from_preset(name).parameters()) for name in PRESETS}
    assert counts == {"tiny": 71_376, "iso-1.7m": 1_732_656, "small": 7_694_224}
