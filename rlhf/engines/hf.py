"""The HF engine: transformers' generate() on the live policy module.

It shares its parameters with the trainer, so a weight sync copies nothing; it records the
version. Under ZeRO-3 the whole model is gathered once per `generate` call (or, with
deepspeed.zero3_gather_for_generation=false, fetched layer by layer with the ranks in step):
see rlhf.distributed.for_generation."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf import distributed
from rlhf.generation import Generated, Sampling, generate


class HFEngine:
    kind = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, max_prompt_length: int, zero_stage: int = 0, gather: bool = True,
                 adapter_disabled: bool = False, device: torch.device | None = None):
        """`model`: a DeepSpeed engine or a plain (peft) module; `adapter_disabled`: sample from a
        LoRA model's base (the adapter switched off for each call); `device`: where prompts go
        (default: the model's)."""
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_length, self.zero_stage, self.gather = max_prompt_length, zero_stage, gather
        self.adapter_disabled = adapter_disabled
        self.device = device
        self.version = 0

    def sync_weights(self, version: int) -> None:
        self.version = version  # the live parameters are the trainer's own

    def describe(self) -> str:
        where = "the live module" + (" with its adapter disabled" if self.adapter_disabled else "")
        if self.zero_stage == 3:
            where += ", gathered once per call" if self.gather else ", fetched layer by layer"
        return f"hf generate() on {where}"

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling, max_new_tokens: int, *, batch_size: int | None = None,
                 with_logprobs: bool = False, progress: bool = False) -> list[Generated]:
        module = getattr(self.model, "module", self.model)
        module.eval()  # sampling never runs in train mode (gradient checkpointing would switch the cache off)
        adapter_off = module.disable_adapter() if self.adapter_disabled else nullcontext()
        size = batch_size or max(1, len(prompts))
        out = []
        with adapter_off, distributed.for_generation(self.model, self.zero_stage, self.gather) as (model, synced):
            for s in tqdm(range(0, len(prompts), size), desc="generating", disable=not progress, leave=False):
                out.append(generate(model, self.tokenizer, prompts[s:s + size], max_new_tokens=max_new_tokens,
                                    sampling=sampling, max_prompt_length=self.max_prompt_length, device=self.device,
                                    synced_gpus=synced, with_logprobs=with_logprobs))
        return out
