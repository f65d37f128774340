"""Pipeline folders and Hub repos that load where only diffusers is installed (`trust_remote_code=True`).

diffusers' custom-components route: the pipeline module sits at the folder's root, each custom component's module
in the component's subfolder, `model_index.json` names them as `[module_file, ClassName]`, and the denoiser's
`config.json` (and `model_index.json`) carry an `auto_map` for `diffusers.AutoModel`. Then

    DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
    AutoModel.from_pretrained(repo_id, subfolder="unet", trust_remote_code=True)

work with only torch, diffusers, transformers, peft, safetensors and huggingface_hub installed.

The modules are generated from this project's source at save time (`bundle`), never kept as a second copy: starting
from the component's class, every top-level definition it needs is collected across the project's modules (following
`from .x import y` and `from custom_models.x import y`), and written in dependency order, with the original comments,
under the external imports they use. A component class referenced by the pipeline (its `__init__` annotations) is not
inlined into the pipeline module: diffusers loads the component from its own folder's module.

Where the project is installed, `import pipelines` makes diffusers read such a folder's `model_index.json` as if it
named the installed classes (`use_installed_code`), so that `DiffusionPipeline.from_pretrained(repo_id)` loads it with
the project's own code, without `trust_remote_code`, and nothing in the folder runs.
"""

import ast
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

# This project's top-level packages (setup.cfg's `packages.find` list; a test keeps the two equal): their code is
# inlined into generated modules, every other import stays an import.
PROJECT_PACKAGES = (
    "atomic_files",
    "commands",
    "custom_models",
    "custom_schedulers",
    "demo",
    "evaluation",
    "image_data",
    "pipelines",
    "training",
)
# What generated code may import besides the standard library: diffusers and what diffusers-based code needs.
ALLOWED_LIBRARIES = ("torch", "numpy", "PIL", "diffusers", "transformers", "peft", "safetensors", "huggingface_hub")
COMPONENT_MODULE_PREFIX = "scratch_"
PIPELINE_MODULE_PREFIX = "pipeline_"


class BundleError(ValueError):
    """Project code that cannot be turned into a self-contained module (says which file and line)."""


def _is_project_module(name: str, project_packages: tuple[str, ...] = PROJECT_PACKAGES) -> bool:
    return name.split(".")[0] in project_packages


def _statement_names(node: ast.stmt, where: str) -> list[str]:
    """The names a top-level statement binds (imports are handled by the caller)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = (
        node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else None
    )
    if targets is None:
        raise BundleError(
            f"{where}: a top-level {type(node).__name__} statement cannot be bundled (it would run or be dropped "
            "silently); only imports, definitions and assignments to names can."
        )
    names = []
    for target in targets:
        for element in target.elts if isinstance(target, ast.Tuple) else [target]:
            if not isinstance(element, ast.Name):
                raise BundleError(f"{where}: only assignments to plain names can be bundled.")
            names.append(element.id)
    return names


def _used_names(node: ast.stmt) -> set[str]:
    """Every name the statement mentions, including string forward references such as `-> "PromptEncoding"`."""
    used = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            used.add(child.id)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str) and child.value.isidentifier():
            used.add(child.value)
    return used


class _ParsedModule:
    """One project module: its statements, what each binds and uses, and where its imports come from."""

    def __init__(self, name: str, project_packages: tuple[str, ...]):
        module = importlib.import_module(name)
        self.name = name
        self.package = module.__package__
        self.project_packages = project_packages
        self.path = Path(module.__file__)
        self.relative_path = name.replace(".", "/") + ("/__init__.py" if self.path.name == "__init__.py" else ".py")
        self.lines = self.path.read_text().splitlines()
        tree = ast.parse("\n".join(self.lines), filename=str(self.path))
        self.docstring = ast.get_docstring(tree)
        body = tree.body[1:] if self.docstring is not None else tree.body
        self.statements: list[ast.stmt] = []
        self.defined: dict[str, int] = {}  # name -> index of the statement that binds it
        self.imported: dict[
            str, tuple
        ] = {}  # name -> ("project", module, name) | ("import", module, asname) | ("from", module, name, asname)
        for node in body:
            where = f"{self.relative_path}:{node.lineno}"
            if isinstance(node, ast.ImportFrom):
                source = importlib.util.resolve_name("." * node.level + (node.module or ""), self.package)
                if source == "__future__":
                    raise BundleError(f"{where}: `from __future__` imports change every bundled module; not supported.")
                for alias in node.names:
                    bound = alias.asname or alias.name
                    if _is_project_module(source, project_packages):
                        if alias.asname not in (None, alias.name):
                            raise BundleError(f"{where}: `import ... as` of project names cannot be bundled.")
                        self.imported[bound] = ("project", source, alias.name)
                    else:
                        self.imported[bound] = ("from", source, alias.name, alias.asname)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_project_module(alias.name, project_packages):
                        raise BundleError(f"{where}: `import {alias.name}` of a project module cannot be bundled.")
                    bound = alias.asname or alias.name.split(".")[0]
                    self.imported[bound] = ("import", alias.name, alias.asname)
            else:
                for bound in _statement_names(node, where):
                    self.defined[bound] = len(self.statements)
                self.statements.append(node)
        self.uses = [_used_names(node) for node in self.statements]

    def source_of(self, index: int) -> str:
        """The statement's lines with its decorators and the comment lines right above it."""
        node = self.statements[index]
        start = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        while start > 1 and self.lines[start - 2].lstrip().startswith("#"):
            start -= 1
        return "\n".join(self.lines[start - 1 : node.end_lineno])


