"""Tiny random-init checkpoints of real model families, built offline in a second or so each.

`build_family(name, out_dir)` writes a local model directory (safetensors weights, config.json, tokenizer files,
generation_config.json where the family ships sampling defaults) that loads with plain
`AutoTokenizer.from_pretrained(dir)`, `AutoModelForCausalLM.from_pretrained(dir, use_safetensors=True)` and
`AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1)`, so pipeline tests can use it as
`model.name_or_path` exactly where a hub id would go. Each family keeps its real config class, tokenizer class and
special-token habits (the things pipelines get wrong): GPT-2 has no pad token; Llama-3's tokenizer *and* its chat
template add BOS; OPT prepends `</s>` on encode; Qwen2.5-Instruct ends turns with `<|im_end|>` and pads with
`<|endoftext|>`; the Instruct families sample by default through generation_config.json.

The tokenizers share one byte-level BPE (~480 pieces) trained with the `tokenizers` library on the demo SFT text;
each family then gets its own special tokens at its own positions (start of the vocabulary for Pythia and OPT, the
end for GPT-2, Qwen2 and Llama-3), its own tokenizer class and pre-/post-processing. Models: hidden size 64,
2 layers, 256 positions, vocabulary = len(tokenizer), torch seeded before init, so a build is deterministic.

On-disk layouts follow the hub repos: OPT is written the way facebook/opt-* ship it (vocab.json + merges.txt +
tokenizer_config.json with `add_bos_token: true`, no tokenizer.json); Llama-3's tokenizer_config.json names
`PreTrainedTokenizerFast` (AutoTokenizer resolves it to `TokenizersBackend` in transformers 5); the others are what
`save_pretrained` writes. Only qwen2 and llama3 get a generation_config.json (their sampling defaults); for the
others transformers derives the generation config from config.json's token ids, which is what their hub files
(bos/eos/pad ids only) amount to.
"""
from __future__ import annotations

import functools
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "reward_data" / "demo" / "sft_train.jsonl"
BPE_VOCAB_SIZE = 480  # the demo text saturates at ~500 merges+bytes; 480 leaves every family under 500 tokens

FAMILIES: tuple[str, ...] = ("gpt2", "pythia", "qwen2", "llama3", "opt")

HIDDEN, LAYERS, HEADS, MAX_POSITIONS = 64, 2, 4, 256
SEED = 0

# --- special tokens and templates ------------------------------------------------------------------------------
ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
L3_BOS, L3_EOT_TEXT, L3_EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
L3_START_HEADER, L3_END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
# Llama-3's first ten added tokens, in the order (and so the relative ids) of Meta-Llama-3-8B-Instruct (128000...)
L3_SPECIALS = (L3_BOS, L3_EOT_TEXT, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
               "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", L3_START_HEADER, L3_END_HEADER,
               "<|reserved_special_token_4|>", L3_EOT)
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3 of facebook/opt-*'s vocab.json

# Qwen2.5-Instruct's template without the tool-calling branches (same text for system/user/assistant turns).
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
# Meta-Llama-3-Instruct's template, starting with the BOS token as Llama-3.1's does (so the rendered string already
# begins with <|begin_of_text|>, and encoding it with add_special_tokens=True gives a double BOS).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# Qwen2's and Llama-3's pre-tokenizer splits (Llama-3's groups digits by up to three).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

_INFO: dict[str, dict] = {
    "gpt2": {"adds_bos": False, "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": None,
             "chat_template": False, "dropout": True, "tied": True, "generation_config": False},
    "pythia": {"adds_bos": False, "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": None,
               "chat_template": False, "dropout": False, "tied": False, "generation_config": False},
    "qwen2": {"adds_bos": False, "bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT,
              "chat_template": True, "dropout": False, "tied": True, "generation_config": True},
    "llama3": {"adds_bos": True, "bos_token": L3_BOS, "eos_token": L3_EOT, "pad_token": None,
               "chat_template": True, "dropout": False, "tied": False, "generation_config": True},
    "opt": {"adds_bos": True, "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
            "chat_template": False, "dropout": True, "tied": True, "generation_config": False},
}


