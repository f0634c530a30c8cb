"""Tokenizers and models: load by hub id or local path, or build from a scratch spec.

Weights load from safetensors only; model code from a hub repository runs only when
`trust_remote_code` is set. Every model gets a pad token distinct from EOS, because a
pad that aliases EOS makes loss masks (and the reward head's last-token pick) drop the
real EOS tokens.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

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


def load_causal_lm(path: str, dtype: str, trust_remote_code: bool = False, quantization: Any = None) -> Any:
    """`quantization`: a BitsAndBytesConfig (quantization_config) for a 4-bit base, else None."""
    from transformers import AutoModelForCausalLM

    return _quantized(AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
        **_quantized_load_kwargs(quantization)))


def load_reward_model(path: str, dtype: str, pad_token_id: int, trust_remote_code: bool = False,
                      quantization: Any = None, num_labels: int = 1) -> Any:
    """A sequence-classification model with one output (a new head when `path` is a causal LM).
    With `quantization` its linear layers are 4-bit, the `score` head stays in `dtype`.
    `num_labels` > 1: a new head of that many outputs (the members of a reward ensemble)."""
    from transformers import AutoModelForSequenceClassification

    model = _quantized(AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
        **({"ignore_mismatched_sizes": True} if num_labels > 1 else {}), **_quantized_load_kwargs(quantization)))
    model.config.pad_token_id = pad_token_id
    return model


# ------------------------------------------------------------------------------------ 4-bit (QLoRA)
def quantization_config(model_cfg: Any) -> Any:
    """The transformers BitsAndBytesConfig that `model.quantization` asks for (config.ModelConfig),
    None for none. The packed 4-bit weights are stored in model.dtype (bnb_4bit_quant_storage): a
    DeepSpeed ZeRO-3 all-gather coalesces every partitioned parameter in one dtype, and uint8
    storage breaks it from the second step on; the bytes are the same either way."""
    if model_cfg.quantization == "none":
        return None
    require_bitsandbytes("model.quantization=" + model_cfg.quantization)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quant_type, bnb_4bit_use_double_quant=model_cfg.quant_double,
        bnb_4bit_compute_dtype=DTYPES[model_cfg.quant_compute_dtype or model_cfg.dtype],
        bnb_4bit_quant_storage=DTYPES[model_cfg.dtype],
        llm_int8_skip_modules=list(FULL_PRECISION_MODULES))


def stage_quantization(model_cfg: Any, lora: bool, lora_key: str) -> Any:
    """quantization_config for a stage that trains with LoRA when `lora` (its `lora_key`) is set;
    ConfigError when model.quantization asks for a 4-bit base the stage would have to train in full."""
    if model_cfg.quantization == "none":
        return None
    if not lora:
        from rlhf.config import ConfigError

        raise ConfigError(f"model.quantization={model_cfg.quantization} trains LoRA adapters on a frozen 4-bit base, "
                          f"and {lora_key} is false (a 4-bit base cannot be trained in full): set {lora_key}=true, "
                          "or model.quantization=none")
    return quantization_config(model_cfg)


def trained_on(quantization: Any) -> str | None:
    """The manifest's record of a stage's base: None (model.dtype), or e.g. "4bit nf4, double quantization,
    compute float32" (the published model is always the merged 16-bit one)."""
    if quantization is None:
        return None
    compute = str(quantization.bnb_4bit_compute_dtype).removeprefix("torch.")
    return (f"4bit {quantization.bnb_4bit_quant_type}" + (", double quantization" if quantization.bnb_4bit_use_double_quant
                                                          else "") + f", compute {compute}")


# heads kept in model.dtype under 4-bit loading: a causal LM's output layer and a reward model's score head
# (both trained or read at full precision; the score head is trained in full by peft's SEQ_CLS task)
FULL_PRECISION_MODULES = ("lm_head", "score", "embed_out", "classifier")


def require_bitsandbytes(key: str) -> None:
    """ConfigError naming `key` when bitsandbytes cannot be imported."""
    from rlhf.config import ConfigError

    import logging
    # bitsandbytes' CPU backend warns at import that an optional kernel for its bf16 inference path is missing;
    # that path is switched off here (_quantized), so the warning says nothing about what runs
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        raise ConfigError(f"{key} needs bitsandbytes ({type(e).__name__}: {e}); install it with "
                          "`pip install 'bitsandbytes>=0.49,<0.51'` (on CPUs it needs AVX2), or set "
                          "model.quantization=none") from None


