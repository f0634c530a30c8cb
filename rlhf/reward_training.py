"""What the reward-model stage adds to TRL's RewardTrainer: per-pair weights, prompt-grouped
batches, a held-out evaluation with accuracy by ranking distance, and the diagnostics of the
trained model (calibration, reward histograms, reward against response length)."""
from __future__ import annotations

import math
import random
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from rlhf.ensemble import member_loss
from rlhf.metric_names import Summary as S
from rlhf.scoring import bradley_terry_loss, last_features, pearson, reward_scores  # noqa: F401 (pearson: re-exported)
from rlhf.tokenization import pad_batch


class WeightedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus the per-pair `weight`, an always-present `margin` and, for a
    reward ensemble, each pair's bootstrap weights per member (`boot`, (N, K))."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call([{k: v for k, v in e.items() if k not in ("weight", "boot")} for e in examples])
        out["weight"] = torch.tensor([e.get("weight", 1.0) for e in examples], dtype=torch.float)
        if "boot" in examples[0]:
            out["boot"] = torch.tensor([e["boot"] for e in examples], dtype=torch.float)
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
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "weight", "boot"]

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler:
        return GroupedShuffleSampler(self._groups, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        mode = "train" if self.model.training else "eval"
        weight, margin, boot = inputs.pop("weight"), inputs.pop("margin", None), inputs.pop("boot", None)
        if boot is None:
            rewards = reward_scores(model, inputs["input_ids"], inputs["attention_mask"])
            r_chosen, r_rejected = torch.chunk(rewards, chunks=2)  # (N,), (N,)
            loss = bradley_terry_loss(r_chosen, r_rejected, margin, weight)
        else:  # a reward ensemble (rlhf.ensemble): the published mean on every pair, each head on its bootstrap
            features, head = last_features(model, inputs["input_ids"], inputs["attention_mask"])  # (2N, H)
            r_chosen, r_rejected = torch.chunk(head(features).float().mean(1), chunks=2)         # (N,), (N,)
            loss = bradley_terry_loss(r_chosen, r_rejected, margin, weight)
            members = head(features.detach()).float()  # (2N, K): the heads alone, on the body's features
            loss = loss + member_loss(*torch.chunk(members, chunks=2), margin, weight, boot,
                                      bradley_terry_loss) / members.shape[1]
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
        with torch.no_grad():
            acc = (r_chosen > r_rejected).float().mean()
            self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(acc).mean().item())
            m = (r_chosen - r_rejected).mean()
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(m).mean().item())
        return (loss, {"rewards_chosen": r_chosen, "rewards_rejected": r_rejected}) if return_outputs else loss


