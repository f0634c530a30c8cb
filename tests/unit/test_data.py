"""Data loaders: ranking expansion, ties, weighting, HH-RLHF, implicit prompts, errors, rendering."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import (DataError, expand_ranking, iter_rows, load_preferences, load_prompts, load_sft,
                       parse_hh, prompt_text, render_prompt, split_hh_pair)


def jsonl(path: Path, rows: list) -> str:
    """Write rows (dicts, or raw strings written verbatim as lines) and return the path as str."""
    with path.open("w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------- expand_ranking

def test_k2_gives_one_pair():
    assert expand_ranking(["good", "bad"], None) == ([(0, 1, 1)], 0)


def test_k5_gives_ten_pairs_with_rank_distances():
    pairs, ties = expand_ranking(["a", "b", "c", "d", "e"], None)
    assert ties == 0
    assert pairs == [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 4, 4),
                     (1, 2, 1), (1, 3, 2), (1, 4, 3),
                     (2, 3, 1), (2, 4, 2),
                     (3, 4, 1)]
    assert len(pairs) == 5 * 4 // 2
    # distance d occurs K - d times
    assert [sum(1 for *_, d in pairs if d == k) for k in (1, 2, 3, 4)] == [4, 3, 2, 1]


def test_scores_order_higher_is_better():
    # ranks by score: b (3.0) > c (2.0) > a (1.0)
    pairs, ties = expand_ranking(["a", "b", "c"], [1.0, 3.0, 2.0])
    assert ties == 0
    assert pairs == [(1, 2, 1), (1, 0, 2), (2, 0, 1)]


def test_equal_scores_tie_and_are_dropped():
    pairs, ties = expand_ranking(["a", "b", "c"], [2, 2, 1])
    assert ties == 1
    assert pairs == [(0, 2, 2), (1, 2, 1)]


def test_identical_responses_tie_without_scores():
    pairs, ties = expand_ranking(["x", "x", "y"], None)
    assert ties == 1
    assert pairs == [(0, 2, 2), (1, 2, 1)]


def test_identical_responses_tie_even_with_different_scores():
    pairs, ties = expand_ranking(["x", "y", "x"], [3, 2, 1])
    assert ties == 1
    assert pairs == [(0, 1, 1), (1, 2, 1)]


# ---------------------------------------------------------------- load_preferences: rankings

def test_load_rankings_pairs_and_rank_distance(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p1", "responses": ["A", "B"]},
        {"prompt": "p2", "responses": ["a", "b", "c", "d", "e"]},
    ])
    d = load_preferences(src, weighting="uniform")
    assert d.rows == 2 and d.ties_dropped == 0
    assert len(d.pairs) == 1 + 10
    first = d.pairs[0]
    assert (first.prompt, first.chosen, first.rejected, first.group, first.rank_distance) == ("p1", "A", "B", 0, 1)
    g1 = [p for p in d.pairs if p.group == 1]
    assert len(g1) == 10
    assert {(p.chosen, p.rejected): p.rank_distance for p in g1}[("a", "e")] == 4
    assert {(p.chosen, p.rejected): p.rank_distance for p in g1}[("c", "d")] == 1
    assert all(p.weight == 1.0 for p in d.pairs)


def test_load_rankings_with_scores_and_ties(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": ["lo", "hi", "mid", "mid2"], "scores": [0, 5, 2, 2]},
    ])
    d = load_preferences(src, weighting="uniform")
    assert d.ties_dropped == 1  # mid vs mid2
    assert [(p.chosen, p.rejected) for p in d.pairs] == [
        ("hi", "mid"), ("hi", "mid2"), ("hi", "lo"), ("mid", "lo"), ("mid2", "lo")]


def test_ties_counted_across_formats(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": ["same", "same", "other"]},  # 1 tie, 2 pairs
        {"prompt": "q", "chosen": "x", "rejected": "x"},           # 1 tie, 0 pairs
        {"prompt": "r", "chosen": "y", "rejected": "z"},           # 1 pair
    ])
    d = load_preferences(src, weighting="uniform")
    assert d.rows == 3
    assert d.ties_dropped == 2
    assert len(d.pairs) == 3


def test_all_tied_is_an_error(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_preferences(src)


# ---------------------------------------------------------------- weighting

def test_per_prompt_weighting(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p1", "responses": ["a", "b"]},       # 1 pair
        {"prompt": "p2", "responses": ["a", "b", "c"]},  # 3 pairs
    ])
    d = load_preferences(src, weighting="per_prompt")
    # mean pairs per row = 4 / 2 = 2: the 1-pair row weighs 2.0, each pair of the 3-pair row 2/3
    assert [p.weight for p in d.pairs if p.group == 0] == [pytest.approx(2.0)]
    assert [p.weight for p in d.pairs if p.group == 1] == [pytest.approx(2 / 3)] * 3
    assert sum(p.weight for p in d.pairs) == pytest.approx(len(d.pairs))
    # each prompt's pairs sum to the same total
    assert sum(p.weight for p in d.pairs if p.group == 0) == pytest.approx(
        sum(p.weight for p in d.pairs if p.group == 1))
    assert load_preferences(src).pairs == d.pairs  # per_prompt is the default


def test_per_prompt_weighting_ignores_rows_without_pairs(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p1", "responses": ["a", "b"]},
        {"prompt": "p0", "chosen": "same", "rejected": "same"},  # tied: no pairs, not in the mean
        {"prompt": "p2", "responses": ["a", "b", "c"]},
    ])
    d = load_preferences(src, weighting="per_prompt")
    assert d.ties_dropped == 1
    assert sorted(round(p.weight, 6) for p in d.pairs) == [round(2 / 3, 6)] * 3 + [2.0]
    assert {p.group for p in d.pairs} == {0, 2}


def test_uniform_weighting(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p1", "responses": ["a", "b"]},
        {"prompt": "p2", "responses": ["a", "b", "c"]},
    ])
    assert [p.weight for p in load_preferences(src, weighting="uniform").pairs] == [1.0] * 4


# ---------------------------------------------------------------- pairs, margin, HH-RLHF, implicit prompt

def test_explicit_pair_with_margin_and_message_prompt(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    src = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "p", "chosen": " good", "rejected": " bad", "margin": 1.5},
        {"prompt": msgs, "chosen": "yes", "rejected": "no", "margin": None},
        {"prompt": "q", "chosen": "c", "rejected": "r"},
    ])
    d = load_preferences(src, weighting="uniform")
    assert [(p.prompt, p.chosen, p.rejected, p.margin, p.group) for p in d.pairs] == [
        ("p", " good", " bad", 1.5, 0), (msgs, "yes", "no", 0.0, 1), ("q", "c", "r", 0.0, 2)]


def test_margin_must_be_a_number(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert "row 1" in str(e.value) and "'margin'" in str(e.value)


HH_PREFIX = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: list some fruits"


def test_parse_hh():
    assert parse_hh(HH_PREFIX + "\n\nAssistant: apple.") == [
        {"role": "user", "content": " hi there"},
        {"role": "assistant", "content": " hello!"},
        {"role": "user", "content": " list some fruits"},
        {"role": "assistant", "content": " apple."},
    ]
    with pytest.raises(ValueError):
        parse_hh("no transcript here")


def test_split_hh_pair_multi_turn():
    prompt, chosen, rejected = split_hh_pair(HH_PREFIX + "\n\nAssistant: apple, pear.\n",
                                             HH_PREFIX + "\n\nAssistant: dog.")
    assert prompt == [{"role": "user", "content": "hi there"},
                      {"role": "assistant", "content": "hello!"},
                      {"role": "user", "content": "list some fruits"}]
    assert chosen == " apple, pear."   # leading space kept, trailing whitespace dropped
    assert rejected == " dog."


def test_split_hh_pair_rejects_different_histories():
    with pytest.raises(ValueError, match="differ"):
        split_hh_pair("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y")
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_pair("\n\nHuman: a\n\nAssistant: x\n\nHuman: more", "\n\nHuman: a\n\nAssistant: y")


def test_hh_rows_in_load_preferences(tmp_path):
    src = jsonl(tmp_path / "hh.jsonl", [
        {"chosen": HH_PREFIX + "\n\nAssistant: apple.", "rejected": HH_PREFIX + "\n\nAssistant: tiger."},
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
    ])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert "row 2" in str(e.value) and "'chosen'" in str(e.value) and src in str(e.value)
    d = load_preferences(jsonl(tmp_path / "ok.jsonl", [
        {"chosen": HH_PREFIX + "\n\nAssistant: apple.", "rejected": HH_PREFIX + "\n\nAssistant: tiger."}]))
    (p,) = d.pairs
    assert p.prompt[-1] == {"role": "user", "content": "list some fruits"}
    assert (p.chosen, p.rejected) == (" apple.", " tiger.")


def test_shipped_hh_eval_matches_rankings():
    demo = Path(__file__).resolve().parents[2] / "reward_data" / "demo"
    hh = load_preferences(str(demo / "prefs_hh_eval.jsonl"), weighting="uniform")
    ranks = [json.loads(line) for line in (demo / "prefs_eval.jsonl").read_text().splitlines() if line.strip()]
    assert len(hh.pairs) == len(ranks)
    p, r = hh.pairs[0], ranks[0]
    assert p.prompt == [{"role": "user", "content": r["prompt"]}]
    assert (p.chosen, p.rejected) == (r["responses"][0], r["responses"][-1])


def test_implicit_prompt_shared_prefix(tmp_path):
    src = jsonl(tmp_path / "i.jsonl", [
        {"chosen": "Q: what color is the sky? A: blue", "rejected": "Q: what color is the sky? A: green"},
        # the common prefix "The answer is bl" ends inside a word: cut at the last space instead
        {"chosen": "The answer is blue", "rejected": "The answer is black"},
    ])
    d = load_preferences(src, weighting="uniform")
    assert [(p.prompt, p.chosen, p.rejected) for p in d.pairs] == [
        ("Q: what color is the sky? A: ", "blue", "green"),
        ("The answer is", " blue", " black"),
    ]


def test_implicit_prompt_without_shared_prefix_is_an_error(tmp_path):
    src = jsonl(tmp_path / "i.jsonl", [{"chosen": "bluebird", "rejected": "bluejay"}])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert "row 1" in str(e.value) and "share no prefix" in str(e.value)


def test_implicit_prompt_with_empty_response_is_an_error(tmp_path):
    src = jsonl(tmp_path / "i.jsonl", [{"chosen": "hello world", "rejected": "hello world!"}])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert "'chosen'" in str(e.value) and "empty" in str(e.value)


# ---------------------------------------------------------------- located errors

def test_ranking_with_one_response(tmp_path):
    src = jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "p", "responses": ["a", "b"]},
        {"prompt": "p", "responses": ["only"]},
    ])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    msg = str(e.value)
    assert src in msg and "row 2" in msg and "'responses'" in msg and "at least 2" in msg
    assert (e.value.source, e.value.row, e.value.field) == (src, 2, "responses")


def test_missing_field(tmp_path):
    src = jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert (e.value.row, e.value.field) == (1, "rejected")
    assert src in str(e.value) and "missing" in str(e.value)


def test_missing_prompt_in_ranking(tmp_path):
    src = jsonl(tmp_path / "bad.jsonl", [{"responses": ["a", "b"]}])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert (e.value.row, e.value.field) == (1, "prompt")


def test_empty_response(tmp_path):
    src = jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "   ", "rejected": "b"},
    ])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert (e.value.row, e.value.field) == (2, "chosen")
    assert "empty" in str(e.value)
    src2 = jsonl(tmp_path / "bad2.jsonl", [{"prompt": "p", "responses": ["a", ""]}])
    with pytest.raises(DataError) as e:
        load_preferences(src2)
    assert (e.value.row, e.value.field) == (1, "responses[1]")


def test_scores_of_wrong_length(tmp_path):
    src = jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]}])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert e.value.field == "scores" and "3 numbers" in str(e.value)


def test_non_json_line_reports_its_line_number(tmp_path):
    # blank lines are skipped, but row numbers stay the file's line numbers
    src = jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, "", "{not json"])
    with pytest.raises(DataError) as e:
        load_preferences(src)
    assert e.value.row == 3
    assert src in str(e.value) and "row 3" in str(e.value) and "not valid JSON" in str(e.value)


def test_unknown_row_shape_and_non_object(tmp_path):
    with pytest.raises(DataError) as e:
        load_preferences(jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}]))
    assert e.value.row == 1 and "README" in str(e.value)
    with pytest.raises(DataError) as e:
        load_preferences(jsonl(tmp_path / "b.jsonl", ['["a", "b"]']))
    assert e.value.row == 1 and "JSON object" in str(e.value)


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_preferences(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_rows(str(tmp_path / "x.txt")))


def test_json_file_list_and_wrapped_list(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    (tmp_path / "w.json").write_text(json.dumps({"train": rows}))
    assert list(iter_rows(str(tmp_path / "l.json"))) == [(1, rows[0]), (2, rows[1])]
    assert list(iter_rows(str(tmp_path / "w.json"))) == [(1, rows[0]), (2, rows[1])]
    assert len(load_preferences(str(tmp_path / "w.json")).pairs) == 2


# ---------------------------------------------------------------- SFT and prompts

def test_load_sft_prompt_completion(tmp_path):
    src = jsonl(tmp_path / "s.jsonl", [
        {"prompt": "list some fruits", "completion": " apple, pear."},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
    ])
    ex = load_sft(src)
    assert (ex[0].prompt, ex[0].completion) == ("list some fruits", " apple, pear.")
    assert (ex[1].prompt, ex[1].completion) == ([{"role": "user", "content": "hi"}], "hello")


def test_load_sft_messages(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "extra": 1}]
    ex = load_sft(jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]))
    assert ex[0].prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ex[0].completion == "hello"


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),                       # no assistant turn
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "messages"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0]"),
    ({"prompt": "p"}, "completion"),
    ({"prompt": "p", "completion": ""}, "completion"),
    ({"prompt": 3, "completion": "c"}, "prompt"),
])
def test_load_sft_errors(tmp_path, row, field):
    src = jsonl(tmp_path / "s.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataError) as e:
        load_sft(src)
    assert (e.value.source, e.value.row, e.value.field) == (src, 2, field)
    assert f"row 2, field {field!r}" in str(e.value)


def test_load_sft_empty_file(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        load_sft(jsonl(tmp_path / "e.jsonl", []))


def test_load_prompts(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "list some fruits"},
        {"prompt": "give me birds", "completion": "ignored"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])
    assert load_prompts(src) == ["list some fruits", "give me birds", [{"role": "user", "content": "hi"}]]
    with pytest.raises(DataError) as e:
        load_prompts(jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"text": "b"}]))
    assert (e.value.row, e.value.field) == (2, "prompt")


# ---------------------------------------------------------------- rendering

class PlainTokenizer:
    chat_template = None


class TemplatedTokenizer:
    chat_template = "{% for m in messages %}...{% endfor %}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        body = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return body + ("<|assistant|>" if add_generation_prompt else "")


MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "list fruits"}]


def test_render_without_chat_template():
    tok = PlainTokenizer()
    assert render_prompt(tok, "list some fruits", use_chat_template=True) == "list some fruits"
    assert render_prompt(tok, MSGS, use_chat_template=True) == (
        "\n\nSystem: be brief\n\nHuman: hi\n\nAssistant: hello\n\nHuman: list fruits\n\nAssistant:")


def test_render_with_chat_template():
    tok = TemplatedTokenizer()
    assert render_prompt(tok, "list some fruits", use_chat_template=True) == "<|user|>list some fruits<|assistant|>"
    assert tok.calls[-1] == ([{"role": "user", "content": "list some fruits"}], False, True)
    out = render_prompt(tok, MSGS, use_chat_template=True)
    assert out == "<|system|>be brief<|user|>hi<|assistant|>hello<|user|>list fruits<|assistant|>"


def test_render_with_chat_template_disabled():
    tok = TemplatedTokenizer()
    assert render_prompt(tok, "list some fruits", use_chat_template=False) == "list some fruits"
    assert render_prompt(tok, MSGS[1:2], use_chat_template=False) == "\n\nHuman: hi\n\nAssistant:"
    assert tok.calls == []


def test_hh_prompt_renders_back_to_the_transcript_prefix():
    # the HH split plus plain rendering reproduces the original transcript exactly
    chosen = HH_PREFIX + "\n\nAssistant: apple."
    prompt, reply, _ = split_hh_pair(chosen, HH_PREFIX + "\n\nAssistant: dog.")
    assert render_prompt(PlainTokenizer(), prompt, use_chat_template=True) + reply == chosen


def test_prompt_text():
    assert prompt_text("p") == "p"
    assert prompt_text(MSGS[:2]) == "system: be brief\nuser: hi"


def _real_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "<eos>": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


def test_render_with_a_real_tokenizer():
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = _real_tokenizer(template)
    assert render_prompt(tok, "hi", use_chat_template=True) == "<|user|>hi<|assistant|>"
    assert render_prompt(tok, MSGS[:2], use_chat_template=True) == "<|system|>be brief<|user|>hi<|assistant|>"
    assert render_prompt(tok, "hi", use_chat_template=False) == "hi"
    plain = _real_tokenizer(None)
    assert render_prompt(plain, MSGS[1:2], use_chat_template=True) == "\n\nHuman: hi\n\nAssistant:"


def test_parquet_and_csv_sources(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.Dataset.from_list([
        {"prompt": "p1", "responses": ["a", "b", "c"]},
        {"prompt": "p2", "responses": ["x", "y"]},
    ]).to_parquet(str(tmp_path / "r.parquet"))
    d = load_preferences(str(tmp_path / "r.parquet"), weighting="uniform")
    assert d.rows == 2 and len(d.pairs) == 3 + 1
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nhi,good,bad\n")
    (p,) = load_preferences(str(tmp_path / "p.csv")).pairs
    assert (p.prompt, p.chosen, p.rejected, p.weight) == ("hi", "good", "bad", 1.0)


def test_readme_examples_load(tmp_path):
    import re

    readme = (Path(__file__).resolve().parents[2] / "reward_data" / "README.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", readme, re.S)]
    assert len(blocks) >= 8
    for i, row in enumerate(blocks):
        src = jsonl(tmp_path / f"ex{i}.jsonl", [row])
        if "chosen" in row or "responses" in row:
            d = load_preferences(src)
            k = len(row.get("responses", [0, 0]))
            assert len(d.pairs) == k * (k - 1) // 2 and d.ties_dropped == 0
        elif "completion" in row or "messages" in row:
            assert load_sft(src)[0].completion
        else:
            assert load_prompts(src) == [row["prompt"]]
