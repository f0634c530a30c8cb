"""Baseline timing of TRL 1.12's PPO trainer (`trl.experimental.ppo.PPOTrainer`) on this project's models.

It trains PPO with TRL on the same SFT policy, reward model and prompts that the project's own
PPO stage uses, and writes how long `trainer.train()` took. It is a reference point for the
project's PPO speed, not part of the pipeline: it runs only in its own virtual environment
(TRL >= 1.13 has no PPO trainer, and TRL 1.12 wants other library versions than the project's
environment has), and it does not import the project's `rlhf` package. Prompts are turned into
token ids the way the project does (rlhf/data.py `render_prompt`, rlhf/tokenization.py
`encode_prompt`, left-truncated to --max-prompt-length like the project's PPO stage), so both
systems sample from identical queries; TRL left-pads them for generation.

Setup (once; the CPU torch wheel first, or pip pulls a multi-GB CUDA build):

    python3.11 -m venv /work/trl112-venv
    /work/trl112-venv/bin/pip install torch==2.13.0
    /work/trl112-venv/bin/pip install trl==1.12.0 transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0

Run (the defaults are shown):

    /work/trl112-venv/bin/python launch/bench_trl.py --sft SFT_DIR --reward REWARD_DIR \\
        --prompts reward_data/demo/prompts_train.jsonl --episodes 256 --batch 32 \\
        --max-new-tokens 48 --ppo-epochs 4 --num-mini-batches 1 --temperature 1.0 --seed 0 \\
        --json /tmp/trl_bench.json

SFT_DIR is a Hugging Face causal-LM directory with its tokenizer (the project's SFT output;
its rlhf_artifact.json, when present, says whether prompts use the chat template), REWARD_DIR an
`AutoModelForSequenceClassification` with num_labels=1. Policy and reference policy load from
SFT_DIR, reward and value model from REWARD_DIR, all fp32 on the CPU; TRL disables dropout in
all four as it does by default. Settings: per-device batch = --batch, gradient accumulation 1,
response_length = --max-new-tokens, stop at EOS, missing_eos_penalty 1.0, kl_coef 0.05,
learning rate 3e-4, no eval, no sample generations, no saving, no reporting, bf16 off (TRL's
PPOConfig turns it on by default) and gradient checkpointing off (TRL's default is on; the
project's default is off).

Output JSON (also printed): system, episodes, train_s (trainer.train() alone), episodes_per_s,
generated_tokens (response tokens sampled through the first EOS, or all of them when a
response has none), generated_positions (rows x sampled width: the decoding steps actually
run), whole_process_s (from the first statement to just before exit), the settings and the
library versions.

The timing is only meaningful on an otherwise idle machine: torch runs one thread per core, and
on the 2-core CPU machine a single other busy process made train() 10-17x slower (about 21 s
idle, 207-349 s beside a pytest run or a project PPO run).
"""

import time

t_start = time.time()  # first statement after the docstring: whole_process_s counts the heavy imports too

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", required=True, help="HF causal-LM directory with its tokenizer (policy, ref policy)")
    p.add_argument("--reward", required=True, help="HF sequence-classification directory, num_labels=1 (reward, value)")
    p.add_argument("--prompts", required=True, help='.jsonl with {"prompt": str or [messages]} rows')
    p.add_argument("--episodes", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--num-mini-batches", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-length", type=int, default=64, help="left-truncate prompts to this many tokens (project default)")
    p.add_argument("--use-chat-template", choices=["auto", "yes", "no"], default="auto",
                   help="auto: model.use_chat_template of SFT_DIR/rlhf_artifact.json (none: no)")
    p.add_argument("--output-dir", default="/tmp/bench_trl_out")
    p.add_argument("--json", required=True, help="where to write the result")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the project's prompt -> ids path
# Re-implemented from rlhf/data.py (load_prompts, render_prompt) and rlhf/tokenization.py
# (prefix_special_ids, encode_prompt); keep in step with them.

