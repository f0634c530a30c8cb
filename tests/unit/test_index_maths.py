"""Index maths of the pipeline against values written out by hand: where EOS cuts a response,
which position feeds which response token's log-prob / value, where the reward is read on rows
padded on both sides, how prompt + response are cut to a budget, and the small losses and
statistics (Bradley-Terry with margin and weights, Spearman with ties, policy/value loss branches,
whitening, entropy at a temperature, the prompt stream and the PPO plan).

Every expected value is a literal (or a math.* expression of literals) in the test, not the
function's own formula run again."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhf.config import DeepSpeedConfig, PPOStageConfig
from rlhf.generation import Sampling, truncate_at_eos
from rlhf.ppo import core, packing
from rlhf.ppo.rollout import packed_scores, policy_forward, value_forward
from rlhf.ppo.trainer import Plan, PromptStream, engine_config
from rlhf.scoring import bradley_terry_loss, reward_scores, spearman
from rlhf.tokenization import encode_pair, encode_prompt, encode_response, fit, last_index, pad_batch

LN = math.log


# ---------------------------------------------------------------- pad_batch (the one padding builder)

def test_pad_batch_left_and_right_by_hand():
    seqs = [[7, 8, 9], [5], []]
    ids, mask = pad_batch(seqs, 0, "left")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_batch(seqs, 0, "right")
    assert ids.tolist() == [[7, 8, 9], [5, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="side"):
        pad_batch(seqs, 0, "middle")


# ---------------------------------------------------------------- truncate_at_eos

EOS, PAD = 1, 0


def test_truncate_at_eos_rows_by_hand():
    resp = torch.tensor([[5, 6, 7, 8],    # no EOS: kept whole, not ended
                         [1, 6, 1, 8],    # EOS at position 0: only EOS survives (the later EOS too is cut)
                         [5, 6, 7, 1],    # EOS at the last position R-1
                         [5, 0, 1, 7],    # a pad id sampled before EOS is a real token: kept, masked in
                         [5, 1, 0, 0]])   # generate()'s own padding after EOS
    ids, mask, ended = truncate_at_eos(resp, EOS, PAD)
    assert ids.tolist() == [[5, 6, 7, 8],
                            [1, 0, 0, 0],
                            [5, 6, 7, 1],
                            [5, 0, 1, 0],
                            [5, 1, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1],
                             [1, 0, 0, 0],
                             [1, 1, 1, 1],
                             [1, 1, 1, 0],
                             [1, 1, 0, 0]]
    assert ended.tolist() == [False, True, True, True, True]
    assert ids.dtype == resp.dtype and mask.dtype == torch.long and ended.dtype == torch.bool


def test_truncate_at_eos_pads_with_the_given_pad_id_and_single_column():
    ids, mask, ended = truncate_at_eos(torch.tensor([[4, 1, 4, 4], [4, 4, 4, 4]]), eos_id=1, pad_id=9)
    assert ids.tolist() == [[4, 1, 9, 9], [4, 4, 4, 4]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False]
    ids, mask, ended = truncate_at_eos(torch.tensor([[1], [4]]), eos_id=1, pad_id=9)  # R = 1
    assert ids.tolist() == [[1], [4]] and mask.tolist() == [[1], [1]] and ended.tolist() == [True, False]


# ---------------------------------------------------------------- which position feeds which response token

V = 16  # toy vocabulary


class _ToyBody(torch.nn.Module):
    """hidden[b, t] = [one_hot(input_ids[b, t]) (V), position_ids[b, t]]: position-wise, no attention,
    so the packed and the padded forwards agree exactly."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        h = torch.cat([F.one_hot(input_ids, V).float(), position_ids[..., None].float()], dim=-1)
        return SimpleNamespace(last_hidden_state=h)


