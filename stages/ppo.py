"""Stage 3: PPO against the reward model with a per-token KL penalty to the frozen SFT policy."""
from __future__ import annotations

import json
import time
from pathlib import Path


from rlhf import artifacts, distributed, faults, models
from rlhf.artifacts import PPO, REWARD, SFT
from rlhf.config import ConfigError, PipelineConfig, require
from rlhf.data import load_prompts, render_prompt
from rlhf.metric_names import HEADLINE, Eval
from rlhf.metric_names import PPO as PPOMetrics
from rlhf.metric_names import Summary as S
from rlhf.ppo.evaluation import Drawn, Selector, best_of_n, evaluate, held_out_point, sample_rows
from rlhf.ppo.trainer import PPOTrainer, PromptStream, distinct_count
from rlhf.scoring import load_gold_scorer
from rlhf.stage_io import finish, open_checkpoints, say, skip_if_up_to_date
from rlhf.tracking import Tracker


def run(cfg: PipelineConfig) -> artifacts.Artifact:
    started = time.time()
    ppo_cfg, model_cfg = cfg.ppo, cfg.model
    config = cfg.to_dict()

    # 1. inputs ---------------------------------------------------------------------------
    train_src = require(ppo_cfg.train_prompts, "ppo.train_prompts", "the prompts PPO rolls out on")
    sft = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, SFT), SFT)
    tokenizer = models.load_tokenizer(str(sft.path))
    tok_fp = artifacts.tokenizer_fingerprint(tokenizer)
    rm_art = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, REWARD), REWARD, tokenizer_fp=tok_fp)
    data = artifacts.data_fingerprint({"train_prompts": train_src, "eval_prompts": ppo_cfg.eval_prompts})
    done = skip_if_up_to_date(cfg.artifact_dir, PPO, config, [sft, rm_art], cfg.force, data)
    if done:
        return done
    # read before anything is written: a data error leaves no checkpoint dir behind
    use_template = sft.use_chat_template
    train_prompts = load_prompts(train_src)  # rendered when drawn (PromptStream)
    eval_raw = load_prompts(ppo_cfg.eval_prompts)[: cfg.eval.num_prompts] if ppo_cfg.eval_prompts else []
    gold = load_gold_scorer(cfg.eval.gold_scorer) if cfg.eval.gold_scorer else None
    reward_stats = rm_art.manifest["reward_stats"]
    _check_reward_stats(reward_stats, ppo_cfg, rm_art.path)
    ckpt_dir, resuming, clock = open_checkpoints(cfg.artifact_dir, PPO, config, data, started)
    distributed.seed_everything(cfg.seed + distributed.rank())

    # 2. models: actor from SFT; reference = frozen SFT (or the actor without its adapter);
    #    critic from the RM; the RM itself frozen
    actor = models.load_causal_lm(str(sft.path), model_cfg.dtype)
    if model_cfg.dtype == "float32":
        actor.config.use_cache = True
    ref = None
    if ppo_cfg.lora:
        actor = models.add_lora(actor, model_cfg.lora, "CAUSAL_LM")
    else:
        ref = models.load_causal_lm(str(sft.path), model_cfg.dtype)
    critic_src = str(rm_art.path) if ppo_cfg.critic_from_reward else str(sft.path)
    critic = models.load_reward_model(critic_src, model_cfg.dtype, tokenizer.pad_token_id)
    if ppo_cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and without a loss on every layer
        for m in (actor, critic):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reward_model = None  # LoRA critic on the RM: the reward model is the critic with its adapter disabled
    if ppo_cfg.lora and ppo_cfg.critic_lora:
        critic = models.add_lora(critic, model_cfg.lora, "SEQ_CLS")
    if not (ppo_cfg.lora and ppo_cfg.critic_lora and ppo_cfg.critic_from_reward):
        reward_model = models.load_reward_model(str(rm_art.path), model_cfg.dtype, tokenizer.pad_token_id)

    # 3. data -----------------------------------------------------------------------------
    stream = PromptStream(train_prompts, cfg.seed, distributed.rank(), distributed.world_size(),
                          render=lambda p: render_prompt(tokenizer, p, use_template))

    # 4. train ----------------------------------------------------------------------------
    trainer = PPOTrainer(cfg=ppo_cfg, ds=cfg.deepspeed, dtype=model_cfg.dtype, actor_model=actor, critic_model=critic,
                         reward_model=reward_model, ref_model=ref, tokenizer=tokenizer, reward_stats=reward_stats)
    resumed = resuming and trainer.load(ckpt_dir, stream)
    if resumed:
        say(PPO, f"resuming from update {trainer.update} (kl_coef={trainer.kl_ctl.value:.4g})")
    tracker = Tracker(cfg.artifact_dir, PPO, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(),
                      resume_step=trainer.update if resumed else None, clock=clock)
    plan = trainer.plan
    say(PPO, f"{plan.num_updates} updates x {plan.episodes_per_update} episodes, {trainer.describe()}")
    # held-out evaluation every eval.every updates, the over-optimisation guard and the best-of-n baseline
    eval_texts = [render_prompt(tokenizer, p, use_template) for p in eval_raw]
    eval_tokens = cfg.eval.max_new_tokens or ppo_cfg.max_new_tokens
    every = cfg.eval.every or max(1, plan.num_updates // 8)
    selector = Selector(_guard_metric(ppo_cfg.keep_best, gold), ppo_cfg.kl_budget, ppo_cfg.early_stop)
    if "selector" in trainer.extra_state:
        selector.load_state_dict(trainer.extra_state["selector"])
    bon = trainer.extra_state.get("best_of_n")
    if bon is None and eval_raw and cfg.eval.best_of_n:
        n_p = cfg.eval.best_of_n_prompts
        bon = best_of_n(trainer, eval_raw[:n_p], eval_texts[:n_p], gold, cfg.eval.best_of_n, eval_tokens)
        say(PPO, "best-of-n baseline: " + ", ".join(
            f"n={r['n']} rm={r['rm_score']:.3f}" + (f" gold={r['gold_score']:.3f}" if r["gold_score"] is not None else "")
            for r in bon))
    best_dir = ckpt_dir / "best"

    def best_path(update: int) -> Path:  # the guard's best policy so far, referenced by the checkpoints
        return best_dir / f"update-{update}.safetensors"

    # samples of held-out evaluations the final evaluation would draw again: the SFT policy's
    # (update 0, when the reference samples as the policy does) and those of the policy to publish
    drawn: dict[str, Drawn] = {}

    def evaluate_now() -> tuple[dict, str | None]:
        point, samples = held_out_point(trainer, eval_raw, eval_texts, gold, eval_tokens)
        new_best, stop = selector.observe(trainer.update, point)
        if trainer.update == 0 and trainer.reference_sampling == trainer.sampling:
            drawn["sft"] = samples
        if new_best or selector.metric is None:
            drawn["policy"] = samples
        if new_best and selector.metric is not None:  # kept on disk, so that a kill does not lose it
            trainer.save_policy_weights(best_path(trainer.update))
        return point, stop

    stop_reason, metrics = None, {}
    if eval_raw and not selector.curve:  # update 0: the SFT policy itself
        point, stop_reason = evaluate_now()
        tracker.log({**point, PPOMetrics.EPISODE: 0}, step=0)
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.num_updates, initial=trainer.update, desc="ppo", disable=not distributed.is_main())
    t_loop = time.time()
    while trainer.update < plan.num_updates and stop_reason is None:
        metrics = trainer.step(stream.next(plan.rollout_batch))
        metrics[PPOMetrics.DISTINCT_PROMPTS] = distinct_count(stream.drawn)  # rows of the prompt file, all ranks
        point = {}
        if eval_raw and (trainer.update % every == 0 or trainer.update == plan.num_updates):
            point, stop_reason = evaluate_now()
        tracker.log({**metrics, **point}, step=trainer.update)
        faults.point("train:step")
        bar.update(1)
        bar.set_postfix(score=f"{metrics[PPOMetrics.SCORES]:.3f}", kl=f"{metrics[PPOMetrics.KL]:.3f}")
        if trainer.update % ppo_cfg.sample_every == 0 and eval_raw:
            tracker.table(f"samples/update_{trainer.update}", ["update", "prompt", "response", "rm_score"],
                          sample_rows(trainer, eval_raw[:8], use_template))
        if trainer.update % ppo_cfg.save_every == 0 and trainer.update < plan.num_updates and stop_reason is None:
            trainer.save(ckpt_dir, stream, extra={"selector": selector.state_dict(), "best_of_n": bon})
            if distributed.is_main():  # best-policy files of updates the checkpoint no longer refers to
                for f in best_dir.glob("update-*.safetensors"):
                    if f != best_path(selector.best_update):
                        f.unlink(missing_ok=True)
    bar.close()
    stop_reason = stop_reason or "completed"
    selected = trainer.update
    if selector.metric is not None and selector.best_update is not None and selector.best_update != trainer.update:
        trainer.load_policy_weights(best_path(selector.best_update))
        selected = selector.best_update
    if stop_reason != "completed" or selected != trainer.update:
        say(PPO, f"stopped: {stop_reason} after update {trainer.update}; publishing the policy of update {selected} "
                 f"({selector.metric} {selector.best_value if selector.best_value is None else round(selector.best_value, 4)})")

    # 5. evaluate and publish -----------------------------------------------------------------
    t_eval = time.time()
    faults.point("evaluation:start")
    policy_drawn = drawn.get("policy")
    if policy_drawn is not None and policy_drawn.update != selected:  # a later update's: not the one published
        policy_drawn = None
    evaluation, samples = (evaluate(trainer, eval_raw, use_template, gold, eval_tokens, policy=policy_drawn,
                                    sft=drawn.get("sft")) if eval_raw else ({}, []))
    # where this invocation's time went (a resumed run's loop covers only its own updates)
    seconds = {"setup_s": t_loop - started, "loop_s": t_eval - t_loop, "evaluation_s": time.time() - t_eval}
    final = metrics
    result_metrics = {S.UPDATES: trainer.update, "episodes": trainer.update * plan.episodes_per_update,
                      S.SELECTED_UPDATE: selected, S.STOP_REASON: stop_reason, S.GUARD_METRIC: selector.metric,
                      S.EVAL_CURVE: [_curve_row(p) for p in selector.curve], S.BEST_OF_N: bon or [],
                      "final_objective_scores": final.get(PPOMetrics.SCORES), "final_objective_kl": final.get(PPOMetrics.KL),
                      "final_kl_coef": trainer.kl_ctl.value, S.KL_BUDGET: ppo_cfg.kl_budget, **evaluation,
                      **{f"time_{k}": v for k, v in seconds.items()}}
    if S.KL_PPO_VS_SFT in evaluation:
        result_metrics["within_kl_budget"] = evaluation[S.KL_PPO_VS_SFT] <= ppo_cfg.kl_budget
    staged = artifacts.staging_dir(cfg.artifact_dir, PPO)
    trainer.save_models(staged)
    if distributed.is_main():
        with (staged / artifacts.SAMPLES).open("w") as f:
            for row in samples:
                f.write(json.dumps(row) + "\n")
    return finish(cfg.artifact_dir, PPO, staged, ckpt_dir, tracker, clock, result_metrics,
                  HEADLINE[PPO],
                  config=config, parents=[sft, rm_art], tokenizer_fp=tok_fp, data=data, reward_stats=reward_stats,
                  model={"base": str(sft.path), "lora": "merged" if ppo_cfg.lora else None, "use_chat_template": use_template,
                         "critic": "critic/",
                         "critic_value_scale": {"mean": trainer.value_scale[0], "std": trainer.value_scale[1],
                                                "meaning": "values in PPO units = (head output - mean) / std"}})