def family_info(name: str) -> dict:
    """Facts about a family's checkpoint that tests check against:
    adds_bos (encode with add_special_tokens=True prepends bos), bos_token / eos_token / pad_token (strings or None),
    chat_template (the tokenizer has one), dropout (training-mode dropout > 0 in the LM), tied (lm_head shares the input
    embedding), generation_config (the directory has a generation_config.json with sampling defaults)."""
    if name not in _INFO:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    return dict(_INFO[name])


# --- tokenizers ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(vocab sorted by id, merges) of a byte-level BPE trained on the demo SFT text (no special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["prompt"] + row["completion"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = tuple(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return vocab, merges


def _vocab(offset: int = 0, before: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> dict[str, int]:
    base, _ = _bpe()
    vocab = {tok: i for i, tok in enumerate(before)}
    vocab.update({tok: i + offset for tok, i in base})
    vocab.update({tok: len(vocab) + i for i, tok in enumerate(after)})
    return vocab


def _merges() -> list[tuple[str, str]]:
    return [tuple(m) for m in _bpe()[1]]


def _gpt2_tokenizer(out: pathlib.Path):
    from transformers import GPT2TokenizerFast

    # <|endoftext|> is the last entry of GPT-2's vocab.json (50256) and doubles as bos, eos and unk; no pad token
    tok = GPT2TokenizerFast(vocab=_vocab(after=(ENDOFTEXT,)), merges=_merges(), unk_token=ENDOFTEXT,
                            bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=None, add_prefix_space=False,
                            model_max_length=MAX_POSITIONS)  # gpt2's tokenizer_config: model_max_length = n_positions
    tok.save_pretrained(out)
    return tok


def _pythia_tokenizer(out: pathlib.Path):
    from tokenizers import AddedToken
    from transformers import GPTNeoXTokenizerFast

    # gpt-neox-20b's vocab starts with <|endoftext|> (0) and <|padding|> (1); Pythia sets no pad token
    tok = GPTNeoXTokenizerFast(vocab=_vocab(offset=2, before=(ENDOFTEXT, "<|padding|>")), merges=_merges(),
                               unk_token=ENDOFTEXT, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=None,
                               add_prefix_space=False)
    tok.add_tokens([AddedToken("<|padding|>", special=False, normalized=False)])  # an added token, not a special one
    tok.save_pretrained(out)
    return tok


def _qwen2_tokenizer(out: pathlib.Path):
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    vocab = _vocab()
    n = len(vocab)
    # Like Qwen2.5-Instruct: the specials are added tokens after the BPE vocab in this order (151643, 151644, 151645)
    added = {n + i: AddedToken(t, special=True, normalized=False) for i, t in enumerate((ENDOFTEXT, IM_START, IM_END))}
    tok = Qwen2TokenizerFast(vocab=vocab, merges=_merges(), unk_token=None, bos_token=None, eos_token=IM_END,
                             pad_token=ENDOFTEXT, added_tokens_decoder=added,
                             additional_special_tokens=[IM_START, IM_END], chat_template=QWEN2_CHAT_TEMPLATE,
                             model_max_length=131072, errors="replace", split_special_tokens=False)
    tok.save_pretrained(out)
    return tok


def _llama3_tokenizer(out: pathlib.Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_vocab(), merges=_merges(), ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in L3_SPECIALS])
    bos_id = backend.token_to_id(L3_BOS)
    # Llama-3's tokenizer.json post-processor: ByteLevel, then a template that prepends <|begin_of_text|>
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{L3_BOS}:0 $A:0", pair=f"{L3_BOS}:0 $A:0 {L3_BOS}:1 $B:1",
                                      special_tokens=[(L3_BOS, bos_id)])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=L3_BOS, eos_token=L3_EOT,
                                  chat_template=LLAMA3_CHAT_TEMPLATE, model_max_length=131072,
                                  model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(out)
    # transformers 5 writes "TokenizersBackend"; the hub's tokenizer_config.json says PreTrainedTokenizerFast
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return tok


