"""The contract every denoiser keeps, checked for each model class and each of its size presets.

Shapes, safetensors save -> load in a fresh process, fp16 loading, timestep forms, gradient
checkpointing, LoRA on the attention projections, torch.compile and the input errors.
Architecture-specific tests live in tests/test_unet.py, tests/test_dit_gqa.py and tests/test_mmdit.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from custom_models import ScratchDiTModel, ScratchMMDiTModel, ScratchUNetModel

REPO_ROOT = Path(__file__).resolve().parents[1]

# Adding a model to the common suite is one entry here: its module must define `PRESETS`.
MODEL_CLASSES = [ScratchUNetModel, ScratchDiTModel, ScratchMMDiTModel]

# Every preset runs at 8x8 (divisible by every patch size and UNet depth used) and class-conditional:
# the architecture is the preset's, the input is small enough for a 2-core CI machine (fp16 matmuls
# and convolutions run at ~1 GFLOP/s on its CPU). Real sizes are checked on the tiny presets.
TEST_CONFIG = dict(sample_size=8, num_classes=10)


def presets_of(model_class):
    return sys.modules[model_class.__module__].PRESETS


CASES = [(model_class, preset) for model_class in MODEL_CLASSES for preset in presets_of(model_class)]
CASE_IDS = [f"{model_class.__name__}-{preset}" for model_class, preset in CASES]


def randomize_zero_init(model: nn.Module) -> nn.Module:
    """Give zero-initialised tensors (adaLN-Zero, output layers) random values so outputs depend on every weight."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def build(model_class, preset: str = "tiny", **overrides):
    torch.manual_seed(0)
    model = model_class.from_preset(preset, **{**TEST_CONFIG, **overrides})
    return randomize_zero_init(model).eval()


def make_inputs(model, batch_size: int = 2) -> dict:
    """A batch with one real and one null class label, and two different timesteps."""
    config = model.config
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    inputs = {"sample": sample, "timestep": torch.tensor([999, 3, 500, 1][:batch_size])}
    if config.num_classes:
        inputs["class_labels"] = torch.tensor([config.num_classes, 1, 7, 0][:batch_size])
    return inputs


def expected_channels(config) -> int:
    return (config.out_channels or config.in_channels) * (2 if config.learn_sigma else 1)


