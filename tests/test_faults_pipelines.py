"""Faulty pipeline folders and weights files (issue 13): each is refused with one clear error naming the file."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline
from pipeline_helpers import MODELS, run, tiny_pipeline
from safetensors.torch import load_file, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    """A saved tiny pipeline of each model kind, with its denoiser folder name."""
    pipe = tiny_pipeline(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    pipe.save_pretrained(folder)
    return folder, pipe.denoiser_name, run(pipe)


def copy_of(saved, tmp_path):
    folder, name, _ = saved
    shutil.copytree(folder, tmp_path / "pipe")
    return tmp_path / "pipe", tmp_path / "pipe" / name / WEIGHTS


def rewrite(file, edit):
    state_dict = load_file(file)
    edit(state_dict)
    save_file(state_dict, file, metadata={"format": "pt"})


def test_round_trip_still_bit_identical(saved):
    folder, _, images = saved
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(run(pipe), images)


def test_fp16_and_bf16_loading_still_work(saved):
    folder, name, _ = saved
    for dtype in (torch.float16, torch.bfloat16):
        model = model_class(folder, name).from_pretrained(folder, subfolder=name, torch_dtype=dtype)
        assert model.dtype == dtype


def model_class(folder, name):
    class_name = json.loads((folder / name / "config.json").read_text())["_class_name"]
    return next(cls for cls in MODELS.values() if cls.__name__ == class_name)


def test_missing_tensor_is_named_with_the_file(saved, tmp_path):
    folder, file = copy_of(saved, tmp_path)
    dropped = sorted(load_file(file))[0]
    rewrite(file, lambda sd: sd.pop(dropped))
    with pytest.raises(ValueError, match=rf"{WEIGHTS}.*missing: \['{dropped}'\]"):
        DiffusionPipeline.from_pretrained(folder)


def test_extra_tensor_is_refused(saved, tmp_path):
    folder, file = copy_of(saved, tmp_path)
    rewrite(file, lambda sd: sd.update({"bogus.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=rf"{WEIGHTS}.*no place in .*'bogus.weight'"):
        DiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_named_with_the_file(saved, tmp_path, value):
    folder, file = copy_of(saved, tmp_path)
    poisoned = sorted(load_file(file))[-1]

    def poison(state_dict):
        state_dict[poisoned].view(-1)[0] = value

    rewrite(file, poison)
    with pytest.raises(ValueError, match=rf"NaN or inf.*'{poisoned}' in .*{WEIGHTS}"):
        DiffusionPipeline.from_pretrained(folder)
    _, name, _ = saved
    with pytest.raises(ValueError, match=rf"'{poisoned}'"):
        model_class(folder, name).from_pretrained(folder, subfolder=name)


def test_pickled_bin_fallback_is_refused(saved, tmp_path):
    folder, file = copy_of(saved, tmp_path)
    torch.save(load_file(file), file.with_name("diffusion_pytorch_model.bin"))
    file.unlink()
    with pytest.raises(OSError, match=WEIGHTS):
        DiffusionPipeline.from_pretrained(folder)
    _, name, _ = saved
    with pytest.raises(ValueError, match="only safetensors"):
        model_class(folder, name).from_pretrained(folder, subfolder=name, use_safetensors=False)


@pytest.mark.parametrize(
    "target, content, error, message",
    [
        ("model_index.json", "{not json", OSError, "model_index.json"),
        ("{name}/config.json", "garbage{", OSError, "config.json is not a valid JSON"),
        ("{name}/config.json", "[1, 2]", ValueError, "config.json must hold a JSON object"),
        ("scheduler/scheduler_config.json", "garbage{", OSError, "scheduler_config.json"),
    ],
)
def test_corrupt_json_is_named(saved, tmp_path, target, content, error, message):
    folder, _ = copy_of(saved, tmp_path)
    (folder / target.format(name=saved[1])).write_text(content)
    with pytest.raises(error, match=message):
        DiffusionPipeline.from_pretrained(folder)


def test_truncated_weights_file_is_named(saved, tmp_path):
    folder, file = copy_of(saved, tmp_path)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(OSError, match=WEIGHTS):
        DiffusionPipeline.from_pretrained(folder)


def test_missing_component_folder_is_an_oserror(saved, tmp_path):
    folder, _ = copy_of(saved, tmp_path)
    shutil.rmtree(folder / saved[1])
    with pytest.raises(OSError, match="config.json"):
        DiffusionPipeline.from_pretrained(folder)
