"""Stage 2: a Bradley-Terry reward model on preference pairs and rankings (TRL's RewardTrainer)."""
from __future__ import annotations

import time

import torch
from datasets import Dataset

from rlhf import artifacts, distributed, engines, ensemble, faults, models
from rlhf.artifacts import REWARD, SFT
from rlhf.config import ConfigError, PipelineConfig, per_process, require
from rlhf.data import load_preferences, prompt_text, render_prompt, render_response
from rlhf.generation import Sampling
from rlhf.hf_training import TrackerCallback, last_checkpoint, train_loss, trainer_kwargs
from rlhf.metric_names import HEADLINE, HF
from rlhf.metric_names import Summary as S
from rlhf.reward_training import (WeightedPreferenceCollator, WeightedRewardTrainer, evaluate_pairs, response_length,
                                  rm_diagnostics)
from rlhf.scoring import load_gold_scorer, policy_reward_stats, spearman
from rlhf.tokenization import encode_pair
from rlhf.stage_io import finish, open_checkpoints, say, skip_if_up_to_date
from rlhf.tracking import Tracker


def run(cfg: PipelineConfig) -> artifacts.Artifact:
    started = time.time()
    reward_cfg, model_cfg = per_process(cfg, distributed.world_size()).reward, cfg.model
    config = cfg.to_dict()

    if reward_cfg.import_model:
        return _import(cfg, config, started)

    # 1. inputs ---------------------------------------------------------------------------
    train_src = require(reward_cfg.train_data, "reward.train_data", "the preference training file")
    sft = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, SFT), SFT)
    data = artifacts.data_fingerprint({"train_data": train_src, "eval_data": reward_cfg.eval_data})
    quant = models.stage_quantization(model_cfg, reward_cfg.lora, "reward.lora")
    done = skip_if_up_to_date(cfg.artifact_dir, REWARD, config, [sft], cfg.force, data)
    if done:
        return done
    # read before anything is written: a data error leaves no checkpoint dir behind
    skip = dict(max_skipped_fraction=reward_cfg.max_skipped_fraction, skip_key="reward.max_skipped_fraction")
    train = load_preferences(train_src, reward_cfg.pair_weighting, **skip)
    evals = load_preferences(reward_cfg.eval_data, "uniform", **skip) if reward_cfg.eval_data else None
    gold = load_gold_scorer(cfg.eval.gold_scorer) if cfg.eval.gold_scorer else None
    ckpt_dir, resuming, clock = open_checkpoints(cfg.artifact_dir, REWARD, config, data, started)
    distributed.seed_everything(cfg.seed)

    # 2. tokenizer and model: the SFT tokenizer, a one-output head on the SFT model by default
    tokenizer = models.load_tokenizer(str(sft.path))
    tok_fp = artifacts.tokenizer_fingerprint(tokenizer)
    artifacts.load(sft.path, SFT, tokenizer_fp=tok_fp, verify=False)  # its files were checked above
    init_path = reward_cfg.model or str(sft.path)
    if reward_cfg.model:
        other = models.load_tokenizer(reward_cfg.model, model_cfg.trust_remote_code)
        models.ensure_pad_token(other)
        if artifacts.tokenizer_fingerprint(other) != tok_fp:
            raise ConfigError(f"reward.model={reward_cfg.model} has a different tokenizer from the SFT artifact {sft.path}; "
                              "the reward model must share the policy's tokenizer (unset reward.model to start from the SFT model)")
    k = reward_cfg.ensemble
    model = models.load_reward_model(init_path, model_cfg.dtype, tokenizer.pad_token_id, model_cfg.trust_remote_code,
                                     quantization=quant, num_labels=k)
    model.config.num_labels = 1  # TRL's RewardTrainer insists; the K heads are split off at publishing
    models.resize_for_tokenizer(model, tokenizer)
    if reward_cfg.lora:
        model = models.add_lora(model, model_cfg.lora, "SEQ_CLS")
    use_template = sft.use_chat_template

    # 3. data: pairs -> token ids, truncation counted, pairs identical after truncation dropped
    train_rows, train_counts = encode_pairs(train.pairs, "train", tokenizer, use_template, reward_cfg.max_length)
    eval_rows, eval_counts = (encode_pairs(evals.pairs, "eval", tokenizer, use_template, reward_cfg.max_length)
                              if evals else (None, {}))
    columns = [{c: r[c] for c in ("chosen_ids", "rejected_ids", "margin", "weight")} for r in train_rows]
    if k > 1:  # each member's bootstrap of the pairs (rlhf.ensemble)
        for row, boot in zip(columns, ensemble.bootstrap_weights(len(columns), k, cfg.seed).tolist()):
            row["boot"] = boot
        say(REWARD, f"ensemble: {k} score heads on one body, each trained on its own bootstrap of the {len(columns)} pairs")
    train_ds = Dataset.from_list(columns)

    # 4. train ----------------------------------------------------------------------------
    from trl import RewardConfig

    ds_config = distributed.deepspeed_config(cfg.deepspeed, model_cfg.dtype)
    args = RewardConfig(**trainer_kwargs(reward_cfg, output_dir=ckpt_dir, ds_config=ds_config, seed=cfg.seed, dtype=model_cfg.dtype),
                        center_rewards_coefficient=reward_cfg.center_rewards_coefficient, disable_dropout=True,
                        remove_unused_columns=False)
    resume_from, resume_step = last_checkpoint(ckpt_dir, REWARD) if resuming else (None, None)
    tracker = Tracker(cfg.artifact_dir, REWARD, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(),
                      resume_step=resume_step, clock=clock)
    trainer = WeightedRewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                    data_collator=WeightedPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
                                    callbacks=[TrackerCallback(tracker)], groups=[r["group"] for r in train_rows])
    models.trainable_in_dtype(trainer.model, model_cfg.dtype)
    weights_mib = models.weights_mib(trainer.model)
    say(REWARD, f"model: {models.parameter_count(trainer.model) / 1e6:.2f}M parameters ({weights_mib:.4g} MiB)"
                + (f"; LoRA on a base in {models.trained_on(quant)}, the score head trains in {model_cfg.dtype}"
                   if quant is not None else ""))
    if resume_from:
        say(REWARD, f"resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    # over the whole training, resumed runs included (the trainer's own figures cover its last run)
    metrics: dict = {"weights_mib": round(weights_mib, 1),
                     S.TRAIN_LOSS: train_loss(trainer.state.log_history, result), "train_steps": result.global_step,
                     "ties_dropped": train.ties_dropped,
                     **{f"skipped_{k}": v for k, v in train.skipped.items()},
                     **{f"train_{k}": v for k, v in train_counts.items()}, **{f"eval_{k}": v for k, v in eval_counts.items()}}
    rm = trainer.model_wrapped if cfg.deepspeed.zero_stage == 3 else trainer.model
    held_out = None  # per-pair rewards of the held-out pairs, for the diagnostics below
    if eval_rows:
        figures, r_chosen, r_rejected = evaluate_pairs(rm, eval_rows, tokenizer.pad_token_id, reward_cfg.batch_size,
                                                       with_rewards=True)
        metrics.update(figures)
        held_out = (r_chosen, r_rejected, [r["chosen_len"] for r in eval_rows], [r["rejected_len"] for r in eval_rows])
        say(REWARD, f"held-out pairwise accuracy {metrics[S.EVAL_ACCURACY]:.3f} on {len(eval_rows)} pairs")

    # reward_stats (as PPO will sample and score) and the diagnostics
    stat_prompts = _stat_prompts(reward_cfg, evals, train)[: reward_cfg.stats_samples]
    reward_stats = measure(cfg, sft, rm, tokenizer, None, stat_prompts, gold, held_out, metrics)
    tracker.log({HF.row_name(k) if k.startswith("eval_") else k: v for k, v in metrics.items()
                 if isinstance(v, (int, float))}, step=result.global_step, summary=True)

    # 5. publish --------------------------------------------------------------------------
    staged = artifacts.staging_dir(cfg.artifact_dir, REWARD)
    models.publish_model(trainer.model_wrapped, cfg.deepspeed.zero_stage, staged, tokenizer)
    if k > 1 and distributed.is_main():  # a plain one-score model (the members' mean) + the members' heads
        ensemble.split_published_head(staged)
        say(REWARD, f"ensemble: member accuracies {metrics.get('eval_member_accuracy')}; the published model scores "
                    f"their mean, the {k} heads are in {ensemble.ENSEMBLE_FILE}")
    return finish(cfg.artifact_dir, REWARD, staged, ckpt_dir, tracker, clock, metrics,
                  HEADLINE[REWARD],
                  config=config, parents=[sft], tokenizer_fp=tok_fp, data=data, reward_stats=reward_stats,
                  model={"base": init_path, "lora": "merged" if reward_cfg.lora else None,
                         "quantization": models.trained_on(quant), "use_chat_template": use_template,
                         "ensemble": ({"members": k, "heads": ensemble.ENSEMBLE_FILE, "bootstrap": "poisson(1) per pair",
                                       "single_score": "the members' mean"} if k > 1 else None)})


def encode_pairs(pairs, name: str, tokenizer, use_template: bool, max_length: int) -> tuple[list[dict], dict]:
    """Preference pairs -> token ids (rlhf.tokenization, the one encoding of every stage), truncation
    counted, pairs identical after truncation dropped."""
    rows, truncated, identical = [], 0, 0
    for p in pairs:
        prompt = render_prompt(tokenizer, p.prompt, use_template)
        chosen, rejected = (render_response(tokenizer, p.prompt, r, use_template) for r in (p.chosen, p.rejected))
        ci, cp, ct = encode_pair(tokenizer, prompt, chosen, max_length)
        ri, rp, rt = encode_pair(tokenizer, prompt, rejected, max_length)
        truncated += ct or rt
        if ci == ri:
            identical += 1
            continue
        rows.append({"chosen_ids": ci, "rejected_ids": ri, "margin": p.margin, "weight": p.weight,
                     "group": p.group, "rank_distance": p.rank_distance,
                     "chosen_len": response_length(ci, cp, tokenizer.eos_token_id),
                     "rejected_len": response_length(ri, rp, tokenizer.eos_token_id)})
    say(REWARD, f"{name}: {len(rows)} pairs ({truncated} truncated to max_length={max_length}, "
                f"{identical} dropped as identical after truncation)")
    if not rows:
        raise ConfigError(f"{name}: no pair left after truncation; raise reward.max_length")
    return rows, {"pairs": len(rows), "truncated": truncated, "dropped_identical": identical}


def measure(cfg: PipelineConfig, sft: artifacts.Artifact, rm, tokenizer, bridge, stat_prompts: list, gold,
            held_out, metrics: dict) -> dict:
    """reward_stats: raw scores of SFT-policy responses sampled and scored exactly as PPO will
    (ppo.* sampling settings, generated ids; through `bridge` when the reward model has its own
    tokenizer), so PPO's normalised reference score is ~0. Adds the Spearman correlation with the
    gold scorer and the diagnostics (calibration and reward histograms on the held-out pairs,
    reward vs response length there and on these samples) to `metrics`. Collective."""
    model_cfg = cfg.model
    faults.point("evaluation:start")
    texts = [render_prompt(tokenizer, p, sft.use_chat_template) for p in stat_prompts]
    if bridge is not None:
        for t, p in zip(texts, stat_prompts):
            bridge.remember(t, p)
    policy = models.load_causal_lm(str(sft.path), model_cfg.dtype).to(distributed.device())
    gather, zero = cfg.deepspeed.zero3_gather_for_generation, cfg.deepspeed.zero_stage
    if zero == 3 and not gather:  # sharded by an inference engine whose hooks fetch per layer
        policy = distributed.make_inference(policy, zero, distributed.inference_config(cfg.deepspeed, model_cfg.dtype))
    pc = cfg.ppo
    engine = engines.build(pc.rollout_engine, policy, tokenizer, max_prompt_length=pc.max_prompt_length,
                           zero_stage=zero, gather=gather, vllm=cfg.vllm, dtype=model_cfg.dtype, seed=cfg.seed,
                           device=distributed.device())
    reward_stats, responses, scores = policy_reward_stats(engine, rm, tokenizer, texts, sampling=Sampling.of(pc),
                                                          max_new_tokens=pc.max_new_tokens,
                                                          batch_size=pc.forward_batch_size, bridge=bridge)
    engines.close(engine)
    del policy, engine
    if gold is not None:
        golds = [gold(prompt_text(p), r) for p, r in zip(stat_prompts, responses)]
        metrics[S.SPEARMAN_GOLD] = spearman(scores, golds)
        say(REWARD, f"Spearman(RM score, gold score) on {len(golds)} fresh SFT responses: {metrics[S.SPEARMAN_GOLD]:.3f}")
    # lengths in the policy's tokens, EOS not counted (the decoded texts re-encoded: generation returns texts here)
    sft_lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    metrics.update(rm_diagnostics(held_out, (scores, sft_lengths)))
    say(REWARD, (f"calibration ECE {metrics[S.CALIBRATION_ECE]:.3f} on the held-out pairs; " if held_out else "")
        + "Pearson(reward, response length) " + (f"{_fmt(metrics[S.LENGTH_REWARD_CORR])} held-out, " if held_out else "")
        + f"{_fmt(metrics[S.LENGTH_REWARD_CORR_SFT])} on SFT samples")
    for w in metrics[S.WARNINGS]:
        say(REWARD, f"warning: {w}")
    return reward_stats


def _import(cfg: PipelineConfig, config: dict, started: float) -> artifacts.Artifact:
    """reward.import_model: the reward model the user brings (any tokenizer), published as
    DIR/reward without training, with reward_stats measured on the SFT policy's samples as PPO draws
    them and, given reward.eval_data, its held-out accuracy (rlhf.imports)."""
    from rlhf import imports
    from rlhf.data import load_prompts
    from rlhf.scoring import TextBridge

    reward_cfg, model_cfg, source = cfg.reward, cfg.model, cfg.reward.import_model
    sft = artifacts.load(artifacts.stage_dir(cfg.artifact_dir, SFT), SFT)
    # the prompts reward_stats are measured on: the held-out preferences', else PPO's own
    prompt_src = {"eval_data": reward_cfg.eval_data} if reward_cfg.eval_data else {"stats_prompts": cfg.ppo.train_prompts}
    data = artifacts.data_fingerprint(prompt_src)
    done = skip_if_up_to_date(cfg.artifact_dir, REWARD, config, [sft], cfg.force, data)
    if done:
        return done
    skip = dict(max_skipped_fraction=reward_cfg.max_skipped_fraction, skip_key="reward.max_skipped_fraction")
    evals = load_preferences(reward_cfg.eval_data, "uniform", **skip) if reward_cfg.eval_data else None
    if evals is not None:
        stat_prompts = _stat_prompts(reward_cfg, evals, None)
    else:
        prompts = load_prompts(cfg.ppo.train_prompts)
        stat_prompts = [prompts[i % len(prompts)] for i in range(reward_cfg.stats_samples)]
    gold = load_gold_scorer(cfg.eval.gold_scorer) if cfg.eval.gold_scorer else None
    ckpt_dir, _, clock = open_checkpoints(cfg.artifact_dir, REWARD, config, data, started)
    distributed.seed_everything(cfg.seed)
    say(REWARD, f"importing the reward model {source} (reward.import_model): no reward training; "
                f"reward.train_data is not used")

    tokenizer = models.load_tokenizer(str(sft.path))  # the policy's
    model, rm_tok = imports.load_reward_model(source, model_cfg.dtype, model_cfg.trust_remote_code)
    imported = imports.provenance(source, model, rm_tok)
    rm_fp = artifacts.tokenizer_fingerprint(rm_tok)
    own_tokenizer = rm_fp != artifacts.tokenizer_fingerprint(tokenizer) or not models.has_score_head(model)
    use_template = model_cfg.use_chat_template
    bridge = TextBridge(tokenizer, rm_tok, use_template, imports.max_positions(model.config)) if own_tokenizer else None
    say(REWARD, f"{imported['model_class']}: {imported['parameters'] / 1e6:.2f}M parameters; "
                + ("its own tokenizer" + (" and chat template" if imported["chat_template"] and use_template else "")
                   + ": the policy's responses are decoded and re-encoded for it (scored on text)"
                   if own_tokenizer else "the policy's tokenizer: scored on the policy's token ids"))
    staged = artifacts.staging_dir(cfg.artifact_dir, REWARD)
    if distributed.is_main():  # the module as loaded, before a ZeRO-3 inference engine partitions it
        imports.save(model, rm_tok, staged)
    rm = model.to(distributed.device()).eval()
    if cfg.deepspeed.zero_stage == 3:
        rm = distributed.make_inference(rm, 3, distributed.inference_config(cfg.deepspeed, model_cfg.dtype))
    tracker = Tracker(cfg.artifact_dir, REWARD, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(), clock=clock)
    metrics: dict = {"imported": 1, "parameters": imported["parameters"]}
    held_out = None
    if evals is not None:
        eval_rows, counts = encode_pairs(evals.pairs, "eval", rm_tok, use_template, reward_cfg.max_length)
        metrics.update({f"eval_{k}": v for k, v in counts.items()})
        pad = rm_tok.pad_token_id if rm_tok.pad_token_id is not None else rm_tok.eos_token_id
        with torch.no_grad():
            figures, r_chosen, r_rejected = evaluate_pairs(rm, eval_rows, pad, reward_cfg.batch_size, with_rewards=True)
        metrics.update(figures)
        held_out = (r_chosen, r_rejected, [r["chosen_len"] for r in eval_rows], [r["rejected_len"] for r in eval_rows])
        say(REWARD, f"held-out pairwise accuracy {metrics[S.EVAL_ACCURACY]:.3f} on {len(eval_rows)} pairs")
    reward_stats = measure(cfg, sft, rm, tokenizer, bridge, stat_prompts, gold, held_out, metrics)
    tracker.log({HF.row_name(k) if k.startswith("eval_") else k: v for k, v in metrics.items()
                 if isinstance(v, (int, float))}, step=0, summary=True)
    score_head = models.has_score_head(rm)
    del rm, model
    return finish(cfg.artifact_dir, REWARD, staged, ckpt_dir, tracker, clock, metrics, HEADLINE[REWARD],
                  config=config, parents=[sft], tokenizer_fp=rm_fp, data=data, reward_stats=reward_stats,
                  imported=imported,
                  model={"base": source, "lora": None, "use_chat_template": use_template,
                         "own_tokenizer": own_tokenizer, "score_head": score_head})


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _stat_prompts(reward_cfg, evals, train) -> list:
    """stats_samples prompts for reward_stats: the held-out ones when there are, one per
    preference row, repeated in order when there are fewer rows than samples."""
    groups: dict[int, object] = {}
    for p in (evals or train).pairs:
        groups.setdefault(p.group, p.prompt)
    prompts = list(groups.values())
    return [prompts[i % len(prompts)] for i in range(reward_cfg.stats_samples)]