class ToyLM(torch.nn.Module):
    """A causal LM whose next-token distribution after token `a` is uniform over {0, ..., a-1}:
    log p(v | a) = -log(a) for v < a. A response token's log-prob names the token before it."""

    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        self.model = _ToyBody()
        self.lm_head = torch.nn.Linear(V + 1, V, bias=False)
        with torch.no_grad():
            w = torch.full((V, V + 1), -1e4)
            for a in range(V):
                w[:a, a] = 0.0   # tokens v < a allowed after a
            w[:, V] = 0.0        # the position does not change the logits
            self.lm_head.weight.copy_(w)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = self.lm_head(self.model(input_ids, attention_mask, position_ids).last_hidden_state)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class ToyCritic(torch.nn.Module):
    """A value / reward model: V(b, t) = input_ids[b, t] + 100 * position_ids[b, t]."""

    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        self.model = _ToyBody()
        self.score = torch.nn.Linear(V + 1, 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(torch.tensor([list(range(V)) + [100]], dtype=torch.float))


Q = 4
# [left-padded query | right-padded response]; pad id 0
IDS = torch.tensor([[0, 0, 11, 9, 7, 5, 0, 0],        # query [11, 9], response [7, 5]
                    [15, 14, 13, 12, 10, 8, 6, 4],    # query [15, 14, 13, 12], response [10, 8, 6, 4]
                    [0, 0, 0, 13, 3, 0, 0, 0]])       # query [13], response [3]
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 1, 1, 0, 0, 0]])


@pytest.fixture(params=["packed", "padded"])
def path(request, monkeypatch):
    """Run the forwards packed (the batch saves 8 of 24 tokens) or force the padded path."""
    if request.param == "padded":
        monkeypatch.setattr(packing, "MIN_SAVING", 1.0)
        assert packing.pack(IDS, MASK) is None
    else:
        assert packing.pack(IDS, MASK) is not None
    return request.param


def test_policy_log_probs_come_from_the_position_before_each_response_token(path):
    model = ToyLM()
    with torch.no_grad():
        logp, ent = policy_forward(model, IDS, MASK, Q, Sampling(temperature=0.7), with_entropy=True)
    # response token j is predicted at column Q-1+j, i.e. after the token before it
    want = torch.tensor([[-LN(9), -LN(7), 0.0, 0.0],
                         [-LN(12), -LN(10), -LN(8), -LN(6)],
                         [-LN(13), 0.0, 0.0, 0.0]])
    assert torch.allclose(logp, want, atol=1e-5), logp
    assert torch.allclose(ent, -want, atol=1e-5), ent  # uniform over a tokens: entropy log(a)
    assert packing._VERIFIED[model.model] is True


def test_values_come_from_the_position_before_each_response_token(path):
    critic = ToyCritic()
    with torch.no_grad():
        values = value_forward(critic, IDS, MASK, Q)
        scaled = value_forward(critic, IDS, MASK, Q, scale=(9.0, 2.0))
    # id + 100 * (position counted from the row's first real token), at column Q-1+j
    assert values.tolist() == [[109.0, 207.0, 0.0, 0.0],
                               [312.0, 410.0, 508.0, 606.0],
                               [13.0, 0.0, 0.0, 0.0]]
    assert scaled.tolist() == [[50.0, 99.0, 0.0, 0.0],     # (v - 9) / 2 on real tokens, 0 on padding
                               [151.5, 200.5, 249.5, 298.5],
                               [2.0, 0.0, 0.0, 0.0]]


def test_reward_is_read_at_each_rows_last_real_token(path):
    critic = ToyCritic()
    with torch.no_grad():
        # last real token: row 0 col 5 (id 5, position 3), row 1 col 7 (id 4, position 7), row 2 col 4 (id 3, position 1)
        assert reward_scores(critic, IDS, MASK).tolist() == [305.0, 704.0, 103.0]
        assert packed_scores(critic, IDS, MASK).tolist() == [305.0, 704.0, 103.0]


def test_last_real_token_index_under_any_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right-padded
                         [0, 0, 1, 1, 1],    # left-padded
                         [0, 1, 1, 0, 0],    # both
                         [1, 1, 1, 1, 1],    # none
                         [0, 0, 0, 0, 0]])   # empty: 0
    assert last_index(mask).tolist() == [2, 4, 2, 4, 0]


def _tiny_llama(cls, **kw):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=0, **kw)
    return cls(cfg).eval()


# each row's real tokens alone, and the index (in that unpadded row) that predicts each response token
ROWS = [([11, 9, 7, 5], [1, 2]), ([15, 14, 13, 12, 10, 8, 6, 4], [3, 4, 5, 6]), ([13, 3], [0])]