@torch.no_grad()
def evaluate_pairs(model: Any, pairs: list[dict], pad_id: int, batch_size: int,
                   with_rewards: bool = False) -> dict | tuple[dict, list[float], list[float]]:
    """Held-out figures from rows {chosen_ids, rejected_ids, rank_distance}: pairwise accuracy,
    mean margin, accuracy for adjacent (distance 1) and distant (>= 2) ranks, reward mean/std.
    `with_rewards`: also return the per-pair rewards (chosen, rejected), in row order, for
    rm_diagnostics. Under ZeRO-3 every rank calls it with the same rows."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rc, rr = [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        ids, mask = pad_batch([p["chosen_ids"] for p in chunk] + [p["rejected_ids"] for p in chunk], pad_id, "right", device)
        r = reward_scores(model, ids, mask)
        rc.append(r[: len(chunk)].float().cpu())
        rr.append(r[len(chunk):].float().cpu())
    model.train(was_training)
    r_c, r_r = torch.cat(rc), torch.cat(rr)
    members = None
    if r_c.dim() == 2:  # an ensemble: each member's accuracy; the figures below are of the members' mean
        members = [round(float(v), 6) for v in (r_c > r_r).float().mean(0)]
        r_c, r_r = r_c.mean(1), r_r.mean(1)
    correct = (r_c > r_r).float()
    dist = torch.tensor([p["rank_distance"] for p in pairs])
    out = {
        S.EVAL_ACCURACY: correct.mean().item(),
        "eval_mean_margin": (r_c - r_r).mean().item(),
        "eval_reward_chosen_mean": r_c.mean().item(), "eval_reward_chosen_std": r_c.std().item(),
        "eval_reward_rejected_mean": r_r.mean().item(), "eval_reward_rejected_std": r_r.std().item(),
        "eval_pairs": len(pairs),
    }
    if members is not None:
        out["eval_member_accuracy"] = members
    if (dist == 1).any():
        out["eval_accuracy_adjacent"] = correct[dist == 1].mean().item()
    if (dist >= 2).any():
        out["eval_accuracy_distant"] = correct[dist >= 2].mean().item()
    return (out, r_c.tolist(), r_r.tolist()) if with_rewards else out


# ----------------------------------------------------------------- diagnostics of the trained RM

CALIBRATION_BINS = 10
LENGTH_CORR_WARN = 0.7   # |Pearson r| at which length explains about half the reward's variance (r^2 ~ 0.5)
HISTOGRAM_BINS = 30
MAX_POINTS = 512         # (length, reward) points kept per source for the report's scatter plot


def calibration(r_chosen: list[float], r_rejected: list[float],
                bins: int = CALIBRATION_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of the Bradley-Terry probability P(chosen > rejected) =
    sigmoid(r_chosen - r_rejected), and the reliability diagram's bins.

    Folded binning: each pair is read from the side the model favours, so its confidence is
    p = sigmoid(|r_chosen - r_rejected|) in [0.5, 1] and it is *right* when that side is the
    chosen response (a tie, p = 0.5, counts as half right). [0.5, 1] is cut into `bins` equal
    widths (the last bin includes 1.0). Per bin: count, mean confidence, empirical accuracy;
    ECE = sum over bins of count/N * |accuracy - mean confidence| (Guo et al. 2017). Reading
    both orders of every pair instead gives the mirror image of the same diagram.

    Returns (ece, [{lo, hi, count, confidence, accuracy}]) with confidence and accuracy None in
    empty bins."""
    if len(r_chosen) != len(r_rejected):
        raise ValueError("r_chosen and r_rejected differ in length")
    n = len(r_chosen)
    sums = [[0, 0.0, 0.0] for _ in range(bins)]  # count, sum of confidence, sum of correct
    for c, r in zip(r_chosen, r_rejected):
        d = float(c) - float(r)
        conf = 1.0 / (1.0 + math.exp(-abs(d)))
        right = 1.0 if d > 0 else 0.5 if d == 0 else 0.0
        b = min(int((conf - 0.5) / 0.5 * bins), bins - 1)
        sums[b][0] += 1
        sums[b][1] += conf
        sums[b][2] += right
    out, ece = [], 0.0
    for i, (k, sc, sr) in enumerate(sums):
        lo, hi = 0.5 + 0.5 * i / bins, 0.5 + 0.5 * (i + 1) / bins
        row = {"lo": round(lo, 6), "hi": round(hi, 6), "count": k,
               "confidence": sc / k if k else None, "accuracy": sr / k if k else None}
        if k:
            ece += k / n * abs(row["accuracy"] - row["confidence"])
        out.append(row)
    return (ece if n else 0.0), out


