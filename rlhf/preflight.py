"""Everything that can be checked before a stage does any work.

`check(cfg, stages)` runs before any model is loaded or trained and before anything is written
into the artifact directory: by each stage's entry point (rlhf.stage_io.main) and by the pipeline
driver (`rlhf pipeline`, `rlhf demo`) before its first stage starts. It checks

- the artifact directory: not a file, writable (probed with a temporary file that is removed);
- the parent artifacts a stage needs and that this run does not build: complete;
- `deepspeed.config_file`: a JSON object whose `zero_optimization` DeepSpeed accepts;
- `model.dtype`: supported by this machine's accelerator;
- `deepspeed.offload`: DeepSpeed's CPU Adam prebuilt, or a C++ compiler and ninja to build it;
- `ppo.rollout_engine=vllm` (reward and PPO stages): vLLM importable, else the install command;
- local model directories (`model.name_or_path`, `reward.model`): config.json, safetensors
  weights, tokenizer files, and model code that runs only with `model.trust_remote_code`;
- every local data file, parsed in full by the loaders the stage itself uses (UTF-8, JSON, fields,
  the skipped-row limits); hub ids need the network and are left to the stage;
- `eval.gold_scorer`: an importable two-argument function;
- with `sft.loss_on=all`, that some SFT example keeps a response token within `sft.max_length`.

Problems raise the errors the entry points already print without a traceback: ConfigError,
DataError and ArtifactError, each naming the config key, file, row or field and what to do.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from rlhf import artifacts
from rlhf.artifacts import PPO, REWARD, SFT
from rlhf.config import ConfigError, PipelineConfig, load_function, read_deepspeed_json, require
from rlhf.data import DataError, is_local, load_preferences, load_prompts, load_sft

PARENTS = {SFT: (), REWARD: (SFT,), PPO: (SFT, REWARD)}
# what a stage writes under the artifact directory: each must be a directory when it exists
SUBDIRS = (*artifacts.STAGES, "checkpoints", "metrics", "logs", "wandb", "report")
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def check(cfg: PipelineConfig, stages: Any) -> None:
    """Check everything `stages` (names from artifacts.STAGES) need before any work starts."""
    stages = [s for s in artifacts.STAGES if s in set(stages)]
    check_artifact_dir(cfg.artifact_dir)
    check_parents(cfg.artifact_dir, stages)
    if cfg.deepspeed.config_file:
        check_deepspeed_file(cfg.deepspeed)
    check_dtype(cfg.model.dtype, stages)
    if cfg.deepspeed.offload:
        problem = compiled_op_problem("cpu_adam", "DeepSpeed's CPU Adam (the optimizer under offload)",
                                      "DS_BUILD_CPU_ADAM=1")
        if problem:
            raise ConfigError(f"deepspeed.offload=true: {problem}, or set deepspeed.offload=false")
    check_rollout_engine(cfg, stages)
    check_quantization(cfg, stages)
    if SFT in stages and cfg.sft.import_model:
        check_model_dir(cfg.sft.import_model, "sft.import_model", cfg.model.trust_remote_code)
    elif SFT in stages:
        check_policy_source(cfg)
    if REWARD in stages and cfg.reward.import_model:
        check_model_dir(cfg.reward.import_model, "reward.import_model", cfg.model.trust_remote_code)
        if cfg.reward.eval_data is None and cfg.ppo.train_prompts is None:
            raise ConfigError("reward.import_model: its reward_stats are measured on prompts from reward.eval_data, "
                              "else ppo.train_prompts; set one of them")
    elif REWARD in stages and cfg.reward.model:
        check_model_dir(cfg.reward.model, "reward.model", cfg.model.trust_remote_code)
    check_lengths(cfg, stages)
    sft_data = check_data(cfg, stages)
    if cfg.eval.gold_scorer and (REWARD in stages or PPO in stages):
        load_function(cfg.eval.gold_scorer, "eval.gold_scorer")
    if sft_data and cfg.sft.loss_on == "all":
        check_sft_lengths(cfg, sft_data)


# ---------------------------------------------------------------- artifact directory

def check_artifact_dir(path: str) -> None:
    """artifact_dir is a directory (or can become one) that this process can write in."""
    d = Path(path).absolute()
    if d.exists() and not d.is_dir():
        raise ConfigError(f"artifact_dir={path} is an existing file, not a directory; set artifact_dir to a "
                          "directory (it is created when missing)")
    for name in SUBDIRS:
        sub = d / name
        if sub.exists() and not sub.is_dir():
            raise ConfigError(f"artifact_dir={path}: {sub} is a file where the pipeline keeps a directory; "
                              "move it away or choose another artifact_dir")
    existing = d
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"artifact_dir={path} cannot be created: {existing} is a file, not a directory; "
                          "choose another artifact_dir")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rlhf-write-probe-", dir=existing)
        try:
            os.write(fd, b"rlhf")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"artifact_dir={path}: cannot write in {existing} ({e.strerror or e}); make it writable, "
                          "free space on its filesystem, or choose another artifact_dir") from None


# ---------------------------------------------------------------- parents

def check_parents(artifact_dir: str, stages: list[str]) -> None:
    """Every parent a stage needs that this run does not build must be a complete artifact."""
    loaded = {}
    for parent in dict.fromkeys(p for s in stages for p in PARENTS[s] if p not in stages):
        loaded[parent] = artifacts.load(artifacts.stage_dir(artifact_dir, parent), parent)
    if REWARD in loaded and SFT in loaded:  # PPO alone: its reward model must come from this SFT policy
        artifacts.check_lineage(loaded[REWARD], loaded[SFT])


# ---------------------------------------------------------------- rollout engine

def check_rollout_engine(cfg: PipelineConfig, stages: list[str]) -> None:
    """ppo.rollout_engine=vllm samples in the reward stage (reward_stats) and in PPO: vLLM must be importable."""
    if cfg.ppo.rollout_engine == "vllm" and (REWARD in stages or PPO in stages):
        from rlhf.engines.vllm_engine import INSTALL_HINT, available

        if not available():
            raise ConfigError(f"ppo.rollout_engine=vllm, but vLLM is not installed in {sys.executable}'s "
                              f"environment: {INSTALL_HINT}")


# ---------------------------------------------------------------- DeepSpeed and dtype

def check_deepspeed_file(ds: Any) -> None:
    """deepspeed.config_file: a JSON object, no offload sections behind deepspeed.offload's back,
    and a zero_optimization section DeepSpeed's own schema accepts."""
    base = read_deepspeed_json(ds.config_file)
    zero = base.get("zero_optimization", {})
    offload = sorted(k for k in zero if k.startswith("offload_"))
    if offload and not ds.offload:
        raise ConfigError(f"deepspeed.config_file={ds.config_file}: zero_optimization.{offload[0]} would switch CPU "
                          "offload on while deepspeed.offload is false; remove it from the JSON and set "
                          "deepspeed.offload: true to offload")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**{**zero, "stage": ds.zero_stage})
    except ValidationError as e:
        problems = "; ".join(f"zero_optimization.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"deepspeed.config_file={ds.config_file}: DeepSpeed refuses it ({problems})") from None


def compiled_op_problem(op: str, what: str, build_flag: str) -> str | None:
    """Why DeepSpeed cannot compile its C++ op `op` on first use here (no compiler, no ninja), or
    None: it was built at install time, or it can be. Said before any work, instead of the
    compiler's traceback from deep inside the engine's start."""
    import shutil

    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import is_ninja_available

    if installed_ops.get(op):
        return None
    cxx = os.environ.get("CXX", "c++")
    missing = []
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r}{', from CXX,' if 'CXX' in os.environ else ''} is not on PATH)")
    if not is_ninja_available():
        missing.append("ninja (`pip install ninja`)")
    if not missing:
        return None
    return (f"{what} is C++ that DeepSpeed compiles on first use, and this machine lacks {' and '.join(missing)}. "
            "Install a compiler (Debian/Ubuntu: `apt-get install g++`; Fedora/RHEL: `dnf install gcc-c++`; conda: "
            f"`conda install -c conda-forge cxx-compiler`), or install DeepSpeed with the op prebuilt "
            f"(`{build_flag} pip install --no-cache-dir --force-reinstall --no-deps deepspeed`, on a machine with one)")


