"""`rlhf plan`: memory per process from the config alone, against values worked out by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlhf import plan
from rlhf.config import load_config

DEMO = Path(__file__).resolve().parents[2] / "launch" / "configs" / "demo.yaml"
SHAPE = plan.Shape(params=1_000_000_000, hidden=2048, layers=16, heads=16, kv_heads=8, vocab=32000)


def cfg(*overrides: str):
    return load_config(None, ["model.dtype=bfloat16", "sft.batch_size=4", "sft.max_length=1024",
                              "reward.batch_size=4", "reward.max_length=512", "ppo.rollout_batch_size=8",
                              "ppo.samples_per_prompt=1", "ppo.mini_batch_size=8", "ppo.grad_accum=4",
                              "ppo.max_prompt_length=256", "ppo.max_new_tokens=256", "ppo.forward_batch_size=4",
                              "ppo.advantage_estimator=gae", *overrides])


def test_trained_model_states_by_zero_stage_and_offload():
    p = SHAPE.params
    z0 = plan.trained(SHAPE, 2, 0, 8, False, p)
    assert (z0["weights"], z0["gradients"], z0["optimizer"]) == (2 * p, 2 * p, 12 * p)  # AdamW + fp32 master
    z2 = plan.trained(SHAPE, 2, 2, 8, False, p)
    assert (z2["weights"], z2["gradients"], z2["optimizer"]) == (2 * p, 2 * p / 8, 12 * p / 8)
    z3 = plan.trained(SHAPE, 4, 3, 8, False, p)  # float32: no master copy
    assert (z3["weights"], z3["gradients"], z3["optimizer"]) == (4 * p / 8, 4 * p / 8, 8 * p / 8)
    off = plan.trained(SHAPE, 2, 3, 8, True, p)
    assert off["optimizer"] == 0 and off["weights"] == 0 and off["cpu"] == 12 * p / 8 + 2 * p / 8
    lora = plan.trained(SHAPE, 2, 0, 1, False, plan.lora_params(SHAPE, 8))
    assert plan.lora_params(SHAPE, 8) == 16 * 2 * 8 * 2 * 2048 and lora["weights"] == 2 * p
    assert lora["gradients"] == 2 * plan.lora_params(SHAPE, 8)


def test_activations_by_hand():
    # 34 * s * b * h bytes per layer at 16 bits, 16 layers, plus 12 * b * s * V for the logits
    assert plan.activations(SHAPE, 2, 4, 1024, False) == 34 * 1024 * 4 * 2048 * 16 + 12 * 4 * 1024 * 32000
    # checkpointing keeps 2 * s * b * h * w per layer and one layer's full set
    assert plan.activations(SHAPE, 2, 4, 1024, True, logits=False) == 2 * 1024 * 4 * 2048 * 2 * 16 + 34 * 1024 * 4 * 2048
    assert plan.activations(SHAPE, 4, 1, 10, False, logits=False) == 2 * 34 * 10 * 2048 * 16  # float32: twice


def test_stage_estimates():
    est = plan.estimate(cfg("deepspeed.zero_stage=2"), 2, SHAPE)
    p = SHAPE.params
    assert est["sft"]["activations"] == plan.activations(SHAPE, 2, 4, 1024, False)
    assert est["reward"]["activations"] == plan.activations(SHAPE, 2, 8, 512, False, logits=False)  # pairs: 2 x batch
    ppo = est["ppo"]
    assert ppo["weights"] == 2 * (2 * p) and ppo["optimizer"] == 2 * (12 * p / 2)  # actor and critic
    assert ppo["reference"] == 2 * p and ppo["reward model"] == 2 * p
    kv = 2 * 16 * 8 * 128 * 2 * 8 * 512
    assert ppo["generation (KV cache + gathered policy)"] == kv  # ZeRO-2: nothing to gather
    train = plan.activations(SHAPE, 2, 2, 512, False) + plan.activations(SHAPE, 2, 2, 512, False, logits=False)
    assert ppo["activations"] == max(train, kv, 8 * 4 * 512 * 32000)
    # critic-free: no critic states; LoRA: no reference copy; global batch sizes are divided first
    free = plan.estimate(cfg("ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2", "ppo.lora=true",
                             "deepspeed.global_batch_sizes=true"), 2, SHAPE)
    assert "reference" not in free["ppo"] and free["ppo"]["weights"] == 2 * p
    assert free["sft"]["activations"] == plan.activations(SHAPE, 2, 2, 1024, False)


def test_shape_from_a_local_config_and_the_scratch_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    conf.save_pretrained(tmp_path)
    shape = plan.model_shape(load_config(None, [f"model.name_or_path={tmp_path}"]))
    assert shape.params == sum(t.numel() for t in LlamaForCausalLM(conf).parameters())
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.vocab) == (64, 3, 4, 2, 1000)
    demo = plan.model_shape(load_config(None, ["model.scratch.vocab_size=400"]))
    assert demo.vocab == 400 and demo.layers == 2


def test_cli_prints_a_table_and_refuses_to_download(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["plan", str(DEMO), "--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert "0.6M parameters" in out and "TOTAL" in out and all(f"  {s} " in out for s in ("sft", "reward", "ppo"))
    assert main(["plan", str(DEMO), "model.scratch=null", "model.name_or_path=someone/not-cached-model"]) == 2
    assert "downloads nothing" in capsys.readouterr().err


def test_imported_models_are_loaded_not_trained_and_a_foreign_reward_model_is_counted_at_its_own_size():
    rm = plan.Shape(params=7_000_000_000, hidden=4096, layers=32, heads=32, kv_heads=8, vocab=128256)
    c = cfg("sft.import_model=org/policy", "reward.import_model=org/rm", "deepspeed.zero_stage=3")
    est = plan.estimate(c, 8, SHAPE, rm)
    assert est["sft"]["weights"] == 2 * SHAPE.params and est["sft"]["gradients"] == est["sft"]["optimizer"] == 0
    assert est["reward"]["reward model"] == 2 * rm.params / 8 and est["reward"]["gradients"] == 0
    assert est["ppo"]["reward model"] == 2 * rm.params / 8
    # another vocabulary: the critic starts from the policy, at the policy's size
    trained_by_hand = plan.trained(SHAPE, 2, 3, 8, False, SHAPE.params)
    assert est["ppo"]["optimizer"] == 2 * trained_by_hand["optimizer"]
    # the same vocabulary: the critic is the reward model's copy
    same = plan.Shape(params=7_000_000_000, hidden=4096, layers=32, heads=32, kv_heads=8, vocab=SHAPE.vocab)
    est = plan.estimate(c, 8, SHAPE, same)
    assert est["ppo"]["optimizer"] == trained_by_hand["optimizer"] + plan.trained(same, 2, 3, 8, False, same.params)["optimizer"]


def test_a_4bit_base_counts_its_linear_layers_at_4_bits(tmp_path):
    """model.quantization=4bit: a LoRA stage's base holds its body's linear layers at 4.127 bits (NF4 with
    double-quantized block scales) or 4.5 bits, the rest (embeddings, norms, heads) and the adapter in model.dtype."""
    from transformers import LlamaConfig

    conf = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    conf.save_pretrained(tmp_path)
    shape = plan.model_shape(load_config(None, [f"model.name_or_path={tmp_path}"]))
    assert shape.linear == 3 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # q, o; k, v (2 kv heads); gate, up, down

    big = plan.Shape(params=SHAPE.params, hidden=2048, layers=16, heads=16, kv_heads=8, vocab=32000, linear=800_000_000)
    q = cfg("sft.lora=true", "reward.lora=true", "ppo.lora=true", "model.quantization=4bit")
    est, full = plan.estimate(q, 1, big), plan.estimate(cfg("sft.lora=true", "reward.lora=true", "ppo.lora=true"), 1, big)
    lora = plan.lora_params(big, 8)
    packed = 200_000_000 * 2 + 800_000_000 * (4 + 8 / 64 + 32 / 16384) / 8
    assert est["sft"]["weights"] == pytest.approx(packed + 2 * lora)
    assert full["sft"]["weights"] == 2 * big.params
    assert est["ppo"]["weights"] == pytest.approx(2 * (packed + 2 * lora))  # actor and LoRA critic, both on 4-bit bases
    assert est["sft"]["gradients"] == full["sft"]["gradients"] and est["sft"]["activations"] == full["sft"]["activations"]
    single = plan.estimate(cfg("sft.lora=true", "reward.lora=true", "ppo.lora=true", "model.quantization=4bit",
                               "model.quant_double=false"), 1, big)
    assert single["sft"]["weights"] == pytest.approx(200_000_000 * 2 + 800_000_000 * 4.5 / 8 + 2 * lora)
