"""The study (issue 19): its recipes differ only where the study means them to, and `benchmarks/study.py` trains,
resumes, evaluates and reports end to end on a tiny run."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from training.config import load_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import study  # noqa: E402
import study_report  # noqa: E402

# What a study run may change against the others: the model, the objective (and its sampler), the seed, and the
# steps that make the same CPU budget (with the evaluation / checkpoint spacing that follows). The learning rate is
# shared: 1e-3 for every run.
VARIED = {
    "output_dir",
    "model",
    "objective",
    "train.max_steps",
    "train.seed",
    "eval.every_steps",
    "eval.sampler",
    "checkpoint.every_steps",
}


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("model", "objective"):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value
    return flat


def test_study_recipes_share_everything_but_what_the_study_varies():
    paths = sorted(study.STUDY_DIR.glob("*.yaml"))
    assert sorted(path.stem for path in paths) == sorted(study.STUDY_RUNS)
    configs = {path.stem: _flat(yaml.safe_load(path.read_text())) for path in paths}
    reference = configs["dit_gqa_kv2"]
    for name, config in configs.items():
        load_config(["--config", str(study.STUDY_DIR / f"{name}.yaml")])  # a valid recipe
        assert config.keys() == reference.keys(), name
        differing = {key for key in config if config[key] != reference[key]}
        assert differing <= VARIED, (name, differing - VARIED)
        assert config["output_dir"] == f"outputs/study/{name}"
        flow = config["objective"]["name"] == "flow_matching"
        assert config["eval.sampler"] == ("flow_match_euler" if flow else "ddim")
        # Evaluations split the budget in four, checkpoints with them (an interrupted run loses at most a quarter).
        assert config["eval.every_steps"] * 4 == pytest.approx(config["train.max_steps"], rel=0.01)
        assert config["checkpoint.every_steps"] == config["eval.every_steps"]
    # The GQA ablation: the three DiTs differ only in their K/V heads.
    dits = [configs[name]["model"] for name in ("dit_mqa_kv1", "dit_gqa_kv2", "dit_mha_kv4")]
    assert [model["overrides"]["num_kv_heads"] for model in dits] == [1, 2, 4]
    assert all({**model, "overrides": None} == {**dits[0], "overrides": None} for model in dits)


def test_targets_name_the_best_run_and_the_worst():
    rows = [
        {"name": "a", "fid_mnist": 30.0, "gan_test_acc": 0.992},
        {"name": "b", "fid_mnist": 50.0, "gan_test_acc": 0.94},
    ]
    checks = study_report.targets(rows, {"fid_mnist": 12.0})
    assert [met for _, _, met in checks] == [True, True, False]
    assert "best run (a" in checks[0][0] and checks[1][1] == 2.5 and "lowest: b" in checks[2][0]
    # The best run draws the asked-for digit: a lower FID from a run below GAN-test 0.99 does not make it the best.
    rows.append({"name": "c", "fid_mnist": 20.0, "gan_test_acc": 0.971})
    checks = study_report.targets(rows, {"fid_mnist": 12.0})
    assert "best run (a, lowest FID-MNIST with GAN-test >= 0.99)" in checks[0][0] and checks[1][1] == 2.5
    # When no run reaches 0.99, the lowest FID of all is the best, and its GAN-test target is missed.
    checks = study_report.targets(rows[1:], {"fid_mnist": 12.0})
    assert "best run (c, lowest FID-MNIST; none reaches)" in checks[0][0]
    assert [met for _, _, met in checks] == [False, True, False]


def test_study_trains_resumes_evaluates_and_reports_a_tiny_run(tmp_path, monkeypatch):
    recipe = yaml.safe_load((study.STUDY_DIR / "dit_gqa_kv2.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "runs" / "tiny_dit")
    recipe["model"] = {"architecture": "dit", "preset": "tiny"}
    recipe["data"].update(max_train_samples=16, num_validation_samples=4)
    recipe["train"].update(batch_size=4, max_steps=4, report_to="none")
    recipe["eval"].update(every_steps=2, num_inference_steps=2, images_per_class=1, fid_n=2)
    recipe["checkpoint"]["every_steps"] = 2
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny_dit.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(study, "STUDY_DIR", configs)
    monkeypatch.setattr(study, "STUDY_RUNS", ("tiny_dit",))

    report = tmp_path / "report"
    args = ["--num_samples_per_class", "2", "--batch_size", "20", "--output_dir", str(report)]
    study.main(args)
    folder = tmp_path / "runs" / "tiny_dit"
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["num_samples"] == 20 and evaluation["step"] == 4
    summary = json.loads((report / "study.json").read_text())
    [row] = summary["runs"]
    assert row["name"] == "tiny_dit" and row["heads"] == "4 / 2" and row["steps"] == 4 and row["objective"] == "v"
    assert summary["floor"]["num_samples"] == 20
    markdown = (report / "study.md").read_text()
    assert "| tiny_dit | dit `tiny` | 4 / 2 | v | 0 |" in markdown and "quality_vs_time.png" in markdown
    assert (report / "quality_vs_time.png").is_file()
    with Image.open(report / "gifs" / "tiny_dit.gif") as gif:  # one sample per digit, every denoising frame
        assert gif.size == (28, 10 * 28) and gif.n_frames == 3
    # --render_only writes the same study.md again from study.json alone, the run folder aside (as in a clone).
    written = markdown, (report / "study.json").read_text()
    (report / "study.md").unlink()
    folder.rename(tmp_path / "moved")
    study.main(["--render_only", "--output_dir", str(report)])
    assert ((report / "study.md").read_text(), (report / "study.json").read_text()) == written
    (tmp_path / "moved").rename(folder)
    with pytest.raises(ValueError, match="holds no complete study report to render again .missing: study.json"):
        study.main(["--render_only", "--output_dir", str(tmp_path / "empty")])

    # A report of only some study runs never replaces the whole study's report: by default it goes beside the runs.
    other = {**recipe, "output_dir": str(tmp_path / "runs" / "never_trained")}
    (configs / "never_trained.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.setattr(study, "STUDY_RUNS", ("tiny_dit", "never_trained"))
    monkeypatch.setattr(study, "REPORT_DIR", tmp_path / "whole_study_report")
    monkeypatch.setattr(study, "PARTIAL_REPORT_DIR", tmp_path / "partial_report")
    study.main(["--report_only", "--num_samples_per_class", "2"])
    assert not (tmp_path / "whole_study_report").exists()
    assert [row["name"] for row in json.loads((tmp_path / "partial_report" / "study.json").read_text())["runs"]] == [
        "tiny_dit"
    ]

    # The guidance sweep: each scale scored with seed 0, the chosen one again with seed 1, cached, in a table.
    sweep = ["--guidance_sweep", "tiny_dit", "--guidance_scales", "1,2", *args]
    study.main(sweep)
    summary = json.loads((report / "guidance_tiny_dit.json").read_text())
    chosen = summary["chosen_guidance_scale"]
    assert [(row["guidance_scale"], row["seed"]) for row in summary["rows"]] == [(1.0, 0), (2.0, 0), (chosen, 1)]
    assert all(row["num_samples"] == 20 for row in summary["rows"])
    [seed0] = [row for row in summary["rows"][:2] if row["guidance_scale"] == chosen]
    assert summary["rows"][2]["fid_mnist"] != seed0["fid_mnist"]  # other samples, not the seed-0 score again
    cached = sorted((folder / "guidance").iterdir())
    assert [path.name for path in cached] == sorted(["g1_seed0.json", "g2_seed0.json", f"g{chosen:g}_seed1.json"])
    stamps = [path.stat().st_mtime_ns for path in cached]
    study.main(sweep)
    assert [path.stat().st_mtime_ns for path in cached] == stamps
    assert "| guidance | sampling seed | FID-MNIST |" in (report / "guidance_tiny_dit.md").read_text()
    with pytest.raises(ValueError, match="--guidance_scales must be scales >= 1"):
        study.main(["--guidance_sweep", "tiny_dit", "--guidance_scales", "0.5,2", *args])
    with pytest.raises(ValueError, match="never_trained/last does not exist; train the run first"):
        study.main(["--guidance_sweep", "never_trained", *args])
    monkeypatch.setattr(study, "STUDY_RUNS", ("tiny_dit",))

    # Run again: finished and evaluated, so nothing is trained or sampled again.
    before = (folder / "metrics.csv").read_text(), (folder / "evaluation.json").read_text()
    study.main(args)
    assert ((folder / "metrics.csv").read_text(), (folder / "evaluation.json").read_text()) == before

    # As if killed after step 3 (checkpoint-4 never written, metrics.csv as checkpoint-2 saw it, no evaluation yet):
    # resumed from checkpoint-2, trained to the end, evaluated.
    shutil.rmtree(folder / "checkpoints" / "checkpoint-4")
    shutil.copyfile(folder / "checkpoints" / "checkpoint-2" / "metrics.csv", folder / "metrics.csv")
    (folder / "evaluation.json").unlink()
    study.main(args)
    steps = [line.split(",")[1] for line in (folder / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["2", "4"]
    assert "Resumed from" in (folder.parent / "logs" / "tiny_dit.log").read_text()
    assert json.loads((folder / "evaluation.json").read_text())["step"] == 4

    # A run started with another budget is refused, not resumed into a different lr schedule, and kept.
    recipe["train"]["max_steps"] = 6
    (configs / "tiny_dit.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="holds a run of 4 steps, but configs/study/tiny_dit.yaml now asks for 6"):
        study.main(args)
    assert (folder / "last" / "model_index.json").is_file()
    # So is one started with another learning rate (or any other setting the recipe states).
    recipe["train"]["max_steps"] = 4
    recipe["optim"]["learning_rate"] = 0.002
    (configs / "tiny_dit.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="holds a run trained with optim.learning_rate = 0.001, but .* asks for 0.002"):
        study.main(args)
    assert (folder / "last" / "model_index.json").is_file()


def test_unknown_study_run_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="Unknown study run 'nope'.*dit_gqa_kv2"):
        study.main(["--runs", "nope"])
