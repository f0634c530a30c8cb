"""Stage 1: supervised fine-tuning with TRL's SFTTrainer, loss on completion tokens only."""
from __future__ import annotations

import json
import shutil
import time

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf import artifacts, distributed, models
from rlhf.artifacts import SFT
from rlhf.config import ConfigError, PipelineConfig, require
from rlhf.data import load_sft, prompt_text, render_prompt, render_response
from rlhf.hf_training import TrackerCallback, last_checkpoint, trainer_kwargs, untrained_eval_loss
from rlhf.tokenization import encode_conversation, encode_pair
from rlhf.stage_io import say, skip_if_up_to_date, summary_line
from rlhf.tracking import Tracker


def run(cfg: PipelineConfig) -> artifacts.Artifact:
    started = time.time()
    c, mc = cfg.sft, cfg.model
    config = cfg.to_dict()

    # 1. inputs ---------------------------------------------------------------------------
    train_src = require(c.train_data, "sft.train_data", "the SFT training file")
    if mc.name_or_path is None and mc.scratch is None:
        raise ConfigError("set model.name_or_path (hub id or local dir) or model.scratch (a from-scratch spec)")
    if c.lora and mc.name_or_path is None:
        raise ConfigError("sft.lora=true needs a pretrained base (model.name_or_path); a scratch model trains all weights")
    data = artifacts.data_fingerprint({"train_data": train_src, "eval_data": c.eval_data})
    done = skip_if_up_to_date(cfg.artifact_dir, SFT, config, [], cfg.force, data)
    if done:
        return done
    ckpt_dir, resuming = distributed.broadcast_object(
        artifacts.prepare_checkpoints(cfg.artifact_dir, SFT, config, data) if distributed.is_main() else None)
    distributed.barrier()
    distributed.seed_everything(cfg.seed)
    train_data = load_sft(train_src, max_skipped_fraction=c.max_skipped_fraction, skip_key="sft.max_skipped_fraction")
    eval_data = load_sft(c.eval_data, max_skipped_fraction=c.max_skipped_fraction,
                         skip_key="sft.max_skipped_fraction") if c.eval_data else None
    train_rows = train_data.examples
    eval_rows = eval_data.examples if eval_data else None

    # 2. tokenizer and model --------------------------------------------------------------
    tok_dir = ckpt_dir / "tokenizer"
    if mc.scratch is not None:
        if distributed.is_main() and not (tok_dir / "tokenizer.json").is_file():
            # trained once, on rank 0, and kept with the checkpoints so a resumed run reuses it
            texts = [prompt_text(r.prompt) + r.completion for r in train_rows]
            models.train_scratch_tokenizer(texts, mc.scratch.vocab_size).save_pretrained(str(tok_dir))
        distributed.barrier()
        tokenizer = models.load_tokenizer(str(tok_dir))
        model = models.build_scratch_causal_lm(mc.scratch, tokenizer, mc.dtype)
    else:
        tokenizer = models.load_tokenizer(mc.name_or_path, mc.trust_remote_code)
        models.ensure_pad_token(tokenizer)
        model = models.load_causal_lm(mc.name_or_path, mc.dtype, mc.trust_remote_code)
    models.resize_for_tokenizer(model, tokenizer)
    if c.lora:
        model = models.add_lora(model, mc.lora, "CAUSAL_LM")
    say(SFT, f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"vocabulary {len(tokenizer)}, {distributed.world_size()} process(es), ZeRO-{cfg.deepspeed.zero_stage}")

    # 3. data: token ids made here, by the same functions the RM and PPO stages use, so PPO
    #    samples after exactly the prompt ids SFT trained on (TRL gets them pre-tokenized)
    def to_dataset(rows, name):
        examples, truncated = [], 0
        for i, r in enumerate(rows, 1):
            if c.loss_on == "all" and r.messages:
                try:
                    ids, mask, cut = encode_conversation(tokenizer, r.messages, mc.use_chat_template, c.max_length)
                except ValueError as e:
                    raise ConfigError(f"sft.loss_on=all, {name} example {i}: {e}") from None
            else:
                prompt = render_prompt(tokenizer, r.prompt, mc.use_chat_template)
                completion = render_response(tokenizer, r.prompt, r.completion, mc.use_chat_template)
                ids, n_prompt, cut = encode_pair(tokenizer, prompt, completion, c.max_length)
                mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
            truncated += cut
            if any(mask):
                examples.append({"input_ids": ids, "completion_mask": mask})
        say(SFT, f"{name}: {len(examples)} examples ({truncated} truncated to sft.max_length={c.max_length})")
        if not examples:
            raise ConfigError(f"{name}: no example keeps a response token within sft.max_length={c.max_length}; raise it")
        return Dataset.from_list(examples), truncated

    train_ds, train_truncated = to_dataset(train_rows, "train")
    eval_ds, _ = to_dataset(eval_rows, "eval") if eval_rows else (None, 0)

    # 4. train ----------------------------------------------------------------------------
    ds_config = distributed.deepspeed_config(cfg.deepspeed, mc.dtype)
    args = SFTConfig(**trainer_kwargs(c, output_dir=ckpt_dir, ds_config=ds_config, seed=cfg.seed, dtype=mc.dtype),
                     completion_only_loss=True, packing=c.packing, dataset_num_proc=None)
    resume_from = last_checkpoint(ckpt_dir) if resuming else None
    resume_step = int(resume_from.rsplit("-", 1)[1]) if resume_from else None
    tracker = Tracker(cfg.artifact_dir, SFT, cfg.run_name, config, cfg.wandb, enabled=distributed.is_main(),
                      resume_step=resume_step)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[TrackerCallback(tracker)])
    metrics: dict = {"train_rows": train_data.rows, "train_examples": len(train_ds), "train_truncated": train_truncated,
                     **{f"skipped_{k}": v for k, v in train_data.skipped.items()}}
    initial_file = ckpt_dir / "initial_eval.json"
    if eval_ds is not None:
        if resume_from is None:  # the untrained model's held-out loss, the baseline the result is judged by
            metrics["eval_loss_initial"] = untrained_eval_loss(trainer)
            if distributed.is_main():
                initial_file.write_text(json.dumps({"eval_loss_initial": metrics["eval_loss_initial"]}))
        elif initial_file.is_file():
            metrics.update(json.loads(initial_file.read_text()))
    if resume_from:
        say(SFT, f"resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics.update(train_loss=result.training_loss, train_steps=result.global_step,
                   train_runtime_s=result.metrics.get("train_runtime"))
    if eval_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    # 5. publish --------------------------------------------------------------------------
    staged = artifacts.staging_dir(cfg.artifact_dir, SFT)
    models.publish_model(trainer.model_wrapped, cfg.deepspeed.zero_stage, staged, tokenizer)
    art = None
    if distributed.is_main():
        manifest = artifacts.build_manifest(
            SFT, config, parents=[], tokenizer_fp=artifacts.tokenizer_fingerprint(tokenizer),
            data=data,
            metrics=metrics, started=started,
            model={"base": mc.name_or_path or "scratch", "lora": "merged" if c.lora else None,
                   "use_chat_template": mc.use_chat_template, "loss_on": c.loss_on})
        art = artifacts.publish(cfg.artifact_dir, SFT, staged, manifest)
        tracker.summary(metrics)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    tracker.finish()
    distributed.barrier()
    art = art or artifacts.load(artifacts.stage_dir(cfg.artifact_dir, SFT), SFT)
    summary_line(SFT, art, ["eval_loss_initial", "eval_loss", "train_loss"])
    return art
