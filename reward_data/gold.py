"""Gold scorer of the demo task: the stand-in for "what humans prefer".

A prompt asks for things of one topic ("list some fruits"); a good response is a
comma-separated list of words of that topic, ending with a full stop. Each word earns
+1 when it is on topic and -1 when it is not; the score is the mean over the words,
minus 1 for a malformed response:

    gold(prompt, response) = mean_w(+1 if w on topic else -1) - [malformed]   in [-2, 1]

A response without words scores -2.

The score is a plain function of the text. Preference labels in the shipped data
are derived from it; the reward model learns it only from those labels, and PPO
never sees it (it is used for evaluation and the report only).
"""
from __future__ import annotations

import re

TOPICS: dict[str, list[str]] = {
    "fruits": ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry"],
    "animals": ["cat", "dog", "horse", "mouse", "tiger", "sheep", "goat", "camel"],
    "colors": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"],
    "tools": ["hammer", "saw", "drill", "wrench", "knife", "axe", "spade", "file"],
    "cities": ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "berlin"],
    "birds": ["owl", "crow", "swan", "duck", "eagle", "hawk", "robin", "goose"],
    "metals": ["iron", "gold", "silver", "copper", "tin", "zinc", "lead", "steel"],
    "trees": ["oak", "pine", "birch", "maple", "elm", "ash", "cedar", "willow"],
}
TEMPLATES = ["list some {t}", "name a few {t}", "which {t} do you know", "tell me about {t}", "give me {t}"]
WORD_TOPIC = {w: t for t, ws in TOPICS.items() for w in ws}
_WELL_FORMED = re.compile(r"^\s*[a-z]+(, [a-z]+)*\.\s*$")


def prompt_topic(prompt: str) -> str | None:
    """The topic a demo prompt asks about (the last topic name in the text), or None."""
    found = [(m.start(), t) for t in TOPICS for m in re.finditer(rf"\b{t}\b", prompt)]
    return max(found)[1] if found else None


def is_well_formed(response: str) -> bool:
    """A comma-separated list of known words ending in a full stop."""
    if not _WELL_FORMED.match(response):
        return False
    return all(w in WORD_TOPIC for w in _words(response))


def _words(response: str) -> list[str]:
    return re.findall(r"[a-z]+", response.lower())


def gold_score(prompt: str, response: str) -> float:
    """Higher is better; see the module docstring for the formula."""
    topic = prompt_topic(prompt)
    words = _words(response)
    if not words:
        return -2.0
    score = sum(1.0 if WORD_TOPIC.get(w) == topic else -1.0 for w in words) / len(words)
    if not is_well_formed(response):
        score -= 1.0
    return float(score)
