"""The config tree: every option and every experiment sweep point composes and validates; bad configurations are
rejected with a message naming the problem, before any model is loaded and before any run directory exists."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from conftest import TINY_OVERRIDES, compose_config, make_data_root
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all
from sempa_exp.config.schema import ConfigError, validate
from sempa_exp.pipelines import training

CONF = Path(CONF_DIR)
NOT_OPTION_GROUPS = {"experiment", "hydra"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _group_options() -> list[tuple[str, str]]:
    groups = [p.name for p in CONF.iterdir() if p.is_dir() and p.name not in NOT_OPTION_GROUPS]
    groups += [f"hydra/{p.name}" for p in (CONF / "hydra").iterdir() if p.is_dir()] if (CONF / "hydra").is_dir() else []
    return [(g, o) for g in sorted(groups) for o in _options(g)]


def _sweep_points(params: dict) -> list[list[str]]:
    """Every combination of an experiment's sweeper params, parsed by Hydra's own override grammar."""
    parser = OverridesParser.create()
    axes = []
    for key, values in params.items():
        override = parser.parse_overrides([f"{key}={values}"])[0]
        axes.append([f"{key}={v}" for v in override.sweep_string_iterator()] if override.is_sweep_override()
                    else [f"{key}={values}"])
    return [list(point) for point in itertools.product(*axes)]


def test_the_tree_has_the_expected_groups():
    groups = {g for g, _ in _group_options()}
    assert {"backbone", "template", "embed", "data", "lora", "trainer", "objective", "eval", "logger"} <= groups
    assert _options("template") == ["p1", "p2", "p3", "p4", "p5"]
    assert _options("objective") == ["autoregembed_align", "autoregembed_compress", "contrastive", "listwise", "sempa",
                                     "sempa_laptop"]
    assert _options("trainer") == ["cpu", "sempa"]  # the recipe only: objectives are their own group


# Options that preset fields of another option keep its name (an objective's name is the method the results record).
PRESETS = {("objective", "sempa_laptop"): "sempa"}
# Options that by design need a value only the user can give (their YAML comment says which).
USER_SUPPLIED = {("method", "checkpoint"): ["method.path=/runs/some_group/some_run"],
                 ("objective", "autoregembed_align"): ["objective.init_from=/runs/stage1/some_run"]}


def _defaults_groups(primary: str) -> set[str]:
    defaults = OmegaConf.load(CONF / f"{primary}.yaml").get("defaults", [])
    return {k.removeprefix("override ") for d in defaults if OmegaConf.is_dict(d) or isinstance(d, dict) for k in d}


def _primary_for(group: str) -> tuple[str, str]:
    """(primary config, override prefix): the entry config whose defaults list holds the group (config.yaml for
    training, evaluate.yaml adds `method`); a group in none of them (e.g. cluster) is appended with '+'."""
    if group.startswith("hydra/") or group in _defaults_groups("config"):
        return "config", ""
    for primary in sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "config"):
        if group in _defaults_groups(primary):
            return primary, ""
    return "config", "+"


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_group_option_composes_and_validates(group, option, data_root):
    from hydra import compose, initialize_config_dir

    primary, prefix = _primary_for(group)
    overrides = [f"{prefix}{group}={option}", *USER_SUPPLIED.get((group, option), []), f"paths.data_dir={data_root}"]
    register_all()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=primary, overrides=overrides)
    if group in cfg:  # global-package options (hydra/launcher, cluster) have no node of their own
        assert cfg[group].name == PRESETS.get((group, option), option)
    validate(OmegaConf.to_object(cfg))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_and_sweep_point_composes_and_validates(experiment, data_root):
    base = compose_config([f"+experiment={experiment}"], data_root)
    validate(OmegaConf.to_object(base))
    assert base.run.group == experiment
    from hydra import compose, initialize_config_dir

    register_all()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = hydra_cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params) if params else {}
    points = _sweep_points(params)
    assert points
    for point in points:
        cfg = compose_config([f"+experiment={experiment}", *point], data_root)
        validate(OmegaConf.to_object(cfg))


# ---------------------------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(("override", "group"), [
    ("template=p9", "template"), ("backbone=gpt5", "backbone"), ("trainer=ppo", "trainer"),
    ("trainer=contrastive", "trainer"), ("objective=dpo", "objective"), ("+experiment=nope", "experiment")])
def test_unknown_option_names_the_valid_ones(override, group):
    with pytest.raises(MissingConfigException) as err:
        compose_config([override])
    message = str(err.value)
    assert f"Could not find '{group}/{override.split('=')[1]}'" in message
    for valid in _options(group):
        assert f"\t{valid}\n" in message


@pytest.mark.parametrize(("override", "key", "kind"), [
    ("trainer.learning_rate=fast", "trainer.learning_rate", "Float"),
    ("objective.beta=high", "objective.beta", "Float"),
    ("objective.beta=[0.1]", "objective.beta", "Float"),
    ("objective=contrastive objective.temperature=cold", "objective.temperature", "Float"),
    ("data.size=many", "data.size", "Integer"),
    ("lora.r=eight", "lora.r", "Integer"),
])
def test_wrong_type_is_a_validation_error_naming_the_key(override, key, kind):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(override.split())
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError)
    assert f"full_key: {key}" in str(cause)
    assert f"could not be converted to {kind}" in str(cause)


@pytest.mark.parametrize(("override", "key", "valid"), [
    ("embed.pooling=max", "embed.pooling", "[last, mean]"),
    ("backbone.source=ftp", "backbone.source", "[hub, gguf_package, local, tiny]"),
    ("backbone.dtype=fp8", "backbone.dtype", "[float32, bfloat16, float16]"),
    ("eval.at_start=[bleu]", "eval.at_start[0]", "[sts, stsb_dev, geometry, ppl, gar]"),
    ("eval.gar_match=fuzzy", "eval.gar_match", "[text, id]"),
    ("data.source=ftp", "data.source", "[auto, local, hub]"),
    ("logger.mode=loud", "logger.mode", "[auto, online, offline, disabled]"),
])
def test_a_value_outside_its_choices_is_rejected_at_composition_naming_the_valid_ones(override, key, valid):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    cause = str(err.value.__cause__)
    assert f"Invalid value '{override.split('=')[1].strip('[]')}', expected one of {valid}" in cause
    assert f"full_key: {key}" in cause


# a misspelt key, and keys of the old layout (the objective is its own group; DPO's keys live under objective.)
@pytest.mark.parametrize("override", ["trainer.learnig_rate=1e-3", "trainer.method=contrastive", "trainer.beta=0.1",
                                      "trainer.temperature=0.05", "objective.temperature=0.05"])
def test_misspelt_or_moved_key_is_rejected(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].replace(".", r"\.")):
        compose_config([override])


@pytest.fixture
def sts_only_root(tmp_path) -> Path:
    root = make_data_root(tmp_path / "data", nli_rows=8)
    (root / "nli" / "nli_triplets_devsets_subset.csv.gz").unlink()
    return root


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.size=0"], "data.size must be > 0, got 0"),
    (["data.size=-5"], "data.size must be > 0, got -5"),
    (["data.size=161"], "data.size=161 is larger than the 160 usable triplets"),
    (["trainer.checkpoint_every_samples=64"],
     "trainer.checkpoint_every_samples=64 never fires: the run has 4 optimizer steps"),
    (["lora.r=0"], "lora.r must be > 0, got 0"),
    (["lora.r=-8"], "lora.r must be > 0, got -8"),
    (["lora.dropout=1.0"], "lora.dropout must be in [0, 1)"),
    (["trainer.learning_rate=0"], "trainer.learning_rate must be > 0"),
    (["objective.beta=-0.1"], "objective.beta must be > 0"),
    (["objective=contrastive", "objective.temperature=0"], "objective.temperature must be > 0"),
    (["template.text=no placeholder"], "must contain '{s}' exactly once"),
    (["paths.data_dir=/nonexistent/sempa"], "paths.data_dir does not exist: /nonexistent/sempa"),
    (["paths.data_dir=null"], "paths.data_dir is not set"),
])
def test_bad_config_is_rejected_before_model_and_run_dir(overrides, message, data_root, tmp_path, no_model_load):
    # the data root goes first so that the test's own paths.data_dir wins
    cfg = compose_config([f"paths.data_dir={data_root}", *TINY_OVERRIDES, f"paths.runs_dir={tmp_path / 'runs'}",
                          *overrides])
    with pytest.raises(ConfigError) as err:
        training.run(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_missing_nli_file_is_rejected(sts_only_root, tmp_path, no_model_load):
    cfg = compose_config([*TINY_OVERRIDES, f"paths.runs_dir={tmp_path / 'runs'}", "data.source=local"], sts_only_root)
    with pytest.raises(ConfigError, match="NLI data file not found: .*nli_triplets_devsets_subset.csv.gz"):
        training.run(cfg)
    assert not (tmp_path / "runs").exists()


def test_missing_sts_file_is_rejected(data_root, tmp_path, no_model_load):
    root = make_data_root(tmp_path / "data", nli_rows=40)
    (root / "sts" / "STSBenchmark" / "dev.tsv").unlink()
    cfg = compose_config([*TINY_OVERRIDES, f"paths.runs_dir={tmp_path / 'runs'}"], root)
    with pytest.raises(ConfigError, match="STS file not found: .*STSBenchmark/dev.tsv"):
        training.run(cfg)
    assert not (tmp_path / "runs").exists()


def test_command_line_reports_a_bad_config_and_creates_no_run_dir(data_root, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "sempa_exp.train", *TINY_OVERRIDES, "data.size=0", f"paths.data_dir={data_root}",
         f"paths.runs_dir={runs}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "data.size must be > 0, got 0" in proc.stderr + proc.stdout
    # Hydra keeps its own log folder under <group>/.hydra; no run directory exists
    group_dir = runs / "default"
    assert not group_dir.exists() or [p.name for p in group_dir.iterdir()] == [".hydra"]
