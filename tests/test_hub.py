"""push_to_hub against a loopback fake Hub, then `DiffusionPipeline.from_pretrained("user/repo")` and the card's snippet."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from hub_server import FakeHub
from huggingface_hub import ModelCard
from pipeline_helpers import CALL, run, tiny_pipeline
from safetensors.torch import load_file

from pipelines import build_model_card

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fakeTokenForLoopbackTestsOnly0123456789"
METRICS = [
    {"name": "FID-MNIST", "type": "fid", "value": 12.5, "num_samples": 1000},
    {"name": "GAN-test accuracy", "type": "accuracy", "value": 0.93, "num_samples": 1000},
]

# A fresh process: HF_ENDPOINT is read when huggingface_hub is imported, and the test process is offline.
PUSH_AND_LOAD_SCRIPT = """
import json, re, sys
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download
from safetensors.torch import save_file
import pipelines
from pipelines import build_model_card

work, token, call, metrics = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
pipe = DiffusionPipeline.from_pretrained(f"{work}/local")
card = build_model_card("user/tiny-dit", pipe, dataset="ylecun/mnist", metrics=metrics, license="cc-by-sa-3.0", guidance_scale=2.0)
pipe.push_to_hub("user/tiny-dit", model_card=card, sample_grid=f"{work}/grid.png", token=token)
# save_pretrained(push_to_hub=True) goes through the same push: default card and a freshly sampled grid.
pipe.save_pretrained(f"{work}/saved", push_to_hub=True, repo_id="user/tiny-dit-default-card", token=token)

loaded = DiffusionPipeline.from_pretrained("user/tiny-dit")
loaded.set_progress_bar_config(disable=True)
images = loaded(**call, generator=torch.Generator("cpu").manual_seed(0)).images
save_file({"images": images}, f"{work}/from_hub.safetensors")
with open(f"{work}/loaded.json", "w") as f:
    json.dump([type(loaded).__name__, type(loaded.transformer).__name__, type(loaded.scheduler).__name__], f)

# The card's usage snippet, exactly as written.
readme = open(hf_hub_download("user/tiny-dit", "README.md")).read()
snippet = re.search(r"```python\\n(.*?)```", readme, re.S).group(1)
exec(compile(snippet, "README.md", "exec"), {"__name__": "__main__"})
"""


def push_and_load(tmp_path):
    """Push two repos (an explicit card with metrics; the default card) and load one back, in a child process."""
    pipe = tiny_pipeline("dit", "ScratchFlowMatchEulerScheduler")
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "local")
    PIL.Image.new("L", (16, 8), 255).save(tmp_path / "grid.png")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        subprocess.run(
            [sys.executable, "-c", PUSH_AND_LOAD_SCRIPT, str(tmp_path), TOKEN, json.dumps(CALL), json.dumps(METRICS)],
            check=True,
            cwd=tmp_path,
            env=env,
            timeout=240,
        )
    return hub, expected


# One test, one push: the child process (imports, push, load) is the expensive part.
def test_push_to_hub_then_from_pretrained_repo_id(tmp_path):
    hub, expected = push_and_load(tmp_path)
    assert hub.unrouted == [], hub.unrouted

    # Loaded back from "user/tiny-dit": the right classes and the same images for the same seed.
    assert json.loads((tmp_path / "loaded.json").read_text()) == [
        "ClassConditionalTransformerPipeline",
        "ScratchDiTModel",
        "ScratchFlowMatchEulerScheduler",
    ]
    assert torch.equal(load_file(tmp_path / "from_hub.safetensors")["images"], expected)
    files = hub.repos["user/tiny-dit"].resolve("main")[1]
    assert {"model_index.json", "README.md", "samples.png", "transformer/diffusion_pytorch_model.safetensors"} <= set(
        files
    )
    # The card's usage snippet ran as written, against the repo.
    assert PIL.Image.open(tmp_path / "sample.png").size == (8, 8)

    # The model card.
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "cc-by-sa-3.0" and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.datasets == ["ylecun/mnist"]
    assert {"diffusers", "dit", "flow-matching", "class-conditional"} <= set(card.data.tags)
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("fid", 12.5), ("accuracy", 0.93)]
    assert "![Samples, one row per class](samples.png)" in card.text and "| FID-MNIST | 12.5 | 1000 |" in card.text
    assert 'DiffusionPipeline.from_pretrained("user/tiny-dit")' in card.text and "import pipelines" in card.text
    assert PIL.Image.open(io.BytesIO(files["samples.png"])).size == (16, 8)

    # save_pretrained(push_to_hub=True): the default card and a sampled grid, one row per class (4 per row).
    default = hub.repos["user/tiny-dit-default-card"].resolve("main")[1]
    default_card = ModelCard(default["README.md"].decode())
    assert default_card.data.license == "apache-2.0" and "flow-matching" in default_card.data.tags
    assert PIL.Image.open(io.BytesIO(default["samples.png"])).size == (4 * 8, 10 * 8)

    # The token reached the Hub but no file: not in the repos, the local folders or HF_HOME.
    assert f"Bearer {TOKEN}" in hub.authorizations
    for repo in hub.repos.values():
        for snapshot in repo.snapshots.values():
            assert not any(TOKEN.encode() in data for data in snapshot.values())
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_build_model_card_rejects_bad_input():
    with pytest.raises(ValueError, match="architecture"):
        build_model_card("user/x")
    with pytest.raises(ValueError, match="Unknown objective 'eps'"):
        build_model_card("user/x", architecture="dit", objective="eps")
    with pytest.raises(ValueError, match="num_samples"):
        build_model_card("user/x", architecture="dit", objective="epsilon", metrics=[{"name": "FID", "value": 1.0}])