def dtype_problem(dtype: str, stages: list[str], cuda: bool, bf16: bool) -> str | None:
    """Why `model.dtype` cannot train `stages` on a machine with (cuda, bf16) support, or None."""
    if dtype == "float16" and not cuda:
        return ("model.dtype=float16 needs a CUDA GPU: DeepSpeed has no float16 training on CPU; "
                "use model.dtype=float32 on this machine")
    if dtype == "bfloat16" and not bf16 and (SFT in stages or REWARD in stages):
        if cuda:
            return ("model.dtype=bfloat16: this GPU has no bfloat16 support (torch.cuda.is_bf16_supported() is "
                    "False; A100, H100 and newer have it); use model.dtype=float16 or float32")
        return ("model.dtype=bfloat16 needs a CUDA GPU with bfloat16 (A100, H100 and newer): the SFT and reward "
                "trainers refuse it on CPU; use model.dtype=float32 on this machine")
    return None


def check_dtype(dtype: str, stages: list[str]) -> None:
    if dtype == "float32":
        return
    import torch

    cuda = torch.cuda.is_available()
    problem = dtype_problem(dtype, stages, cuda, cuda and torch.cuda.is_bf16_supported())
    if problem:
        raise ConfigError(problem)


# ---------------------------------------------------------------- models

