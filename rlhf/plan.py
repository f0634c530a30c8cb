"""`rlhf plan CONFIG [key=value ...] [--processes N]`: memory per process of each stage, estimated from
the config alone before anything is launched (nothing is loaded or trained: the model is built on
PyTorch's meta device to count its parameters).

What is counted, per process (N processes, ZeRO stage z, bytes per parameter w of model.dtype):
- trained models (SFT's policy; the reward model; PPO's actor and, with gae, the critic): weights
  P*w, gradients P*w, AdamW state 8*P (two fp32 moments) plus a 4*P fp32 master copy when w < 4;
  ZeRO divides the optimizer state by N from stage 1, the gradients from stage 2 and the weights at
  stage 3; deepspeed.offload moves the optimizer state (and, at stage 3, the weights) to CPU memory.
  With LoRA only the adapter's parameters have gradients and optimizer state;
- frozen models (PPO's reference unless LoRA, and its reward model): weights, divided by N at stage 3;
- activations of one micro-batch: per layer 34*s*b*h bytes at 16 bits (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", without sequence parallelism and
  without their 5*a*s^2*b attention-matrix term: the SDPA/flash kernels transformers uses keep no
  s x s matrix), twice that in float32, or 2*s*b*h*w per layer plus one layer's full set with
  gradient checkpointing; and the fp32 logits, their log-softmax and its gradient: 12*b*s*V;
- PPO's inference forwards (log-probabilities of a rollout, ppo.forward_batch_size rows at a time):
  the fp32 logits and log-softmax of one chunk, 8*b*s*V;
- PPO's generation: the KV cache of a rollout (2 * layers * kv_heads * head_dim * w per token of
  prompts x samples x (prompt + new tokens)) and, at ZeRO-3 with zero3_gather_for_generation, the
  whole policy gathered on each process.

Not counted: the CUDA context and kernels' workspaces (~0.5-1 GiB per GPU), the allocator's
fragmentation, DeepSpeed's communication buffers. Treat the totals as estimates to within ~1.5x;
`rlhf bench` measures PPO's peak on the real machine."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: parameters and the sizes activations scale with."""
    params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    linear: int = 0  # parameters in the body's linear layers (what a 4-bit base packs; heads and embeddings stay)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def model_shape(cfg: Any) -> Shape:
    """The policy's Shape: from sft.import_model's or model.name_or_path's config.json (a local
    directory, or a hub id already in the local Hugging Face cache: nothing is downloaded), or from
    model.scratch's sizes. The parameters are counted on a model built on the meta device."""
    from transformers import LlamaConfig

    if cfg.sft.import_model:
        return _shape(cfg.sft.import_model, "sft.import_model", cfg.model.trust_remote_code)
    if cfg.model.scratch is None:
        return _shape(cfg.model.name_or_path, "model.name_or_path", cfg.model.trust_remote_code)
    s = cfg.model.scratch
    conf = LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                       num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                       num_key_value_heads=s.num_heads, max_position_embeddings=s.max_position_embeddings,
                       tie_word_embeddings=True)
    return _shape_of(conf, False)


def reward_shape(cfg: Any, policy: Shape) -> Shape:
    """The reward model's Shape: reward.import_model's own, else the policy's (trained from it)."""
    if cfg.reward.import_model:
        return _shape(cfg.reward.import_model, "reward.import_model", cfg.model.trust_remote_code, classifier=True)
    return policy


def _shape(source: str, key: str, trust_remote_code: bool, classifier: bool = False) -> Shape:
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PlanError(f"{key}={source}: its config.json is neither in that directory "
                        f"nor in the local Hugging Face cache ({str(e).splitlines()[0]}); `rlhf plan` downloads "
                        "nothing: fetch it once (e.g. `huggingface-cli download "
                        f"{source} config.json`) and run again") from None
    return _shape_of(conf, trust_remote_code, classifier)


def _shape_of(conf: Any, trust_remote_code: bool, classifier: bool = False) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(conf, trust_remote_code=trust_remote_code)
    from transformers.pytorch_utils import Conv1D

    from rlhf.models import FULL_PRECISION_MODULES

    params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, (torch.nn.Linear, Conv1D)) and name.split(".")[-1] not in FULL_PRECISION_MODULES)
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    heads = text.num_attention_heads
    return Shape(params=params, hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
                 kv_heads=getattr(text, "num_key_value_heads", None) or heads, vocab=text.vocab_size, linear=linear)


class PlanError(ValueError):
    """The estimate cannot be made; the message says why and what to do."""


def lora_params(shape: Shape, r: int, targets: int = 2) -> int:
    """An adapter of rank r on `targets` square projections per layer (peft's default for Llama-style
    models: q_proj and v_proj): r * (h + h) parameters each."""
    return shape.layers * targets * r * 2 * shape.hidden


