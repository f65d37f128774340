"""Pipeline folders saved by an earlier version still load and sample the same images.

`model_index.json` records every component as `[module, class]` (`custom_models.unet`, `custom_schedulers.ddpm`,
...): moving a class to another module would break every folder users have saved or pushed. The fixtures were
written by `tests/fixtures/make_pipeline_v0_1.py` at version 0.1.0, before the training/ layout split.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import pipelines  # noqa: F401  (registers the pipeline classes on diffusers)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pipeline_v0_1"
EXPECTED = json.loads((FIXTURES / "expected_images.json").read_text())
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(EXPECTED["images"]))
def test_folder_saved_by_v0_1_loads_and_samples_the_same_images(name):
    pipe = DiffusionPipeline.from_pretrained(FIXTURES / name)
    pipe.set_progress_bar_config(disable=True)
    recorded = json.loads((FIXTURES / name / "model_index.json").read_text())
    assert type(pipe).__name__ == recorded["_class_name"]
    assert [type(pipe.scheduler).__module__, type(pipe.scheduler).__name__] == recorded["scheduler"]
    images = pipe(**EXPECTED["call"], generator=torch.Generator("cpu").manual_seed(0)).images
    np.testing.assert_allclose(images, np.asarray(EXPECTED["images"][name]), atol=1e-5)


def test_folders_saved_before_pipelines_recorded_their_objective_fall_back_on_the_scheduler():
    from pipelines.model_card import infer_objective

    for name in sorted(EXPECTED["images"]):
        pipe = DiffusionPipeline.from_pretrained(FIXTURES / name)
        assert "objective" not in json.loads((FIXTURES / name / "model_index.json").read_text())
        assert pipe.config.objective is None
        expected = "flow_matching" if "Flow" in type(pipe.scheduler).__name__ else pipe.scheduler.config.prediction_type
        assert infer_objective(pipe) == expected


def test_the_objective_round_trips_through_model_index_json_and_bad_values_are_refused(tmp_path):
    from pipelines.model_card import infer_objective

    name = sorted(EXPECTED["images"])[0]
    pipe = DiffusionPipeline.from_pretrained(FIXTURES / name)
    components = {key: value for key, value in pipe.components.items()}
    recorded = type(pipe)(**components, objective="diffusion", prediction_type="v_prediction")
    recorded.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["objective"] == "diffusion" and index["prediction_type"] == "v_prediction"
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    # The record wins over the scheduler's config (which says epsilon here).
    assert loaded.config.objective == "diffusion" and infer_objective(loaded) == "v_prediction"
    with pytest.raises(ValueError, match=r"`objective` must be one of \['diffusion', 'flow_matching'\]"):
        type(pipe)(**components, objective="ddpm")
    with pytest.raises(ValueError, match="A diffusion objective needs its `prediction_type`"):
        type(pipe)(**components, objective="diffusion")
    with pytest.raises(ValueError, match="`prediction_type` belongs to the diffusion objective"):
        type(pipe)(**components, objective="flow_matching", prediction_type="epsilon")


def test_folders_saved_by_v0_1_load_in_a_fresh_process_with_only_import_pipelines(tmp_path):
    code = (
        "import sys, pipelines\n"
        "from diffusers import DiffusionPipeline\n"
        "for name in sys.argv[2:]:\n"
        "    pipe = DiffusionPipeline.from_pretrained(sys.argv[1] + '/' + name)\n"
        "    print(name, type(pipe).__name__, type(pipe.denoiser).__name__, type(pipe.scheduler).__name__)\n"
        "assert 'training' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(FIXTURES), *sorted(EXPECTED["images"])],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert "unet_ddpm ClassConditionalUNetPipeline ScratchUNetModel ScratchDDPMScheduler" in lines
    assert "dit_ddim ClassConditionalTransformerPipeline ScratchDiTModel ScratchDDIMScheduler" in lines
    assert "mmdit_flow ClassConditionalTransformerPipeline ScratchMMDiTModel ScratchFlowMatchEulerScheduler" in lines
