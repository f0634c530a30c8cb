"""Every shipped example config (launch/configs/*.yaml but the demo) loads and runs end to end.

The real configs name hub models and hub data sets, which cannot be downloaded here. Each config runs
through `rlhf pipeline` unchanged except for these overrides:
  - `model.name_or_path`: a tiny random-init checkpoint of the same family (tests/families.py);
  - every data key: a few dozen rows written here IN THE SAME LAYOUT as the config's real data set
    (raw HH-RLHF transcripts for Anthropic/hh-rlhf, UltraFeedback-binarized rows, Capybara messages rows),
    made from the demo data in reward_data/demo/;
  - sizes, so that a run takes well under a minute on a CPU (batch sizes, episodes, lengths), float32 (a CPU
    does not train in bfloat16) and no CPU offload;
  - `ppo.keep_best=last` (random-init models: the published policy must be the trained one);
  - `artifact_dir`.
Everything else (LoRA in each stage and its target modules, ZeRO stage, the DeepSpeed JSON preset, learning
rates, PPO epochs, KL settings, the chat-template switch, ...) is the config's own and must reach the manifests.
A new config is covered by adding it to launch/configs/; one that reads a data set with no writer below fails
with a message saying where to add one.

The DeepSpeed presets in launch/ds/ are checked too: their keys must be valid DeepSpeed ZeRO keys and must
not set what rlhf.distributed.deepspeed_config derives from the pipeline config.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, check_published, manifest, ok, run_pipeline
from rlhf.config import DeepSpeedConfig, load_config

pytestmark = pytest.mark.slow

CONFIGS = sorted(p for p in (ROOT / "launch" / "configs").glob("*.yaml") if p.name != "demo.yaml")
PRESETS = sorted((ROOT / "launch" / "ds").glob("*.json"))
DEMO_DATA = ROOT / "reward_data" / "demo"
STAGES = ("sft", "reward", "ppo")

# data key -> (kind of data, held out?, rows written)
DATA_KEYS = {
    "sft.train_data": ("sft", False, 48), "sft.eval_data": ("sft", True, 16),
    "reward.train_data": ("prefs", False, 32), "reward.eval_data": ("prefs", True, 8),
    "ppo.train_prompts": ("prompts", False, 32), "ppo.eval_prompts": ("prompts", True, 8),
}

# Sizes for a CPU: small batches, few episodes, short sequences (the tiny checkpoints have 256 positions).
SIZES = [
    "model.dtype=float32", "deepspeed.offload=false",
    "sft.epochs=1", "sft.batch_size=8", "sft.grad_accum=1", "sft.max_length=128",
    "reward.epochs=1", "reward.batch_size=8", "reward.grad_accum=1", "reward.max_length=128",
    "reward.stats_samples=8",
    "ppo.total_episodes=16", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.grad_accum=2",
    "ppo.max_new_tokens=8", "ppo.max_prompt_length=96", "ppo.forward_batch_size=8",
    "eval.num_prompts=8", "eval.max_new_tokens=8",
    # random-init models: the guard would rightly publish update 0 when no update scores better; these
    # tests check that training reaches the published weights, so the last update is published
    "ppo.keep_best=last",
]

# What the pipeline derives itself; a preset must leave these out (or "auto" where the HF Trainer fills them).
DERIVED_TOP = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"}
DERIVED_ZERO = {"stage", "offload_optimizer", "offload_param", "stage3_gather_16bit_weights_on_model_save"}


def _family(name_or_path: str) -> str:
    name = name_or_path.lower()
    for pattern, family in ((r"pythia|gpt-neox", "pythia"), (r"qwen", "qwen2"), (r"llama", "llama3"),
                            (r"(^|/)opt-", "opt"), (r"(^|/)gpt2", "gpt2")):
        if re.search(pattern, name):
            return family
    pytest.fail(f"no tiny test checkpoint for model {name_or_path!r}; map its family in _family() "
                "(tests/families.py builds gpt2, pythia, qwen2, llama3, opt)")


# ---------------------------------------------------------------- test data in each data set's layout

def _jsonl(name: str) -> list[dict]:
    return [json.loads(x) for x in (DEMO_DATA / name).read_text().splitlines() if x.strip()]


def _demo_pairs(held_out: bool) -> list[tuple[str, str]]:
    """(prompt, reply) of the demo SFT data, replies without their leading space as chat data has them."""
    return [(r["prompt"], r["completion"].strip()) for r in _jsonl("sft_eval.jsonl" if held_out else "sft_train.jsonl")]


def _demo_rankings(held_out: bool) -> list[tuple[str, str, str]]:
    """(prompt, best, worst) of the demo rankings."""
    return [(r["prompt"], r["responses"][0].strip(), r["responses"][-1].strip())
            for r in _jsonl("prefs_eval.jsonl" if held_out else "prefs_train.jsonl")]


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _capybara(kind: str, held_out: bool, n: int) -> list[dict]:
    """trl-lib/Capybara: {"source", "messages": [user, assistant, ...], "num_turns"}; every third row two turns."""
    if kind == "prefs":
        raise ValueError("Capybara holds conversations, not preferences")
    pairs = _demo_pairs(held_out)
    rows = []
    for i in range(n):
        (p0, r0), (p1, r1) = pairs[i], pairs[i + n]
        msgs = [_msg("user", p0), _msg("assistant", r0)]
        if i % 3 == 2:
            msgs = [_msg("user", p1), _msg("assistant", r1)] + msgs
        rows.append({"source": "demo", "messages": msgs, "num_turns": len(msgs) // 2})
    return rows


def _hh(kind: str, held_out: bool, n: int) -> list[dict]:
    """Anthropic/hh-rlhf: raw transcripts {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}."""
    if kind != "prefs":
        raise ValueError("Anthropic/hh-rlhf holds preference transcripts only")
    rows = _jsonl("prefs_hh_eval.jsonl" if held_out else "prefs_hh_train.jsonl")[:n]
    assert all(r["chosen"].startswith("\n\nHuman:") for r in rows)
    return rows


def _ultrafeedback(kind: str, held_out: bool, n: int) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized: every split has the same columns (prompt string, chosen/rejected
    conversations, messages = chosen, scores); the loaders pick theirs."""
    rows = []
    for prompt, best, worst in _demo_rankings(held_out)[:n]:
        chosen = [_msg("user", prompt), _msg("assistant", best)]
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                     "chosen": chosen, "rejected": [_msg("user", prompt), _msg("assistant", worst)],
                     "messages": chosen, "score_chosen": 8.0, "score_rejected": 4.0})
    return rows


