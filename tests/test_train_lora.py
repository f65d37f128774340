"""LoRA fine-tuning (`training/train_lora.py`): only the adapter trains, the base stays bit-identical, the adapter
reloads at full strength in a fresh process and from the Hub, resumes exactly, and refuses another architecture."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from hub_server import FakeHub
from huggingface_hub import ModelCard
from peft import LoraConfig
from pipeline_helpers import CALL, run, tiny_pipeline
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.ndimage import grey_dilation

from commands import run as run_command
from image_data import DilatedStrokes, dilate_strokes, load_image_dataset, mean_ink
from training.checkpointing import CHECKPOINTS_DIRNAME
from training.config import ConfigError
from training.train_lora import load_lora_config, main

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "lora" / "bold_digits.yaml"
# Base pipelines: tiny random denoisers on 8x8 images, one per architecture and scheduler family.
BASES = {"unet": "ScratchDDIMScheduler", "dit": "ScratchDDPMScheduler", "mmdit": "ScratchFlowMatchEulerScheduler"}
NEXT_ARCHITECTURE = {"unet": "dit", "dit": "mmdit", "mmdit": "unet"}
CLASS_NAMES = {"unet": "ScratchUNetModel", "dit": "ScratchDiTModel", "mmdit": "ScratchMMDiTModel"}
# The shipped recipe, shrunk: 16 MNIST images at 8x8 made bold, batch 4, rank 4 / alpha 8, a large constant lr.
TINY = [
    "--config",
    str(RECIPE),
    "--data.resolution",
    "8",
    "--data.max_train_samples",
    "16",
    "--data.num_validation_samples",
    "4",
    "--train.batch_size",
    "4",
    "--train.report_to",
    "none",
    "--train.log_every_steps",
    "1",
    "--optim.learning_rate",
    "0.01",
    "--optim.lr_scheduler",
    "constant",
    "--optim.lr_warmup_steps",
    "0",
    "--lora.rank",
    "4",
    "--lora.alpha",
    "8",
    "--eval.num_inference_steps",
    "2",
    "--eval.images_per_class",
    "1",
]


def save_base(kind: str, folder: Path) -> Path:
    tiny_pipeline(kind, BASES[kind]).save_pretrained(folder)
    return folder


def load_base(folder: Path):
    """The base pipeline as a user loads it, frozen (torch's RMSNorm picks another kernel when weights need grad)."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.denoiser.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_pipeline(base: Path, checkpoint: Path, adapter: Path):
    """The pipeline exactly as training left it: the base, the adapter's LoraConfig, the checkpoint's weights."""
    pipe = load_base(base)
    with safe_open(str(adapter / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[LORA_ADAPTER_METADATA_KEY])
    prefix = f"{pipe.denoiser_name}."
    pipe.denoiser.add_adapter(LoraConfig(**{k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}))
    pipe.denoiser.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return pipe


@pytest.mark.parametrize("kind", list(BASES))
def test_lora_trains_only_the_adapter_and_reloads_into_the_base(kind, tmp_path, capsys):
    base = save_base(kind, tmp_path / "base")
    output_dir = tmp_path / "run"
    # The UNet run also adapts its convolutions; the transformers have none to add.
    args = [*TINY, "--lora.include_conv", str(kind == "unet").lower(), "--train.max_steps", "3"]
    main([*args, "--base.pretrained_model_name_or_path", str(base), "--output_dir", str(output_dir)])
    adapter, checkpoint = output_dir / "last", output_dir / CHECKPOINTS_DIRNAME / "checkpoint-3"

    # The adapter file: diffusers' format, only LoRA weights, rank 4 / alpha 8 and the denoiser class in the header.
    lora_weights = load_file(adapter / "pytorch_lora_weights.safetensors")
    name = "unet" if kind == "unet" else "transformer"
    assert lora_weights and all(k.startswith(f"{name}.") and ".lora_" in k for k in lora_weights)
    assert any(".conv1.lora_A" in k for k in lora_weights) == (kind == "unet")
    with safe_open(str(adapter / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[LORA_ADAPTER_METADATA_KEY])
    assert (metadata[f"{name}.r"], metadata[f"{name}.lora_alpha"], metadata["denoiser_class"]) == (
        4,
        8,
        CLASS_NAMES[kind],
    )

    # Trainable parameters printed as a count and as a share of the base.
    base_pipe = load_base(base)
    base_count = sum(p.numel() for p in base_pipe.denoiser.parameters())
    trainable = sum(t.numel() for t in lora_weights.values())
    printed = re.search(r"([\d,]+) trainable parameters, ([\d.]+)% of the base's ([\d,]+)", capsys.readouterr().out)
    assert printed and printed.group(1) == f"{trainable:,}" and printed.group(3) == f"{base_count:,}"
    assert printed.group(2) == f"{100 * trainable / base_count:.2f}"

    # The base weights left training bit-identical (peft keeps them as `<layer>.base_layer.<param>`).
    trained_state = load_file(checkpoint / "model.safetensors")
    base_state = base_pipe.denoiser.state_dict()
    frozen = {k.replace(".base_layer.", "."): v for k, v in trained_state.items() if ".lora_" not in k}
    assert frozen.keys() == base_state.keys()
    assert all(torch.equal(frozen[k], base_state[k]) for k in base_state)

    # Loaded by users in one line, the adapter changes the output; disabled, the output is the base's exactly.
    base_images = run(base_pipe)
    base_pipe.load_lora_weights(adapter, adapter_name="bold")
    with_lora = run(base_pipe)
    assert (with_lora - base_images).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, run(trained_pipeline(base, checkpoint, adapter)), rtol=0, atol=1e-6)
    base_pipe.disable_lora()
    assert torch.equal(run(base_pipe), base_images)

    # The adapter card names the base, rank, targets and data; the folder holds nothing of the base.
    card = ModelCard((adapter / "README.md").read_text())
    assert {"lora", kind}.issubset(card.data.tags) and card.data.datasets == ["ylecun/mnist"]
    assert str(base) in card.text and "| Rank / alpha / dropout | 4 / 8 / 0.0 |" in card.text
    assert "`to_q`" in card.text and "3x3 grey-scale dilation" in card.text
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "pytorch_lora_weights.safetensors",
        "samples.png",
        "training_config.yaml",
    ]

    # Into another architecture: a clear error naming both classes, and nothing loaded.
    other = tiny_pipeline(NEXT_ARCHITECTURE[kind], BASES[NEXT_ARCHITECTURE[kind]])
    message = f"trained for {CLASS_NAMES[kind]} and cannot load into {CLASS_NAMES[NEXT_ARCHITECTURE[kind]]}"
    with pytest.raises(ValueError, match=message):
        other.load_lora_weights(adapter)
    assert not getattr(other.denoiser, "peft_config", None)


# A fresh process: only the base folder and the adapter, from its folder and from a (loopback) Hub repo.
RELOAD_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
import pipelines
from training.config import HubConfig
from training.artifacts import push_folder

base, adapter, result, call = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])

