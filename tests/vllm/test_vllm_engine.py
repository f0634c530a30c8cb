"""The vLLM rollout engine against the actor's own forward, on the demo model and the five families.

Each engine is real vLLM (its CPU build here), in this process. After every sync the log-probs vLLM
reports for its own samples must equal the actor's (rlhf.ppo.rollout.policy_forward, what PPO scores
with) within 1e-4, prompts longer than one KV-cache block included; after an update the engine must
sample from the new weights, not the old ones."""
from __future__ import annotations

import copy
import random

import pytest
import torch

pytest.importorskip("vllm")

from families import FAMILIES, build_family  # noqa: E402

from rlhf import engines  # noqa: E402
from rlhf.config import VLLMConfig  # noqa: E402
from rlhf.engines.vllm_engine import plain_weights  # noqa: E402
from rlhf.generation import Sampling  # noqa: E402
from rlhf.ppo.rollout import policy_forward  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SAMPLING = Sampling(temperature=0.8, top_k=20, top_p=0.9)
BLOCK = 128  # vLLM's prefix-cache block on CPU: a prompt past it has cached blocks to go stale
SETTINGS = VLLMConfig(kv_cache_gb=0.0625, max_model_len=256)
TOL = 1e-4


def _prompts(tok) -> list[str]:
    """Short prompts and two longer than one cache block (and a repeated one: its samples must differ)."""
    base = ["Why is the sky blue?", "Write a haiku about rain.", "List three prime numbers.", "Why is the sky blue?"]
    text = "Explain how a rainbow forms over the sea after a storm. "
    long = text * (BLOCK // max(1, len(tok(text, add_special_tokens=False)["input_ids"])) + 2)
    assert len(tok(long)["input_ids"]) > BLOCK
    return base + [long, "Then: " + long]


def _actor_logprobs(model, g) -> torch.Tensor:
    ids, mask = torch.cat([g.query_ids, g.response_ids], 1), torch.cat([g.query_mask, g.response_mask], 1)
    with torch.no_grad():
        return policy_forward(model, ids, mask, g.query_ids.shape[1], SAMPLING)[0]


def _gap(model, g) -> float:
    """Largest |vLLM log-prob - actor log-prob| over the response tokens of `g`."""
    return float(((g.logprobs - _actor_logprobs(model, g)).abs() * g.response_mask).max())


def _perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    """An 'update': every parameter moved (the tied embedding/head included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _check_engine_follows(model, tok) -> None:
    engine = engines.build("vllm", model, tok, max_prompt_length=200, vllm=SETTINGS)
    try:
        prompts = _prompts(tok)
        g = engine.generate(prompts, SAMPLING, 24, with_logprobs=True)[0]
        assert int(g.response_mask.sum()) > len(prompts)
        assert _gap(model, g) < TOL
        # the repeated prompt got its own seed: a different sample
        assert not torch.equal(g.response_ids[0], g.response_ids[3])
        old = copy.deepcopy(model)
        _perturb(model)
        engine.sync_weights(1)
        assert engine.version == 1
        g2 = engine.generate(prompts, SAMPLING, 24, with_logprobs=True)[0]
        assert _gap(model, g2) < TOL, "after a sync the engine must score with the new weights"
        assert _gap(old, g2) > 100 * TOL, "the engine still samples from the old weights"
        # the long prompts (past one cache block, already cached before the sync) are scored fresh
        long_rows = g2.response_mask[4:]
        diff = ((g2.logprobs - _actor_logprobs(model, g2)).abs() * g2.response_mask)[4:]
        assert long_rows.sum() > 0 and float(diff.max()) < TOL
    finally:
        engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_logprobs_match_the_actor_before_and_after_a_sync(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf import models

    d = build_family(family, tmp_path / family, heads=2)  # vLLM's CPU attention needs head size >= 32
    tok = models.load_tokenizer(str(d))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    if models.ensure_pad_token(tok):
        model.resize_token_embeddings(len(tok))
    model.eval()
    _check_engine_follows(model, tok)


def test_demo_model_with_tied_embeddings_and_lora(tmp_path):
    """The demo's scratch Llama (tied input/output embeddings) full, then as a LoRA actor: the engine
    serves the merged weights, and a changed adapter reaches it."""
    from peft import LoraConfig, get_peft_model

    from rlhf import models
    from rlhf.config import ScratchModelConfig

    d = build_family("llama3", tmp_path / "tok", heads=2)
    tok = models.load_tokenizer(str(d))
    models.ensure_pad_token(tok)
    torch.manual_seed(0)
    model = models.build_scratch_causal_lm(ScratchModelConfig(), tok, "float32").eval()
    assert model.config.tie_word_embeddings
    _check_engine_follows(model, tok)

    plain_names = list(model.state_dict())
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    lora.eval()
    names = [n for n, _ in plain_weights(lora)]
    assert names == plain_names
    engine = engines.build("vllm", lora, tok, max_prompt_length=200, vllm=SETTINGS)
    try:
        g = engine.generate(_prompts(tok), SAMPLING, 24, with_logprobs=True)[0]
        assert _gap(lora, g) < TOL
        with lora.disable_adapter():
            assert _gap(lora, g) > 100 * TOL, "the adapter did not reach the engine"
    finally:
        engine.close()


def test_plain_weights_are_the_state_dict(tmp_path):
    """Every state-dict entry, tied ones under both names, nothing else; LoRA merged to the plain names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = build_family("gpt2", tmp_path / "gpt2", heads=2)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    sd = model.state_dict()
    pushed = dict(plain_weights(model))
    assert sorted(pushed) == sorted(sd)
    assert all(torch.equal(pushed[k], sd[k]) for k in sd)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                           fan_in_fan_out=True, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    pushed = dict(plain_weights(lora))
    assert sorted(pushed) == sorted(merged)
    assert all(torch.allclose(pushed[k], merged[k], atol=1e-6) for k in merged)
    assert not torch.allclose(pushed["transformer.h.0.attn.c_attn.weight"], sd["transformer.h.0.attn.c_attn.weight"])


def test_engine_keeps_the_process_rng_and_threads_and_resumes_draws(tmp_path):
    """vLLM's constructor re-seeds the RNGs and disables torch.set_num_threads: both are put back.
    Samples are drawn from seeds taken from torch's RNG: the same RNG state gives the same responses."""
    from transformers import AutoModelForCausalLM

    from rlhf import models

    d = build_family("qwen2", tmp_path / "q", heads=2)
    tok = models.load_tokenizer(str(d))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    torch.manual_seed(123)
    random.seed(7)
    state, py = torch.get_rng_state(), random.getstate()
    threads = torch.get_num_threads()
    engine = engines.build("vllm", model, tok, max_prompt_length=200, vllm=SETTINGS)
    try:
        assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(threads)
        prompts = _prompts(tok)[:4]
        torch.manual_seed(5)
        a = engine.generate(prompts, SAMPLING, 16)[0]
        b = engine.generate(prompts, SAMPLING, 16)[0]
        torch.manual_seed(5)
        c = engine.generate(prompts, SAMPLING, 16, batch_size=3)
        assert [x.response_ids.shape[0] for x in c] == [3, 1]
        assert not torch.equal(a.response_ids, b.response_ids)
        got = [row[m.bool()].tolist() for x in c for row, m in zip(x.response_ids, x.response_mask)]
        assert got == [row[m.bool()].tolist() for row, m in zip(a.response_ids, a.response_mask)]
        greedy = engine.generate(prompts, Sampling(do_sample=False), 16)[0]
        hf = engines.build("hf", model, tok, max_prompt_length=200).generate(prompts, Sampling(do_sample=False), 16)[0]
        assert torch.equal(greedy.response_mask, hf.response_mask)
        assert torch.equal(greedy.response_ids * greedy.response_mask, hf.response_ids * hf.response_mask)
        assert torch.equal(greedy.ended, hf.ended)
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_4bit_lora_actor_is_served_dense_and_merged(family, tmp_path):
    """model.quantization=4bit: the engine gets the dequantized base plus the LoRA delta (GPT-2's Conv1D in
    its own orientation), never packed 4-bit bytes. Its log-probs equal the 4-bit+LoRA actor's, and a
    changed adapter reaches it on the next sync."""
    pytest.importorskip("bitsandbytes")
    from rlhf import config, models

    d = build_family(family, tmp_path / family, heads=2)  # vLLM's CPU attention needs head size >= 32
    tok = models.load_tokenizer(str(d))
    cfg = config.load_config(None, ["model.quantization=4bit", "model.lora.target_modules=[all-linear]"]).model
    model = models.load_causal_lm(str(d), "float32", quantization=models.quantization_config(cfg))
    if models.ensure_pad_token(tok):
        models.resize_for_tokenizer(model, tok)
    model = models.add_lora(model, cfg.lora, "CAUSAL_LM").eval()

    def move_adapters(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    move_adapters(0)
    engine = engines.build("vllm", model, tok, max_prompt_length=200, vllm=SETTINGS)
    try:
        prompts = _prompts(tok)
        g = engine.generate(prompts, SAMPLING, 16, with_logprobs=True)[0]
        assert int(g.response_mask.sum()) > len(prompts) and _gap(model, g) < TOL
        move_adapters(1)
        engine.sync_weights(1)
        g2 = engine.generate(prompts, SAMPLING, 16, with_logprobs=True)[0]
        assert _gap(model, g2) < TOL, "after a sync the engine must score with the new adapter"
        with model.disable_adapter():
            assert _gap(model, g2) > 100 * TOL, "the adapter did not reach the engine"
    finally:
        engine.close()
