"""Generate the shipped demo data (deterministic: same seed, same files).

    python -m reward_data.make_demo [--out reward_data/demo] [--seed 0]

Files written:
  sft_train.jsonl / sft_eval.jsonl     {"prompt", "completion"}: responses of *mixed*
                                       quality, so that PPO has room to improve on SFT
  prefs_train.jsonl / prefs_eval.jsonl {"prompt", "responses": [best..worst]}: 4-wise
                                       rankings labelled by the gold scorer (responses
                                       closer than MIN_GAP in gold score are not ranked)
  prompts_train.jsonl / prompts_eval.jsonl   {"prompt"}: PPO and held-out prompts
  prefs_hh_train.jsonl / prefs_hh_eval.jsonl   best vs worst of each ranking as raw HH-RLHF
                                       transcripts (a third of the training ones multi-turn)
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from reward_data.gold import TEMPLATES, TOPICS, gold_score

ALL_WORDS = sorted({w for ws in TOPICS.values() for w in ws})


def sample_prompt(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(TOPICS))
    return rng.choice(TEMPLATES).format(t=topic), topic


def sample_response(rng: random.Random, topic: str, p_malformed: float = 0.0) -> str:
    """A response of random quality: some off-topic words, some repeats, varying length.

    With probability `p_malformed` the text is also damaged (no full stop, or cut off), so that
    a reward model trained on these responses learns the gold scorer's malformed penalty for
    the failure a language model policy shows most: running out of tokens.
    """
    p_on = rng.uniform(0.35, 1.0)
    p_repeat = rng.uniform(0.0, 0.3)
    n = rng.randint(2, 6)
    words: list[str] = []
    for _ in range(n):
        if words and rng.random() < p_repeat:
            words.append(rng.choice(words))
        elif rng.random() < p_on:
            words.append(rng.choice(TOPICS[topic]))
        else:
            words.append(rng.choice(ALL_WORDS))
    text = " " + ", ".join(words) + "."
    if p_malformed and rng.random() < p_malformed:
        text = damage(rng, words)
    return text


def damage(rng: random.Random, words: list[str]) -> str:
    """The list `words` without its full stop, or cut off (possibly inside a word): what a
    language model produces when it runs out of tokens (see sample_response)."""
    text = " " + ", ".join(words)
    if rng.random() < 0.5:
        return text
    return text[: rng.randint(len(words[0]) + 1, len(text) - 1)]


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


MIN_GAP = 0.3  # rank only responses whose gold scores differ by at least this much
P_MALFORMED = 0.2  # share of ranked candidates that are malformed (the SFT data stays well formed)


def ranking(rng: random.Random, k: int = 4) -> dict | None:
    """Up to k responses to one prompt, best first, any two differing by >= MIN_GAP in gold score.

    Candidates are taken best first and one is kept only when it is clearly apart from every
    response kept so far: the labels model a rater who ranks clearly different responses and
    is not asked to split near-ties.
    """
    prompt, topic = sample_prompt(rng)
    cands = list(dict.fromkeys(sample_response(rng, topic, P_MALFORMED) for _ in range(k)))  # distinct, in sampling order
    kept: list[tuple[float, str]] = []
    for score, c in sorted(((gold_score(prompt, c), c) for c in cands), key=lambda x: -x[0]):
        if all(prev - score >= MIN_GAP for prev, _ in kept):
            kept.append((score, c))
    if len(kept) < 2:
        return None
    return {"prompt": prompt, "responses": [c for _, c in kept]}


def hh_transcripts(rows: list[dict], multi_turn: bool) -> list[dict]:
    """Each ranking's best vs worst response as raw HH-RLHF transcripts. With `multi_turn`, every
    third transcript starts with the previous ranking's prompt and best response as an earlier
    exchange, so the prompt is a conversation (no randomness: the other files stay as they are)."""
    out = []
    for i, r in enumerate(rows):
        history = ""
        if multi_turn and i % 3 == 2:
            prev = rows[i - 1]
            history = f"\n\nHuman: {prev['prompt']}\n\nAssistant:{prev['responses'][0]}"
        turn = f"{history}\n\nHuman: {r['prompt']}\n\nAssistant:"
        out.append({"chosen": turn + r["responses"][0], "rejected": turn + r["responses"][-1]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def sft_rows(n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            prompt, topic = sample_prompt(rng)
            rows.append({"prompt": prompt, "completion": sample_response(rng, topic)})
        return rows

    _write(out / "sft_train.jsonl", sft_rows(3000))
    _write(out / "sft_eval.jsonl", sft_rows(200))
    for name, n in (("prefs_train.jsonl", 2000), ("prefs_eval.jsonl", 200)):
        rows = [r for r in (ranking(rng) for _ in range(n)) if r]
        _write(out / name, rows)
        _write(out / name.replace("prefs_", "prefs_hh_"), hh_transcripts(rows, multi_turn=name == "prefs_train.jsonl"))
    _write(out / "prompts_train.jsonl", [{"prompt": sample_prompt(rng)[0]} for _ in range(1024)])
    _write(out / "prompts_eval.jsonl", [{"prompt": sample_prompt(rng)[0]} for _ in range(128)])


if __name__ == "__main__":
    main()
