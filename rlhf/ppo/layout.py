"""The four PPO models and which of them share base weights: one function, used by the PPO stage
and by `rlhf bench`, so that what is benchmarked is what trains.

    actor      the policy, trained (full, or base + LoRA adapter)
    reference  the frozen SFT policy: a second copy, or (LoRA) the actor with its adapter disabled
    critic     the value model, trained, started from the reward model (or the policy); absent
               when the advantage estimator needs none
    reward     the frozen reward model: a copy, or (LoRA critic on the reward model) the critic
               with its adapter disabled
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rlhf import models
from rlhf.config import LoraConfig, PPOStageConfig
from rlhf.ppo.core import advantage_estimator


@dataclass
class PPOModels:
    actor: Any
    reference: Any | None  # None: the actor's base (LoRA)
    critic: Any | None     # None: the estimator needs no critic
    reward: Any | None     # None: the critic's base (LoRA critic on the reward model)


def build_models(ppo: PPOStageConfig, lora: LoraConfig, dtype: str, *, load_policy: Callable[..., Any],
                 load_reward: Callable[..., Any], load_critic: Callable[..., Any],
                 quantization: Any = None, own_reward: bool = False) -> PPOModels:
    """Load and arrange the PPO models as the `ppo` section says: `lora` (LoRA actor, with
    `lora`'s settings), `critic_lora` (with LoRA, the critic is base + adapter too),
    `critic_from_reward` (with critic_lora, the reward model is then the critic's base),
    `gradient_checkpointing`, and `advantage_estimator` (no critic when it needs none).
    `load_policy()`: a fresh copy of the SFT policy; `load_reward()`: a fresh copy of the reward
    model; `load_critic()`: the critic's starting point (the reward model, or the policy with a new
    one-output head). The actor keeps its KV cache on for generation in float32.

    `quantization` (a BitsAndBytesConfig; it needs ppo.lora): every frozen base is loaded in 4 bits,
    each loader is then called with it (`load_policy(quantization)`): the actor (its reference is
    the same 4-bit base with the adapter off), the critic when it is base + adapter (critic_lora),
    and the reward model. A critic trained in full stays in `dtype`.

    The loads run in a fixed order (actor, its adapter, reference, critic, its adapter, reward
    model): fresh heads and adapters draw from the seeded RNG, so the order is part of a run's
    reproducibility. `own_reward`: the reward model is always a model of its own (a reward ensemble,
    whose K heads the critic's base would not have)."""
    if quantization is not None and not ppo.lora:
        raise ValueError("a 4-bit base needs ppo.lora")

    def load(loader: Callable[..., Any], quantized: bool) -> Any:
        return loader(quantization) if quantization is not None and quantized else loader()

    actor = load(load_policy, True)
    if dtype == "float32":
        actor.config.use_cache = True
    reference = None
    if ppo.lora:
        actor = models.add_lora(actor, lora, "CAUSAL_LM")
    else:
        reference = load_policy()
    critic = (load(load_critic, ppo.critic_lora) if advantage_estimator(ppo.advantage_estimator).needs_critic
              else None)
    if ppo.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and without a loss on every layer
        for m in (actor, critic):
            if m is not None:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_critic = critic is not None and ppo.lora and ppo.critic_lora
    if lora_critic:
        critic = models.add_lora(critic, lora, "SEQ_CLS")
    reward = None if lora_critic and ppo.critic_from_reward and not own_reward else load(load_reward, True)
    return PPOModels(actor, reference, critic, reward)


def from_artifacts(ppo: PPOStageConfig, lora: LoraConfig, dtype: str, *, sft_path: str, rm_path: str,
                   pad_token_id: int, rm_pad_token_id: int | None = None, quantization: Any = None) -> PPOModels:
    """build_models from a pipeline's SFT and reward artifacts (directories), as PPO loads them.
    `rm_pad_token_id`: the reward model's own (when it has its own tokenizer), else the policy's.
    A reward ensemble's artifact (rlhf.ensemble) is loaded with its K member heads."""
    from rlhf import ensemble

    heads = ensemble.load_heads(rm_path)

    def load_reward(q=None):
        model = models.load_reward_model(rm_path, dtype, rm_pad, quantization=q)
        if heads is not None:
            ensemble.attach_heads(model, heads)
        return model

    critic_src = rm_path if ppo.critic_from_reward else sft_path
    rm_pad = pad_token_id if rm_pad_token_id is None else rm_pad_token_id
    return build_models(
        ppo, lora, dtype, quantization=quantization, own_reward=heads is not None,
        load_policy=lambda q=None: models.load_causal_lm(sft_path, dtype, quantization=q),
        load_reward=load_reward,
        load_critic=lambda q=None: models.load_reward_model(critic_src, dtype, pad_token_id, quantization=q))
