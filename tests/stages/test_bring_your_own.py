"""Bring your own models: PPO from a policy and a reward model the pipeline did not train
(sft.import_model, reward.import_model), given as local directories of two test families whose
tokenizers differ (Qwen2 with its chat template as the policy, Pythia as the reward model: the
same text gets other token ids).

The reward model must then be scored on text: each response decoded with the policy's tokenizer
and the original prompt and response encoded for the reward model as its reward stage encodes a
pair. The probe checks PPO's scores against that encoding done by hand; the pipeline test checks
the imports' lineage, the reward statistics, the critic, `rlhf status`, the report and the
skip of an unchanged re-run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT, manifest, ok, run_pipeline, small_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reward_dir(family_checkpoints, tmp_path_factory):
    """A Pythia sequence-classification model (one output, a seeded random head) with its own tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("pythia_rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(family_checkpoints["pythia"]), num_labels=1)
    tok = AutoTokenizer.from_pretrained(str(family_checkpoints["pythia"]))
    model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


PROBE = r"""
import copy, json, os, sys
os.environ.update(MASTER_PORT=sys.argv[3])
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from rlhf import distributed, models
from rlhf.config import load_config
from rlhf.data import load_prompts, render_prompt
from rlhf.generation import decode_responses, Generated
from rlhf.ppo.layout import build_models
from rlhf.ppo.trainer import PPOTrainer
from rlhf.scoring import TextBridge, reward_scores

policy_dir, rm_dir = sys.argv[1], sys.argv[2]
distributed.init_distributed()
cfg = load_config("launch/configs/demo.yaml", ["ppo.advantage_estimator=gae", "ppo.samples_per_prompt=1",
                  "ppo.rollout_batch_size=6", "ppo.mini_batch_size=6", "ppo.max_new_tokens=6", "ppo.forward_batch_size=4",
                  "ppo.critic_from_reward=false", "deepspeed.zero_stage=2"])
tok = models.load_tokenizer(policy_dir)
rm_tok = models.load_tokenizer(rm_dir)
torch.manual_seed(0)
policy = AutoModelForCausalLM.from_pretrained(policy_dir)
rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
four = build_models(cfg.ppo, cfg.model.lora, "float32", load_policy=lambda: copy.deepcopy(policy),
                    load_reward=lambda: copy.deepcopy(rm),
                    load_critic=lambda: models.load_reward_model(policy_dir, "float32", tok.pad_token_id))
bridge = TextBridge(tok, rm_tok, True, 256)
trainer = PPOTrainer(cfg=cfg.ppo, ds=cfg.deepspeed, dtype="float32", actor_model=four.actor, critic_model=four.critic,
                     reward_model=four.reward, ref_model=four.reference, tokenizer=tok,
                     reward_stats={"mean": 0.0, "std": 1.0}, reward_bridge=bridge)
prompts = load_prompts(cfg.ppo.train_prompts)[:6]
texts = [bridge.remember(render_prompt(tok, p, True), p) for p in prompts]
r = trainer.rollout(texts)
g = Generated(r.query_ids, r.query_mask, r.response_ids, r.response_mask, r.ended)
responses = decode_responses(tok, g)
# by hand: the raw prompt and the decoded response in the reward model's own ids, its EOS where the policy's ended
expected = []
for p, resp, ended in zip(prompts, responses, r.ended.tolist()):
    ids = (rm_tok(p, add_special_tokens=False)["input_ids"] + rm_tok(resp, add_special_tokens=False)["input_ids"]
           + ([rm_tok.eos_token_id] if ended else []))
    with torch.no_grad():
        expected.append(float(reward_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]))
gens, sampled = trainer.sample(texts, max_new_tokens=6)
resp2 = [x for gg in gens for x in decode_responses(tok, gg)]
ended2 = torch.cat([gg.ended for gg in gens]).tolist()
again = []
for p, resp, ended in zip(prompts, resp2, ended2):
    ids = bridge.encode_one(p, resp, ended)
    with torch.no_grad():
        again.append(float(reward_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]))
same_ids = tok("list some metals", add_special_tokens=False)["input_ids"] == rm_tok("list some metals", add_special_tokens=False)["input_ids"]
print(json.dumps({"rollout": r.raw_scores.tolist(), "expected": expected, "sampled": sampled.tolist(), "again": again,
                  "ended": r.ended.tolist(), "templated": texts[0], "same_ids": same_ids, "describe": trainer.describe()}))
"""


def test_a_reward_model_with_its_own_tokenizer_scores_the_text_as_encoded_by_hand(family_checkpoints, reward_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(family_checkpoints["qwen2"]), str(reward_dir), "29741"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["same_ids"], "the two families must encode the same text differently for this test to mean anything"
    assert "<|im_start|>" in out["templated"], "the policy saw its chat template; the reward model gets the raw prompt"
    assert out["rollout"] == pytest.approx(out["expected"], abs=1e-5), out
    assert out["sampled"] == pytest.approx(out["again"], abs=1e-5), out
    assert len(set(round(x, 5) for x in out["expected"])) > 1, "different responses, different scores"
    assert "its own tokenizer" in out["describe"]


def test_ppo_from_an_imported_policy_and_reward_model_of_another_family(family_checkpoints, reward_dir, tmp_path):
    d = tmp_path / "run"
    policy = family_checkpoints["qwen2"]
    overrides = [o for o in small_overrides(tmp_path, policy) if not o.startswith(("sft.train_data", "reward.train_data"))]
    overrides += [f"sft.import_model={policy}", f"reward.import_model={reward_dir}", "sft.train_data=null",
                  "reward.train_data=null", "model.name_or_path=null", "deepspeed.zero_stage=3", "ppo.total_episodes=32"]
    proc = run_pipeline(d, overrides, port=29743, procs=2)  # ZeRO-3 on two processes
    ok(proc)
    out = proc.stdout
    assert "importing the policy" in out and "importing the reward model" in out
    assert "scored on text" in out and "the critic starts from the policy" in out

    sft, rm, ppo = (manifest(d, s) for s in ("sft", "reward", "ppo"))
    assert sft["imported"]["source"] == str(policy) and sft["imported"]["content"].startswith("dir:")
    assert rm["imported"]["source"] == str(reward_dir) and rm["model"]["own_tokenizer"] is True
    assert rm["tokenizer"] != sft["tokenizer"], "the reward artifact keeps its own tokenizer"
    assert rm["parents"][0]["stage"] == "sft" and {p["stage"] for p in ppo["parents"]} == {"sft", "reward"}
    stats = rm["reward_stats"]
    assert stats["n"] == 8 and stats["std"] > 0 and stats["sampling"]["max_new_tokens"] == 8
    assert 0 <= rm["metrics"]["eval_accuracy"] <= 1  # reward.eval_data scored with the reward model's tokenizer
    assert ppo["model"]["reward_scored_on"] == "text" and ppo["metrics"]["updates"] == 2
    # the imported models are copies: the reward model keeps its own vocabulary, the critic the policy's
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(d / "reward"))) == rm["imported"]["vocabulary"]
    critic = AutoModelForSequenceClassification.from_pretrained(str(d / "ppo" / "critic"))
    assert critic.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(str(d / "sft")))

    status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--artifact-dir", str(d)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True)
    lines = {ln.split()[0]: ln for ln in status.stdout.splitlines() if ln.strip()}
    assert f"imported from {policy}" in lines["sft"], status.stdout
    assert f"imported from {reward_dir}" in lines["reward"] and "its own tokenizer" in lines["reward"], status.stdout
    summary = json.loads((d / "report" / "summary.json").read_text())
    assert summary["models"]["sft"].startswith(f"imported from {policy}")
    assert summary["models"]["reward"].startswith(f"imported from {reward_dir}")
    html = (d / "report" / "index.html").read_text()
    assert f"Reward model: imported from {reward_dir}" in html and f"Policy (SFT): imported from {policy}" in html

    again = run_pipeline(d, overrides, port=29743, procs=2)
    ok(again)
    assert again.stdout.count("is complete and up to date: skipping") == 3, again.stdout
