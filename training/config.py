"""Typed training configuration: YAML recipes plus dotted command-line overrides, checked before training.

A recipe is a YAML file whose sections mirror the dataclasses of `training/config_schema.py`. Any key can be
overridden on the command line as `--section.key value` (or `--section.key=value`); values are parsed as YAML, so
`64`, `1e-3`, `true` and `null` mean what they look like (booleans are only `true` / `false`, as in YAML 1.2: `no`,
`off` and `yes` stay words, so `--train.mixed_precision no` means accelerate's "no"). Duplicate keys, unknown keys,
wrong types and values outside their allowed set stop the run with a `ConfigError` that names the key and lists
what is allowed.
"""

import dataclasses
import inspect
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from atomic_files import write_text_atomically

from .config_checks import (
    DATA_DERIVED_MODEL_KEYS,
    MNIST_DATASETS,
    MODEL_CLASSES,
    check_config,
    check_loop_settings,
    check_sampler_fits,
    check_text_settings,
    check_tracker,
    model_class,
)
from .config_schema import (
    ARCHITECTURES,
    LOSSES,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    OBJECTIVES,
    RECIPES_DIR,
    RENAMED_OBJECTIVES,
    SAMPLERS,
    TIMESTEP_SAMPLINGS,
    TRACKERS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EMAConfig,
    EvalConfig,
    HubConfig,
    ModelConfig,
    ObjectiveConfig,
    ObjectiveOptions,
    OptimConfig,
    RunConfig,
    TrainConfig,
    bounded,
    choice,
    described,
)