def check_quantization(cfg: PipelineConfig, stages: list[str]) -> None:
    """model.quantization=4bit: LoRA in every stage that trains (an imported model trains nothing), a
    pretrained base for SFT, and bitsandbytes importable."""
    if cfg.model.quantization == "none":
        return
    from rlhf import models

    q = cfg.model.quantization
    trains = [(SFT, cfg.sft.lora, "sft.lora", cfg.sft.import_model), (REWARD, cfg.reward.lora, "reward.lora",
                                                                      cfg.reward.import_model),
              (PPO, cfg.ppo.lora, "ppo.lora", None)]
    off = [key for stage, lora, key, imported in trains if stage in stages and not imported and not lora]
    if off:
        raise ConfigError(f"model.quantization={q} trains LoRA adapters on a frozen 4-bit base, and "
                          f"{' and '.join(off)} {'is' if len(off) == 1 else 'are'} false (a 4-bit base cannot be "
                          f"trained in full): set {' '.join(k + '=true' for k in off)}, or model.quantization=none")
    if SFT in stages and not cfg.sft.import_model and cfg.model.name_or_path is None:
        raise ConfigError(f"model.quantization={q} needs a pretrained base (model.name_or_path) to quantize; a "
                          "scratch model (model.scratch) trains all its weights: set model.quantization=none")
    if any(stage in stages and not imported for stage, _, _, imported in trains):
        models.require_bitsandbytes(f"model.quantization={q}")


def check_policy_source(cfg: PipelineConfig) -> None:
    """The SFT stage's model: exactly one of model.name_or_path and model.scratch, and a sane directory."""
    mc = cfg.model
    if mc.name_or_path is None and mc.scratch is None:
        raise ConfigError("set model.name_or_path (hub id or local dir) or model.scratch (a from-scratch spec)")
    if mc.name_or_path is not None and mc.scratch is not None:
        raise ConfigError(f"model.name_or_path={mc.name_or_path} and model.scratch are both set, and the SFT stage "
                          "would build the scratch model; set model.scratch=null to fine-tune "
                          f"{mc.name_or_path}, or unset model.name_or_path")
    if cfg.sft.lora and mc.name_or_path is None:
        raise ConfigError("sft.lora=true needs a pretrained base (model.name_or_path); a scratch model trains all weights")
    if mc.name_or_path is not None:
        check_model_dir(mc.name_or_path, "model.name_or_path", mc.trust_remote_code)


def _looks_like_path(value: str) -> bool:
    # hub ids are "name" or "org/name"; anything absolute, relative-dotted or deeper is a local path
    return os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1


def check_model_dir(value: str, key: str, trust_remote_code: bool) -> None:
    """A local model directory: config.json, safetensors weights, tokenizer files, and custom model
    code only with model.trust_remote_code. Hub ids are left to the stage (they need the network)."""
    d = Path(value).expanduser()
    if not d.exists():
        if _looks_like_path(value):
            raise ConfigError(f"{key}={value} does not exist; give a local model directory or a hub id (org/name)")
        return
    if not d.is_dir():
        raise ConfigError(f"{key}={value} is a file; give the model's directory (config.json, model.safetensors, "
                          "tokenizer files)")
    conf = _model_config(d, key)
    check_architecture(conf, key, value)
    if not (d / "adapter_config.json").is_file():
        _check_weights(d, key)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}={value} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); save the "
                          "model's tokenizer into it too (tokenizer.save_pretrained)")
    if not trust_remote_code:
        _check_model_code(conf, d, key)


# what each model key must hold: the policy generates left to right (a decoder-only causal LM); the reward
# stage's initial model gets a per-token `score` head on a decoder; an imported reward model is any
# one-output sequence classifier (rlhf.imports)
_DECODER_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification")