def _opt_tokenizer(out: pathlib.Path):
    from transformers import GPT2TokenizerFast

    # facebook/opt-* ship GPT-2's BPE re-indexed with <s> <pad> </s> <unk> first, vocab.json + merges.txt only
    # (no tokenizer.json) and tokenizer_config.json's add_bos_token: true, so </s> is prepended on encode.
    vocab = _vocab(offset=len(OPT_SPECIALS), before=OPT_SPECIALS)
    merges = _merges()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_prefix_space": False, "errors": "replace", **special,
         "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "GPT2Tokenizer"}, indent=2) + "\n")
    return GPT2TokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, add_prefix_space=False, **special)


# --- models --------------------------------------------------------------------------------------------------------
def _gpt2_model(tok, heads):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=heads,
                     n_inner=None, activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                     layer_norm_epsilon=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg), None


def _pythia_model(tok, heads):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=heads,
                        intermediate_size=4 * HIDDEN, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                        max_position_embeddings=MAX_POSITIONS, use_parallel_residual=True, tie_word_embeddings=False,
                        attention_dropout=0.0, hidden_dropout=0.0, layer_norm_eps=1e-5,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return GPTNeoXForCausalLM(cfg), None


def _qwen2_model(tok, heads):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eot, im_end = tok.convert_tokens_to_ids(ENDOFTEXT), tok.convert_tokens_to_ids(IM_END)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN + 48,
                      num_hidden_layers=LAYERS, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=MAX_POSITIONS, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False, attention_dropout=0.0,
                      bos_token_id=eot, eos_token_id=im_end)
    # Qwen2.5-Instruct's generation_config.json
    gen = GenerationConfig(bos_token_id=eot, pad_token_id=eot, eos_token_id=[im_end, eot], do_sample=True,
                           temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    return Qwen2ForCausalLM(cfg), gen


def _llama3_model(tok, heads):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos, eot_text, eot = (tok.convert_tokens_to_ids(t) for t in (L3_BOS, L3_EOT_TEXT, L3_EOT))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=224, num_hidden_layers=LAYERS,
                      num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS,
                      rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                      bos_token_id=bos, eos_token_id=eot)
    # Meta-Llama-3-8B-Instruct's generation_config.json
    gen = GenerationConfig(bos_token_id=bos, eos_token_id=[eot_text, eot], do_sample=True, temperature=0.6, top_p=0.9)
    return LlamaForCausalLM(cfg), gen


def _opt_model(tok, heads):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=heads,
                    ffn_dim=4 * HIDDEN, max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=HIDDEN,
                    do_layer_norm_before=True, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                    activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
                    tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(cfg), None


_BUILDERS = {
    "gpt2": (_gpt2_tokenizer, _gpt2_model),
    "pythia": (_pythia_tokenizer, _pythia_model),
    "qwen2": (_qwen2_tokenizer, _qwen2_model),
    "llama3": (_llama3_tokenizer, _llama3_model),
    "opt": (_opt_tokenizer, _opt_model),
}


def build_family(name: str, out_dir: pathlib.Path, heads: int = HEADS) -> pathlib.Path:
    """Write a tiny random-init checkpoint of family `name` into directory `out_dir` (created; files there are
    overwritten) and return `out_dir`. `heads`: attention heads (head size HIDDEN // heads; vLLM's CPU
    attention needs 32 or more, so its tests build with 2)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    import torch

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer, make_model = _BUILDERS[name]
    tok = make_tokenizer(out)
    torch.manual_seed(SEED)
    model, gen = make_model(tok, heads)
    if gen is not None:
        model.generation_config = gen
    model.save_pretrained(out)
    if gen is None:  # the family ships no sampling defaults: leave the generation config to config.json's token ids
        (out / "generation_config.json").unlink(missing_ok=True)
    return out
