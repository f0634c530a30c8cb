"""Bad input run the way a user runs it: the stage (or the pipeline) exits 2 with a message
naming the file/row/key, no traceback, before any work, leaving nothing in the artifact dir.
(Each check itself is tested in-process in tests/unit/test_preflight.py.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import DEMO, ENV, ROOT, run_stage

pytestmark = pytest.mark.slow


def refused(proc: subprocess.CompletedProcess, *named: str, prefix: str = "[sft] error: ") -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    assert prefix in proc.stderr, proc.stderr[-2000:]
    for s in named:
        assert s in proc.stderr, (s, proc.stderr[-2000:])


def test_stage_refuses_non_utf8_data_before_any_work(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_bytes(b'{"prompt": "list fruits", "completion": " apple."}\n{"prompt": "caf\xe9", "completion": " pear."}\n')
    art = tmp_path / "art"
    proc = run_stage("sft.py", f"artifact_dir={art}", f"sft.train_data={bad}", timeout=180)
    refused(proc, "sft.train_data", str(bad), "row 2", "UTF-8")
    assert not art.exists()  # nothing published, no checkpoints, not even the directory


def test_stage_refuses_bin_only_model_and_bad_deepspeed_json(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "pytorch_model.bin").write_bytes(b"x")
    (model / "tokenizer.json").write_text("{}")
    art = tmp_path / "art"
    proc = run_stage("sft.py", f"artifact_dir={art}", "model.scratch=null", f"model.name_or_path={model}", timeout=180)
    refused(proc, f"model.name_or_path={model}", "pytorch_model.bin", "safetensors")
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2,}}')
    proc = run_stage("sft.py", f"artifact_dir={art}", f"deepspeed.config_file={ds}", timeout=180)
    refused(proc, f"deepspeed.config_file={ds}", "not valid JSON")
    assert not art.exists()


def test_reward_stage_alone_refuses_a_missing_parent(tmp_path):
    proc = run_stage("rm.py", f"artifact_dir={tmp_path}", timeout=180)
    refused(proc, "no sft artifact", "launch/sft.py", prefix="[reward] error: ")
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)


def test_pipeline_refuses_bad_input_before_the_first_stage(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_cli("pipeline", str(DEMO), f"artifact_dir={afile}")
    refused(proc, f"artifact_dir={afile}", "not a directory", prefix="error: ")
    gold = tmp_path / "gold.py"
    gold.write_text("import not_a_module_anywhere\n")
    art = tmp_path / "art"
    proc = run_cli("pipeline", str(DEMO), f"artifact_dir={art}", f"eval.gold_scorer={gold}:gold_score")
    refused(proc, "eval.gold_scorer", str(gold), "not_a_module_anywhere", prefix="error: ")
    assert "== sft" not in proc.stdout and not art.exists()  # refused before SFT, not after it
    if not torch.cuda.is_available():  # float16 trains only on a GPU
        proc = run_cli("demo", "--artifact-dir", str(art), "model.dtype=float16")
        refused(proc, "model.dtype=float16", "model.dtype=float32", prefix="error: ")


def test_generate_with_a_bad_prompts_file_names_the_row(demo_run, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "list some fruits"}\n{"question": "x"}\n')
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "generate", "--model", str(demo_run / "ppo"),
                           "--prompts", str(bad), "--out", str(tmp_path / "out.jsonl")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "row 2" in proc.stderr and not (tmp_path / "out.jsonl").exists()


def test_generate_refuses_a_reward_model_bad_numbers_and_a_directory_as_out(demo_run, tmp_path):
    prompts = ROOT / "reward_data" / "demo" / "prompts_eval.jsonl"

    def gen(model, *extra):
        return subprocess.run([sys.executable, "-m", "rlhf.cli", "generate", "--model", str(model), "--prompts",
                               str(prompts), *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)

    out = str(tmp_path / "out.jsonl")
    cases = [((demo_run / "reward", "--out", out), "is a reward model"),
             ((demo_run / "ppo", "--out", str(tmp_path)), "is a directory"),
             ((demo_run / "ppo", "--out", out, "--max-new-tokens", "0"), "--max-new-tokens: 0 is out of range"),
             ((demo_run / "ppo", "--out", out, "--top-p", "1.5"), "--top-p: 1.5 is out of range"),
             ((demo_run / "ppo", "--out", out, "--temperature", "nan"), "--temperature: nan is out of range"),
             ((demo_run / "ppo", "--out", out, "--batch-size", "x"), "--batch-size: 'x' is not an integer")]
    for args, says in cases:
        proc = gen(*args)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "out.jsonl").exists()
    proc = gen(demo_run / "ppo", "--out", out, "--max-new-tokens", "4")
    assert proc.returncode == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) > 0
    assert not (tmp_path / "out.jsonl.part").exists()
