"""Glue shared by the stages that train with TRL's trainers (SFT and reward model):
training arguments from the stage config, metric forwarding, resume, and the
collective save that precedes a publish."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from rlhf import artifacts, distributed, faults
from rlhf.config import RewardStageConfig, SFTStageConfig
from rlhf.metric_names import HF
from rlhf.tracking import Tracker


def trainer_kwargs(stage_cfg: SFTStageConfig | RewardStageConfig, *, output_dir: Path, ds_config: dict, seed: int,
                   dtype: str) -> dict:
    """TrainingArguments fields common to SFTConfig and RewardConfig, from a stage section."""
    return dict(
        output_dir=str(output_dir),
        deepspeed=ds_config,
        num_train_epochs=stage_cfg.epochs,
        learning_rate=stage_cfg.learning_rate,
        lr_scheduler_type=stage_cfg.lr_scheduler,
        warmup_steps=stage_cfg.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=stage_cfg.weight_decay,
        per_device_train_batch_size=stage_cfg.batch_size,
        per_device_eval_batch_size=stage_cfg.batch_size,
        gradient_accumulation_steps=stage_cfg.grad_accum,
        max_grad_norm=stage_cfg.max_grad_norm,
        gradient_checkpointing=stage_cfg.gradient_checkpointing,
        save_strategy="steps",
        save_steps=stage_cfg.save_steps,
        save_total_limit=2,
        logging_steps=stage_cfg.logging_steps,
        eval_strategy="no",
        report_to="none",
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not distributed.is_main(),
        max_length=stage_cfg.max_length,
        # on CPU, keep the accelerate state that distributed.init_distributed set up for DeepSpeed
        accelerator_config={"use_configured_state": not torch.cuda.is_available()},
    )


def last_checkpoint(ckpt_dir: Path, stage: str) -> tuple[str, int] | tuple[None, None]:
    """(path, step) of the newest `checkpoint-N` whose seal holds, or (None, None). A newer one that
    is damaged (a torn file, no seal) is passed over, said, and renamed `checkpoint-N.damaged` by
    rank 0, so that training from the older one writes its own checkpoint-N afresh."""
    from rlhf.stage_io import say

    found = artifacts.hf_checkpoints(ckpt_dir)
    newest = found[-1][0] if found else -1
    for step, p in artifacts.hf_checkpoints(ckpt_dir, verified=False):
        problems = artifacts.checkpoint_problems(p)
        if step > newest and problems:
            say(stage, f"passing over {p.name}, which cannot be trusted: {'; '.join(problems[:3])}")
            if distributed.is_main():
                os.replace(p, p.with_name(p.name + ".damaged"))
    if not found:
        return None, None
    return str(found[-1][1]), found[-1][0]


def seal_checkpoint(args: Any, state: Any) -> None:
    """After the trainer's collective save of checkpoint-N: rank 0 flushes its files to the disk and
    writes their sizes into its seal (artifacts.seal), which resume requires."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's shards written
    if state.is_world_process_zero:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if path.is_dir():
            sizes = artifacts.seal(path, [path])
            artifacts.write_durably(path / artifacts.CKPT_SEAL, json.dumps({"files": sizes}))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class TrackerCallback(TrainerCallback):
    """Forwards the trainer's logs to the Tracker (JSONL + W&B), names prefixed by split."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.ended = False

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
        seal_checkpoint(args, state)
        if self.tracker.clock is not None:
            self.tracker.clock.tick(force=True)
        faults.point("checkpoint:saved")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
        faults.point("train:step")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
        self.ended = True  # what is logged from now on (final evaluation) is an end-of-run row

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - HF signature
        if not logs:
            return
        out = {}
        for k, v in logs.items():
            if not isinstance(v, (int, float)):
                continue
            out[HF.row_name(k)] = v
        end = self.ended or "train_runtime" in logs  # the trainer's end-of-training totals, final evaluation
        if end and "train_loss" in out:
            out["train_loss"] = logged_train_loss(state.log_history) or out["train_loss"]
        out["epoch"] = state.epoch
        self.tracker.log(out, step=state.global_step, summary=end)


def train_loss(log_history: list[dict], result: Any) -> float:
    """The training loss of the whole training (logged_train_loss); the trainer's own figure when
    training was shorter than one logging interval (then it is the same thing)."""
    logged = logged_train_loss(log_history)
    return logged if logged is not None else result.training_loss


def logged_train_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over every logged step of the whole training, resumed runs included.
    Each logged `loss` is the mean over the steps since the previous log, so it is weighted by
    them. (The trainer's own train_loss divides the loss summed in its last invocation by all
    steps: 0.0 after a resume at the final step.) The log history travels in checkpoints."""
    total, steps, prev = 0.0, 0, 0
    for e in log_history:
        if "loss" in e and "step" in e and e["step"] > prev:
            total += float(e["loss"]) * (e["step"] - prev)
            steps += e["step"] - prev
            prev = e["step"]
    return total / steps if steps else None


def untrained_eval_loss(trainer: Any, max_examples: int = 512) -> float:
    """Token-weighted held-out loss of the model as it is before training (the trainer's own
    evaluate() cannot run before its DeepSpeed engine exists under ZeRO 0-2)."""
    import torch
    from torch.utils.data import DataLoader

    ds = trainer.eval_dataset
    ds = ds.select(range(min(len(ds), max_examples)))
    loader = DataLoader(ds, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    model = trainer.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            labels = batch["labels"]
            n = int((labels[:, 1:] != -100).sum())  # the loss is a mean over shifted label tokens
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)