def quant_bits(cfg: Any) -> float | None:
    """Bits per packed weight of model.quantization (None: not quantized): NF4/FP4 is 4 bits plus a
    scale per block of 64; double quantization stores those scales in 8 bits with one 32-bit scale
    per 256 of them (4 + 8/64 + 32/(64*256) = 4.127), else in 32 bits (4 + 32/64 = 4.5)."""
    if cfg.model.quantization == "none":
        return None
    return 4 + 8 / 64 + 32 / (64 * 256) if cfg.model.quant_double else 4 + 32 / 64


def base_bytes(shape: Shape, w: int, bits: float | None) -> float:
    """Bytes of a model's weights: all in model.dtype, or with a 4-bit base its body's linear layers
    packed (`bits` per weight) and the rest (embeddings, norms, heads) in model.dtype."""
    if bits is None:
        return shape.params * w
    return (shape.params - shape.linear) * w + shape.linear * bits / 8


def trained(shape: Shape, w: int, zero: int, n: int, offload: bool, trainable: int,
            bits: float | None = None) -> dict[str, float]:
    """Bytes per process of one trained model: weights (with a 4-bit base: `bits` per packed weight),
    gradients, optimizer state (GPU and CPU)."""
    opt = trainable * (8 + (4 if w < 4 else 0))
    weights = (base_bytes(shape, w, bits) + (trainable * w if bits is not None else 0)) / (n if zero >= 3 else 1)
    grads = trainable * w / (n if zero >= 2 else 1)
    opt = opt / (n if zero >= 1 else 1)
    out = {"weights": weights, "gradients": grads, "optimizer": 0.0 if offload else opt,
           "cpu": opt if offload else 0.0}
    if offload and zero >= 3:
        out["cpu"] += weights
        out["weights"] = 0.0
    return out


def frozen(shape: Shape, w: int, zero: int, n: int, bits: float | None = None) -> float:
    return base_bytes(shape, w, bits) / (n if zero >= 3 else 1)


def activations(shape: Shape, w: int, batch: int, seq: int, checkpointing: bool, logits: bool = True) -> float:
    """Bytes of one micro-batch's activations kept for the backward pass (module docstring)."""
    h, L = shape.hidden, shape.layers
    full_layer = 34 * seq * batch * h * (w / 2)
    body = (2 * seq * batch * h * w * L + full_layer) if checkpointing else full_layer * L
    return body + (12 * batch * seq * shape.vocab if logits else 0)


