"""`from_pretrained` for our denoisers that refuses what diffusers lets through: pickled weights, missing or extra
tensors and non-finite values.

diffusers leaves a tensor missing from the file on `meta` with only a log line (forward then fails with "Tensor on
device meta"), ignores extra tensors with a warning, loads NaN/inf weights as they are, and falls back to a pickled
`.bin` when the safetensors file is absent. Extra tensors are an error too: our files are written by
`save_pretrained` of the same class, so a tensor the model has no place for means the file belongs to another
configuration (e.g. a `config.json` edited to fewer blocks), and the model would be a silently truncated one.
"""

import json
import os

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME


def _add_variant(name: str, variant: str | None) -> str:
    return name if variant is None else name.replace(".safetensors", f".{variant}.safetensors")


def _weights_files(path, subfolder: str | None, variant: str | None) -> tuple[str, dict[str, str]]:
    """A description of the weights file(s) and, for a sharded local checkpoint, the shard of every tensor."""
    weights_name = _add_variant(SAFETENSORS_WEIGHTS_NAME, variant)
    folder = os.path.join(str(path), subfolder or "")
    if not os.path.isdir(folder):
        return f"{weights_name} of {os.path.join(str(path), subfolder or '')!r} (Hub)", {}
    index = os.path.join(folder, weights_name + ".index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            weight_map = json.load(handle).get("weight_map", {})
        return index, {key: os.path.join(folder, shard) for key, shard in weight_map.items()}
    return os.path.join(folder, weights_name), {}


class CheckedLoadingMixin:
    """`from_pretrained` that loads safetensors only and refuses missing, extra or non-finite tensors."""

    @classmethod
    def _dict_from_json_file(cls, json_file):
        config = super()._dict_from_json_file(json_file)
        # A self-contained folder's `auto_map` is read by `diffusers.AutoModel`; it is not a setting of the model.
        config.pop("auto_map", None)
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                f"{cls.__name__} loads only safetensors weights (a pickled .bin file can run code); "
                "drop `use_safetensors=False`."
            )
        kwargs["use_safetensors"] = True
        output_loading_info = kwargs.pop("output_loading_info", False)
        subfolder, variant = kwargs.get("subfolder"), kwargs.get("variant")
        config_file = os.path.join(str(pretrained_model_name_or_path), subfolder or "", cls.config_name)
        if os.path.isfile(config_file):
            try:
                with open(config_file) as handle:
                    config = json.load(handle)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise OSError(f"{config_file} is not a valid JSON file ({error}).") from error
            if not isinstance(config, dict):
                raise ValueError(
                    f"{config_file} must hold a JSON object of {cls.__name__}'s settings, got {type(config).__name__}."
                )
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        where, shards = _weights_files(pretrained_model_name_or_path, subfolder, variant)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"{len(missing)} tensor(s) of {cls.__name__} are missing: {missing[:10]}")
            if unexpected:
                problems.append(f"{len(unexpected)} tensor(s) have no place in {cls.__name__}: {unexpected[:10]}")
            raise ValueError(
                f"The weights file {where} does not match its config: {'; '.join(problems)}. The file and its "
                f"{cls.config_name} must come from the same `save_pretrained`."
            )
        non_finite = [
            name
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]
        if non_finite:
            name = non_finite[0]
            tensor = model.state_dict()[name]
            count = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{len(non_finite)} tensor(s) of {cls.__name__} hold NaN or inf values, first {name!r} in "
                f"{shards.get(name, where)} ({count} of {tensor.numel()} values, as loaded in {tensor.dtype}); "
                f"all of them: {non_finite[:10]}. The checkpoint is diverged or corrupt"
                + ("" if tensor.dtype == torch.float32 else f", or its values overflow {tensor.dtype}")
                + "."
            )
        return (model, info) if output_loading_info else model
