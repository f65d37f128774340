"""Pipeline-level LoRA for the class-conditional and text-to-image pipelines, in diffusers' file format.

Files are `pytorch_lora_weights.safetensors` with keys prefixed by the component name (`unet.` or
`transformer.`) and the peft `LoraConfig` in the safetensors header, so `lora_alpha` survives a round trip
(without it, diffusers rebuilds `lora_alpha = r`), together with the class of the denoiser the adapter was
trained for, so that loading it into another architecture fails with a clear error. `set_adapters`,
`disable_lora`, `enable_lora`, `unload_lora_weights`, `delete_adapters` and `get_list_adapters` come from
`LoraBaseMixin`.
"""

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE, LoraBaseMixin
from diffusers.utils import logging
from huggingface_hub import hf_hub_download
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

logger = logging.get_logger(__name__)

LoraSource = str | os.PathLike | dict[str, torch.Tensor]
# Unprefixed key of the adapter metadata: diffusers' loaders pass on only the keys prefixed by the component name.
DENOISER_CLASS_KEY = "denoiser_class"
# Layers peft's LoRA can wrap: the candidates a `target_modules` list selects.
LORA_WRAPPABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def read_lora_file(source: LoraSource, weight_name: str | None = None, **hub_kwargs) -> tuple[dict, dict | None]:
    """Read a LoRA state dict and its adapter metadata from a file, a folder, a Hub repo id or a dict."""
    if isinstance(source, dict):
        return dict(source), None
    path = Path(source)
    if path.is_file():
        file = path
    elif path.is_dir():
        file = path / (weight_name or LORA_WEIGHT_NAME_SAFE)
        if not file.is_file():
            raise ValueError(f"No LoRA file {file.name!r} in {str(path)!r}; pass `weight_name` to pick another file.")
    else:
        file = hf_hub_download(str(source), weight_name or LORA_WEIGHT_NAME_SAFE, **hub_kwargs)
    with safe_open(str(file), framework="pt") as handle:
        header = handle.metadata() or {}
    metadata = json.loads(header[LORA_ADAPTER_METADATA_KEY]) if LORA_ADAPTER_METADATA_KEY in header else None
    return load_file(str(file)), metadata