def _quantized_load_kwargs(quantization: Any) -> dict:
    if quantization is None:
        return {}
    from rlhf import distributed

    kwargs: dict = {"quantization_config": quantization}
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
        zero3_init = is_deepspeed_zero3_enabled()
    except ImportError:
        zero3_init = False
    if not zero3_init:  # a device_map is refused while a DeepSpeed ZeRO-3 HF config is live
        kwargs["device_map"] = {"": distributed.device()}
    return kwargs


def _quantized(model: Any) -> Any:
    """Every 4-bit layer of `model` set to compute as its compute dtype says on every device.
    (bitsandbytes' CPU backend otherwise repacks a layer's weights in place, the first time it
    runs without gradients on a CPU with AVX512-BF16, into a layout of its own that computes in
    bfloat16 and fails for widths not a multiple of its block; a DeepSpeed partition would be
    rewritten under the engine.)"""
    four_bit = four_bit_layers(model)
    for module in four_bit:
        module.support_avx512bf16_for_cpu = False
    if four_bit:
        # the weights that stay in model.dtype (embeddings, norms, heads) are loaded as views into the checkpoint's
        # memory map, which then keeps every page the quantization read (the whole file) resident: own copies
        # release it (measured: 386 MiB of resident memory for a 134M-parameter checkpoint)
        packed = {id(m.weight) for m in four_bit}
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if id(tensor) not in packed and tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
    return model


def trainable_in_dtype(model: Any, dtype: str) -> None:
    """Put the trainable parameters (adapters, a reward head) of a 4-bit `model` back in `dtype`.
    TRL's trainers cast them to bfloat16 when they see a quantized model; here they stay in
    model.dtype, as without quantization (a float32 hidden state cannot meet a bfloat16 reward
    head, and bfloat16 arithmetic costs CPUs 10x). Call after the trainer is built, before it trains."""
    if not is_quantized(model):
        return
    for param in getattr(model, "module", model).parameters():
        if param.requires_grad and param.dtype != DTYPES[dtype]:
            param.data = param.data.to(DTYPES[dtype])