def _check_external(module: str, where: str) -> None:
    top = module.split(".")[0]
    if top not in sys.stdlib_module_names and top not in ALLOWED_LIBRARIES:
        raise BundleError(
            f"{where} imports {module!r}: generated code may import only the standard library and "
            f"{', '.join(ALLOWED_LIBRARIES)}."
        )


def bundle(root: type, stand_ins: tuple[type, ...] = (), project_packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """The source of one module that defines `root` and everything it needs from this project.

    `stand_ins`: project classes that are not inlined but bound to their diffusers base class (`ModelMixin` or
    `SchedulerMixin`); used for the component classes a pipeline names in its annotations. `project_packages`: the
    top-level packages that count as the project (inlined) rather than as libraries (imported).
    """
    parsed: dict[str, _ParsedModule] = {}
    included: dict[str, set[int]] = {}
    depends_on: dict[str, set[str]] = {}
    origin: dict[str, tuple] = {}  # bound name in the generated module -> where it comes from
    stand_in_names = {(cls.__module__, cls.__qualname__): cls for cls in stand_ins}

    def parse(name: str) -> _ParsedModule:
        if name not in parsed:
            parsed[name] = _ParsedModule(name, project_packages)
            included[name] = set()
            depends_on[name] = set()
        return parsed[name]

    def bind(name: str, source: tuple, where: str) -> None:
        if origin.setdefault(name, source) != source:
            raise BundleError(
                f"{where}: the name {name!r} means two different things in the bundled modules "
                f"({origin[name]} and {source}); rename one of them."
            )

    def need(module_name: str, name: str) -> str:
        """Include the definition of `name` as seen from `module_name`; returns the module that defines it."""
        module = parse(module_name)
        if name in module.imported:
            kind, source, *rest = module.imported[name]
            where = f"{module.relative_path} (import of {name})"
            if kind == "project":
                defining = need(source, rest[0])
                depends_on[module_name].add(defining)
                return defining
            _check_external(source, where)
            bind(name, module.imported[name], where)
            return module_name
        if name not in module.defined:
            raise BundleError(f"{module.relative_path} has no top-level name {name!r} to bundle.")
        if (module_name, name) in stand_in_names:
            base = ModelMixin if issubclass(stand_in_names[module_name, name], ModelMixin) else SchedulerMixin
            bind(name, ("stand-in", base.__name__), module.relative_path)
            bind(base.__name__, ("from", "diffusers", base.__name__, None), module.relative_path)
            return module_name
        index = module.defined[name]
        bind(name, ("definition", module_name, index), f"{module.relative_path}:{module.statements[index].lineno}")
        if index not in included[module_name]:
            included[module_name].add(index)
            for used in sorted(module.uses[index]):
                if used in module.defined or used in module.imported:
                    need(module_name, used)
        return module_name

    root_module = need(root.__module__, root.__qualname__)
    for module_name in parsed:
        for index in included[module_name]:
            node = parsed[module_name].statements[index]
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)) and child is not node:
                    _check_nested_import(parsed[module_name], child)

    order: list[str] = []  # dependencies before the modules that use them
    visiting: set[str] = set()

    def visit(module_name: str) -> None:
        visiting.add(module_name)
        for dependency in sorted(depends_on[module_name]):
            if dependency not in order and dependency not in visiting:
                visit(dependency)
        order.append(module_name)

    visit(root_module)
    order += [name for name in parsed if name not in order and included[name]]

    return _render(root, parsed, included, order, origin)


