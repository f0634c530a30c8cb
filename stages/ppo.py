"""Stage 3: PPO against the reward model with a per-token KL penalty to the frozen SFT policy."""
from __future__ import annotations

import json
import statistics
import time

import torch

from rlhf import artifacts, distributed, faults, models
from rlhf.artifacts import PPO, REWARD, SFT
from rlhf.config import PipelineConfig, require
from rlhf.data import load_prompts, prompt_text, render_prompt
from rlhf.generation import decode_responses
from rlhf.ppo.trainer import PPOTrainer, PromptStream
from rlhf.scoring import load_gold_scorer
from rlhf.stage_io import finish, open_checkpoints, say, skip_if_up_to_date
from rlhf.tracking import Tracker


def run(cfg: PipelineConfig) -> artifacts.Artifact:
    started = time.time()
    c, mc = cfg.ppo, cfg.model
    config = cfg.to_dict()

    # 1. inputs ---------------------------------------------------------------------------
    train_src = require(c.train_prompts, "ppo.train_prompts", "the prompts PPO rolls out on")
    sft = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, SFT), SFT)
    tokenizer = models.load_tokenizer(str(sft.path))
    tok_fp = artifacts.tokenizer_fingerprint(tokenizer)
    rm_art = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, REWARD), REWARD, tokenizer_fp=tok_fp)
    data = artifacts.data_fingerprint({"train_prompts": train_src, "eval_prompts": c.eval_prompts})
    done = skip_if_up_to_date(cfg.artifact_dir, PPO, config, [sft, rm_art], cfg.force, data)
    if done:
        return done
    # read before anything is written: a data error leaves no checkpoint dir behind
    use_template = sft.manifest.get("model", {}).get("use_chat_template", mc.use_chat_template)
    train_prompts = load_prompts(train_src)  # rendered when drawn (PromptStream)
    eval_raw = load_prompts(c.eval_prompts)[: cfg.eval.num_prompts] if c.eval_prompts else []
    gold = load_gold_scorer(cfg.eval.gold_scorer) if cfg.eval.gold_scorer else None
    reward_stats = rm_art.manifest["reward_stats"]
    _check_reward_stats(reward_stats, c, rm_art.path)
    ckpt_dir, resuming, clock = open_checkpoints(cfg.artifact_dir, PPO, config, data, started)
    distributed.seed_everything(cfg.seed + distributed.rank())

    # 2. models: actor from SFT; reference = frozen SFT (or the actor without its adapter);
    #    critic from the RM; the RM itself frozen
    actor = models.load_causal_lm(str(sft.path), mc.dtype)
    if mc.dtype == "float32":
        actor.config.use_cache = True
    ref = None
    if c.lora:
        actor = models.add_lora(actor, mc.lora, "CAUSAL_LM")
    else:
        ref = models.load_causal_lm(str(sft.path), mc.dtype)
    critic_src = str(rm_art.path) if c.critic_from_reward else str(sft.path)
    critic = models.load_reward_model(critic_src, mc.dtype, tokenizer.pad_token_id)
    if c.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and without a loss on every layer
        for m in (actor, critic):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reward_model = None  # LoRA critic on the RM: the reward model is the critic with its adapter disabled
    if c.lora and c.critic_lora:
        critic = models.add_lora(critic, mc.lora, "SEQ_CLS")
    if not (c.lora and c.critic_lora and c.critic_from_reward):
        reward_model = models.load_reward_model(str(rm_art.path), mc.dtype, tokenizer.pad_token_id)

    # 3. data -----------------------------------------------------------------------------
    stream = PromptStream(train_prompts, cfg.seed, distributed.rank(), distributed.world_size(),
                          render=lambda p: render_prompt(tokenizer, p, use_template))

    # 4. train ----------------------------------------------------------------------------
    trainer = PPOTrainer(cfg=c, ds=cfg.deepspeed, dtype=mc.dtype, actor_model=actor, critic_model=critic,
                         reward_model=reward_model, ref_model=ref, tokenizer=tokenizer, reward_stats=reward_stats,
                         tracker=None)
    if resuming and trainer.load(ckpt_dir, stream):
        say(PPO, f"resuming from update {trainer.update} (kl_coef={trainer.kl_ctl.value:.4g})")
    tracker = Tracker(cfg.artifact_dir, PPO, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(),
                      resume_step=trainer.update if trainer.update else None, clock=clock)
    plan = trainer.plan
    zero = f"ZeRO-{cfg.deepspeed.zero_stage}"
    if trainer.ds.zero_stage != cfg.deepspeed.zero_stage:
        zero += " configured (one process, no offload: engines unpartitioned, stage 0)"
    say(PPO, f"{plan.num_updates} updates x {plan.episodes_per_update} episodes, {plan.world} process(es), "
             f"{zero}, {_model_layout(trainer)}")
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.num_updates, initial=trainer.update, desc="ppo", disable=not distributed.is_main())
    t_loop = time.time()
    while trainer.update < plan.num_updates:
        metrics = trainer.step(stream.next(plan.rollout_batch))
        tracker.log(metrics, step=trainer.update)
        faults.point("train:step")
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if trainer.update % c.sample_every == 0 and eval_raw:
            _sample_table(trainer, eval_raw[:8], use_template, tracker)
        if trainer.update % c.save_every == 0 and trainer.update < plan.num_updates:
            trainer.save(ckpt_dir, stream)
    bar.close()

    # 5. evaluate and publish -----------------------------------------------------------------
    t_eval = time.time()
    faults.point("evaluation:start")
    eval_tokens = cfg.eval.max_new_tokens or c.max_new_tokens
    evaluation, samples = evaluate(trainer, eval_raw, use_template, gold, eval_tokens) if eval_raw else ({}, [])
    # where this invocation's time went (a resumed run's loop covers only its own updates)
    seconds = {"setup_s": t_loop - started, "loop_s": t_eval - t_loop, "evaluation_s": time.time() - t_eval}
    final = {k: v for k, v in metrics.items()} if plan.num_updates else {}
    result_metrics = {"updates": trainer.update, "episodes": trainer.update * plan.episodes_per_update,
                      "final_objective_scores": final.get("objective/scores"), "final_objective_kl": final.get("objective/kl"),
                      "final_kl_coef": trainer.kl_ctl.value, "kl_budget": c.kl_budget, **evaluation,
                      **{f"time_{k}": v for k, v in seconds.items()}}
    if "kl_ppo_vs_sft" in evaluation:
        result_metrics["within_kl_budget"] = evaluation["kl_ppo_vs_sft"] <= c.kl_budget
    staged = artifacts.staging_dir(cfg.artifact_dir, PPO)
    trainer.save_models(staged)
    if distributed.is_main():
        with (staged / artifacts.SAMPLES).open("w") as f:
            for row in samples:
                f.write(json.dumps(row) + "\n")
    return finish(cfg.artifact_dir, PPO, staged, ckpt_dir, tracker, clock, result_metrics,
                  ["gold_score_sft", "gold_score_ppo", "rm_score_sft", "rm_score_ppo", "kl_ppo_vs_sft", "win_rate_gold"],
                  config=config, parents=[sft, rm_art], tokenizer_fp=tok_fp, data=data, reward_stats=reward_stats,
                  model={"base": str(sft.path), "lora": "merged" if c.lora else None, "use_chat_template": use_template,
                         "critic": "critic/",
                         "critic_value_scale": {"mean": trainer.value_scale[0], "std": trainer.value_scale[1],
                                                "meaning": "values in PPO units = (head output - mean) / std"}})


