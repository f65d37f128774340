"""Training configuration: recipes, dotted overrides, and refusals that name the bad key and the allowed values."""

from pathlib import Path

import pytest
import yaml

from training.config import RECIPES_DIR, Config, ConfigError, from_dict, load_config, save_config, to_dict
from training.config_schema import SAMPLER_FAMILIES, sampler_family

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_every_recipe_loads_and_its_header_says_how_to_run_it(tmp_path):
    assert {p.stem for p in RECIPES} >= {
        "quickstart",
        "mnist_unet_eps",
        "mnist_unet_v",
        "mnist_mmdit_flow",
        "mnist_dit_gqa",
        "mnist_unet_mha",
        "mnist_ddpm_original",
        "mnist_unet_x0",
        "mnist_ldm",
        "cifar10_unet",
        "cifar10_dit",
    }
    for recipe in RECIPES:
        header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
        assert f"--config configs/{recipe.name}" in "\n".join(header), recipe
        # The LDM recipe points at a VAE that `training/train_vae.py` writes; any existing folder passes the check.
        config = load_config(
            ["--config", str(recipe), "--model.vae", str(tmp_path)]
            if "ldm" in recipe.stem
            else ["--config", str(recipe)]
        )
        assert config.output_dir == f"outputs/{recipe.stem}"


def test_overrides_are_dotted_yaml_values_merged_into_the_recipe():
    recipe = RECIPES_DIR / "mnist_ddpm_original.yaml"
    config = load_config(
        [
            "--config",
            str(recipe),
            "--train.batch_size",
            "64",
            "--optim.learning_rate=1e-3",
            "--ema.enabled",
            "false",
            "--model.overrides.num_attention_heads",
            "2",
            "--checkpoint.checkpoints_total_limit",
            "null",
            "--output_dir",
            "/tmp/x",
        ]
    )
    assert config.train.batch_size == 64
    assert config.optim.learning_rate == 1e-3 and isinstance(config.optim.learning_rate, float)
    assert config.ema.enabled is False
    # The recipe's own override (dropout) survives next to the new one.
    assert config.model.overrides == {"dropout": 0.1, "num_attention_heads": 2}
    assert config.checkpoint.checkpoints_total_limit is None
    assert config.output_dir == "/tmp/x"
    # Untouched keys keep the recipe's values.
    assert config.eval.sampler == "ddpm" and config.eval.num_inference_steps == 1000


def test_no_and_off_are_words_and_only_true_false_are_booleans(tmp_path):
    # PyYAML's YAML 1.1 would read `no` as False; accelerate's mixed precision setting is spelled "no".
    assert load_config(["--train.mixed_precision", "no"]).train.mixed_precision == "no"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  mixed_precision: no\neval:\n  gif: False\n")
    config = load_config(["--config", str(recipe)])
    assert config.train.mixed_precision == "no" and config.eval.gif is False
    with pytest.raises(
        ConfigError, match=r"eval.gif expects type bool, got 'off' \(str\) \(booleans are spelled true / false\)"
    ):
        load_config(["--eval.gif", "off"])
    assert yaml.safe_load("no") is False  # the loader change stays local to the config


@pytest.mark.parametrize(
    "architecture, old, new", [("dit", "seed000", "large"), ("unet", "seed003", "medium-cross-attention")]
)
def test_a_saved_run_config_with_a_renamed_preset_still_trains(tmp_path, architecture, old, new):
    # A run's config.yaml records model.preset; one written before the rename loads, and building its model warns.
    import torch

    from training.setup import build_model

    save_config(load_config(["--model.architecture", architecture, "--model.preset", new]), tmp_path / "config.yaml")
    saved = tmp_path / "config.yaml"
    saved.write_text(saved.read_text().replace(f"preset: {new}", f"preset: {old}"))
    config = load_config(["--config", str(saved)])
    assert config.model.preset == old
    with torch.device("meta"), pytest.warns(FutureWarning, match=f"preset '{old}' is now called '{new}'"):
        model = build_model(config.model, sample_size=32, in_channels=1, num_classes=10)
    config.model.preset = new
    with torch.device("meta"):
        assert dict(model.config) == dict(
            build_model(config.model, sample_size=32, in_channels=1, num_classes=10).config
        )


