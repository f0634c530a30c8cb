"""The whole pipeline with another preference format and another from-scratch model, by overrides only."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DEMO, ENV, ROOT, manifest, ok

pytestmark = pytest.mark.slow


def test_pipeline_with_hh_transcripts_and_scratch_model_overrides(tmp_path, monkeypatch):
    d = tmp_path / "hh"
    # the public HH-RLHF files have transcripts whose last Assistant turn is empty: with default
    # settings such rows are skipped and counted, not fatal
    rows = (ROOT / "reward_data/demo/prefs_hh_train.jsonl").read_text().splitlines()
    empty = json.dumps({"chosen": "\n\nHuman: give me birds\n\nAssistant:", "rejected": "\n\nHuman: give me birds\n\nAssistant: owl."})
    (tmp_path / "hh_train.jsonl").write_text("\n".join(rows[:500] + [empty] + rows[500:]) + "\n")
    monkeypatch.chdir(tmp_path)
    hh_train = "hh_train.jsonl"  # relative: resolved against the current directory
    overrides = [f"artifact_dir={d}", f"reward.train_data={hh_train}", f"reward.eval_data={ROOT}/reward_data/demo/prefs_hh_eval.jsonl",
                 "model.scratch.vocab_size=320", "model.scratch.hidden_size=64", "model.scratch.num_layers=1",
                 "model.scratch.num_heads=2", "model.scratch.intermediate_size=256",
                 "sft.epochs=1", "reward.epochs=2", "reward.stats_samples=64", "ppo.total_episodes=128", "ppo.rollout_batch_size=8",
                 "eval.num_prompts=32"]
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", str(DEMO), *overrides], cwd=tmp_path,
                          env={**ENV, "MASTER_PORT": "29677"}, capture_output=True, text=True, timeout=1500)
    ok(proc)
    assert "report:" in proc.stdout
    sft, rm, ppo = (manifest(d, s) for s in ("sft", "reward", "ppo"))
    cfg = json.loads((d / "sft" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 1, 320)
    assert rm["metrics"]["train_pairs"] == len(rows)  # one pair per usable transcript, multi-turn ones included
    assert rm["metrics"]["skipped_empty_response"] == 1
    assert rm["metrics"]["eval_accuracy"] > 0.6, rm["metrics"]
    assert rm["data"]["train_data"]["path"] == str(tmp_path / "hh_train.jsonl")
    assert ppo["status"] == "complete" and {p["stage"] for p in ppo["parents"]} == {"sft", "reward"}
    assert sft["tokenizer"]["vocab_size"] == 320
    # PPO trained on the HH prompts: 4 updates that moved the policy away from SFT on held-out prompts
    curve = ppo["metrics"]["eval_curve"]
    assert ppo["metrics"]["updates"] == 4 and [c["update"] for c in curve][::len(curve) - 1] == [0, 4]
    assert curve[0]["kl"] == pytest.approx(0, abs=1e-5) and curve[-1]["kl"] > 0.01, curve


def test_reward_stage_on_ultrafeedback_layout(demo_run, tmp_path):
    """UltraFeedback-binarized rows (prompt string, chosen/rejected as whole conversations, extra
    columns) train the reward model with default settings."""
    import shutil

    from conftest import run_stage

    d = tmp_path / "uf"
    d.mkdir()
    shutil.copytree(demo_run / "sft", d / "sft")
    rows = []
    for line in (ROOT / "reward_data/demo/prefs_hh_train.jsonl").read_text().splitlines()[:400]:
        r = json.loads(line)
        if r["chosen"].count("Human:") != 1:
            continue
        prompt = r["chosen"].split("\n\nAssistant:")[0].replace("\n\nHuman: ", "")
        conv = lambda t: [{"role": "user", "content": prompt},  # noqa: E731
                          {"role": "assistant", "content": t.split("\n\nAssistant:")[1]}]
        rows.append({"prompt": prompt, "prompt_id": str(len(rows)), "chosen": conv(r["chosen"]), "rejected": conv(r["rejected"]),
                     "messages": conv(r["chosen"]), "score_chosen": 8.0, "score_rejected": 4.0})
    uf = tmp_path / "uf.jsonl"
    uf.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ok(run_stage("rm.py", f"artifact_dir={d}", f"reward.train_data={uf}", "reward.eval_data=null", "reward.epochs=1",
                 "reward.stats_samples=32"))
    rm = manifest(d, "reward")
    assert rm["metrics"]["train_pairs"] == len(rows) > 200  # the single-turn transcripts of the first 400
    assert rm["metrics"]["train_loss"] < 0.69  # learns something from the conversational pairs
