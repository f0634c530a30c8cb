"""Artifact directory: atomic publish, refusing bad artifacts, up-to-date checks, checkpoints, state."""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest

from rlhf import artifacts as A
from rlhf.artifacts import MANIFEST, PPO, REWARD, SFT, ArtifactError
from rlhf.config import PipelineConfig

TOK_FP = {"vocab_sha256": "aaa", "vocab_size": 3, "special_token_ids": {"pad": None, "eos": 2, "bos": None, "unk": 0},
          "chat_template_sha256": None}


def config() -> dict:
    return PipelineConfig().to_dict()


def stage_files(root: Path, stage: str, text: str = "weights") -> Path:
    staged = A.staging_dir(root, stage)
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_text(text)
    return staged


def publish(root: Path, stage: str, cfg: dict | None = None, parents: list | None = None,
            text: str = "weights", tok: dict | None = None, metrics: dict | None = None, **extra) -> A.Artifact:
    manifest = A.build_manifest(stage, cfg if cfg is not None else config(), parents or [], tok or TOK_FP,
                                data={}, metrics=metrics or {"loss": 0.5}, clock=A.StageClock(None, time.time()), **extra)
    return A.publish(root, stage, stage_files(root, stage, text), manifest)


# ---------------------------------------------------------------- publish

def test_publish_puts_complete_dir_in_place(tmp_path):
    art = publish(tmp_path, SFT)
    final = tmp_path / "sft"
    assert art.path == final and art.stage == SFT
    assert (final / MANIFEST).is_file()
    assert (final / "model.safetensors").read_text() == "weights"
    assert not A.staging_dir(tmp_path, SFT).exists()
    assert not (final / (MANIFEST + ".part")).exists()
    m = json.loads((final / MANIFEST).read_text())
    assert m["stage"] == SFT and m["status"] == "complete" and m["metrics"] == {"loss": 0.5}
    assert m["tokenizer"] == TOK_FP and m["parents"] == []
    for key in ("created", "config", "data", "versions", "git_commit"):
        assert key in m
    assert A.load(final, SFT).metrics == {"loss": 0.5}


def test_publish_replaces_previous_artifact(tmp_path):
    publish(tmp_path, SFT, text="old")
    (tmp_path / "sft" / "stale_extra_file").write_text("x")
    publish(tmp_path, SFT, text="new")
    final = tmp_path / "sft"
    assert (final / "model.safetensors").read_text() == "new"
    assert not (final / "stale_extra_file").exists()
    # nothing but the published dir is left behind (no staging or .old-* siblings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_manifest_is_in_place_before_the_final_rename(tmp_path, monkeypatch):
    staged = stage_files(tmp_path, SFT)
    seen = []
    real_replace = A.os.replace

    def spy(src, dst):
        if Path(src) == staged:
            seen.append((staged / MANIFEST).is_file())
        return real_replace(src, dst)

    monkeypatch.setattr(A.os, "replace", spy)
    A.publish(tmp_path, SFT, staged, {"stage": SFT, "status": "complete"})
    assert seen == [True]


def test_failed_rename_never_leaves_a_partial_stage_dir(tmp_path, monkeypatch):
    publish(tmp_path, SFT, text="old")
    staged = stage_files(tmp_path, SFT, "new")
    real_replace = A.os.replace

    def failing(src, dst):
        if Path(src) == staged:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(A.os, "replace", failing)
    with pytest.raises(OSError):
        A.publish(tmp_path, SFT, staged, {"stage": SFT, "status": "complete"})
    monkeypatch.undo()
    # DIR/sft is either absent or a complete artifact, never a half-written one
    final = tmp_path / "sft"
    assert not final.exists() or A.load(final, SFT).stage == SFT
    # and the next publish succeeds
    A.publish(tmp_path, SFT, staged, {"stage": SFT, "status": "complete"})
    assert (final / "model.safetensors").read_text() == "new"


# ---------------------------------------------------------------- load refuses bad artifacts

def test_load_missing_dir(tmp_path):
    with pytest.raises(ArtifactError) as e:
        A.load(tmp_path / "sft", SFT)
    assert str(tmp_path / "sft") in str(e.value)
    assert "launch/sft.py" in str(e.value)


