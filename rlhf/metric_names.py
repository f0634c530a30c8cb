"""Every metric name the pipeline writes, defined once.

Three kinds of names:

- the per-step rows of `DIR/metrics/<stage>.jsonl` and W&B (`PPO`, `Eval`, `HF`): PPO's names
  follow TRL's PPO trainer so its users find the dashboards they know; SFT and RM rows are the
  transformers Trainer's logs with `train_`/`eval_` turned into `train/` and `eval/`;
- the figures of a stage's manifest (`Summary`), which `rlhf status`, the report and the next
  stage read;
- `HEADLINE`: the figures each stage's closing line and `rlhf status` show.

The trainer, the stages, the report, `rlhf status`, the W&B dashboard and the benchmark import
these; tests spell the strings out, since the names are part of the user contract
(dashboards and scripts read them).
"""
from __future__ import annotations


class PPO:
    """One row per PPO update."""

    KL = "objective/kl"                              # mean over the rollout of sum_t KL_t(pi || pi_ref)
    KL_COEF = "objective/kl_coef"                    # beta of the KL penalty
    ENTROPY = "objective/entropy"                    # of the sampling distribution, per response (sum over tokens)
    NON_SCORE_REWARD = "objective/non_score_reward"  # -beta * KL, summed over the response
    RLHF_REWARD = "objective/rlhf_reward"            # score + non-score reward
    SCORES = "objective/scores"                      # normalised reward-model score (EOS penalty, clip)
    RAW_SCORES = "objective/raw_scores"              # the reward model's own units
    APPROXKL = "policy/approxkl_avg"                 # between PPO epochs
    CLIPFRAC = "policy/clipfrac_avg"
    POLICY_ENTROPY = "policy/entropy_avg"            # per token, during the PPO epochs
    FIRST_RATIO_DEV = "policy/first_ratio_dev"       # |ratio - 1| before any step: 0 unless dropout or a mismatch
    POLICY_LOSS = "loss/policy_avg"
    VALUE_LOSS = "loss/value_avg"
    VALUE_CLIPFRAC = "val/clipfrac_avg"
    KL_LOSS = "loss/kl_avg"                          # ppo.kl_penalty=loss: the KL term added to the policy loss (before beta)
    ZERO_STD_GROUPS = "rollout/zero_std_groups"      # share of prompts whose k samples all scored the same (no signal
                                                     # for rloo/grpo/dr_grpo); logged with samples_per_prompt >= 2
    RATIO = "val/ratio"
    RATIO_VAR = "val/ratio_var"
    NUM_EOS = "val/num_eos_tokens"
    RESPONSE_LENGTH = "val/response_length"
    # the vLLM engine's log-probs of its own samples against the actor's (pi_old): |difference| per token
    LOGPROB_DIFF_MEAN = "rollout/logprob_diff_mean"
    LOGPROB_DIFF_MAX = "rollout/logprob_diff_max"
    IS_WEIGHT = "rollout/is_weight_mean"            # mean truncated importance weight (vllm.importance_cap)
    DISTINCT_PROMPTS = "data/distinct_prompts"       # prompt-file rows drawn for the update over all processes
    LR = "lr"
    EPISODE = "episode"                              # the x-axis of the PPO dashboards
    EPISODES_PER_S = "throughput/episodes_per_s"
    TOKENS_PER_S = "throughput/tokens_per_s"

    @staticmethod
    def time(phase: str) -> str:
        """Seconds of an update spent in `phase` (rollout, update, step, generation, scoring, ...)."""
        return f"time/{phase}"


class Eval:
    """A held-out evaluation of the policy during PPO (every eval.every updates, and update 0)."""

    RM_SCORE = "eval/rm_score"
    GOLD_SCORE = "eval/gold_score"
    KL_TO_SFT = "eval/kl_to_sft"
    RESPONSE_LENGTH = "eval/response_length"
    EOS_RATE = "eval/eos_rate"
    # signals of reward hacking that need no gold scorer (rlhf.ppo.drift), against update 0's samples
    TOKEN_KL = "eval/token_kl_to_sft"        # KL of the response-token frequencies from the SFT policy's
    TOP_TOKEN_SHARE = "eval/top_token_share"  # the part of it the few most-grown tokens carry
    DISTINCT_2 = "eval/distinct_2"
    REPETITION = "eval/repetition"
    # with a reward-model ensemble (reward.ensemble): normalised member scores (rlhf.ensemble)
    ENSEMBLE_MEAN = "eval/ensemble_mean"      # mean over the members PPO optimises
    ENSEMBLE_SPREAD = "eval/ensemble_spread"  # standard deviation across all members, mean over responses
    SPREAD_RATIO = "eval/spread_ratio"        # ... over the same at update 0 (the SFT policy)
    CONSERVATIVE_SCORE = "eval/conservative_score"  # mean over responses of mean - lambda * spread (all members)
    HELD_OUT_MEMBER = "eval/held_out_member_score"  # the member PPO never optimises against
    ALL = (RM_SCORE, GOLD_SCORE, KL_TO_SFT, RESPONSE_LENGTH, EOS_RATE)

    @staticmethod
    def of(short: str) -> str:
        """`gold_score` -> `eval/gold_score` (ppo.keep_best names the metric without its prefix)."""
        return f"eval/{short}"


