"""configs/accelerate/ load in the installed accelerate: known keys only, and the launcher turns them into the
plugin settings they claim (sharding, wrapping by decoder layer, sharded state dicts, ZeRO stage, offload)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {
    "single_gpu.yaml": DistributedType.NO,
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "fsdp1.yaml": DistributedType.FSDP,
    "zero2.yaml": DistributedType.DEEPSPEED,
    "zero3_offload.yaml": DistributedType.DEEPSPEED,
    "cpu_2proc.yaml": DistributedType.MULTI_GPU,
}


def launch_args(name: str):
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "engine/train.py"])
    return _validate_launch_command(args)[0]


def test_every_config_is_listed_and_loads():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, kind in EXPECTED.items():
        config = load_config_from_file(str(CONFIGS / name))  # unknown keys raise here
        assert config.distributed_type == kind, name
        text = (CONFIGS / name).read_text()
        assert "accelerate launch --config_file configs/accelerate/" + name in text.replace("\\\n", "")


def test_section_keys_are_launcher_options():
    options = {action.dest for action in launch_command_parser()._actions}
    for name in EXPECTED:
        raw = yaml.safe_load((CONFIGS / name).read_text())
        for section in ("fsdp_config", "deepspeed_config"):
            unknown = set(raw.get(section, {})) - options
            assert not unknown, f"{name}: {section} keys unknown to accelerate launch: {unknown}"


@pytest.mark.parametrize("name, version", [("fsdp.yaml", 2), ("fsdp1.yaml", 1)])
def test_fsdp_configs_shard_by_decoder_layer(name, version, monkeypatch):
    env = prepare_multi_gpu_env(launch_args(name))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # sync_module_states asks for a CUDA device at plugin construction; the rest is checked without one
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == version
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    if version == 2:
        assert plugin.reshard_after_forward is True  # FULL_SHARD
    else:
        assert plugin.sharding_strategy.name == "FULL_SHARD"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


@pytest.mark.parametrize("name, stage, offload", [("zero2.yaml", 2, "none"), ("zero3_offload.yaml", 3, "cpu")])
def test_deepspeed_configs(name, stage, offload):
    args = launch_args(name)
    args.deepspeed_fields_from_accelerate_config = ""
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == offload
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == offload
    # accumulation and clipping are left to the run config (DeepSpeed's "auto")
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env


def test_cpu_config_starts_two_torchrun_processes():
    args = launch_args("cpu_2proc.yaml")
    # the torchrun launcher (not the one-process simple launcher that --cpu picks)
    assert args.multi_gpu and not args.cpu and args.num_processes == 2


def test_cpu_flag_alone_gives_one_process():
    """Why cpu_2proc.yaml goes through torchrun: with --cpu, accelerate's simple launcher runs the script once
    (its multi-CPU path needs mpirun and a hostfile), whatever --num_processes says."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--cpu", "--num_processes", "2", "engine/train.py"])
    args = _validate_launch_command(args)[0]
    assert args.cpu and not args.multi_gpu
    command, env = prepare_simple_launcher_cmd_env(args)
    assert command[1:] == ["engine/train.py"]  # python engine/train.py: one process
    assert env["ACCELERATE_USE_CPU"] == "True"