def test_load_dir_without_manifest(tmp_path):
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "model.safetensors").write_text("half written")
    with pytest.raises(ArtifactError) as e:
        A.load(tmp_path / "reward", REWARD)
    assert MANIFEST in str(e.value)
    assert "launch/rm.py" in str(e.value)


def test_load_unreadable_manifest(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / MANIFEST).write_text("{truncated")
    with pytest.raises(ArtifactError, match="launch/sft.py"):
        A.load(tmp_path / "sft", SFT)


def test_load_incomplete_status(tmp_path):
    publish(tmp_path, SFT)
    m = json.loads((tmp_path / "sft" / MANIFEST).read_text())
    m["status"] = "partial"
    (tmp_path / "sft" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        A.load(tmp_path / "sft", SFT)
    assert "'partial'" in str(e.value) and "launch/sft.py" in str(e.value)


def test_load_wrong_stage(tmp_path):
    publish(tmp_path, SFT)
    with pytest.raises(ArtifactError) as e:
        A.load(tmp_path / "sft", REWARD)
    msg = str(e.value)
    assert "'sft'" in msg and "'reward'" in msg and "launch/rm.py" in msg


def test_load_tokenizer_mismatch(tmp_path):
    publish(tmp_path, SFT)
    other = copy.deepcopy(TOK_FP)
    other["vocab_sha256"] = "bbb"
    other["special_token_ids"]["pad"] = 2
    with pytest.raises(ArtifactError) as e:
        A.load(tmp_path / "sft", SFT, tokenizer_fp=other)
    msg = str(e.value)
    assert "special_token_ids, vocab_sha256 differ" in msg
    assert "launch/sft.py" in msg and "rebuild" in msg
    assert A.load(tmp_path / "sft", SFT, tokenizer_fp=copy.deepcopy(TOK_FP)).stage == SFT


def test_tokenizer_fingerprint_tracks_vocab_specials_and_template():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def tok(vocab, template=None, pad=None):
        t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                    unk_token="[UNK]", eos_token="<eos>", pad_token=pad)
        t.chat_template = template
        return t

    vocab = {"[UNK]": 0, "<eos>": 1, "hi": 2}
    base = A.tokenizer_fingerprint(tok(vocab))
    assert base == A.tokenizer_fingerprint(tok(dict(vocab)))
    assert base["vocab_size"] == 3
    assert base["special_token_ids"] == {"pad": None, "eos": 1, "bos": None, "unk": 0}
    assert base["chat_template_sha256"] is None
    assert A.tokenizer_fingerprint(tok({**vocab, "yo": 3}))["vocab_sha256"] != base["vocab_sha256"]
    assert A.tokenizer_fingerprint(tok(vocab, template="{{ x }}"))["chat_template_sha256"] is not None
    assert A.tokenizer_fingerprint(tok(vocab, pad="<eos>"))["special_token_ids"]["pad"] == 1


# ---------------------------------------------------------------- is_up_to_date

def test_up_to_date_same_config_and_parents(tmp_path):
    cfg = config()
    sft = publish(tmp_path, SFT, cfg)
    assert A.is_up_to_date(tmp_path, SFT, cfg, [])
    rm = publish(tmp_path, REWARD, cfg, parents=[sft])
    assert A.is_up_to_date(tmp_path, REWARD, cfg, [A.load(tmp_path / "sft", SFT)])
    assert rm.manifest["parents"][0]["stage"] == SFT


def test_not_up_to_date_when_stage_key_changes(tmp_path):
    cfg = config()
    publish(tmp_path, SFT, cfg)
    changed = copy.deepcopy(cfg)
    changed["sft"]["learning_rate"] = 1e-4
    assert not A.is_up_to_date(tmp_path, SFT, changed, [])
    seed = copy.deepcopy(cfg)
    seed["seed"] = 1
    assert not A.is_up_to_date(tmp_path, SFT, seed, [])
    # keys of later stages (and bookkeeping like run_name/force) do not invalidate SFT
    later = copy.deepcopy(cfg)
    later["ppo"]["kl_coef"] = 0.5
    later["reward"]["epochs"] = 3.0
    later["run_name"] = "other"
    later["force"] = True
    assert A.is_up_to_date(tmp_path, SFT, later, [])


