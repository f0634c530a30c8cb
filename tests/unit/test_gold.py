"""The demo task's gold scorer and the shipped demo data derived from it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from reward_data.gold import TOPICS, WORD_TOPIC, gold_score, is_well_formed, prompt_topic

DEMO = Path(__file__).resolve().parents[2] / "reward_data" / "demo"


@pytest.mark.parametrize("prompt, response, expected", [
    # 3 on-topic words, well formed: mean(1, 1, 1)
    ("list some fruits", " apple, pear, plum.", 1.0),
    # 1 on-topic, 1 off-topic: mean(1, -1)
    ("list some fruits", " apple, dog.", 0.0),
    # a repeated word counts again: mean(1, 1, 1)
    ("list some fruits", " apple, apple, pear.", 1.0),
    # 3 off-topic: mean(-1, -1, -1)
    ("list some fruits", " dog, dog, dog.", -1.0),
    # cut off inside a word: 'pe' is unknown (off-topic) and the text is malformed: mean(1, -1) - 1
    ("list some fruits", " apple, pe", -1.0),
    # malformed (no commas, no full stop): mean(1, 1) - 1
    ("name a few birds", " owl crow", 0.0),
    # malformed (capital letter), words still counted case-insensitively
    ("name a few birds", " Owl, crow.", 0.0),
    # unknown word is off-topic and makes the response malformed: mean(1, -1) - 1
    ("give me tools", " saw, banana.", -1.0),
    # empty response
    ("give me tools", "", -2.0),
    # 5 on-topic (one repeated), 2 off-topic: (5 - 2) / 7
    ("which colors do you know", " red, blue, oak, red, green, pink, paris.", 3 / 7),
    # the topic is the last one the prompt mentions: 'file' is a tool
    ("not fruits but tools", " file, saw.", 1.0),
    # a prompt of no known topic makes every word off-topic
    ("hello", " apple, pear.", -1.0),
])
def test_gold_score_hand_computed(prompt, response, expected):
    assert gold_score(prompt, response) == pytest.approx(expected)
    assert isinstance(gold_score(prompt, response), float)


def test_gold_prefers_on_topic_well_formed_lists():
    p = "list some fruits"
    assert gold_score(p, " apple, pear.") > gold_score(p, " apple, pear, dog.") > gold_score(p, " apple, dog.")
    assert gold_score(p, " apple, pear.") > gold_score(p, " apple, pear")  # malformed penalty
    assert gold_score(p, " apple, pear.") > gold_score(p, " apple, dog.")


@pytest.mark.parametrize("response, ok", [
    (" apple, pear.", True),
    ("apple.", True),
    (" apple, dog, tin.\n", True),   # known words of any topic
    ("apple,pear.", False),          # missing space after the comma
    ("apple, pear", False),          # no full stop
    ("apple pear.", False),          # no comma
    ("Apple, pear.", False),         # capital letter
    ("apple, zebra.", False),        # unknown word
    ("apple, , pear.", False),
    ("", False),
    (".", False),
])
def test_is_well_formed(response, ok):
    assert is_well_formed(response) is ok


def test_prompt_topic():
    assert prompt_topic("tell me about birds") == "birds"
    assert prompt_topic("which trees do you know") == "trees"
    assert prompt_topic("birdsong") is None
    assert prompt_topic("hello") is None


def test_vocabulary_is_unambiguous():
    words = [w for ws in TOPICS.values() for w in ws]
    assert len(words) == len(set(words)) == len(WORD_TOPIC)


# ---------------------------------------------------------------- shipped demo data

def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["prefs_train.jsonl", "prefs_eval.jsonl"])
def test_shipped_rankings_are_ordered_by_gold_without_ties(name):
    rows = _rows(name)
    assert rows
    for r in rows:
        scores = [gold_score(r["prompt"], x) for x in r["responses"]]
        assert len(scores) >= 2
        assert all(a - b >= 0.3 - 1e-9 for a, b in zip(scores, scores[1:])), r  # make_demo.MIN_GAP


def test_make_demo_reproduces_shipped_files(tmp_path, monkeypatch):
    from reward_data import make_demo

    monkeypatch.setattr(sys, "argv", ["make_demo", "--out", str(tmp_path), "--seed", "0"])
    make_demo.main()
    shipped = sorted(p.name for p in DEMO.glob("*.jsonl"))
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name