def test_llama_policy_log_probs_equal_the_unpadded_rows_at_hand_written_positions(path):
    from transformers import LlamaForCausalLM

    model = _tiny_llama(LlamaForCausalLM)
    with torch.no_grad():
        logp, _ = policy_forward(model, IDS, MASK, Q, Sampling())
        for b, (row, preds) in enumerate(ROWS):
            lsm = model(input_ids=torch.tensor([row])).logits[0].log_softmax(-1)
            want = [lsm[i, row[i + 1]].item() for i in preds]
            assert logp[b, :len(want)].tolist() == pytest.approx(want, abs=1e-5), b
            assert (logp[b, len(want):] == 0).all()


def test_llama_reward_scores_equal_the_unpadded_row_alone(path):
    from transformers import LlamaForSequenceClassification

    rm = _tiny_llama(LlamaForSequenceClassification, num_labels=1)
    with torch.no_grad():
        torch.nn.init.normal_(rm.score.weight, std=1.0)
        want = [rm(input_ids=torch.tensor([row])).logits[0, 0].item() for row, _ in ROWS]
        assert reward_scores(rm, IDS, MASK).tolist() == pytest.approx(want, abs=1e-5)
        assert packed_scores(rm, IDS, MASK).tolist() == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------- tokenization and truncation

