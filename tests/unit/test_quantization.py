"""QLoRA (model.quantization=4bit): a 4-bit NF4 base with LoRA adapters, and its publication as the
plain 16-bit model it computes.

The merged export must reproduce the 4-bit+LoRA model's logits. Tolerance 1e-5 in float32: the
merged model computes (deq(W) + s B A) x where the 4-bit model computes deq(W) x + s B (A x), the
same numbers summed in another order; measured differences are 3e-7 to 1.5e-6 on logits of
order 1. A wrong merge is off by far more: merging the adapter into the original full-precision
weights instead of the dequantized ones differs by the NF4 error (about 10 % of each weight), and
GPT-2's Conv1D weights written untransposed are a different model altogether.
"""
from __future__ import annotations

import pytest
import torch

from rlhf import config, models

pytest.importorskip("bitsandbytes")
TOLERANCE = 1e-5


def _model_cfg(*overrides: str):
    return config.load_config(None, ["model.quantization=4bit", "model.lora.target_modules=[all-linear]",
                                     *overrides]).model


def _randomised_adapters(model, seed: int = 0) -> None:
    """LoRA B (zero at init) and the trained copy of a reward head set to random values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["gpt2", "pythia", "qwen2", "llama3", "opt"])
@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_merged_export_computes_what_the_4bit_lora_model_computes(family_checkpoints, tmp_path, family, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    src = family_checkpoints[family]
    cfg = _model_cfg()
    tok = AutoTokenizer.from_pretrained(str(src))
    models.ensure_pad_token(tok)
    torch.manual_seed(0)
    if kind == "policy":
        model = models.load_causal_lm(str(src), "float32", quantization=models.quantization_config(cfg))
        models.resize_for_tokenizer(model, tok)
        model = models.add_lora(model, cfg.lora, "CAUSAL_LM")
        plain_cls = AutoModelForCausalLM
    else:
        model = models.load_reward_model(str(src), "float32", tok.pad_token_id,
                                         quantization=models.quantization_config(cfg))
        models.resize_for_tokenizer(model, tok)
        model = models.add_lora(model, cfg.lora, "SEQ_CLS")
        plain_cls = AutoModelForSequenceClassification
    layers = models.four_bit_layers(model)
    assert models.is_quantized(model) and len(layers) >= 8  # every linear layer of the body, 2 blocks
    assert all(not layer.support_avx512bf16_for_cpu for layer in layers)  # one compute path on every CPU
    head = getattr(models.unwrap(model), "score", None) or models.unwrap(model).get_output_embeddings()
    assert head not in layers and getattr(head, "weight", head).dtype == torch.float32  # heads stay full precision
    _randomised_adapters(model)

    out = tmp_path / "published"
    models.publish_model(model, 0, out, tok)
    text = (out / "config.json").read_text()
    assert "quantization_config" not in text
    plain = plain_cls.from_pretrained(str(out), use_safetensors=True)
    assert not models.is_quantized(plain)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    ids = torch.randint(3, len(tok) - 1, (3, 17), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert want.shape == got.shape
    assert (want - got).abs().max().item() < TOLERANCE, (want - got).abs().max().item()
    # a merge into the original full-precision checkpoint instead (the 4-bit base never seen) is far off
    original = plain_cls.from_pretrained(str(src), use_safetensors=True, **({"num_labels": 1} if kind == "reward" else {}))
    assert any((dict(plain.named_parameters())[n] - p).abs().max() > 1e-3
               for n, p in original.named_parameters() if n in dict(plain.named_parameters()) and p.dim() == 2
               and "wte" not in n and "embed" not in n and "score" not in n and "lm_head" not in n)


def test_gpt2_conv1d_weights_are_published_in_their_own_orientation(family_checkpoints, tmp_path):
    """GPT-2 keeps its attention and MLP weights as Conv1D (in, out); the 4-bit model holds them as
    (out, in) linear layers. With untrained adapters the export is the dequantized base: within
    the NF4 error (about 10 %) of the original weights, and far from their transpose (the square
    c_proj would load without complaint either way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = family_checkpoints["gpt2"]
    cfg = _model_cfg()
    tok = AutoTokenizer.from_pretrained(str(src))
    models.ensure_pad_token(tok)
    model = models.load_causal_lm(str(src), "float32", quantization=models.quantization_config(cfg))
    models.resize_for_tokenizer(model, tok)
    model = models.add_lora(model, cfg.lora, "CAUSAL_LM")
    out = tmp_path / "gpt2"
    models.publish_model(model, 0, out, tok)
    published = dict(AutoModelForCausalLM.from_pretrained(str(out)).named_parameters())
    original = dict(AutoModelForCausalLM.from_pretrained(str(src)).named_parameters())
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                 "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"):
        w, o = published[name], original[name]
        assert w.shape == o.shape, name
        assert (w - o).norm() / o.norm() < 0.2, name
        if o.shape[0] == o.shape[1]:
            assert (w - o.T).norm() / o.norm() > 1.0, name