# The schema's names are part of this module's interface: `from training.config import Config` and friends.
__all__ = [
    "MNIST_DATASETS",
    "check_text_settings",
    "ARCHITECTURES",
    "BARE_FLAGS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "ConfigLoader",
    "DATA_DERIVED_MODEL_KEYS",
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "HubConfig",
    "LOSSES",
    "LR_SCHEDULERS",
    "MIXED_PRECISIONS",
    "MODEL_CLASSES",
    "ModelConfig",
    "OBJECTIVES",
    "ObjectiveConfig",
    "ObjectiveOptions",
    "OptimConfig",
    "RECIPES_DIR",
    "RENAMED_OBJECTIVES",
    "RunConfig",
    "SAMPLERS",
    "TIMESTEP_SAMPLINGS",
    "TRACKERS",
    "TrainConfig",
    "bounded",
    "check_config",
    "check_loop_settings",
    "check_sampler_fits",
    "check_tracker",
    "choice",
    "describe_keys",
    "described",
    "from_dict",
    "load_config",
    "load_recipe",
    "model_class",
    "parse_overrides",
    "parse_yaml",
    "save_config",
    "to_dict",
    "upgrade_saved_config",
]


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: PyYAML follows YAML 1.1, where `no` / `off` / `yes` / `on` are
    booleans, which would turn accelerate's `mixed_precision: no` into `False`."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping_without_duplicates(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys without a word: a recipe would train with one of two values.
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"Duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line {seen[key]}); "
                "give each key once."
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text, source: str = "the YAML text") -> Any:
    """A YAML document (string or file) as Python values, with YAML 1.2 booleans; duplicate keys are refused."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{source} is not valid YAML{line}: {problem}.") from None


def upgrade_saved_config(data: dict) -> dict:
    """A config saved by an earlier version (a run's `config.yaml`), in today's names, for comparing and showing.

    Recipes and overrides with an old name are refused instead (`_coerce`), so that they are rewritten once.
    """
    objective = data.get("objective")
    if isinstance(objective, dict) and objective.get("name") in RENAMED_OBJECTIVES:
        data = {**data, "objective": {**objective, "name": RENAMED_OBJECTIVES[objective["name"]]}}
    return data


# --------------------------------------------------------------------------------------------------
# Building a config from nested dicts, with checks
# --------------------------------------------------------------------------------------------------
def _is_union(annotation) -> bool:
    """`X | None` (types.UnionType) and `Optional[X]` (typing.Union) alike."""
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _type_name(annotation) -> str:
    if _is_union(annotation):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    return "null" if annotation is type(None) else annotation.__name__


def _coerce(key: str, value: Any, annotation, metadata) -> Any:
    """Check `value` against the field's type and limits; return it (ints accepted where floats are)."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} expects type {_type_name(annotation)}, got null.")
    base = next(option for option in options if option is not type(None))
    if base is float and isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string; a float field accepts any number spelled as text.
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }[base]
    if not ok:
        hint = " (booleans are spelled true / false)" if base is bool and isinstance(value, str) else ""
        raise ConfigError(f"{key} expects type {_type_name(annotation)}, got {value!r} ({type(value).__name__}){hint}.")
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}.")
    if key.endswith("objective.name") and value in RENAMED_OBJECTIVES:
        raise ConfigError(
            f"{key} {value!r} is now called {RENAMED_OBJECTIVES[value]!r} (the DDPM family of objectives; 'ddpm' "
            f"names a sampler); write `name: {RENAMED_OBJECTIVES[value]}`."
        )
    if "choices" in metadata and value not in metadata["choices"]:
        raise ConfigError(f"{key} must be one of {list(metadata['choices'])}, got {value!r}.")
    if metadata.get("min") is not None and value < metadata["min"]:
        raise ConfigError(f"{key} must be >= {metadata['min']}, got {value!r}.")
    if metadata.get("max") is not None and value > metadata["max"]:
        raise ConfigError(f"{key} must be <= {metadata['max']}, got {value!r}.")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, refusing unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the config"
        raise ConfigError(f"Unknown key(s) {[prefix + k for k in unknown]} in {where}; allowed keys: {sorted(fields)}.")
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = from_dict(annotation, value if value is not None else {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(prefix + name, value, annotation, fields[name].metadata)
    return cls(**values)


def to_dict(config) -> dict:
    """Plain nested dict of a config (the form saved beside the outputs)."""
    return dataclasses.asdict(config)


def _set_dotted(data: dict, dotted_key: str, value) -> None:
    *sections, last = dotted_key.split(".")
    node = data
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted_key}: '{section}' is a value, not a section.")
        node = child
    node[last] = value


# Boolean keys that may be given without a value (`--overwrite` means `--overwrite true`).
BARE_FLAGS = ("overwrite",)


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """Split `--config path` from `--section.key value` pairs; values are parsed as YAML."""
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        argument = argv[i]
        if not argument.startswith("--") or len(argument) == 2:
            raise ConfigError(f"Expected '--key value' arguments, got {argument!r}.")
        if "=" in argument:
            key, raw = argument[2:].split("=", 1)
            i += 1
        elif argument[2:] in BARE_FLAGS and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            key, raw = argument[2:], "true"
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"Missing value after {argument!r}.")
            key, raw = argument[2:], argv[i + 1]
            i += 2
        if key == "config":
            config_path = raw
        else:
            _set_dotted(overrides, key, parse_yaml(raw, f"The value {raw!r} of --{key}"))
    return config_path, overrides


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | os.PathLike) -> dict:
    """The nested dict of a YAML recipe; a missing file names the recipes that exist."""
    path = Path(path)
    if not path.is_file():
        available = sorted(str(p.relative_to(RECIPES_DIR.parent)) for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"Recipe file '{path}' not found; available recipes: {available}.")
    with open(path) as file:
        data = parse_yaml(file, f"Recipe '{path}'") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe '{path}' must hold a mapping of sections, got {type(data).__name__}.")
    return data


def describe_keys(cls, prefix: str = "") -> list[str]:
    """Two lines per configurable key of dataclass `cls`: dotted name, type, default and allowed values; its doc.

    Each section starts with a heading line: its name and the first line of its class docstring."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            lines += ["", f"{prefix}{f.name}: {inspect.getdoc(annotation).splitlines()[0]}"]
            lines += describe_keys(annotation, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
        line = f"  --{prefix}{f.name} ({type_name}, default {default!r})"
        if "choices" in f.metadata:
            line += f" one of {list(f.metadata['choices'])}"
        lines += [line, f"      {f.metadata.get('doc', '')}"]
    return lines


def load_config(argv: list[str], cls=Config):
    """`[--config recipe.yaml] [--section.key value ...]` -> a checked config of dataclass `cls`."""
    if "-h" in argv or "--help" in argv:
        print("usage: [--config recipe.yaml] [--section.key value ...]  (values are YAML; recipes in configs/)\n")
        print("\n".join(describe_keys(cls)))
        raise SystemExit(0)
    config_path, overrides = parse_overrides(list(argv))
    data = load_recipe(config_path) if config_path is not None else {}
    config = from_dict(cls, _merge(data, overrides))
    if cls is Config:
        check_config(config)
    return config


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def save_config(config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    write_text_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False))