def parameter_count(model: Any) -> int:
    """Parameters of `model` as the plain model counts them (a 4-bit weight by its unpacked shape)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
    return total


def weights_mib(*models_: Any) -> float:
    """MiB the parameters and buffers of `models_` occupy (storage shared between them, or tied
    weights, counted once; a 4-bit layer at its packed size). Before DeepSpeed partitions them."""
    seen: set = set()
    total = 0
    for model in models_:
        if model is None:
            continue
        for t in [*model.parameters(), *model.buffers()]:
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total / 2**20


def four_bit_layers(model: Any) -> list:
    """The bitsandbytes 4-bit linear layers of `model` (any wrapper), in module order."""
    if not is_quantized(model):
        return []
    import bitsandbytes as bnb

    return [m for m in getattr(model, "module", model).modules() if isinstance(m, bnb.nn.Linear4bit)]


def is_quantized(model: Any) -> bool:
    """Whether `model` (a DeepSpeed engine, peft wrapper or transformers model) has a 4-bit base."""
    return bool(getattr(unwrap(model), "is_loaded_in_4bit", False))


def dense_weight(layer: Any) -> torch.Tensor:
    """The full-precision (out, in) weight of a 4-bit linear layer, as its 4 bits mean it: the
    dequantized value the layer computes with, in the layer's storage dtype. Under ZeRO-3 the
    caller gathers the weight first."""
    import bitsandbytes as bnb

    weight = layer.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(weight.dtype)


def conv1d_names(model: Any) -> set[str]:
    """Names (in the plain model) of the layers that the plain architecture of `model` stores as
    GPT-2's Conv1D, (in, out), which the 4-bit model holds as (out, in) linear layers. Found on a
    skeleton of the architecture built on the meta device, which costs no memory."""
    from transformers.pytorch_utils import Conv1D

    return {name for name, module in skeleton(model).named_modules() if isinstance(module, Conv1D)}


def skeleton(model: Any) -> Any:
    """`model`'s transformers class built from plain_config on the meta device: the plain
    architecture, no memory. Built by the class itself, not from_config, which under a live
    DeepSpeed ZeRO-3 config would partition it collectively."""
    base = unwrap(model)
    with torch.device("meta"):
        return type(base)(plain_config(model))


def plain_config(model: Any) -> Any:
    """A copy of `model`'s config without its quantization settings: what a plain 16-bit copy carries."""
    import copy

    config = copy.deepcopy(unwrap(model).config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def dequantized_weights(model: Any, zero_stage: int) -> dict | None:
    """{state-dict name: dense weight} for every 4-bit layer of `model` (a DeepSpeed engine or plain
    module) on rank 0, None elsewhere. Collective under ZeRO-3 (each layer's weight is gathered on
    every rank, in the same order)."""
    from rlhf import distributed

    module = getattr(model, "module", model)
    four_bit = {id(layer) for layer in four_bit_layers(module)}
    out: dict = {}
    for name, layer in module.named_modules():
        if id(layer) not in four_bit:
            continue
        with gathered([layer.weight], zero_stage):
            if distributed.is_main():
                out[f"{name}.weight"] = dense_weight(layer).detach().cpu().clone()
    return out if distributed.is_main() else None


@contextlib.contextmanager
def gathered(params: list, zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3, `params` gathered in full on every rank for the block (a collective); else nothing."""
    if zero_stage == 3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


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
    (a DeepSpeed engine is unwrapped; its ZeRO-3 hooks live on the submodules); (B, T, K) for a
    head of K outputs (a reward ensemble's members, rlhf.ensemble)."""
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


def save_plain_model(model: Any, state_dict: dict, out_dir: Any, dense: dict | None = None) -> None:
    """Write `model`'s architecture with the values of `state_dict` (every parameter, gathered:
    see distributed.full_state_dict) as a plain transformers directory; a LoRA model is merged
    (merged_lora_state_dict). The result loads with plain AutoModelFor... and has no adapter
    keys. Rank 0 only.

    A 4-bit model (`dense`: its dequantized_weights) is written as the 16-bit model it computes:
    each packed weight replaced by its dense value, the LoRA delta added to that (not to the
    original checkpoint's weights, which the adapter never saw), GPT-2's Conv1D weights turned back
    to (in, out), and a config without quantization settings."""
    if is_quantized(model):
        state_dict = with_dense_weights(state_dict, dense or {})
    plain = merged_lora_state_dict(model, state_dict) if is_lora(model) else state_dict
    base = model.get_base_model() if is_lora(model) else model
    if is_quantized(model):
        conv = conv1d_names(model)
        dense_names = {_plain_key(k) for k in (dense or {})}
        for key in dense_names:
            if key.removesuffix(".weight") in conv:
                plain[key] = plain[key].T.contiguous()
        plain_model = skeleton(model)
        if getattr(base, "generation_config", None) is not None and getattr(plain_model, "generation_config", None) is not None:
            plain_model.generation_config = base.generation_config
        base = plain_model
    base.save_pretrained(str(out_dir), state_dict=plain, safe_serialization=True)


def with_dense_weights(state_dict: dict, dense: dict) -> dict:
    """`state_dict` of a 4-bit model with each packed weight replaced by its dense value and the
    quantization state bitsandbytes stores beside it (`….weight.absmax`, `….weight.quant_map`, …) left out."""
    missing = [k for k in dense if k not in state_dict]
    if missing:
        raise RuntimeError(f"dense weights without a state-dict entry: {missing[:3]}")
    return {k: dense.get(k, v) for k, v in state_dict.items()
            if not any(k.startswith(w + ".") for w in _weights_of(k, dense))}


def _weights_of(key: str, dense: dict) -> list[str]:
    # the dense weight names that `key` could sit under (`a.b.weight.absmax` -> `a.b.weight`)
    parts = key.split(".")
    return [w for w in (".".join(parts[:i]) for i in range(1, len(parts))) if w in dense]


def _plain_key(key: str) -> str:
    prefix = "base_model.model."
    key = key[len(prefix):] if key.startswith(prefix) else key
    return key.replace(".base_layer.", ".")


def publish_model(model: Any, zero_stage: int, out_dir: Any, tokenizer: Any) -> None:
    """The one save path of all three stages. Collective (every rank calls it; ZeRO-3 gathers
    the partitions); rank 0 ends with a plain model directory (safetensors, merged when LoRA,
    tokenizer) in `out_dir`. `model`: a DeepSpeed engine or a plain (peft) module."""
    import shutil
    from pathlib import Path

    from rlhf import distributed

    state_dict = distributed.full_state_dict(model, zero_stage)
    dense = dequantized_weights(model, zero_stage) if is_quantized(model) else None
    if not distributed.is_main():
        return
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    save_plain_model(getattr(model, "module", model), state_dict, out_dir, dense)
    if not (out_dir / "model.safetensors").is_file() and not list(out_dir.glob("model-*.safetensors")):
        raise RuntimeError(f"saving the model wrote no safetensors into {out_dir}")
    tokenizer.save_pretrained(str(out_dir))
