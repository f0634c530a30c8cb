"""Config loading: strict keys, type coercion, path resolution, cross-field checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import ConfigError, PipelineConfig, describe, load_config, require

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml")) + sorted((REPO / "launch" / "configs").glob("*.yml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- unknown keys

def test_typo_override_names_key_and_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["sft.learnin_rate=1e-4"])
    msg = str(e.value)
    assert "sft.learnin_rate" in msg
    assert "sft.learning_rate" in msg


def test_typo_in_yaml_names_key_and_suggestion(tmp_path):
    cfg = write(tmp_path / "c.yaml", "ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "ppo.kl_coeff" in str(e.value)
    assert "ppo.kl_coef" in str(e.value)


def test_unknown_section_override():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.lr=1"])
    assert "'trainer'" in str(e.value)


def test_unknown_section_in_yaml_suggests_closest(tmp_path):
    cfg = write(tmp_path / "c.yaml", "rewards:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "'rewards'" in str(e.value)
    assert "'reward'" in str(e.value)


def test_unknown_nested_key_in_scratch_section(tmp_path):
    cfg = write(tmp_path / "c.yaml", "model:\n  scratch:\n    hiden_size: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "model.scratch.hiden_size" in str(e.value)
    assert "model.scratch.hidden_size" in str(e.value)


def test_value_is_not_a_section():
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(None, ["seed.x=1"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["ppo.kl_coef"])


# ---------------------------------------------------------------- types

def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as the string "1e-4"
    cfg = write(tmp_path / "c.yaml", "sft:\n  learning_rate: 1e-4\nppo:\n  target_kl: 6e-2\n")
    c = load_config(cfg)
    assert c.sft.learning_rate == pytest.approx(1e-4)
    assert isinstance(c.sft.learning_rate, float)
    assert c.ppo.target_kl == pytest.approx(0.06)


def test_override_exponent_is_a_float():
    c = load_config(None, ["sft.learning_rate=1e-4", "ppo.kl_coef=2"])
    assert c.sft.learning_rate == pytest.approx(1e-4)
    assert c.ppo.kl_coef == 2.0 and isinstance(c.ppo.kl_coef, float)


@pytest.mark.parametrize("override, key, what", [
    ("sft.batch_size=abc", "sft.batch_size", "integer"),
    ("sft.batch_size=2.5", "sft.batch_size", "integer"),
    ("sft.batch_size=true", "sft.batch_size", "integer"),
    ("sft.packing=3", "sft.packing", "true or false"),
    ("sft.learning_rate=fast", "sft.learning_rate", "number"),
    ("ppo.target_kl=big", "ppo.target_kl", "number"),
    ("model.lora.target_modules=3", "model.lora.target_modules", "list"),
])
def test_wrong_type_names_key(override, key, what):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)
    assert what in str(e.value)


def test_section_given_a_scalar(tmp_path):
    cfg = write(tmp_path / "c.yaml", "sft: 3\n")
    with pytest.raises(ConfigError, match="sft"):
        load_config(cfg)


def test_integral_float_becomes_int_and_null_unsets():
    c = load_config(None, ["sft.batch_size=8.0", "ppo.missing_eos_penalty=null", "model.lora.target_modules=all-linear"])
    assert c.sft.batch_size == 8 and isinstance(c.sft.batch_size, int)
    assert c.ppo.missing_eos_penalty is None
    assert c.model.lora.target_modules == ["all-linear"]


@pytest.mark.parametrize("override, key", [
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("model.dtype=fp16", "model.dtype"),
    ("reward.pair_weighting=per_pair", "reward.pair_weighting"),
    ("ppo.kl_estimator=k4", "ppo.kl_estimator"),
    ("ppo.temperature=0", "ppo.temperature"),
    ("ppo.target_kl=0", "ppo.target_kl"),
    ("sft.learning_rate=0", "sft.learning_rate"),
    ("reward.batch_size=-1", "reward.batch_size"),
])
def test_invalid_values_rejected_naming_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_mini_batch_must_divide_rollout_batch():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.rollout_batch_size=32", "ppo.mini_batch_size=12"])
    assert "ppo.mini_batch_size" in str(e.value)
    assert "rollout_batch_size=32" in str(e.value)
    c = load_config(None, ["ppo.rollout_batch_size=48", "ppo.mini_batch_size=12"])
    assert (c.ppo.rollout_batch_size, c.ppo.mini_batch_size) == (48, 12)


def test_grad_accum_must_divide_mini_batch():
    with pytest.raises(ConfigError, match="ppo.grad_accum"):
        load_config(None, ["ppo.mini_batch_size=16", "ppo.grad_accum=3"])


def test_defaults_and_overrides_win_over_yaml(tmp_path):
    cfg = write(tmp_path / "c.yaml", "seed: 3\nppo:\n  kl_coef: 0.2\n")
    c = load_config(cfg, ["ppo.kl_coef=0.1"])
    assert c.seed == 3
    assert c.ppo.kl_coef == pytest.approx(0.1)
    assert c.ppo.rollout_batch_size == PipelineConfig().ppo.rollout_batch_size
    assert load_config(None) == PipelineConfig()


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "")) == PipelineConfig()


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "l.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "sft: [unclosed\n"))


# ---------------------------------------------------------------- paths

def test_yaml_paths_resolve_against_yaml_dir_overrides_against_cwd(tmp_path, monkeypatch):
    cfg = write(tmp_path / "configs" / "c.yaml",
                "artifact_dir: ../arts\n"
                "sft:\n  train_data: data/sft.jsonl\n"
                "eval:\n  gold_scorer: ../scorers/gold.py:score\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    c = load_config(cfg, ["sft.eval_data=data/sft_eval.jsonl", "reward.train_data=./prefs"])
    base = (tmp_path / "configs").resolve()
    assert c.sft.train_data == str(base / "data" / "sft.jsonl")
    assert c.artifact_dir == str((tmp_path / "arts").resolve())
    assert c.eval.gold_scorer == str((tmp_path / "scorers" / "gold.py").resolve()) + ":score"
    assert c.sft.eval_data == str(cwd.resolve() / "data" / "sft_eval.jsonl")
    assert c.reward.train_data == str(cwd.resolve() / "prefs")


def test_absolute_and_existing_paths(tmp_path, monkeypatch):
    (tmp_path / "mydata").mkdir()
    monkeypatch.chdir(tmp_path)
    c = load_config(None, ["sft.train_data=/abs/x.jsonl", "reward.train_data=mydata"])
    assert c.sft.train_data == "/abs/x.jsonl"
    # an existing local directory is a path even though it looks like a hub name
    assert c.reward.train_data == str((tmp_path / "mydata").resolve())


def test_hub_ids_stay_untouched(tmp_path, monkeypatch):
    cfg = write(tmp_path / "c.yaml",
                "model:\n  name_or_path: EleutherAI/pythia-70m\n"
                "reward:\n  train_data: Anthropic/hh-rlhf\n  eval_data: Anthropic/hh-rlhf:test\n  model: org/name\n"
                "sft:\n  train_data: imdb\n")
    monkeypatch.chdir(tmp_path)
    c = load_config(cfg, ["ppo.train_prompts=org/prompts:train"])
    assert c.model.name_or_path == "EleutherAI/pythia-70m"
    assert c.reward.train_data == "Anthropic/hh-rlhf"
    assert c.reward.eval_data == "Anthropic/hh-rlhf:test"
    assert c.reward.model == "org/name"
    assert c.sft.train_data == "imdb"
    assert c.ppo.train_prompts == "org/prompts:train"


# ---------------------------------------------------------------- shipped configs

def test_demo_config_parses():
    c = load_config(REPO / "launch" / "configs" / "demo.yaml")
    assert c.model.scratch is not None and c.model.name_or_path is None
    assert c.sft.learning_rate == pytest.approx(3e-3)
    assert Path(c.sft.train_data) == (REPO / "reward_data" / "demo" / "sft_train.jsonl").resolve()
    assert Path(c.sft.train_data).is_file()
    assert Path(c.reward.train_data).is_file() and Path(c.ppo.train_prompts).is_file()
    assert c.eval.gold_scorer == str((REPO / "reward_data" / "gold.py").resolve()) + ":gold_score"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    assert isinstance(load_config(path), PipelineConfig)


# ---------------------------------------------------------------- helpers

def test_require_and_describe():
    with pytest.raises(ConfigError, match=r"sft.train_data.*sft.train_data=\.\.\."):
        require(None, "sft.train_data", "SFT needs data")
    assert require(3, "seed", "x") == 3
    keys = {k for k, _, _ in describe()}
    assert {"ppo.kl_coef", "ppo.target_kl", "model.scratch.vocab_size", "deepspeed.zero_stage", "force"} <= keys
    assert all(h for _, _, h in describe())


@pytest.mark.parametrize("key", ["model.lora.enabled=true"])
def test_keys_without_effect_do_not_exist(key):
    """A key either works or does not exist: LoRA is switched on per stage (sft.lora, reward.lora, ppo.lora)."""
    with pytest.raises(ConfigError, match="unknown config key 'model.lora.enabled'"):
        load_config(None, [key])


def test_eval_max_new_tokens_defaults_to_ppo_and_can_be_set():
    assert load_config(None, []).eval.max_new_tokens is None  # evaluation then uses ppo.max_new_tokens
    assert load_config(None, ["eval.max_new_tokens=7"]).eval.max_new_tokens == 7


@pytest.mark.parametrize("override,key", [("sft.loss_on=every", "sft.loss_on"),
                                          ("reward.max_skipped_fraction=1.5", "reward.max_skipped_fraction"),
                                          ("sft.max_skipped_fraction=-0.1", "sft.max_skipped_fraction")])
def test_new_keys_are_validated(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override,key", [("sft.learning_rate=.nan", "sft.learning_rate"), ("sft.epochs=.inf", "sft.epochs"),
                                          ("ppo.kl_coef=.nan", "ppo.kl_coef"), ("ppo.score_clip=-.inf", "ppo.score_clip")])
def test_non_finite_values_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "': must be a finite number"):
        load_config(None, [override])


def test_vllm_section_is_validated():
    cfg = load_config(None, ["ppo.rollout_engine=vllm", "vllm.kv_cache_gb=0.5", "vllm.old_logprobs=engine"])
    assert cfg.vllm.kv_cache_gb == 0.5 and cfg.vllm.old_logprobs == "engine" and cfg.vllm.importance_cap is None
    for override, message in [("vllm.old_logprobs=vllm", "vllm.old_logprobs.*actor or engine"),
                              ("vllm.gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization.*in \\(0, 1\\]"),
                              ("vllm.importance_cap=0.5", "vllm.importance_cap.*>= 1"),
                              ("vllm.dtype=int8", "vllm.dtype.*float32, bfloat16 or float16"),
                              ("vllm.max_model_len=0", "vllm.max_model_len.*> 0"),
                              ("vllm.kv_cache_gbs=1", "did you mean 'vllm.kv_cache_gb'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="vllm.importance_cap.*needs vllm.old_logprobs=actor"):
        load_config(None, ["vllm.old_logprobs=engine", "vllm.importance_cap=2"])


def test_rlhf_config_lists_keys_and_resolves_a_config(capsys):
    from rlhf import cli

    assert cli.main(["config", "--grep", "kl_coef"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ppo.kl_coef = 0.05\n    beta: weight of the per-token KL penalty")
    demo = str(REPO / "launch" / "configs" / "demo.yaml")
    assert cli.main(["config", demo, "ppo.kl_coef=0.2", "--grep", "ppo.kl_coef"]) == 0
    assert capsys.readouterr().out == "ppo.kl_coef = 0.2   # default 0.05\n"
    assert cli.main(["config", demo, "ppo.kl_coeff=0.2"]) == 2
    assert "did you mean 'ppo.kl_coef'" in capsys.readouterr().err


def test_global_batch_sizes_divide_by_the_process_count():
    from rlhf.config import per_process

    base = ["ppo.rollout_batch_size=16", "ppo.samples_per_prompt=4", "ppo.mini_batch_size=32", "sft.batch_size=32",
            "reward.batch_size=32"]
    per = load_config(None, base)
    assert per_process(per, 2) is per  # per-process sizes (the default) are used as given
    glob = load_config(None, [*base, "deepspeed.global_batch_sizes=true"])
    two = per_process(glob, 2)
    assert (two.sft.batch_size, two.reward.batch_size, two.ppo.rollout_batch_size, two.ppo.mini_batch_size) == (16, 16, 8, 16)
    assert two.ppo.samples_per_prompt == 4 and two.ppo.total_episodes == glob.ppo.total_episodes  # already global
    assert per_process(glob, 1) is glob
    with pytest.raises(ConfigError, match=r"sft.batch_size=32 counts over all processes .* 3 processes"):
        per_process(glob, 3)
    accum = load_config(None, [*base, "deepspeed.global_batch_sizes=true", "ppo.grad_accum=32"])
    with pytest.raises(ConfigError, match=r"ppo.grad_accum=32 must divide the per-process mini-batch"):
        per_process(accum, 2)


def test_a_key_or_section_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("artifact_dir: out\nsft:\n  epochs: 1\n  batch_size: 4\nppo:\n  kl_coef: 0.1\n  kl_coef: 0.2\n")
    with pytest.raises(ConfigError, match=r"key ppo.kl_coef is given twice \(lines 6 and 7\)"):
        load_config(f)
    f.write_text("sft:\n  epochs: 1\n  batch_size: 4\nppo:\n  kl_coef: 0.1\nsft:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"section sft is given twice \(lines 1 and 6\).*fall back to their defaults"):
        load_config(f)
    f.write_text("model:\n  lora:\n    r: 4\n    target_modules: [a, b]\n    r: 8\n")
    with pytest.raises(ConfigError, match=r"key model.lora.r is given twice \(lines 3 and 5\)"):
        load_config(f)
    f.write_text("sft:\n  epochs: 1\nreward:\n  epochs: 1\n")  # the same leaf name in two sections is fine
    assert load_config(f).reward.epochs == 1


def test_a_relative_artifact_dir_means_one_place_wherever_the_config_is_run_from(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "c.yaml").write_text("artifact_dir: runs/first\neval:\n  gold_scorer: lib/gold.py:score\n"
                                 "sft:\n  train_data: org/dataset\n")
    seen = set()
    for cwd in (tmp_path, conf, tmp_path / "elsewhere"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        cfg = load_config(conf / "c.yaml")
        seen.add((cfg.artifact_dir, cfg.eval.gold_scorer))
        assert cfg.sft.train_data == "org/dataset", "a hub id stays a hub id"
    assert seen == {(str(conf / "runs" / "first"), str(conf / "lib" / "gold.py") + ":score")}
    monkeypatch.chdir(tmp_path)  # on the command line: relative to where it is typed
    assert load_config(conf / "c.yaml", ["artifact_dir=out/x"]).artifact_dir == str(tmp_path / "out" / "x")
