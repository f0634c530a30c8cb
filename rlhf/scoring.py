"""The reward model's side of the pipeline, shared by RM training and evaluation and by the reward
statistics PPO normalises with: the Bradley-Terry loss, the one last-token reward read-out
(reward_scores), batched scoring of texts. PPO's own rollout scoring runs the same read-out
packed (rlhf.ppo.rollout.packed_scores, tested equal). Token ids come from rlhf.tokenization,
the one encoding every stage uses."""
from __future__ import annotations

import math
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from rlhf import distributed
from rlhf.config import load_function
from rlhf.generation import Generated, decode_responses
from rlhf.models import body_and_head, has_score_head, token_values
from rlhf.tokenization import encode_pair, encode_prompt, fit, last_index, pad_batch


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of -log sigma(r_w - r_l - margin) over pairs.  r_*: (N,)  margin, weight: (N,)"""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)  # (N,)
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum().clamp_min(1e-12)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted from each row's first real token (left padding allowed)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def reward_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) scalar reward read at each row's last attended token ((B, K) for an ensemble's K heads) (rows may be left- and
    right-padded, as PPO's query|response rows are): training, evaluation and reward_stats score
    through this function, and PPO's packed scoring reads the same position.

    An imported reward model without a `score` head (an encoder such as DeBERTa, read at its
    first token by its own classifier) is scored by its own forward; its rows are always
    right-padded (TextBridge)."""
    if not has_score_head(model):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    values = token_values(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))  # (B, T[, K])
    return values[torch.arange(values.shape[0], device=values.device), last_index(attention_mask)]  # (B[, K])


def last_features(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(the body's (B, H) hidden state at each row's last attended token, the `score` head): what
    reward_scores applies the head to, for a loss that treats the body and the head apart (a reward
    ensemble's members, rlhf.ensemble)."""
    body, head = body_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                  use_cache=False).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index(attention_mask)], head


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, prompt_texts: list[str], responses: list[str], *, max_length: int,
                batch_size: int = 64, device: torch.device | str | None = None) -> list[float]:
    """One reward per (rendered prompt, response), batched. Under ZeRO-3 every rank must call
    this with the same number of rows (the forward passes gather weights collectively)."""
    device = device or next(model.parameters()).device
    seqs = [encode_pair(tokenizer, p, r, max_length)[0] for p, r in zip(prompt_texts, responses)]
    out: list[float] = []
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s:s + batch_size], tokenizer.pad_token_id, "right", device)
        out.extend(reward_scores(model, ids, mask).tolist())
    return out


class TextBridge:
    """Scores the policy's responses with a reward model that has its own tokenizer (and chat
    template), as TRL's GRPO trainer scores with a reward model of another vocabulary: each
    response is decoded with the policy's tokenizer and the pair (prompt, response) encoded for
    the reward model exactly as the reward stage encodes a preference pair with that tokenizer
    (rlhf.data.render_prompt / render_response, rlhf.tokenization), with the reward model's EOS
    where the policy's response ended with its own, and none where sampling was cut off.

    The prompt is the row's original prompt (a string or messages), looked up by the rendered
    text the policy saw (`remember`, called by whatever renders the prompts); a rendered text it
    has not seen is taken as a plain string prompt. Rows are cut to `max_length` tokens (the
    reward model's positions) as rlhf.tokenization.fit cuts a pair."""

    def __init__(self, policy_tokenizer: Any, reward_tokenizer: Any, use_chat_template: bool,
                 max_length: int | None = None):
        self.policy_tok, self.rm_tok = policy_tokenizer, reward_tokenizer
        self.use_chat_template, self.max_length = use_chat_template, max_length
        self.pad_id = reward_tokenizer.pad_token_id if reward_tokenizer.pad_token_id is not None \
            else reward_tokenizer.eos_token_id
        self.sources: dict[str, Any] = {}

    def remember(self, rendered: str, prompt: Any) -> str:
        self.sources[rendered] = prompt
        return rendered

    def encode_one(self, prompt: Any, response: str, ended: bool) -> list[int]:
        """The reward model's ids of (prompt, response), EOS appended when `ended`."""
        from rlhf.data import render_prompt, render_response

        p = encode_prompt(self.rm_tok, render_prompt(self.rm_tok, prompt, self.use_chat_template))
        r = self.rm_tok(render_response(self.rm_tok, prompt, response, self.use_chat_template),
                        add_special_tokens=False)["input_ids"] + ([self.rm_tok.eos_token_id] if ended else [])
        if self.max_length:
            p, r, _ = fit(p, r, self.max_length)
        return p + r

    def encode(self, response_ids: torch.Tensor, response_mask: torch.Tensor,
               rendered_prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) right-padded reward-model ids and mask of the policy's (B, R) responses (padding
        and anything after EOS masked out) to `rendered_prompts` (B, as the policy saw them)."""
        if len(rendered_prompts) != response_ids.shape[0]:
            raise ValueError(f"{len(rendered_prompts)} prompts for {response_ids.shape[0]} responses")
        eos = self.policy_tok.eos_token_id
        seqs = []
        for ids, mask, rendered in zip(response_ids.tolist(), response_mask.tolist(), rendered_prompts):
            tokens = [t for t, m in zip(ids, mask) if m]
            ended = bool(tokens) and tokens[-1] == eos
            text = self.policy_tok.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
            seqs.append(self.encode_one(self.sources.get(rendered, rendered), text, ended))
        return pad_batch(seqs, self.pad_id, "right", response_ids.device)


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation coefficient; None with fewer than 2 points or a constant series."""
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    if len(x) < 2:
        return None
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for val in t.unique():  # average the ranks of tied values
            idx = (t == val).nonzero().flatten()
            r[idx] = r[idx].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx * ry).sum().item() / denom) if denom > 0 else 0.0