def _guard_metric(keep_best: str, gold) -> str | None:
    """The eval/* metric the published policy is chosen by (ppo.keep_best); None: the last update."""
    if keep_best == "auto":
        return Eval.GOLD_SCORE if gold is not None else Eval.RM_SCORE
    if keep_best == "last":
        return None
    if keep_best == "gold_score" and gold is None:
        raise ConfigError("ppo.keep_best=gold_score needs eval.gold_scorer; use rm_score, auto or last")
    return Eval.of(keep_best)


def _curve_row(point: dict) -> dict:
    return {"update": point["update"], "kl": point[Eval.KL_TO_SFT], "rm_score": point[Eval.RM_SCORE],
            "gold_score": point.get(Eval.GOLD_SCORE), "response_length": point[Eval.RESPONSE_LENGTH],
            "eos_rate": point[Eval.EOS_RATE]}


def _check_reward_stats(reward_stats: dict, ppo_cfg, rm_path) -> None:
    """reward_stats must come from responses sampled as this PPO run samples them."""
    want = {"temperature": ppo_cfg.temperature, "top_k": ppo_cfg.top_k, "top_p": ppo_cfg.top_p,
            "max_new_tokens": ppo_cfg.max_new_tokens,
            "max_prompt_length": ppo_cfg.max_prompt_length}
    have = reward_stats.get("sampling")
    if have is not None and have != want:
        diff = ", ".join(f"ppo.{k}={want[k]} (reward_stats: {have.get(k)})" for k in want if have.get(k) != want[k])
        raise artifacts.ArtifactError(
            f"{rm_path}: its reward_stats were measured on responses sampled differently from this PPO run ({diff}); "
            f"re-run the reward stage with the same ppo settings ({artifacts.REBUILD[REWARD]}) or use its settings")
