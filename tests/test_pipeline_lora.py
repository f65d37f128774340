"""Pipeline-level LoRA on every model: diffusers file format, alpha round trip, fuse, adapters weights, unload."""

import json

import pytest
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from pipeline_helpers import MODELS, run, tiny_denoiser, tiny_pipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def frozen_pipeline(kind, scheduler, **kwargs):
    """A tiny pipeline with its denoiser frozen, as peft leaves it after adding an adapter.

    torch's RMSNorm (MMDiT) takes another kernel, with last-bit differences, when no weight requires grad;
    freezing up front lets outputs with and without LoRA compare bit for bit.
    """
    pipe = tiny_pipeline(kind, scheduler, **kwargs)
    pipe.denoiser.requires_grad_(False)
    return pipe


def add_random_lora(denoiser, adapter_name="default"):
    """Rank 4, alpha 8 on the model's default targets; random B so the adapter changes the output."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=denoiser.default_lora_target_modules, init_lora_weights=False)
    torch.manual_seed(1)
    denoiser.add_adapter(config, adapter_name=adapter_name)


@pytest.mark.parametrize("kind", list(MODELS))
def test_lora_round_trip_fuse_weights_and_unload(kind, tmp_path):
    pipe = frozen_pipeline(kind, "ScratchDDIMScheduler")
    name = pipe.denoiser_name
    base = run(pipe)
    add_random_lora(pipe.denoiser)
    with_lora = run(pipe)
    assert not torch.allclose(with_lora, base, atol=1e-3)

    pipe.save_denoiser_lora(tmp_path)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert all(key.startswith(f"{name}.") and ".lora_" in key for key in load_file(file))
    with safe_open(str(file), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[LORA_ADAPTER_METADATA_KEY])
    assert metadata[f"{name}.r"] == 4 and metadata[f"{name}.lora_alpha"] == 8

    pipe.unload_lora_weights()
    assert torch.equal(run(pipe), base)

    # Reload into a fresh pipeline: alpha 8 with r 4 survives (scale 2), so the output is the one before saving.
    fresh = frozen_pipeline(kind, "ScratchDDIMScheduler")
    fresh.load_lora_weights(tmp_path, adapter_name="style")
    torch.testing.assert_close(run(fresh), with_lora, rtol=0, atol=1e-6)
    assert fresh.get_list_adapters() == {name: ["style"]}

    fresh.set_adapters("style", adapter_weights=0.0)
    assert torch.equal(run(fresh), base)
    fresh.set_adapters(["style"], adapter_weights=[1.0])
    torch.testing.assert_close(run(fresh), with_lora, rtol=0, atol=1e-6)
    fresh.disable_lora()
    assert torch.equal(run(fresh), base)
    fresh.enable_lora()

    # Fusing adds B @ A * scale to the weights and unfusing subtracts it again: equal up to rounding.
    fresh.fuse_lora()
    assert fresh.num_fused_loras == 1
    torch.testing.assert_close(run(fresh), with_lora, rtol=0, atol=1e-4)
    fresh.unfuse_lora()
    torch.testing.assert_close(run(fresh), with_lora, rtol=0, atol=1e-4)
    fresh.unload_lora_weights()
    torch.testing.assert_close(run(fresh), base, rtol=0, atol=1e-4)


def test_file_is_diffusers_format_and_alpha_lives_in_the_metadata(tmp_path):
    pipe = frozen_pipeline("dit", "ScratchDDPMScheduler")
    add_random_lora(pipe.transformer)
    with_lora = run(pipe)
    pipe.save_denoiser_lora(tmp_path)

    # diffusers' own model-level loader reads the file as written.
    model = tiny_denoiser("dit").requires_grad_(False)
    model.load_lora_adapter(str(tmp_path), prefix="transformer", use_safetensors=True)
    torch.testing.assert_close(
        run(frozen_pipeline("dit", "ScratchDDPMScheduler", denoiser=model)), with_lora, rtol=0, atol=1e-6
    )

    # Without the metadata a loader takes lora_alpha = r: half strength, a different image.
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    save_file(load_file(tmp_path / "pytorch_lora_weights.safetensors"), stripped / "pytorch_lora_weights.safetensors")
    weak = frozen_pipeline("dit", "ScratchDDPMScheduler")
    weak.load_lora_weights(stripped)
    assert weak.transformer.peft_config["default_0"].lora_alpha == 4
    assert not torch.allclose(run(weak), with_lora, atol=1e-3)


def test_save_lora_weights_classmethod_needs_the_config(tmp_path):
    from peft.utils import get_peft_model_state_dict

    pipe = frozen_pipeline("unet", "ScratchDDPMScheduler")
    add_random_lora(pipe.unet)
    layers = get_peft_model_state_dict(pipe.unet)
    with pytest.raises(ValueError, match="unet_lora_adapter_metadata"):
        pipe.save_lora_weights(tmp_path, unet_lora_layers=layers)
    pipe.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict()
    )
    state_dict, metadata = pipe.lora_state_dict(tmp_path, return_lora_metadata=True)
    assert set(state_dict) == {f"unet.{key}" for key in layers} and metadata["unet.lora_alpha"] == 8


@pytest.mark.parametrize(
    "state_dict, message",
    [
        (
            {"text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8)},
            r"only into `transformer`.*text_encoder\.layers",
        ),
        (
            {"transformer.blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 8)},
            r"match no module of `transformer`.*blocks\.9\.attn\.to_q",
        ),
        ({"transformer.transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 8)}, "Not a LoRA file"),
    ],
)
def test_lora_file_for_another_network_is_refused(state_dict, message, tmp_path):
    save_file(state_dict, tmp_path / "pytorch_lora_weights.safetensors")
    pipe = frozen_pipeline("dit", "ScratchDDPMScheduler")
    with pytest.raises(ValueError, match=message):
        pipe.load_lora_weights(tmp_path)
    assert not getattr(pipe.transformer, "peft_config", None)


def _saved_lora(kind, folder):
    """A saved rank-4 adapter of a tiny `kind` pipeline: (state dict, header metadata, a fresh pipeline)."""
    pipe = frozen_pipeline(kind, "ScratchDDIMScheduler")
    add_random_lora(pipe.denoiser)
    pipe.save_denoiser_lora(folder)
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    return load_file(path), header, frozen_pipeline(kind, "ScratchDDIMScheduler")


def _refused(pipe, state_dict, header, folder, message):
    save_file(state_dict, folder / "pytorch_lora_weights.safetensors", metadata=header)
    with pytest.raises(ValueError, match=message) as error:
        pipe.load_lora_weights(folder)
    assert not getattr(pipe.denoiser, "peft_config", None)  # nothing was half-loaded
    return str(error.value)


@pytest.mark.parametrize("kind", list(MODELS))
def test_incomplete_or_broken_lora_files_are_refused(kind, tmp_path):
    state_dict, header, pipe = _saved_lora(kind, tmp_path)
    b_keys = sorted(k for k in state_dict if ".lora_B." in k)

    # Every lora_B dropped: peft would load the A halves with a warning only.
    message = _refused(
        pipe, {k: v for k, v in state_dict.items() if ".lora_B." not in k}, header, tmp_path, "lacks .* lora_B"
    )
    assert b_keys[0] in message

    # One targeted module missing entirely: the LoraConfig says which modules the adapter must cover.
    module = b_keys[-1].split(".lora_B.")[0]
    partial = {k: v for k, v in state_dict.items() if not k.startswith(f"{module}.lora_")}
    message = _refused(pipe, partial, header, tmp_path, "lacks 2 tensor")
    assert f"{module}.lora_A.weight" in message and f"{module}.lora_B.weight" in message

    # Tensors of another rank than the metadata's r.
    config = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    config[f"{pipe.denoiser_name}.r"] = 2
    _refused(pipe, state_dict, {**header, LORA_ADAPTER_METADATA_KEY: json.dumps(config)}, tmp_path, "configured r=2")

    # NaN in an adapter tensor.
    poisoned = dict(state_dict)
    poisoned[b_keys[0]] = poisoned[b_keys[0]].clone().fill_(float("nan"))
    message = _refused(pipe, poisoned, header, tmp_path, "hold NaN or inf")
    assert b_keys[0] in message

    # The intact file still loads.
    save_file(state_dict, tmp_path / "pytorch_lora_weights.safetensors", metadata=header)
    pipe.load_lora_weights(tmp_path)
    assert len(pipe.denoiser.peft_config) == 1
