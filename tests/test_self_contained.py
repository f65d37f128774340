"""Self-contained pipeline folders and Hub repos (issue 15): code generated from our source at save time loads with
`trust_remote_code=True` in an environment that has diffusers but not this project, with identical images; with the
project installed the same folder loads with the project's code and nothing in the folder runs."""

import ast
import hashlib
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from packaging.version import Version
from pipeline_helpers import CALL, run, tiny_pipeline
from safetensors.torch import load_file

import custom_models
import custom_schedulers
import pipelines
from pipelines.self_contained import ALLOWED_LIBRARIES, BundleError, bundle

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fakeTokenForLoopbackTestsOnly0123456789"
# What a diffusers user has: the libraries diffusers-based code needs, and nothing of this project; plus gradio, which
# a Space has (the pushed demo Space runs there too).
DIFFUSERS_ONLY_PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "huggingface_hub", "peft", "gradio")
TEXT_CALL = dict(prompt=["a bold 7", "a thin 3"], guidance_scale=2.0, num_inference_steps=2, output_type="pt")

PIPELINE_CLASSES = [
    pipelines.ClassConditionalUNetPipeline,
    pipelines.ClassConditionalTransformerPipeline,
    pipelines.TextToImageUNetPipeline,
    pipelines.TextToImageTransformerPipeline,
]
COMPONENT_CLASSES = [
    value
    for package in (custom_models, custom_schedulers)
    for value in vars(package).values()
    if isinstance(value, type) and value.__module__.startswith(package.__name__)
]


