"""Models the pipeline did not train (sft.import_model, reward.import_model): loaded from a hub id
or a local directory, checked, and written into the artifact directory as a plain model
directory, so that the later stages, resume, integrity checks and `rlhf generate` treat them like
any artifact. Where each came from is kept in the manifest's "imported" entry, which
`rlhf status` and the report show."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf import artifacts, models
from rlhf.config import ConfigError


def provenance(source: str, model: Any, tokenizer: Any) -> dict:
    """The manifest's record of an imported model: what was named, what it held (a local
    directory's content id; a hub model's commit when transformers reports one), its class."""
    local = Path(source).expanduser().is_dir()
    return {"source": source, "kind": "local directory" if local else "hub id",
            "content": artifacts.content_id(source) if local else None,
            "revision": getattr(model.config, "_commit_hash", None),
            "model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "vocabulary": len(tokenizer), "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def load_policy(source: str, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """(causal LM, tokenizer) of sft.import_model in `dtype`, with a pad token distinct from EOS
    (added, and the embeddings resized, where it has none: as the SFT stage does)."""
    try:
        tokenizer = models.load_tokenizer(source, trust_remote_code)
        models.check_causal(source, "sft.import_model", trust_remote_code)
        model = models.load_causal_lm(source, dtype, trust_remote_code)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"sft.import_model={source}: cannot be loaded as a causal LM with its tokenizer ({_first(e)}); "
                          "give a hub id or a local directory saved with save_pretrained (safetensors)") from None
    models.ensure_pad_token(tokenizer, f"sft.import_model={source}")
    models.resize_for_tokenizer(model, tokenizer)
    return model, tokenizer


def load_reward_model(source: str, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """(one-output sequence-classification model, tokenizer) of reward.import_model, unchanged:
    its tokenizer is used as it is (no token added), and a model with more than one output, or a
    causal LM without a trained head, is refused."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        tokenizer = models.load_tokenizer(source, trust_remote_code)
        conf = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward.import_model={source}: cannot be loaded ({_first(e)}); give a hub id or a local "
                          "directory saved with save_pretrained (safetensors)") from None
    heads = [a for a in (getattr(conf, "architectures", None) or []) if "SequenceClassification" in a]
    if not heads:
        raise ConfigError(f"reward.import_model={source}: its config.json names {getattr(conf, 'architectures', None)}, "
                          "not a sequence-classification model: a reward model has a trained one-output head "
                          "(AutoModelForSequenceClassification with num_labels=1); to train one from this model, set "
                          "reward.model to it and reward.train_data to your preferences instead")
    if getattr(conf, "num_labels", 1) != 1:
        raise ConfigError(f"reward.import_model={source} has {conf.num_labels} outputs (num_labels); a reward model "
                          "has exactly one (a scalar score)")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"reward.import_model={source}: its tokenizer has no EOS token, which marks where a "
                          "response ends; set tokenizer.eos_token and save it into the model directory")
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=models.DTYPES[dtype], use_safetensors=True,
                                                               trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:  # transformers' own forward needs it; rows are masked anyway
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer


def save(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """A plain model directory (safetensors and tokenizer) of an unwrapped module; rank 0 only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def max_positions(conf: Any) -> int | None:
    """The longest sequence a model of config `conf` (a transformers config, or config.json's
    dict) takes (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = conf.get(key) if isinstance(conf, dict) else getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _first(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
