"""Class-conditional and text-to-image diffusion pipelines, registered on `diffusers` when this package is imported.

After `import pipelines`, plain `DiffusionPipeline.from_pretrained(folder_or_repo_id)` returns our pipeline
class with its components: diffusers resolves a saved pipeline's `_class_name` as an attribute of the
`diffusers` module, and a component's recorded module (e.g. `custom_models.unet`) as an attribute of
`diffusers.pipelines` (needed for Hub repo ids) or from `sys.modules`. No `trust_remote_code`, no
`custom_pipeline`. A self-contained folder (`save_pretrained(..., self_contained=True)`, `push_to_hub`) names the
code generated into it; diffusers reads its `model_index.json` as naming the installed classes instead
(`self_contained.use_installed_code`), so it loads the same way and its code never runs here.
"""

import sys
import types

import diffusers
import diffusers.pipelines
from diffusers import DiffusionPipeline

from .class_conditional import (
    ClassConditionalPipeline,
    ClassConditionalPipelineOutput,
    ClassConditionalTransformerPipeline,
    ClassConditionalUNetPipeline,
    DenoisingPipeline,
)
from .lora import TransformerLoraLoaderMixin, UNetLoraLoaderMixin
from .model_card import build_lora_model_card, build_model_card
from .self_contained import component_classes, read_model_index_with_installed_code, write_code_files
from .text_to_image import (
    TextToImagePipeline,
    TextToImagePipelineOutput,
    TextToImageTransformerPipeline,
    TextToImageUNetPipeline,
)

__all__ = [
    "ClassConditionalPipeline",
    "ClassConditionalPipelineOutput",
    "ClassConditionalTransformerPipeline",
    "ClassConditionalUNetPipeline",
    "TextToImagePipeline",
    "TextToImagePipelineOutput",
    "TextToImageTransformerPipeline",
    "TextToImageUNetPipeline",
    "TransformerLoraLoaderMixin",
    "UNetLoraLoaderMixin",
    "build_lora_model_card",
    "build_model_card",
    "register_with_diffusers",
]


def _identity(value) -> str:
    return value.__name__ if isinstance(value, types.ModuleType) else f"{value.__module__}.{value.__qualname__}"


def _register(namespace, name: str, value) -> None:
    """Set `namespace.name = value`, refusing to shadow anything diffusers itself defines under that name."""
    current = getattr(namespace, name, None)
    # The same object, or the same definition re-imported (e.g. `importlib.reload`), is not shadowing.
    if current is not None and _identity(current) != _identity(value):
        raise ImportError(
            f"`{namespace.__name__}.{name}` already exists ({current!r}); refusing to shadow it with {value!r}."
        )
    setattr(namespace, name, value)


def _write_space_files(folder, model_repo_id: str) -> list[str]:
    from demo.space import write_space_files  # imported only when a Space is pushed: pipelines never need the demo

    return write_space_files(folder, model_repo_id)


def register_with_diffusers() -> None:
    """Expose the pipeline classes on `diffusers` and the component modules on `diffusers.pipelines`."""
    pipeline_classes = (
        ClassConditionalUNetPipeline,
        ClassConditionalTransformerPipeline,
        TextToImageUNetPipeline,
        TextToImageTransformerPipeline,
    )
    for pipeline_class in pipeline_classes:
        _register(diffusers, pipeline_class.__name__, pipeline_class)
    for value in component_classes():
        _register(diffusers.pipelines, value.__module__, sys.modules[value.__module__])
    DenoisingPipeline.code_writer = write_code_files
    DenoisingPipeline.space_writer = staticmethod(_write_space_files)
    # `DiffusionPipeline.from_pretrained` and `.download` read model_index.json through this classmethod; only entries
    # naming our generated modules change (see `self_contained.use_installed_code`).
    read = DiffusionPipeline._dict_from_json_file.__func__
    if not getattr(read, "reads_installed_code", False):
        DiffusionPipeline._dict_from_json_file = classmethod(read_model_index_with_installed_code(read))


register_with_diffusers()