def imported_modules(source: str) -> set[str]:
    """Top-level names of every module the source imports, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in generated code: {ast.unparse(node)}"
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("cls", PIPELINE_CLASSES + COMPONENT_CLASSES, ids=lambda cls: cls.__name__)
def test_generated_modules_import_only_the_standard_library_and_diffusers_libraries(cls):
    stand_ins = tuple(COMPONENT_CLASSES) if cls in PIPELINE_CLASSES else ()
    source = bundle(cls, stand_ins=stand_ins)
    outside = imported_modules(source) - set(sys.stdlib_module_names) - set(ALLOWED_LIBRARIES)
    assert not outside, f"{cls.__name__}'s generated module imports {outside}"
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert cls.__name__ in classes
    if cls in PIPELINE_CLASSES:
        # The denoiser classes are only annotations there; diffusers loads them from the component folders.
        assert not classes & {c.__name__ for c in COMPONENT_CLASSES}
        assert "ScratchUNetModel = ModelMixin" in source or "ScratchMMDiTModel = ModelMixin" in source
    # The generated module runs on its own: exec it in a fresh namespace, then the class is there.
    namespace = {"__name__": "generated"}
    exec(compile(source, cls.__name__, "exec"), namespace)
    assert namespace[cls.__name__].__name__ == cls.__name__


def test_the_project_packages_are_the_packages_setup_cfg_installs():
    import configparser

    from pipelines.self_contained import PROJECT_PACKAGES

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert sorted(config["options.packages.find"]["include"].split()) == sorted(PROJECT_PACKAGES)


def write_fake_project(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize(
    "files, match",
    [
        ({"fakeproj_a/m.py": "print('side effect')\nclass Root:\n    pass\n"}, "top-level Expr statement"),
        (
            {"fakeproj_b/m.py": "class Root:\n    def f(self):\n        from fakeproj_b import other\n"},
            "a function imports the project module 'fakeproj_b'",
        ),
        (
            {
                "fakeproj_c/one.py": "def helper():\n    return 1\n",
                "fakeproj_c/m.py": "from .one import helper as _h\nclass Root:\n    x = _h()\n",
            },
            "`import ... as` of project names",
        ),
        (
            {
                "fakeproj_d/one.py": "SIZE = 1\ndef one():\n    return SIZE\n",
                "fakeproj_d/m.py": "from .one import one\nSIZE = 2\nclass Root:\n    value = (one(), SIZE)\n",
            },
            "'SIZE' means two different things",
        ),
        ({"fakeproj_e/m.py": "import yaml\nclass Root:\n    loader = yaml.safe_load\n"}, "imports 'yaml'"),
    ],
    ids=["side-effect", "nested-project-import", "renamed-import", "name-collision", "foreign-library"],
)
def test_bundle_refuses_what_it_cannot_generate_faithfully(tmp_path, monkeypatch, files, match):
    write_fake_project(tmp_path, {**files, f"{next(iter(files)).split('/')[0]}/__init__.py": ""})
    monkeypatch.syspath_prepend(str(tmp_path))
    package = next(iter(files)).split("/")[0]
    root = importlib.import_module(f"{package}.m").Root
    with pytest.raises(BundleError, match=match):
        bundle(root, project_packages=(package,))


def test_a_self_contained_folder_loads_with_the_installed_project_and_runs_none_of_its_code(tmp_path):
    pipe = tiny_pipeline("unet", "ScratchDDPMScheduler")
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "pipe", self_contained=True)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_class_conditional", "ClassConditionalUNetPipeline"]
    assert index["unet"] == ["scratch_unet", "ScratchUNetModel"]
    assert index["scheduler"] == ["scratch_ddpm", "ScratchDDPMScheduler"]
    assert index["auto_map"] == {"AutoModel": "scratch_unet.ScratchUNetModel"}
    config = json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "scratch_unet.ScratchUNetModel"}
    # Poison the generated code: loading must not execute any of it.
    for path in (tmp_path / "pipe").rglob("*.py"):
        path.write_text(path.read_text() + "\nraise RuntimeError('the folder's code ran')\n")

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is pipelines.ClassConditionalUNetPipeline
    assert type(loaded.unet) is custom_models.ScratchUNetModel
    assert type(loaded.scheduler) is custom_schedulers.ScratchDDPMScheduler
    assert torch.equal(run(loaded), expected)
    # Saved again without code, the folder is a plain one (the generated names are gone).
    loaded.save_pretrained(tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    assert plain["_class_name"] == "ClassConditionalUNetPipeline" and plain["unet"][0] == "custom_models.unet"
    assert "auto_map" not in plain and not list((tmp_path / "plain").rglob("*.py"))


# ----------------------------------------------------------------------------------------------------------------------
# A fresh environment with diffusers but without this project
# ----------------------------------------------------------------------------------------------------------------------
def diffusers_only_requirements() -> list[str]:
    """The packages a diffusers user has, at the versions installed here (torch without its local label: this
    machine's index resolves `torch==X` to the CPU build)."""
    return [f"{name}=={Version(importlib.metadata.version(name)).public}" for name in DIFFUSERS_ONLY_PACKAGES]


@pytest.fixture(scope="module")
def diffusers_only_python() -> Path:
    """The python of a virtual environment built from the package index with `DIFFUSERS_ONLY_PACKAGES` only; built once
    per set of versions (about a minute) and kept under ~/.cache/scratch_diffusion_test_envs."""
    from filelock import FileLock

    requirements = diffusers_only_requirements()
    key = hashlib.sha256(" ".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    envs = Path(os.environ.get("SCRATCH_DIFFUSION_TEST_ENVS", Path.home() / ".cache" / "scratch_diffusion_test_envs"))
    envs.mkdir(parents=True, exist_ok=True)
    venv = envs / f"diffusers-only-{key}"
    python = venv / "bin" / "python"
    with FileLock(str(envs / f"{venv.name}.lock")):
        if not (venv / "complete").is_file():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
            result = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert result.returncode == 0, f"building the diffusers-only environment failed:\n{result.stderr[-3000:]}"
            (venv / "complete").write_text("\n".join(requirements) + "\n")
    return python


def child_env(tmp_path: Path, hub_url: str, with_project: bool) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHON"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", HF_ENDPOINT=hub_url)
    env.update(OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if with_project:
        env["PYTHONPATH"] = str(ROOT)
    return env


# Project side: push the folders (default push: self-contained), then load one back by repo id with the project.
PUSH_SCRIPT = """
import json, sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
import pipelines

work, token, repos = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for repo, call in repos.items():
    pipe = DiffusionPipeline.from_pretrained(f"{work}/local/{repo}")
    space = "user/unet-demo" if repo == "unet" else None  # the demo page as a Space, next to the model
    pipe.push_to_hub(f"user/{repo}", sample_grid=f"{work}/grid.png", token=token, space_id=space)
loaded = DiffusionPipeline.from_pretrained("user/unet")  # the project's own code, no trust_remote_code
loaded.set_progress_bar_config(disable=True)
images = loaded(**repos["unet"], generator=torch.Generator("cpu").manual_seed(0)).images
save_file({"images": images}, f"{work}/project_from_hub.safetensors")
print(type(loaded).__module__, type(loaded.unet).__module__)
"""

# Diffusers-only side: plain diffusers calls, as a stranger would write them.
LOAD_SCRIPT = """
import importlib.util, json, re, sys
import torch
from diffusers import AutoModel, DiffusionPipeline
from huggingface_hub import hf_hub_download
from safetensors.torch import save_file

work, repos = sys.argv[1], json.loads(sys.argv[2])
report = {"project_importable": [n for n in ("pipelines", "custom_models", "custom_schedulers")
                                 if importlib.util.find_spec(n) is not None]}
for repo, call in repos.items():
    try:
        DiffusionPipeline.from_pretrained(f"user/{repo}")
        report[f"{repo}/refusal"] = None
    except ValueError as error:
        report[f"{repo}/refusal"] = str(error)
    pipe = DiffusionPipeline.from_pretrained(f"user/{repo}", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
    save_file({"images": images}, f"{work}/{repo}.safetensors")
    name = pipe.denoiser_name
    model = AutoModel.from_pretrained(f"user/{repo}", subfolder=name, trust_remote_code=True)
    report[repo] = [type(pipe).__name__, type(getattr(pipe, name)).__module__, type(model).__name__,
                    bool(all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                              getattr(pipe, name).state_dict().values())))]
    if repo == "unet":
        pipe.load_lora_weights(f"{work}/lora", adapter_name="style")
        images = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
        save_file({"images": images}, f"{work}/unet_lora.safetensors")
        try:
            pipe.save_pretrained(f"{work}/resaved", self_contained=True)
        except ValueError as error:
            report["resave"] = str(error)
# The model card's first snippet (the diffusers-only one), exactly as written.
readme = open(hf_hub_download("user/unet", "README.md")).read()
snippet = re.search(r"```python\\n(.*?)```", readme, re.S).group(1)
exec(compile(snippet, "README.md", "exec"), {"__name__": "__main__"})
report["card"] = readme

# The pushed Space's app, run from its own files: it opens on its model and runs no other repo's code.
sys.path.insert(0, f"{work}/space")
import app
pipe = app.load_pipeline(app.configured_pipeline())
grid, frames = app.sample(pipe, digit="seven", prompt=None, negative_prompt=None, sampler="saved", steps=2,
                          guidance=2.0, seed=0, count=2)
grid.save(f"{work}/space_grid.png")
report["space"] = [app.configured_pipeline(), app.PROJECT_INSTALLED, len(frames)]
try:
    app.load_pipeline("user/dit")
except app.DemoError as error:
    report["space_refusal"] = str(error)
json.dump(report, open(f"{work}/report.json", "w"))
"""


def test_a_diffusers_only_environment_loads_pushed_repos_with_trust_remote_code(tmp_path, diffusers_only_python):
    from hub_server import FakeHub
    from peft import LoraConfig
    from test_text_to_image import build as build_text_pipeline

    pipes = {
        "unet": tiny_pipeline("unet", "ScratchDDPMScheduler"),
        "dit": tiny_pipeline("dit", "ScratchDDIMScheduler", num_kv_heads=1),
        "mmdit": tiny_pipeline("mmdit", "ScratchFlowMatchEulerScheduler"),
        "text-unet": build_text_pipeline("unet", tmp_path),
        "text-mmdit": build_text_pipeline("mmdit", tmp_path),
    }
    calls = {name: TEXT_CALL if name.startswith("text") else CALL for name in pipes}
    expected = {}
    # One thread, as in the child processes: the number of threads may change float sums.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, pipe in pipes.items():
            pipe.save_pretrained(tmp_path / "local" / name)
            expected[name] = pipe(**calls[name], generator=torch.Generator("cpu").manual_seed(0)).images
        # A LoRA adapter for the UNet, saved by the project, loaded by the generated pipeline.
        adapted = tiny_pipeline("unet", "ScratchDDPMScheduler")
        targets = adapted.unet.default_lora_target_modules
        adapted.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        expected["unet_lora"] = run(adapted)
        # What the Space's page shows for digit 7, two images, two steps, guidance 2, seed 0.
        space_call = dict(class_labels=[7], num_images_per_label=2, num_inference_steps=2, guidance_scale=2.0)
        images = pipes["unet"](**space_call, generator=torch.Generator("cpu").manual_seed(0)).images
        expected["space_grid"] = make_image_grid(images, rows=1, cols=2)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(expected["unet_lora"], expected["unet"])
    adapted.save_denoiser_lora(tmp_path / "lora")
    PIL.Image.new("L", (16, 8), 255).save(tmp_path / "grid.png")

    with FakeHub() as hub:
        pushed = subprocess.run(
            [sys.executable, "-c", PUSH_SCRIPT, str(tmp_path), TOKEN, json.dumps(calls)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=child_env(tmp_path, hub.url, with_project=True),
            timeout=300,
        )
        assert pushed.returncode == 0, pushed.stderr[-4000:]
        for name, data in hub.spaces["user/unet-demo"].resolve("main")[1].items():
            (tmp_path / "space" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "space" / name).write_bytes(data)
        loaded = subprocess.run(
            [str(diffusers_only_python), "-I", "-c", LOAD_SCRIPT, str(tmp_path), json.dumps(calls)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=child_env(tmp_path, hub.url, with_project=False),
            timeout=300,
        )
        assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert hub.unrouted == [], hub.unrouted

    # With the project: its own classes, from a self-contained repo id, same images.
    assert pushed.stdout.split()[-2:] == ["pipelines.class_conditional", "custom_models.unet"]
    assert torch.equal(load_file(tmp_path / "project_from_hub.safetensors")["images"], expected["unet"])

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["project_importable"] == []
    denoisers = {"unet": "ScratchUNetModel", "dit": "ScratchDiTModel", "mmdit": "ScratchMMDiTModel"}
    denoisers |= {"text-unet": "ScratchUNetModel", "text-mmdit": "ScratchMMDiTModel"}
    for name, pipe in pipes.items():
        # Without trust_remote_code: diffusers' own refusal, naming the code it would run.
        assert "trust_remote_code=True" in report[f"{name}/refusal"], report[f"{name}/refusal"]
        pipeline_name, denoiser_module, auto_model, same_weights = report[name]
        assert pipeline_name == type(pipe).__name__
        assert denoiser_module.startswith("diffusers_modules.") and denoiser_module.endswith(
            "scratch_" + type(pipe.denoiser).__module__.rpartition(".")[2]
        )
        assert auto_model == denoisers[name] and same_weights
        assert torch.equal(load_file(tmp_path / f"{name}.safetensors")["images"], expected[name]), name
    assert torch.equal(load_file(tmp_path / "unet_lora.safetensors")["images"], expected["unet_lora"])
    assert "self_contained=True" in report["resave"] and "not installed here" in report["resave"]

    # The repo carries the generated code; the card says what it runs and shows both ways to load.
    files = hub.repos["user/unet"].resolve("main")[1]
    assert {"pipeline_class_conditional.py", "unet/scratch_unet.py", "scheduler/scratch_ddpm.py"} <= set(files)
    card = report["card"]
    for text in (
        'DiffusionPipeline.from_pretrained("user/unet", trust_remote_code=True)',
        "`pipeline_class_conditional.py`, `scheduler/scratch_ddpm.py`, `unet/scratch_unet.py`",
        'AutoModel.from_pretrained("user/unet", subfolder="unet", trust_remote_code=True)',
        "[user/unet-demo](https://huggingface.co/spaces/user/unet-demo)",
        "import pipelines",
    ):
        assert text in card, text
    assert (tmp_path / "sample.png").is_file()  # the card's diffusers-only snippet ran as written

    # The Space: the demo app as it is in this repository, its model, pinned libraries, and the page it serves.
    space_files = hub.spaces["user/unet-demo"].resolve("main")[1]
    assert set(space_files) == {"README.md", "app.py", "demo_config.json", "requirements.txt"}
    assert space_files["app.py"] == (ROOT / "demo" / "app.py").read_bytes()
    assert json.loads(space_files["demo_config.json"]) == {"pipeline": "user/unet"}
    assert f"diffusers=={importlib.metadata.version('diffusers')}" in space_files["requirements.txt"].decode()
    space_card = space_files["README.md"].decode()
    assert "sdk: gradio" in space_card and "app_file: app.py" in space_card and "  - user/unet" in space_card
    assert report["space"] == ["user/unet", False, 3]
    assert "runs the code of 'user/unet' only" in report["space_refusal"]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "space_grid.png")), np.asarray(expected["space_grid"]))

    text_files = hub.repos["user/text-mmdit"].resolve("main")[1]
    assert {"pipeline_text_to_image.py", "transformer/scratch_mmdit.py", "text_encoder/config.json"} <= set(text_files)