def test_quantization_config_follows_the_model_keys():
    q = models.quantization_config(_model_cfg("model.quant_type=fp4", "model.quant_double=false"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32 and q.bnb_4bit_quant_storage == torch.float32
    q = models.quantization_config(_model_cfg("model.dtype=bfloat16"))
    # ZeRO-3 all-gathers every partitioned parameter in one dtype: the packed weights are stored in model.dtype
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_compute_dtype == torch.bfloat16
    q = models.quantization_config(_model_cfg("model.dtype=bfloat16", "model.quant_compute_dtype=float32"))
    assert q.bnb_4bit_compute_dtype == torch.float32
    assert models.quantization_config(config.load_config(None, []).model) is None
    assert models.trained_on(models.quantization_config(_model_cfg())) == "4bit nf4, double quantization, compute float32"


def test_quantization_needs_lora_in_the_stage_that_trains():
    cfg = _model_cfg()
    with pytest.raises(config.ConfigError, match=r"sft\.lora is false .*set sft\.lora=true"):
        models.stage_quantization(cfg, False, "sft.lora")
    assert models.stage_quantization(cfg, True, "sft.lora") is not None
    assert models.stage_quantization(config.load_config(None, []).model, False, "sft.lora") is None


@pytest.mark.parametrize("override,match", [
    ("model.quantization=8bit", r"must be none or 4bit, got '8bit' \(8-bit training is not offered"),
    ("model.quantization=4", "must be none or 4bit"),
    ("model.quant_type=int4", "must be nf4 or fp4"),
    ("model.quant_compute_dtype=float8", "must be float32, bfloat16 or float16"),
])
def test_bad_quantization_keys_are_refused(override, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load_config(None, [override])


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_rollout_engine_weights_are_the_published_ones(family_checkpoints, tmp_path, family):
    """What a vLLM rollout engine is sent (engines.vllm_engine.plain_weights) is the published
    checkpoint exactly: dense, adapter merged, GPT-2's Conv1D (in, out), never packed 4-bit bytes."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from rlhf.engines.vllm_engine import plain_weights

    src = family_checkpoints[family]
    cfg = _model_cfg("model.lora.target_modules=[c_attn,q_proj,v_proj]")  # some 4-bit layers without an adapter
    tok = AutoTokenizer.from_pretrained(str(src))
    models.ensure_pad_token(tok)
    model = models.load_causal_lm(str(src), "float32", quantization=models.quantization_config(cfg))
    models.resize_for_tokenizer(model, tok)
    model = models.add_lora(model, cfg.lora, "CAUSAL_LM")
    _randomised_adapters(model, seed=3)
    models.publish_model(model, 0, tmp_path / "out", tok)
    published = load_file(str(tmp_path / "out" / "model.safetensors"))
    sent = dict(plain_weights(model))
    assert set(published) <= set(sent), sorted(set(published) - set(sent))[:5]
    for name, value in published.items():
        assert sent[name].shape == value.shape and sent[name].dtype == value.dtype, name
        assert torch.allclose(sent[name], value, atol=1e-6), name
