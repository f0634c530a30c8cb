"""The ZeRO-3 inference engine (reference policy, reward model) is built from the pipeline's own
DeepSpeed JSON: deepspeed.config_file and deepspeed.offload reach it, and it computes what the
plain model computes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

pytestmark = pytest.mark.slow

PROBE = r"""
import json, os, sys
os.environ.update(MASTER_PORT=sys.argv[2])
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from rlhf import distributed
from rlhf.config import DeepSpeedConfig

distributed.init_distributed()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=32)
plain = LlamaForCausalLM(cfg).eval()
copy = LlamaForCausalLM(cfg)
copy.load_state_dict(plain.state_dict())
ds = DeepSpeedConfig(zero_stage=3, offload=True, config_file=sys.argv[1])
engine = distributed.make_inference(copy, 3, distributed.inference_config(ds, "float32"))
ids = torch.randint(0, 64, (2, 7))
with torch.no_grad():
    same = torch.allclose(engine(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
zero = engine.config["zero_optimization"]
print(json.dumps({"same": bool(same), "offload_param": zero.get("offload_param", {}).get("device"),
                  "offload_optimizer": "offload_optimizer" in zero,
                  "threshold": zero.get("stage3_param_persistence_threshold")}))
"""


def test_inference_engine_uses_the_pipeline_deepspeed_json(tmp_path):
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 7}}))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(user_json), "29731"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"same": True, "offload_param": "cpu", "offload_optimizer": False, "threshold": 7}, out
