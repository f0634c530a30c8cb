"""Tokenizers and models: load by hub id or local path, or build from a scratch spec.

Weights load from safetensors only; model code from a hub repository runs only when
`trust_remote_code` is set. Every model gets a pad token distinct from EOS, because a
pad that aliases EOS makes loss masks (and the reward head's last-token pick) drop the
real EOS tokens.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

PAD, EOS, UNK = "<|pad|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
# Chat template of scratch tokenizers: "<|user|> hi\n<|assistant|> reply<|eos|>\n".
# The generation prompt ends at "<|assistant|>", so responses start with their own space.
SCRATCH_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }}<|eos|>\n"
    "{% else %}<|system|> {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_scratch_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (offline), with the project's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, EOS, UNK, USER, ASSISTANT, SYSTEM]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT, SYSTEM]})
    fast.chat_template = SCRATCH_CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "right"
    return tok


def ensure_pad_token(tokenizer: Any, source: str = "the model") -> bool:
    """Give the tokenizer a pad token distinct from EOS; True when a token was added
    (the model's embeddings must then be resized). A tokenizer without EOS (the token every
    response ends with, and sampling stops at) is a ConfigError naming `source`."""
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        from rlhf.config import ConfigError

        raise ConfigError(f"{source}: its tokenizer has no EOS token, which ends every response and stops sampling; "
                          "set one (\"eos_token\" in tokenizer_config.json, or tokenizer.eos_token = ... and "
                          "save_pretrained) and run again")
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    n = tokenizer.add_special_tokens({"pad_token": PAD})
    return n > 0


def check_causal(source: str, key: str, trust_remote_code: bool = False) -> None:
    """ConfigError unless `source` (a hub id or a directory) is a decoder-only causal LM, from its
    config (rlhf.preflight.check_architecture: what preflight checks of local directories, here for
    hub ids too, once the config is at hand)."""
    from transformers import AutoConfig

    from rlhf.preflight import check_architecture

    conf = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    check_architecture(conf.to_dict(), key, source)


def build_scratch_causal_lm(spec: Any, tokenizer: Any, dtype: str) -> Any:
    """A small Llama-style causal LM with random weights, sized by `spec` (ScratchModelConfig)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).to(DTYPES[dtype])


def load_causal_lm(path: str, dtype: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True,
                                                trust_remote_code=trust_remote_code)


def load_reward_model(path: str, dtype: str, pad_token_id: int, trust_remote_code: bool = False) -> Any:
    """A sequence-classification model with one output (a new head when `path` is a causal LM)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code)
    model.config.pad_token_id = pad_token_id
    return model


def resize_for_tokenizer(model: Any, tokenizer: Any) -> None:
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def add_lora(model: Any, lora: Any, task_type: str) -> Any:
    """Wrap `model` with a fresh LoRA adapter (`lora`: config.LoraConfig; task CAUSAL_LM or SEQ_CLS)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules
    if targets is not None:  # None: peft's per-family default
        targets = "all-linear" if targets in (["all-linear"], "all-linear") else list(targets)
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                         task_type=task_type)
    return get_peft_model(model, cfg)


def unwrap(model: Any) -> Any:
    """The transformers model inside a DeepSpeed engine and/or a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_and_head(model: Any) -> tuple[Any, Any] | None:
    """(transformer body, head) of a model inside any DeepSpeed/peft wrapper: the `score` head of a
    sequence-classification model, else a causal LM's output embeddings; None for other layouts.
    The one place every stage finds them (packed forwards, per-token values)."""
    base = unwrap(model)
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = getattr(base, "score", None)
    if head is None and hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
    return (body, head) if body is not None and head is not None else None


def has_score_head(model: Any) -> bool:
    """Whether a sequence-classification model has the `score` head every stage reads per token
    (decoder families); encoders such as DeBERTa classify a pooled first token instead."""
    return getattr(unwrap(model), "score", None) is not None and body_and_head(model) is not None


def token_values(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) scalar head applied at every position of a sequence-classification model
    (a DeepSpeed engine is unwrapped; its ZeRO-3 hooks live on the submodules)."""
    base, parts = unwrap(model), body_and_head(model)
    if parts is None or getattr(base, "score", None) is None:
        raise ValueError(f"{type(base).__name__} has no '{getattr(base, 'base_model_prefix', '?')}' body and 'score' "
                         "head; use a model family with a standard sequence-classification head (Llama, Qwen, GPT-NeoX, ...)")
    body, head = parts
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    return head(hidden).squeeze(-1).float()


