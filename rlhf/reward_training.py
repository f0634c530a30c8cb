"""What the reward-model stage adds to TRL's RewardTrainer: per-pair weights, prompt-grouped
batches, and a held-out evaluation with accuracy by ranking distance."""
from __future__ import annotations

import random
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from rlhf.scoring import bradley_terry_loss, pad_right, reward_scores


class WeightedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus the per-pair `weight` and an always-present `margin`."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call([{k: v for k, v in e.items() if k != "weight"} for e in examples])
        out["weight"] = torch.tensor([e.get("weight", 1.0) for e in examples], dtype=torch.float)
        return out


class GroupedShuffleSampler(Sampler[int]):
    """Shuffles prompts, not pairs: the pairs of one ranking stay next to each other, so a
    K-wise ranking is learnt as one unit (as in InstructGPT) rather than spread over the epoch."""

    def __init__(self, groups: list[int], seed: int):
        self.seed, self.epoch = seed, 0
        self.members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            self.members.setdefault(g, []).append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        keys = sorted(self.members)
        random.Random(self.seed * 1000003 + self.epoch).shuffle(keys)
        for k in keys:
            yield from self.members[k]

    def __len__(self) -> int:
        return sum(len(v) for v in self.members.values())


class WeightedRewardTrainer(RewardTrainer):
    """RewardTrainer with the weighted Bradley-Terry loss of rlhf.scoring and grouped batches."""

    def __init__(self, *args: Any, groups: list[int], **kwargs: Any):
        self._groups = groups
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "weight"]

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler:
        return GroupedShuffleSampler(self._groups, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        mode = "train" if self.model.training else "eval"
        weight, margin = inputs.pop("weight"), inputs.pop("margin", None)
        rewards = reward_scores(model, inputs["input_ids"], inputs["attention_mask"])
        r_chosen, r_rejected = torch.chunk(rewards, chunks=2)  # (N,), (N,)
        loss = bradley_terry_loss(r_chosen, r_rejected, margin, weight)
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
        with torch.no_grad():
            acc = (r_chosen > r_rejected).float().mean()
            self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(acc).mean().item())
            m = (r_chosen - r_rejected).mean()
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(m).mean().item())
        return (loss, {"rewards_chosen": r_chosen, "rewards_rejected": r_rejected}) if return_outputs else loss


@torch.no_grad()
def evaluate_pairs(model: Any, pairs: list[dict], pad_id: int, batch_size: int) -> dict:
    """Held-out figures from rows {chosen_ids, rejected_ids, rank_distance}: pairwise accuracy,
    mean margin, accuracy for adjacent (distance 1) and distant (>= 2) ranks, reward mean/std.
    Under ZeRO-3 every rank calls it with the same rows."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rc, rr = [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        ids, mask = pad_right([p["chosen_ids"] for p in chunk] + [p["rejected_ids"] for p in chunk], pad_id, device)
        r = reward_scores(model, ids, mask)
        rc.append(r[: len(chunk)].cpu())
        rr.append(r[len(chunk):].cpu())
    model.train(was_training)
    r_c, r_r = torch.cat(rc), torch.cat(rr)
    correct = (r_c > r_r).float()
    dist = torch.tensor([p["rank_distance"] for p in pairs])
    out = {
        "eval_accuracy": correct.mean().item(),
        "eval_mean_margin": (r_c - r_r).mean().item(),
        "eval_reward_chosen_mean": r_c.mean().item(), "eval_reward_chosen_std": r_c.std().item(),
        "eval_reward_rejected_mean": r_r.mean().item(), "eval_reward_rejected_std": r_r.std().item(),
        "eval_pairs": len(pairs),
    }
    if (dist == 1).any():
        out["eval_accuracy_adjacent"] = correct[dist == 1].mean().item()
    if (dist >= 2).any():
        out["eval_accuracy_distant"] = correct[dist >= 2].mean().item()
    return out
