"""The seams of the PPO trainer: an advantage estimator that needs no critic gets none (no engine,
no checkpoint, no published critic/), and the rollout engine refuses to sample from stale weights.

The trainer runs in a subprocess (it starts a process group and DeepSpeed engines) on a tiny
random-init Llama with a tokenizer trained on the shipped demo data."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

pytestmark = pytest.mark.slow

PROBE = r"""
import copy, dataclasses, json, os, sys
from pathlib import Path
os.environ.update(MASTER_PORT=sys.argv[2])
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from rlhf import distributed, engines, models
from rlhf.artifacts import ArtifactError
from rlhf.config import load_config
from rlhf.data import load_prompts, load_sft, prompt_text, render_prompt
from rlhf.metric_names import PPO
from rlhf.ppo import core
from rlhf.ppo.layout import build_models
from rlhf.ppo.trainer import PPOTrainer, PromptStream

out_dir, lora = Path(sys.argv[1]), sys.argv[3]

SEEN = {}

def rewards_to_go(x):  # a critic-free stand-in: whitened per-token rewards-to-go, no returns
    SEEN["group"] = x.group.tolist()
    return core.masked_whiten(x.rewards.flip(1).cumsum(1).flip(1) * x.mask, x.mask), None

core.ADVANTAGE_ESTIMATORS["stub"] = core.AdvantageEstimator(rewards_to_go, needs_critic=False)
distributed.init_distributed()
cfg = load_config(str(Path("launch/configs/demo.yaml")), ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8",
                  "ppo.max_new_tokens=6", "ppo.ppo_epochs=1", "ppo.total_episodes=16", "ppo.forward_batch_size=8",
                  "ppo.samples_per_prompt=2", "ppo.temperature=2.0",
                  f"ppo.lora={lora}", "model.lora.target_modules=[q_proj,v_proj]"])
texts = [prompt_text(e.prompt) + e.completion for e in load_sft(cfg.sft.train_data).examples]
tok = models.train_scratch_tokenizer(texts, 300)
lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, bos_token_id=None, num_labels=1)
torch.manual_seed(0)
policy = LlamaForCausalLM(lcfg)
rm = LlamaForSequenceClassification(lcfg)

def trainer_for(estimator):
    ppo = dataclasses.replace(cfg.ppo, advantage_estimator=estimator)
    four = build_models(ppo, cfg.model.lora, "float32", load_policy=lambda: copy.deepcopy(policy),
                        load_reward=lambda: copy.deepcopy(rm), load_critic=lambda: copy.deepcopy(rm))
    return four, PPOTrainer(cfg=ppo, ds=cfg.deepspeed, dtype="float32", actor_model=four.actor, critic_model=four.critic,
                            reward_model=four.reward, ref_model=four.reference, tokenizer=tok,
                            reward_stats={"mean": 0.0, "std": 1.0})

four, trainer = trainer_for("stub")
prompts = load_prompts(cfg.ppo.train_prompts)
stream = PromptStream(prompts, 0, 0, 1, render=lambda p: render_prompt(tok, p, True))
before = {k: v.clone() for k, v in trainer.actor.module.state_dict().items()}
rollout_of = trainer.rollout
def spy(texts):  # what the rollout was asked for and what it returned, beside the groups the estimator saw
    r = rollout_of(texts)
    SEEN["texts"], SEEN["queries"], SEEN["responses"] = texts, r.query_ids.tolist(), r.response_ids.tolist()
    return r
trainer.rollout = spy
drawn = stream.next(4)
metrics = trainer.step(drawn)
changed = any(not torch.equal(before[k], v) for k, v in trainer.actor.module.state_dict().items())
trainer.save(out_dir / "ckpt", stream)
trainer.save_models(out_dir / "published")
# the engine follows the weights; one left behind is refused, not sampled from
synced = trainer.engine.version == trainer.weights_version
trainer.engine.sync_weights(trainer.weights_version - 1)
try:
    trainer.sample(["<|user|> give me birds\n<|assistant|>"], max_new_tokens=4)
    stale = "sampled"
except engines.StaleWeightsError as e:
    stale = str(e)
trainer.engine.sync_weights(trainer.weights_version)
# a run with a critic cannot resume the critic-free checkpoint
_, with_critic = trainer_for("gae")
try:
    with_critic.load(out_dir / "ckpt", PromptStream(prompts, 0, 0, 1))
    refused = ""
except ArtifactError as e:
    refused = str(e)
print(json.dumps({
    "four_critic": four.critic is None, "trainer_critic": trainer.critic is None,
    "value_metrics": sorted(k for k in metrics if k in (PPO.VALUE_LOSS, PPO.VALUE_CLIPFRAC)),
    "metrics_finite": all(v == v for v in metrics.values()), "changed": changed, "synced": synced, "stale": stale,
    "state_engines": json.loads((out_dir / "ckpt" / "state.json").read_text())["engines"], "refused": refused,
    "describe": trainer.describe(), "reference_is_base": trainer.reference_is_actor_base, "drawn": drawn,
    "seen": SEEN, "zero_std_groups": metrics.get(PPO.ZERO_STD_GROUPS),
    "published_keys": sorted(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(out_dir / "published" / "model.safetensors")))}))
"""


@pytest.mark.parametrize("lora, port", [("false", "29733"), ("true", "29734")])
def test_an_estimator_without_a_critic_builds_steps_saves_and_publishes_no_critic(tmp_path, lora, port):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), port, lora], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["four_critic"] and out["trainer_critic"], "no critic model is built"
    assert out["value_metrics"] == [], "no value loss is computed or logged"
    assert out["metrics_finite"] and out["changed"], "the update still trains the policy"
    ckpt, published = tmp_path / "ckpt", tmp_path / "published"
    assert (ckpt / "actor").is_dir() and not (ckpt / "critic").exists()
    assert out["state_engines"] == ["actor"]
    assert (published / "model.safetensors").is_file() and not (published / "critic").exists()
    assert "no critic" in out["describe"] and "advantages: stub (2 samples per prompt)" in out["describe"]
    # each drawn prompt rolled out twice, side by side, and the estimator told which responses share one
    seen = out["seen"]
    assert seen["texts"] == [t for t in out["drawn"] for _ in range(2)]
    assert seen["group"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(seen["queries"][i] == seen["queries"][i + 1] for i in range(0, 8, 2))
    assert any(seen["responses"][i] != seen["responses"][i + 1] for i in range(0, 8, 2)), "k samples, not k copies"
    assert 0 <= out["zero_std_groups"] <= 1
    # LoRA: the reference is the actor's base, and the published policy is merged (no adapter keys)
    assert out["reference_is_base"] == (lora == "true")
    assert "model.embed_tokens.weight" in out["published_keys"]
    assert not any("lora" in k or k.startswith("base_model.") for k in out["published_keys"])
    assert out["synced"], "the policy's engine holds the weights of the last update"
    assert "holds weights version" in out["stale"], out["stale"]
    assert "another ppo.advantage_estimator" in out["refused"], out["refused"]
