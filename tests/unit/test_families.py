"""The tiny real-family checkpoints (tests/families.py) load through the Auto classes and keep their family's habits."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from families import FAMILIES, build_family, family_info

# class names transformers 5.23 gives back (GPT2TokenizerFast, GPTNeoXTokenizerFast, Qwen2TokenizerFast and
# PreTrainedTokenizerFast are aliases of GPT2Tokenizer, GPTNeoXTokenizer, Qwen2Tokenizer and TokenizersBackend)
CLASSES = {
    "gpt2": ("GPT2Config", "GPT2Tokenizer", "GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "pythia": ("GPTNeoXConfig", "GPTNeoXTokenizer", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2Tokenizer", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "llama3": ("LlamaConfig", "TokenizersBackend", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "opt": ("OPTConfig", "GPT2Tokenizer", "OPTForCausalLM", "OPTForSequenceClassification"),
}
MESSAGES = [{"role": "user", "content": "list some trees"}]


@functools.cache
def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.cache
def _lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()


@pytest.fixture(params=FAMILIES)
def fam(request, family_checkpoints) -> tuple[str, Path, dict]:
    return request.param, family_checkpoints[request.param], family_info(request.param)


def test_api():
    assert FAMILIES == ("gpt2", "pythia", "qwen2", "llama3", "opt")
    keys = {"adds_bos", "bos_token", "eos_token", "pad_token", "chat_template", "dropout", "tied", "generation_config"}
    for name in FAMILIES:
        assert set(family_info(name)) == keys
    family_info("gpt2")["tied"] = False  # a copy: callers cannot corrupt it
    assert family_info("gpt2")["tied"] is True
    with pytest.raises(ValueError):
        family_info("bloom")


def test_directory_layout(fam):
    name, path, info = fam
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    assert ("generation_config.json" in files) == info["generation_config"]
    if name == "opt":  # as facebook/opt-*: vocab.json + merges.txt, no tokenizer.json
        assert {"vocab.json", "merges.txt"} <= files and "tokenizer.json" not in files
    else:
        assert "tokenizer.json" in files
    if name == "llama3":
        assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_auto_classes_and_vocab(fam):
    name, path, _ = fam
    config_cls, tok_cls, lm_cls, _ = CLASSES[name]
    tok, lm = _tok(path), _lm(path)
    assert type(tok).__name__ == tok_cls
    assert type(lm).__name__ == lm_cls and type(lm.config).__name__ == config_cls
    assert lm.config.vocab_size == len(tok)
    assert 400 <= len(tok) <= 600
    assert lm.config.hidden_size == 64 and lm.config.num_hidden_layers == 2
    assert lm.config.max_position_embeddings == 256


def test_special_tokens(fam):
    name, path, info = fam
    tok = _tok(path)
    assert tok.bos_token == info["bos_token"]
    assert tok.eos_token == info["eos_token"]
    assert tok.pad_token == info["pad_token"]
    assert (tok.pad_token_id is None) == (info["pad_token"] is None)
    ids = tok("list some trees")["input_ids"]
    plain = tok("list some trees", add_special_tokens=False)["input_ids"]
    if info["adds_bos"]:
        assert ids[0] == tok.bos_token_id and ids[1:] == plain
    else:
        assert ids == plain
    assert tok.eos_token_id not in plain  # nothing appended either
    assert tok.decode(plain) == "list some trees"
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == info["eos_token"]
    # a special token in text is one id, not BPE pieces
    assert tok(info["eos_token"], add_special_tokens=False)["input_ids"] == [tok.eos_token_id]


def test_family_token_habits(family_checkpoints):
    gpt2, pythia, qwen2, llama3, opt = (_tok(family_checkpoints[n]) for n in FAMILIES)
    assert gpt2.bos_token == gpt2.eos_token == gpt2.unk_token == "<|endoftext|>" and gpt2.pad_token is None
    assert gpt2.eos_token_id == len(gpt2) - 1  # last id, like 50256
    assert pythia.bos_token_id == pythia.eos_token_id == 0 and pythia.pad_token is None
    assert pythia.convert_tokens_to_ids("<|padding|>") == 1
    assert qwen2.bos_token is None and qwen2.unk_token is None
    assert qwen2.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [len(qwen2) - 3,
                                                                                           len(qwen2) - 2,
                                                                                           len(qwen2) - 1]
    assert qwen2.pad_token_id != qwen2.eos_token_id
    for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert llama3.convert_tokens_to_ids(t) != llama3.unk_token_id and llama3.convert_tokens_to_ids(t) is not None
    assert llama3.eos_token == "<|eot_id|>" and llama3.pad_token is None
    assert llama3("hi")["input_ids"][0] == llama3.bos_token_id
    assert (opt.pad_token_id, opt.bos_token_id, opt.eos_token_id) == (1, 2, 2) and opt.unk_token == "<unk>"
    assert opt("hi")["input_ids"][0] == opt.convert_tokens_to_ids("</s>") == 2
    assert opt.add_bos_token is True  # read from tokenizer_config.json, as for the hub's facebook/opt-*


def test_chat_templates(fam):
    name, path, info = fam
    tok = _tok(path)
    assert bool(tok.chat_template) == info["chat_template"]
    if not info["chat_template"]:
        return
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    if name == "qwen2":
        assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                        "<|im_end|>\n<|im_start|>user\nlist some trees<|im_end|>\n<|im_start|>assistant\n")
        own = tok.apply_chat_template([{"role": "system", "content": "be brief"}, *MESSAGES], tokenize=False)
        assert own == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nlist some trees<|im_end|>\n"
    if name == "llama3":
        assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nlist some trees<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert text.startswith(tok.bos_token)
        # the trap: encoding the rendered text with special tokens gives two BOS; apply_chat_template itself gives one
        doubled = tok(text)["input_ids"]
        assert doubled[:2] == [tok.bos_token_id, tok.bos_token_id]
        ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids == doubled[1:]


def test_model_habits(fam):
    from transformers.pytorch_utils import Conv1D

    name, path, info = fam
    lm = _lm(path)
    cfg = lm.config
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) == info["tied"] == cfg.tie_word_embeddings
    if name == "gpt2":
        assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.1, 0.1, 0.1)
        assert any(isinstance(m, Conv1D) for m in lm.modules())
    if name == "pythia":
        assert cfg.rope_parameters["partial_rotary_factor"] == 0.25 and cfg.use_parallel_residual
    if name == "qwen2":
        assert cfg.num_key_value_heads < cfg.num_attention_heads
        assert cfg.eos_token_id == _tok(path).convert_tokens_to_ids("<|im_end|>")
    if name == "llama3":
        assert cfg.num_key_value_heads < cfg.num_attention_heads
        assert cfg.rope_parameters["rope_theta"] == 500000
    if name == "opt":
        assert (cfg.dropout, cfg.attention_dropout) == (0.1, 0.0)
        assert cfg.word_embed_proj_dim == cfg.hidden_size and cfg.do_layer_norm_before
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (1, 2, 2)
        assert lm.model.decoder.embed_positions.weight.shape[0] == cfg.max_position_embeddings + 2  # offset 2


def test_generation_config(fam):
    name, path, info = fam
    gen, tok = _lm(path).generation_config, _tok(path)
    if name == "qwen2":
        assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (True, 0.7, 0.8, 20,
                                                                                                  1.05)
        assert gen.eos_token_id == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        assert gen.pad_token_id == tok.pad_token_id and gen.bos_token_id == tok.pad_token_id
    elif name == "llama3":
        assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.6, 0.9)
        assert gen.bos_token_id == tok.bos_token_id
        assert gen.eos_token_id == tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    else:  # derived from config.json: greedy, the family's token ids
        assert not gen.do_sample
        assert gen.eos_token_id == tok.eos_token_id


def test_dropout_is_live(fam):
    """Training-mode forwards differ exactly for the families whose real configs have dropout."""
    _, path, info = fam
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).train()
    ids = _tok(path)("list some trees, oak, birch", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = lm(ids).logits, lm(ids).logits
    assert (not torch.equal(a, b)) == info["dropout"]


def test_forward_and_generate(fam):
    _, path, _ = fam
    tok, lm = _tok(path), _lm(path)
    enc = tok(["list some trees"], return_tensors="pt")
    with torch.no_grad():
        out = lm(**enc, labels=enc["input_ids"])
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)
    torch.manual_seed(0)
    gen = lm.generate(**enc, max_new_tokens=5, min_new_tokens=5,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 5)
    assert torch.equal(gen[:, :enc["input_ids"].shape[1]], enc["input_ids"])


def test_sequence_classification_head(fam):
    name, path, _ = fam
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    assert type(rm).__name__ == CLASSES[name][3] and rm.config.num_labels == 1
    enc = _tok(path)("list some trees", return_tensors="pt")
    with torch.no_grad():
        logits = rm(**enc).logits
    assert logits.shape == (1, 1)


def test_tokenizer_round_trip(fam, tmp_path):
    """Re-saving (as the pipeline's artifacts do) keeps the class and the encode behaviour."""
    name, path, info = fam
    from transformers import AutoTokenizer

    tok = _tok(path)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again).__name__ == CLASSES[name][1]
    assert again("list some trees")["input_ids"] == tok("list some trees")["input_ids"]
    assert (again.bos_token, again.eos_token, again.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert again.chat_template == tok.chat_template and len(again) == len(tok)


def test_build_is_deterministic(family_checkpoints, tmp_path):
    again = build_family("qwen2", tmp_path / "qwen2")
    assert again == tmp_path / "qwen2"
    first = family_checkpoints["qwen2"]
    for f in sorted(p.name for p in first.iterdir()):
        assert (again / f).read_bytes() == (first / f).read_bytes(), f
