"""The PPO loop: rollout -> score -> KL-shaped rewards -> advantages -> PPO epochs -> log/checkpoint.

Actor and critic are DeepSpeed engines (ZeRO 0-3, optional CPU offload); the critic exists only
when the advantage estimator needs one (ppo.advantage_estimator). The reference policy and the
reward model are inference-only: plain modules, or ZeRO-3 inference engines (sharded) under
ZeRO-3. In LoRA mode the reference is the actor with its adapter disabled, and (with a LoRA critic
started from the reward model) the reward model is the critic with its adapter disabled, so each
set of base weights exists once (rlhf.ppo.layout builds that layout).

Every response is sampled through a rollout engine (rlhf.engines): the policy's is synced after
each change of the actor's weights, and sampling from an engine behind them is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from rlhf import artifacts, distributed, engines, faults
from rlhf.artifacts import ArtifactError
from rlhf.config import DeepSpeedConfig, PPOStageConfig, loss_aggregation
from rlhf.distributed import all_gather_objects, all_max, all_mean
from rlhf.generation import Generated, Sampling
from rlhf.metric_names import PPO
from rlhf.ensemble import Ensemble
from rlhf.models import disable_dropout, has_score_head, is_quantized, publish_model
from rlhf.ppo import core
from rlhf.ppo.rollout import Rollout, packed_scores, policy_forward, score_rollout, value_forward
from rlhf.scoring import reward_scores

CRITIC_DIR = "critic"  # the critic's sub-directory of a published PPO artifact


class NonFiniteError(RuntimeError):
    """A loss, reward or statistic became NaN/inf; nothing was checkpointed from that state."""


@dataclass(frozen=True)
class Plan:
    """Sizes derived once from the config (never written back into it)."""

    world: int
    rollout_batch: int        # prompts per rollout, per process
    mini_batch: int           # responses per optimizer step, per process
    micro_batch: int          # rows per forward/backward
    grad_accum: int
    num_updates: int          # rollouts in the whole run
    episodes_per_update: int  # responses per rollout, across processes
    samples_per_prompt: int = 1  # k: responses per drawn prompt

    @property
    def rollout_samples(self) -> int:
        """Responses per rollout, per process: rollout_batch prompts x k."""
        return self.rollout_batch * self.samples_per_prompt

    @staticmethod
    def make(cfg: PPOStageConfig, world: int) -> "Plan":
        k = cfg.samples_per_prompt
        per_update = cfg.rollout_batch_size * k * world
        return Plan(world=world, rollout_batch=cfg.rollout_batch_size, mini_batch=cfg.mini_batch_size,
                    micro_batch=cfg.mini_batch_size // cfg.grad_accum, grad_accum=cfg.grad_accum,
                    num_updates=max(1, math.ceil(cfg.total_episodes / per_update)), episodes_per_update=per_update,
                    samples_per_prompt=k)


def engine_config(ds: DeepSpeedConfig, dtype: str, plan: Plan, grad_clip: float) -> dict:
    return distributed.deepspeed_config(ds, dtype, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                                        grad_clip=grad_clip, train_batch=plan.micro_batch * plan.grad_accum * plan.world)


def engine_deepspeed(ds: DeepSpeedConfig, dtype: str, world: int) -> DeepSpeedConfig:
    """The DeepSpeed settings the PPO engines run with: as configured, except that a single process
    without offload has nothing to partition, so the engines run unpartitioned (stage 0: the same
    maths without ZeRO's per-gradient bucket copies, ~20 % of a CPU update on `rlhf bench`)."""
    if world > 1 or ds.zero_stage == 0:
        return ds
    zero = distributed.deepspeed_config(ds, dtype)["zero_optimization"]
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        return ds
    return dataclasses.replace(ds, zero_stage=0)


class PromptStream:
    """Each process's next `n` prompts; a seeded reshuffle every pass. Its position is checkpointed.

    Prompts are rendered (`render`, e.g. through the chat template) only when drawn, and the
    shuffled order of a pass is computed once, so a file of 10^5-10^6 prompts costs nothing
    per batch beyond the prompts in it."""

    def __init__(self, prompts: list, seed: int, rank: int, world: int, render: Any = None):
        self.prompts, self.seed, self.rank, self.world = prompts, seed, rank, world
        self.render = render or (lambda p: p)
        self.position = 0  # prompts consumed globally
        self.drawn: list[int] = []  # indices into `prompts` of this process's last draw
        self._epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def next(self, n: int) -> list:
        self.drawn = []
        for i in range(n):
            g = self.position + i * self.world + self.rank
            epoch, k = divmod(g, len(self.prompts))
            self.drawn.append(self._order_of(epoch)[k])
        self.position += n * self.world
        return [self.render(self.prompts[j]) for j in self.drawn]


class PhaseTimer:
    """Wall seconds per phase of an update (generation, scoring, update forward/backward,
    optimizer, the rollout engine's weight sync). With `sync` (the benchmark sets it) CUDA work is awaited at each phase boundary
    so the seconds belong to the phase that queued the work; training runs leave it off."""

    PHASES = ("generation", "scoring", "forward_backward", "optimizer", "weight_sync")

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - t

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call."""
        out = {k: self.seconds.get(k, 0.0) for k in self.PHASES}
        self.seconds.clear()
        return out


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"{name} is not finite (NaN or inf). Training stopped before any checkpoint of this "
                             "state was written; lower ppo.learning_rate, set ppo.score_clip, or check the reward model.")


class PPOTrainer:
    """Owns the engines and runs updates; rlhf.ppo.run.PPORun drives it, stages/ppo.py wires both."""

    def __init__(self, *, cfg: PPOStageConfig, ds: DeepSpeedConfig, dtype: str, actor_model: Any,
                 critic_model: Any | None, reward_model: Any | None, ref_model: Any | None, tokenizer: Any,
                 reward_stats: dict, timer: PhaseTimer | None = None, vllm: Any = None, seed: int = 0,
                 reward_bridge: Any = None):
        """`ref_model=None`: the actor is a LoRA model and the reference is its base (adapter
        disabled). `reward_model=None`: the critic is a LoRA model on the reward model, and the
        reward model is its base (adapter disabled). Neither keeps a second copy of the weights.
        `critic_model=None`: the advantage estimator needs no critic (and then a reward model is given).
        `timer`: where phase seconds go (the benchmark's waits for the GPU at each phase's end).
        `vllm`: the config's vllm section (ppo.rollout_engine=vllm); `seed`: the vLLM engine's start-up seed.
        `reward_bridge`: a rlhf.scoring.TextBridge when the reward model has its own tokenizer (it is
        then scored on the responses' text, and cannot be the critic's base).
        A reward ensemble (reward_stats["members"]: its reward model's head has one output per member)
        is read by a rlhf.ensemble.Ensemble: PPO maximises ppo.reward_aggregation of the members'
        normalised scores."""
        self.estimator = core.advantage_estimator(cfg.advantage_estimator)
        self.aggregation = loss_aggregation(cfg)   # how the per-token policy loss becomes a scalar
        self.kl_in_loss = cfg.kl_penalty == "loss"
        if self.estimator.needs_critic != (critic_model is not None):
            raise ValueError(f"ppo.advantage_estimator={cfg.advantage_estimator} "
                             + ("needs a critic model" if self.estimator.needs_critic else "uses no critic model"))
        if critic_model is None and reward_model is None:
            raise ValueError("without a critic the reward model must be given (it cannot be the critic's base)")
        if reward_bridge is not None and reward_model is None:
            raise ValueError("a reward model with its own tokenizer cannot be the critic's base")
        self.reward_bridge = reward_bridge
        members = reward_stats.get("members")
        self.ensemble = (Ensemble(members, cfg.reward_aggregation, cfg.uncertainty_coef, cfg.hold_out_member)
                         if members else None)
        if self.ensemble is not None and reward_model is None:
            raise ValueError("a reward-model ensemble is loaded as a model of its own, not as the critic's base")
        self.plan = Plan.make(cfg, distributed.world_size())
        self.configured_zero_stage = ds.zero_stage
        ds = engine_deepspeed(ds, dtype, self.plan.world)
        self.cfg, self.ds, self.tok = cfg, ds, tokenizer
        # the policy samples from, and is scored under, exactly this distribution; the reference
        # is the SFT policy at the same temperature, untruncated (so KL(pi || pi_ref) stays finite)
        self.sampling = Sampling.of(cfg)
        self.ref_sampling = Sampling(temperature=cfg.temperature)
        for m in (actor_model, critic_model, reward_model, ref_model):
            if m is not None:  # the ratio is 1 on the first minibatch only without dropout (N+ details)
                disable_dropout(m)
        steps = self.plan.num_updates * cfg.ppo_epochs * (self.plan.rollout_samples // self.plan.mini_batch)
        train_json = engine_config(ds, dtype, self.plan, cfg.max_grad_norm)
        self.actor = distributed.make_trainable(actor_model, cfg.learning_rate, train_json, steps)
        self.critic = (distributed.make_trainable(critic_model, cfg.critic_learning_rate, train_json, steps)
                       if critic_model is not None else None)
        frozen_json = distributed.inference_config(ds, dtype) if ds.zero_stage == 3 else {}
        self.reward_model = (distributed.make_inference(reward_model, ds.zero_stage, frozen_json)
                             if reward_model is not None else None)
        self.ref = distributed.make_inference(ref_model, ds.zero_stage, frozen_json) if ref_model is not None else None
        self.reference_is_actor_base = ref_model is None
        self.reward_is_critic_base = reward_model is None
        self.kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
                       else core.FixedKLController(cfg.kl_coef))
        self.score_mean, self.score_std = reward_stats["mean"], reward_stats["std"]
        self.value_scale = (self.score_mean, self.score_std)  # the critic's head read in normalised-score units
        self.update = 0
        self.extra_state: dict = {}  # the run's state from the checkpoint resumed (save's `extra`)
        self.device = distributed.device()
        gather = ds.zero3_gather_for_generation
        # the policy's engine (ppo.rollout_engine) and the frozen SFT policy's (HF: it never changes)
        self.engine = engines.build(cfg.rollout_engine, self.actor, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                    zero_stage=ds.zero_stage, gather=gather, device=self.device, vllm=vllm,
                                    dtype=dtype, seed=seed)
        # the HF engine's log-probs are the actor's own (same module, same sampling); another engine's
        # are only compared with them (and reweight the loss with vllm.importance_cap)
        self.engine_logprobs_exact = self.engine.kind == "hf"
        self.importance_cap = getattr(vllm, "importance_cap", None) if not self.engine_logprobs_exact else None
        # pi_old read off the generation pass: the HF engine's (ppo.logprobs_from_generation), or vLLM's when
        # vllm.old_logprobs=engine; otherwise one actor forward over the rollout
        self.old_logprobs_from_engine = (cfg.logprobs_from_generation if self.engine_logprobs_exact
                                         else getattr(vllm, "old_logprobs", "actor") == "engine")
        self.reference_engine = engines.build(
            "hf", self.actor if self.reference_is_actor_base else self.ref, tokenizer,
            max_prompt_length=cfg.max_prompt_length, zero_stage=ds.zero_stage, gather=gather,
            adapter_disabled=self.reference_is_actor_base, device=self.device)
        self.weights_version = 0  # bumped at every change of the actor's weights; the engine must hold it
        self.timer = timer or PhaseTimer()

    # --------------------------------------------------------------- what the run reads
    @property
    def tokenizer(self) -> Any:
        return self.tok

    @property
    def reference_sampling(self) -> Sampling:
        """The frozen SFT policy's distribution: the policy's temperature, no top-k/top-p."""
        return self.ref_sampling

    def describe(self) -> str:
        """Processes, ZeRO stage, which weights are shared, the estimator and the engine, for the stage's log."""
        zero = f"ZeRO-{self.configured_zero_stage}"
        if self.ds.zero_stage != self.configured_zero_stage:
            zero += " configured (one process, no offload: engines unpartitioned, stage 0)"
        actor = "LoRA actor, reference = its base" if self.reference_is_actor_base else "full actor, frozen reference copy"
        if self.critic is None:
            critic = "no critic, frozen reward model"
        elif self.reward_is_critic_base:
            critic = "LoRA critic, reward model = its base"
        else:
            critic = ("LoRA critic" if hasattr(self.critic.module, "disable_adapter") else "full critic") + ", frozen reward model"
        if self.reward_bridge is not None:
            critic += " (its own tokenizer: scored on the responses' text)"
        if self.ensemble is not None:
            critic += f"; {self.ensemble.describe()}"
        four_bit = [name for name, m in (("actor", self.actor), ("critic", self.critic),
                                                   ("reward model", self.reward_model)) if m is not None and is_quantized(m)]
        if four_bit:
            actor += f"; 4-bit base weights: {', '.join(four_bit)}"
        k = self.plan.samples_per_prompt
        return (f"{self.plan.world} process(es), {zero}, {actor}; {critic}; advantages: {self.cfg.advantage_estimator}"
                + (f" ({k} samples per prompt)" if k > 1 else "")
                + f", loss {self.aggregation}, KL in the {self.cfg.kl_penalty}; "
                f"rollouts: {self.engine.describe()}"
                + ("" if self.engine_logprobs_exact else "; pi_old: " + ("vLLM's log-probs" if self.old_logprobs_from_engine
                                                                         else "an actor forward")))

    # --------------------------------------------------------------- weights and engines
    def _weights_changed(self) -> None:
        """The actor's weights changed (an update, a checkpoint or saved policy loaded): the policy's
        engine is brought to them before anything samples again."""
        self.weights_version += 1
        with self.timer("weight_sync"):
            self.engine.sync_weights(self.weights_version)

    def _generate(self, prompt_texts: list[str], *, reference: bool, max_new_tokens: int, sampling: Sampling,
                  batch_size: int | None, with_logprobs: bool) -> list[Generated]:
        if reference:  # the frozen SFT policy: its weights never change
            return self.reference_engine.generate(prompt_texts, sampling, max_new_tokens, batch_size=batch_size)
        engines.check_version(self.engine, self.weights_version)
        return self.engine.generate(prompt_texts, sampling, max_new_tokens, batch_size=batch_size,
                                    with_logprobs=with_logprobs)

    # --------------------------------------------------------------- reference
    def reference_logprobs(self, full_ids: torch.Tensor, full_mask: torch.Tensor, q_len: int) -> torch.Tensor:
        if self.reference_is_actor_base:  # the same weights with the adapter switched off
            with self.actor.module.disable_adapter():
                return policy_forward(self.actor, full_ids, full_mask, q_len, self.ref_sampling)[0]
        return policy_forward(self.ref, full_ids, full_mask, q_len, self.ref_sampling)[0]

    def raw_scores(self, full_ids: torch.Tensor, full_mask: torch.Tensor, q_len: int | None = None,
                   prompts: list[str] | None = None) -> torch.Tensor:
        """(B,) raw reward-model scores of query+response sequences. With a reward model of its own
        tokenizer (reward_bridge) the responses (columns from `q_len`) are re-encoded for it with
        their rendered `prompts`."""
        if self.reward_bridge is not None:
            if q_len is None or prompts is None:
                raise ValueError("a reward model with its own tokenizer scores text: give q_len and the prompts")
            ids, mask = self.reward_bridge.encode(full_ids[:, q_len:], full_mask[:, q_len:], prompts)
            if not has_score_head(self.reward_model):
                return reward_scores(self.reward_model, ids, mask)
            return packed_scores(self.reward_model, ids, mask)
        if self.reward_is_critic_base:  # the reward model is the critic's frozen base
            with self.critic.module.disable_adapter():
                return packed_scores(self.critic, full_ids, full_mask)
        return packed_scores(self.reward_model, full_ids, full_mask)

    # --------------------------------------------------------------- sampling for evaluation
    @torch.no_grad()
    def sample(self, prompt_texts: list[str], *, max_new_tokens: int, reference: bool = False,
               sampling: Sampling | None = None, members: bool = False) -> tuple[list[Generated], torch.Tensor]:
        """Responses of the policy (or of the frozen SFT reference) in chunks of
        forward_batch_size, and their raw reward-model scores (B,): with an ensemble the members'
        mean (the artifact's single score), or with `members` all of them (B, K). Every rank calls it."""
        cfg = self.cfg
        sampling = sampling or self.sampling
        gens = self._generate(prompt_texts, reference=reference, max_new_tokens=max_new_tokens,
                              sampling=sampling, batch_size=cfg.forward_batch_size,
                              with_logprobs=not reference and sampling == self.sampling and self.engine_logprobs_exact)
        scores, row = [], 0
        for g in gens:
            scores.append(self.raw_scores(torch.cat([g.query_ids, g.response_ids], 1), torch.cat([g.query_mask, g.response_mask], 1),
                                          g.query_ids.shape[1], prompt_texts[row:row + len(g.query_ids)]))
            row += len(g.query_ids)
        out = torch.cat(scores)
        return gens, (out.mean(1) if out.dim() == 2 and not members else out)

    @torch.no_grad()
    def kl_to_reference(self, g: Generated) -> torch.Tensor:
        """(B,) sum over the response of log pi - log pi_ref on the policy's own samples `g` (k1);
        log pi from the generation pass when `sample` recorded it."""
        ids, mask = torch.cat([g.query_ids, g.response_ids], 1), torch.cat([g.query_mask, g.response_mask], 1)
        q = g.query_ids.shape[1]
        logp = g.logprobs if g.logprobs is not None else policy_forward(self.actor, ids, mask, q, self.sampling)[0]
        return ((logp - self.reference_logprobs(ids, mask, q)) * g.response_mask).sum(1)

    def save_policy_weights(self, path: Path) -> None:
        """Collective: the actor's weights (LoRA adapters included, not merged) into the
        safetensors file `path`, written by rank 0 (atomically): the over-optimisation guard's
        best policy, restored by load_policy_weights."""
        sd = distributed.full_state_dict(self.actor, self.ds.zero_stage)
        if distributed.is_main():
            kept = self._snapshot_params()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part")
            save_file({k: v.detach().clone().contiguous() for k, v in sd.items() if k in kept}, str(tmp))
            os.replace(tmp, path)
        distributed.barrier()

    def _snapshot_params(self) -> dict:
        """The actor's parameters a best-policy snapshot holds: all of them, or with a 4-bit base
        the trained ones only (the frozen packed base is the same in every snapshot)."""
        params = dict(self.actor.module.named_parameters())
        if is_quantized(self.actor):
            params = {n: p for n, p in params.items() if p.requires_grad}
        return params

    def load_policy_weights(self, path: Path) -> None:
        """Collective: the actor's parameters set from a save_policy_weights file (every rank
        reads it from the shared artifact directory)."""
        sd = load_file(str(path))
        params = self._snapshot_params()
        missing = [n for n in params if n not in sd]
        if missing:
            raise ArtifactError(f"{path}: saved policy weights lack {missing[:3]}; delete it and re-run")
        gathered = nullcontext()
        if self.ds.zero_stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        with gathered, torch.no_grad():
            if self.ds.zero_stage != 3 or distributed.is_main():
                for name, p in params.items():
                    p.data.copy_(sd[name].to(p.dtype))
        self._weights_changed()

    def save_models(self, out_dir: Path) -> None:
        """Collective: the policy (merged when LoRA) into out_dir, the critic (when there is one)
        into out_dir/critic."""
        publish_model(self.actor, self.ds.zero_stage, out_dir, self.tok)
        if self.critic is not None:
            publish_model(self.critic, self.ds.zero_stage, Path(out_dir) / CRITIC_DIR, self.tok)

    # --------------------------------------------------------------- one update
    def rollout(self, prompt_texts: list[str]) -> Rollout:
        cfg = self.cfg
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        # pi_old from the generation pass (HF engine with ppo.logprobs_from_generation, vLLM with
        # vllm.old_logprobs=engine), else from one more actor forward, vLLM's own then compared with it
        from_generation = self.old_logprobs_from_engine
        with self.timer("generation"):  # under ZeRO-3 the HF engine gathers the weights once for the call
            g = self._generate(prompt_texts, reference=False, max_new_tokens=cfg.max_new_tokens, sampling=self.sampling,
                               batch_size=None, with_logprobs=from_generation or not self.engine_logprobs_exact)[0]
        q_len = g.query_ids.shape[1]
        with self.timer("scoring"):
            rollout = score_rollout(actor=self.actor, critic=self.critic,
                                    reward=lambda ids, mask, rows: self.raw_scores(ids, mask, q_len, prompt_texts[rows]),
                                    reference=lambda ids, mask: self.reference_logprobs(ids, mask, q_len),
                                    query_ids=g.query_ids, query_mask=g.query_mask, response_ids=g.response_ids,
                                    response_mask=g.response_mask, ended=g.ended, sampling=self.sampling,
                                    chunk=cfg.forward_batch_size, value_scale=self.value_scale,
                                    logprobs=g.logprobs if from_generation else None)
        if not from_generation and not self.engine_logprobs_exact:
            rollout.engine_logprobs = g.logprobs
        return rollout

    def step(self, prompt_texts: list[str]) -> dict:
        """One PPO update on `prompt_texts` (this process's share of the prompts, each sampled
        ppo.samples_per_prompt times): the numbered maths below."""
        cfg = self.cfg
        k = self.plan.samples_per_prompt
        t0 = time.time()
        # 1. rollout: each prompt k times (its samples adjacent, group = the prompt's index), the
        #    responses scored with the reference, critic and reward model
        rollout = self.rollout([t for t in prompt_texts for _ in range(k)])
        group = torch.arange(len(prompt_texts), device=rollout.raw_scores.device).repeat_interleave(k)  # (B,)
        t_rollout = time.time() - t0
        mask = rollout.response_mask.float()                                   # (B, R) 1 on response tokens
        # 2. sequence scores in normalised units (reward_stats), EOS penalty, clip        (B,)
        if self.ensemble is not None:  # the aggregate of the members' normalised scores (rlhf.ensemble)
            scores = self.ensemble.score(rollout.raw_scores.float())
        else:
            scores = (rollout.raw_scores - self.score_mean) / self.score_std
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~rollout.ended).float()
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        check_finite("the reward model's scores", scores)
        # 3. per-token rewards: -beta * KL_t at every token, plus the score at the last one (B, R);
        #    with ppo.kl_penalty=loss the KL is a loss term instead (5.) and the rewards are the score alone
        kl = core.kl_estimate(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator) * mask
        rewards, non_score = core.kl_penalty_rewards(scores, kl, self.kl_ctl.value if not self.kl_in_loss else 0.0, mask)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        # 4. advantages (and the critic's returns) by ppo.advantage_estimator: gae over the critic's
        #    values, or a critic-free estimator over the scores of each prompt's k samples     (B, R)
        advantages, returns = self.estimator.compute(core.AdvantageInputs(
            rewards, mask, rollout.values, cfg.gamma, cfg.lam, scores=scores, penalties=non_score, group=group))
        check_finite("the advantages", advantages)
        # 4b. an inference engine's log-probs against pi_old: logged, and with vllm.importance_cap the
        #     policy loss of each token reweighted by min(pi_old / pi_engine, cap)                (B, R)
        engine_stats, is_weights = self._engine_mismatch(rollout, mask)
        # 5. PPO epochs: clipped policy (and value) losses over shuffled mini-batches
        t1 = time.time()
        stats = self._ppo_epochs(rollout, mask, advantages, returns, is_weights)  # name -> (micro-batches,)
        t_update = time.time() - t1
        # 6. the KL controller sees this rollout's KL; metrics
        mean_kl = float(all_mean(kl.sum(1).mean()))
        self.kl_ctl.update(mean_kl, self.plan.episodes_per_update)
        self.update += 1
        self._weights_changed()
        metrics = self._metrics(rollout, mask, scores, group, non_score, mean_kl, stats,
                                {"rollout": t_rollout, "update": t_update, "step": time.time() - t0})
        metrics.update(engine_stats)
        self._check_metrics(metrics, mean_kl)
        return metrics

    def _engine_mismatch(self, rollout: Rollout, mask: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """Metrics comparing the engine's log-probs with pi_old, and the truncated importance weights
        (None unless vllm.importance_cap is set). Nothing for the HF engine (its log-probs are pi_old)."""
        if rollout.engine_logprobs is None:
            return {}, None
        diff = (rollout.logprobs - rollout.engine_logprobs).abs() * mask
        out = {PPO.LOGPROB_DIFF_MEAN: float(all_mean(diff.sum() / mask.sum().clamp(min=1))),
               PPO.LOGPROB_DIFF_MAX: float(all_max(diff.max()))}
        weights = None
        if self.importance_cap is not None:
            weights = core.truncated_importance_weights(rollout.logprobs, rollout.engine_logprobs, mask,
                                                        self.importance_cap)
            out[PPO.IS_WEIGHT] = float(all_mean(weights.sum() / mask.sum().clamp(min=1)))
        return out, weights

    def _ppo_epochs(self, rollout: Rollout, mask: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor | None, is_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """ppo_epochs passes over the rollout in shuffled mini-batches (micro-batches accumulated):
        the actor steps on the clipped policy loss, the critic (when there is one) on the clipped
        value loss. Per micro-batch statistics stay on the device: (micro-batches,) each, read once
        per update."""
        cfg, plan, timer, critic = self.cfg, self.plan, self.timer, self.critic
        self.actor.train()
        names = ["pg_loss", "pg_clipfrac", "approxkl", "entropy", "ratio", "first_ratio_dev"]
        if self.kl_in_loss:
            names.append("kl_loss")
        if critic is not None:
            critic.train()
            names += ["vf_loss", "vf_clipfrac"]
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        q_len = rollout.query_ids.shape[1]
        full_ids, full_mask = rollout.full_ids, rollout.full_mask               # (B, Q+R)
        n = full_ids.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for mini_start in range(0, n, plan.mini_batch):
                mini = order[mini_start:mini_start + plan.mini_batch]
                for micro_start in range(0, len(mini), plan.micro_batch):
                    idx = mini[micro_start:micro_start + plan.micro_batch]
                    micro_mask = mask[idx]                                       # (b, R)
                    old_logp = rollout.logprobs[idx]                             # (b, R)
                    with timer("forward_backward"):
                        logp, entropy = policy_forward(self.actor, full_ids[idx], full_mask[idx], q_len,
                                                       self.sampling, with_entropy=True)   # (b, R) each
                        if not stats["first_ratio_dev"]:  # before any step pi == pi_old: a deviation means
                            # dropout or a sampling/scoring mismatch (N+: "the ratio is 1 at the start")
                            stats["first_ratio_dev"].append(
                                (((logp.detach() - old_logp).exp() - 1).abs() * micro_mask).max())
                        pg_loss, pg_stats = core.policy_loss(logp, old_logp, advantages[idx], micro_mask, cfg.cliprange,
                                                             None if is_weights is None else is_weights[idx],
                                                             self.aggregation, cfg.max_new_tokens)
                        loss = pg_loss
                        if self.kl_in_loss:  # GRPO's form: beta * KL(pi_theta || pi_ref), aggregated like the loss
                            kl_loss = core.aggregate(core.kl_estimate(logp, rollout.ref_logprobs[idx], cfg.kl_estimator),
                                                     micro_mask, self.aggregation, cfg.max_new_tokens)
                            loss = pg_loss + self.kl_ctl.value * kl_loss
                            stats["kl_loss"].append(kl_loss.detach())
                        check_finite("the policy loss", loss)
                        self.actor.backward(loss)
                    with timer("optimizer"):
                        self.actor.step()
                    for k, v in (("pg_loss", pg_loss), ("pg_clipfrac", pg_stats["clipfrac"]),
                                 ("approxkl", pg_stats["approxkl"]), ("entropy", core.masked_mean(entropy, micro_mask)),
                                 ("ratio", pg_stats["ratio"])):
                        stats[k].append(v.detach())
                    if critic is None:
                        continue
                    with timer("forward_backward"):
                        values = value_forward(critic, full_ids[idx], full_mask[idx], q_len, self.value_scale)
                        vf_loss, vf_stats = core.value_loss(values, rollout.values[idx], returns[idx], micro_mask,
                                                            cfg.cliprange_value)
                        check_finite("the value loss", vf_loss)
                        # vf_coef scales the critic's loss before its gradient clipping (max_grad_norm);
                        # the critic has its own Adam, which is invariant to a constant loss scale
                        critic.backward(cfg.vf_coef * vf_loss)
                    with timer("optimizer"):
                        critic.step()
                    stats["vf_loss"].append(vf_loss.detach())
                    stats["vf_clipfrac"].append(vf_stats["clipfrac"].detach())
        return {k: torch.stack(v).float() for k, v in stats.items()}

    def _metrics(self, rollout: Rollout, mask: torch.Tensor, scores: torch.Tensor, group: torch.Tensor,
                 non_score: torch.Tensor, mean_kl: float, stats: dict[str, torch.Tensor], seconds: dict[str, float]) -> dict:
        """The update's metrics, averaged over processes (names follow TRL's PPO trainer)."""
        plan = self.plan
        names = [k for k in stats if k != "first_ratio_dev"]
        mean = dict(zip(names, all_mean(torch.stack([stats[k].mean() for k in names])).tolist()))
        tokens = float(all_mean(mask.sum())) * plan.world
        elapsed = seconds["step"]
        return {
            PPO.KL: mean_kl,
            PPO.KL_COEF: self.kl_ctl.value,
            PPO.ENTROPY: float(all_mean((-rollout.logprobs * mask).sum(1).mean())),
            PPO.NON_SCORE_REWARD: float(all_mean(non_score.sum(1).mean())),
            PPO.RLHF_REWARD: float(all_mean((scores + non_score.sum(1)).mean())),
            PPO.SCORES: float(all_mean(scores.mean())),
            PPO.RAW_SCORES: float(all_mean(rollout.raw_scores.mean())),
            PPO.APPROXKL: mean["approxkl"],
            PPO.CLIPFRAC: mean["pg_clipfrac"],
            PPO.POLICY_ENTROPY: mean["entropy"],
            PPO.POLICY_LOSS: mean["pg_loss"],
            **({PPO.KL_LOSS: mean["kl_loss"]} if "kl_loss" in mean else {}),
            **({PPO.VALUE_LOSS: mean["vf_loss"], PPO.VALUE_CLIPFRAC: mean["vf_clipfrac"]} if "vf_loss" in mean else {}),
            **({PPO.ZERO_STD_GROUPS: float(all_mean((core.group_stats(scores, group)[2] <= 1e-12).float().mean()))}
               if plan.samples_per_prompt > 1 else {}),
            PPO.RATIO: mean["ratio"],
            PPO.RATIO_VAR: float(all_mean(stats["ratio"].var(unbiased=False))),
            PPO.FIRST_RATIO_DEV: float(all_mean(stats["first_ratio_dev"].max())),
            PPO.NUM_EOS: float(all_mean(rollout.ended.float().sum())) * plan.world,
            PPO.RESPONSE_LENGTH: float(all_mean(mask.sum(1).mean())),
            PPO.LR: self.actor.get_lr()[0],
            PPO.EPISODE: self.update * plan.episodes_per_update,
            **{PPO.time(k): v for k, v in seconds.items()},
            **{PPO.time(k): v for k, v in self.timer.take().items()},
            PPO.EPISODES_PER_S: plan.episodes_per_update / elapsed,
            PPO.TOKENS_PER_S: tokens / elapsed,
        }

    def _check_metrics(self, metrics: dict, mean_kl: float) -> None:
        """Stop on a non-finite metric; warn when the update runs away or KL leaves the budget."""
        cfg = self.cfg
        for k, v in metrics.items():
            if not math.isfinite(v):
                raise NonFiniteError(f"metric {k} is {v}; training stopped before any checkpoint of this state")
        if metrics[PPO.RATIO] > 3.0 or metrics[PPO.APPROXKL] > 1.0:
            warnings.warn(f"PPO update {self.update}: the policy ratio ({metrics[PPO.RATIO]:.2f}) or approx. KL "
                          f"({metrics[PPO.APPROXKL]:.3f}) is running away; lower ppo.learning_rate or ppo.ppo_epochs")
        if cfg.target_kl is None and mean_kl > 10 * max(cfg.kl_budget, 1e-6):
            warnings.warn(f"PPO update {self.update}: KL to the reference is {mean_kl:.2f}, "
                          f"far above ppo.kl_budget={cfg.kl_budget}")

    # --------------------------------------------------------------- checkpoints
    def _trained(self) -> dict[str, Any]:
        """The engines a checkpoint holds, by sub-directory: the actor, and the critic when there is one."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def save(self, ckpt_dir: Path, stream: PromptStream, extra: dict | None = None) -> None:
        """Collective: DeepSpeed state of the trained engines under one tag, then (rank 0) state.json
        last. `extra`: the run's own state for this checkpoint (returned by load as self.extra_state)."""
        tag = f"update-{self.update}"
        for name, engine in self._trained().items():
            # a 4-bit base is frozen and reloaded from the artifacts on resume: its packed weights (and
            # the quantization state bitsandbytes keeps beside them) stay out of the checkpoint
            engine.save_checkpoint(str(ckpt_dir / name), tag=tag, exclude_frozen_parameters=is_quantized(engine))
        faults.point("checkpoint:engines")
        rng = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
               "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}
        all_rng = all_gather_objects(rng)
        distributed.barrier()
        if distributed.is_main():
            names = sorted(self._trained())
            state = {"tag": tag, "update": self.update, "kl_ctl": self.kl_ctl.state_dict(),
                     "processes": self.plan.world, "engine_zero_stage": self.ds.zero_stage,
                     "engines": names, "prompt_position": stream.position, "rng": all_rng,
                     "extra": extra or {},
                     # the engines' files flushed to the disk, their sizes checked before a resume trusts them
                     "files": artifacts.seal(ckpt_dir, [ckpt_dir / n / tag for n in names])}
            current = ckpt_dir / "state.json"
            trusted = {f.name for f, _, problems in artifacts.ppo_states(ckpt_dir) if not problems}
            if "state.json" in trusted:  # the previous checkpoint stays, to fall back on if this one is torn
                os.replace(current, ckpt_dir / "state.prev.json")
            # (a torn state.json that this run passed over is replaced; a sound state.prev.json is kept)
            artifacts.write_durably(current, json.dumps(state))  # a checkpoint counts only once this exists
            faults.point("checkpoint:saved")
            keep = {tag} | {s.get("tag") for f, s, _ in artifacts.ppo_states(ckpt_dir)}
            for name in names:
                for old in (ckpt_dir / name).glob("update-*"):
                    if old.name not in keep:
                        shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def load(self, ckpt_dir: Path, stream: PromptStream) -> bool:
        """Collective: the newest checkpoint whose files match their sizes (artifacts.ppo_states), a
        damaged newer one passed over and said; False when there is none to resume from."""
        from rlhf.stage_io import say

        states = artifacts.ppo_states(ckpt_dir)
        for f, _, problems in states:
            if problems:
                say("ppo", f"passing over the checkpoint of {f.name}, which cannot be trusted: {'; '.join(problems[:3])}")
        usable = [s for _, s, problems in states if not problems]
        if not usable:
            if states:
                say("ppo", "no checkpoint can be trusted: PPO starts over")
            return False
        state = usable[0]
        layout = (state.get("processes", self.plan.world), state.get("engine_zero_stage", self.ds.zero_stage))
        if layout != (self.plan.world, self.ds.zero_stage):
            raise ArtifactError(f"{ckpt_dir}: this PPO checkpoint was written by {layout[0]} process(es) with engines at "
                                f"ZeRO stage {layout[1]}; resume it with {layout[0]} process(es), or start PPO over "
                                f"with force=true")
        saved = state.get("engines", ["actor", "critic"])
        if saved != sorted(self._trained()):
            raise ArtifactError(f"{ckpt_dir}: this PPO checkpoint holds {' and '.join(saved)}, this run trains "
                                f"{' and '.join(sorted(self._trained()))} (another ppo.advantage_estimator); resume "
                                f"with the estimator it was written with, or start PPO over with force=true")
        for name, engine in self._trained().items():
            # without its frozen 4-bit base (see save), whose quantization state is no parameter either
            engine.load_checkpoint(str(ckpt_dir / name), tag=state["tag"], load_module_strict=not is_quantized(engine))
        self.update = state["update"]
        self.extra_state = state.get("extra", {})
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        stream.position = state["prompt_position"]
        rngs = state.get("rng") or []
        if distributed.rank() < len(rngs):
            torch.set_rng_state(torch.tensor(rngs[distributed.rank()]["torch"], dtype=torch.uint8))
            py = rngs[distributed.rank()]["python"]
            random.setstate((py[0], tuple(py[1]), py[2]))
            cuda = rngs[distributed.rank()].get("cuda")
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
        self._weights_changed()
        return True