def check_architecture(conf: dict, key: str, value: str) -> None:
    """ConfigError for a model that cannot play the role of `key`, from its config.json: an
    encoder-decoder (T5, BART) anywhere; an encoder-only model (BERT, RoBERTa, DeBERTa: architectures
    without a causal-LM head) as the policy or the reward stage's initial model."""
    archs = [a for a in conf.get("architectures") or [] if isinstance(a, str)]
    if conf.get("is_encoder_decoder"):
        raise ConfigError(f"{key}={value} is an encoder-decoder model ({', '.join(archs) or conf.get('model_type')}); "
                          "the pipeline trains decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2, Pythia, OPT, ...)")
    if key == "reward.import_model" or not archs:
        return
    wanted = _DECODER_HEADS if key == "reward.model" else ("ForCausalLM", "LMHeadModel")
    if not any(a.endswith(w) for a in archs for w in wanted):
        what = ("a causal LM the policy can be trained from" if key != "reward.model"
                else "a decoder model the reward head is put on")
        raise ConfigError(f"{key}={value} holds {', '.join(archs)}, not {what} (an architecture ending in "
                          f"{' or '.join(wanted)}); encoder-only models (BERT, RoBERTa, DeBERTa) attend to later tokens "
                          "and cannot generate left to right"
                          + ("; a ready reward model of that kind goes to reward.import_model" if key == "reward.model"
                             else ""))


def policy_positions(cfg: PipelineConfig) -> tuple[int, str] | None:
    """(the longest sequence the policy takes, where that comes from), when it can be known before
    loading: model.scratch's size, or a local directory's config.json; None for a hub id."""
    if cfg.sft.import_model or cfg.model.scratch is None:
        key = "sft.import_model" if cfg.sft.import_model else "model.name_or_path"
        value = cfg.sft.import_model or cfg.model.name_or_path
        f = Path(value).expanduser() / "config.json" if value else None
        if f is None or not f.is_file():
            return None
        try:
            conf = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # check_model_dir says what is wrong with it
        conf = conf.get("text_config", conf) if isinstance(conf.get("text_config"), dict) else conf
        from rlhf.imports import max_positions

        n = max_positions(conf)
        return (n, f"{key}={value} (its config.json)") if n else None
    return cfg.model.scratch.max_position_embeddings, "model.scratch.max_position_embeddings"


def check_lengths(cfg: PipelineConfig, stages: list[str]) -> None:
    """Every sequence a stage builds fits the policy's positions: past them a model indexes outside
    its position table (an error deep in a forward on GPU, garbage or an index error on CPU)."""
    known = policy_positions(cfg)
    if known is None:
        return
    n, source = known
    wants = []
    if SFT in stages and not cfg.sft.import_model:
        wants.append(("sft.max_length", cfg.sft.max_length))
    if REWARD in stages and not cfg.reward.import_model and not cfg.reward.model:
        wants.append(("reward.max_length", cfg.reward.max_length))
    if REWARD in stages or PPO in stages:
        p = cfg.ppo
        wants.append(("ppo.max_prompt_length + ppo.max_new_tokens", p.max_prompt_length + p.max_new_tokens))
        if cfg.eval.max_new_tokens is not None:
            wants.append(("ppo.max_prompt_length + eval.max_new_tokens", p.max_prompt_length + cfg.eval.max_new_tokens))
    for what, length in wants:
        if length > n:
            raise ConfigError(f"{what} = {length} tokens, but the policy takes at most {n} ({source}); lower it "
                              f"to {n} or less")


def _model_config(d: Path, key: str) -> dict:
    f = d / "config.json"
    if not f.is_file():
        raise ConfigError(f"{key}={d} has no config.json, so it is not a transformers model directory; save the "
                          "model there with save_pretrained() (config.json, model.safetensors, tokenizer files)")
    try:
        conf = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}={d}: {f.name} cannot be read as JSON ({e})") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"{key}={d}: {f.name} must hold a JSON object")
    return conf


def _check_weights(d: Path, key: str) -> None:
    if any((d / f).is_file() for f in SAFETENSORS):
        return
    others = sorted(f.name for f in d.iterdir() if f.suffix in OTHER_WEIGHTS)
    if others:
        raise ConfigError(
            f"{key}={d} holds only {', '.join(others[:3])} weights; this pipeline loads safetensors only "
            f"(model.safetensors), which cannot run code when loaded. Convert the directory once with\n"
            f"  python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
            f"s, o = '{d}', '{d}-safetensors'; M.from_pretrained(s).save_pretrained(o); "
            f"T.from_pretrained(s).save_pretrained(o)\"\n"
            f"and set {key} to the new directory")
    raise ConfigError(f"{key}={d} has no model weights ({' or '.join(SAFETENSORS)}); save the model there with "
                      "save_pretrained()")