def disable_dropout(model: Any) -> None:
    """Switch off every dropout of `model`: nn.Dropout modules (LoRA's too) and the float rates
    that some families (OPT, GPT-NeoX attention) hand to functional dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name in list(vars(config)) if config is not None else []:
        if ("dropout" in name or "pdrop" in name) and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_lora_state_dict(model: Any, state_dict: dict) -> dict:
    """The plain (base-model) state dict of a peft LoRA model whose full state is `state_dict`:
    W' = W + scaling * B @ A for every adapted layer (transposed for GPT-2's Conv1D), the trained
    copies of modules_to_save (a reward head) in place of the originals, peft's prefixes removed.

    Pure tensor arithmetic on the gathered values: no model is built or touched, so it is the
    same under ZeRO-3 (where the live parameters are empty partitions) as anywhere else, and the
    resized vocabulary and one-output head are kept as trained."""
    adapter = "default"
    layers = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in getattr(module, "scaling", {}):
            if getattr(module, "use_dora", {}).get(adapter):
                raise ValueError("merging DoRA adapters is not supported; use plain LoRA (model.lora)")
            layers[name] = module
    out: dict = {}
    for key, value in state_dict.items():
        if ".lora_" in key or ".original_module." in key:
            continue  # adapter factors are folded in below; originals are replaced by their trained copies
        key = key.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", ".")
        out[key] = value
    for name, module in layers.items():
        a = state_dict[f"{name}.lora_A.{adapter}.weight"].float()  # (r, in)
        b = state_dict[f"{name}.lora_B.{adapter}.weight"].float()  # (out, r)
        delta = (b @ a) * module.scaling[adapter]                  # (out, in)
        if getattr(module, "fan_in_fan_out", False):                # Conv1D stores (in, out)
            delta = delta.T
        weight = f"{name}.weight"
        out[weight] = (out[weight].float() + delta).to(out[weight].dtype)
    prefix = "base_model.model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in out.items()}


def save_plain_model(model: Any, state_dict: dict, out_dir: Any) -> None:
    """Write `model`'s architecture with the values of `state_dict` (every parameter, gathered:
    see distributed.full_state_dict) as a plain transformers directory; a LoRA model is merged
    (merged_lora_state_dict). The result loads with plain AutoModelFor... and has no adapter
    keys. Rank 0 only."""
    if is_lora(model):
        state_dict = merged_lora_state_dict(model, state_dict)
        model = model.get_base_model()
    model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)


def publish_model(model: Any, zero_stage: int, out_dir: Any, tokenizer: Any) -> None:
    """The one save path of all three stages. Collective (every rank calls it; ZeRO-3 gathers
    the partitions); rank 0 ends with a plain model directory (safetensors, merged when LoRA,
    tokenizer) in `out_dir`. `model`: a DeepSpeed engine or a plain (peft) module."""
    import shutil
    from pathlib import Path

    from rlhf import distributed

    state_dict = distributed.full_state_dict(model, zero_stage)
    if not distributed.is_main():
        return
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    save_plain_model(getattr(model, "module", model), state_dict, out_dir)
    if not (out_dir / "model.safetensors").is_file() and not list(out_dir.glob("model-*.safetensors")):
        raise RuntimeError(f"saving the model wrote no safetensors into {out_dir}")
    tokenizer.save_pretrained(str(out_dir))