def load_prompts(path):
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("prompt") is None and rec.get("messages") is not None:
                msgs = rec["messages"]
                prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
            else:
                prompt = rec["prompt"]
            empty = not prompt.strip() if isinstance(prompt, str) else not any(m["content"].strip() for m in prompt)
            if not empty:
                out.append(prompt)
    if not out:
        raise SystemExit(f"{path}: no prompts")
    return out


def render_prompt(tokenizer, prompt, use_chat_template):
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str):
        if not templated:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    prompt = [{**m, "content": m["content"].lstrip(" ")} if m["role"] == "assistant" else m for m in prompt]
    if templated:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt) + "\n\nAssistant:"


def prefix_special_ids(tokenizer):
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_prompt(tokenizer, text, prefix):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids


def use_chat_template_of(sft_dir, flag):
    if flag != "auto":
        return flag == "yes"
    path = os.path.join(sft_dir, "rlhf_artifact.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("model", {}).get("use_chat_template", False))


# ---------------------------------------------------------------- the benchmark

def main(argv=None):
    args = parse_args(argv)

    import importlib.metadata as md

    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if not trl.__version__.startswith("1.12."):
        print(f"warning: this benchmark is meant for trl 1.12.x, found {trl.__version__}", file=sys.stderr)

    transformers.set_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    tokenizer.padding_side = "left"  # queries are left-padded for generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    use_template = use_chat_template_of(args.sft, args.use_chat_template)
    prefix = prefix_special_ids(tokenizer)
    prompts = load_prompts(args.prompts)
    ids = [encode_prompt(tokenizer, render_prompt(tokenizer, p, use_template), prefix)[-args.max_prompt_length:]
           for p in prompts]
    train_dataset = Dataset.from_dict({"input_ids": ids})

    fp32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(args.sft, **fp32)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.sft, **fp32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **fp32)
    value_model = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **fp32)
    for m in (reward_model, value_model):
        if m.config.pad_token_id is None:
            m.config.pad_token_id = tokenizer.pad_token_id

    config = PPOConfig(
        output_dir=args.output_dir,
        seed=args.seed,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=args.num_mini_batches,
        num_ppo_epochs=args.ppo_epochs,
        response_length=args.max_new_tokens,
        temperature=args.temperature,
        total_episodes=args.episodes,
        local_rollout_forward_batch_size=args.batch,
        stop_token="eos",
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        learning_rate=3e-4,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
    )

    # count the sampled tokens on the way out of TRL's generation (a few integer ops per batch)
    counts = {"tokens": 0, "positions": 0}
    eos_id = tokenizer.eos_token_id
    batch_generation = ppo_mod.batch_generation

    def counting_batch_generation(model, queries, *a, **kw):
        query_responses, logits = batch_generation(model, queries, *a, **kw)
        resp = query_responses[:, queries.shape[1]:]
        width = resp.shape[1]
        is_eos = resp == eos_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(resp[:, 0], width))
        counts["tokens"] += int(first.sum())
        counts["positions"] += resp.numel()
        return query_responses, logits

    ppo_mod.batch_generation = counting_batch_generation

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
    )

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0

    updates = config.num_total_batches
    result = {
        "system": "trl-1.12",
        "episodes": args.episodes,
        "episodes_trained": updates * config.batch_size,
        "updates": updates,
        "train_s": round(train_s, 3),
        "episodes_per_s": round(args.episodes / train_s, 3),
        "generated_tokens": counts["tokens"],
        "generated_positions": counts["positions"],
        "settings": {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "ppo_epochs": args.ppo_epochs,
                     "num_mini_batches": args.num_mini_batches, "temperature": args.temperature, "seed": args.seed,
                     "max_prompt_length": args.max_prompt_length, "use_chat_template": use_template,
                     "prompts": len(ids), "kl_coef": 0.05, "learning_rate": 3e-4, "missing_eos_penalty": 1.0,
                     "torch_threads": torch.get_num_threads()},
        "versions": {name: md.version(name) for name in ("torch", "trl", "transformers", "accelerate", "datasets")},
    }
    result["whole_process_s"] = round(time.time() - t_start, 3)
    text = json.dumps(result, indent=2)
    with open(args.json, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
