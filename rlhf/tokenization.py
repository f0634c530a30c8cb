"""The one tokenization path of the pipeline: SFT trains on, the reward model scores and PPO
samples from exactly the same token ids for the same prompt and response.

    prompt ids   = the tokenizer's own prefix specials (Llama-3's BOS, OPT's "</s>"), unless the
                   rendered prompt already starts with them (a chat template that writes BOS),
                   followed by the rendered prompt encoded without special tokens
    response ids = the response encoded without special tokens, then EOS

Prompt and response are encoded separately because PPO samples response tokens after the
prompt's ids: a joint encoding would merge tokens across the boundary and train the models
on sequences PPO never produces. Special tokens are added once, here, and nowhere else
(a tokenizer's `add_special_tokens=True` would give a chat template that starts with BOS a
second one).
"""
from __future__ import annotations

from typing import Any

IGNORE = -100  # label of positions without loss


def pad_batch(seqs: list[list[int]], pad_id: int, side: str, device: Any = "cpu") -> tuple[Any, Any]:
    """(B, T) long ids and 0/1 mask of token lists padded to the longest: side="left" puts each
    row's tokens at the end (prompts to generate from), side="right" at the start (sequences to
    score or train on). An empty list is a row of padding."""
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    t = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(t - len(s), t) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)



def last_index(mask: Any) -> Any:
    """(B,) index of the last real (mask 1) position of each row of a (B, T) mask, however it is
    padded: left, right or both (a left-padded prompt followed by a right-padded response); 0 for
    an empty row. The one last-token rule: the reward head reads there, PPO adds the score there."""
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).argmax(dim=1)

def prefix_special_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before any text when it adds special tokens ([] for GPT-2, Qwen2)."""
    cached = getattr(tokenizer, "_rlhf_prefix_ids", None)
    if cached is not None:
        return cached
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    prefix: list[int] = []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix = list(full[:start])
            break
    try:
        tokenizer._rlhf_prefix_ids = prefix
    except AttributeError:  # a tokenizer that refuses new attributes: recomputed each call
        pass
    return prefix


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Ids of a rendered prompt, with the tokenizer's prefix specials exactly once."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = prefix_special_ids(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Ids of a response, EOS appended (the token PPO's sampling stops at)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """(prompt ids, response ids, truncated) within max_length: the prompt is cut from the left
    (its end matters most) down to half the budget, then the response from the right (losing EOS)."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids, False
    keep_p = max(max_length - len(response_ids), min(len(prompt_ids), max_length // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_p:] if keep_p > 0 else []
    return prompt_ids, response_ids[: max_length - len(prompt_ids)], True


# no tokenizer packs more characters than this into one token of real text: a text longer than
# max_tokens times this is cut to it before it is tokenized (its end kept for a prompt, whose start
# truncation drops, its start for a response), so one huge row costs what max_length allows, not
# a tokenization of megabytes (a 50 MB row took over 13 GB); shorter texts are untouched
CHARS_PER_TOKEN_BOUND = 32


def clip_text(text: str, max_tokens: int, keep: str) -> str:
    """`text` cut to max_tokens * CHARS_PER_TOKEN_BOUND characters, keeping its "end" or "start"."""
    limit = max_tokens * CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return text
    return text[-limit:] if keep == "end" else text[:limit]


def encode_pair(tokenizer: Any, prompt_text: str, response: str, max_length: int) -> tuple[list[int], int, bool]:
    """(ids of prompt + response + EOS, prompt length, truncated) at most max_length long."""
    clipped = len(prompt_text) + len(response) > 2 * max_length * CHARS_PER_TOKEN_BOUND
    prompt_text, response = clip_text(prompt_text, max_length, "end"), clip_text(response, max_length, "start")
    p, r, truncated = fit(encode_prompt(tokenizer, prompt_text), encode_response(tokenizer, response), max_length)
    return p + r, len(p), truncated or clipped


def encode_conversation(tokenizer: Any, messages: list[dict], use_chat_template: bool,
                        max_length: int) -> tuple[list[int], list[int], bool]:
    """(ids, loss mask, truncated) of a whole conversation with loss on every assistant turn.

    Each assistant turn k is encoded exactly as encode_pair encodes a final turn after
    render_prompt(messages[:k]): the text between turns is what the rendering adds, less the EOS
    text a template writes after a reply (its id is already there). A chat template that
    re-renders earlier turns differently (e.g. drops them) cannot be trained this way and raises
    ValueError.
    """
    from rlhf.data import render_prompt, render_response

    messages = [{**m, "content": clip_text(m["content"], max_length, "start")} if isinstance(m.get("content"), str)
                else m for m in messages]
    ids: list[int] = []
    mask: list[int] = []
    consumed = ""
    eos_text = tokenizer.eos_token or ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k == 0:
            continue
        text = render_prompt(tokenizer, messages[:k], use_chat_template)
        if not text.startswith(consumed):
            raise ValueError("the prompt rendering writes earlier turns differently once later turns follow "
                             "(e.g. a chat template that drops them); train on the last assistant turn only "
                             "(sft.loss_on=last)")
        delta = text[len(consumed):]
        if ids and eos_text and delta.startswith(eos_text):
            delta = delta[len(eos_text):]
        head = encode_prompt(tokenizer, delta) if not ids else tokenizer(delta, add_special_tokens=False)["input_ids"]
        reply_text = render_response(tokenizer, messages[:k], m["content"], use_chat_template)
        reply = encode_response(tokenizer, reply_text)
        ids += head + reply
        mask += [0] * len(head) + [1] * len(reply)
        consumed = text + reply_text
    if len(ids) <= max_length:
        return ids, mask, False
    return ids[:max_length], mask[:max_length], True