def estimate(cfg: Any, processes: int, shape: Shape | None = None,
             rm_shape: Shape | None = None) -> dict[str, dict[str, float]]:
    """{stage: {item: bytes per process}} for sft, reward and ppo; `cfg` a PipelineConfig whose batch
    sizes are read per process (global ones divided by `processes`). An imported policy or reward
    model (sft.import_model, reward.import_model) is loaded and written, not trained: its weights
    (and, for the reward model, the policy it samples from for reward_stats) only."""
    from rlhf.config import per_process
    from rlhf.ppo.core import advantage_estimator

    shape = shape or model_shape(cfg)
    rm_shape = rm_shape or reward_shape(cfg, shape)
    pp = per_process(cfg, processes)
    n, zero, off = processes, cfg.deepspeed.zero_stage, cfg.deepspeed.offload
    w = DTYPE_BYTES[cfg.model.dtype]
    r = cfg.model.lora.r
    bits = quant_bits(cfg)  # a 4-bit base in every stage that trains LoRA (the config refuses it without)
    out: dict[str, dict[str, float]] = {}

    s = pp.sft
    if s.import_model:
        out["sft"] = {**_nothing(), "weights": shape.params * w}
    else:
        m = trained(shape, w, zero, n, off, lora_params(shape, r) if s.lora else shape.params, bits if s.lora else None)
        m["activations"] = activations(shape, w, s.batch_size, s.max_length, s.gradient_checkpointing)
        out["sft"] = m

    rw = pp.reward
    if rw.import_model:  # the reward model (sharded at stage 3) beside the policy that samples
        out["reward"] = {**_nothing(), "weights": shape.params * w, "reward model": frozen(rm_shape, w, zero, n)}
    else:
        m = trained(shape, w, zero, n, off, lora_params(shape, r) if rw.lora else shape.params,
                    bits if rw.lora else None)
        m["activations"] = activations(shape, w, 2 * rw.batch_size, rw.max_length, rw.gradient_checkpointing,
                                       logits=False)
        out["reward"] = m

    p = pp.ppo
    seq = p.max_prompt_length + p.max_new_tokens
    micro = max(1, p.mini_batch_size // p.grad_accum)
    pbits = bits if p.lora else None  # PPO's frozen bases (actor's, critic's with critic_lora, the RM) in 4 bits
    actor = trained(shape, w, zero, n, off, lora_params(shape, r) if p.lora else shape.params, pbits)
    m = {k: v for k, v in actor.items()}
    if not p.lora:
        m["reference"] = frozen(shape, w, zero, n)
    critic = advantage_estimator(p.advantage_estimator).needs_critic
    # an imported reward model of another vocabulary cannot be the critic: it then starts from the policy
    from_reward = p.critic_from_reward and (rm_shape is shape or rm_shape.vocab == shape.vocab)
    if not (critic and p.lora and p.critic_lora and from_reward):  # else the critic's base is the RM
        m["reward model"] = frozen(rm_shape, w, zero, n, pbits)
    if critic:
        cs = rm_shape if from_reward else shape
        c = trained(cs, w, zero, n, off, lora_params(cs, r) if (p.lora and p.critic_lora) else cs.params,
                    pbits if p.critic_lora else None)
        for k in ("weights", "gradients", "optimizer", "cpu"):
            m[k] += c[k]
    train = activations(shape, w, micro, seq, p.gradient_checkpointing)
    if critic:
        train += activations(shape, w, micro, seq, p.gradient_checkpointing, logits=False)
    rollouts = p.rollout_batch_size * p.samples_per_prompt
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * w * rollouts * seq
    gathered = shape.params * w * (1 - 1 / n) if zero >= 3 and cfg.deepspeed.zero3_gather_for_generation else 0.0
    scoring = 8 * min(p.forward_batch_size, rollouts) * seq * shape.vocab
    m["activations"] = max(train, kv + gathered, scoring)
    m["generation (KV cache + gathered policy)"] = kv + gathered
    out["ppo"] = m
    return out


def _nothing() -> dict[str, float]:
    return {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "activations": 0.0, "cpu": 0.0}


GPU_ITEMS = ("weights", "gradients", "optimizer", "reference", "reward model", "activations")


def render(cfg: Any, processes: int, shape: Shape, est: dict[str, dict[str, float]],
           rm_shape: Shape | None = None) -> str:
    w = DTYPE_BYTES[cfg.model.dtype]
    lines = [f"model: {shape.params / 1e6:.1f}M parameters ({shape.layers} layers, hidden {shape.hidden}, vocabulary "
             f"{shape.vocab}){' (sft.import_model)' if cfg.sft.import_model else ''}, {cfg.model.dtype} ({w} "
             f"bytes/parameter{_quant_note(cfg, shape)}); {processes} process(es), ZeRO-"
             f"{cfg.deepspeed.zero_stage}{', CPU offload' if cfg.deepspeed.offload else ''}"]
    if rm_shape is not None and rm_shape is not shape:
        lines.append(f"reward model (reward.import_model): {rm_shape.params / 1e6:.1f}M parameters ({rm_shape.layers} "
                     f"layers, hidden {rm_shape.hidden}, vocabulary {rm_shape.vocab})")
    lines += [
             "estimated memory per process, GiB (the peak of activations, generation and scoring; what is counted: "
             "the README, `rlhf plan`):",
             f"  {'stage':7s} {'weights':>8s} {'grads':>8s} {'optim':>8s} {'frozen':>8s} {'peak act':>9s} "
             f"{'TOTAL':>8s} {'CPU':>7s}"]
    for stage, m in est.items():
        froz = m.get("reference", 0.0) + m.get("reward model", 0.0)
        total = sum(m.get(k, 0.0) for k in GPU_ITEMS)
        lines.append(f"  {stage:7s} {m['weights'] / GIB:8.2f} {m['gradients'] / GIB:8.2f} {m['optimizer'] / GIB:8.2f} "
                     f"{froz / GIB:8.2f} {m['activations'] / GIB:9.2f} {total / GIB:8.2f} {m['cpu'] / GIB:7.2f}")
    gen = est["ppo"]["generation (KV cache + gathered policy)"]
    lines.append(f"  (ppo: generation alone {gen / GIB:.2f} GiB: KV cache of a rollout"
                 f"{' + the gathered policy' if cfg.deepspeed.zero_stage >= 3 else ''})")
    lines.append("Not counted: CUDA context (~0.5-1 GiB), fragmentation, communication buffers; estimates to "
                 "~1.5x. `rlhf bench` measures PPO's peak on this machine.")
    return "\n".join(lines)


def _quant_note(cfg: Any, shape: Shape) -> str:
    bits = quant_bits(cfg)
    if bits is None:
        return ""
    return (f"; LoRA bases in {cfg.model.quantization} ({bits:.3g} bits per weight in the "
            f"{shape.linear / 1e6:.1f}M linear-layer parameters)")


def main(args: argparse.Namespace) -> int:
    from rlhf.config import ConfigError, load_config

    processes = args.processes or default_processes()
    try:
        cfg = load_config(args.config, args.overrides)
        shape = model_shape(cfg)
        rm_shape = reward_shape(cfg, shape)
        est = estimate(cfg, processes, shape, rm_shape)
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(cfg, processes, shape, est, rm_shape))
    return 0


def default_processes() -> int:
    """What launch/_stage.sh starts per node: NUM_GPUS, else every GPU torch sees, else 1."""
    import os

    import torch

    return int(os.environ.get("NUM_GPUS") or 0) or torch.cuda.device_count() or 1
