"""Data loaders: ranking expansion, ties, weighting, HH-RLHF, implicit prompts, errors, rendering."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import (
    DataError,
    PreferenceData,
    SFTData,
    SFTExample,
    expand_ranking,
    iter_rows,
    load_preferences,
    load_prompts,
    load_prompts_counted,
    load_sft,
    parse_hh,
    prompt_text,
    render_prompt,
    split_hh_pair,
)


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
    d = load_preferences(src, weighting="uniform", max_skipped_fraction=0.5)
    assert d.rows == 3
    assert d.ties_dropped == 2
    assert len(d.pairs) == 3
    assert d.skipped == {"identical": 1}


def test_all_tied_is_an_error(tmp_path):
    src = jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"no usable preference pairs.*identical=1"):
        load_preferences(src, max_skipped_fraction=1.0)  # even with no limit on skipped rows


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
    d = load_preferences(src, weighting="per_prompt", max_skipped_fraction=0.5)
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
    ok = {"chosen": HH_PREFIX + "\n\nAssistant: apple.", "rejected": HH_PREFIX + "\n\nAssistant: tiger."}
    # a transcript that does not end with an Assistant turn is malformed
    src = jsonl(tmp_path / "hh.jsonl", [ok, {"chosen": HH_PREFIX, "rejected": HH_PREFIX + "\n\nAssistant: x"}])
    with pytest.raises(DataError) as e:
        load_preferences(src, max_skipped_fraction=1.0)
    assert "row 2" in str(e.value) and "'chosen'" in str(e.value) and src in str(e.value)
    # histories that differ before the last Assistant turn: skipped as prompt_mismatch
    mismatch = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    src = jsonl(tmp_path / "hh2.jsonl", [ok, mismatch])
    with pytest.raises(DataError, match=r"1 of 2 rows .*prompt_mismatch=1"):
        load_preferences(src)
    d = load_preferences(src, max_skipped_fraction=0.5)
    assert (len(d.pairs), d.rows, d.skipped) == (1, 2, {"prompt_mismatch": 1})
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


def test_implicit_prompt_without_shared_prefix_is_skipped(tmp_path):
    good = {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}
    src = jsonl(tmp_path / "i.jsonl", [good, {"chosen": "bluebird", "rejected": "bluejay"}])
    d = load_preferences(src, max_skipped_fraction=0.5)
    assert (len(d.pairs), d.skipped) == (1, {"empty_prompt": 1})


def test_implicit_prompt_with_empty_response_is_skipped(tmp_path):
    good = {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}
    src = jsonl(tmp_path / "i.jsonl", [good, {"chosen": "hello world", "rejected": "hello world!"}])
    d = load_preferences(src, max_skipped_fraction=0.5)
    assert (len(d.pairs), d.skipped) == (1, {"empty_response": 1})


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


def test_empty_response_is_skipped_and_counted(tmp_path):
    src = jsonl(tmp_path / "e.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "   ", "rejected": "b"},
        {"prompt": "p", "responses": ["a", ""]},
        {"prompt": "  ", "chosen": "a", "rejected": "b"},
    ])
    d = load_preferences(src, max_skipped_fraction=0.75)
    assert (len(d.pairs), d.rows, d.skipped) == (1, 4, {"empty_response": 2, "empty_prompt": 1})
    # a response that is not a string is malformed, not skipped
    src2 = jsonl(tmp_path / "bad2.jsonl", [{"prompt": "p", "responses": ["a", 3]}])
    with pytest.raises(DataError) as e:
        load_preferences(src2, max_skipped_fraction=1.0)
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
    d = load_sft(src)
    assert isinstance(d, SFTData) and (d.rows, d.skipped) == (2, {})
    ex = d.examples
    assert (ex[0].prompt, ex[0].completion, ex[0].messages) == ("list some fruits", " apple, pear.", None)
    assert (ex[1].prompt, ex[1].completion) == ([{"role": "user", "content": "hi"}], "hello")
    # a conversational prompt + completion row also carries the whole conversation
    assert ex[1].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_load_sft_messages(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "extra": 1}]
    ex = load_sft(jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])).examples
    assert ex[0].prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ex[0].completion == "hello"
    assert ex[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]  # validated: extra keys dropped


@pytest.mark.parametrize("row, field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),                       # no assistant turn
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                   {"role": "user", "content": "more"}]}, "messages"),                         # ends with a user turn
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0]"),
    ({"prompt": "p"}, "completion"),
    ({"prompt": "p", "completion": 7}, "completion"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]}, "completion"),
    ({"prompt": 3, "completion": "c"}, "prompt"),
])
def test_load_sft_errors(tmp_path, row, field):
    src = jsonl(tmp_path / "s.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataError) as e:
        load_sft(src, max_skipped_fraction=1.0)  # malformed rows are errors, whatever the skip limit
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
            assert load_sft(src).examples[0].completion
        else:
            assert load_prompts(src) == [row["prompt"]]


# ---------------------------------------------------------------- TRL conversational preference layouts

def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def test_conversational_explicit_prompt(tmp_path):
    src = jsonl(tmp_path / "c.jsonl", [
        {"prompt": [{"role": "system", "content": "be brief"}, U("list fruits")],
         "chosen": [A(" apple, pear.")], "rejected": [A(" dog.")]},
        # chosen/rejected continue the prompt with shared turns before the response
        {"prompt": "hi", "chosen": [A("hello"), U("fruits?"), A("apple")], "rejected": [A("hello"), U("fruits?"), A("dog")]},
    ])
    d = load_preferences(src, weighting="uniform")
    assert [(p.prompt, p.chosen, p.rejected) for p in d.pairs] == [
        ([{"role": "system", "content": "be brief"}, U("list fruits")], " apple, pear.", " dog."),
        ([U("hi"), A("hello"), U("fruits?")], "apple", "dog"),
    ]


def test_conversational_implicit_prompt(tmp_path):
    src = jsonl(tmp_path / "c.jsonl", [
        {"chosen": [U("hi"), A("hello"), U("list fruits"), A("apple, pear.")],
         "rejected": [U("hi"), A("hello"), U("list fruits"), A("dog.")]},
    ])
    (p,) = load_preferences(src).pairs
    assert p.prompt == [U("hi"), A("hello"), U("list fruits")]
    assert (p.chosen, p.rejected) == ("apple, pear.", "dog.")


def test_ultrafeedback_binarized_row(tmp_path):
    row = {"prompt": "list fruits", "prompt_id": "abc123",
           "chosen": [U("list fruits"), A("apple, pear.")], "rejected": [U("list fruits"), A("dog.")],
           "messages": [U("list fruits"), A("apple, pear.")], "score_chosen": 8.0, "score_rejected": 5.0}
    (p,) = load_preferences(jsonl(tmp_path / "uf.jsonl", [row])).pairs
    assert p.prompt == [U("list fruits")]  # the shared message prefix, not the prompt string
    assert (p.chosen, p.rejected, p.margin) == ("apple, pear.", "dog.", 0.0)


def test_conversational_response_must_be_one_final_assistant_message(tmp_path):
    cases = [
        ({"prompt": [U("hi")], "chosen": [A("a"), U("more")], "rejected": [A("b")]}, "chosen"),  # ends with a user turn
        ({"prompt": [U("hi")], "chosen": [A("a")], "rejected": [A("b"), U("x"), A("c")]}, "rejected"),  # 3 messages
        ({"chosen": [U("hi"), A("a")], "rejected": "hi b"}, "rejected"),                      # mixed layouts
        ({"chosen": [U("hi"), {"role": "assistant"}], "rejected": [U("hi"), A("b")]}, "chosen[1]"),
    ]
    for i, (row, field) in enumerate(cases):
        src = jsonl(tmp_path / f"bad{i}.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
        with pytest.raises(DataError) as e:
            load_preferences(src, max_skipped_fraction=1.0)
        assert (e.value.row, e.value.field) == (2, field), (row, str(e.value))


def test_conversational_unusable_rows_are_skipped(tmp_path):
    good = {"chosen": [U("hi"), A("a")], "rejected": [U("hi"), A("b")]}
    src = jsonl(tmp_path / "c.jsonl", [
        good,
        {"chosen": [U("hi"), A("a")], "rejected": [U("ho"), A("b")]},  # histories differ
        {"chosen": [U("hi"), A("  ")], "rejected": [U("hi"), A("b")]},  # empty response
        {"chosen": [U("hi"), A("a")], "rejected": [U("hi"), A("a")]},   # identical
        {"chosen": [A("a")], "rejected": [A("b")]},                     # no prompt anywhere
    ])
    d = load_preferences(src, max_skipped_fraction=0.8)
    assert len(d.pairs) == 1
    assert d.skipped == {"prompt_mismatch": 1, "empty_response": 1, "identical": 1, "empty_prompt": 1}


# ---------------------------------------------------------------- skipping and the skip limit

HH_EMPTY_REPLY = {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"}


def _hh_rows(n):
    return [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad"}
            for i in range(n)]


def test_hh_empty_final_turn_is_skipped_within_the_limit(tmp_path):
    src = jsonl(tmp_path / "hh.jsonl", _hh_rows(100) + [HH_EMPTY_REPLY] + _hh_rows(99))  # 1 of 200 = 0.5 %
    d = load_preferences(src)
    assert isinstance(d, PreferenceData)
    assert (d.rows, len(d.pairs), d.skipped, d.ties_dropped) == (200, 199, {"empty_response": 1}, 0)
    assert {p.group for p in d.pairs} == set(range(200)) - {100}  # groups stay row indices
    assert sum(p.weight for p in d.pairs) == pytest.approx(199)


def test_too_many_skipped_rows_raise_naming_the_key_and_counts(tmp_path):
    src = jsonl(tmp_path / "hh.jsonl", _hh_rows(2) + [HH_EMPTY_REPLY])  # 1 of 3 = 33 %
    with pytest.raises(DataError) as e:
        load_preferences(src, skip_key="reward.max_skipped_fraction")
    msg = str(e.value)
    assert src in msg and e.value.row is None
    assert "1 of 3 rows" in msg and "33.33%" in msg and "empty_response=1" in msg
    assert "reward.max_skipped_fraction" in msg and "clean the file" in msg
    assert len(load_preferences(src, max_skipped_fraction=0.34).pairs) == 2  # raising the limit lets it through


def test_identical_and_tie_rows_are_counted(tmp_path):
    src = jsonl(tmp_path / "t.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},                  # identical
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # identical
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 1, 1]},     # every pair ties
        {"prompt": "p", "responses": ["x", "x"]},                               # every pair ties
        {"prompt": "p", "responses": ["a", "a", "b"]},                          # one tied pair, 2 pairs kept
    ])
    d = load_preferences(src, weighting="uniform", max_skipped_fraction=0.7)
    assert d.skipped == {"identical": 2, "tie": 2}
    assert len(d.pairs) == 3
    assert d.ties_dropped == 2 + 2 + 1  # tied rows + the tied pair inside a ranking that gave pairs


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "margin"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": Infinity}', "margin"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}', "margin"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1e999}', "margin"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [NaN, 1]}', "scores[0]"),
    ('{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, Infinity]}', "scores[2]"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]}', "scores[1]"),
])
def test_non_finite_numbers_are_malformed(tmp_path, line, field):
    src = jsonl(tmp_path / "n.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', line])
    with pytest.raises(DataError) as e:
        load_preferences(src, max_skipped_fraction=1.0)
    assert (e.value.source, e.value.row, e.value.field) == (src, 2, field)
    assert f"row 2, field {field!r}" in str(e.value)


def test_malformed_rows_raise_with_row_numbers_even_without_a_skip_limit(tmp_path):
    ok = {"prompt": "p", "chosen": "a", "rejected": "b"}
    cases = [
        ('{"prompt": "p", "chosen": "a"', None),                     # bad JSON
        ({"prompt": "p", "chosen": "a"}, "rejected"),                 # missing field
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen"),    # wrong type
        ({"prompt": "p", "responses": "ab"}, "responses"),            # wrong structure
    ]
    for i, (bad, field) in enumerate(cases):
        src = jsonl(tmp_path / f"m{i}.jsonl", [ok, HH_EMPTY_REPLY, ok, bad])
        with pytest.raises(DataError) as e:
            load_preferences(src, max_skipped_fraction=1.0)
        assert (e.value.row, e.value.field) == (4, field) and "row 4" in str(e.value)


def test_mixed_formats_in_parquet(tmp_path, monkeypatch):
    # a parquet file of mixed formats fills absent columns with None; rows are read in batches
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.Dataset.from_dict({
        "prompt": ["p1", "p2"] * 1500, "responses": [["a", "b", "c"], None] * 1500,
        "chosen": [None, "x"] * 1500, "rejected": [None, "y"] * 1500, "margin": [None, 0.5] * 1500,
    }).to_parquet(str(tmp_path / "m.parquet"))
    d = load_preferences(str(tmp_path / "m.parquet"), weighting="uniform")
    assert d.rows == 3000 and len(d.pairs) == 1500 * 4
    assert (d.pairs[3].prompt, d.pairs[3].chosen, d.pairs[3].margin, d.pairs[3].group) == ("p2", "x", 0.5, 1)
    assert d.pairs[-1].group == 2999


# ---------------------------------------------------------------- SFT and prompts: skipping

def test_sft_messages_rows_carry_messages_and_empty_replies_are_skipped(tmp_path):
    conv = [U("hi"), A("hello"), U("list fruits"), A("apple, pear.")]
    rows = [{"messages": conv}] * 150 + [{"messages": [U("hi"), A("  ")]}] + [{"prompt": "p", "completion": " c"}] * 49
    d = load_sft(jsonl(tmp_path / "s.jsonl", rows))
    assert (d.rows, len(d.examples), d.skipped) == (200, 199, {"empty_response": 1})
    ex = d.examples[0]
    assert ex == SFTExample(prompt=conv[:-1], completion="apple, pear.", messages=conv)
    assert d.examples[-1].messages is None
    # a string prompt with a multi-message completion becomes a conversation too
    (ex,) = load_sft(jsonl(tmp_path / "c.jsonl", [{"prompt": "hi", "completion": [A("a"), U("b"), A("c")]}])).examples
    assert (ex.prompt, ex.completion, ex.messages) == ([U("hi"), A("a"), U("b")], "c", [U("hi"), A("a"), U("b"), A("c")])


def test_sft_skip_limit(tmp_path):
    src = jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completion": " c"}] * 2 + [
        {"prompt": "p", "completion": "   "}, {"prompt": "", "completion": "c"}])
    with pytest.raises(DataError) as e:
        load_sft(src, skip_key="sft.max_skipped_fraction")
    msg = str(e.value)
    assert "2 of 4 rows" in msg and "empty_prompt=1" in msg and "empty_response=1" in msg
    assert "sft.max_skipped_fraction" in msg
    d = load_sft(src, max_skipped_fraction=0.5)
    assert (len(d.examples), d.skipped) == (2, {"empty_response": 1, "empty_prompt": 1})
    with pytest.raises(DataError, match="no usable SFT examples"):
        load_sft(jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": ""}]), max_skipped_fraction=1.0)


def test_load_prompts_skips_empty_prompts(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "  "}, {"prompt": [U("")]},
                                        {"messages": [U("hi"), A("x")]}])
    assert load_prompts(src) == ["a", [U("hi")]]
    assert load_prompts_counted(src) == (["a", [U("hi")]], {"empty_prompt": 2})
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(jsonl(tmp_path / "e.jsonl", [{"prompt": ""}]))


# ---------------------------------------------------------------- scale

def test_160k_rows_load_in_seconds(tmp_path):
    import time

    n = 160_000
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(f'{{"prompt": "list some fruits, number {i}"}}\n' for i in range(n)))
    q = tmp_path / "prefs.jsonl"
    q.write_text("".join(
        f'{{"prompt": "p{i}", "chosen": " apple, pear.", "rejected": " dog."}}\n' if i % 2 else
        f'{{"chosen": "\\n\\nHuman: q{i}\\n\\nAssistant: good", "rejected": "\\n\\nHuman: q{i}\\n\\nAssistant: bad"}}\n'
        for i in range(n)))
    t = time.perf_counter()
    assert len(load_prompts(str(p))) == n
    t_prompts = time.perf_counter() - t
    t = time.perf_counter()
    d = load_preferences(str(q))
    t_prefs = time.perf_counter() - t
    assert d.rows == n and len(d.pairs) == n
    assert t_prompts < 20 and t_prefs < 20, (t_prompts, t_prefs)
