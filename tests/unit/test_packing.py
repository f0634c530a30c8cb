"""Packed PPO forwards (rlhf/ppo/packing.py): the layout by hand, and equality with the padded
forward (values and gradients) on every model family."""
from __future__ import annotations

import pytest
import torch

from families import FAMILIES
from rlhf import models
from rlhf.generation import Sampling
from rlhf.ppo import packing
from rlhf.ppo.rollout import policy_forward, value_forward
from rlhf.scoring import position_ids_from_mask


def _batch(vocab: int, seed: int = 0):
    """[left-padded query | right-padded response] rows: queries of 2-5 tokens, responses of 1-9."""
    g = torch.Generator().manual_seed(seed)
    q, r = 5, 9
    q_lens, r_lens = [5, 2, 3, 4, 2, 5], [1, 9, 2, 3, 1, 2]
    ids = torch.randint(3, vocab, (len(q_lens), q + r), generator=g)
    mask = torch.zeros_like(ids)
    for i, (a, b) in enumerate(zip(q_lens, r_lens)):
        mask[i, q - a:q + b] = 1
    return ids * mask, mask, q


def test_pack_layout_by_hand():
    ids = torch.tensor([[0, 7, 8, 9, 0, 0],    # query [7, 8], response [9]
                        [5, 6, 1, 2, 3, 4],    # query [5, 6], response [1, 2, 3, 4]
                        [0, 0, 4, 0, 0, 0]])   # query [], response... (see mask)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 1],
                         [0, 1, 1, 0, 0, 0]])
    ids[2, 1] = 11
    pk = packing.pack(ids, mask, force=True)
    # first-fit decreasing (longest first) into rows of 2 x 6 = 12: row 1 (6 tokens), then row 0 (3),
    # then row 2 (2), all in one packed row of 11 tokens
    assert pk.ids.tolist() == [[5, 6, 1, 2, 3, 4, 7, 8, 9, 11, 4]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1]]
    assert pk.row.tolist() == [0, 0, 0] and pk.shift.tolist() == [5, 0, 8]
    r, c = pk.locate(torch.tensor([0, 2, 1]), torch.tensor([2, 2, 5]))  # dense (0,2), (2,2), (1,5)
    assert r.tolist() == [0, 0, 0] and c.tolist() == [7, 10, 5]
    assert packing.pack(ids, mask) is not None           # 11 packed vs 18 padded tokens: worth it
    assert packing.pack(ids[1:2], mask[1:2]) is None     # a full row: nothing to save
    # filler after the last sequence of a row when rows differ in fill
    pk = packing.pack(ids[[1, 1, 0]], mask[[1, 1, 0]], force=True)
    assert pk.ids.tolist() == [[5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4], [7, 8, 9] + [0] * 9]
    assert pk.position_ids[1].tolist() == [0, 1, 2] + [0] * 9  # filler: its own sequences, at position 0


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_packed_rows_longer_than_the_position_table(family_checkpoints, family):
    """Rows pack up to ROW_FACTOR x the dense width: with long prompts that is past a learned position
    table (GPT-2, OPT: 256 here), which only real tokens' positions (< the dense width) may index."""
    path = str(family_checkpoints[family])
    tok = models.load_tokenizer(path)
    models.ensure_pad_token(tok)
    actor = models.load_causal_lm(path, "float32")
    models.resize_for_tokenizer(actor, tok)
    models.disable_dropout(actor)
    actor.eval()
    q, r = 200, 24
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (4, q + r), generator=g)
    mask = torch.zeros_like(ids)
    for i, (a, b) in enumerate([(200, 24), (12, 3), (190, 2), (15, 24)]):
        mask[i, q - a:q + b] = 1
    ids = ids * mask
    assert (q + r) * packing.ROW_FACTOR > actor.config.max_position_embeddings
    sampling = Sampling(temperature=0.8)
    logp, _ = policy_forward(actor, ids, mask, q, sampling)
    resp = mask[:, q:].bool()
    dense = _dense_logp(actor, ids, mask, q, sampling)
    assert torch.allclose(logp[resp], dense[resp], atol=1e-4)