# --------------------------------------------------------------------------------------------------
# Presets: shape, save -> load in a fresh process, fp16 loading
# --------------------------------------------------------------------------------------------------
FRESH_PROCESS_SCRIPT = """
import importlib, json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

root = Path(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
for case in json.loads((root / "cases.json").read_text()):
    module_name, class_name = case["class"].rsplit(".", 1)
    model_class = getattr(importlib.import_module(module_name), class_name)
    model = model_class.from_pretrained(root / case["id"]).eval()
    inputs = load_file(root / case["id"] / "inputs.safetensors")
    with torch.no_grad():
        output = model(**inputs).sample
    save_file({"sample": output.contiguous()}, root / case["id"] / "reloaded_output.safetensors")
"""


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Every preset saved once (config, safetensors weights, a batch of inputs and the fp32 output)."""
    root = tmp_path_factory.mktemp("saved_models")
    for (model_class, preset), case_id in zip(CASES, CASE_IDS):
        model = build(model_class, preset)
        inputs = make_inputs(model)
        with torch.no_grad():
            output = model(**inputs).sample
        model.save_pretrained(root / case_id)
        save_file(inputs, root / case_id / "inputs.safetensors")
        save_file({"sample": output}, root / case_id / "output.safetensors")
    return root


def test_presets_save_and_load_in_a_fresh_process(saved_models):
    """All presets reload in ONE new interpreter (importing torch + diffusers costs seconds) and give identical outputs."""
    cases = [{"id": case_id, "class": f"{cls.__module__}.{cls.__name__}"} for (cls, _), case_id in zip(CASES, CASE_IDS)]
    (saved_models / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(saved_models), str(torch.get_num_threads())],
        check=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    for (model_class, _), case_id in zip(CASES, CASE_IDS):
        directory = saved_models / case_id
        assert (directory / "diffusion_pytorch_model.safetensors").is_file(), case_id
        assert not list(directory.glob("*.bin")), case_id
        assert json.loads((directory / "config.json").read_text())["_class_name"] == model_class.__name__
        output = load_file(directory / "output.safetensors")["sample"]
        reloaded = load_file(directory / "reloaded_output.safetensors")["sample"]
        assert output.abs().max() > 0, case_id
        assert torch.equal(reloaded, output), f"{case_id}: max difference {(reloaded - output).abs().max()}"


@pytest.mark.parametrize("model_class, preset", CASES, ids=CASE_IDS)
def test_preset_output_shape(model_class, preset, saved_models):
    directory = saved_models / f"{model_class.__name__}-{preset}"
    sample = load_file(directory / "inputs.safetensors")["sample"]
    output = load_file(directory / "output.safetensors")["sample"]
    assert not json.loads((directory / "config.json").read_text())["learn_sigma"]
    assert output.shape == sample.shape


@pytest.mark.parametrize("model_class, preset", CASES, ids=CASE_IDS)
def test_preset_loads_in_fp16_with_exact_tables(model_class, preset, saved_models):
    directory = saved_models / f"{model_class.__name__}-{preset}"
    model = model_class.from_pretrained(directory).eval()
    model_fp16 = model_class.from_pretrained(directory, torch_dtype=torch.float16).eval()
    assert {p.dtype for p in model_fp16.parameters()} == {torch.float16}
    inputs = make_inputs(model, batch_size=1)
    inputs_fp16 = {**inputs, "sample": inputs["sample"].half()}
    with torch.no_grad():
        reference = model(**inputs).sample
        cast = model.half()(**inputs_fp16).sample
        loaded = model_fp16(**inputs_fp16).sample
    assert loaded.dtype == torch.float16
    # Loaded-in-fp16 and cast-to-fp16 differ only if a table was built in fp16 during loading.
    torch.testing.assert_close(loaded, cast, rtol=0, atol=1e-3 * max(1.0, cast.abs().max().item()))
    scale = max(1.0, reference.abs().max().item())
    assert (loaded.float() - reference).abs().max().item() < 2e-2 * scale


def test_every_model_has_the_preset_contract():
    for model_class in MODEL_CLASSES:
        assert {"tiny", "small", "iso-1.7m"} <= set(presets_of(model_class))
        tiny = model_class.from_preset("tiny")
        assert sum(p.numel() for p in tiny.parameters()) < 100_000
        iso = model_class.from_preset("iso-1.7m")
        assert 1.5e6 < sum(p.numel() for p in iso.parameters()) < 1.9e6
        with pytest.raises(ValueError, match="tiny"):
            model_class.from_preset("huge")
        assert model_class._supports_gradient_checkpointing
        assert model_class._no_split_modules
        assert model_class.default_lora_target_modules


# --------------------------------------------------------------------------------------------------
# Sizes, channels and the forms of the conditioning
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("in_channels, sample_size", [(1, 28), (3, 32), (4, 64)])
def test_channels_and_sample_sizes(model_class, in_channels, sample_size):
    model = build(model_class, in_channels=in_channels, sample_size=sample_size)
    with torch.no_grad():
        output = model(**make_inputs(model)).sample
    assert output.shape == (2, in_channels, sample_size, sample_size)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_learn_sigma_doubles_output_channels(model_class):
    model = build(model_class, in_channels=3, learn_sigma=True)
    with torch.no_grad():
        output = model(**make_inputs(model)).sample
    assert output.shape == (2, 6, 8, 8) == (2, expected_channels(model.config), 8, 8)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_timestep_forms_agree(model_class):
    model = build(model_class)
    inputs = make_inputs(model)
    with torch.no_grad():
        outputs = [
            model(**{**inputs, "timestep": timestep}).sample
            for timestep in (500, 500.0, torch.tensor(500), torch.tensor([500, 500]), torch.tensor([500.0]))
        ]
        float_timestep = model(**{**inputs, "timestep": torch.tensor([500.5, 500.5])}).sample
        tuple_output = model(**{**inputs, "timestep": 500}, return_dict=False)
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=0, atol=0)
    assert not torch.equal(float_timestep, outputs[0])
    assert isinstance(tuple_output, tuple) and torch.equal(tuple_output[0], outputs[0])


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_class_labels_and_null_label_change_the_output(model_class):
    model = build(model_class)
    sample = make_inputs(model)["sample"]
    with torch.no_grad():
        outputs = [model(sample, 10, class_labels=torch.tensor([label, label])).sample for label in (1, 2, 10)]
        single_label = model(sample, 10, class_labels=torch.tensor(2)).sample
    assert not torch.allclose(outputs[0], outputs[1])
    assert not torch.allclose(outputs[1], outputs[2])
    torch.testing.assert_close(single_label, outputs[1])


@pytest.mark.parametrize("model_class", [ScratchUNetModel, ScratchDiTModel])
def test_unconditional(model_class):
    model = build(model_class, num_classes=None)
    inputs = make_inputs(model)
    assert "class_labels" not in inputs
    with torch.no_grad():
        assert model(**inputs).sample.shape == inputs["sample"].shape
    with pytest.raises(ValueError, match="class_labels"):
        model(**inputs, class_labels=torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------------
# Training features: gradient checkpointing, LoRA, torch.compile
# --------------------------------------------------------------------------------------------------
def output_and_gradients(model, inputs, forward=None):
    """Output and per-parameter gradients of a fixed loss, computed through `forward` (default: the model)."""
    model.zero_grad(set_to_none=True)
    output = (model if forward is None else forward)(**inputs).sample
    output.square().mean().backward()
    return output.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_gradient_checkpointing_gives_the_same_gradients(model_class):
    model = build(model_class).train()
    inputs = make_inputs(model)
    _, plain = output_and_gradients(model, inputs)
    calls = []

    def counting_checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
    _, checkpointed = output_and_gradients(model, inputs)
    assert calls, "gradient checkpointing was enabled but no block was checkpointed"
    assert plain.keys() == checkpointed.keys() and len(plain) == sum(1 for _ in model.parameters())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_lora_on_attention_projections(model_class):
    model = build(model_class)
    targets = model_class.default_lora_target_modules
    projections = [name for name, module in model.named_modules() if name.split(".")[-1] in targets]
    assert projections and all(isinstance(model.get_submodule(name), nn.Linear) for name in projections)
    inputs = make_inputs(model)
    with torch.no_grad():
        base = model(**inputs).sample

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert len(trainable) == 2 * len(projections)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, base)  # lora_B starts at zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    model.train()
    model(**inputs).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(**inputs).sample, base)
        model.disable_adapters()
        torch.testing.assert_close(model(**inputs).sample, base)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_torch_compile(model_class):
    # aot_eager captures forward and backward in one graph as inductor does, without inductor's C++ build
    # (measured ~75 s per tiny transformer on the 2-core CI machine): CI checks the capture, not codegen.
    model = build(model_class).train()
    inputs = make_inputs(model)
    reference_output, reference = output_and_gradients(model, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_output, compiled_gradients = output_and_gradients(model, inputs, forward=compiled)
    torch.testing.assert_close(compiled_output, reference_output)
    assert compiled_gradients.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(compiled_gradients[name], reference[name], msg=name)


# --------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_bad_head_layouts_raise(model_class):
    with pytest.raises(ValueError, match="num_kv_heads"):
        model_class.from_preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_attention_heads=3"):
        model_class.from_preset("tiny", num_attention_heads=3, num_kv_heads=3)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_bad_inputs_raise(model_class):
    model = build(model_class)
    inputs = make_inputs(model)
    sample = inputs["sample"]
    with pytest.raises(ValueError, match="in_channels|channels"):
        model(**{**inputs, "sample": torch.cat([sample, sample], dim=1)})
    with pytest.raises(ValueError, match="sample_size|8"):
        model(**{**inputs, "sample": sample[:, :, :4, :4]})
    for label in (-1, 11):
        with pytest.raises(ValueError, match=rf"\[{label}\] out of range"):
            model(**{**inputs, "class_labels": torch.tensor([0, label])})
    with pytest.raises(ValueError, match="class_labels"):
        model(sample, inputs["timestep"])
    with pytest.raises(ValueError, match="timestep"):
        model(**{**inputs, "timestep": torch.tensor([1, 2, 3])})
