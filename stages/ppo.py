"""Stage 3: PPO against the reward model with a per-token KL penalty to the frozen SFT policy."""
from __future__ import annotations

import dataclasses
import json
import time

from rlhf import artifacts, distributed, models
from rlhf.artifacts import PPO, REWARD, SFT
from rlhf.config import PipelineConfig, per_process, require
from rlhf.data import load_prompts, render_prompt
from rlhf.generation import Sampling
from rlhf.metric_names import HEADLINE
from rlhf.ppo.layout import from_artifacts
from rlhf.ppo.run import PPORun
from rlhf.ppo.trainer import CRITIC_DIR, PPOTrainer, PromptStream
from transformers import AutoConfig

from rlhf.imports import max_positions
from rlhf.ppo.core import advantage_estimator
from rlhf.scoring import TextBridge, load_gold_scorer, reward_stats_sampling
from rlhf.stage_io import finish, open_checkpoints, say, skip_if_up_to_date
from rlhf.tracking import FINAL_SAMPLES_TABLE, Tracker


def run(cfg: PipelineConfig) -> artifacts.Artifact:
    started = time.time()
    ppo_cfg, model_cfg = per_process(cfg, distributed.world_size()).ppo, cfg.model
    config = cfg.to_dict()

    # 1. inputs ---------------------------------------------------------------------------
    train_src = require(ppo_cfg.train_prompts, "ppo.train_prompts", "the prompts PPO rolls out on")
    sft = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, SFT), SFT)
    tokenizer = models.load_tokenizer(str(sft.path))
    tok_fp = artifacts.tokenizer_fingerprint(tokenizer)
    rm_art = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, REWARD), REWARD)
    artifacts.check_lineage(rm_art, sft)
    data = artifacts.data_fingerprint({"train_prompts": train_src, "eval_prompts": ppo_cfg.eval_prompts})
    quant = models.stage_quantization(model_cfg, ppo_cfg.lora, "ppo.lora")
    done = skip_if_up_to_date(cfg.artifact_dir, PPO, config, [sft, rm_art], cfg.force, data)
    if done:
        return done
    # read before anything is written: a data error leaves no checkpoint dir behind
    train_prompts = load_prompts(train_src)  # rendered when drawn (PromptStream)
    eval_prompts = load_prompts(ppo_cfg.eval_prompts)[: cfg.eval.num_prompts] if ppo_cfg.eval_prompts else []
    gold = load_gold_scorer(cfg.eval.gold_scorer) if cfg.eval.gold_scorer else None
    reward_stats = rm_art.manifest["reward_stats"]
    _check_reward_stats(reward_stats, ppo_cfg, rm_art.path)
    _check_ensemble(rm_art, ppo_cfg)
    ckpt_dir, resuming, clock = open_checkpoints(cfg.artifact_dir, PPO, config, data, started)
    distributed.seed_everything(cfg.seed + distributed.rank())

    bridge = _reward_bridge(rm_art, tokenizer, tok_fp)  # a reward model of its own tokenizer scores text

    # 2. models: actor from SFT; reference = frozen SFT (or the actor without its adapter);
    #    critic from the RM when the estimator needs one; the RM itself frozen (rlhf.ppo.layout)
    dtype = model_cfg.dtype
    four = from_artifacts(_layout(ppo_cfg, bridge), model_cfg.lora, dtype, sft_path=str(sft.path),
                          rm_path=str(rm_art.path), pad_token_id=tokenizer.pad_token_id,
                          rm_pad_token_id=_pad_id(bridge.rm_tok) if bridge is not None else None,
                          quantization=quant)
    weights_mib = models.weights_mib(four.actor, four.reference, four.critic, four.reward)
    say(PPO, f"models: {weights_mib:.4g} MiB of weights (actor, reference, critic and reward model, shared weights once)")

    # 3. data -----------------------------------------------------------------------------
    def render(prompt) -> str:
        text = render_prompt(tokenizer, prompt, sft.use_chat_template)
        return bridge.remember(text, prompt) if bridge is not None else text

    stream = PromptStream(train_prompts, cfg.seed, distributed.rank(), distributed.world_size(), render=render)

    # 4. train ----------------------------------------------------------------------------
    trainer = PPOTrainer(cfg=ppo_cfg, ds=cfg.deepspeed, dtype=dtype, actor_model=four.actor, critic_model=four.critic,
                         reward_model=four.reward, ref_model=four.reference, tokenizer=tokenizer, reward_stats=reward_stats,
                         vllm=cfg.vllm, seed=cfg.seed, reward_bridge=bridge)
    resumed = resuming and trainer.load(ckpt_dir, stream)
    if resumed:
        say(PPO, f"resuming from update {trainer.update} (kl_coef={trainer.kl_ctl.value:.4g})")
    tracker = Tracker(cfg.artifact_dir, PPO, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(),
                      resume_step=trainer.update if resumed else None, clock=clock)
    plan = trainer.plan
    per_update = (f"{plan.episodes_per_update} episodes" if plan.samples_per_prompt == 1 else
                  f"{plan.episodes_per_update} episodes ({plan.rollout_batch * plan.world} prompts x {plan.samples_per_prompt})")
    say(PPO, f"{plan.num_updates} updates x {per_update}, {trainer.describe()}")
    ppo_run = PPORun(trainer, ckpt_dir=ckpt_dir, eval_cfg=cfg.eval, eval_prompts=eval_prompts, render=render, gold=gold)
    ppo_run.train(stream, tracker)

    # 5. evaluate and publish -----------------------------------------------------------------
    evaluation, samples = ppo_run.final_evaluation()
    staged = artifacts.staging_dir(cfg.artifact_dir, PPO)
    trainer.save_models(staged)
    if distributed.is_main():
        with (staged / artifacts.SAMPLES).open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in samples)
        columns = [c for c in FINAL_SAMPLE_COLUMNS if any(c in row for row in samples)]
        tracker.table(FINAL_SAMPLES_TABLE, columns, [[row.get(c) for c in columns] for row in samples])
    critic = {"critic": None} if trainer.critic is None else {
        "critic": f"{CRITIC_DIR}/", "critic_value_scale": {"mean": trainer.value_scale[0], "std": trainer.value_scale[1],
                                                           "meaning": "values in PPO units = (head output - mean) / std"}}
    return finish(cfg.artifact_dir, PPO, staged, ckpt_dir, tracker, clock,
                  {**ppo_run.summary(evaluation, started), "weights_mib": round(weights_mib, 1)},
                  HEADLINE[PPO], config=config, parents=[sft, rm_art], tokenizer_fp=tok_fp, data=data,
                  reward_stats=reward_stats, model={"base": str(sft.path), "lora": "merged" if ppo_cfg.lora else None,
                         "quantization": models.trained_on(quant), "use_chat_template": sft.use_chat_template, **critic,
                                                    "reward_scored_on": "text" if bridge is not None else "tokens"})