def _dense_logp(model, ids, mask, q, sampling):
    from rlhf.ppo.core import logprobs_from_logits

    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, q - 1:-1]
    return logprobs_from_logits(logits, ids[:, q:], sampling.temperature, sampling.top_k, sampling.top_p)


# OPT's decoder builds its mask from an all-ones default when none is given, so it cannot run
# packed rows: it must be detected and run padded
PACKS = {"gpt2": True, "pythia": True, "qwen2": True, "llama3": True, "opt": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_equals_the_padded_one(family_checkpoints, family, recwarn):
    path = str(family_checkpoints[family])
    tok = models.load_tokenizer(path)
    models.ensure_pad_token(tok)
    actor = models.load_causal_lm(path, "float32")
    models.resize_for_tokenizer(actor, tok)
    critic = models.load_reward_model(path, "float32", tok.pad_token_id)
    models.resize_for_tokenizer(critic, tok)
    for m in (actor, critic):
        models.disable_dropout(m)
        m.eval()
    ids, mask, q = _batch(len(tok))
    assert packing.pack(ids, mask) is not None, "the test batch must be worth packing"
    sampling = Sampling(temperature=0.8)
    resp = mask[:, q:].bool()

    logp, _ = policy_forward(actor, ids, mask, q, sampling)
    assert packing._VERIFIED.get(models.body_and_head(actor)[0]) is PACKS[family], family
    dense = _dense_logp(actor, ids, mask, q, sampling)
    assert torch.allclose(logp[resp], dense[resp], atol=1e-4), (logp[resp] - dense[resp]).abs().max()
    assert (logp[~resp] == 0).all()

    values = value_forward(critic, ids, mask, q)
    assert packing._VERIFIED.get(models.body_and_head(critic)[0]) is PACKS[family], family
    body, head = models.body_and_head(critic)
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    dense_v = head(hidden).squeeze(-1)[:, q - 1:-1]
    assert torch.allclose(values[resp], dense_v[resp], atol=1e-4)
    # reward scores at each row's last real token, packed, equal rlhf.scoring.reward_scores
    from rlhf.ppo.rollout import packed_scores
    from rlhf.scoring import reward_scores

    assert torch.allclose(packed_scores(critic, ids, mask), reward_scores(critic, ids, mask), atol=1e-4)
    assert bool([w for w in recwarn if "packed sequences" in str(w.message)]) is not PACKS[family]


def test_packed_gradients_equal_the_padded_ones(family_checkpoints):
    path = str(family_checkpoints["llama3"])
    tok = models.load_tokenizer(path)
    models.ensure_pad_token(tok)
    model = models.load_causal_lm(path, "float32")
    models.resize_for_tokenizer(model, tok)
    ids, mask, q = _batch(len(tok), seed=1)
    resp = mask[:, q:].float()
    weights = torch.randn(resp.shape, generator=torch.Generator().manual_seed(2))

    logp, _ = policy_forward(model, ids, mask, q, Sampling())
    (logp * weights * resp).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (_dense_logp(model, ids, mask, q, Sampling()) * weights * resp).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(packed[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_a_model_that_does_not_honour_packing_keeps_the_padded_path(family_checkpoints):
    """A causal LM whose forward does more than body -> lm_head (here: scaled logits) fails the
    one-time check and is run padded, with a warning; its log-probs stay right."""
    path = str(family_checkpoints["llama3"])
    tok = models.load_tokenizer(path)
    models.ensure_pad_token(tok)
    model = models.load_causal_lm(path, "float32")
    models.resize_for_tokenizer(model, tok)
    plain_forward = model.forward

    def scaled(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    ids, mask, q = _batch(len(tok))
    with pytest.warns(UserWarning, match="packed sequences did not reproduce"):
        logp, _ = policy_forward(model, ids, mask, q, Sampling())
    resp = mask[:, q:].bool()
    assert torch.allclose(logp[resp], _dense_logp(model, ids, mask, q, Sampling())[resp], atol=1e-5)