def _check_model_code(conf: dict, d: Path, key: str) -> None:
    """Without trust_remote_code, transformers can only build a model_type it ships itself."""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = conf.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES:
        return  # transformers' own implementation is used, even where the directory also ships code
    if conf.get("auto_map"):
        raise ConfigError(f"{key}={d} needs the model code it ships (config.json: model_type {model_type!r}, "
                          "auto_map), and running a model's own code is off by default; set "
                          "model.trust_remote_code: true if you trust that code")
    what = f"model_type {model_type!r} is not one transformers {__version__} knows" if model_type \
        else "config.json has no model_type"
    raise ConfigError(f"{key}={d}: {what}, and the directory ships no model code (auto_map); use a transformers "
                      "version that supports this model, or fix config.json")


# ---------------------------------------------------------------- data

def check_data(cfg: PipelineConfig, stages: list[str]) -> dict[str, Any]:
    """Parse every local data file the stages read, as they will read it. Returns the SFT data
    ({"train": SFTData, "eval": SFTData}) when the SFT stage is checked, for check_sft_lengths."""
    out: dict[str, Any] = {}
    if SFT in stages and not cfg.sft.import_model:
        c = cfg.sft
        skip = dict(max_skipped_fraction=c.max_skipped_fraction, skip_key="sft.max_skipped_fraction")
        out["train"] = _load("sft.train_data", require(c.train_data, "sft.train_data", "the SFT training file"),
                             lambda src: load_sft(src, **skip))
        out["eval"] = _load("sft.eval_data", c.eval_data, lambda src: load_sft(src, **skip))
    if REWARD in stages:
        c = cfg.reward
        skip = dict(max_skipped_fraction=c.max_skipped_fraction, skip_key="reward.max_skipped_fraction")
        if not c.import_model:
            _load("reward.train_data", require(c.train_data, "reward.train_data", "the preference training file"),
                  lambda src: load_preferences(src, c.pair_weighting, **skip))
        _load("reward.eval_data", c.eval_data, lambda src: load_preferences(src, "uniform", **skip))
    if PPO in stages:
        c = cfg.ppo
        _load("ppo.train_prompts", require(c.train_prompts, "ppo.train_prompts", "the prompts PPO rolls out on"),
              load_prompts)
        _load("ppo.eval_prompts", c.eval_prompts, load_prompts)
    return {k: v for k, v in out.items() if v is not None}


def _load(key: str, source: str | None, loader: Any) -> Any:
    """loader(source) for a local file (None for an unset key or a hub id); errors name `key`."""
    if source is None or not is_local(source):
        return None
    try:
        return loader(source)
    except DataError as e:
        raise e.under_key(key) from None


def check_sft_lengths(cfg: PipelineConfig, sft_data: dict[str, Any]) -> None:
    """With sft.loss_on=all a conversation is cut at sft.max_length from the right, so an example
    whose first assistant reply starts beyond it has nothing to learn; the stage fails when no
    example keeps a response token. Checked here with the tokenizer the stage will use, stopping
    at the first example that fits (prompt/completion rows always keep one)."""
    from rlhf.tokenization import encode_conversation

    tokenizer = None
    for split, data in sft_data.items():
        key = f"sft.{split}_data"
        if any(r.messages is None for r in data.examples):
            continue
        tokenizer = tokenizer or _sft_tokenizer(cfg, sft_data.get("train"))
        if tokenizer is None:
            return
        for i, r in enumerate(data.examples, 1):
            try:
                _, mask, _ = encode_conversation(tokenizer, r.messages, cfg.model.use_chat_template, cfg.sft.max_length)
            except ValueError as e:
                raise ConfigError(f"sft.loss_on=all, {key} example {i}: {e}") from None
            if any(mask):
                break
        else:
            raise ConfigError(f"{key}: no example keeps a response token within sft.max_length={cfg.sft.max_length} "
                              "(with sft.loss_on=all each conversation is cut from the right, and every first "
                              "assistant reply starts beyond it); raise sft.max_length")


def _sft_tokenizer(cfg: PipelineConfig, train: Any | None) -> Any:
    """The tokenizer the SFT stage will use, when it can be had without the network: a scratch
    model's is trained on the SFT data as the stage trains it; a local model's is loaded."""
    from rlhf import models
    from rlhf.data import prompt_text

    mc = cfg.model
    if mc.scratch is not None:
        if train is None:  # trained on a hub dataset: left to the stage
            return None
        return models.train_scratch_tokenizer([prompt_text(r.prompt) + r.completion for r in train.examples],
                                              mc.scratch.vocab_size)
    if not Path(mc.name_or_path).is_dir():
        return None
    tokenizer = models.load_tokenizer(mc.name_or_path, mc.trust_remote_code)
    models.ensure_pad_token(tokenizer)
    return tokenizer