def _check_reward_stats(reward_stats: dict, c, rm_path) -> None:
    """reward_stats must come from responses sampled as this PPO run samples them."""
    want = {"temperature": c.temperature, "top_k": c.top_k, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
            "max_prompt_length": c.max_prompt_length}
    have = reward_stats.get("sampling")
    if have is not None and have != want:
        diff = ", ".join(f"ppo.{k}={want[k]} (reward_stats: {have.get(k)})" for k in want if have.get(k) != want[k])
        raise artifacts.ArtifactError(
            f"{rm_path}: its reward_stats were measured on responses sampled differently from this PPO run ({diff}); "
            f"re-run the reward stage with the same ppo settings ({artifacts.REBUILD[REWARD]}) or use its settings")


def _model_layout(trainer: PPOTrainer) -> str:
    actor = "LoRA actor, reference = its base" if trainer.lora else "full actor, frozen reference copy"
    critic = ("LoRA critic, reward model = its base" if trainer.critic_lora
              else ("LoRA critic" if hasattr(trainer.critic.module, "disable_adapter") else "full critic")
              + ", frozen reward model")
    return f"{actor}; {critic}"


@torch.no_grad()
def evaluate(trainer: PPOTrainer, prompts: list, use_template: bool, gold, max_new_tokens: int) -> tuple[dict, list[dict]]:
    """SFT vs PPO on held-out prompts: RM score, gold score, KL(PPO||SFT), win rates, length, EOS rate."""
    tokenizer = trainer.tok
    texts = [render_prompt(tokenizer, p, use_template) for p in prompts]
    torch.manual_seed(12345)
    ppo_g, ppo_rm = trainer.sample(texts, max_new_tokens=max_new_tokens)
    torch.manual_seed(12345)
    sft_g, sft_rm = trainer.sample(texts, reference=True, max_new_tokens=max_new_tokens, sampling=trainer.ref_sampling)
    kl = torch.cat([trainer.kl_to_reference(g) for g in ppo_g])
    ppo_txt = [t for g in ppo_g for t in decode_responses(tokenizer, g)]
    sft_txt = [t for g in sft_g for t in decode_responses(tokenizer, g)]

    def length(gs):
        return float(torch.cat([g.response_mask.sum(1) for g in gs]).float().mean())

    def eos_rate(gs):
        return float(torch.cat([g.ended for g in gs]).float().mean())

    out = {"eval_prompts": len(prompts), "rm_score_sft": float(sft_rm.mean()), "rm_score_ppo": float(ppo_rm.mean()),
           "win_rate_rm": float((ppo_rm > sft_rm).float().mean() + 0.5 * (ppo_rm == sft_rm).float().mean()),
           "kl_ppo_vs_sft": float(kl.mean()), "response_length_sft": length(sft_g), "response_length_ppo": length(ppo_g),
           "eos_rate_sft": eos_rate(sft_g), "eos_rate_ppo": eos_rate(ppo_g)}
    samples = [{"prompt": prompt_text(p), "response": r, "sft_response": s, "rm_score": float(a), "rm_score_sft": float(b)}
               for p, r, s, a, b in zip(prompts, ppo_txt, sft_txt, ppo_rm, sft_rm)]
    if gold is not None:
        g_ppo = [gold(prompt_text(p), r) for p, r in zip(prompts, ppo_txt)]
        g_sft = [gold(prompt_text(p), r) for p, r in zip(prompts, sft_txt)]
        sd = statistics.pstdev(g_sft) or 1.0
        out.update(gold_score_sft=statistics.fmean(g_sft), gold_score_ppo=statistics.fmean(g_ppo), gold_score_sft_std=sd,
                   gold_gain_in_sft_std=(statistics.fmean(g_ppo) - statistics.fmean(g_sft)) / sd,
                   win_rate_gold=sum((a > b) + 0.5 * (a == b) for a, b in zip(g_ppo, g_sft)) / len(g_ppo))
        for row, a, b in zip(samples, g_ppo, g_sft):
            row.update(gold_score=a, gold_score_sft=b)
    return out, samples


def _sample_table(trainer: PPOTrainer, prompts: list, use_template: bool, tracker: Tracker) -> None:
    texts = [render_prompt(trainer.tok, p, use_template) for p in prompts]
    gs, scores = trainer.sample(texts)
    responses = [t for g in gs for t in decode_responses(trainer.tok, g)]
    tracker.table("samples", ["update", "prompt", "response", "rm_score"],
                  [[trainer.update, prompt_text(p), r, float(s)] for p, r, s in zip(prompts, responses, scores)])
