"""QLoRA in every stage, as a user runs it: `rlhf pipeline ... model.quantization=4bit` with LoRA in
SFT, the reward model and PPO, on tiny checkpoints of real families (GPT-2's Conv1D layers among
them) under DeepSpeed ZeRO-2 and, on 2 processes, ZeRO-3 with every parameter partitioned.

Each published stage must load as a plain 16-bit checkpoint with plain AutoModelFor... (no
quantization settings, no packed weights), PPO must change the policy, and a PPO run killed while
saving its second checkpoint must resume from the first.
"""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conftest import check_published, manifest, ok, run_pipeline, small_overrides, zero3_all_partitioned

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

QLORA = ["sft.lora=true", "reward.lora=true", "ppo.lora=true", "model.quantization=4bit"]


def _check_plain_16bit(d) -> None:
    check_published(d)  # plain AutoModelFor... loads, no adapter keys, the SFT vocabulary, PPO changed the policy
    with_critic = (d / "ppo" / "critic").exists()
    for stage in ("sft", "reward", "ppo", *(("ppo/critic",) if with_critic else ())):
        cfg = json.loads((d / stage / "config.json").read_text())
        assert "quantization_config" not in cfg, stage
        with safe_open(str(d / stage / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
            assert not [k for k in keys if "absmax" in k or "quant_" in k], (stage, keys[:5])
            assert {str(f.get_tensor(k).dtype) for k in keys} == {"torch.float32"}, stage
    for stage in ("sft", "reward", "ppo"):
        m = manifest(d, stage)
        assert m["model"]["lora"] == "merged"
        assert m["model"]["quantization"] == "4bit nf4, double quantization, compute float32", (stage, m["model"])


@pytest.mark.distributed
def test_qlora_gpt2_zero2_two_processes(family_checkpoints, tmp_path):
    d = tmp_path / "run"
    proc = run_pipeline(d, small_overrides(tmp_path, family_checkpoints["gpt2"], "gae") + QLORA + [
        "deepspeed.zero_stage=2", "ppo.total_episodes=32"], port=29861, procs=2)
    ok(proc)
    _check_plain_16bit(d)
    assert "base in 4bit nf4" in (d / "logs" / "sft.log").read_text()
    log = (d / "logs" / "ppo.log").read_text()
    assert "2 process(es), ZeRO-2" in log and "4-bit base weights: actor, critic" in log, log[-3000:]
    assert manifest(d, "ppo")["metrics"]["updates"] == 2


def test_qlora_llama3_zero2(family_checkpoints, tmp_path):
    d = tmp_path / "run"
    proc = run_pipeline(d, small_overrides(tmp_path, family_checkpoints["llama3"], "rloo") + QLORA + [
        "deepspeed.zero_stage=2"], port=29868)
    ok(proc)
    _check_plain_16bit(d)
    assert "4-bit base weights: actor" in (d / "logs" / "ppo.log").read_text()


@pytest.mark.distributed
def test_qlora_gpt2_zero3_two_processes_resumes(family_checkpoints, tmp_path):
    """Persistence threshold 0: even these tiny parameters are partitioned over the 2 ranks (with the
    default, DeepSpeed keeps small ones whole on every rank and ZeRO-3 would go untested). PPO is
    killed while saving its 2nd checkpoint (both ranks, SIGKILL) and the same command resumes it
    from the 1st: a 4-bit base goes through DeepSpeed's checkpoint and back."""
    d = tmp_path / "run"
    overrides = small_overrides(tmp_path, family_checkpoints["gpt2"], "gae") + QLORA + zero3_all_partitioned(tmp_path) + [
        "ppo.total_episodes=48", "ppo.save_every=1"]
    killed = run_pipeline(d, overrides, port=29875, procs=2, env={"RLHF_FAULT": "checkpoint:engines@2"})
    assert killed.returncode != 0 and "stage ppo failed" in killed.stderr, killed.stderr[-3000:]
    assert manifest(d, "sft")["status"] == "complete" and manifest(d, "reward")["status"] == "complete"
    resumed = run_pipeline(d, overrides, port=29876, procs=2)
    ok(resumed)
    assert resumed.stdout.count("up to date: skipping") == 2, resumed.stdout[-3000:]
    log = (d / "logs" / "ppo.log").read_text()
    assert "resuming from update 1" in log and "2 process(es), ZeRO-3" in log, log[-3000:]
    assert manifest(d, "ppo")["metrics"]["updates"] == 3
    _check_plain_16bit(d)