def _check_nested_import(module: _ParsedModule, node: ast.stmt) -> None:
    """Imports inside functions stay as written, so they may name only what generated code may import (diffusers'
    loader also scans every import line of the file and imports what it names, or copies it for a relative one)."""
    where = f"{module.relative_path}:{node.lineno}"
    sources = (
        [importlib.util.resolve_name("." * node.level + (node.module or ""), module.package)]
        if isinstance(node, ast.ImportFrom)
        else [alias.name for alias in node.names]
    )
    for source in sources:
        if _is_project_module(source, module.project_packages):
            raise BundleError(
                f"{where}: a function imports the project module {source!r}; bundled code cannot (it must run where "
                "only diffusers is installed). Import it at the top of the module, or keep the function out of the "
                "pipeline and component classes."
            )
        _check_external(source, where)


def _render(root, parsed, included, order, origin) -> str:
    from importlib.metadata import version

    plain_imports, from_imports = set(), {}
    for name, source in origin.items():
        if source[0] == "import":
            plain_imports.add((source[1], source[2]))
        elif source[0] == "from":
            from_imports.setdefault(source[1], set()).add((source[2], source[3]))

    def import_group(modules):
        lines = [
            f"import {module}" + (f" as {alias}" if alias else "")
            for module, alias in sorted(plain_imports)
            if modules(module)
        ]
        for module in sorted(from_imports):
            if modules(module):
                names = ", ".join(
                    f"{name} as {alias}" if alias else name for name, alias in sorted(from_imports[module])
                )
                lines.append(f"from {module} import {names}")
        return lines

    def is_stdlib(module):
        return module.split(".")[0] in sys.stdlib_module_names

    files = ", ".join(parsed[name].relative_path for name in order)
    root_doc = parsed[root.__module__].docstring or ""
    parts = [
        f'"""Generated code: `{root.__qualname__}` and what it needs from scratch-diffusion '
        f"{version('scratch-diffusion')} ({files}).\n\n"
        "Written by `save_pretrained(..., self_contained=True)` / `push_to_hub` so that this folder loads with\n"
        "`trust_remote_code=True` where only diffusers is installed; edits are lost when it is saved again.\n\n"
        + root_doc.replace('"""', "'''")
        + '\n"""',
        "\n".join(import_group(is_stdlib)),
        "\n".join(import_group(lambda module: not is_stdlib(module))),
    ]
    stand_ins = sorted((name, source[1]) for name, source in origin.items() if source[0] == "stand-in")
    if stand_ins:
        parts.append(
            "# Component classes live in their components' folders (diffusers loads them from there); here they only\n"
            "# annotate the pipeline's `__init__`.\n" + "\n".join(f"{name} = {base}" for name, base in stand_ins)
        )
    for module_name in order:
        module = parsed[module_name]
        blocks = [f"# ---- from {module.relative_path} " + "-" * max(0, 100 - len(module.relative_path))]
        blocks += [module.source_of(index) for index in sorted(included[module_name])]
        parts.append("\n\n\n".join(blocks))
    text = "\n\n\n".join(part for part in parts if part) + "\n"
    compile(text, f"<generated {root.__qualname__}>", "exec")
    return text


# --------------------------------------------------------------------------------------------------------------------
# Writing a self-contained folder, and reading one back with the installed project
# --------------------------------------------------------------------------------------------------------------------
def component_module_name(cls: type) -> str:
    """`custom_models.unet.ScratchUNetModel` -> `scratch_unet` (the file `unet/scratch_unet.py`)."""
    return COMPONENT_MODULE_PREFIX + cls.__module__.rpartition(".")[2]


