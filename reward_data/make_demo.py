"""Generate the shipped demo data (deterministic: same seed, same files).

    python -m reward_data.make_demo [--out reward_data/demo] [--seed 0]

Files written:
  sft_train.jsonl / sft_eval.jsonl     {"prompt", "completion"}: responses of *mixed*
                                       quality, so that PPO has room to improve on SFT
  prefs_train.jsonl / prefs_eval.jsonl {"prompt", "responses": [best..worst]}: 4-wise
                                       rankings labelled by the gold scorer (ties removed)
  prompts_train.jsonl / prompts_eval.jsonl   {"prompt"}: PPO and held-out prompts
  prefs_hh_eval.jsonl                  the eval pairs as raw HH-RLHF transcripts
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


def sample_response(rng: random.Random, topic: str) -> str:
    """A response of random quality: some off-topic words, some repeats, varying length."""
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
    return " " + ", ".join(words) + "."


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def ranking(rng: random.Random, k: int = 4) -> dict | None:
    prompt, topic = sample_prompt(rng)
    cands = list(dict.fromkeys(sample_response(rng, topic) for _ in range(k)))  # distinct, in sampling order
    by_score: dict[float, str] = {}
    for c in cands:  # keep one response per distinct score, so the ranking has no ties
        by_score.setdefault(gold_score(prompt, c), c)
    if len(by_score) < 2:
        return None
    return {"prompt": prompt, "responses": [by_score[s] for s in sorted(by_score, reverse=True)]}


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
        if name == "prefs_eval.jsonl":
            _write(out / "prefs_hh_eval.jsonl", [
                {"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['responses'][0]}",
                 "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant:{r['responses'][-1]}"} for r in rows])
    _write(out / "prompts_train.jsonl", [{"prompt": sample_prompt(rng)[0]} for _ in range(1024)])
    _write(out / "prompts_eval.jsonl", [{"prompt": sample_prompt(rng)[0]} for _ in range(128)])


if __name__ == "__main__":
    main()
