"""The demo pipeline end to end in one process: each stage learns what it should."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ENV, ROOT, manifest
from reward_data.gold import is_well_formed

pytestmark = pytest.mark.slow

PPO_METRICS = ["objective/kl", "objective/kl_coef", "objective/entropy", "objective/non_score_reward",
               "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg",
               "policy/entropy_avg", "loss/policy_avg", "val/ratio", "rollout/zero_std_groups",
               "val/ratio_var", "val/num_eos_tokens", "lr", "episode", "time/rollout", "time/update",
               "throughput/episodes_per_s", "throughput/tokens_per_s"]


def test_sft_learns_the_task(demo_run, tmp_path):
    m = manifest(demo_run, "sft")
    assert m["status"] == "complete" and m["stage"] == "sft"
    assert m["metrics"]["eval_loss"] < 0.5 * m["metrics"]["eval_loss_initial"]
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (demo_run / "sft" / f).is_file()
    out = tmp_path / "gen.jsonl"
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "generate", "--model", str(demo_run / "sft"),
                           "--prompts", str(ROOT / "reward_data/demo/prompts_eval.jsonl"), "--out", str(out),
                           "--max-new-tokens", "24"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 128 and set(rows[0]) == {"prompt", "response"}
    rate = sum(is_well_formed(r["response"]) for r in rows) / len(rows)
    assert rate >= 0.7, f"only {rate:.2f} of greedy SFT responses are well-formed demo lists"


def test_reward_model_learns_gold_preferences(demo_run):
    m = manifest(demo_run, "reward")
    # held-out pairs labelled by the gold scorer, and rank agreement with gold on fresh SFT samples
    assert m["metrics"]["eval_accuracy"] >= 0.90, m["metrics"]
    assert m["metrics"]["spearman_gold"] >= 0.8, m["metrics"]
    assert m["reward_stats"]["std"] > 0 and math.isfinite(m["reward_stats"]["mean"])
    assert m["parents"][0]["stage"] == "sft"
    assert (demo_run / "reward" / "model.safetensors").is_file()


def test_ppo_raises_reward_within_kl_budget(demo_run):
    m = manifest(demo_run, "ppo")["metrics"]
    assert m["rm_score_ppo"] > m["rm_score_sft"] + 0.3, m  # the proxy reward PPO optimises goes up
    # ... and so does the gold score it stands for: by half a standard deviation of SFT's gold scores
    assert m["gold_score_ppo"] >= m["gold_score_sft"] + 0.5 * m["gold_score_sft_std"], m
    assert m["win_rate_gold"] > 0.6, m
    assert m["within_kl_budget"] and m["kl_ppo_vs_sft"] <= m["kl_budget"]
    # the demo's rloo beats best-of-16 on the same held-out prompts (measured: 0.96 against 0.91; the
    # tolerance allows for the guard's noisy pick, it fails the old demo's 0.82)
    best16 = next(b for b in m["best_of_n"] if b["n"] == 16)
    assert m["gold_score_ppo"] >= best16["gold_score"] - 0.03, (m["gold_score_ppo"], best16)
    every = [json.loads(ln) for ln in (demo_run / "metrics" / "ppo.jsonl").read_text().splitlines()]
    rows = [r for r in every if "objective/kl" in r]  # one per update; row 0 is the SFT policy's evaluation
    assert len(rows) == m["updates"]
    for name in PPO_METRICS:
        assert all(isinstance(r[name], (int, float)) and math.isfinite(r[name]) for r in rows), name
    assert not any("loss/value_avg" in r or "val/clipfrac_avg" in r for r in rows)  # rloo: no critic
    # held-out evaluation during training: at update 0 and every eval.every updates, all five metrics
    evals = [r for r in every if "eval/rm_score" in r]
    assert len(evals) >= 6 and evals[0]["step"] == 0 and evals[-1]["step"] == m["updates"]
    for name in ("eval/rm_score", "eval/gold_score", "eval/kl_to_sft", "eval/response_length", "eval/eos_rate"):
        assert all(math.isfinite(r[name]) for r in evals), name
    assert [p["update"] for p in m["eval_curve"]] == [r["step"] for r in evals]
    assert m["stop_reason"] == "completed" and m["selected_update"] in [r["step"] for r in evals]
    # the final evaluation is the held-out evaluation of the published update against that of update 0
    # (the same prompts and seed: its samples are reused, not drawn again)
    curve = {p["update"]: p for p in m["eval_curve"]}
    assert m["rm_score_ppo"] == curve[m["selected_update"]]["rm_score"] and m["rm_score_sft"] == curve[0]["rm_score"]
    assert m["gold_score_ppo"] == pytest.approx(curve[m["selected_update"]]["gold_score"])
    assert m["kl_ppo_vs_sft"] == pytest.approx(curve[m["selected_update"]]["kl"], rel=1e-5)
    assert [b["n"] for b in m["best_of_n"]] == [1, 2, 4, 8, 16]
    # the gold-free signals: computed at every evaluation, and no false alarm on this healthy run
    assert all({"token_kl", "top_token_share", "distinct_2", "repetition"} <= set(p) for p in m["eval_curve"][1:])
    assert not m["exploitation"] and not m["warnings"], m["exploitation"]
    samples = (demo_run / "ppo" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 128
    assert {p["stage"] for p in manifest(demo_run, "ppo")["parents"]} == {"sft", "reward"}


def test_the_guard_without_gold_keeps_most_of_the_gold_gain(demo_run):
    """The demo's guard selects by gold (eval.gold_scorer is set). Without it (ppo.keep_best=conservative)
    it would take the best RM score (the demo has one reward model) before the first drift flag: replayed
    on this run's evaluations, that update keeps at least 90 % of the peak gold gain over SFT."""
    from rlhf.ppo.evaluation import Selector

    m = manifest(demo_run, "ppo")["metrics"]
    s = Selector("eval/rm_score", m["kl_budget"], None, gate=True)
    for p in m["eval_curve"]:
        s.observe(p["update"], {"eval/rm_score": p["rm_score"], "eval/kl_to_sft": p["kl"]},
                  [{"signal": f} for f in p["flags"]])
    curve = {p["update"]: p for p in m["eval_curve"]}
    sft, peak = curve[0]["gold_score"], max(p["gold_score"] for p in curve.values())
    assert curve[s.best_update]["gold_score"] - sft >= 0.9 * (peak - sft), (s.best_update, m["eval_curve"])


