"""Stage 1: supervised fine-tuning with TRL's SFTTrainer, loss on completion tokens only."""
from __future__ import annotations

import json
import time

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf import artifacts, distributed, models
from rlhf.artifacts import SFT
from rlhf.config import ConfigError, PipelineConfig, per_process, require
from rlhf.data import load_sft, prompt_text, render_prompt, render_response
from rlhf.metric_names import HEADLINE
from rlhf.metric_names import Summary as S
from rlhf.hf_training import TrackerCallback, last_checkpoint, train_loss, trainer_kwargs, untrained_eval_loss
from rlhf.tokenization import encode_conversation, encode_pair
from rlhf.stage_io import finish, open_checkpoints, say, skip_if_up_to_date
from rlhf.tracking import Tracker


def run(cfg: PipelineConfig) -> artifacts.Artifact:
    started = time.time()
    sft_cfg, model_cfg = per_process(cfg, distributed.world_size()).sft, cfg.model
    config = cfg.to_dict()

    if sft_cfg.import_model:
        return _import(cfg, config, started)

    # 1. inputs ---------------------------------------------------------------------------
    train_src = require(sft_cfg.train_data, "sft.train_data", "the SFT training file")
    if model_cfg.name_or_path is None and model_cfg.scratch is None:
        raise ConfigError("set model.name_or_path (hub id or local dir) or model.scratch (a from-scratch spec)")
    if sft_cfg.lora and model_cfg.name_or_path is None:
        raise ConfigError("sft.lora=true needs a pretrained base (model.name_or_path); a scratch model trains all weights")
    quant = models.stage_quantization(model_cfg, sft_cfg.lora, "sft.lora")
    data = artifacts.data_fingerprint({"train_data": train_src, "eval_data": sft_cfg.eval_data})
    done = skip_if_up_to_date(cfg.artifact_dir, SFT, config, [], cfg.force, data)
    if done:
        return done
    # read before anything is written: a data error leaves no checkpoint dir behind
    train_data = load_sft(train_src, max_skipped_fraction=sft_cfg.max_skipped_fraction, skip_key="sft.max_skipped_fraction")
    eval_data = load_sft(sft_cfg.eval_data, max_skipped_fraction=sft_cfg.max_skipped_fraction,
                         skip_key="sft.max_skipped_fraction") if sft_cfg.eval_data else None
    ckpt_dir, resuming, clock = open_checkpoints(cfg.artifact_dir, SFT, config, data, started)
    distributed.seed_everything(cfg.seed)
    train_rows = train_data.examples
    eval_rows = eval_data.examples if eval_data else None

    # 2. tokenizer and model --------------------------------------------------------------
    tok_dir = ckpt_dir / "tokenizer"
    if model_cfg.scratch is not None:
        if distributed.is_main() and not (tok_dir / "tokenizer.json").is_file():
            # trained once, on rank 0, and kept with the checkpoints so a resumed run reuses it
            texts = [prompt_text(r.prompt) + r.completion for r in train_rows]
            models.train_scratch_tokenizer(texts, model_cfg.scratch.vocab_size).save_pretrained(str(tok_dir))
        distributed.barrier()
        tokenizer = models.load_tokenizer(str(tok_dir))
        model = models.build_scratch_causal_lm(model_cfg.scratch, tokenizer, model_cfg.dtype)
    else:
        tokenizer = models.load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code)
        models.ensure_pad_token(tokenizer, f"model.name_or_path={model_cfg.name_or_path}")
        models.check_causal(model_cfg.name_or_path, "model.name_or_path", model_cfg.trust_remote_code)
        model = models.load_causal_lm(model_cfg.name_or_path, model_cfg.dtype, model_cfg.trust_remote_code,
                                      quantization=quant)
    models.resize_for_tokenizer(model, tokenizer)
    if sft_cfg.lora:
        model = models.add_lora(model, model_cfg.lora, "CAUSAL_LM")
    weights_mib = models.weights_mib(model)
    say(SFT, f"model: {models.parameter_count(model) / 1e6:.2f}M parameters ({weights_mib:.4g} MiB), "
             f"vocabulary {len(tokenizer)}, {distributed.world_size()} process(es), ZeRO-{cfg.deepspeed.zero_stage}"
             + (f"; base in {models.trained_on(quant)}" if quant is not None else ""))

    # 3. data: token ids made here, by the same functions the RM and PPO stages use, so PPO
    #    samples after exactly the prompt ids SFT trained on (TRL gets them pre-tokenized)
    def to_dataset(rows, name):
        examples, truncated, dropped = [], 0, 0
        for i, r in enumerate(rows, 1):
            if sft_cfg.loss_on == "all" and r.messages:
                try:
                    ids, mask, cut = encode_conversation(tokenizer, r.messages, model_cfg.use_chat_template,
                                                         sft_cfg.max_length)
                except ValueError as e:
                    raise ConfigError(f"sft.loss_on=all, {name} example {i}: {e}") from None
            else:
                prompt = render_prompt(tokenizer, r.prompt, model_cfg.use_chat_template)
                completion = render_response(tokenizer, r.prompt, r.completion, model_cfg.use_chat_template)
                ids, n_prompt, cut = encode_pair(tokenizer, prompt, completion, sft_cfg.max_length)
                mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
            if any(mask):
                truncated += cut
                examples.append({"input_ids": ids, "completion_mask": mask})
            else:  # no response token left within max_length: nothing to learn from
                dropped += 1
        say(SFT, f"{name}: {len(examples)} examples ({truncated} truncated to sft.max_length={sft_cfg.max_length}, "
                 f"{dropped} dropped with no response token left)")
        if not examples:
            raise ConfigError(f"{name}: no example keeps a response token within "
                              f"sft.max_length={sft_cfg.max_length}; raise it")
        return Dataset.from_list(examples), truncated, dropped

    train_ds, train_truncated, train_dropped = to_dataset(train_rows, "train")
    eval_ds = to_dataset(eval_rows, "eval")[0] if eval_rows else None

    # 4. train ----------------------------------------------------------------------------
    ds_config = distributed.deepspeed_config(cfg.deepspeed, model_cfg.dtype)
    args = SFTConfig(**trainer_kwargs(sft_cfg, output_dir=ckpt_dir, ds_config=ds_config, seed=cfg.seed,
                                      dtype=model_cfg.dtype),
                     completion_only_loss=True, packing=sft_cfg.packing, dataset_num_proc=None)
    resume_from, resume_step = last_checkpoint(ckpt_dir, SFT) if resuming else (None, None)
    tracker = Tracker(cfg.artifact_dir, SFT, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(),
                      resume_step=resume_step, clock=clock)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[TrackerCallback(tracker)])
    models.trainable_in_dtype(trainer.model, model_cfg.dtype)
    metrics: dict = {"weights_mib": round(weights_mib, 1), "train_rows": train_data.rows, "train_examples": len(train_ds), "train_truncated": train_truncated,
                     "train_dropped_no_response_left": train_dropped,
                     **{f"skipped_{k}": v for k, v in train_data.skipped.items()}}
    initial_file = ckpt_dir / "initial_eval.json"
    if eval_ds is not None:
        if resume_from is None:  # the untrained model's held-out loss, the baseline the result is judged by
            metrics[S.EVAL_LOSS_INITIAL] = untrained_eval_loss(trainer)
            if distributed.is_main():
                initial_file.write_text(json.dumps({S.EVAL_LOSS_INITIAL: metrics[S.EVAL_LOSS_INITIAL]}))
        elif initial_file.is_file():
            metrics.update(json.loads(initial_file.read_text()))
    if resume_from:
        say(SFT, f"resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    # over the whole training, resumed runs included (the trainer's own figures cover its last run)
    metrics.update({S.TRAIN_LOSS: train_loss(trainer.state.log_history, result), "train_steps": result.global_step})
    if eval_ds is not None:
        metrics[S.EVAL_LOSS] = trainer.evaluate()["eval_loss"]

    # 5. publish --------------------------------------------------------------------------
    staged = artifacts.staging_dir(cfg.artifact_dir, SFT)
    models.publish_model(trainer.model_wrapped, cfg.deepspeed.zero_stage, staged, tokenizer)
    return finish(cfg.artifact_dir, SFT, staged, ckpt_dir, tracker, clock, metrics,
                  HEADLINE[SFT],
                  config=config, parents=[], tokenizer_fp=artifacts.tokenizer_fingerprint(tokenizer), data=data,
                  model={"base": model_cfg.name_or_path or "scratch", "lora": "merged" if sft_cfg.lora else None,
                         "quantization": models.trained_on(quant),
                         "use_chat_template": model_cfg.use_chat_template, "loss_on": sft_cfg.loss_on})


def _import(cfg: PipelineConfig, config: dict, started: float) -> artifacts.Artifact:
    """sft.import_model: the policy the user brings, published as DIR/sft without training (rlhf.imports)."""
    from rlhf import imports

    source, model_cfg = cfg.sft.import_model, cfg.model
    done = skip_if_up_to_date(cfg.artifact_dir, SFT, config, [], cfg.force)
    if done:
        return done
    ckpt_dir, _, clock = open_checkpoints(cfg.artifact_dir, SFT, config, None, started)
    say(SFT, f"importing the policy {source} (sft.import_model): no SFT training; sft.train_data and "
             f"model.name_or_path are not used")
    tracker = Tracker(cfg.artifact_dir, SFT, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(), clock=clock)
    staged = artifacts.staging_dir(cfg.artifact_dir, SFT)
    imported, tok_fp = None, None
    if distributed.is_main():  # one copy, written once; the other processes wait in finish()
        model, tokenizer = imports.load_policy(source, model_cfg.dtype, model_cfg.trust_remote_code)
        imported, tok_fp = imports.provenance(source, model, tokenizer), artifacts.tokenizer_fingerprint(tokenizer)
        imports.save(model, tokenizer, staged)
        say(SFT, f"{imported['model_class']}: {imported['parameters'] / 1e6:.2f}M parameters, vocabulary "
                 f"{imported['vocabulary']}, chat template: {'yes' if imported['chat_template'] else 'no'}"
                 + (" (prompts rendered with it)" if imported["chat_template"] and model_cfg.use_chat_template else ""))
        del model
    metrics = {"imported": 1, "parameters": imported["parameters"] if imported else None}
    return finish(cfg.artifact_dir, SFT, staged, ckpt_dir, tracker, clock, metrics, HEADLINE[SFT],
                  config=config, parents=[], tokenizer_fp=tok_fp, data=None, imported=imported,
                  model={"base": source, "lora": None, "use_chat_template": model_cfg.use_chat_template})
