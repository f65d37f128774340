"""UNet-specific tests; the contract shared by all models lives in tests/test_models.py."""

import pytest
import torch
from torch import nn

from custom_models.unet import PRESETS, RENAMED_PRESETS, ScratchUNetModel, UNetAttentionBlock, UNetResnetBlock

TINY = dict(
    block_out_channels=(8, 16),
    attention_levels=(False, True),
    num_attention_heads=2,
    norm_num_groups=4,
    time_embedding_dim=32,
)


def build(**overrides) -> ScratchUNetModel:
    torch.manual_seed(0)
    return ScratchUNetModel(**{**TINY, **overrides}).eval()


def randomize_zero_init(model: nn.Module) -> nn.Module:
    """Give the zero-initialised output layers random weights, so the output depends on every input."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return model


def noise(model: ScratchUNetModel, batch: int = 2) -> torch.Tensor:
    config = model.config
    return torch.randn(
        batch, config.in_channels, config.sample_size, config.sample_size, generator=torch.Generator().manual_seed(2)
    )


# --------------------------------------------------------------------------------------------------
# Shapes over levels, attention placements, sizes and channels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        dict(sample_size=28, in_channels=1, block_out_channels=(8, 16, 16), attention_levels=(False, False, True)),
        dict(
            sample_size=32, in_channels=3, block_out_channels=(8,), attention_levels=(True,), mid_block_attention=False
        ),
        dict(
            sample_size=64,
            in_channels=4,
            block_out_channels=(8, 8, 16, 16),
            attention_levels=(False, False, False, False),
        ),
        dict(sample_size=28, in_channels=1, layers_per_block=2, attention_levels=(True, True), num_kv_heads=1),
        dict(
            sample_size=32,
            in_channels=1,
            block_out_channels=(8, 16),
            attention_levels=(False, False),
            mid_block_attention=False,
        ),
    ],
    ids=["28-3levels", "32-rgb-1level", "64-latents-4levels", "28-2layers-mqa", "32-no-attention"],
)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape(config, learn_sigma):
    model = build(num_classes=10, learn_sigma=learn_sigma, **config)
    sample = noise(model)
    out = model(sample, torch.tensor([3, 900]), class_labels=torch.tensor([0, 10])).sample
    channels = config["in_channels"] * (2 if learn_sigma else 1)
    assert out.shape == (2, channels, config["sample_size"], config["sample_size"])


def test_out_channels_differs_from_in_channels():
    model = build(in_channels=4, out_channels=3, sample_size=32)
    assert model(noise(model), 5).sample.shape == (2, 3, 32, 32)


def test_sample_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match=r"sample_size`=28 .* 2\*\*\(levels-1\) = 8"):
        ScratchUNetModel(
            **{**TINY, "sample_size": 28, "block_out_channels": (8, 8, 16, 16), "attention_levels": (False,) * 4}
        )


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (2, 1, 28, 27), (1, 28, 28)])
def test_wrong_input_shape_is_refused(shape):
    model = build(sample_size=28, in_channels=1)
    with pytest.raises(ValueError, match=r"\[batch, 1, 28, 28\]"):
        model(torch.randn(*shape), 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_levels=(True,)), "one flag per level"),
        (dict(norm_num_groups=3), "not divisible by `norm_num_groups`=3"),
        (dict(num_attention_heads=3), "not divisible by num_attention_heads=3"),
        (dict(num_kv_heads=3), "allowed num_kv_heads"),
        (dict(class_conditioning="adagn"), r"allowed: \['film', 'cross_attention'\]"),
        (dict(num_classes=10, num_class_tokens=4), "num_class_tokens"),
        (dict(class_conditioning="cross_attention"), "needs `num_classes`"),
        (
            dict(cross_attention_dim=8, attention_levels=(False, False), mid_block_attention=False),
            "at least one attention",
        ),
        (dict(layers_per_block=0), "layers_per_block"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        ScratchUNetModel(**{**TINY, **overrides})


# --------------------------------------------------------------------------------------------------
# Initialisation, conditioning and skip connections
# --------------------------------------------------------------------------------------------------
def test_zero_init_output_and_gradient_reaches_output_layer():
    model = build(num_classes=10, cross_attention_dim=6).train()
    sample = noise(model)
    out = model(sample, 500, class_labels=torch.tensor([1, 2]), encoder_hidden_states=torch.randn(2, 3, 6)).sample
    assert torch.equal(out, torch.zeros_like(out))
    (out - sample).pow(2).mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0
    for module in model.modules():
        if isinstance(module, UNetResnetBlock):
            assert not module.conv2.weight.any()
        if isinstance(module, UNetAttentionBlock):
            assert not module.self_attention.to_out.weight.any() and not module.cross_attention.to_out.weight.any()


@pytest.mark.parametrize("class_conditioning", ["film", "cross_attention"])
def test_class_and_timestep_change_the_output(class_conditioning):
    tokens = 3 if class_conditioning == "cross_attention" else 1
    model = randomize_zero_init(build(num_classes=10, class_conditioning=class_conditioning, num_class_tokens=tokens))
    sample = noise(model, batch=1).expand(3, -1, -1, -1)
    with torch.no_grad():
        out = model(sample, 250, class_labels=torch.tensor([1, 7, 10])).sample
        later = model(sample, 750, class_labels=torch.tensor([1, 7, 10])).sample
    assert not torch.allclose(out[0], out[1], atol=1e-5), "two classes gave the same output"
    assert not torch.allclose(out[0], out[2], atol=1e-5), "the null label gave the same output as a class"
    assert not torch.allclose(out, later, atol=1e-5), "the timestep did not change the output"


def test_film_mode_conditions_only_through_scale_and_shift():
    model = build(num_classes=10)
    assert model.class_embedding.embedding_table.weight.shape == (11, 32)
    assert all(m.cross_attention is None for m in model.modules() if isinstance(m, UNetAttentionBlock))


def test_cross_attention_mode_attends_to_class_tokens():
    model = randomize_zero_init(build(num_classes=10, class_conditioning="cross_attention", num_class_tokens=4))
    assert model.class_embedding.embedding_table.weight.shape == (11, 4 * 32)
    contexts = []
    hooks = [
        m.cross_attention.register_forward_hook(lambda mod, args, out: contexts.append(args[1].shape))
        for m in model.modules()
        if isinstance(m, UNetAttentionBlock)
    ]
    out = model(noise(model), 10, class_labels=torch.tensor([3, 10])).sample
    for hook in hooks:
        hook.remove()
    # Down level 2 (1 block), mid block, up level 2 (2 blocks) each cross-attend to the 4 class tokens.
    assert contexts == [torch.Size([2, 4, 32])] * 4
    out.pow(2).mean().backward()
    assert model.class_embedding.embedding_table.weight.grad[[3, 10]].abs().sum() > 0


def test_external_encoder_hidden_states():
    model = randomize_zero_init(build(cross_attention_dim=12))
    sample = noise(model)
    with torch.no_grad():
        first = model(sample, 10, encoder_hidden_states=torch.randn(2, 5, 12)).sample
        second = model(sample, 10, encoder_hidden_states=torch.randn(2, 5, 12)).sample
    assert not torch.allclose(first, second, atol=1e-5)
    with pytest.raises(ValueError, match="pass them"):
        model(sample, 10)
    with pytest.raises(ValueError, match=r"\[2, tokens, 12\]"):
        model(sample, 10, encoder_hidden_states=torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="no `cross_attention_dim`"):
        build()(sample, 10, encoder_hidden_states=torch.randn(2, 5, 12))


def test_pooled_projections_join_the_time_embedding():
    model = randomize_zero_init(build(cross_attention_dim=12, pooled_projection_dim=6)).eval()
    sample, states = noise(model), torch.randn(2, 5, 12)
    with torch.no_grad():
        first = model(sample, 10, encoder_hidden_states=states, pooled_projections=torch.randn(2, 6)).sample
        second = model(sample, 10, encoder_hidden_states=states, pooled_projections=torch.randn(2, 6)).sample
    assert not torch.allclose(first, second, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"pass `pooled_projections` of shape \[batch=2, pooled_projection_dim=6\]; got None"
    ):
        model(sample, 10, encoder_hidden_states=states)
    with pytest.raises(ValueError, match=r"got \(2, 5\)"):
        model(sample, 10, encoder_hidden_states=states, pooled_projections=torch.randn(2, 5))
    with pytest.raises(ValueError, match="takes no `pooled_projections`"):
        build(cross_attention_dim=12)(sample, 10, encoder_hidden_states=states, pooled_projections=torch.randn(2, 6))
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        build(pooled_projection_dim=0)


def test_masked_padding_of_encoder_hidden_states_changes_nothing():
    model = randomize_zero_init(build(cross_attention_dim=12)).eval()
    sample, states = noise(model), torch.randn(2, 3, 12)
    padded = torch.cat([states, 50 * torch.randn(2, 4, 12)], dim=1)  # 4 padding tokens of large junk
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]] * 2)
    with torch.no_grad():
        short = model(sample, 10, encoder_hidden_states=states).sample
        masked = model(sample, 10, encoder_hidden_states=padded, encoder_attention_mask=mask).sample
        unmasked = model(sample, 10, encoder_hidden_states=padded).sample
    torch.testing.assert_close(masked, short, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, short, atol=1e-3)
    # With class tokens prepended, the class tokens stay visible.
    both = build(num_classes=10, class_conditioning="cross_attention", num_class_tokens=2, cross_attention_dim=12)
    both = randomize_zero_init(both).eval()
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        short = both(sample, 10, class_labels=labels, encoder_hidden_states=states).sample
        masked = both(sample, 10, class_labels=labels, encoder_hidden_states=padded, encoder_attention_mask=mask).sample
    torch.testing.assert_close(masked, short, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"must have shape \[2, 7\]"):
        model(sample, 10, encoder_hidden_states=padded, encoder_attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="at least one token"):
        model(sample, 10, encoder_hidden_states=padded, encoder_attention_mask=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="`encoder_attention_mask` masks `encoder_hidden_states`: pass them too"):
        build()(sample, 10, encoder_attention_mask=mask)


def test_class_tokens_and_encoder_hidden_states_are_attended_together():
    model = build(num_classes=10, class_conditioning="cross_attention", num_class_tokens=2, cross_attention_dim=12)
    contexts = []
    block = model.mid_attention.cross_attention
    block.register_forward_hook(lambda mod, args, out: contexts.append(args[1].shape))
    model(noise(model), 10, class_labels=torch.tensor([0, 1]), encoder_hidden_states=torch.randn(2, 5, 12))
    assert contexts == [torch.Size([2, 2 + 5, 12])]


def test_skip_connections_feed_every_decoder_block():
    model = build()
    widths = []
    hooks = [
        r.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
        for level in model.up_blocks
        for r in level.resnets
    ]
    model(noise(model), 0)
    for hook in hooks:
        hook.remove()
    # Encoder keeps: stem 8, resnet 8, downsample 8, resnet 16. The decoder pops them in reverse, each
    # concatenated to the running width: 16+16, 16+8, (upsample) 16+8, 8+8.
    assert widths == [32, 24, 24, 16]


def test_grouped_kv_heads_shrink_key_value_projections():
    mha, gqa = build(num_attention_heads=4), build(num_attention_heads=4, num_kv_heads=2)
    assert mha.mid_attention.self_attention.to_k.out_features == 16
    assert gqa.mid_attention.self_attention.to_k.out_features == 8
    assert gqa.config.num_kv_heads == 2
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


def test_timestep_forms_agree():
    model = randomize_zero_init(build())
    sample = noise(model)
    with torch.no_grad():
        reference = model(sample, torch.tensor([42, 42])).sample
        for timestep in (42, 42.0, torch.tensor(42), torch.tensor([42.0])):
            torch.testing.assert_close(model(sample, timestep).sample, reference)
        assert not torch.allclose(model(sample, 42.5).sample, reference)


def test_lora_can_target_convolutions():
    from peft import LoraConfig

    model = build(num_classes=10)
    targets = ScratchUNetModel.default_lora_target_modules + ScratchUNetModel.lora_conv_target_modules
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    lora_convs = [name for name, _ in model.named_modules() if name.endswith("conv1.lora_A")]
    assert len(lora_convs) == sum(isinstance(m, UNetResnetBlock) for m in model.modules())
    assert model(noise(model), 3, class_labels=torch.tensor([1, 2])).sample.shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------
def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 10_000, 100_000),
        ("small", 1_000_000, 3_000_000),
        ("iso-1.7m", 1_600_000, 1_800_000),
        ("medium-cross-attention", 1_000_000, 4_000_000),
    ],
)
def test_preset_sizes(name, low, high):
    model = ScratchUNetModel.from_preset(name, num_classes=10)
    assert low <= count(model) <= high


def test_medium_preset_matches_the_diffusers_reference_size():
    from diffusers import UNet2DModel

    reference = UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
    )
    ours = ScratchUNetModel.from_preset("medium", sample_size=32, num_classes=10)
    assert abs(count(ours) / count(reference) - 1) < 0.05


def test_medium_cross_attention_preset_uses_class_cross_attention():
    model = ScratchUNetModel.from_preset("medium-cross-attention")
    assert model.config.class_conditioning == "cross_attention" and model.config.num_classes == 10


@pytest.mark.parametrize("old, new", [("seed000-mha", "large"), ("seed003", "medium-cross-attention")])
def test_renamed_presets_still_build_with_a_warning_naming_the_new_name(old, new):
    # A run's config.yaml records `model.preset`: configs saved before the rename keep training and resuming.
    assert RENAMED_PRESETS[old] == new and old not in PRESETS
    with pytest.warns(FutureWarning, match=f"UNet preset '{old}' is now called '{new}'"):
        model = ScratchUNetModel.from_preset(old, sample_size=32)
    assert dict(model.config) == dict(ScratchUNetModel.from_preset(new, sample_size=32).config)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="available: .*iso-1.7m"):
        ScratchUNetModel.from_preset("huge")
    assert {"tiny", "small", "iso-1.7m", "medium", "large", "medium-cross-attention"} == set(PRESETS)