def test_defaults_run_without_a_recipe():
    config = load_config([])
    assert config == Config()
    assert config.train.mixed_precision == "auto" and config.objective.label_dropout == 0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train.bacth_size", "4"], r"Unknown key\(s\) \['train.bacth_size'\].*allowed keys: \[.*'batch_size'"),
        (["--trian.batch_size", "4"], r"Unknown key\(s\) \['trian'\] in the config; allowed keys: \[.*'train'"),
        (["--train.batch_size", "four"], r"train.batch_size expects type int, got 'four' \(str\)"),
        (["--train.batch_size", "2.5"], r"train.batch_size expects type int, got 2.5 \(float\)"),
        (["--ema.enabled", "1"], r"ema.enabled expects type bool, got 1 \(int\)"),
        (["--optim.learning_rate", "fast"], r"optim.learning_rate expects type float, got 'fast'"),
        (["--train.batch_size", "0"], r"train.batch_size must be >= 1, got 0"),
        (["--objective.label_dropout", "1.5"], r"objective.label_dropout must be <= 1.0, got 1.5"),
        (["--model.architecture", "vit"], r"model.architecture must be one of \['unet', 'dit', 'mmdit'\], got 'vit'"),
        (
            ["--objective.name", "score_sde"],
            r"objective.name must be one of \['diffusion', 'flow_matching'\], got 'score_sde'",
        ),
        (
            ["--objective.name", "ddpm"],
            r"objective.name 'ddpm' is now called 'diffusion' .*write `name: diffusion`",
        ),
        (["--objective.prediction_type", "x0"], r"must be one of \['epsilon', 'v_prediction', 'sample'\], got 'x0'"),
        (["--objective.timestep_sampling", "cosine"], r"must be one of \['uniform', 'logit_normal', 'mode'\]"),
        (["--optim.lr_scheduler", "onecycle"], r"optim.lr_scheduler must be one of \[.*'cosine'"),
        (["--model.preset", "huge"], r"model.preset 'huge' is not a unet preset; available: \[.*'tiny'"),
        (
            ["--model.architecture", "dit", "--model.overrides.hidden_sise", "8"],
            r"Unknown key model.overrides.hidden_sise.*'hidden_size'",
        ),
        (["--model.overrides.num_classes", "3"], r"model.overrides.num_classes is set from the data"),
        (
            ["--objective.name", "flow_matching", "--eval.sampler", "ddim"],
            r"eval.sampler 'ddim' cannot sample a flow-matching",
        ),
        (["--objective.name", "flow_matching", "--objective.snr_gamma", "5"], r"snr_gamma .* DDPM family only"),
        (
            ["--objective.name", "flow_matching", "--eval.sampler", "UniPCMultistepScheduler"],
            r"eval.sampler 'UniPCMultistepScheduler' cannot sample a flow-matching model; use one of \['auto', "
            r"'flow_match_euler', .*'FlowMatchHeunDiscreteScheduler'\]",
        ),
        (
            ["--eval.sampler", "FlowMatchHeunDiscreteScheduler"],
            r"eval.sampler 'FlowMatchHeunDiscreteScheduler' cannot sample a DDPM-family model; use one of .*'DPMSolver",
        ),
        (["--eval.sampler", "LCMScheduler"], r"eval.sampler must be one of \['auto', 'ddpm', .*'UniPCMultistep"),
        (["--eval.fid_n", "1"], r"eval.fid_n must be 0 \(no metrics\) or >= 2"),
        (["--hub.push_to_hub", "true"], r"hub.hub_model_id is not set"),
        (["--model.vae", "/no/such/vae"], r"model.vae folder '/no/such/vae' does not exist; train it first"),
        (["--checkpoint.resume_from_checkpoint", "/no/such"], r"neither 'latest' nor a checkpoint folder"),
        (
            ["--config", "configs/nope.yaml"],
            r"Recipe file 'configs/nope.yaml' not found; available recipes: \[.*configs/quickstart.yaml",
        ),
        (["--train.batch_size"], r"Missing value after '--train.batch_size'"),
        (["train.batch_size", "4"], r"Expected '--key value' arguments"),
        (["--train", "4"], r"train must be a mapping of keys, got 4"),
        (["--train.seed", "-1"], r"train.seed must be >= 0, got -1"),
        (["--eval.seed", str(2**32)], r"eval.seed must be <= 4294967295"),
        (["--train.batch_size", "[8"], r"The value '\[8' of --train.batch_size is not valid YAML at line 1, column 3"),
        (["--model.overrides", "{a: 1, a: 2}"], r"--model.overrides: Duplicate key 'a'"),
        (["--data.unreadable_images", "ignore"], r"data.unreadable_images must be one of \['stop', 'skip'\]"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_ddpm_settings_in_a_flow_run_are_named_in_a_warning_and_plain_flow_recipes_stay_silent(recwarn):
    # The README's quickstart_flow: a v-prediction recipe without clipping turned into rectified flow.
    with pytest.warns(UserWarning) as caught:
        config = load_config(
            ["--config", "configs/quickstart.yaml", "--objective.name", "flow_matching"]
            + ["--eval.sampler", "flow_match_euler"]
        )
    assert config.objective.name == "flow_matching"
    message = str(caught[0].message)
    assert (
        "objective.prediction_type='v_prediction', objective.clip_sample=False: DDPM-family settings, ignored"
        in message
    )
    with pytest.warns(UserWarning, match=r"^objective.beta_schedule='squaredcos_cap_v2': DDPM-family"):
        load_config(["--objective.name", "flow_matching", "--objective.beta_schedule", "squaredcos_cap_v2"])
    recwarn.clear()
    for recipe in ["mnist_mmdit_flow", "study/mmdit_flow", "study/dit_gqa_kv2_flow"]:
        assert load_config(["--config", f"configs/{recipe}.yaml"]).objective.name == "flow_matching"
    load_config(["--config", "configs/quickstart.yaml", "--objective.prediction_type", "epsilon"])
    assert not [w for w in recwarn if "DDPM-family" in str(w.message)]


def test_recipe_with_unknown_section_key_is_refused(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  batch_size: 8\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['train.epochs'\]"):
        load_config(["--config", str(recipe)])
    recipe.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(["--config", str(recipe)])


def test_duplicate_keys_and_malformed_yaml_in_a_recipe_are_refused_with_the_line(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("train:\n  batch_size: 8\n  seed: 1\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml': Duplicate key 'batch_size' at line 4 \(first at line 2\)"):
        load_config(["--config", str(recipe)])
    recipe.write_text("train: [\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"dup.yaml' is not valid YAML at line 3, column 1: expected ',' or ']'"):
        load_config(["--config", str(recipe)])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(["--config", str(RECIPES_DIR / "mnist_mmdit_flow.yaml"), "--train.max_steps", "7"])
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == to_dict(config)
    assert from_dict(Config, saved) == config
    # The saved file is itself a valid recipe.
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == config
    assert not [p for p in Path(tmp_path).iterdir() if p.name != "config.yaml"]  # no temporary file left


def leaf_keys(cls, prefix=""):
    """The dotted keys a user can set in dataclass config `cls`."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        nested = dataclasses.is_dataclass(hints[f.name])
        keys += leaf_keys(hints[f.name], f"{prefix}{f.name}.") if nested else [prefix + f.name]
    return keys


@pytest.mark.parametrize("command", ["training.train", "training.train_lora"])
def test_help_describes_every_key_of_both_commands(command, capsys):
    import importlib

    module = importlib.import_module(command)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {}
    for i, line in enumerate(lines):
        if line.startswith("  --"):
            shown[line.split()[0][2:]] = lines[i + 1] if i + 1 < len(lines) else ""
    cls = Config if command == "training.train" else module.LoraTrainingConfig
    assert sorted(shown) == sorted(leaf_keys(cls)) and len(shown) >= 60
    undescribed = [
        key for key, description in shown.items() if not description.startswith("      ") or not description.strip()
    ]
    assert not undescribed, f"keys without a description in --help: {undescribed}"


def test_help_lists_every_key_with_its_default_and_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--model.architecture (str, default 'unet') one of ['unet', 'dit', 'mmdit']" in text
    assert "--train.batch_size" in text and "--checkpoint.resume_from_checkpoint" in text


def test_every_accelerate_tracker_is_accepted_when_installed_and_refused_with_the_package_name_when_not():
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    from training.config import TRACKERS

    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"} | {"none"}
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    assert "tensorboard" in installed  # a dependency of the project
    for tracker in TRACKERS:
        if tracker == "none" or tracker in installed:
            load_config(["--train.report_to", tracker])
        else:
            with pytest.raises(ConfigError, match=rf"the {tracker} package is not installed \(pip install {tracker}\)"):
                load_config(["--train.report_to", tracker])


# diffusers' LMS, KDPM2 and DEIS schedulers call numpy on torch tensors in ways numpy 2 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")
@pytest.mark.parametrize(
    "sampler",
    [name for names in SAMPLER_FAMILIES.values() for name in names],
)
def test_every_listed_sampler_samples_a_model_of_its_family(sampler):
    """Each sampler a recipe may name (ours and diffusers') builds from the training noise schedule and runs our
    pipeline loop: finite images, and the pipeline records that scheduler."""
    import torch
    from pipeline_helpers import tiny_pipeline

    from training.setup import build_noise_scheduler, build_sampling_scheduler

    family = sampler_family(sampler)
    argv = ["--objective.name", family, "--eval.sampler", sampler]
    if family == "diffusion":
        argv += ["--objective.prediction_type", "epsilon"]
    config = load_config(argv)
    scheduler = build_sampling_scheduler(config.eval.sampler, build_noise_scheduler(config.objective))
    expected = {"ddpm": "ScratchDDPMScheduler", "ddim": "ScratchDDIMScheduler"}
    expected["flow_match_euler"] = "ScratchFlowMatchEulerScheduler"
    assert type(scheduler).__name__ == expected.get(sampler, sampler)
    pipe = tiny_pipeline("dit" if family == "flow_matching" else "unet")
    pipe.scheduler = scheduler
    images = pipe(class_labels=[1, 2], num_inference_steps=4, guidance_scale=2.0, output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert type(pipe.scheduler).__name__ == type(scheduler).__name__
