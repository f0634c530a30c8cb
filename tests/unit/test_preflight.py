"""Bad input is refused before any work, with a message naming the file, row, field or config key
and saying what to do (rlhf.preflight, the loaders, the config, the pipeline driver's output)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from rlhf import cli, preflight
from rlhf.artifacts import ArtifactError
from rlhf.config import ConfigError, load_config, load_function
from rlhf.data import DataError, iter_rows, load_preferences, load_prompts, load_sft

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "launch" / "configs" / "demo.yaml"
DEMO_DATA = REPO / "reward_data" / "demo"
ALL = ("sft", "reward", "ppo")


def demo_cfg(tmp_path: Path, *overrides: str):
    return load_config(DEMO, [f"artifact_dir={tmp_path / 'art'}", *overrides])


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def model_dir(path: Path, config: dict, *files: str) -> Path:
    """A directory shaped like a saved model (no real weights: preflight only looks at the files)."""
    write(path / "config.json", json.dumps(config))
    for f in files:
        write(path / f, "{}" if f.endswith(".json") else "x")
    return path


def sft_only(model: Path, tmp_path: Path, *overrides: str):
    return load_config(None, [f"artifact_dir={tmp_path / 'art'}", f"model.name_or_path={model}",
                              f"sft.train_data={DEMO_DATA / 'sft_eval.jsonl'}", *overrides])


# ---------------------------------------------------------------- the demo passes, and nothing is created

def test_demo_config_passes_and_creates_nothing(tmp_path):
    cfg = demo_cfg(tmp_path)
    preflight.check(cfg, ALL)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 1. non-UTF-8 bytes: file and row/line named

def test_non_utf8_jsonl_names_the_row(tmp_path):
    f = write(tmp_path / "d.jsonl", b'{"prompt": "a", "completion": " b"}\n{"prompt": "caf\xe9", "completion": " b"}\n')
    with pytest.raises(DataError) as e:
        load_sft(str(f))
    assert (e.value.source, e.value.row) == (str(f), 2)
    assert "row 2" in str(e.value) and "UTF-8" in str(e.value) and "0xe9" in str(e.value)


@pytest.mark.parametrize("name, data, line", [
    ("d.json", b'[\n {"prompt": "a", "completion": " b"},\n {"prompt": "caf\xe9", "completion": " b"}\n]', 3),
    ("d.csv", b"prompt,completion\na,b\ncaf\xe9,b\n", 3),
])
def test_non_utf8_json_and_csv_name_the_line(tmp_path, name, data, line):
    f = write(tmp_path / name, data)
    with pytest.raises(DataError) as e:
        list(iter_rows(str(f)))
    assert str(f) in str(e.value) and f"line {line}:" in str(e.value) and "UTF-8" in str(e.value)


def test_non_utf8_config_yaml_names_file_and_line(tmp_path):
    f = write(tmp_path / "c.yaml", b"seed: 1\nrun_name: caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value) and "line 2" in str(e.value) and "UTF-8" in str(e.value)


def test_byte_order_mark_is_accepted(tmp_path):
    f = write(tmp_path / "d.jsonl", b'\xef\xbb\xbf{"prompt": "a", "completion": " b"}\n')
    assert load_sft(str(f)).rows == 1
    c = write(tmp_path / "c.yaml", b"\xef\xbb\xbfseed: 3\n")
    assert load_config(c).seed == 3


def test_preflight_names_the_config_key_of_a_bad_data_file(tmp_path):
    f = write(tmp_path / "p.jsonl", b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError) as e:
        preflight.check(demo_cfg(tmp_path, f"ppo.eval_prompts={f}"), ALL)
    assert str(e.value).startswith("ppo.eval_prompts: ") and "row 2" in str(e.value)


# ---------------------------------------------------------------- 2. artifact_dir: a file, not writable

def test_artifact_dir_that_is_a_file(tmp_path):
    f = write(tmp_path / "afile", "x")
    with pytest.raises(ConfigError, match="artifact_dir=.*afile is an existing file, not a directory"):
        preflight.check(load_config(DEMO, [f"artifact_dir={f}"]), ALL)


def test_artifact_dir_below_a_file(tmp_path):
    f = write(tmp_path / "afile", "x")
    with pytest.raises(ConfigError, match="cannot be created: .*afile is a file"):
        preflight.check_artifact_dir(str(f / "run1"))


def test_artifact_subdirectory_that_is_a_file(tmp_path):
    write(tmp_path / "art" / "checkpoints", "x")
    with pytest.raises(ConfigError, match="checkpoints is a file where the pipeline keeps a directory"):
        preflight.check_artifact_dir(str(tmp_path / "art"))


def test_artifact_dir_not_writable(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError) as e:
        preflight.check_artifact_dir(str(tmp_path / "new" / "run"))
    assert f"cannot write in {tmp_path}" in str(e.value) and "Permission denied" in str(e.value)
    assert "choose another artifact_dir" in str(e.value)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_artifact_dir_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write in"):
            preflight.check_artifact_dir(str(ro / "run"))
    finally:
        ro.chmod(0o700)


def test_write_probe_leaves_nothing_behind(tmp_path):
    preflight.check_artifact_dir(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 3. the driver survives a log it cannot write

def fake_stages(monkeypatch, script: str) -> None:
    """run_pipeline runs `python -c script` as each stage, and builds no report."""
    from rlhf import report

    monkeypatch.setattr(cli, "_stage_command", lambda *a: [sys.executable, "-c", script])
    monkeypatch.setattr(report, "build", lambda d: Path(d) / "report")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (writes fail with ENOSPC)")
def test_pipeline_survives_a_full_disk_under_its_log(tmp_path, monkeypatch, capsys):
    art = tmp_path / "art"
    (art / "logs").mkdir(parents=True)
    (art / "logs" / "sft.log").symlink_to("/dev/full")
    fake_stages(monkeypatch, "print('[stage] starting'); print('a detail only the log would hold')")
    assert cli.run_pipeline(str(DEMO), [f"artifact_dir={art}"]) == 0
    out, err = capsys.readouterr()
    assert err.count("cannot write the sft log") == 1 and "No space left on device" in err
    assert out.count("\n   a detail only the log would hold\n") == 1  # streamed to the console instead
    assert "a detail only the log would hold" in (art / "logs" / "reward.log").read_text()  # other logs unaffected


def test_pipeline_reports_a_log_that_cannot_be_opened(tmp_path, monkeypatch, capsys):
    art = tmp_path / "art"
    art.mkdir()
    (art / "logs").mkdir()
    (art / "logs" / "sft.log").mkdir()  # a directory where the log file should be
    fake_stages(monkeypatch, "import sys; print('[stage] detail'); sys.exit(1)")
    assert cli.run_pipeline(str(DEMO), [f"artifact_dir={art}"]) == 1
    out, err = capsys.readouterr()
    assert "cannot write the sft log" in err and "\n   [stage] detail\n" in out
    assert "its output is above" in err and "Traceback" not in err


# ---------------------------------------------------------------- 4. deepspeed.config_file

@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"zero_optimization": {,}}', "line 1, column 24: not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"zero_optimization": 3}', '"zero_optimization" must be a JSON object'),
    (b'{"a": "\xe9"}', "not valid UTF-8"),
])
def test_bad_deepspeed_json_is_named_before_any_work(tmp_path, content, message):
    f = tmp_path / "ds.json"
    if content is not None:
        write(f, content)
    cfg = demo_cfg(tmp_path, f"deepspeed.config_file={f}")
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, ALL)
    assert f"deepspeed.config_file={f}" in str(e.value) and message in str(e.value)
    assert not (tmp_path / "art").exists()


def test_deepspeed_json_with_unknown_zero_key(tmp_path):
    f = write(tmp_path / "ds.json", '{"zero_optimization": {"overlap_com": true}}')
    with pytest.raises(ConfigError, match=r"zero_optimization\.overlap_com: Extra inputs are not permitted"):
        preflight.check(demo_cfg(tmp_path, f"deepspeed.config_file={f}"), ALL)


def test_deepspeed_json_offload_section_needs_deepspeed_offload(tmp_path):
    f = write(tmp_path / "ds.json", '{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}')
    with pytest.raises(ConfigError, match="offload_optimizer would switch CPU offload on while deepspeed.offload is false"):
        preflight.check(demo_cfg(tmp_path, f"deepspeed.config_file={f}"), ALL)
    preflight.check(demo_cfg(tmp_path, f"deepspeed.config_file={f}", "deepspeed.offload=true"), ALL)


def test_shipped_deepspeed_presets_pass(tmp_path):
    for preset in sorted((REPO / "launch" / "ds").glob("*.json")):
        stage = 3 if "zero3" in preset.name else 2
        offload = "true" if "offload" in preset.name else "false"
        preflight.check(demo_cfg(tmp_path, f"deepspeed.config_file={preset}", f"deepspeed.zero_stage={stage}",
                                 f"deepspeed.offload={offload}"), ALL)


def test_deepspeed_config_builder_names_the_key(tmp_path):
    from rlhf.config import DeepSpeedConfig
    from rlhf.distributed import deepspeed_config

    with pytest.raises(ConfigError, match="deepspeed.config_file=.*not valid JSON"):
        deepspeed_config(DeepSpeedConfig(config_file=str(write(tmp_path / "ds.json", "{oops"))), "float32")


# ---------------------------------------------------------------- 5. SFT rows longer than sft.max_length

def test_sft_max_length_below_two_is_refused():
    with pytest.raises(ConfigError, match="'sft.max_length': must be >= 2"):
        load_config(None, ["sft.max_length=1"])


def long_conversations(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"tell me about fruits and trees, number {i}"},
                          {"role": "assistant", "content": " apple, oak."}]} for i in range(6)]
    return write(tmp_path / "conv.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def test_loss_on_all_without_a_response_token_is_refused_before_work_scratch(tmp_path):
    conv = long_conversations(tmp_path)
    cfg = demo_cfg(tmp_path, f"sft.train_data={conv}", "sft.eval_data=null", "sft.loss_on=all", "sft.max_length=4")
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg, ["sft"])
    assert "sft.train_data: no example keeps a response token within sft.max_length=4" in str(e.value)
    assert "raise sft.max_length" in str(e.value)
    assert not (tmp_path / "art").exists()
    preflight.check(demo_cfg(tmp_path, f"sft.train_data={conv}", "sft.eval_data=null", "sft.loss_on=all"), ["sft"])


def test_loss_on_all_without_a_response_token_is_refused_before_work_local_model(tmp_path):
    from rlhf.models import train_scratch_tokenizer

    model = model_dir(tmp_path / "m", {"model_type": "llama"}, "model.safetensors")
    train_scratch_tokenizer(["tell me about fruits and trees apple oak"] * 20, 300).save_pretrained(str(model))
    conv = long_conversations(tmp_path)
    cfg = sft_only(model, tmp_path, f"sft.train_data={conv}", "sft.loss_on=all", "sft.max_length=4")
    with pytest.raises(ConfigError, match="no example keeps a response token within sft.max_length=4"):
        preflight.check(cfg, ["sft"])


# ---------------------------------------------------------------- 6. dtype the machine cannot train in

@pytest.mark.parametrize("dtype, stages, cuda, bf16, expect", [
    ("float32", ALL, False, False, None),
    ("bfloat16", ALL, True, True, None),
    ("float16", ALL, True, False, None),
    ("bfloat16", ALL, False, False, "needs a CUDA GPU with bfloat16"),
    ("bfloat16", ["sft"], True, False, "this GPU has no bfloat16 support"),
    ("bfloat16", ["ppo"], False, False, None),  # PPO's own engines; the trainers are what refuse it
    ("float16", ["ppo"], False, False, "model.dtype=float16 needs a CUDA GPU"),
])
def test_dtype_problem(dtype, stages, cuda, bf16, expect):
    problem = preflight.dtype_problem(dtype, list(stages), cuda, bf16)
    assert problem is None if expect is None else expect in problem


def test_bf16_on_a_machine_without_it_names_the_key(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        preflight.check(demo_cfg(tmp_path, "model.dtype=bfloat16"), ALL)
    assert "model.dtype=bfloat16" in str(e.value) and "model.dtype=float32" in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="use model.dtype=float16 or float32"):
        preflight.check(demo_cfg(tmp_path, "model.dtype=bfloat16"), ALL)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    preflight.check(demo_cfg(tmp_path, "model.dtype=bfloat16"), ALL)


# ---------------------------------------------------------------- 7. and 8. model directories

def test_bin_only_model_dir_says_convert_to_safetensors(tmp_path):
    model = model_dir(tmp_path / "m", {"model_type": "llama"}, "pytorch_model.bin", "tokenizer.json")
    with pytest.raises(ConfigError) as e:
        preflight.check(sft_only(model, tmp_path), ["sft"])
    msg = str(e.value)
    assert f"model.name_or_path={model}" in msg and "pytorch_model.bin" in msg
    assert "safetensors" in msg and "save_pretrained" in msg


def test_reward_model_bin_only_names_reward_model(tmp_path):
    model = model_dir(tmp_path / "m", {"model_type": "llama"}, "pytorch_model.bin", "tokenizer.json")
    with pytest.raises(ConfigError, match="reward.model=.*pytorch_model.bin"):
        preflight.check(demo_cfg(tmp_path, f"reward.model={model}"), ALL)


def test_custom_model_code_needs_trust_remote_code(tmp_path):
    model = model_dir(tmp_path / "m", {"model_type": "my_lm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}},
                      "model.safetensors", "tokenizer.json")
    with pytest.raises(ConfigError) as e:
        preflight.check(sft_only(model, tmp_path), ["sft"])
    assert f"model.name_or_path={model}" in str(e.value) and "model.trust_remote_code: true" in str(e.value)
    preflight.check(sft_only(model, tmp_path, "model.trust_remote_code=true"), ["sft"])


def test_unknown_model_type_without_code(tmp_path):
    model = model_dir(tmp_path / "m", {"model_type": "not_a_real_family"}, "model.safetensors", "tokenizer.json")
    with pytest.raises(ConfigError, match="model_type 'not_a_real_family' is not one transformers .* knows"):
        preflight.check(sft_only(model, tmp_path), ["sft"])


@pytest.mark.parametrize("files, message", [
    ((), "has no config.json"),
    (("config.json",), "has no model weights"),
    (("config.json", "model.safetensors"), "has no tokenizer files"),
])
def test_incomplete_model_dir(tmp_path, files, message):
    model = tmp_path / "m"
    model.mkdir()
    for f in files:
        write(model / f, json.dumps({"model_type": "llama"}) if f == "config.json" else "x")
    with pytest.raises(ConfigError, match=message):
        preflight.check(sft_only(model, tmp_path), ["sft"])


def test_model_path_that_does_not_exist_or_is_a_file(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path=.*/nope does not exist"):
        preflight.check(sft_only(tmp_path / "nope", tmp_path), ["sft"])
    with pytest.raises(ConfigError, match="is a file; give the model's directory"):
        preflight.check(sft_only(write(tmp_path / "f.bin", "x"), tmp_path), ["sft"])
    preflight.check_model_dir("org/some-model", "model.name_or_path", False)  # a hub id: left to the stage


def test_name_or_path_and_scratch_both_set(tmp_path):
    model = model_dir(tmp_path / "m", {"model_type": "llama"}, "model.safetensors", "tokenizer.json")
    with pytest.raises(ConfigError, match="set model.scratch=null to fine-tune"):
        preflight.check(demo_cfg(tmp_path, f"model.name_or_path={model}"), ALL)


# ---------------------------------------------------------------- 9. a failed stage's traceback on the console

def test_failure_excerpt_shows_rank0_traceback():
    lines = (["[sft] model: 0.5M parameters", "[rank1]: Traceback (most recent call last):", "[rank1]: Boom"]
             + ["[rank0]: Traceback (most recent call last):"] + [f'[rank0]:   File "x.py", line {i}' for i in range(60)]
             + ["[rank0]: ValueError: the real reason", "[INFO] launcher: exit code 1"])
    excerpt, is_tb = cli.failure_excerpt(lines)
    assert is_tb and excerpt[0] == "[rank0]: Traceback (most recent call last):"
    assert excerpt[-1] == "[rank0]: ValueError: the real reason"
    assert len(excerpt) == cli.TRACEBACK_LINES and "lines left out" in excerpt[1]
    assert cli.failure_excerpt([f"line {i}" for i in range(30)]) == ([f"line {i}" for i in range(15, 30)], False)


def test_pipeline_shows_the_traceback_of_a_failed_stage(tmp_path, monkeypatch, capsys):
    script = ("import sys\nprint('[sft] model: tiny')\nprint('[rank0]: Traceback (most recent call last):')\n"
              "print('[rank0]:   File \"stages/sft.py\", line 7, in run')\nprint('[rank0]: KeyError: the cause')\n"
              "print('[INFO] launcher exits')\nsys.exit(1)")
    fake_stages(monkeypatch, script)
    art = tmp_path / "art"
    assert cli.run_pipeline(str(DEMO), [f"artifact_dir={art}"]) == 1
    out, err = capsys.readouterr()
    assert "pipeline stopped: stage sft failed (exit 1)" in err
    for line in ("[rank0]: Traceback (most recent call last):", 'File "stages/sft.py", line 7, in run', "KeyError: the cause"):
        assert line in err
    assert f"full output: {art / 'logs' / 'sft.log'}" in err
    assert "reward" not in out  # the pipeline stopped


def test_pipeline_does_not_repeat_a_clean_stage_error(tmp_path, monkeypatch, capsys):
    fake_stages(monkeypatch, "import sys; print('noise'); print('[sft] error: a clean message', file=sys.stderr); sys.exit(2)")
    assert cli.run_pipeline(str(DEMO), [f"artifact_dir={tmp_path / 'art'}"]) == 2
    out, err = capsys.readouterr()
    assert out.count("\n   [sft] error: a clean message\n") == 1 and "--- " not in err and "full output:" in err


def test_pipeline_refuses_bad_input_before_the_first_stage(tmp_path, monkeypatch, capsys):
    fake_stages(monkeypatch, "raise SystemExit('a stage must not start')")
    gold = write(tmp_path / "gold.py", "import not_a_module_anywhere\n")
    assert cli.run_pipeline(str(DEMO), [f"artifact_dir={tmp_path / 'art'}", f"eval.gold_scorer={gold}:gold"]) == 2
    out, err = capsys.readouterr()
    assert "error: eval.gold_scorer: importing" in err and "not_a_module_anywhere" in err
    assert "== sft" not in out and not (tmp_path / "art").exists()


# ---------------------------------------------------------------- further bad inputs a new user tries

def test_prompts_file_that_is_a_directory(tmp_path):
    (tmp_path / "prompts").mkdir()
    with pytest.raises(DataError, match="is a directory; give a data file"):
        load_prompts(str(tmp_path / "prompts"))
    with pytest.raises(DataError, match="^ppo.train_prompts: .*is a directory"):
        preflight.check(demo_cfg(tmp_path, f"ppo.train_prompts={tmp_path / 'prompts'}"), ALL)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_or_blank_data_file(tmp_path, content):
    f = write(tmp_path / "d.jsonl", content)
    with pytest.raises(DataError, match="^reward.train_data: .*no rows .*empty, holds only blank lines"):
        preflight.check(demo_cfg(tmp_path, f"reward.train_data={f}"), ALL)


def test_missing_eval_data_is_found_before_any_work(tmp_path):
    with pytest.raises(DataError, match="^sft.eval_data: .*nope.jsonl: file not found"):
        preflight.check(demo_cfg(tmp_path, f"sft.eval_data={tmp_path / 'nope.jsonl'}"), ALL)


def test_unset_training_data_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'ppo.train_prompts' is not set"):
        preflight.check(demo_cfg(tmp_path, "ppo.train_prompts=null"), ALL)


def test_unreadable_parquet_is_a_data_error(tmp_path):
    f = write(tmp_path / "d.parquet", "not parquet")
    with pytest.raises(DataError, match="could not be read as PARQUET"):
        load_preferences(str(f))


def test_yaml_list_directory_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "c.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match="is a directory; give the pipeline YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="override 'ppo.kl_coef=\\[1': the value is not valid YAML"):
        load_config(None, ["ppo.kl_coef=[1"])


@pytest.mark.parametrize("override, key", [
    ("ppo.top_k=-1", "ppo.top_k"), ("model.lora.r=0", "model.lora.r"), ("model.lora.dropout=1", "model.lora.dropout"),
    ("sft.warmup_ratio=-0.1", "sft.warmup_ratio"), ("reward.lr_scheduler=cosin", "reward.lr_scheduler"),
    ("ppo.lam=2", "ppo.lam"), ("ppo.cliprange=0", "ppo.cliprange"),
])
def test_values_that_would_fail_deep_in_training(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("source, message", [
    ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("def gold(:\n", "SyntaxError"),
    ("def other(p, r):\n    return 0.0\n", "has no function 'gold' (it defines other)"),
    ("def gold(p):\n    return 0.0\n", "must take two arguments (prompt, response)"),
])
def test_gold_scorer_that_cannot_be_used(tmp_path, source, message):
    f = write(tmp_path / "g.py", source)
    with pytest.raises(ConfigError) as e:
        preflight.check(demo_cfg(tmp_path, f"eval.gold_scorer={f}:gold"), ALL)
    assert str(e.value).startswith("eval.gold_scorer: ") and message in str(e.value)


def test_gold_scorer_loader_of_the_stages_gives_the_same_errors(tmp_path):
    from rlhf.scoring import load_gold_scorer

    f = write(tmp_path / "g.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigError, match="eval.gold_scorer: importing .* RuntimeError: boom at import"):
        load_gold_scorer(f"{f}:gold")
    assert load_function(f"{REPO / 'reward_data' / 'gold.py'}:gold_score", "eval.gold_scorer")("list fruits", " apple.") == 1.0


def test_gold_scorer_is_checked_for_the_stages_that_use_it(tmp_path):
    f = write(tmp_path / "g.py", "import not_a_module_anywhere\n")
    preflight.check(demo_cfg(tmp_path, f"eval.gold_scorer={f}:gold"), ["sft"])  # SFT does not use it
    with pytest.raises(ConfigError, match="eval.gold_scorer"):
        preflight.check(demo_cfg(tmp_path, f"eval.gold_scorer={f}:gold"), ["sft", "reward"])


# ---------------------------------------------------------------- parents not built in the same run

def publish_fake(art: Path, stage: str, status: str = "complete") -> None:
    """A manifest over a stand-in weights file, its file list sealed, its parents those in `art`."""
    from rlhf import artifacts

    write(art / stage / "model.safetensors", "w")
    files = artifacts.file_checksums(art / stage)
    parents = [{"stage": p, "manifest_sha256": artifacts.sha256_file(art / p / "rlhf_artifact.json")}
               for p in {"reward": ["sft"], "ppo": ["sft", "reward"]}.get(stage, [])
               if (art / p / "rlhf_artifact.json").is_file()]
    write(art / stage / "rlhf_artifact.json", json.dumps({"stage": stage, "status": status, "files": files,
                                                          "files_sha256": artifacts.files_digest(files),
                                                          "parents": parents}))


def test_parents_must_be_complete_when_not_built_in_the_run(tmp_path):
    cfg = demo_cfg(tmp_path)
    art = tmp_path / "art"
    with pytest.raises(ArtifactError, match="no sft artifact"):
        preflight.check(cfg, ["reward"])
    (art / "sft").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="not a complete sft artifact"):
        preflight.check(cfg, ["reward"])
    publish_fake(art, "sft")
    preflight.check(cfg, ["reward"])
    with pytest.raises(ArtifactError, match="no reward artifact"):
        preflight.check(cfg, ["ppo"])
    preflight.check(cfg, ["reward", "ppo"])  # the run builds the reward model itself
    publish_fake(art, "reward", status="running")
    with pytest.raises(ArtifactError, match="status is 'running'"):
        preflight.check(cfg, ["ppo"])


# ---------------------------------------------------------------- imported models (sft/reward.import_model)

def test_imported_models_are_checked_and_their_stage_needs_no_training_data(tmp_path):
    good = model_dir(tmp_path / "m", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                     "model.safetensors", "tokenizer.json")
    # the SFT stage imports: no sft.train_data, no model.name_or_path or model.scratch needed
    preflight.check(load_config(None, [f"artifact_dir={tmp_path / 'art'}", f"sft.import_model={good}"]), ["sft"])
    with pytest.raises(ConfigError, match="sft.import_model=.*does not exist"):
        preflight.check(load_config(None, [f"artifact_dir={tmp_path / 'art'}",
                                           f"sft.import_model={tmp_path / 'no' / 'such'}"]), ["sft"])
    bins = model_dir(tmp_path / "bins", {"model_type": "llama"}, "pytorch_model.bin", "tokenizer.json")
    with pytest.raises(ConfigError, match="reward.import_model="):
        preflight.check(demo_cfg(tmp_path, f"reward.import_model={bins}"), ["sft", "reward"])
    # reward_stats need prompts: the held-out preferences', else PPO's
    with pytest.raises(ConfigError, match="reward.eval_data, else ppo.train_prompts"):
        preflight.check(load_config(None, [f"artifact_dir={tmp_path / 'art'}", f"sft.import_model={good}",
                                           f"reward.import_model={good}"]), ["sft", "reward"])


# ---------------------------------------------------------------- architectures and lengths

def test_models_that_cannot_be_a_policy_are_refused_as_a_class(tmp_path):
    cases = {  # config.json -> what the message must say
        "bert": ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "not a causal LM"),
        "roberta": ({"model_type": "roberta", "architectures": ["RobertaModel"]}, "not a causal LM"),
        "t5": ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
               "encoder-decoder"),
        "rm": ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "not a causal LM"),
    }
    for name, (conf, says) in cases.items():
        d = model_dir(tmp_path / name, conf, "model.safetensors", "tokenizer.json")
        with pytest.raises(ConfigError, match=says):
            preflight.check(sft_only(d, tmp_path), ["sft"])
        with pytest.raises(ConfigError, match=says):
            preflight.check(load_config(None, [f"artifact_dir={tmp_path / 'art'}", f"sft.import_model={d}"]), ["sft"])
    bert = tmp_path / "bert"
    with pytest.raises(ConfigError, match="reward.model=.*reward.import_model"):
        preflight.check(demo_cfg(tmp_path, f"reward.model={bert}"), ["sft", "reward"])
    cls = model_dir(tmp_path / "cls", {"model_type": "deberta-v2", "architectures": ["DebertaV2ForSequenceClassification"]},
                    "model.safetensors", "tokenizer.json")
    preflight.check(demo_cfg(tmp_path, f"reward.import_model={cls}", "reward.eval_data=null"), ["sft", "reward"])
    llama = model_dir(tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                      "model.safetensors", "tokenizer.json")
    preflight.check(sft_only(llama, tmp_path), ["sft"])


def test_sequences_longer_than_the_policy_takes_are_refused_before_any_work(tmp_path):
    d = model_dir(tmp_path / "m", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": 128},
                  "model.safetensors", "tokenizer.json")
    preflight.check(sft_only(d, tmp_path, "sft.max_length=128"), ["sft"])
    with pytest.raises(ConfigError, match=r"sft.max_length = 256 tokens, but the policy takes at most 128 "
                                          r"\(model.name_or_path=.*config.json"):
        preflight.check(sft_only(d, tmp_path, "sft.max_length=256"), ["sft"])
    with pytest.raises(ConfigError, match=r"ppo.max_prompt_length \+ ppo.max_new_tokens = 300 tokens.*at most 128 "
                                          r"\(model.scratch.max_position_embeddings\)"):
        preflight.check(demo_cfg(tmp_path, "ppo.max_prompt_length=200", "ppo.max_new_tokens=100"), ALL)


# ---------------------------------------------------------------- model.quantization=4bit (QLoRA)

def test_quantization_needs_lora_in_each_stage_that_trains_and_a_pretrained_base(tmp_path):
    model = model_dir(tmp_path / "m", {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                       "max_position_embeddings": 512}, "model.safetensors", "tokenizer.json")
    base = [f"model.name_or_path={model}", "model.scratch=null", "model.quantization=4bit"]
    with pytest.raises(ConfigError, match=r"reward\.lora and ppo\.lora are false .*set reward\.lora=true ppo\.lora=true"):
        preflight.check(demo_cfg(tmp_path, *base, "sft.lora=true"), ALL)
    with pytest.raises(ConfigError, match=r"sft\.lora is false"):
        preflight.check(demo_cfg(tmp_path, *base), ["sft"])
    # a stage not run, or an imported model, trains nothing and needs no LoRA
    preflight.check(demo_cfg(tmp_path, *base, "sft.lora=true"), ["sft"])
    preflight.check(demo_cfg(tmp_path, *base, f"sft.import_model={model}", "reward.lora=true", "ppo.lora=true"), ALL)
    with pytest.raises(ConfigError, match=r"needs a pretrained base \(model\.name_or_path\)"):
        preflight.check(demo_cfg(tmp_path, "model.quantization=4bit", "sft.lora=true"), ["sft"])
    assert list(tmp_path.iterdir()) == [tmp_path / "m"]  # nothing created