def pipeline_module_name(cls: type) -> str:
    """`pipelines.class_conditional.ClassConditionalUNetPipeline` -> `pipeline_class_conditional`."""
    return PIPELINE_MODULE_PREFIX + cls.__module__.rpartition(".")[2]


def component_classes() -> list[type]:
    """Our model and scheduler classes (those `custom_models` and `custom_schedulers` export)."""
    import custom_models
    import custom_schedulers

    return [
        value
        for package in (custom_models, custom_schedulers)
        for value in vars(package).values()
        if isinstance(value, type) and issubclass(value, (ModelMixin, SchedulerMixin))
    ]


def _is_ours(cls: type) -> bool:  # a class defined in this project's source
    return _is_project_module(cls.__module__) and cls.__module__ in sys.modules


def code_files(pipeline) -> dict[str, type]:
    """The files `write_code_files` writes for `pipeline` (path in the folder -> the class it is generated for)."""
    pipeline_class = type(pipeline)
    if not _is_ours(pipeline_class):
        raise ValueError(f"{pipeline_class.__name__} is not one of this project's pipelines; cannot generate its code.")
    files = {pipeline_module_name(pipeline_class) + ".py": pipeline_class}
    for name, component in pipeline.components.items():
        if isinstance(component, (ModelMixin, SchedulerMixin)) and _is_ours(type(component)):
            files[f"{name}/{component_module_name(type(component))}.py"] = type(component)
    return dict(sorted(files.items()))


def write_code_files(pipeline, folder: str | os.PathLike) -> list[str]:
    """Turn a folder written by `pipeline.save_pretrained` into a self-contained one; returns the files written.

    Writes the generated modules, points `model_index.json` at them and adds `auto_map` for `diffusers.AutoModel`.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    stand_ins = tuple(component_classes())
    files = code_files(pipeline)
    for path, cls in files.items():
        module_name = path.rpartition("/")[2].removesuffix(".py")
        if "/" not in path:  # the pipeline module, at the root
            (folder / path).write_text(bundle(cls, stand_ins=stand_ins))
            index["_class_name"] = [module_name, cls.__name__]
            continue
        name = path.partition("/")[0]
        (folder / path).write_text(bundle(cls))
        index[name] = [module_name, cls.__name__]
        if issubclass(cls, ModelMixin):
            auto_map = {"AutoModel": f"{module_name}.{cls.__name__}"}
            config_path = folder / name / "config.json"
            config = json.loads(config_path.read_text())
            config["auto_map"] = auto_map
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if name == pipeline.denoiser_name:
                # `AutoModel.from_pretrained(repo, subfolder=...)` reads `auto_map` from model_index.json first.
                index["auto_map"] = auto_map
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(files)


def use_installed_code(config: dict) -> dict:
    """A self-contained folder's `model_index.json` as if it had been saved without code files: our pipeline and
    component classes by their installed modules, so that the project's own code loads it and nothing in the folder
    runs. Entries that name anything else are left as they are (and diffusers then asks for trust_remote_code)."""
    import pipelines

    pipeline_classes = [value for value in vars(pipelines).values() if isinstance(value, type)]
    ours = {
        cls.__name__: cls
        for cls in component_classes() + [c for c in pipeline_classes if issubclass(c, DiffusionPipeline)]
    }
    config = dict(config)
    rewritten = False
    class_name = config.get("_class_name")
    if isinstance(class_name, list) and len(class_name) == 2 and class_name[1] in ours:
        if class_name[0] == pipeline_module_name(ours[class_name[1]]):
            config["_class_name"] = class_name[1]
            rewritten = True
    for key, value in config.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[1] not in ours:
            continue
        cls = ours[value[1]]
        if value[0] == component_module_name(cls):
            config[key] = [cls.__module__, cls.__name__]
            rewritten = True
    if rewritten:
        config.pop("auto_map", None)
    return config


def read_model_index_with_installed_code(read):
    """Wrap `ConfigMixin._dict_from_json_file` (how diffusers reads `model_index.json`) with `use_installed_code`."""

    def read_with_installed_code(cls, json_file):
        return use_installed_code(read(cls, json_file))

    read_with_installed_code.reads_installed_code = True
    return read_with_installed_code