WRITERS = {
    "trl-lib/Capybara": _capybara,
    "Anthropic/hh-rlhf": _hh,
    "HuggingFaceH4/ultrafeedback_binarized": _ultrafeedback,
}


def _test_data(config: Path, key: str, source: str, out: Path) -> str:
    """A small file in the layout of `source` (a hub id `name[:split]`, or a local .jsonl file)."""
    kind, held_out, n = DATA_KEYS[key]
    out.parent.mkdir(parents=True, exist_ok=True)
    if Path(source).is_file():
        if Path(source).suffix != ".jsonl":
            pytest.fail(f"{config.name}: {key}={source}: only local .jsonl files can be cut down here")
        lines = [x for x in Path(source).read_text().splitlines() if x.strip()][:n]
        out.write_text("\n".join(lines) + "\n")
        return str(out)
    name = source.partition(":")[0]
    if name not in WRITERS:
        pytest.fail(f"{config.name}: {key}={source}: no test-data writer for the data set {name!r}; add one that "
                    f"writes rows in its layout to WRITERS in {Path(__file__).name}")
    rows = WRITERS[name](kind, held_out, n)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------- tests

def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"pythia-1b-hh-lora.yaml", "qwen2.5-0.5b-ultrafeedback.yaml", "llama-3.2-1b-zero3-8gpu.yaml"} <= names
    assert {"zero2.json", "zero3.json", "zero3_offload.json"} <= {p.name for p in PRESETS}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_real_use(config):
    """Loads as is; hub model; no gold scorer; artifacts under artifacts/; a preset that matches the ZeRO stage."""
    cfg = load_config(config)
    assert cfg.model.name_or_path and cfg.model.scratch is None
    assert cfg.eval.gold_scorer is None
    assert Path(cfg.artifact_dir).parent == ROOT / "artifacts"
    for key in DATA_KEYS:
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field), f"{config.name}: {key} is not set"
    if cfg.deepspeed.config_file:
        preset = Path(cfg.deepspeed.config_file)
        assert preset.is_file(), preset
        assert ("zero3" in preset.name) == (cfg.deepspeed.zero_stage == 3), (preset.name, cfg.deepspeed.zero_stage)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_deepspeed_preset(preset):
    """Valid ZeRO keys (DeepSpeed rejects unknown ones), none of what the pipeline derives, and the preset's
    values survive rlhf.distributed.deepspeed_config's merge, with and without offload."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from rlhf.distributed import deepspeed_config

    base = json.loads(preset.read_text())
    assert not {k for k in base if k in DERIVED_TOP and base[k] != "auto"}, base
    zero = base.get("zero_optimization", {})
    assert not set(zero) & DERIVED_ZERO, zero
    stage = 3 if "zero3" in preset.name else 2
    for offload in (False, True):
        merged = deepspeed_config(DeepSpeedConfig(zero_stage=stage, offload=offload, config_file=str(preset)), "bfloat16")
        z = merged["zero_optimization"]
        assert z["stage"] == stage and bool(z.get("offload_optimizer")) is offload
        assert all(z[k] == v for k, v in zero.items())
        DeepSpeedZeroConfig(**z)  # raises on an unknown key or a bad value


def _run_shipped(config: Path, tmp_path: Path, monkeypatch, family_checkpoints, port: int, extra: list[str] = ()) -> None:
    """Run `config` with the test model, test data and SIZES (then `extra`), and check what it published."""
    cfg = load_config(config)
    d = tmp_path / "run"
    model_dir = family_checkpoints[_family(cfg.model.name_or_path)]
    data = []
    for key in DATA_KEYS:
        section, field = key.split(".")
        source = getattr(getattr(cfg, section), field)
        data.append(f"{key}={_test_data(config, key, source, tmp_path / 'data' / (key + '.jsonl'))}")
    overrides = [f"model.name_or_path={model_dir}", *data, *SIZES, *extra]

    ok(run_pipeline(d, overrides, port=port, config=config))
    check_published(d)

    # the manifests hold this config with exactly these overrides applied ...
    resolved = load_config(config, [f"artifact_dir={d}", *overrides])
    expected = _flat(json.loads(json.dumps(resolved.to_dict())))
    own = _flat(json.loads(json.dumps(cfg.to_dict())))
    overridden = {o.partition("=")[0] for o in ["artifact_dir=", *overrides]}
    for stage in STAGES:
        m = manifest(d, stage)
        got = _flat(m["config"])
        assert got == expected, {k: (got.get(k), expected.get(k)) for k in set(got) | set(expected)
                                 if got.get(k) != expected.get(k)}
        # ... so every key the test did not override is the config's own value
        assert {k: got[k] for k in own if k not in overridden} == {k: v for k, v in own.items() if k not in overridden}
        # LoRA as configured for this stage (published merged), the configured ZeRO stage, offload and preset
        assert (m["model"]["lora"] == "merged") is getattr(resolved, stage).lora, (stage, m["model"])
        assert m["config"]["deepspeed"] == resolved.to_dict()["deepspeed"]
        assert m["model"]["use_chat_template"] == cfg.model.use_chat_template
        assert not [k for k in m["metrics"] if k.startswith("gold")], m["metrics"]  # no gold scorer
    log = "".join((d / "logs" / f"{s}.log").read_text() for s in STAGES)
    assert f"ZeRO-{resolved.deepspeed.zero_stage}" in log
    ppo = manifest(d, "ppo")
    assert ppo["metrics"]["updates"] == 2 and (d / "ppo" / "samples.jsonl").is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_pipeline(config, family_checkpoints, tmp_path, monkeypatch):
    _run_shipped(config, tmp_path, monkeypatch, family_checkpoints, port=29900 + 10 * CONFIGS.index(config))


def test_zero3_offload_preset(family_checkpoints, tmp_path, monkeypatch):
    """The first ZeRO-3 config as its comment says to offload: deepspeed.offload=true with ds/zero3_offload.json
    (the PPO stage then steps with DeepSpeed's CPU Adam, whose op is compiled once, ~100 s, on a fresh machine)."""
    zero3 = [c for c in CONFIGS if load_config(c).deepspeed.zero_stage == 3]
    if not zero3:
        pytest.skip("no ZeRO-3 config in launch/configs/")
    preset = ROOT / "launch" / "ds" / "zero3_offload.json"
    _run_shipped(zero3[0], tmp_path, monkeypatch, family_checkpoints, port=29990,
                 extra=["deepspeed.offload=true", f"deepspeed.config_file={preset}"])
