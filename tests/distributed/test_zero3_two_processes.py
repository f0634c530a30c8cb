"""Real 2-process DeepSpeed launches on CPU: SFT -> RM -> PPO under ZeRO-3, SFT under ZeRO-2."""
from __future__ import annotations

import json
import math
import subprocess

import pytest

from conftest import DEEPSPEED, DEMO, ENV, GAE_DEMO, PER_PROCESS, ROOT, manifest, ok, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SMALL = ["sft.epochs=1", "reward.epochs=1", "reward.stats_samples=64", "ppo.total_episodes=256",
         "ppo.rollout_batch_size=8", "ppo.save_every=2", "eval.num_prompts=32", *PER_PROCESS]


def _pipeline(d, *extra: str) -> subprocess.CompletedProcess:
    """`NUM_GPUS=2 bash launch/pipeline.sh demo.yaml ...` as a user runs it."""
    cmd = ["bash", str(ROOT / "launch" / "pipeline.sh"), str(DEMO), f"artifact_dir={d}", "deepspeed.zero_stage=3",
           *SMALL, *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, "NUM_GPUS": "2", "MASTER_PORT": "29622"}, capture_output=True,
                          text=True, timeout=2400)


def test_zero3_pipeline_two_processes(tmp_path):
    d = tmp_path / "z3"
    proc = _pipeline(d)
    ok(proc)
    assert "report:" in proc.stdout
    sft = manifest(d, "sft")
    assert sft["status"] == "complete" and sft["config"]["deepspeed"]["zero_stage"] == 3
    assert sft["metrics"]["eval_loss"] < 0.7 * sft["metrics"]["eval_loss_initial"]
    assert (d / "sft" / "model.safetensors").stat().st_size > 100_000
    rm = manifest(d, "reward")
    assert rm["metrics"]["eval_accuracy"] > 0.6 and "reward_stats" in rm
    assert (d / "reward" / "model.safetensors").stat().st_size > 100_000
    ppo = manifest(d, "ppo")
    assert ppo["metrics"]["updates"] == 4  # 256 responses / (8 prompts x 4 samples x 2 processes)
    rows = [json.loads(ln) for ln in (d / "metrics" / "ppo.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "objective/kl" in r]
    assert all(math.isfinite(r["objective/kl"]) for r in updates) and len(updates) == 4
    # the two ranks drew different prompts: 8 each, 16 distinct ones per update over both
    assert [r["data/distinct_prompts"] for r in updates] == [16] * 4
    curve = ppo["metrics"]["eval_curve"]  # held-out evaluations, update 0 (the SFT policy) first
    assert curve[0]["update"] == 0 and curve[-1]["update"] == 4
    assert curve[-1]["rm_score"] > curve[0]["rm_score"], curve  # PPO raised the reward on held-out prompts
    assert (d / "ppo" / "samples.jsonl").is_file() and not (d / "ppo" / "critic").exists()  # rloo: no critic
    assert "2 process(es), ZeRO-3" in (d / "logs" / "ppo.log").read_text()

    # the same command again: every stage is up to date and skipped
    created = {s: manifest(d, s)["created"] for s in ("sft", "reward", "ppo")}
    again = _pipeline(d)
    ok(again)
    assert again.stdout.count("up to date: skipping") == 3, again.stdout
    assert {s: manifest(d, s)["created"] for s in created} == created

    # force=true reruns all three; PPO now with the critic (gae, 32 prompts per rank and rollout: 4 updates)
    forced = _pipeline(d, "force=true", *GAE_DEMO)
    ok(forced)
    assert "skipping" not in forced.stdout
    for s in created:
        assert manifest(d, s)["status"] == "complete" and manifest(d, s)["created"] != created[s]
    assert manifest(d, "ppo")["metrics"]["updates"] == 4 and (d / "ppo" / "critic" / "model.safetensors").is_file()
    assert "full critic" in (d / "logs" / "ppo.log").read_text()


def test_sft_zero2_two_processes(tmp_path):
    d = tmp_path / "z2"
    ok(run_stage("sft.py", f"artifact_dir={d}", "deepspeed.zero_stage=2", "sft.epochs=1", deepspeed_procs=2,
                 port=29633, timeout=900))
    m = manifest(d, "sft")
    assert m["status"] == "complete" and m["metrics"]["eval_loss"] < 0.7 * m["metrics"]["eval_loss_initial"]


def test_lora_in_every_stage_zero3_two_processes_llama3(family_checkpoints, tmp_path):
    """LoRA SFT, RM and PPO of a Llama-3-style checkpoint sharded over 2 ranks: every publish
    gathers the partitions collectively and merges the adapter into plain weights."""
    from conftest import check_published, run_pipeline, small_overrides

    d = tmp_path / "run"
    proc = run_pipeline(d, small_overrides(tmp_path, family_checkpoints["llama3"], "rloo") + [
        "sft.lora=true", "reward.lora=true", "ppo.lora=true", "deepspeed.zero_stage=3"], port=29644, procs=2)
    ok(proc)
    check_published(d)  # critic-free: no critic anywhere
    log = (d / "logs" / "ppo.log").read_text()
    assert "2 process(es), ZeRO-3" in log and "LoRA actor, reference = its base; no critic" in log, log[-2000:]
    assert manifest(d, "ppo")["metrics"]["updates"] == 1  # 16 responses / (4 prompts x 2 samples x 2 processes)


def test_zero3_generation_fetches_weights_once(family_checkpoints):
    """Gathered for generation the engine's per-module hooks are off: no parameter fetch per decode
    step (before, every step re-gathered every module), and they are back for training. With
    deepspeed.zero3_gather_for_generation=false the ranks generate from sharded weights, in step,
    and draw the same tokens."""
    proc = subprocess.run([*DEEPSPEED, "--num_gpus", "2", "--master_port", "29655",
                           str(ROOT / "tests" / "distributed" / "zero3_fetch_probe.py"), str(family_checkpoints["llama3"])],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    ok(proc)
    line = [x for x in proc.stdout.splitlines() if x.startswith('{"fetches_during_generate"')]
    assert line, proc.stdout[-3000:]
    result = json.loads(line[-1])
    assert result["decode_steps"] > 1
    assert result["fetches_during_generate"] == 0, result
    assert result["fetches_in_train_step"] > 0 and math.isfinite(result["loss"]), result
    # the documented switch for policies too big for one device: per-layer fetches, same samples
    assert result["synced_without_gathering"] and result["fetches_without_gathering"] > result["decode_steps"], result
    assert result["without_gathering_same_samples"], result
