"""TextBridge: the policy's sampled ids -> the ids of a reward model with another tokenizer, and
what an imported reward model must be (rlhf.imports)."""
from __future__ import annotations

import pytest

from rlhf import imports, models
from rlhf.config import ConfigError
from rlhf.scoring import TextBridge
from rlhf.tokenization import pad_batch


@pytest.fixture(scope="module")
def toks(family_checkpoints):
    return {name: models.load_tokenizer(str(family_checkpoints[name])) for name in ("qwen2", "pythia", "llama3")}


def _responses(tok, texts_and_ended):
    rows = [tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if e else []) for t, e in texts_and_ended]
    return pad_batch(rows, tok.pad_token_id, "right")


def test_responses_are_re_encoded_with_the_reward_tokenizer_eos_only_where_the_policy_ended(toks):
    policy, rm = toks["qwen2"], toks["pythia"]
    bridge = TextBridge(policy, rm, use_chat_template=True)
    rendered = [bridge.remember(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", p)
                for p in ("list some metals", "name a few colors")]
    ids, mask = _responses(policy, [("iron, gold", True), ("red blue", False)])
    out, out_mask = bridge.encode(ids, mask, rendered)
    rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(out.tolist(), out_mask.tolist())]
    # Pythia has no chat template: the raw string prompt, then the response, in Pythia's own ids
    enc = lambda s: rm(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert rows[0] == enc("list some metals") + enc("iron, gold") + [rm.eos_token_id]
    assert rows[1] == enc("name a few colors") + enc("red blue"), "a response cut off by max_new_tokens gets no EOS"
    assert policy("iron", add_special_tokens=False)["input_ids"] != enc("iron"), "the vocabularies differ"
    # a rendered prompt the bridge has not seen is taken as a plain string
    assert bridge.encode(ids[:1], mask[:1], ["free text"])[0][0, :len(enc("free text"))].tolist() == enc("free text")


def test_a_reward_model_with_a_chat_template_gets_its_own_rendering_and_rows_are_cut_to_its_positions(toks):
    policy, rm = toks["qwen2"], toks["llama3"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "list some metals"}]
    bridge = TextBridge(policy, rm, use_chat_template=True)
    rendered = bridge.remember("policy rendering", messages)
    ids, mask = _responses(policy, [("iron", True)])
    row = bridge.encode(ids, mask, [rendered])[0][0].tolist()
    text = rm.decode(row)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user") and text.count("<|begin_of_text|>") == 1
    assert "<|start_header_id|>assistant<|end_header_id|>\n\niron<|eot_id|>" in text
    short = TextBridge(policy, rm, use_chat_template=True, max_length=12)
    short.remember(rendered, messages)
    assert short.encode(ids, mask, [rendered])[1].sum() == 12


def test_an_imported_reward_model_must_be_a_one_output_classifier(family_checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="not a sequence-classification model"):
        imports.load_reward_model(str(family_checkpoints["pythia"]), "float32", False)
    from transformers import AutoModelForSequenceClassification

    two = AutoModelForSequenceClassification.from_pretrained(str(family_checkpoints["gpt2"]), num_labels=2)
    two.save_pretrained(tmp_path / "two")
    models.load_tokenizer(str(family_checkpoints["gpt2"])).save_pretrained(tmp_path / "two")
    with pytest.raises(ConfigError, match="has 2 outputs"):
        imports.load_reward_model(str(tmp_path / "two"), "float32", False)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        imports.load_policy(str(tmp_path / "nothing"), "float32", False)
