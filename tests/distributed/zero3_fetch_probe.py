"""Run under `deepspeed --num_gpus 2`: counts ZeRO-3 parameter fetches made by the engine's
module hooks while a whole generate() call runs gathered (rlhf.distributed.for_generation), and
checks that generating without gathering (sharded, synced ranks) samples the same tokens.
Prints one JSON line on rank 0. Argument: a tokenizer directory."""
from __future__ import annotations

import json
import os
import sys

import torch


def main() -> None:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf import distributed, models
    from rlhf.config import DeepSpeedConfig
    from rlhf.generation import Sampling, generate

    distributed.init_distributed()
    tok = models.load_tokenizer([a for a in sys.argv[1:] if not a.startswith("--")][0])  # the launcher adds --local_rank
    models.ensure_pad_token(tok)
    torch.manual_seed(0)
    # every matrix above DeepSpeed's default persistence threshold (1e5 elements), so ZeRO-3 partitions it
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=384, intermediate_size=1024,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    import deepspeed

    cfg = distributed.deepspeed_config(DeepSpeedConfig(zero_stage=3), "float32", micro_batch=1, grad_accum=1,
                                       grad_clip=1.0, train_batch=distributed.world_size())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)

    fetches = {"n": 0}
    original = PartitionedParameterCoordinator.fetch_sub_module

    def counting(self, *args, **kwargs):
        fetches["n"] += 1
        return original(self, *args, **kwargs)

    PartitionedParameterCoordinator.fetch_sub_module = counting
    prompts = ["give me birds", "name a few cities"]
    engine.eval()
    torch.manual_seed(1)
    with distributed.for_generation(engine, 3) as (module, synced):
        g = generate(module, tok, prompts, max_new_tokens=16, sampling=Sampling(), synced_gpus=synced, with_logprobs=True)
    during = fetches["n"]
    steps = int(g.response_mask.sum(1).max())
    # deepspeed.zero3_gather_for_generation=false: sharded weights fetched layer by layer, ranks in lock-step
    torch.manual_seed(1)
    with distributed.for_generation(engine, 3, gather=False) as (module, synced):
        sharded = generate(module, tok, prompts, max_new_tokens=16, sampling=Sampling(), synced_gpus=synced,
                           with_logprobs=True)
    fetches_sharded = fetches["n"] - during
    same = bool(torch.equal(sharded.response_ids, g.response_ids)
                and torch.allclose(sharded.logprobs, g.logprobs, atol=1e-4))
    during_total = fetches["n"]
    # the hooks are back: a training step afterwards fetches through them as usual
    engine.train()
    ids = torch.cat([g.query_ids, g.response_ids], 1)
    loss = engine(input_ids=ids, attention_mask=torch.cat([g.query_mask, g.response_mask], 1), labels=ids).loss
    engine.backward(loss)
    engine.step()
    after = fetches["n"] - during_total
    if distributed.is_main():
        print(json.dumps({"fetches_during_generate": during, "decode_steps": steps, "fetches_in_train_step": after,
                          "loss": float(loss), "fetches_without_gathering": fetches_sharded,
                          "without_gathering_same_samples": same, "synced_without_gathering": synced}), flush=True)
    # leave together and skip interpreter teardown: a rank tearing down while the other still holds
    # the gloo/shm communicators can abort ("terminate called without an active exception")
    distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
