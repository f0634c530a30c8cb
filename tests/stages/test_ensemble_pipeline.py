"""A reward-model ensemble through the whole pipeline, as a user runs it: `rlhf pipeline ...
reward.ensemble=3` on tiny checkpoints of real families, with LoRA in every stage, under ZeRO-3 on
2 processes with every parameter partitioned (and a kill and resume of PPO), and under ZeRO-2.

The reward artifact must load as a plain one-output model whose score is the members' mean, keep
the members' heads and statistics, pass the integrity check; PPO must read the members (the
ensemble's signals in its evaluations, the held-out member) and the guard's state must survive
the resume."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, check_published, manifest, ok, run_pipeline, small_overrides, zero3_all_partitioned

pytestmark = pytest.mark.slow

ENSEMBLE = ["reward.ensemble=3", "sft.lora=true", "reward.lora=true", "ppo.lora=true",
            "ppo.reward_aggregation=uncertainty", "eval.every=1"]


def _check_ensemble(d, k: int = 3) -> dict:
    check_published(d)  # plain AutoModelFor... loads, the SFT vocabulary, PPO changed the policy
    heads = load_file(str(d / "reward" / "reward_ensemble.safetensors"))
    score = {n: t for n, t in load_file(str(d / "reward" / "model.safetensors")).items() if n.endswith("score.weight")}
    (weight,) = score.values()
    assert heads["weight"].shape[0] == k and weight.shape[0] == 1
    torch.testing.assert_close(weight[0], heads["weight"].mean(0))  # the plain model scores the members' mean
    assert json.loads((d / "reward" / "config.json").read_text())["num_labels"] == 1
    rm = manifest(d, "reward")
    assert rm["model"]["ensemble"]["members"] == k and len(rm["reward_stats"]["members"]) == k
    assert len(rm["metrics"]["eval_member_accuracy"]) == k
    m = manifest(d, "ppo")["metrics"]
    for p in m["eval_curve"]:
        assert {"ensemble_mean", "ensemble_spread", "conservative_score", "held_out_member_score"} <= set(p), p
    assert m["guard_metric"] is None  # small random-init models: keep_best=last (small_overrides)
    status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--artifact-dir", str(d), "--verify"],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("complete") == 3, status.stdout
    return m


@pytest.mark.distributed
def test_ensemble_gpt2_zero3_two_processes_resumes(family_checkpoints, tmp_path):
    """GPT-2 (Conv1D), gae with a LoRA critic on the reward model: the ensemble is loaded as a model
    of its own beside it. Persistence threshold 0 partitions every parameter over the 2 ranks; PPO is
    killed while saving its 2nd checkpoint and the same command resumes it."""
    d = tmp_path / "run"
    overrides = small_overrides(tmp_path, family_checkpoints["gpt2"], "gae") + ENSEMBLE + zero3_all_partitioned(tmp_path) + [
        "ppo.total_episodes=48", "ppo.save_every=1"]
    killed = run_pipeline(d, overrides, port=29881, procs=2, env={"RLHF_FAULT": "checkpoint:engines@2"})
    assert killed.returncode != 0 and "stage ppo failed" in killed.stderr, killed.stderr[-3000:]
    resumed = run_pipeline(d, overrides, port=29882, procs=2)
    ok(resumed)
    log = (d / "logs" / "ppo.log").read_text()
    assert "resuming from update 1" in log and "2 process(es), ZeRO-3" in log, log[-3000:]
    assert "reward: 3-member ensemble, mean - 1 x spread of the normalised member scores, member 2 held out" in log
    m = _check_ensemble(d)
    assert m["updates"] == 3 and [p["update"] for p in m["eval_curve"]] == [0, 1, 2, 3]
    # the drift signals compare with update 0's samples, which the resumed run did not draw itself
    assert all("token_kl" in p for p in m["eval_curve"][1:])
    assert "ensemble" in (d / "logs" / "reward.log").read_text()


def test_ensemble_llama3_zero2_rloo(family_checkpoints, tmp_path):
    d = tmp_path / "run"
    ok(run_pipeline(d, small_overrides(tmp_path, family_checkpoints["llama3"], "rloo") + ENSEMBLE + [
        "deepspeed.zero_stage=2", "reward.ensemble=4", "ppo.reward_aggregation=worst"], port=29884))
    _check_ensemble(d, k=4)
    assert "reward: 4-member ensemble, minimum of the normalised member scores, member 3 held out" in (
        d / "logs" / "ppo.log").read_text()