def fresh_base():
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.unet.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

def run(pipe):
    return pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images

pipe = fresh_base()
pipe.load_lora_weights(adapter, adapter_name="bold")
images = {"folder": run(pipe)}
pipe.set_adapters("bold", adapter_weights=0.5)
images["half"] = run(pipe)
pipe.set_adapters("bold", adapter_weights=0.0)
images["zero"] = run(pipe)
pipe.set_adapters("bold", adapter_weights=1.0)
pipe.fuse_lora()
images["fused"] = run(pipe)

push_folder(adapter, HubConfig(push_to_hub=True, hub_model_id="user/bold-digits-lora"))
pipe = fresh_base()
pipe.load_lora_weights("user/bold-digits-lora", adapter_name="bold")
images["hub"] = run(pipe)
save_file(images, result)
"""


def test_resumes_exactly_and_reloads_at_full_strength_in_a_fresh_process_and_from_the_hub(tmp_path):
    base = save_base("unet", tmp_path / "base")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [
        *TINY,
        "--lora.include_conv",
        "false",
        "--train.max_steps",
        "4",
        "--checkpoint.every_steps",
        "2",
        "--base.pretrained_model_name_or_path",
        str(base),
    ]
    main([*args, "--output_dir", str(straight)])

    # Resume from step 2 of the same run: the adapter and the full training state come out bit-identical.
    shutil.copytree(straight / CHECKPOINTS_DIRNAME / "checkpoint-2", resumed / CHECKPOINTS_DIRNAME / "checkpoint-2")
    main([*args, "--output_dir", str(resumed), "--checkpoint.resume_from_checkpoint", "latest"])
    for file in (f"{CHECKPOINTS_DIRNAME}/checkpoint-4/model.safetensors", "best/pytorch_lora_weights.safetensors"):
        expected, actual = load_file(straight / file), load_file(resumed / file)
        assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected), file

    adapter = straight / "best"
    trained = run(trained_pipeline(base, straight / CHECKPOINTS_DIRNAME / "checkpoint-4", adapter))
    base_images = run(load_base(base))
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_TOKEN="hf_fakeTokenForLoopbackTestsOnly",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        # The same thread count as this process: CPU kernels may split sums differently with more threads.
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    result = tmp_path / "reloaded.safetensors"
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        subprocess.run(
            [sys.executable, "-c", RELOAD_SCRIPT, str(base), str(adapter), str(result), json.dumps(CALL)],
            check=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
    assert hub.unrouted == [], hub.unrouted
    assert {"pytorch_lora_weights.safetensors", "README.md"} <= set(
        hub.repos["user/bold-digits-lora"].resolve("main")[1]
    )

    images = load_file(result)
    # Rank 4 / alpha 8 comes back at scale 2, not the half strength of alpha = rank.
    for source in ("folder", "hub"):
        torch.testing.assert_close(images[source], trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(images["fused"], trained, rtol=0, atol=1e-4)
    assert torch.equal(images["zero"], base_images)
    assert (images["half"] - trained).abs().max() > 1e-4 and (images["half"] - base_images).abs().max() > 1e-4


def test_bold_digits_are_a_grey_scale_dilation_with_more_ink():
    digits = load_image_dataset(split="test")
    batch = torch.stack([digits[i]["pixel_values"] for i in range(32)])
    bold = dilate_strokes(batch, 1)
    reference = grey_dilation(batch.numpy(), size=(1, 1, 3, 3), mode="constant", cval=-1.0)
    np.testing.assert_array_equal(bold.numpy(), reference)
    assert torch.equal(dilate_strokes(batch[0], 1), bold[0]) and torch.equal(dilate_strokes(batch, 0), batch)
    plain_ink, bold_ink = mean_ink((batch + 1) / 2).mean(), mean_ink((bold + 1) / 2).mean()
    assert bold_ink > 1.5 * plain_ink
    dataset = DilatedStrokes(digits, 1)
    assert dataset.num_classes == 10 and torch.equal(dataset[3]["pixel_values"], bold[3])
    with pytest.raises(ValueError, match="pixels must be an int >= 0, got -1"):
        dilate_strokes(batch, -1)


def test_recipe_loads_and_bad_settings_are_refused_before_training(tmp_path, capsys):
    config = load_lora_config(["--config", str(RECIPE)])
    assert (
        config.output_dir == "outputs/lora_bold_digits"
        and config.data.dilate_strokes == 1
        and config.ema.enabled is False
    )
    assert "--config configs/lora/bold_digits.yaml" in RECIPE.read_text()

    with pytest.raises(SystemExit) as exit_info:
        run_command(
            main,
            [
                "--config",
                str(RECIPE),
                "--base.pretrained_model_name_or_path",
                "null",
                "--output_dir",
                str(tmp_path / "x"),
            ],
        )
    assert exit_info.value.code == 2 and "base.pretrained_model_name_or_path is not set" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['objective.prediction_type'\]"):
        load_lora_config(["--config", str(RECIPE), "--objective.prediction_type", "epsilon"])

    dit = save_base("dit", tmp_path / "dit")
    common = [*TINY, "--base.pretrained_model_name_or_path", str(dit), "--output_dir", str(tmp_path / "run")]
    refusals = [
        (["--lora.include_conv", "true"], "lora.include_conv: ScratchDiTModel has no convolution targets"),
        (
            ["--lora.include_conv", "false", "--lora.target_modules", "[to_q, conv9]"],
            r"\['conv9'\] match no layer of ScratchDiTModel; available: \[.*'to_q'",
        ),
        (
            ["--lora.include_conv", "false", "--data.resolution", "12"],
            "size 12, but the base denoiser takes 1 channel.s. of size 8",
        ),
        (["--lora.include_conv", "false", "--eval.sampler", "flow_match_euler"], "cannot sample a DDPM-family model"),
        (["--eval.fid_n", "1"], r"eval.fid_n must be 0 \(no metrics\) or >= 2"),
        (["--hub.push_to_hub", "true"], "hub.hub_model_id is not set"),
    ]
    for extra, message in refusals:
        with pytest.raises(ConfigError, match=message):
            main([*common, *extra])
    assert not (tmp_path / "run").exists()