class DenoiserLoraLoaderMixin(LoraBaseMixin):
    """LoRA loading, saving and fusing for a pipeline whose only LoRA-loadable component is its denoiser."""

    _lora_loadable_modules: list[str]

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: LoraSource, return_lora_metadata: bool = False, **kwargs
    ):
        """The LoRA state dict (and, with `return_lora_metadata`, its adapter metadata) of a file, folder or repo."""
        hub_kwargs = {
            k: kwargs.pop(k)
            for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            if k in kwargs
        }
        state_dict, metadata = read_lora_file(
            pretrained_model_name_or_path_or_dict, kwargs.pop("weight_name", None), **hub_kwargs
        )
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)} for `lora_state_dict`.")
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def _check_lora_keys(self, state_dict: dict) -> None:
        """Refuse a file unless every key is a LoRA weight of an existing module of this pipeline's denoiser."""
        name = self._lora_loadable_modules[0]
        keys = sorted(state_dict)
        sample = keys[:5]
        if not keys:
            raise ValueError("The LoRA state dict is empty.")
        foreign = [k for k in keys if not k.startswith(f"{name}.")]
        if foreign:
            raise ValueError(
                f"This pipeline can load LoRA weights only into `{name}` (keys prefixed '{name}.'), but "
                f"{len(foreign)} of {len(keys)} keys are not, e.g. {foreign[:5]}."
            )
        non_lora = [k for k in keys if ".lora_" not in k]
        if non_lora:
            raise ValueError(
                f"Not a LoRA file: keys without a LoRA part ('.lora_A', '.lora_B', ...), e.g. {non_lora[:5]}."
            )
        module_names = {name for name, _ in getattr(self, name).named_modules()}
        missing = sorted({k[len(name) + 1 :].split(".lora_")[0] for k in keys} - module_names)
        if missing:
            raise ValueError(
                f"LoRA keys match no module of `{name}` ({getattr(self, name).__class__.__name__}): "
                f"modules {missing[:5]} do not exist; first keys of the file: {sample}."
            )
        non_finite = [k for k in keys if state_dict[k].is_floating_point() and not torch.isfinite(state_dict[k]).all()]
        if non_finite:
            raise ValueError(
                f"{len(non_finite)} LoRA tensor(s) hold NaN or inf values (a diverged or corrupt adapter): "
                f"{non_finite[:10]}."
            )

    def _check_lora_pairs(self, state_dict: dict, metadata: dict | None) -> None:
        """Refuse an adapter unless every module its LoraConfig targets gets both `lora_A` and `lora_B` of the
        configured rank: peft would load a file lacking them with a warning and change the images."""
        name = self._lora_loadable_modules[0]
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            module, part = key[len(name) + 1 :].split(".lora_", 1)
            found.setdefault(module, {})[part.split(".")[0]] = tensor
        config = {k[len(name) + 1 :]: v for k, v in (metadata or {}).items() if k.startswith(f"{name}.")}
        expected = self._targeted_modules(config) if config else set()
        missing = []
        for module in sorted(expected | set(found)):
            parts = found.get(module, {})
            pairs = [("embedding_A", "embedding_B")] if any(p.startswith("embedding") for p in parts) else [("A", "B")]
            missing += [f"{name}.{module}.lora_{part}.weight" for pair in pairs for part in pair if part not in parts]
        if missing:
            raise ValueError(
                f"The LoRA file lacks {len(missing)} tensor(s) of the modules it adapts (every targeted module needs "
                f"both lora_A and lora_B): {missing[:10]}{' ...' if len(missing) > 10 else ''}. The file is "
                "incomplete; save it again with `save_denoiser_lora`."
            )
        if not config:
            return
        wrong = []
        for module, parts in sorted(found.items()):
            rank = self._configured_rank(module, config)
            down, up = (parts["A"], parts["B"]) if "A" in parts else (parts["embedding_A"], parts["embedding_B"])
            if down.shape[0] != rank or up.shape[1] != rank:
                wrong.append(f"{module}: lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)}, configured r={rank}")
        if wrong:
            raise ValueError(
                f"LoRA tensors do not have the rank their LoraConfig metadata gives, in {len(wrong)} module(s): "
                f"{wrong[:5]}."
            )

    @staticmethod
    def _configured_rank(module: str, config: dict) -> int:
        # peft's rule: a `rank_pattern` key matches a module name ending in it (as a regular expression).
        for pattern, rank in (config.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?(?:{pattern})$", module):
                return int(rank)
        return int(config["r"])

    def _targeted_modules(self, config: dict) -> set[str]:
        """Names of the denoiser's modules that the LoraConfig's `target_modules` selects (peft's matching rule)."""
        targets = config.get("target_modules")
        if not targets or config.get("exclude_modules") or config.get("layers_to_transform") is not None:
            return set()  # selections beyond a plain target list: the file's own keys are the reference
        denoiser = getattr(self, self._lora_loadable_modules[0])
        selected = set()
        for module_name, module in denoiser.named_modules():
            if isinstance(module, BaseTunerLayer) or isinstance(module, LORA_WRAPPABLE):
                if isinstance(targets, str):
                    match = re.fullmatch(targets, module_name) is not None
                else:
                    match = any(module_name == t or module_name.endswith(f".{t}") for t in targets)
                if match:
                    selected.add(module_name)
        return selected

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: LoraSource,
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """Load a LoRA file (diffusers format) into the denoiser as adapter `adapter_name`."""
        name = self._lora_loadable_modules[0]
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        trained_for, denoiser_class = (metadata or {}).get(DENOISER_CLASS_KEY), getattr(self, name).__class__.__name__
        if trained_for is not None and trained_for != denoiser_class:
            raise ValueError(
                f"This LoRA adapter was trained for {trained_for} and cannot load into {denoiser_class} (the `{name}` "
                f"of this {self.__class__.__name__}); load it into a pipeline whose `{name}` is a {trained_for}."
            )
        self._check_lora_keys(state_dict)
        self._check_lora_pairs(state_dict, metadata)
        if metadata is None:
            logger.warning(
                f"The LoRA file carries no LoraConfig metadata: `lora_alpha` of `{name}` is taken equal to the rank."
            )
        getattr(self, name).load_lora_adapter(
            state_dict,
            prefix=name,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def _save_denoiser_lora(
        cls,
        save_directory,
        layers,
        metadata,
        is_main_process,
        weight_name,
        save_function,
        safe_serialization,
        denoiser_class=None,
    ):
        name = cls._lora_loadable_modules[0]
        if not layers:
            raise ValueError(f"Pass `{name}_lora_layers` (the LoRA state dict of `{name}`).")
        if metadata is None:
            raise ValueError(
                f"Pass `{name}_lora_adapter_metadata` (e.g. `pipe.{name}.peft_config['default'].to_dict()`): without "
                "it a reload takes lora_alpha = r and the adapter comes back at the wrong strength."
            )
        metadata = {f"{name}.{key}": value for key, value in metadata.items()}
        if denoiser_class is not None:
            metadata[DENOISER_CLASS_KEY] = denoiser_class
        cls.write_lora_layers(
            state_dict=cls.pack_weights(layers, name),
            save_directory=save_directory,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
            lora_adapter_metadata=metadata,
        )

    def save_denoiser_lora(
        self, save_directory: str | os.PathLike, adapter_name: str = "default", weight_name: str | None = None
    ):
        """Save one adapter of the denoiser, with its LoraConfig and the denoiser's class, in the pipeline LoRA format."""
        from peft.utils import get_peft_model_state_dict

        name = self._lora_loadable_modules[0]
        denoiser = getattr(self, name)
        adapters = list(getattr(denoiser, "peft_config", {}))
        if adapter_name not in adapters:
            raise ValueError(f"`{name}` has no adapter {adapter_name!r}; it has {adapters}.")
        self._save_denoiser_lora(
            save_directory,
            get_peft_model_state_dict(denoiser, adapter_name=adapter_name),
            denoiser.peft_config[adapter_name].to_dict(),
            is_main_process=True,
            weight_name=weight_name,
            save_function=None,
            safe_serialization=True,
            denoiser_class=denoiser.__class__.__name__,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Merge the active (or named) adapters into the denoiser's weights."""
        super().fuse_lora(
            components=components or self._lora_loadable_modules,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Undo `fuse_lora`."""
        super().unfuse_lora(components=components or self._lora_loadable_modules, **kwargs)


class UNetLoraLoaderMixin(DenoiserLoraLoaderMixin):
    """LoRA for `ClassConditionalUNetPipeline` (keys prefixed `unet.`)."""

    _lora_loadable_modules = ["unet"]

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        unet_lora_layers: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        unet_lora_adapter_metadata: dict | None = None,
    ):
        """Write `unet_lora_layers` and their LoraConfig as `pytorch_lora_weights.safetensors`."""
        cls._save_denoiser_lora(
            save_directory,
            unet_lora_layers,
            unet_lora_adapter_metadata,
            is_main_process,
            weight_name,
            save_function,
            safe_serialization,
        )


class TransformerLoraLoaderMixin(DenoiserLoraLoaderMixin):
    """LoRA for `ClassConditionalTransformerPipeline` (keys prefixed `transformer.`)."""

    _lora_loadable_modules = ["transformer"]

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ):
        """Write `transformer_lora_layers` and their LoraConfig as `pytorch_lora_weights.safetensors`."""
        cls._save_denoiser_lora(
            save_directory,
            transformer_lora_layers,
            transformer_lora_adapter_metadata,
            is_main_process,
            weight_name,
            save_function,
            safe_serialization,
        )