def reward_histogram(r_chosen: list[float], r_rejected: list[float], bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of chosen and of rejected rewards over shared equal-width bins:
    {edges (bins + 1), chosen (bins), rejected (bins)}; the last bin includes its right edge."""
    values = list(r_chosen) + list(r_rejected)
    if not values:
        return {"edges": [], "chosen": [], "rejected": []}
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins

    def counts(v: list[float]) -> list[int]:
        out = [0] * bins
        for x in v:
            out[min(int((x - lo) / width), bins - 1)] += 1
        return out

    return {"edges": [round(lo + i * width, 6) for i in range(bins + 1)],
            "chosen": counts(r_chosen), "rejected": counts(r_rejected)}


def length_warning(corr: float | None, where: str, threshold: float = LENGTH_CORR_WARN) -> str | None:
    """The warning to give when response length explains most of the reward (|r| >= threshold)."""
    if corr is None or abs(corr) < threshold:
        return None
    longer = "longer" if corr > 0 else "shorter"
    return (f"Pearson(reward, response length) = {corr:.2f} on {where} (r^2 = {corr * corr:.2f}): length explains "
            f"most of this reward model's scores. PPO maximises this reward, so it will learn to make responses "
            f"{longer} rather than better. Check whether the preferred responses of the preference data are "
            f"systematically {longer}; if so, balance response lengths in the data (or keep length-matched pairs) and "
            f"retrain the reward model. If you go on with PPO, watch eval/response_length, keep ppo.kl_budget tight and "
            f"select the published update with a gold scorer where you have one (ppo.keep_best=gold_score); without one, "
            f"the guard (ppo.keep_best=conservative, the default then) publishes nothing past the first evaluation whose "
            f"responses grew in the direction this reward model pays for.")


def _thin(length: list[int], reward: list[float], limit: int = MAX_POINTS) -> dict:
    """At most `limit` (length, reward) points, evenly spaced in the input order."""
    step = max(1, math.ceil(len(length) / limit))
    return {"length": [int(v) for v in length[::step]], "reward": [round(float(v), 4) for v in reward[::step]]}


def rm_diagnostics(held_out: tuple[list[float], list[float], list[int], list[int]] | None,
                   sft: tuple[list[float], list[int]] | None = None) -> dict:
    """The reward model's diagnostics, for its manifest's metrics.

    held_out: (rewards of the chosen, of the rejected responses, their lengths in tokens) of the
    held-out pairs -> `calibration_ece` and `calibration_bins` (see calibration),
    `reward_histogram` (chosen vs rejected) and `length_reward_corr` (Pearson r of reward and
    response length over every held-out response, chosen and rejected together).
    sft: (rewards, lengths) of fresh SFT samples -> `length_reward_corr_sft`.
    Also `length_reward_points` (a thinned sample of each source, for the report's scatter plot)
    and `warnings` (length_warning's, when length explains most of the reward)."""
    out: dict = {"length_reward_points": {}}
    warnings = []
    if held_out is not None:
        r_chosen, r_rejected, len_chosen, len_rejected = held_out
        ece, bins = calibration(r_chosen, r_rejected)
        lengths, rewards = list(len_chosen) + list(len_rejected), list(r_chosen) + list(r_rejected)
        out.update({S.CALIBRATION_ECE: ece, "calibration_bins": bins,
                    "reward_histogram": reward_histogram(r_chosen, r_rejected),
                    S.LENGTH_REWARD_CORR: pearson([float(v) for v in lengths], rewards)})
        out["length_reward_points"]["held_out"] = _thin(lengths, rewards)
        warnings.append(length_warning(out[S.LENGTH_REWARD_CORR], "the held-out preference pairs' responses"))
    if sft is not None:
        rewards, lengths = list(sft[0]), list(sft[1])
        out[S.LENGTH_REWARD_CORR_SFT] = pearson([float(v) for v in lengths], rewards)
        out["length_reward_points"]["sft"] = _thin(lengths, rewards)
        warnings.append(length_warning(out[S.LENGTH_REWARD_CORR_SFT], "fresh SFT samples"))
    out[S.WARNINGS] = [w for w in warnings if w]
    return out


def response_length(ids: list[int], prompt_len: int, eos_id: int | None) -> int:
    """Response tokens of a prompt+response row, its final EOS not counted."""
    n = len(ids) - prompt_len
    return n - 1 if n > 0 and eos_id is not None and ids[-1] == eos_id else n
