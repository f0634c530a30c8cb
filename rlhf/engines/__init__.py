"""Rollout engines: where every sampled response in the pipeline comes from.

One interface, `RolloutEngine`, serves every sampling path: PPO rollouts, held-out evaluation,
the best-of-n baseline, the reward stage's `reward_stats` and `rlhf generate`. An engine samples
from weights of a known *version*; whoever changes the weights (the PPO trainer after an update,
a checkpoint load, the guard restoring its best policy) calls `sync_weights(version)`, and a
caller that finds `engine.version` behind its own refuses to sample (StaleWeightsError) instead
of drifting silently.

Implementations:
  hf    HF `generate()` on the live module (under ZeRO-3 the weights are gathered once per call);
        nothing to copy, so a sync only records the version (rlhf/engines/hf.py).
  vllm  a vLLM engine in this process, started once from the policy's config; a sync pushes the
        actor's weights into it module by module, LoRA merged (rlhf/engines/vllm_engine.py).
        vLLM is an optional dependency: imported only when this engine is built.

The frozen SFT reference samples with hf in every configuration (its samples serve evaluation
only, and a second vLLM engine would hold a second copy of the weights and KV cache).

Adding an engine: a module here with a class that has the attributes and methods below, one
line in `build`, and its name in `rlhf.config.ROLLOUT_ENGINES` (validated with the config).
"""
from __future__ import annotations

from typing import Any, Protocol

from rlhf.config import ROLLOUT_ENGINES
from rlhf.engines.hf import HFEngine
from rlhf.engines.vllm_engine import EngineUnavailable, VLLMEngine
from rlhf.generation import Generated, Sampling


class StaleWeightsError(RuntimeError):
    """An engine was asked to sample from weights older than the caller's: a bug, never drift."""


class RolloutEngine(Protocol):
    kind: str               # "hf", ...: the config value that selects it
    version: int            # the weights version it samples from (set by sync_weights)
    max_prompt_length: int  # prompts are left-truncated to this many tokens

    def generate(self, prompts: list[str], sampling: Sampling, max_new_tokens: int, *, batch_size: int | None = None,
                 with_logprobs: bool = False, progress: bool = False) -> list[Generated]:
        """One Generated per chunk of `batch_size` prompts (all prompts in one chunk when None), each
        response drawn from exactly `sampling` and cut after its first EOS; `with_logprobs`: also the
        log-prob of every sampled token under `sampling`. Collective under ZeRO-3: every rank calls it."""
        ...

    def sync_weights(self, version: int) -> None:
        """Make the engine sample from the trainer's current weights, which are `version`."""
        ...

    def describe(self) -> str:
        """One line for the stage's log: which engine, sampling from what."""
        ...


def build(kind: str, model: Any, tokenizer: Any, *, max_prompt_length: int, zero_stage: int = 0, gather: bool = True,
          adapter_disabled: bool = False, device: Any = None, vllm: Any = None, dtype: str = "float32",
          seed: int = 0) -> RolloutEngine:
    """The engine `kind` (config: ppo.rollout_engine) sampling from `model`: a DeepSpeed engine or a
    plain (peft) module; `adapter_disabled`: a LoRA model sampled as its base (the frozen reference).
    vllm only: `vllm` the config's vllm section, `dtype` model.dtype, `seed` its start-up seed
    (sampling seeds come from torch's RNG)."""
    if kind == "hf":
        return HFEngine(model, tokenizer, max_prompt_length=max_prompt_length, zero_stage=zero_stage, gather=gather,
                        adapter_disabled=adapter_disabled, device=device)
    if kind == "vllm":
        if adapter_disabled:
            raise ValueError("the vllm engine serves the policy's own weights; sample a LoRA model's base with hf")
        return VLLMEngine(model, tokenizer, max_prompt_length=max_prompt_length, zero_stage=zero_stage, settings=vllm,
                          dtype=dtype, device=device, seed=seed)
    raise ValueError(f"unknown rollout engine {kind!r}; use one of: {', '.join(ROLLOUT_ENGINES)}")


def require(kind: str, asked: str | None = None) -> None:
    """Fail before any work when engine `kind` cannot run in this environment (vllm not installed);
    `asked`: the setting or flag that asked for it, for the message."""
    if kind == "vllm":
        from rlhf.engines.vllm_engine import require as require_vllm

        require_vllm(asked or "ppo.rollout_engine=vllm")


def close(engine: Any) -> None:
    """Release an engine's resources (vLLM's memory and process groups); nothing for hf."""
    if hasattr(engine, "close"):
        engine.close()


def check_version(engine: RolloutEngine, version: int) -> None:
    """Refuse to sample from `engine` unless it holds weights `version`."""
    if engine.version != version:
        raise StaleWeightsError(f"the {engine.kind} rollout engine holds weights version {engine.version}, but the "
                                f"policy is at version {version}: sync_weights was not called after the weights changed")