class HF:
    """SFT and reward-model rows: the transformers Trainer's logs as the tracker names them."""

    TRAIN_LOSS = "train/loss"
    EVAL_LOSS = "eval/loss"
    TRAIN_ACCURACY = "train/accuracy"
    EVAL_ACCURACY = "eval/accuracy"
    TRAIN_MARGIN = "train/margin"
    TOKEN_ACCURACY = "train/mean_token_accuracy"
    LEARNING_RATE = "train/learning_rate"

    @staticmethod
    def row_name(key: str) -> str:
        """A Trainer log key as a metrics row names it: eval_loss -> eval/loss, loss -> train/loss;
        the end-of-training totals (train_loss, train_runtime ...) and names with a / unchanged."""
        if "/" in key or key.startswith("train_"):
            return key
        if key.startswith("eval_"):
            return "eval/" + key[len("eval_"):]
        return "train/" + key


class Summary:
    """Figures in a stage's manifest (`metrics`)."""

    # sft
    EVAL_LOSS_INITIAL = "eval_loss_initial"
    EVAL_LOSS = "eval_loss"
    TRAIN_LOSS = "train_loss"
    # reward
    EVAL_ACCURACY = "eval_accuracy"
    SPEARMAN_GOLD = "spearman_gold"
    CALIBRATION_ECE = "calibration_ece"
    LENGTH_REWARD_CORR = "length_reward_corr"
    LENGTH_REWARD_CORR_SFT = "length_reward_corr_sft"
    WARNINGS = "warnings"
    # ppo: the final evaluation, published policy against the SFT reference on held-out prompts
    EVAL_PROMPTS = "eval_prompts"
    GOLD_SCORE_SFT = "gold_score_sft"
    GOLD_SCORE_PPO = "gold_score_ppo"
    GOLD_SCORE_SFT_STD = "gold_score_sft_std"
    GOLD_GAIN_IN_SFT_STD = "gold_gain_in_sft_std"
    RM_SCORE_SFT = "rm_score_sft"
    RM_SCORE_PPO = "rm_score_ppo"
    KL_PPO_VS_SFT = "kl_ppo_vs_sft"
    WIN_RATE_RM = "win_rate_rm"
    WIN_RATE_GOLD = "win_rate_gold"
    RESPONSE_LENGTH_SFT = "response_length_sft"
    RESPONSE_LENGTH_PPO = "response_length_ppo"
    EOS_RATE_SFT = "eos_rate_sft"
    EOS_RATE_PPO = "eos_rate_ppo"
    # ppo: the run and its over-optimisation guard
    UPDATES = "updates"
    EPISODES = "episodes"
    FINAL_SCORES = "final_objective_scores"  # the last update's objective/scores and objective/kl
    FINAL_KL = "final_objective_kl"
    FINAL_KL_COEF = "final_kl_coef"
    WITHIN_KL_BUDGET = "within_kl_budget"
    SELECTED_UPDATE = "selected_update"
    STOP_REASON = "stop_reason"
    GUARD_METRIC = "guard_metric"
    GUARD_REASON = "guard_reason"      # why the published update was selected, in words
    EXPLOITATION = "exploitation"      # [{update, signal, detail, ...}]: the drift flags of the held-out evaluations
    EVAL_CURVE = "eval_curve"          # [{update, kl, rm_score, gold_score, response_length, eos_rate}]
    BEST_OF_N = "best_of_n"            # [{n, kl, rm_score, gold_score}], kl analytic
    KL_BUDGET = "kl_budget"

    @staticmethod
    def time(part: str) -> str:
        """`loop_s` -> `time_loop_s`: where one invocation's wall time went (setup_s, loop_s, evaluation_s)."""
        return f"time_{part}"


HEADLINE = {  # stage -> the manifest figures its closing line and `rlhf status` show
    "sft": (Summary.EVAL_LOSS_INITIAL, Summary.EVAL_LOSS, Summary.TRAIN_LOSS),
    "reward": (Summary.EVAL_ACCURACY, Summary.SPEARMAN_GOLD, Summary.TRAIN_LOSS),
    "ppo": (Summary.GOLD_SCORE_SFT, Summary.GOLD_SCORE_PPO, Summary.RM_SCORE_SFT, Summary.RM_SCORE_PPO,
            Summary.KL_PPO_VS_SFT, Summary.WIN_RATE_GOLD),
}
