"""Invariants every model family must satisfy, on tiny random-init checkpoints of GPT-2, Pythia,
Qwen2, Llama-3 and OPT (tests/families.py) loaded through the pipeline's own loaders:

- the token ids PPO samples after and scores are the ids SFT and the RM trained on;
- PPO samples from exactly the distribution it computes log-probs from (a checkpoint's
  generation_config.json cannot change it; top-k/top-p are honoured in the log-probs);
- dropout is off in the PPO models (two train-mode forwards agree);
- the critic starts on the normalised reward's scale;
- one merge-and-save path publishes LoRA models as plain checkpoints with the adapter's logits.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from families import FAMILIES, family_info
from rlhf import models
from rlhf.config import LoraConfig
from rlhf.data import render_prompt
from rlhf.generation import Sampling, encode_prompts, generate
from rlhf.ppo.rollout import policy_forward, value_forward
from rlhf.scoring import reward_scores
from rlhf.tokenization import encode_pair, encode_prompt, encode_response

PROMPTS = ["give me birds", "name a few cities"]
COMPLETION = " owl, duck."


def _policy(path, dtype="float32"):
    tok = models.load_tokenizer(str(path))
    models.ensure_pad_token(tok)
    model = models.load_causal_lm(str(path), dtype)
    models.resize_for_tokenizer(model, tok)
    return tok, model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_template", [True, False])
def test_sft_rm_and_ppo_see_the_same_token_ids(family_checkpoints, family, use_template):
    tok, _ = _policy(family_checkpoints[family])
    info = family_info(family)
    for prompt in PROMPTS:
        text = render_prompt(tok, prompt, use_template)
        sft_ids, n_prompt, _ = encode_pair(tok, text, COMPLETION, 512)      # what SFT trains on (labels after n_prompt)
        rm_ids, _, _ = encode_pair(tok, text, COMPLETION, 512)              # what the RM trains on
        q_ids, q_mask = encode_prompts(tok, [text], 512, torch.device("cpu"))  # what PPO conditions on
        query = q_ids[0][q_mask[0].bool()].tolist()
        response = tok(COMPLETION, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # a sampled response
        assert sft_ids == rm_ids == query + response
        assert sft_ids[:n_prompt] == query and sft_ids[n_prompt:] == encode_response(tok, COMPLETION)
        # exactly one BOS where the family adds one (Llama-3's template writes it too), none elsewhere
        bos_count = sft_ids.count(tok.bos_token_id) if tok.bos_token_id is not None else 0
        if info["adds_bos"]:
            assert sft_ids[0] == tok.bos_token_id and sft_ids[1:n_prompt].count(tok.bos_token_id) == 0, family
        elif tok.bos_token_id != tok.eos_token_id:
            assert bos_count == 0, family


def test_llama3_bos_once_even_when_the_template_writes_it(family_checkpoints):
    tok, _ = _policy(family_checkpoints["llama3"])
    text = render_prompt(tok, "give me birds", True)
    assert text.startswith(tok.bos_token)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id, tok.bos_token_id]  # the trap: encoding adds a second
    assert encode_prompt(tok, text).count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_checkpoint_generation_config_does_not_change_ppo_sampling(family_checkpoints, family, tmp_path):
    """A generation_config.json with repetition_penalty / no_repeat_ngram_size / min_new_tokens and
    its own top-k must not touch the samples: same seed -> the same tokens as without the file."""
    src = family_checkpoints[family]
    tok, model = _policy(src)
    texts = [render_prompt(tok, p, True) for p in PROMPTS]
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 10
    model.generation_config.top_k = 2
    sampling = Sampling(temperature=1.0)
    torch.manual_seed(0)
    with_cfg = generate(model, tok, texts, max_new_tokens=12, sampling=sampling)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig()
    torch.manual_seed(0)
    without = generate(model, tok, texts, max_new_tokens=12, sampling=sampling)
    assert torch.equal(with_cfg.response_ids, without.response_ids)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_top_k_top_p_are_honoured_in_the_log_probs(family_checkpoints, family):
    tok, model = _policy(family_checkpoints[family])
    model.eval()
    texts = [render_prompt(tok, p, True) for p in PROMPTS] * 4
    sampling = Sampling(temperature=0.7, top_k=5, top_p=0.9)
    torch.manual_seed(1)
    g = generate(model, tok, texts, max_new_tokens=8, sampling=sampling)
    ids, mask = torch.cat([g.query_ids, g.response_ids], 1), torch.cat([g.query_mask, g.response_mask], 1)
    q = g.query_ids.shape[1]
    with torch.no_grad():
        logp, _ = policy_forward(model, ids, mask, q, sampling)
        full, _ = policy_forward(model, ids, mask, q, Sampling(temperature=0.7))
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits[:, q - 1:-1].float()
    m = g.response_mask.bool()
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == g.response_ids[..., None]).any(-1)[m].all(), "a sampled token outside the top-k"
    # the truncated distribution puts more mass on each kept token than the full one
    assert (logp[m] >= full[m] - 1e-5).all() and (logp[m] > full[m] + 1e-3).any()
    # and it is a distribution over the kept tokens: log-probs equal log_softmax over the top-k/top-p set
    from rlhf.ppo.core import sampling_logits

    warped = sampling_logits(logits, 0.7, 5, 0.9)
    kept = torch.isfinite(warped)
    assert (kept.sum(-1) <= 5).all() and (kept.sum(-1) >= 1).all()
    assert torch.allclose(logp[m], torch.log_softmax(warped, -1).gather(-1, g.response_ids[..., None]).squeeze(-1)[m],
                          atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0), Sampling(temperature=0.7, top_k=5, top_p=0.9)],
                         ids=["plain", "top-k-top-p"])
def test_generation_pass_log_probs_equal_a_recomputed_forward(family_checkpoints, family, sampling):
    """PPO's old log-probs come from the generation pass (KV cache, one position at a time); they
    must equal the full forward that the update recomputes: same positions on left-padded prompts of
    different lengths, same distribution, 0 (not -inf) on the padding after EOS."""
    tok, model = _policy(family_checkpoints[family])
    model.eval()
    texts = [render_prompt(tok, p, True) for p in PROMPTS + ["a much longer prompt with many more words in it than the rest"]]
    torch.manual_seed(3)
    g = generate(model, tok, texts * 2, max_new_tokens=10, sampling=sampling, with_logprobs=True)
    torch.manual_seed(3)  # recording the log-probs does not change what is sampled
    assert torch.equal(generate(model, tok, texts * 2, max_new_tokens=10, sampling=sampling).response_ids, g.response_ids)
    ids, mask = torch.cat([g.query_ids, g.response_ids], 1), torch.cat([g.query_mask, g.response_mask], 1)
    with torch.no_grad():
        again, _ = policy_forward(model, ids, mask, g.query_ids.shape[1], sampling)
    m = g.response_mask.bool()
    assert g.logprobs.shape == g.response_ids.shape and (g.query_mask == 0).any(), "prompts must be left-padded"
    assert torch.isfinite(g.logprobs).all() and (g.logprobs[~m] == 0).all()
    assert torch.allclose(g.logprobs[m], again[m], atol=1e-4), (g.logprobs[m] - again[m]).abs().max()


@pytest.mark.parametrize("family", ["gpt2", "opt", "pythia"])
def test_dropout_is_off_in_ppo_models(family_checkpoints, family):
    tok, model = _policy(family_checkpoints[family])
    lora = LoraConfig(r=4, alpha=8, dropout=0.3, target_modules=None)
    model = models.add_lora(model, lora, "CAUSAL_LM")
    ids = torch.tensor([encode_pair(tok, "give me birds", COMPLETION, 64)[0]])
    model.train()
    if family_info(family)["dropout"]:
        torch.manual_seed(0)
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
        assert not torch.allclose(a, b), "the fixture should have dropout on"
    models.disable_dropout(model)
    model.train()
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_critic_starts_on_the_normalised_reward_scale(family_checkpoints, family):
    tok, _ = _policy(family_checkpoints[family])
    rm = models.load_reward_model(str(family_checkpoints[family]), "float32", tok.pad_token_id)
    models.resize_for_tokenizer(rm, tok)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.eval()
    q_ids, q_mask = encode_prompts(tok, PROMPTS, 64, torch.device("cpu"))
    r = torch.tensor([tok(COMPLETION, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * 2)
    ids, mask = torch.cat([q_ids, r], 1), torch.cat([q_mask, torch.ones_like(r)], 1)
    # value_forward is evaluated at a response one token longer, so its last position is the last real token
    ids_x = torch.cat([ids, torch.full((2, 1), tok.pad_token_id)], 1)
    mask_x = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], 1)
    mean, std = 3.0, 2.5
    with torch.no_grad():
        score = reward_scores(rm, ids, mask)
        values = value_forward(rm, ids_x, mask_x, q_ids.shape[1], (mean, std))  # (B, R+1)
    assert torch.allclose(values[:, -1], (score - mean) / std, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_lora_publish_is_a_plain_merged_checkpoint(family_checkpoints, family, task, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok, model = _policy(family_checkpoints[family])
    if task == "SEQ_CLS":
        model = models.load_reward_model(str(family_checkpoints[family]), "float32", tok.pad_token_id)
        models.resize_for_tokenizer(model, tok)
    n_vocab = len(tok)
    model = models.add_lora(model, LoraConfig(r=4, alpha=8, target_modules=None), task)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero) and head
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(std=0.2)
    model.eval()
    ids = torch.tensor([encode_pair(tok, "give me birds", COMPLETION, 64)[0]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = tmp_path / "published"
    models.publish_model(model, 0, out, tok)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "modules_to_save" in k or "base_model" in k], keys[:5]
    cls = AutoModelForCausalLM if task == "CAUSAL_LM" else AutoModelForSequenceClassification
    plain = cls.from_pretrained(str(out), use_safetensors=True).eval()
    assert plain.get_input_embeddings().weight.shape[0] == n_vocab
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == tok.pad_token_id
    if task == "SEQ_CLS":
        assert plain.config.num_labels == 1
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_on_every_assistant_turn(family_checkpoints, family):
    """sft.loss_on=all: every assistant reply (and its EOS) carries loss, nothing else does, and the
    last turn is encoded exactly as the single-turn path encodes it (templates and transcripts)."""
    from rlhf.data import render_response
    from rlhf.tokenization import encode_conversation

    tok, _ = _policy(family_checkpoints[family])
    msgs = [{"role": "user", "content": "give me birds"}, {"role": "assistant", "content": " owl, duck."},
            {"role": "user", "content": "and cities?"}, {"role": "assistant", "content": "oslo, rome."}]
    ids, mask, truncated = encode_conversation(tok, msgs, True, 512)
    assert not truncated and len(ids) == len(mask)
    replies = [render_response(tok, msgs[:k], msgs[k]["content"], True) for k in (1, 3)]
    labelled = [i for i, m in zip(ids, mask) if m]
    assert labelled == encode_response(tok, replies[0]) + encode_response(tok, replies[1])
    single, n_prompt, _ = encode_pair(tok, render_prompt(tok, msgs[:3], True), replies[1], 512)
    assert ids[len(ids) - (len(single) - n_prompt):] == single[n_prompt:]
    expected = tok.decode(single).replace(tok.eos_token, "")
    assert tok.decode(ids).replace(tok.eos_token, "") == expected  # the same conversation text, EOS aside
    if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
        assert ids.count(tok.bos_token_id) <= 1


@pytest.mark.parametrize("family", ["pythia", "gpt2", "opt"])
def test_transcript_replies_are_joined_as_hh_data_joins_them(family_checkpoints, family):
    """Without a chat template the prompt is an HH transcript: a reply from a {"messages"} row and
    the same reply parsed from raw HH-RLHF text give the same SFT/RM text (" reply" after "Assistant:")."""
    from rlhf.data import render_response, split_hh_pair

    tok, _ = _policy(family_checkpoints[family])
    msgs = [{"role": "user", "content": "give me birds"}]
    hh_prompt, hh_chosen, _ = split_hh_pair("\n\nHuman: give me birds\n\nAssistant: owl.",
                                            "\n\nHuman: give me birds\n\nAssistant: cat.")
    assert render_prompt(tok, hh_prompt, True) == render_prompt(tok, msgs, True)
    assert render_response(tok, hh_prompt, hh_chosen, True) == render_response(tok, msgs, "owl.", True) == " owl."


def test_a_huge_row_costs_what_max_length_allows_and_shorter_rows_are_untouched(family_checkpoints):
    """A text far beyond max_length is cut (by characters) before it is tokenized: fast, and the
    ids of a text within twice the bound are those of the uncut text."""
    import time

    from rlhf import models
    from rlhf.tokenization import CHARS_PER_TOKEN_BOUND, encode_pair, encode_prompt, encode_response, fit

    tok = models.load_tokenizer(str(family_checkpoints["llama3"]))
    max_length = 16
    limit = max_length * CHARS_PER_TOKEN_BOUND
    words = "list some metals and name a few colors " * 40
    prompt, response = words[: 2 * limit], words[: 2 * limit]
    p, r, _ = fit(encode_prompt(tok, prompt), encode_response(tok, response), max_length)
    assert encode_pair(tok, prompt, response, max_length) == (p + r, len(p), True)
    huge = "iron " * 5_000_000  # 25 MB
    t = time.time()
    ids, n_prompt, truncated = encode_pair(tok, huge, huge, max_length)
    assert time.time() - t < 2 and len(ids) == max_length and truncated
