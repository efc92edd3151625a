"""The typed run config: YAML files, presets and dotted overrides in, a frozen RunConfig out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError, RunConfig, load_config, save_config
from rollout.generation import SamplingConfig
from tests.engine.runs import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml")) + sorted((REPO_ROOT / "configs" / "tiny").glob("*.yaml"))
PRESETS = sorted((REPO_ROOT / "configs" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_config_loads_and_names_its_launch_command(path):
    cfg = load_config(path)
    assert cfg.batch.accumulation_steps(1) >= 1
    header = path.read_text().split("\n\n")[0]
    assert f"engine/train.py --config {path.relative_to(REPO_ROOT)}" in header


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_layer_over_a_base_config(preset):
    base = load_config(REPO_ROOT / "configs" / "dpo.yaml")
    cfg = load_config([REPO_ROOT / "configs" / "dpo.yaml", preset])
    assert cfg.model.name_or_path == base.model.name_or_path
    assert cfg != base


def test_overrides_are_yaml_scalars_and_reach_nested_sections(tmp_path):
    cfg = load_config(
        REPO_ROOT / "configs" / "tiny" / "dpo.yaml",
        ["optim.lr=1e-5", "max_steps=7", "model.lora.enabled=true", "model.lora.target_modules=[q_proj, v_proj]",
         "optim.betas=[0.9, 0.95]", "objective.beta=0.25", "reward_model.name_or_path=tiny", "eval.max_batches=null"],
    )
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # PyYAML reads "1e-5" as a string
    assert cfg.max_steps == 7
    assert cfg.model.lora.enabled is True and cfg.model.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.optim.betas == (0.9, 0.95)
    assert dict(cfg.objective.kwargs) == {"beta": 0.25}
    assert cfg.reward_model.name_or_path == "tiny" and cfg.reward_model.lora.enabled is False
    assert cfg.eval.max_batches is None


def test_a_new_objective_name_drops_the_old_objectives_arguments():
    orpo = REPO_ROOT / "configs" / "tiny" / "orpo.yaml"
    assert dict(load_config(orpo, ["objective.name=dpo", "objective.beta=0.2"]).objective.kwargs) == {"beta": 0.2}
    assert dict(load_config(orpo, ["objective.name=orpo"]).objective.kwargs) == {"lam": 0.5}


def test_the_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "dpo.yaml", ["optim.lr=3e-6", "objective.label_smoothing=0.1"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg


def test_the_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.objective.kwargs["beta"] = 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.alpah=8"], "unknown key 'model.lora.alpah'; did you mean 'model.lora.alpha'?"),
        (["model.lora.rank=8"], "(valid keys here: enabled, r, alpha, dropout, target_modules)"),
        (["max_step=8"], "did you mean 'max_steps'?"),
        (["mixed_precision=no"], "YAML reads no/yes/off/on as booleans"),
        (["max_steps=0"], "max_steps must be positive"),
        (["eval.max_batches=0"], "eval.max_batches must be positive"),
        (["data.share_prompt_row_tokens=-1"], "data.share_prompt_row_tokens must be 0 (one pair per row) or more"),
        (["ppo.rollout_logprobs=cached"], "ppo.rollout_logprobs='cached' is not one of"),
        (["optim.betas=[0.9]"], "optim.betas must have 2 items"),
        (["reference.mode=frozen"], "reference.mode='frozen' is not one of"),
        (["optim"], "must look like section.key=value"),
    ],
)
def test_mistakes_name_the_key_to_change(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO_ROOT / "configs" / "tiny" / "sft.yaml", overrides)
    assert message in str(error.value)


def test_a_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config(Path("nope.yaml"))


@pytest.mark.parametrize(
    "global_size, micro, processes, accumulation",
    [(64, 4, 1, 16), (64, 4, 8, 2), (8, 8, 1, 1), (8, 1, 1, 8)],
)
def test_accumulation_is_derived_from_the_global_batch(global_size, micro, processes, accumulation):
    cfg = load_config([], [f"batch.global_batch_size={global_size}", f"batch.micro_batch_size={micro}"])
    assert cfg.batch.accumulation_steps(processes) == accumulation


def test_an_impossible_batch_split_names_the_sizes():
    cfg = load_config([], ["batch.global_batch_size=64", "batch.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="not a multiple of batch.micro_batch_size=4 x 3 process"):
        cfg.batch.accumulation_steps(3)


def test_rollout_section_reaches_the_typed_config_and_bad_values_are_config_errors():
    ppo = REPO_ROOT / "configs" / "ppo.yaml"
    cfg = load_config(ppo, ["rollout.backend=continuous", "rollout.memory_fraction=0.2", "rollout.static_cache=true"])
    assert (cfg.rollout.backend, cfg.rollout.memory_fraction, cfg.rollout.static_cache) == ("continuous", 0.2, True)
    assert load_config(ppo).rollout.backend == "generate"
    with pytest.raises(ConfigError, match="rollout.backend='vllm' is not one of"):
        load_config(ppo, ["rollout.backend=vllm"])
def test_ppo_sampling_is_every_sampling_field_of_the_config():
    """The rollout samples with what `ppo:` says, every field of it (the benchmark's copy once lost top_k)."""
    cfg = load_config(REPO_ROOT / "configs" / "tiny" / "ppo.yaml",
                      ["ppo.max_new_tokens=12", "ppo.min_new_tokens=2", "ppo.temperature=0.7", "ppo.top_k=5",
                       "ppo.top_p=0.9", "ppo.response_length=[3, 9]", "ppo.rollout_micro_batch_size=3"])
    assert cfg.ppo.sampling() == SamplingConfig(max_new_tokens=12, min_new_tokens=2, temperature=0.7, top_k=5,
                                                top_p=0.9, response_length=(3, 9), micro_batch_size=3)
    with pytest.raises(ConfigError, match=r"response_length \(3, 20\) must lie within"):
        load_config(REPO_ROOT / "configs" / "tiny" / "ppo.yaml", ["ppo.max_new_tokens=12", "ppo.response_length=[3, 20]"])


def test_each_named_choice_has_one_definition():
    """The KL estimators, reference modes, log-prob reductions and data families are the owners' own tuples."""
    from benchmarks import workloads
    from engine import ppo_config, reference
    from losses import kl, logprobs, registry

    assert ppo_config.KL_ESTIMATORS is kl.KL_ESTIMATORS
    assert reference.LOGPS_REDUCTIONS is logprobs.LOGPS_REDUCTIONS is registry.LOGPS_REDUCTIONS
    assert not hasattr(reference, "MODES")
    assert workloads.FAMILY == {"sft": "sft", "reward": "preference", "dpo": "preference", "orpo": "preference",
                                "ppo": "prompt", "grpo": "prompt", "rloo": "prompt"}  # read from engine.families through each objective's family


def _leaves(tree: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a nested mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("flag", ["--print-config", "--help"])
def test_print_config_and_help_list_every_key_with_its_default_and_doc(flag, capsys):
    from engine import train
    from engine.config import to_dict

    if flag == "--help":
        with pytest.raises(SystemExit) as stop:
            train.main([flag])
        assert stop.value.code == 0
    else:
        assert train.main([flag]) is None
    lines = capsys.readouterr().out.splitlines()
    keys = _leaves(to_dict(RunConfig()))
    assert len(keys) > 100
    for key, value in keys.items():
        shown = yaml.safe_load(next(line for line in lines if line.startswith(key + ": ")).partition(": ")[2])
        assert shown == (list(value) if isinstance(value, tuple) else value), key
    # each field's own doc, indented under its key; an inherited sampling field's doc under ppo.
    for key, doc in [("optim.max_grad_norm: 1.0", "Clip the global gradient norm"),
                     ("data.max_prompt_length: 256", "Tokens per prompt"),
                     ("ppo.top_k: 0", "Keep only the k most likely tokens")]:
        assert lines[lines.index(key) + 1].strip().startswith(doc)


def test_print_config_shows_the_configured_values_and_the_objectives_arguments(capsys):
    from engine import train

    train.main(["--print-config", "--config", str(REPO_ROOT / "configs" / "tiny" / "orpo.yaml"), "optim.lr=2e-4"])
    lines = capsys.readouterr().out.splitlines()
    assert "optim.lr: 0.0002" in lines and "objective.name: orpo" in lines and "objective.lam: 0.5" in lines
    assert lines[lines.index("objective.lam: 0.5") + 1].strip().startswith("weight of the odds-ratio term")
    assert not any(line.startswith("objective.sft_mask") for line in lines)  # a tensor, not a config value