def _tokenizer(bos: bool = False):
    """Word-level: <pad>=0 <eos>=1 <unk>=2 <bos>=3, a=4 ... l=15; with `bos`, BOS is prefixed as a special."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3}
    vocab.update({w: 4 + i for i, w in enumerate("abcdefghijkl")})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {}
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
        kw["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", **kw)


def test_encode_prompt_and_response_ids():
    tok = _tokenizer()
    assert encode_prompt(tok, "a b c") == [4, 5, 6]
    assert encode_response(tok, "d e") == [7, 8, 1]          # EOS appended
    assert encode_response(tok, "") == [1]                   # an empty response is just EOS
    btok = _tokenizer(bos=True)
    assert encode_prompt(btok, "a b") == [3, 4, 5]           # BOS once
    assert encode_prompt(btok, "<bos> a b") == [3, 4, 5]     # not twice when the text starts with it
    assert encode_response(btok, "d") == [7, 1]              # no BOS in a response


@pytest.mark.parametrize("n_prompt, n_response, max_length, kept_prompt, kept_response", [
    (3, 3, 6, [0, 1, 2], [10, 11, 12]),                   # fits exactly: untouched
    (12, 3, 10, [5, 6, 7, 8, 9, 10, 11], [10, 11, 12]),   # long prompt, short response: prompt keeps 10 - 3 = 7 of its end
    (12, 8, 10, [7, 8, 9, 10, 11], [10, 11, 12, 13, 14]),  # both long: prompt down to 10 // 2 = 5, response cut (EOS lost)
    (3, 12, 10, [0, 1, 2], [10, 11, 12, 13, 14, 15, 16]),  # short prompt kept whole, response gets the rest
    (10, 10, 7, [7, 8, 9], [10, 11, 12, 13]),             # odd budget: prompt 7 // 2 = 3, response 4
    (4, 2, 1, [], [10]),                                  # budget 1: the prompt is gone
])
def test_fit_cuts_prompt_from_the_left_to_half_then_response_from_the_right(n_prompt, n_response, max_length,
                                                                          kept_prompt, kept_response):
    prompt, response = list(range(n_prompt)), list(range(10, 10 + n_response))
    p, r, truncated = fit(prompt, response, max_length)
    assert (p, r, truncated) == (kept_prompt, kept_response, n_prompt + n_response > max_length)


def test_encode_pair_truncation_and_eos():
    tok = _tokenizer()
    # fits: prompt ids, response ids, EOS
    assert encode_pair(tok, "a b c", "d e", 6) == ([4, 5, 6, 7, 8, 1], 3, False)
    # the response's EOS is the first thing lost when only the response is too long
    assert encode_pair(tok, "a b c", "d e f", 6) == ([4, 5, 6, 7, 8, 9], 3, True)
    # a long prompt keeps its end: budget 6 -> 3 prompt tokens + "g h" + EOS;
    # budget 8 -> 8 - 3 = 5 prompt tokens (more than half the budget, as the response is short)
    assert encode_pair(tok, "a b c d e f", "g h", 6) == ([7, 8, 9, 10, 11, 1], 3, True)
    assert encode_pair(tok, "a b c d e f", "g h", 8) == ([5, 6, 7, 8, 9, 10, 11, 1], 5, True)
    # both long: the prompt keeps half the budget (its last 4), the response the first 4 (no EOS)
    assert encode_pair(tok, "a b c d e f g", "h i j k l", 8) == ([7, 8, 9, 10, 11, 12, 13, 14], 4, True)


# ---------------------------------------------------------------- reward-model loss and evaluation statistics

def test_weighted_bradley_terry_loss_with_margin_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    margin, weight = torch.tensor([0.5, 0.0]), torch.tensor([2.0, 1.0])
    # pair 0: 1 - 0 - 0.5 = 0.5; pair 1: 0 - 0.5 - 0 = -0.5; -log sigma(d) = log(1 + e^-d)
    l0, l1 = math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.5))
    assert bradley_terry_loss(chosen, rejected, margin, weight).item() == pytest.approx((2 * l0 + l1) / 3)
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx((l0 + l1) / 2)
    # without the margin: pair 0 diff 1, pair 1 diff -0.5
    m0 = math.log(1 + math.exp(-1.0))
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((m0 + l1) / 2)
    assert bradley_terry_loss(chosen, rejected, None, weight).item() == pytest.approx((2 * m0 + l1) / 3)


def test_spearman_with_ties_uses_average_ranks():
    # ranks x: [0, 1.5, 1.5, 3], y: [0, 2, 1, 3]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # sum of products 4.5, norms sqrt(4.5) and sqrt(5): rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
    # ties on both sides: x ranks [1.5, 1.5, 0, 3], y ranks [0.5, 2, 0.5, 3];
    # centred [0, 0, -1.5, 1.5] and [-1, .5, -1, 1.5]: 3.75 / sqrt(4.5 * 4.5)
    assert spearman([2, 2, 1, 9], [0, 5, 0, 7]) == pytest.approx(3.75 / 4.5)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0  # no variation: 0, not NaN


# ---------------------------------------------------------------- prompt stream and plan

PROMPTS = [f"p{i}" for i in range(6)]
# the seeded order of each pass (random.Random(seed + pass).shuffle, seed 3): written out so that a
# change of the order (which would break resuming old checkpoints) fails here
PASS0 = ["p0", "p2", "p3", "p5", "p4", "p1"]
PASS1 = ["p3", "p5", "p4", "p0", "p2", "p1"]


def test_prompt_stream_ranks_interleave_a_pass_and_reshuffle_each_pass():
    r0, r1 = (PromptStream(PROMPTS, seed=3, rank=r, world=2) for r in range(2))
    # global index g = position + i * world + rank
    assert r0.next(2) == [PASS0[0], PASS0[2]] and r1.next(2) == [PASS0[1], PASS0[3]]
    assert r0.position == r1.position == 4
    # the third draw crosses into the next pass: rank 0 takes g = 4, 6, rank 1 g = 5, 7
    assert r0.next(2) == [PASS0[4], PASS1[0]] and r1.next(2) == [PASS0[5], PASS1[1]]
    assert r0.next(2) == [PASS1[2], PASS1[4]] and r1.next(2) == [PASS1[3], PASS1[5]]
    assert r0.position == 12
    assert sorted(PASS0) == sorted(PASS1) == PROMPTS and PASS0 != PASS1


def test_prompt_stream_records_the_rows_it_drew_and_distinct_count_counts_them():
    from rlhf.distributed import distinct_count

    r0, r1 = (PromptStream(PROMPTS * 2, seed=3, rank=r, world=2) for r in range(2))  # every text twice
    r0.next(3)
    r1.next(3)
    assert len(set(r0.drawn) | set(r1.drawn)) == 6  # six different rows, whatever their texts
    assert distinct_count([4, 1, 4, 7]) == 3 and distinct_count([]) == 0  # one process: its own set


def test_prompt_stream_resumes_from_its_position():
    run = PromptStream(PROMPTS, seed=3, rank=1, world=2, render=str.upper)
    run.next(1)
    saved = run.position
    assert saved == 2
    rest = [run.next(2) for _ in range(3)]
    resumed = PromptStream(PROMPTS, seed=3, rank=1, world=2, render=str.upper)
    resumed.position = saved
    assert [resumed.next(2) for _ in range(3)] == rest
    # rank 1 from g = 3: 3, 5 | 7, 9 | 11, 13
    assert rest == [["P5", "P1"], ["P5", "P0"], ["P1", "P0"]]  # g = 13: the third pass (seed 5) starts p1, p0


@pytest.mark.parametrize("total, rollout, mini, accum, world, want", [
    # per process: rollout, mini, micro = mini // accum; num_updates = ceil(total / (rollout * world))
    (100, 8, 4, 2, 3, dict(rollout_batch=8, mini_batch=4, micro_batch=2, grad_accum=2, num_updates=5,
                          episodes_per_update=24)),
    (64, 16, 16, 4, 2, dict(rollout_batch=16, mini_batch=16, micro_batch=4, grad_accum=4, num_updates=2,
                           episodes_per_update=32)),
    (16, 32, 8, 1, 1, dict(rollout_batch=32, mini_batch=8, micro_batch=8, grad_accum=1, num_updates=1,
                          episodes_per_update=32)),  # fewer episodes than one rollout: still one update
    # k = 4 samples per prompt: 8 prompts -> 32 responses per process, 64 per update with 2 processes;
    # total_episodes counts responses: ceil(200 / 64) = 4 updates
    (200, 8, 16, 2, 2, dict(rollout_batch=8, mini_batch=16, micro_batch=8, grad_accum=2, num_updates=4,
                           episodes_per_update=64, samples_per_prompt=4)),
])
def test_plan_sizes_by_hand(total, rollout, mini, accum, world, want):
    c = PPOStageConfig(total_episodes=total, rollout_batch_size=rollout, mini_batch_size=mini, grad_accum=accum,
                       samples_per_prompt=want.get("samples_per_prompt", 1))
    plan = Plan.make(c, world)
    assert plan == Plan(world=world, **want)
    ds = engine_config(DeepSpeedConfig(), "float32", plan, 1.0)
    assert ds["train_micro_batch_size_per_gpu"] == want["micro_batch"]
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == mini * world  # micro * accum * world


def test_inconsistent_ppo_sizes_are_refused_before_a_plan_exists():
    from rlhf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="must divide the responses per rollout, rollout_batch_size=8"):
        load_config(None, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=3"])
    # k samples per prompt: the mini-batch counts responses (8 prompts x 3 = 24: 16 does not divide it)
    with pytest.raises(ConfigError, match="samples_per_prompt=3 = 24"):
        load_config(None, ["ppo.rollout_batch_size=8", "ppo.samples_per_prompt=3", "ppo.mini_batch_size=16"])
    assert load_config(None, ["ppo.rollout_batch_size=8", "ppo.samples_per_prompt=3", "ppo.mini_batch_size=12"])
    with pytest.raises(ConfigError, match="must divide mini_batch_size=4"):
        load_config(None, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.grad_accum=3"])


# ---------------------------------------------------------------- policy and value loss branches

def test_policy_loss_every_branch_with_mask():
    # ratios (new - old in log space) and advantages; cliprange 0.2 -> [0.8, 1.2]
    ratio = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 3.0]])
    adv = torch.tensor([[1.0, 2.0, -1.0], [-1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    old = torch.tensor([[0.1, -0.3, -2.0], [-1.0, 0.4, 0.0]])
    new = (old + ratio.log()).requires_grad_()
    loss, stats = core.policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)):
    #  r=1.5 A=+1 -> max(-1.5, -1.2) = -1.2   clipped high
    #  r=0.5 A=+2 -> max(-1.0, -1.6) = -1.0   below the range, positive advantage: unclipped
    #  r=1.1 A=-1 -> 1.1                        inside the range
    #  r=0.5 A=-1 -> max(0.5, 0.8) = 0.8       clipped low
    #  r=1.5 A=-1 -> max(1.5, 1.2) = 1.5       above the range, negative advantage: unclipped
    #  masked token (r=3, A=5) ignored
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.1 + 0.8 + 1.5) / 5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5)
    assert stats["approxkl"].item() == pytest.approx(0.5 * (2 * LN(1.5) ** 2 + 2 * LN(0.5) ** 2 + LN(1.1) ** 2) / 5)
    loss.backward()
    # d/d logp of -A r / N is -A r / 5 on unclipped tokens, 0 on clipped and masked ones
    assert torch.allclose(new.grad, torch.tensor([[0.0, -0.2, 0.22], [0.0, 0.3, 0.0]]), atol=1e-6)


def test_policy_loss_partial_clip_fraction():
    ratio = torch.tensor([[1.3, 1.0, 0.9, 1.1]])
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    loss, stats = core.policy_loss(ratio.log(), torch.zeros(1, 4), adv, torch.ones(1, 4), cliprange=0.2)
    assert stats["clipfrac"].item() == pytest.approx(0.25)  # only 1.3 > 1.2 is clipped
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 0.9 + 1.1) / 4)


def test_value_loss_clipped_and_unclipped_with_mask():
    values = torch.tensor([[1.0, 1.0, 0.6, 10.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0, -10.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = core.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t0: clipped V 0.2 -> (0.2-2)^2 = 3.24 > (1-2)^2 = 1      clipped error used
    # t1: clipped V 0.2 -> (0.2-0)^2 = 0.04 < (1-0)^2 = 1      unclipped error used
    # t2: inside the clip range -> 0.36 both
    # t3: masked
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0 + 0.36) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # 0.5 * 2 (V - R) / 3 where the unclipped error is used; 0 through the clipped value and the mask
    assert torch.allclose(values.grad, torch.tensor([[0.0, 1 / 3, 0.2, 0.0]]), atol=1e-6)


# ---------------------------------------------------------------- whitening and entropy

def test_masked_whiten_with_and_without_shifting_the_mean():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # real entries 1, 3, 5, 7: mean 4, unbiased variance (9 + 1 + 1 + 9) / 3 = 20 / 3
    s = math.sqrt(20 / 3)
    whitened = torch.tensor([[-3 / s, -1 / s, 0.0], [1 / s, 3 / s, 0.0]])
    assert torch.allclose(core.masked_whiten(x, mask), whitened, atol=1e-6)
    kept = torch.tensor([[4 - 3 / s, 4 - 1 / s, 0.0], [4 + 1 / s, 4 + 3 / s, 0.0]])  # mean added back, padding 0
    assert torch.allclose(core.masked_whiten(x, mask, shift_mean=False), kept, atol=1e-6)


def test_entropy_at_a_temperature_by_hand():
    ln2 = LN(2)
    logits = torch.tensor([[0.0, 2 * ln2, 4 * ln2]] * 5)  # 5 rows: chunked 2 at a time
    # T=1: p ~ [1, 4, 16] / 21;  H = ln 21 - (4 ln 4 + 16 ln 16) / 21 = ln 21 - 72 ln 2 / 21
    h1 = core.entropy_from_logits(logits, 1.0, chunk=2)
    assert h1.tolist() == pytest.approx([LN(21) - 72 * ln2 / 21] * 5, abs=1e-6)
    # T=2: logits [0, ln 2, ln 4], p ~ [1, 2, 4] / 7;  H = ln 7 - (2 ln 2 + 4 ln 4) / 7 = ln 7 - 10 ln 2 / 7
    h2 = core.entropy_from_logits(logits, 2.0, chunk=2)
    assert h2.tolist() == pytest.approx([LN(7) - 10 * ln2 / 7] * 5, abs=1e-6)
    # T=2 and top-k 2: p ~ [2, 4] / 6;  H = ln 6 - (2 ln 2 + 4 ln 4) / 6 = ln 6 - 10 ln 2 / 6
    h3 = core.entropy_from_logits(logits[:1], 2.0, top_k=2)
    assert h3.tolist() == pytest.approx([LN(6) - 10 * ln2 / 6], abs=1e-6)
