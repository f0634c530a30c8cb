"""One PPO run around a PPOTrainer: the update loop with its held-out evaluations, the
over-optimisation guard, the best-of-n baseline, the best-policy files, sample tables and
checkpoints, then the final SFT-vs-policy evaluation and the figures the manifest publishes.
stages/ppo.py only wires it: what to load, and where to publish."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from rlhf import artifacts, distributed, faults
from rlhf.artifacts import PPO as STAGE
from rlhf.config import ConfigError, EvalConfig
from rlhf.distributed import distinct_count
from rlhf.metric_names import PPO, Eval
from rlhf.metric_names import Summary as S
from rlhf.ppo import drift
from rlhf.ppo.evaluation import Drawn, Selector, best_of_n, evaluate, held_out_point, sample_rows
from rlhf.scoring import pearson
from rlhf.ppo.trainer import PPOTrainer, PromptStream
from rlhf.stage_io import say


class PPORun:
    """Drives `trainer` from its current update (0, or where a checkpoint left it) to the end.

    Held-out evaluation runs at update 0 (the SFT policy), every `eval.every` updates and at the
    last; the guard (Selector, ppo.keep_best / kl_budget / early_stop) picks the update to
    publish and may stop early; the best policy so far is kept in a file under the checkpoint
    directory, so a kill does not lose it. The guard's state and the best-of-n baseline travel
    in the trainer's checkpoints (its `extra` state)."""

    def __init__(self, trainer: PPOTrainer, *, ckpt_dir: Path, eval_cfg: EvalConfig, eval_prompts: list,
                 render: Callable[[Any], str], gold: Callable[[str, str], float] | None):
        """`eval_prompts`: the held-out prompt rows (at most eval.num_prompts); `render`: a prompt
        row as the policy sees it (chat template); `gold`: the optional gold scorer (evaluation only)."""
        self.trainer, self.ckpt_dir, self.gold = trainer, ckpt_dir, gold
        ppo_cfg = trainer.cfg
        self.save_every, self.sample_every = ppo_cfg.save_every, ppo_cfg.sample_every
        self.eval_prompts = eval_prompts
        self.eval_texts = [render(p) for p in eval_prompts]
        self.eval_tokens = eval_cfg.max_new_tokens or ppo_cfg.max_new_tokens  # the one place this default applies
        self.every = eval_cfg.every or max(1, trainer.plan.num_updates // 8)
        self.best_of_n_sizes, self.best_of_n_prompts = eval_cfg.best_of_n, eval_cfg.best_of_n_prompts
        metric, gate = guard_metric(ppo_cfg.keep_best, gold, getattr(trainer, "ensemble", None) is not None)
        self.selector = Selector(metric, ppo_cfg.kl_budget, ppo_cfg.early_stop, gate=gate)
        if "selector" in trainer.extra_state:
            self.selector.load_state_dict(trainer.extra_state["selector"])
        self.best_of_n: list[dict] | None = trainer.extra_state.get("best_of_n")
        # samples of held-out evaluations the final evaluation would draw again: the SFT policy's
        # (update 0, when the reference samples as the policy does) and those of the policy to publish
        self.drawn: dict[str, Drawn] = {}
        self.stop_reason: str | None = None
        self.selected: int | None = None
        self.last_metrics: dict = {}
        self._t_loop = self._t_eval = 0.0

    # ------------------------------------------------------------------ training
    def train(self, stream: PromptStream, tracker: Any) -> None:
        """The baseline and update 0's evaluation (unless resumed past them), then updates until the
        plan is done or the guard stops; finally the policy to publish is loaded into the trainer."""
        trainer, plan, selector = self.trainer, self.trainer.plan, self.selector
        if self.best_of_n is None and self.eval_prompts and self.best_of_n_sizes:
            self._best_of_n_baseline()
        if self.eval_prompts and not selector.curve:  # update 0: the SFT policy itself
            point = self._evaluate_now()
            tracker.log({**point, PPO.EPISODE: 0}, step=0)
        bar = tqdm(total=plan.num_updates, initial=trainer.update, desc="ppo", disable=not distributed.is_main())
        self._t_loop = time.time()
        while trainer.update < plan.num_updates and self.stop_reason is None:
            metrics = trainer.step(stream.next(plan.rollout_batch))
            metrics[PPO.DISTINCT_PROMPTS] = distinct_count(stream.drawn)  # rows of the prompt file, all ranks
            due = trainer.update % self.every == 0 or trainer.update == plan.num_updates
            point = self._evaluate_now() if self.eval_prompts and due else {}
            tracker.log({**metrics, **point}, step=trainer.update)
            faults.point("train:step")
            bar.update(1)
            bar.set_postfix(score=f"{metrics[PPO.SCORES]:.3f}", kl=f"{metrics[PPO.KL]:.3f}")
            if trainer.update % self.sample_every == 0 and self.eval_prompts:
                tracker.samples(trainer.update, sample_rows(trainer, self.eval_prompts[:8], self.eval_texts[:8],
                                                            self.eval_tokens))
            if trainer.update % self.save_every == 0 and trainer.update < plan.num_updates and self.stop_reason is None:
                self._checkpoint(stream)
            self.last_metrics = metrics
        bar.close()
        self.stop_reason = self.stop_reason or "completed"
        self._select()
        self._t_eval = time.time()

    def _best_of_n_baseline(self) -> None:
        n_p = self.best_of_n_prompts or len(self.eval_prompts)
        self.best_of_n = best_of_n(self.trainer, self.eval_prompts[:n_p], self.eval_texts[:n_p], self.gold,
                                   self.best_of_n_sizes, self.eval_tokens)
        say(STAGE, "best-of-n baseline: " + ", ".join(
            f"n={r['n']} rm={r['rm_score']:.3f}" + (f" gold={r['gold_score']:.3f}" if r["gold_score"] is not None else "")
            for r in self.best_of_n))

    def _evaluate_now(self) -> dict:
        """The held-out evaluation of the current policy, observed by the guard (which may set a stop reason)."""
        trainer, selector = self.trainer, self.selector
        point, samples = held_out_point(trainer, self.eval_prompts, self.eval_texts, self.gold, self.eval_tokens)
        flags = self._drift(point, samples)
        for f in flags:
            say(STAGE, f"warning: update {trainer.update}: {f['detail']}")
        grown = point.pop("grown_tokens", None)  # not a scalar: kept in the guard's curve, not logged
        new_best, self.stop_reason = selector.observe(trainer.update, point, flags)
        if grown is not None:
            selector.curve[-1]["grown_tokens"] = grown
        if trainer.update == 0 and trainer.reference_sampling == trainer.sampling:
            self.drawn["sft"] = samples
        if new_best or selector.metric is None:
            self.drawn["policy"] = samples
        if new_best and selector.metric is not None:  # kept on disk, so that a kill does not lose it
            trainer.save_policy_weights(self._best_path(trainer.update))
        return point

    def _drift(self, point: dict, samples: Drawn) -> list[dict]:
        """The drift signals of this evaluation against update 0's (the SFT policy's samples, kept in
        the guard's state), added to `point`; the exploitation flags they raise (rlhf.ppo.drift)."""
        selector, counts = self.selector, drift.token_counts(samples.tokens)
        lengths = torch.cat([g.response_mask.sum(1) for g in samples.gens]).float()
        view = {"response_length": point[Eval.RESPONSE_LENGTH], "spread": point.get(Eval.ENSEMBLE_SPREAD)}
        if selector.reference is None:  # update 0: the SFT policy itself
            selector.reference = {**view, "counts": sorted(counts.items()),
                                  "length_corr": pearson([float(v) for v in samples.rm], lengths.tolist())}
            return []
        ref = selector.reference
        d = drift.token_drift(counts, Counter(dict(ref["counts"])))
        point[Eval.TOKEN_KL], point[Eval.TOP_TOKEN_SHARE] = d["kl"], d["top_share"]
        if view["spread"] is not None and ref.get("spread"):
            point[Eval.SPREAD_RATIO] = view["spread"] / ref["spread"]
        names = {t["token"]: self.trainer.tokenizer.decode([t["token"]]) for t in d["tokens"]}
        point["grown_tokens"] = [{"token": names[t["token"]], "sft": round(t["sft"], 5),
                                            "policy": round(t["policy"], 5), "ratio": round(t["ratio"], 3),
                                            "share": round(t["share"], 4)} for t in d["tokens"]]
        return drift.flags({**view, "drift": d}, ref, reward_length_corr=ref.get("length_corr"), names=names)

    def _best_path(self, update: int) -> Path:
        """The guard's best policy of `update`, referenced by the checkpoints."""
        return self.ckpt_dir / "best" / f"update-{update}.safetensors"

    def _checkpoint(self, stream: PromptStream) -> None:
        self.trainer.save(self.ckpt_dir, stream, extra={"selector": self.selector.state_dict(),
                                                              "best_of_n": self.best_of_n})
        if distributed.is_main():  # best-policy files of updates neither kept checkpoint refers to
            referenced = {self.selector.best_update} | {((s.get("extra") or {}).get("selector") or {}).get("best_update")
                                                        for _, s, _ in artifacts.ppo_states(self.ckpt_dir)}
            keep = {self._best_path(u) for u in referenced if u is not None}
            for f in (self.ckpt_dir / "best").glob("update-*.safetensors"):
                if f not in keep:
                    f.unlink(missing_ok=True)

    def _select(self) -> None:
        """Load the guard's choice into the trainer (unless it is the last update) and say why."""
        trainer, selector = self.trainer, self.selector
        self.selected = trainer.update
        if selector.metric is not None and selector.best_update is not None and selector.best_update != trainer.update:
            trainer.load_policy_weights(self._best_path(selector.best_update))
            self.selected = selector.best_update
        if self.stop_reason != "completed" or self.selected != trainer.update:
            say(STAGE, f"stopped: {self.stop_reason} after update {trainer.update}; publishing the policy of update "
                       f"{self.selected}: {selector.reason(self.selected)}")

    # ------------------------------------------------------------------ the result
    def final_evaluation(self) -> tuple[dict, list[dict]]:
        """The published policy against the SFT reference on the held-out prompts (figures, sample
        rows), reusing the held-out evaluations' samples where they are the same draws."""
        faults.point("evaluation:start")
        if not self.eval_prompts:
            return {}, []
        policy = self.drawn.get("policy")
        if policy is not None and policy.update != self.selected:  # a later update's: not the one published
            policy = None
        return evaluate(self.trainer, self.eval_prompts, self.eval_texts, self.gold, self.eval_tokens, policy=policy,
                        sft=self.drawn.get("sft"))

    def summary(self, evaluation: dict, started: float) -> dict:
        """The manifest's figures: the run, the guard, the baseline, the final evaluation, and where
        this invocation's time went since `started` (a resumed run's loop covers only its own updates)."""
        trainer, selector, final = self.trainer, self.selector, self.last_metrics
        seconds = {"setup_s": self._t_loop - started, "loop_s": self._t_eval - self._t_loop,
                   "evaluation_s": time.time() - self._t_eval}
        out = {S.UPDATES: trainer.update, S.EPISODES: trainer.update * trainer.plan.episodes_per_update,
               S.SELECTED_UPDATE: self.selected, S.STOP_REASON: self.stop_reason, S.GUARD_METRIC: selector.metric,
               S.GUARD_REASON: selector.reason(self.selected) if self.selected is not None else None,
               S.EXPLOITATION: selector.flags, S.WARNINGS: warnings(selector, self.selected),
               S.EVAL_CURVE: [curve_row(p) for p in selector.curve], S.BEST_OF_N: self.best_of_n or [],
               S.FINAL_SCORES: final.get(PPO.SCORES), S.FINAL_KL: final.get(PPO.KL),
               S.FINAL_KL_COEF: trainer.kl_ctl.value, S.KL_BUDGET: trainer.cfg.kl_budget, **evaluation,
               **{S.time(k): v for k, v in seconds.items()}}
        if S.KL_PPO_VS_SFT in evaluation:
            out[S.WITHIN_KL_BUDGET] = evaluation[S.KL_PPO_VS_SFT] <= trainer.cfg.kl_budget
        return out


def guard_metric(keep_best: str, gold: Any, ensemble: bool = False) -> tuple[str | None, bool]:
    """(the eval/* metric the published policy is chosen by (ppo.keep_best; None: the last update),
    whether the drift signals gate it). Without a gold scorer (`conservative`, and `auto` without
    one): a reward ensemble's conservative score, else the RM score, gated."""
    if keep_best == "auto":
        keep_best = "gold_score" if gold is not None else "conservative"
    if keep_best == "last":
        return None, False
    if keep_best == "conservative":
        return (Eval.CONSERVATIVE_SCORE if ensemble else Eval.RM_SCORE), True
    if keep_best == "gold_score" and gold is None:
        raise ConfigError("ppo.keep_best=gold_score needs eval.gold_scorer; use conservative, rm_score, auto or last")
    return Eval.of(keep_best), False


def warnings(selector: Selector, published: int | None) -> list[str]:
    """The manifest's warnings: one per drift signal that flagged an evaluation, at its first
    flagged update, with the evidence and where the published update stands."""
    out, seen = [], set()
    for f in selector.flags:
        if f["signal"] in seen:
            continue
        seen.add(f["signal"])
        where = ("" if published is None else
                 f"; the published update {published} is before it" if published < f["update"] else
                 f"; the published update {published} is at or after it: check its samples")
        name = {"tokens": "token drift", "length": "length", "spread": "ensemble spread"}.get(f["signal"], f["signal"])
        out.append(f"possible reward hacking ({name}) from update {f['update']}: {f['detail']}{where}")
    return out


CURVE_KEYS = {"rm_score": Eval.RM_SCORE, "gold_score": Eval.GOLD_SCORE, "response_length": Eval.RESPONSE_LENGTH,
              "eos_rate": Eval.EOS_RATE, "distinct_2": Eval.DISTINCT_2, "repetition": Eval.REPETITION,
              "token_kl": Eval.TOKEN_KL, "top_token_share": Eval.TOP_TOKEN_SHARE, "ensemble_mean": Eval.ENSEMBLE_MEAN,
              "ensemble_spread": Eval.ENSEMBLE_SPREAD, "spread_ratio": Eval.SPREAD_RATIO,
              "conservative_score": Eval.CONSERVATIVE_SCORE, "held_out_member_score": Eval.HELD_OUT_MEMBER}


def curve_row(point: dict) -> dict:
    """One held-out evaluation as the manifest's eval_curve lists it (a signal the run did not
    compute is left out; gold_score is None without a gold scorer)."""
    row = {"update": point["update"], "kl": point[Eval.KL_TO_SFT]}
    row.update({k: point.get(e) for k, e in CURVE_KEYS.items() if e in point or k == "gold_score"})
    row["flags"] = point.get("flags", [])
    if "grown_tokens" in point:
        row["grown_tokens"] = point["grown_tokens"]
    return row
