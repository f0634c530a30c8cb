"""HF generate() with exactly the sampling PPO scores with: the primitives of the HF rollout engine
(rlhf.engines.hf), through which PPO rollouts, evaluation, reward statistics and `rlhf generate` sample."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from rlhf.models import unwrap
from rlhf.tokenization import clip_text, encode_prompt, pad_batch


@dataclass(frozen=True)
class Sampling:
    """The distribution responses are drawn from. PPO computes every log-prob from this same
    distribution (rlhf.ppo.core.sampling_logits), so nothing else may shape it: a checkpoint's
    generation_config.json (repetition_penalty, no_repeat_ngram_size, min_new_tokens, its own
    top_k ...) is set aside for the call."""

    temperature: float = 1.0
    top_k: int = 0        # 0 = off
    top_p: float = 1.0    # 1.0 = off
    do_sample: bool = True

    @staticmethod
    def of(settings: Any) -> "Sampling":
        """The sampling that `settings` (the ppo config section: temperature, top_k, top_p) describe:
        PPO's rollouts, and the reward stage's reward_stats, which must match them."""
        return Sampling(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)


GREEDY = Sampling(do_sample=False)


def clean_generation_config(tokenizer: Any, max_new_tokens: int, sampling: Sampling) -> Any:
    """A GenerationConfig with every processor off except the sampling settings given.
    Values are explicit (top_k=0, not None) because generate() fills None from its own
    defaults (top_k=50)."""
    from transformers import GenerationConfig

    kw: dict = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True,
                    min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    if sampling.do_sample:
        kw.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    else:
        kw.update(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)
    return GenerationConfig(**kw)


@contextmanager
def only_generation_config(model: Any, gen_cfg: Any) -> Iterator[None]:
    """generate() merges the model's own generation_config into the one it is given; swap it out."""
    inner = unwrap(model)
    saved = inner.generation_config
    inner.generation_config = gen_cfg
    try:
        yield
    finally:
        inner.generation_config = saved


@dataclass
class Generated:
    query_ids: torch.Tensor      # (B, Q) left-padded prompt ids
    query_mask: torch.Tensor     # (B, Q) 1 on prompt tokens
    response_ids: torch.Tensor   # (B, R) right-padded response ids, cut after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including EOS
    ended: torch.Tensor          # (B,) bool: the response ends with EOS (not truncated)
    logprobs: torch.Tensor | None = None  # (B, R) log-prob of each sampled token under `sampling`; 0 on padding


class SampledLogProbs:
    """A logits processor placed after generate()'s own (temperature, top-k, top-p): it sees the
    exact distribution each token is drawn from, and keeps log p(sampled token) per step.

    Only one step's (B, V) scores are held at a time: on each call the token sampled from the
    previous step's scores is the last column of `input_ids`; `finish` takes the final one."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def _take(self, tokens: torch.Tensor) -> torch.Tensor:
        s = self._last
        return s.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(s, dim=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self.steps.append(self._take(input_ids[:, -1]))
        self._last = scores
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, steps) float32 log-probs of the generated tokens."""
        if self._last is not None:
            self.steps.append(self._take(sequences[:, -1]))
            self._last = None
        if not self.steps:
            return torch.zeros((sequences.shape[0], 0), device=sequences.device)
        return torch.stack(self.steps, dim=1).float()


def encode_prompts(tokenizer: Any, texts: list[str], max_prompt_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q) left-padded ids and mask; prompts longer than max_prompt_length keep their end."""
    enc = [encode_prompt(tokenizer, clip_text(t, max_prompt_length, "end"))[-max_prompt_length:] for t in texts]
    return pad_batch(enc, tokenizer.pad_token_id, "left", device)


def truncate_at_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad everything after the first EOS. Returns (ids (B, R), mask (B, R), ended (B,))."""
    is_eos = response_ids == eos_id
    ended = is_eos.any(dim=1)
    # position of the first EOS, or R when there is none
    first = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, response_ids.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = (positions[None, :] <= first[:, None]).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, ended


def _warpers(sampling: Sampling) -> Any:
    """generate()'s own sampling warpers for `sampling`, in its order (temperature, top-k, top-p)."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = LogitsProcessorList()
    if sampling.do_sample and sampling.temperature != 1.0:
        out.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.do_sample and sampling.top_k > 0:
        out.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.do_sample and sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=sampling.top_p))
    return out


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt_texts: list[str], *, max_new_tokens: int, sampling: Sampling,
             max_prompt_length: int = 512, device: torch.device | None = None, synced_gpus: bool = False,
             with_logprobs: bool = False) -> Generated:
    """Sample (or greedily decode) one response per prompt from exactly `sampling`.
    `synced_gpus` keeps ZeRO-3 ranks in lock-step when their weights are not gathered for the call.
    `with_logprobs`: also return the log-prob of every sampled token, read off the generation
    pass itself (PPO's old log-probs without another forward)."""
    device = device or next(model.parameters()).device
    q_ids, q_mask = encode_prompts(tokenizer, prompt_texts, max_prompt_length, device)
    recorder = SampledLogProbs() if with_logprobs else None
    extra = {}
    if recorder:  # generate() puts its own warpers after custom processors: here they are ours, before the recorder
        extra["logits_processor"] = _warpers(sampling) + [recorder]
        if sampling.do_sample:
            sampling = Sampling()
    gen_cfg = clean_generation_config(tokenizer, max_new_tokens, sampling)
    with only_generation_config(model, gen_cfg):
        out = model.generate(input_ids=q_ids, attention_mask=q_mask, generation_config=gen_cfg, synced_gpus=synced_gpus,
                             **extra)
    resp = out[:, q_ids.shape[1]:]
    logp = recorder.finish(out) if recorder else None
    if resp.shape[1] == 0:  # a batch that produced nothing: keep one padded column for uniform shapes
        resp = torch.full((len(prompt_texts), 1), tokenizer.pad_token_id, dtype=torch.long, device=device)
        logp = torch.zeros(resp.shape, device=device) if recorder else None
    r_ids, r_mask, ended = truncate_at_eos(resp, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if logp is not None:  # padding after EOS was never sampled: its "log-prob" (often -inf) is set to 0
        logp = torch.where(r_mask.bool(), logp, torch.zeros_like(logp))
    return Generated(q_ids, q_mask, r_ids, r_mask, ended, logp)


def decode_responses(tokenizer: Any, g: Generated) -> list[str]:
    """Response texts without EOS and padding."""
    out = []
    for ids, mask in zip(g.response_ids, g.response_mask):
        keep = [int(t) for t, m in zip(ids, mask) if m and int(t) != tokenizer.eos_token_id]
        out.append(tokenizer.decode(keep, skip_special_tokens=False))
    return out
