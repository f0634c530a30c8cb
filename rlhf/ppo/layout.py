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


@dataclass
class PPOModels:
    actor: Any
    reference: Any | None  # None: the actor's base (LoRA)
    critic: Any | None     # None: the estimator needs no critic
    reward: Any | None     # None: the critic's base (LoRA critic on the reward model)


def build_models(*, load_policy: Callable[[], Any], load_reward: Callable[[], Any],
                 load_critic: Callable[[], Any] | None, lora: Any | None, critic_lora: bool, critic_from_reward: bool,
                 gradient_checkpointing: bool, use_cache: bool) -> PPOModels:
    """Load and arrange the PPO models. `load_policy()`: a fresh copy of the SFT policy;
    `load_reward()`: a fresh copy of the reward model; `load_critic()`: the critic's starting
    point (the reward model, or the policy with a new one-output head), None for no critic;
    `lora`: config.LoraConfig for LoRA mode (None: full fine-tuning); `critic_lora`: with LoRA,
    the critic is base + adapter too; `critic_from_reward`: the critic starts from the reward
    model, so (with critic_lora) the reward model is its base; `use_cache`: keep the KV cache on
    for the actor's generation.

    The loads run in a fixed order (actor, its adapter, reference, critic, its adapter, reward
    model): fresh heads and adapters draw from the seeded RNG, so the order is part of a run's
    reproducibility."""
    actor = load_policy()
    if use_cache:
        actor.config.use_cache = True
    reference = None
    if lora is not None:
        actor = models.add_lora(actor, lora, "CAUSAL_LM")
    else:
        reference = load_policy()
    critic = load_critic() if load_critic is not None else None
    if gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and without a loss on every layer
        for m in (actor, critic):
            if m is not None:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_critic = critic is not None and lora is not None and critic_lora
    if lora_critic:
        critic = models.add_lora(critic, lora, "SEQ_CLS")
    reward = None if lora_critic and critic_from_reward else load_reward()
    return PPOModels(actor, reference, critic, reward)
