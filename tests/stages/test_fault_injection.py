"""Fault injection: each stage is SIGKILLed at chosen and at randomised moments (in training,
while a checkpoint is written, around the publish, in the final evaluation) and re-run with the
same command until it finishes. After every kill, nothing half-written is published; at the
end the manifests are complete and their figures describe the whole training: step counts,
duration summed over the runs, train loss equal to the logged losses, metric rows not doubled.
Plus a full disk while publishing. Named kill points: rlhf/faults.py."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import DEMO, ENV, ROOT, _head, manifest

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("RLHF_FAULT_SEED", "1234"))
KILLS: list[str] = []  # every kill performed, for the summary line


def small(tmp_path) -> list[str]:
    """The demo model on a few hundred rows: SFT 20 steps, RM ~33 steps, PPO 4 updates, frequent checkpoints."""
    return [
        "deepspeed.zero_stage=2", "wandb.mode=disabled",
        f"sft.train_data={_head('sft_train.jsonl', tmp_path / 'sft.jsonl', 320)}",
        f"sft.eval_data={_head('sft_eval.jsonl', tmp_path / 'sft_eval.jsonl', 32)}",
        "sft.epochs=1", "sft.batch_size=16", "sft.save_steps=5", "sft.logging_steps=2",
        f"reward.train_data={_head('prefs_train.jsonl', tmp_path / 'prefs.jsonl', 160)}",
        f"reward.eval_data={_head('prefs_eval.jsonl', tmp_path / 'prefs_eval.jsonl', 32)}",
        "reward.epochs=1", "reward.batch_size=16", "reward.save_steps=3", "reward.logging_steps=2",
        "reward.stats_samples=16",
        f"ppo.train_prompts={_head('prompts_train.jsonl', tmp_path / 'prompts.jsonl', 64)}",
        f"ppo.eval_prompts={_head('prompts_eval.jsonl', tmp_path / 'prompts_eval.jsonl', 16)}",
        "ppo.total_episodes=64", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2",
        "ppo.max_new_tokens=8", "ppo.save_every=1", "eval.num_prompts=16",
    ]


def _cmd(script: str, d, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / script), "--config", str(DEMO), f"artifact_dir={d}", *extra]


def _run(cmd: list[str], fault: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**ENV, **({"RLHF_FAULT": fault} if fault else {})}
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, time.time() - t


def _kill_after(cmd: list[str], trigger, delay: float) -> float:
    """Start, wait for `trigger()`, sleep `delay`, SIGKILL the whole process group; seconds run."""
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while not trigger():
            assert proc.poll() is None, "the run ended before the moment chosen to kill it"
            assert time.time() - t < 600, "the kill trigger never fired"
            time.sleep(0.05)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before the moment chosen to kill it"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.time() - t


def _nothing_half_published(d, stage: str) -> None:
    from rlhf import artifacts

    out = artifacts.stage_dir(d, stage)
    if out.exists():  # present means complete and intact, whatever moment the kill hit
        artifacts.load(out, stage)


def _killed(proc: subprocess.CompletedProcess, fault: str) -> None:
    assert proc.returncode == -signal.SIGKILL, (
        f"{fault}: expected a SIGKILL, got exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    KILLS.append(fault)


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    proc, _ = _run(cmd)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _rows(d, stage: str) -> list[dict]:
    return [json.loads(ln) for ln in (d / "metrics" / f"{stage}.jsonl").read_text().splitlines()]


def _check_truthful(d, stage: str, steps: int, seconds: list[float], loss_key: str | None) -> dict:
    from rlhf import artifacts

    m = manifest(d, stage)
    assert m["status"] == "complete" and artifacts.stage_state(d, stage) == "complete"
    assert not artifacts.checkpoint_dir(d, stage).exists() and not artifacts.leftovers(d, stage)
    assert m["invocations"] >= 3, m["invocations"]
    # each killed run counted up to its last logged step: more than the longest single run
    assert m["duration_s"] > max(seconds) * 0.5 and m["duration_s"] > sorted(seconds)[-2], (m["duration_s"], seconds)
    rows = _rows(d, stage)
    plain = [r["step"] for r in rows if not r.get("summary")]
    assert all(a < b for a, b in zip(plain, plain[1:])), plain  # no row repeated by a resumed run
    if loss_key:  # train_loss = the step-weighted mean of the logged losses, whatever the kills
        logged = [(r["step"], r[loss_key]) for r in rows if loss_key in r and not r.get("summary")]
        assert [s for s, _ in logged] == sorted({s for s, _ in logged}), logged  # no step logged twice
        total, prev = 0.0, 0
        for s, v in logged:
            total += v * (s - prev)
            prev = s
        steps = steps or math.ceil(m["metrics"]["train_pairs"] / 16)  # reward: pairs expanded from rankings
        assert m["metrics"]["train_steps"] == steps and math.isfinite(m["metrics"]["train_loss"])
        assert m["metrics"]["train_loss"] == pytest.approx(total / prev, rel=1e-6)
        assert sum(1 for r in rows if "train_runtime" in r) == 1  # one end-of-training row
    return m


def test_kills_in_every_stage_resume_truthfully(tmp_path):
    rng = random.Random(SEED)
    d = tmp_path / "art"
    extra = small(tmp_path)
    t_all = time.time()

    # SFT: 20 steps, checkpoints every 5
    cmd = _cmd("sft.py", d, extra)
    seconds = []
    ckpt = d / "checkpoints" / "sft"
    for fault in (f"train:step@{rng.randint(1, 3)}", "checkpoint:saved@1"):  # before / at the first checkpoint
        proc, s = _run(cmd, fault)
        _killed(proc, f"sft {fault}")
        seconds.append(s)
        _nothing_half_published(d, "sft")
    # resumed at step 5: killed from outside at a random moment after its checkpoint of step 10
    seconds.append(_kill_after(cmd, lambda: any(ckpt.glob("checkpoint-1[05]/trainer_state.json")),
                               rng.uniform(0, 0.3)))
    KILLS.append("sft: randomised moment after the checkpoint of step 10")
    _nothing_half_published(d, "sft")
    for fault in ("publish:staged", "publish:manifest", "publish:done"):
        proc, s = _run(cmd, fault)
        _killed(proc, f"sft {fault}")
        seconds.append(s)
        _nothing_half_published(d, "sft")
    proc = _finish(cmd)
    assert "up to date: skipping" in proc.stdout  # killed after the publish: complete, leftovers cleaned
    _check_truthful(d, "sft", steps=20, seconds=seconds, loss_key="train/loss")

    # reward model: ~33 steps (rankings expand to pairs), checkpoints every 3; then reward_stats sampling
    cmd = _cmd("rm.py", d, extra)
    seconds = []
    for fault in (f"train:step@{rng.randint(2, 8)}", "evaluation:start", "publish:manifest"):
        proc, s = _run(cmd, fault)
        _killed(proc, f"reward {fault}")
        seconds.append(s)
        _nothing_half_published(d, "reward")
    _finish(cmd)
    m = _check_truthful(d, "reward", steps=0, seconds=seconds, loss_key="train/loss")
    assert 0.0 <= m["metrics"]["eval_accuracy"] <= 1.0 and "reward_stats" in m

    # PPO: 4 updates, a checkpoint after each
    cmd = _cmd("ppo.py", d, extra)
    seconds = []
    for fault in ("checkpoint:engines@2", f"train:step@{rng.randint(1, 3)}", "evaluation:start", "publish:staged"):
        proc, s = _run(cmd, fault)
        _killed(proc, f"ppo {fault}")
        seconds.append(s)
        _nothing_half_published(d, "ppo")
    proc = _finish(cmd)
    m = _check_truthful(d, "ppo", steps=4, seconds=seconds, loss_key=None)
    assert [r["step"] for r in _rows(d, "ppo")] == [0, 1, 2, 3, 4]  # 0: the held-out evaluation of the SFT policy
    assert m["metrics"]["updates"] == 4 and math.isfinite(m["metrics"]["kl_ppo_vs_sft"])

    print(f"\nfault injection: {len(KILLS)} kills in {time.time() - t_all:.0f}s (seed {SEED}): {KILLS}")
    assert len(KILLS) >= 10


def test_full_disk_while_publishing_publishes_nothing_and_a_rerun_completes(tmp_path):
    d = tmp_path / "art"
    extra = small(tmp_path) + ["sft.train_data=" + _head("sft_train.jsonl", tmp_path / "tiny.jsonl", 64)]
    cmd = _cmd("sft.py", d, extra)
    proc, _ = _run(cmd, "publish:manifest:enospc")
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "No space left on device" in proc.stderr
    assert not (d / "sft").exists()
    _finish(cmd)
    assert manifest(d, "sft")["status"] == "complete"


def _status(d) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", "status", "--artifact-dir", str(d)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True).stdout
    return {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}


def test_a_torn_newest_checkpoint_is_passed_over_and_the_re_run_resumes_from_the_one_before(tmp_path):
    """An empty file in the newest checkpoint (a crash before the page cache was flushed): the
    re-run resumes from the previous checkpoint, says so, and finishes; `rlhf status` tells which
    checkpoint is usable, before and after. SFT (an HF trainer checkpoint) and PPO (its own)."""
    d = tmp_path / "run"
    extra = small(tmp_path)
    # SFT killed after its 3rd checkpoint (steps 5, 10, 15; two are kept)
    killed, _ = _run(_cmd("sft.py", d, extra), fault="checkpoint:saved@3")
    assert killed.returncode == -signal.SIGKILL
    ckpt = d / "checkpoints" / "sft"
    newest = ckpt / "checkpoint-15"
    optim = next(f for f in newest.rglob("*optim_states.pt"))
    optim.write_bytes(b"")
    line = _status(d)["sft"]
    assert "resumable from step 10" in line and "checkpoint-15" in line and "0 bytes" in line, line
    proc, _ = _run(_cmd("sft.py", d, extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "passing over checkpoint-15" in proc.stdout and "resuming from" in proc.stdout, proc.stdout
    assert "checkpoint-10" in proc.stdout.split("resuming from", 1)[1].splitlines()[0]
    assert manifest(d, "sft")["metrics"]["train_steps"] == 20
    ok_rm = _run(_cmd("rm.py", d, extra))[0]
    assert ok_rm.returncode == 0, ok_rm.stderr[-3000:]

    # PPO, killed after its 3rd checkpoint (updates 1, 2, 3; state.json and state.prev.json kept)
    killed, _ = _run(_cmd("ppo.py", d, extra), fault="checkpoint:saved@3")
    assert killed.returncode == -signal.SIGKILL
    pckpt = d / "checkpoints" / "ppo"
    state = json.loads((pckpt / "state.json").read_text())
    assert state["update"] == 3 and json.loads((pckpt / "state.prev.json").read_text())["update"] == 2
    victim = next(iter(state["files"]))
    (pckpt / victim).write_bytes(b"")
    line = _status(d)["ppo"]
    assert "resumable from update 2" in line and "state.json" in line, line
    proc, _ = _run(_cmd("ppo.py", d, extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "passing over the checkpoint of state.json" in proc.stdout and "resuming from update 2" in proc.stdout
    m = manifest(d, "ppo")
    assert m["metrics"]["updates"] == 4
    rows = [json.loads(x) for x in (d / "metrics" / "ppo.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "objective/kl" in r]
    assert steps == sorted(set(steps)), "no update logged twice after resuming from the older checkpoint"
