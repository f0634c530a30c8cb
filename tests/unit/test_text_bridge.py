"""TextBridge: the policy's sampled ids -> the ids of a reward model with another tokenizer, and
what an imported reward model must be (rlhf.imports)."""
from __future__ import annotations

from pathlib import Path

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


def test_an_encoder_reward_model_without_a_score_head_is_read_through_its_own_classifier(tmp_path, family_checkpoints):
    """A BERT-style classifier (as DeBERTa reward models are): no `score` head, so PPO's per-token
    read-out does not apply; its own forward gives the reward, on right-padded rows."""
    import json

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from rlhf.scoring import reward_scores

    demo = Path(__file__).resolve().parents[2] / "reward_data" / "demo" / "sft_train.jsonl"
    words = sorted({w for line in demo.read_text().splitlines()[:200] for w in json.loads(line)["prompt"].lower().split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), eos_token="[SEP]")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1))
    out = tmp_path / "bert_rm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    rm, rm_tok = imports.load_reward_model(str(out), "float32", False)
    assert not models.has_score_head(rm)
    bridge = TextBridge(models.load_tokenizer(str(family_checkpoints["qwen2"])), rm_tok, True)
    ids, mask = _responses(bridge.policy_tok, [("red", True), ("green blue", False)])
    rows, rows_mask = bridge.encode(ids, mask, ["list some colors", "name a few colors"])
    assert rows[0, 0].item() == rm_tok.cls_token_id and rm_tok.sep_token_id in rows[0].tolist()
    with torch.no_grad():
        got = reward_scores(rm.eval(), rows, rows_mask)
        want = rm(input_ids=rows, attention_mask=rows_mask).logits[:, 0]
    assert torch.allclose(got, want) and got[0] != got[1]


def test_a_tokenizer_without_eos_is_a_clear_error(family_checkpoints, tmp_path):
    tok = models.load_tokenizer(str(family_checkpoints["qwen2"]))
    tok.eos_token = None
    with pytest.raises(ConfigError, match="model.name_or_path=x: its tokenizer has no EOS token"):
        models.ensure_pad_token(tok, "model.name_or_path=x")