# ppo/samples.jsonl's fields, in the order of W&B's final_samples table
FINAL_SAMPLE_COLUMNS = ("prompt", "sft_response", "response", "rm_score_sft", "rm_score", "gold_score_sft", "gold_score")


def _reward_bridge(rm_art: artifacts.Artifact, tokenizer, tok_fp: dict) -> TextBridge | None:
    """A TextBridge when the reward artifact's tokenizer is not the policy's (reward.import_model of
    another family or chat template) or its model has no per-token `score` head; else None."""
    if rm_art.manifest.get("tokenizer") == tok_fp and rm_art.manifest.get("model", {}).get("score_head", True):
        return None
    rm_tok = models.load_tokenizer(str(rm_art.path))
    templated = rm_art.use_chat_template and getattr(rm_tok, "chat_template", None)
    say(PPO, f"the reward model {rm_art.path} has its own tokenizer: each response is decoded and re-encoded for it as "
             "its reward stage encoded pairs" + (" (its chat template)" if templated else ""))
    return TextBridge(tokenizer, rm_tok, rm_art.use_chat_template,
                      max_positions(AutoConfig.from_pretrained(str(rm_art.path))))


def _layout(ppo_cfg, bridge: TextBridge | None):
    """The ppo section the models are arranged by: a reward model of another tokenizer cannot be the critic."""
    if bridge is None or not ppo_cfg.critic_from_reward or not advantage_estimator(ppo_cfg.advantage_estimator).needs_critic:
        return ppo_cfg
    say(PPO, "the critic starts from the policy with a new value head: a reward model of another tokenizer cannot "
             "read the policy's tokens (ppo.critic_from_reward applies to a reward model that shares them)")
    return dataclasses.replace(ppo_cfg, critic_from_reward=False)


def _check_ensemble(rm_art: artifacts.Artifact, ppo_cfg) -> None:
    """A single reward model makes ppo.reward_aggregation moot, which is said. (An ensemble's heads
    file is one of the artifact's files: artifacts.load has checked it is there and intact.)"""
    if not rm_art.manifest["reward_stats"].get("members") and ppo_cfg.reward_aggregation != "mean":
        say(PPO, f"ppo.reward_aggregation={ppo_cfg.reward_aggregation} has no effect: the reward model {rm_art.path} "
                 "is a single model (train an ensemble with reward.ensemble=K)")


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _check_reward_stats(reward_stats: dict, ppo_cfg, rm_path) -> None:
    """reward_stats must come from responses sampled as this PPO run samples them."""
    want = reward_stats_sampling(Sampling.of(ppo_cfg), ppo_cfg.max_new_tokens, ppo_cfg.max_prompt_length)
    have = reward_stats.get("sampling")
    if have is not None and have != want:
        diff = ", ".join(f"ppo.{k}={want[k]} (reward_stats: {have.get(k)})" for k in want if have.get(k) != want[k])
        raise artifacts.ArtifactError(
            f"{rm_path}: its reward_stats were measured on responses sampled differently from this PPO run ({diff}); "
            f"re-run the reward stage with the same ppo settings ({artifacts.REBUILD[REWARD]}) or use its settings")