def load_gold_scorer(spec: str) -> Any:
    """`path/to/file.py:function` -> the function (prompt, response) -> float; a spec that does not
    name an importable two-argument function is a ConfigError naming eval.gold_scorer."""
    return load_function(spec, "eval.gold_scorer")


@torch.no_grad()
def policy_reward_stats(engine: Any, reward_model: Any, tokenizer: Any, prompt_texts: list[str], *, sampling: Any,
                        max_new_tokens: int, batch_size: int,
                        bridge: TextBridge | None = None) -> tuple[dict, list[str], list[float]]:
    """Mean/std of the reward model's raw scores on responses the policy samples through `engine`
    (an rlhf.engines rollout engine), drawn and scored exactly as a PPO rollout draws and scores
    them (same sampling settings, the generated ids themselves, EOS only where sampling stopped at
    it). Returns (stats, response texts, scores). Every rank calls it (ZeRO-3 loading and forwards
    are collective); rank 0's samples are used. `bridge`: a reward model with its own tokenizer,
    scored on the responses' text as PPO will score it (TextBridge)."""
    gens = engine.generate(prompt_texts, sampling, max_new_tokens, batch_size=batch_size)
    batches = distributed.broadcast_object([Generated(*(t.cpu() for t in (g.query_ids, g.query_mask, g.response_ids,
                                                                          g.response_mask, g.ended))) for g in gens])
    device = next(reward_model.parameters()).device
    scores: list[float] = []
    members: list[torch.Tensor] = []  # (B, K) per batch, for a reward ensemble
    texts: list[str] = []
    row = 0
    for g in batches:
        if bridge is not None:
            ids, mask = bridge.encode(g.response_ids, g.response_mask, prompt_texts[row:row + len(g.response_ids)])
            ids, mask = ids.to(device), mask.to(device)
        else:
            ids = torch.cat([g.query_ids, g.response_ids], 1).to(device)
            mask = torch.cat([g.query_mask, g.response_mask], 1).to(device)
        row += len(g.response_ids)
        r = reward_scores(reward_model, ids, mask).float()
        if r.dim() == 2:  # an ensemble: its published single score is the members' mean
            members.append(r.cpu())
            r = r.mean(1)
        scores.extend(r.tolist())
        texts.extend(decode_responses(tokenizer, g))
    stats = {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores) or 1.0, "n": len(scores),
             "source": "responses sampled from the SFT policy as PPO samples them",
             "sampling": reward_stats_sampling(sampling, max_new_tokens, engine.max_prompt_length)}
    if members:
        m = torch.cat(members)
        stats["members"] = [{"mean": float(c.mean()), "std": float(c.std(unbiased=False)) or 1.0} for c in m.T]
    return stats, texts, scores


def reward_stats_sampling(sampling: Any, max_new_tokens: int, max_prompt_length: int) -> dict:
    """The sampling settings reward_stats record, which a PPO run must share (the keys and values
    the reward stage writes and the PPO stage compares)."""
    return {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length}