def _moved_inputs(root: Path) -> dict:
    """A config whose inputs (data, a gold scorer, a local model directory) lie under `root`."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (root / "data" / "gold.py").write_text("def score(p, r):\n    return 0.0\n")
    (root / "base").mkdir()
    (root / "base" / "config.json").write_text('{"model_type": "llama"}')
    cfg = config()
    cfg["sft"]["train_data"] = str(root / "data" / "train.jsonl")
    cfg["eval"]["gold_scorer"] = str(root / "data" / "gold.py") + ":score"
    cfg["model"]["name_or_path"] = str(root / "base")
    return cfg


def test_up_to_date_after_moving_checkout_data_and_artifact_dir(tmp_path):
    """Up to date is decided by content: the same files and artifacts under other paths skip."""
    cfg = _moved_inputs(tmp_path / "old")
    data = A.data_fingerprint({"train_data": cfg["sft"]["train_data"]})
    manifest = A.build_manifest(SFT, cfg, [], TOK_FP, data=data, metrics={}, clock=A.StageClock(None, time.time()))
    sft = A.publish(tmp_path / "old" / "art", SFT, stage_files(tmp_path / "old" / "art", SFT), manifest)
    publish(tmp_path / "old" / "art", PPO, cfg, parents=[sft])
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    shutil.rmtree(tmp_path / "old")
    moved = _moved_inputs(tmp_path / "fresh")  # the keys as a config in the new place resolves them
    for key, value in (("sft", "train_data"), ("eval", "gold_scorer"), ("model", "name_or_path")):
        moved[key][value] = cfg[key][value].replace(str(tmp_path / "old"), str(tmp_path / "new"))
    new_data = A.data_fingerprint({"train_data": moved["sft"]["train_data"]})
    art = tmp_path / "new" / "art"
    assert A.why_rebuild(art, SFT, moved, [], new_data) == []
    assert A.why_rebuild(art, PPO, moved, [A.load(art / "sft", SFT)]) == []
    # a changed file under the same name is a change, named by its key
    (tmp_path / "new" / "data" / "gold.py").write_text("def score(p, r):\n    return 1.0\n")
    reasons = A.why_rebuild(art, PPO, moved, [A.load(art / "sft", SFT)])
    assert len(reasons) == 1 and reasons[0].startswith("eval.gold_scorer: file ") and reasons[0].endswith(":score")
    (tmp_path / "new" / "base" / "config.json").write_text('{"model_type": "qwen2"}')
    (tmp_path / "new" / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "c"}\n')
    changed = A.data_fingerprint({"train_data": moved["sft"]["train_data"]})
    reasons = A.why_rebuild(art, SFT, moved, [], changed)
    assert [r.split(":")[0] for r in reasons] == ["model.name_or_path", "sft.train_data"], reasons
    # the checkpoints of an interrupted run are kept across a move too (same identity)
    assert A.sha256_json(A.stage_identity(cfg, SFT, data)) != A.sha256_json(A.stage_identity(moved, SFT, changed))


def test_why_rebuild_names_the_key_and_the_parent(tmp_path):
    cfg = config()
    assert A.why_rebuild(tmp_path, SFT, cfg, []) == ["not built yet"]
    sft = publish(tmp_path, SFT, cfg)
    publish(tmp_path, REWARD, cfg, parents=[sft])
    changed = copy.deepcopy(cfg)
    changed["sft"]["learning_rate"] = 1e-4
    assert A.why_rebuild(tmp_path, SFT, changed, []) == [f"sft.learning_rate: {cfg['sft']['learning_rate']} -> 0.0001"]
    sft2 = publish(tmp_path, SFT, cfg, text="other weights")
    assert A.why_rebuild(tmp_path, REWARD, cfg, [sft2]) == ["its parent sft was rebuilt since"]


def test_manifest_of_an_older_version_is_compared_with_paths(tmp_path):
    cfg = config()
    publish(tmp_path, SFT, cfg)
    m = json.loads((tmp_path / "sft" / MANIFEST).read_text())
    del m["identity"]
    (tmp_path / "sft" / MANIFEST).write_text(json.dumps(m))
    assert A.why_rebuild(tmp_path, SFT, cfg, []) == []
    changed = copy.deepcopy(cfg)
    changed["sft"]["train_data"] = "/elsewhere/train.jsonl"
    assert A.why_rebuild(tmp_path, SFT, changed, [])[0].startswith("the stage config differs")


def test_reward_stale_when_sft_key_or_parent_changes(tmp_path):
    cfg = config()
    sft = publish(tmp_path, SFT, cfg)
    publish(tmp_path, REWARD, cfg, parents=[sft])
    changed = copy.deepcopy(cfg)
    changed["sft"]["epochs"] = 5.0
    assert not A.is_up_to_date(tmp_path, REWARD, changed, [sft])
    # a rebuilt SFT artifact (new manifest) makes the reward model stale
    new_sft = publish(tmp_path, SFT, cfg, text="retrained", metrics={"loss": 0.4})
    assert not A.is_up_to_date(tmp_path, REWARD, cfg, [new_sft])
    assert not A.is_up_to_date(tmp_path, REWARD, cfg, [])


@pytest.mark.parametrize("key,value", [("temperature", 0.7), ("top_k", 20), ("top_p", 0.9), ("max_new_tokens", 48),
                                       ("max_prompt_length", 128)])
def test_reward_stats_stale_when_ppo_sampling_changes(tmp_path, key, value):
    """reward_stats are measured by sampling as PPO samples: a change there re-runs the RM stage,
    while a PPO key that does not shape the samples (kl_coef) does not."""
    cfg = config()
    sft = publish(tmp_path, SFT, cfg)
    publish(tmp_path, REWARD, cfg, parents=[sft])
    changed = copy.deepcopy(cfg)
    changed["ppo"][key] = value
    assert not A.is_up_to_date(tmp_path, REWARD, changed, [sft])
    other = copy.deepcopy(cfg)
    other["ppo"]["kl_coef"] = 0.3
    assert A.is_up_to_date(tmp_path, REWARD, other, [sft])


def test_not_up_to_date_when_an_input_file_changes(tmp_path):
    cfg = config()
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n')
    data = A.data_fingerprint({"train_data": str(train)})
    manifest = A.build_manifest(SFT, cfg, [], TOK_FP, data=data, metrics={}, clock=A.StageClock(None, time.time()))
    A.publish(tmp_path, SFT, stage_files(tmp_path, SFT, "weights"), manifest)
    assert A.is_up_to_date(tmp_path, SFT, cfg, [], A.data_fingerprint({"train_data": str(train)}))
    train.write_text('{"prompt": "a", "completion": "c"}\n')  # same path, new contents
    assert not A.is_up_to_date(tmp_path, SFT, cfg, [], A.data_fingerprint({"train_data": str(train)}))
    # and checkpoints of a run on the old file are not resumed
    A.prepare_checkpoints(tmp_path, SFT, cfg, data)
    assert A.prepare_checkpoints(tmp_path, SFT, cfg, data)[1]
    assert not A.prepare_checkpoints(tmp_path, SFT, cfg, A.data_fingerprint({"train_data": str(train)}))[1]


def test_not_up_to_date_when_missing_or_incomplete(tmp_path):
    cfg = config()
    assert not A.is_up_to_date(tmp_path, SFT, cfg, [])
    publish(tmp_path, SFT, cfg)
    m = json.loads((tmp_path / "sft" / MANIFEST).read_text())
    m["status"] = "running"
    (tmp_path / "sft" / MANIFEST).write_text(json.dumps(m))
    assert not A.is_up_to_date(tmp_path, SFT, cfg, [])


def test_stage_config_keys():
    cfg = config()
    assert set(A.stage_config(cfg, SFT)) == {"seed", "model", "deepspeed", "sft"}
    assert set(A.stage_config(cfg, REWARD)) == {"seed", "model", "deepspeed", "sft", "reward", "ppo_sampling"}
    assert set(A.stage_config(cfg, PPO)) == {"seed", "model", "deepspeed", "sft", "reward", "ppo", "eval"}


def test_vllm_settings_that_shape_ppo_are_part_of_its_stage_config():
    """With the vllm engine, its precision, pi_old source and importance cap change PPO's result (rerun,
    no resume); its memory settings do not; with the hf engine the vllm section plays no part."""
    from rlhf.config import load_config

    def ppo(*overrides):
        return A.sha256_json(A.stage_config(load_config(None, list(overrides)).to_dict(), PPO))

    assert ppo() == ppo("vllm.old_logprobs=engine")  # hf engine: the vllm section is not read
    base = ppo("ppo.rollout_engine=vllm")
    assert base != ppo()
    assert base == ppo("ppo.rollout_engine=vllm", "vllm.kv_cache_gb=4", "vllm.enforce_eager=false")
    for key in ("vllm.old_logprobs=engine", "vllm.importance_cap=2", "vllm.dtype=bfloat16"):
        assert base != ppo("ppo.rollout_engine=vllm", key), key
    old_manifest = {k: v for k, v in load_config(None, []).to_dict().items() if k != "vllm"}  # written before vllm
    assert A.stage_config(old_manifest, PPO) == A.stage_config(load_config(None, []).to_dict(), PPO)


# ---------------------------------------------------------------- checkpoints

def test_prepare_checkpoints_resume_and_discard(tmp_path):
    cfg = config()
    ckpt, resuming = A.prepare_checkpoints(tmp_path, SFT, cfg)
    assert ckpt == tmp_path / "checkpoints" / "sft" and ckpt.is_dir() and not resuming
    (ckpt / "global_step50").mkdir()
    ckpt2, resuming = A.prepare_checkpoints(tmp_path, SFT, cfg)
    assert ckpt2 == ckpt and resuming and (ckpt / "global_step50").is_dir()
    changed = copy.deepcopy(cfg)
    changed["sft"]["batch_size"] = 8
    ckpt3, resuming = A.prepare_checkpoints(tmp_path, SFT, changed)
    assert not resuming and ckpt3.is_dir() and not (ckpt3 / "global_step50").exists()
    # the new config's marker is now in place: the same changed config resumes
    assert A.prepare_checkpoints(tmp_path, SFT, changed)[1]


def test_prepare_checkpoints_without_marker_is_discarded(tmp_path):
    ckpt = A.checkpoint_dir(tmp_path, REWARD)
    (ckpt / "global_step1").mkdir(parents=True)
    _, resuming = A.prepare_checkpoints(tmp_path, REWARD, config())
    assert not resuming and not (ckpt / "global_step1").exists()


def test_prepare_checkpoints_ignores_other_stages_keys(tmp_path):
    cfg = config()
    ckpt, _ = A.prepare_checkpoints(tmp_path, SFT, cfg)
    (ckpt / "global_step50").mkdir()
    later = copy.deepcopy(cfg)
    later["ppo"]["kl_coef"] = 0.5
    assert A.prepare_checkpoints(tmp_path, SFT, later)[1]
    assert (ckpt / "global_step50").is_dir()


# ---------------------------------------------------------------- stage_state

def test_stage_state(tmp_path):
    assert A.stage_state(tmp_path, SFT) == "missing"
    A.checkpoint_dir(tmp_path, SFT).mkdir(parents=True)
    assert A.stage_state(tmp_path, SFT) == "missing"  # an empty checkpoint dir is nothing to resume
    (A.checkpoint_dir(tmp_path, SFT) / "global_step10").mkdir()
    assert A.stage_state(tmp_path, SFT) == "partial"
    publish(tmp_path, SFT)
    assert A.stage_state(tmp_path, SFT) == "complete"

    (tmp_path / "reward").mkdir()  # a directory without a manifest
    assert A.stage_state(tmp_path, REWARD) == "partial"
    assert A.stage_state(tmp_path, PPO) == "missing"


def test_stage_state_wrong_stage_in_manifest(tmp_path):
    publish(tmp_path, SFT)
    (tmp_path / "sft").rename(tmp_path / "reward")
    assert A.stage_state(tmp_path, REWARD) == "partial"


# ---------------------------------------------------------------- helpers

def test_layout_and_fingerprints(tmp_path):
    assert A.stage_dir(tmp_path, PPO) == tmp_path / "ppo"
    assert A.metrics_path(tmp_path, REWARD) == tmp_path / "metrics" / "reward.jsonl"
    f = tmp_path / "d.jsonl"
    f.write_text("abc")
    # sha256("abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert A.sha256_file(f) == expected
    assert A.data_fingerprint({"train": str(f), "eval": None, "hub": "org/name"}) == {
        "train": {"path": str(f), "sha256": expected},
        "hub": {"path": "org/name", "sha256": None},
    }
    assert A.sha256_json({"a": 1, "b": 2}) == A.sha256_json({"b": 2, "a": 1})


def _hf_checkpoint(ckpt: Path, step: int, sealed: bool = True) -> Path:
    p = ckpt / f"checkpoint-{step}"
    (p / "global_step").mkdir(parents=True)
    (p / "trainer_state.json").write_text("{}")
    (p / "global_step" / "optim_states.pt").write_bytes(b"x" * 100)
    if sealed:
        A.write_durably(p / A.CKPT_SEAL, json.dumps({"files": A.seal(p, [p])}))
    return p


def test_resume_point_trusts_only_sealed_checkpoints_and_falls_back_past_a_torn_one(tmp_path):
    assert A.resume_point(tmp_path, PPO) is None
    ckpt = A.checkpoint_dir(tmp_path, SFT)
    _hf_checkpoint(ckpt, 20)
    (ckpt / "checkpoint-40").mkdir()  # not written completely (no trainer_state.json): ignored
    assert A.resume_point(tmp_path, SFT) == "step 20"
    assert A.stage_state(tmp_path, SFT) == "partial"
    _hf_checkpoint(ckpt, 60, sealed=False)  # the save was interrupted before its seal
    assert A.resume_point(tmp_path, SFT) == "step 20"
    torn = _hf_checkpoint(ckpt, 80)
    assert A.resume_point(tmp_path, SFT) == "step 80"
    (torn / "global_step" / "optim_states.pt").write_bytes(b"")  # what a crash before the flush leaves
    assert A.resume_point(tmp_path, SFT) == "step 20"
    assert A.damaged_checkpoints(tmp_path, SFT) == [
        "checkpoint-60: no seal (written by an interrupted save, or by an older version)",
        "checkpoint-80: global_step/optim_states.pt has 0 bytes, 100 were written"]

    ppo = A.checkpoint_dir(tmp_path, PPO)
    (ppo / "actor" / "update-5").mkdir(parents=True)
    (ppo / "stage_config.json").write_text("{}")
    assert A.resume_point(tmp_path, PPO) is None and A.stage_state(tmp_path, PPO) == "partial"
    (ppo / "actor" / "update-5" / "model.pt").write_bytes(b"y" * 10)
    (ppo / "state.prev.json").write_text(json.dumps({"update": 5, "files": A.seal(ppo, [ppo / "actor" / "update-5"])}))
    (ppo / "actor" / "update-10").mkdir()
    (ppo / "actor" / "update-10" / "model.pt").write_bytes(b"z" * 10)
    (ppo / "state.json").write_text(json.dumps({"update": 10, "files": A.seal(ppo, [ppo / "actor" / "update-10"])}))
    assert A.resume_point(tmp_path, PPO) == "update 10"
    (ppo / "actor" / "update-10" / "model.pt").unlink()
    assert A.resume_point(tmp_path, PPO) == "update 5"
    assert A.damaged_checkpoints(tmp_path, PPO) == ["state.json: actor/update-10/model.pt is missing"]
    (ppo / "actor" / "update-5" / "model.pt").write_bytes(b"")
    assert A.resume_point(tmp_path, PPO) is None


def test_a_reward_model_built_on_another_sft_artifact_is_refused_by_ppo_run_alone(tmp_path):
    from rlhf import preflight

    sft = publish(tmp_path, SFT)
    rm = publish(tmp_path, REWARD, parents=[sft])
    A.check_lineage(rm, sft)
    preflight.check_parents(str(tmp_path), [PPO])
    sft2 = publish(tmp_path, SFT, text="retrained")  # SFT rebuilt; the reward model was not
    with pytest.raises(ArtifactError, match="was built from another sft artifact"):
        A.check_lineage(A.load(rm.path, REWARD), sft2)
    with pytest.raises(ArtifactError, match=r"was built from another sft artifact .*rebuild it"):
        preflight.check_parents(str(tmp_path), [PPO])
    orphan = publish(tmp_path, REWARD)  # no parents recorded at all
    with pytest.raises(ArtifactError, match="lists no parent of that stage"):
        A.check_lineage(orphan, sft2)


def test_a_hub_model_counts_by_the_commit_its_cache_holds(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert A.content_id("org/model") == "org/model"  # not fetched yet: as given
    ref = tmp_path / "hub" / "models--org--model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("abc123\n")
    assert A.content_id("org/model") == "org/model@abc123"
    ref.write_text("def456")  # the model moved on the hub and was fetched again
    cfg = config()
    cfg["model"]["name_or_path"] = "org/model"
    assert A.stage_identity(cfg, SFT)["config"]["model"]["name_or_path"] == "org/model@def456"