def test_status_and_report(demo_run):
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--artifact-dir", str(demo_run)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.count("complete") == 3
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "report", "--artifact-dir", str(demo_run)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((demo_run / "report" / "summary.json").read_text())
    for k in ("rm_eval_accuracy", "gold_score_sft", "gold_score_ppo", "rm_score_sft", "rm_score_ppo",
              "kl_ppo_vs_sft", "win_rate_rm", "win_rate_gold"):
        assert k in summary
    from PIL import Image

    for png in ("ppo_scores.png", "ppo_kl.png", "rm_accuracy.png"):
        with Image.open(demo_run / "report" / png) as im:
            assert im.size == (640, 400)
    with Image.open(demo_run / "report" / "losses.png") as im:  # SFT, RM and policy loss: 2 rows of 2 panels
        assert im.size == (960, 560)
    with Image.open(demo_run / "report" / "score_vs_kl.png") as im:  # two panels: proxy and gold score
        assert im.size == (720, 640)
    html = (demo_run / "report" / "index.html").read_text()
    assert "<th>conservative score</th><th>drift flags</th>" in html


def test_rerun_skips_complete_stage(demo_run):
    from conftest import run_stage

    proc = run_stage("sft.py", f"artifact_dir={demo_run}")
    assert proc.returncode == 0
    assert "up to date: skipping" in proc.stdout


def test_moved_checkout_and_artifact_dir_skip_every_stage(demo_run, tmp_path):
    """Up-to-date checks go by content: the config and its data copied to a new place, the artifact
    directory copied elsewhere, and `rlhf pipeline` reuses all three stages; a changed data file
    rebuilds from the stage that reads it, saying why."""
    import shutil

    from conftest import ROOT, run_pipeline

    checkout = tmp_path / "moved checkout"
    shutil.copytree(ROOT / "launch" / "configs", checkout / "launch" / "configs")
    shutil.copytree(ROOT / "reward_data", checkout / "reward_data", ignore=shutil.ignore_patterns("__pycache__"))
    art = tmp_path / "moved artifacts"
    shutil.copytree(demo_run, art, ignore=shutil.ignore_patterns("report", "wandb", "logs"))
    config = checkout / "launch" / "configs" / "demo.yaml"
    proc = run_pipeline(art, [], port=29657, config=config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("up to date: skipping") == 3, proc.stdout
    assert "rebuilding" not in proc.stdout
    # a changed reward-data file: SFT is still reused, the reward stage says what changed
    prefs = checkout / "reward_data" / "demo" / "prefs_eval.jsonl"
    prefs.write_text("".join(prefs.read_text().splitlines(keepends=True)[:-1]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "rm.py"), "--config", str(config),
                             f"artifact_dir={art}"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:  # the reason comes before any training; the rebuild itself is not waited for
            seen.append(line)
            if "rebuilding" in line or "skipping" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert f"[reward] rebuilding {art / 'reward'}: reward.eval_data: file " in "".join(seen), "".join(seen)[-3000:]


def test_lora_ppo_under_zero2(demo_run, tmp_path):
    """LoRA PPO: the reference is the actor's base and the reward model the critic's base; the
    published policy is a plain merged model that differs from SFT and scores higher."""
    import shutil

    from conftest import GAE_DEMO, ok, run_stage
    from safetensors.torch import load_file

    for stage in ("sft", "reward"):
        shutil.copytree(demo_run / stage, tmp_path / stage)
    proc = run_stage("ppo.py", f"artifact_dir={tmp_path}", "ppo.lora=true", "deepspeed.zero_stage=2", *GAE_DEMO,
                     "ppo.total_episodes=256", "ppo.learning_rate=1e-3")
    ok(proc)
    assert "LoRA actor, reference = its base; LoRA critic, reward model = its base" in proc.stdout
    m = manifest(tmp_path, "ppo")
    assert m["status"] == "complete" and m["model"]["lora"] == "merged"
    assert m["metrics"]["rm_score_ppo"] > m["metrics"]["rm_score_sft"], m["metrics"]
    policy = load_file(str(tmp_path / "ppo" / "model.safetensors"))
    sft = load_file(str(demo_run / "sft" / "model.safetensors"))
    assert not any("lora" in k for k in policy) and set(policy) <= set(sft)  # (a tied lm_head may be left out)
    assert any(not (policy[k] == sft[k]).all() for k in policy)
    from rlhf.models import load_causal_lm

    assert load_causal_lm(str(tmp_path / "ppo"), "float32").config.vocab_size == m["tokenizer"]["vocab_size"]
    critic = load_file(str(tmp_path / "ppo" / "critic" / "model.safetensors"))
    assert not any("lora" in k or "modules_to_save" in k for k in critic)
