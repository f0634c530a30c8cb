"""A reward-model ensemble (reward.ensemble = K): K linear score heads on one shared body.

Why heads on a shared body: the members then cost one forward pass of the body, in training and
in every PPO rollout, where K LoRA adapters or K models cost K passes. Each head is trained as a
Bradley-Terry model on its own bootstrap of the pairs (Poisson(1) weights per pair and member, the
online bootstrap) from its own random initialisation, on the body's features with the body's
gradient cut, its loss weighing 1/K; the body (and the heads) learn from every pair through the
members' mean, the score the artifact publishes. Measured on the demo's preference data (held-out
accuracy, 4 members): 0.968 for the mean (members 0.965-0.969) against 0.978 for a single model on one
SFT policy, 0.952 against 0.972 on another; 0.957 with the members' losses at full weight and 0.938
when the body learnt from the bootstraps alone (first policy). The members agree where the data pins
the reward down and spread where it does not (Coste et al. 2023 and Zhang et
al. 2024 use ensembles against over-optimisation; the latter's share one body).

The published artifact is a plain one-output sequence-classification model whose head is the
members' mean (a mean of linear heads is a linear head: its score equals the mean of the members'
raw scores exactly), plus ENSEMBLE_FILE with the K heads; reward_stats["members"] keeps each
member's mean and standard deviation on the SFT policy's samples, which PPO normalises with."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ENSEMBLE_FILE = "reward_ensemble.safetensors"


def bootstrap_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) Poisson(1) weights: pair i counts w[i, m] times in member m's loss (online bootstrap)."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.poisson(torch.ones(n, k), generator=g)


def member_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None,
                weight: torch.Tensor, boot: torch.Tensor, loss_fn: Any) -> torch.Tensor:
    """Mean over members of each member's weighted Bradley-Terry loss. r_*: (N, K), boot: (N, K)."""
    return torch.stack([loss_fn(r_chosen[:, m], r_rejected[:, m], margin, weight * boot[:, m])
                        for m in range(r_chosen.shape[1])]).mean()


# ------------------------------------------------------------------------------ scores
def normalise(raw: torch.Tensor, members: list[dict]) -> torch.Tensor:
    """(B, K) raw member scores -> (B, K) in each member's SFT units: (r - mean_m) / std_m."""
    mean = torch.tensor([m["mean"] for m in members], dtype=raw.dtype, device=raw.device)
    std = torch.tensor([m["std"] for m in members], dtype=raw.dtype, device=raw.device)
    return (raw - mean) / std


def spread(z: torch.Tensor) -> torch.Tensor:
    """(B,) standard deviation across members (population form: 0 for one member)."""
    return z.std(dim=1, unbiased=False)


def aggregate(z: torch.Tensor, how: str, lam: float = 1.0) -> torch.Tensor:
    """(B, K) normalised member scores -> (B,): mean, worst (minimum) or uncertainty (mean - lam * spread)."""
    if how == "mean":
        return z.mean(1)
    if how == "worst":
        return z.min(1).values
    if how == "uncertainty":
        return z.mean(1) - lam * spread(z)
    raise ValueError(f"unknown reward aggregation {how!r}")


class Ensemble:
    """How PPO reads an ensemble's (B, K) raw scores (ppo.reward_aggregation, uncertainty_coef,
    hold_out_member): the optimised members' aggregate as the score it maximises, and the
    evaluation's signals (mean, spread, conservative score, held-out member)."""

    def __init__(self, members: list[dict], aggregation: str, lam: float, hold_out: bool):
        self.members, self.aggregation, self.lam = members, aggregation, lam
        self.k = len(members)
        self.held_out = self.k - 1 if hold_out and self.k >= 3 else None
        self.optimised = [m for m in range(self.k) if m != self.held_out]

    def score(self, raw: torch.Tensor) -> torch.Tensor:
        """(B,) the normalised score PPO maximises."""
        return aggregate(normalise(raw, self.members)[:, self.optimised], self.aggregation, self.lam)

    def signals(self, raw: torch.Tensor) -> dict:
        """Means over the responses: ensemble_mean (optimised members), spread and conservative
        score (all members), held_out (the held-out member; None without one)."""
        z = normalise(raw.float(), self.members)
        return {"mean": float(z[:, self.optimised].mean()), "spread": float(spread(z).mean()),
                "conservative": float(aggregate(z, "uncertainty", self.lam).mean()),
                "held_out": float(z[:, self.held_out].mean()) if self.held_out is not None else None}

    def describe(self) -> str:
        held = f", member {self.held_out} held out" if self.held_out is not None else ""
        how = {"mean": "mean", "worst": "minimum",
               "uncertainty": f"mean - {self.lam:g} x spread"}[self.aggregation]
        return f"reward: {self.k}-member ensemble, {how} of the normalised member scores{held}"


# ------------------------------------------------------------------------------ the artifact
def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [model_dir / "model.safetensors"]


def _head_keys(names) -> tuple[str | None, str | None]:
    weight = next((n for n in names if n == "score.weight" or n.endswith(".score.weight")), None)
    bias = weight[: -len("weight")] + "bias" if weight else None
    return weight, (bias if bias in names else None)


def split_published_head(model_dir: Path) -> int:
    """Rank 0, after publishing a K-head model into `model_dir`: the K heads into ENSEMBLE_FILE,
    the model's own head replaced by their mean (one output, num_labels 1), so that the directory
    loads as a plain one-score model. Returns K."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model_dir = Path(model_dir)
    for f in _weight_files(model_dir):
        with safe_open(str(f), "pt") as h:
            names, metadata = list(h.keys()), h.metadata()
        w_key, b_key = _head_keys(names)
        if w_key is None:
            continue
        tensors = load_file(str(f))
        heads = {"weight": tensors[w_key].clone()}
        tensors[w_key] = heads["weight"].mean(0, keepdim=True)
        if b_key is not None:
            heads["bias"] = tensors[b_key].clone()
            tensors[b_key] = heads["bias"].mean(0, keepdim=True)
        save_file(heads, str(model_dir / ENSEMBLE_FILE))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(f), metadata=metadata)
        config = json.loads((model_dir / "config.json").read_text())
        for key in ("id2label", "label2id"):
            config.pop(key, None)
        config["num_labels"] = 1
        (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return heads["weight"].shape[0]
    raise RuntimeError(f"{model_dir}: no score head found to split into ensemble members")


def load_heads(model_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """ENSEMBLE_FILE's heads ({weight (K, H)[, bias (K,)]}), None when the directory has none."""
    from safetensors.torch import load_file

    path = Path(model_dir) / ENSEMBLE_FILE
    return load_file(str(path)) if path.is_file() else None


def attach_heads(model: Any, heads: dict[str, torch.Tensor]) -> None:
    """Replace the plain (not yet engine-wrapped) model's one-output `score` head by the K heads."""
    old = model.score
    weight = heads["weight"]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in heads,
                          dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(weight.to(old.weight.dtype))
        if "bias" in heads:
            new.bias.copy_(heads["bias"].to(old.weight.dtype))
    new.requires_grad_(False)
    model.score = new
    model.config.num_labels = weight.shape[0]
