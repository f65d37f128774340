"""The files of a Hugging Face Space that serves the demo page for one pushed model (`push_to_hub(..., space_id=...)`).

`app.py` is `demo/app.py` as it is (it imports only gradio, diffusers, torch, numpy and PIL), `demo_config.json`
names the model repo it opens on and may run the code of (`trust_remote_code`), `requirements.txt` pins the
libraries the generated code was tested with, and `README.md` carries the Space's settings (sdk, app file, model).
Written without importing gradio.
"""

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

APP_SOURCE = Path(__file__).resolve().parent / "app.py"
# What the Space installs besides gradio (the Space's sdk_version): the libraries of the generated code.
SPACE_REQUIREMENTS = ("torch", "diffusers", "transformers", "peft", "safetensors", "huggingface_hub")


def _pinned(name: str) -> str:
    try:
        # The public version: a local label such as "+cpu" names a wheel of this machine's index only.
        return f"{name}=={version(name).split('+')[0]}"
    except PackageNotFoundError:
        return name


def write_space_files(folder: str | Path, model_repo_id: str, title: str | None = None) -> list[str]:
    """Write the Space for `model_repo_id` into `folder`; returns the file names."""
    folder = Path(folder)
    try:
        gradio_version = version("gradio")
    except PackageNotFoundError:
        gradio_version = None
    (folder / "app.py").write_text(APP_SOURCE.read_text())
    (folder / "demo_config.json").write_text(json.dumps({"pipeline": model_repo_id}, indent=2) + "\n")
    (folder / "requirements.txt").write_text("\n".join(_pinned(name) for name in SPACE_REQUIREMENTS) + "\n")
    settings = [
        f"title: {json.dumps(title or model_repo_id.split('/')[-1] + ' demo')}",
        "emoji: 🔢",
        "colorFrom: gray",
        "colorTo: blue",
        "sdk: gradio",
        *([f"sdk_version: {gradio_version}"] if gradio_version else []),
        "app_file: app.py",
        "pinned: false",
        "models:",
        f"  - {model_repo_id}",
    ]
    readme = (
        "---\n" + "\n".join(settings) + "\n---\n\n"
        f"# {model_repo_id} demo\n\nThe scratch-diffusion demo page for "
        f"[{model_repo_id}](https://huggingface.co/{model_repo_id}): choose the digit (or type a prompt), sampler, "
        "steps, guidance and seed; see the samples and the denoising animation, and compare two samplers side by "
        "side from the same noise. It loads the model with `trust_remote_code=True`, which runs the code the model "
        "repo carries (generated from the scratch-diffusion source when it was pushed), and no other repo's.\n"
    )
    (folder / "README.md").write_text(readme)
    return ["README.md", "app.py", "demo_config.json", "requirements.txt"]
