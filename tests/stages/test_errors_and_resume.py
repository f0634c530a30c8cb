"""Bad input fails early with an actionable message; a killed run resumes; KL penalty acts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DEMO, ENV, ROOT, manifest, ok, run_stage

pytestmark = pytest.mark.slow


def test_config_typo_fails_before_training(tmp_path):
    proc = run_stage("sft.py", f"artifact_dir={tmp_path}", "sft.learnin_rate=1e-4", timeout=120)
    assert proc.returncode == 2
    assert "sft.learnin_rate" in proc.stderr and "sft.learning_rate" in proc.stderr
    assert not (tmp_path / "sft").exists() and not (tmp_path / "checkpoints").exists()


def test_malformed_row_names_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "list some fruits", "completion": " apple."}\n{"prompt": "x"}\n')
    proc = run_stage("sft.py", f"artifact_dir={tmp_path}/a", f"sft.train_data={bad}", timeout=120)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "row 2" in proc.stderr and "'completion'" in proc.stderr


def test_stage_refuses_partial_parent(tmp_path):
    (tmp_path / "sft").mkdir(parents=True)
    (tmp_path / "sft" / "config.json").write_text("{}")
    proc = run_stage("rm.py", f"artifact_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert "not a complete sft artifact" in proc.stderr and "launch/sft.py" in proc.stderr


def _kill_when(cmd: list[str], path_pred, timeout: float = 600) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    start = time.time()
    try:
        while time.time() - start < timeout:
            if path_pred():
                break
            if proc.poll() is not None:
                pytest.fail("the run finished before it could be killed")
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sft_killed_mid_training_resumes(tmp_path):
    d = tmp_path / "art"
    cmd = [sys.executable, str(ROOT / "launch/sft.py"), "--config", str(DEMO), f"artifact_dir={d}", "sft.save_steps=20"]
    ckpt = d / "checkpoints" / "sft"
    # killed once a checkpoint is sealed (its files flushed and their sizes written): one a resume trusts
    _kill_when(cmd, lambda: any((p / "rlhf_checkpoint.json").exists() for p in ckpt.glob("checkpoint-*")))
    assert not (d / "sft").exists()  # never half-published
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    ok(proc)
    assert "resuming from" in proc.stdout
    m = manifest(d, "sft")
    assert m["status"] == "complete" and m["metrics"]["eval_loss"] < 0.5 * m["metrics"]["eval_loss_initial"]
    assert not ckpt.exists()


def test_ppo_killed_after_checkpoint_resumes(demo_run, tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    for s in ("sft", "reward"):
        os.symlink(demo_run / s, d / s)
    # the demo's rloo, 4 samples of 8 prompts per update: 20 updates
    args = [f"artifact_dir={d}", "ppo.total_episodes=640", "ppo.rollout_batch_size=8", "ppo.save_every=5",
            "ppo.target_kl=0.5"]
    cmd = [sys.executable, str(ROOT / "launch/ppo.py"), "--config", str(DEMO), *args]
    state = d / "checkpoints" / "ppo" / "state.json"
    _kill_when(cmd, state.exists)
    saved = json.loads(state.read_text())
    status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--artifact-dir", str(d)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    ok(status)
    ppo_line = next(ln for ln in status.stdout.splitlines() if ln.lstrip().startswith("ppo"))
    assert "partial" in ppo_line and f"update {saved['update']}" in ppo_line, status.stdout
    # the pipeline command skips the two complete stages and resumes PPO where it stopped
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", str(DEMO), *args], cwd=ROOT,
                          env={**ENV, "MASTER_PORT": "29655"}, capture_output=True, text=True, timeout=900)
    ok(proc)
    assert proc.stdout.count("up to date: skipping") == 2, proc.stdout
    assert f"resuming from update {saved['update']}" in proc.stdout
    assert f"kl_coef={saved['kl_ctl']['value']:.4g}" in proc.stdout
    rows = [json.loads(ln) for ln in (d / "metrics" / "ppo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 21))  # rows after the checkpoint were replaced, not doubled
    assert manifest(d, "ppo")["metrics"]["updates"] == 20


def test_kl_penalty_keeps_policy_close(demo_run, tmp_path):
    """Same short run with a large and a near-zero KL coefficient: the penalty must hold KL down."""
    kls = {}
    for name, coef in (("large", 2.0), ("small", 0.0001)):
        d = tmp_path / name
        d.mkdir()
        for s in ("sft", "reward"):
            os.symlink(demo_run / s, d / s)
        ok(run_stage("ppo.py", f"artifact_dir={d}", f"ppo.kl_coef={coef}", "ppo.total_episodes=640", "ppo.rollout_batch_size=8",
                     "eval.num_prompts=64"))
        m = manifest(d, "ppo")["metrics"]
        kls[name] = m["kl_ppo_vs_sft"]
    assert kls["large"] < 0.5 * kls["small"], kls


def test_damaged_weights_reported_by_status_and_refused_by_the_next_stage(demo_run, tmp_path):
    import shutil

    d = tmp_path / "art"
    d.mkdir()
    shutil.copytree(demo_run / "sft", d / "sft")
    os.truncate(d / "sft" / "model.safetensors", 5000)
    status = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--artifact-dir", str(d)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 1, status.stdout
    sft_line = next(ln for ln in status.stdout.splitlines() if ln.startswith("sft"))
    assert "damaged" in sft_line and "model.safetensors: 5000 bytes" in sft_line and "force=true" in sft_line
    proc = run_stage("rm.py", f"artifact_dir={d}", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"the sft artifact {d / 'sft'} is damaged" in proc.stderr and "model.safetensors" in proc.stderr
    assert not (d / "reward").exists() and not (d / "checkpoints").exists()


def test_critic_free_grpo_with_kl_in_the_loss_resumes_after_a_kill(demo_run, tmp_path):
    """GRPO (4 samples per prompt, KL as a loss term) killed after a checkpoint: the checkpoint and
    the published stage hold no critic, the resumed run continues the same update count, and the
    rows carry the estimator's own metrics; then `rlhf compare` draws it beside the demo's run."""
    d = tmp_path / "grpo"
    d.mkdir()
    for s in ("sft", "reward"):
        os.symlink(demo_run / s, d / s)
    args = [f"artifact_dir={d}", "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=16", "ppo.total_episodes=320", "ppo.save_every=3", "ppo.kl_penalty=loss",
            "ppo.kl_estimator=k3", "eval.num_prompts=32", "eval.best_of_n=[1,4]"]
    cmd = [sys.executable, str(ROOT / "launch/ppo.py"), "--config", str(DEMO), *args]
    state = d / "checkpoints" / "ppo" / "state.json"
    _kill_when(cmd, state.exists)
    saved = json.loads(state.read_text())
    assert saved["engines"] == ["actor"] and not (d / "checkpoints" / "ppo" / "critic").exists()
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "MASTER_PORT": "29657"}, capture_output=True, text=True, timeout=900)
    ok(proc)
    assert f"resuming from update {saved['update']}" in proc.stdout
    assert "advantages: grpo (4 samples per prompt), loss seq_mean, KL in the loss" in proc.stdout
    m = manifest(d, "ppo")
    assert m["metrics"]["updates"] == 10  # 320 responses / (8 prompts x 4 samples)
    assert not (d / "ppo" / "critic").exists()
    rows = [json.loads(ln) for ln in (d / "metrics" / "ppo.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 11))
    updates = [r for r in rows if "objective/kl" in r]
    assert all("loss/kl_avg" in r and "rollout/zero_std_groups" in r and "loss/value_avg" not in r for r in updates)
    assert all(r["objective/non_score_reward"] == 0 for r in updates)  # the KL is in the loss, not the reward
    # best-of-n on the evaluation's own prompts: best-of-1 and the SFT point are the same policy there
    bo1 = next(r for r in m["metrics"]["best_of_n"] if r["n"] == 1)
    sft = m["metrics"]["eval_curve"][0]
    assert abs(bo1["gold_score"] - sft["gold_score"]) < 0.35, (bo1, sft)
    cmp = subprocess.run([sys.executable, "-m", "rlhf.cli", "compare", str(demo_run), str(d), "--out",
                          str(tmp_path / "cmp.png")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    ok(cmp)
    assert "grpo" in cmp.stdout and (tmp_path / "cmp.png").stat().st_size > 10_000
