"""
PPO for language models against a learned reward, with a per-token KL penalty to the SFT model.

    python ppo.py    # the PPO stage of runs/tiny (--run-dir another run; tiny on CPU, paper on GPU)

The algorithm, in the order of one iteration (train_ppo):
  1. rollout: `rollouts_per_prompt` answers to each of batch_size / rollouts_per_prompt prompts,
     sampled with model.generate; policy `logprobs`, `ref_logprobs` and `values` by one
     teacher-forced pass each; `score` = score_fn: the reward model's scalar at the last token
     of the tool report appended to the answer (reward.load_reward_model; --compare's d-RLAIF:
     the judge's score).
  2. rewards: the score of an answer cut off before <|endoftext|> lowered by missing_eos_penalty;
     [not in the paper] minus the mean score of the same prompt's other answers (a per-prompt
     baseline, Kool et al. 2019; Ahmadian et al. 2024), then
     r_t = -kl_coef * (logprobs_t - ref_logprobs_t), plus that score at the last token
     (Ziegler et al. 2019, eq. 2; lm-human-preferences compute_rewards).
  3. advantages: GAE (Schulman et al. 2016, eq. 11-16) with gamma = 1 and lam = 1, so the answer's
     score reaches every token, the API choice near the start included;
     returns = advantages + values.
  4. update: `epochs` passes over minibatches of the clipped surrogate (Schulman et al. 2017, eq. 7)
     plus the clipped value loss. The value model starts from the reward model's network with a
     zero head and is trained alone in the first `critic_warmup` iterations, so its first
     predictions are on the score's scale. Beside the leave-one-out baseline, what is left for
     the critic to predict is the difference between a prompt's answers (docs/experiments.md,
     "The critic at the default settings", measures what it adds). `--critic shared` puts a
     value head on the policy's own trunk instead (TRL's AutoModelForCausalLMWithValueHead):
     one trunk pass gives log-probs and values, and the value loss trains the trunk too: PPO
     about 30% faster and one network fewer in memory; on validation (seeds 1-3) hallucination
     was 4.2 points higher, about PPO's own run-to-run spread (docs/experiments.md, "The critic
     on the policy's trunk" and "PPO's spread at fixed inputs").
  5. KL controller: kl_coef follows the measured KL (adaptive_kl), or stays fixed.
`--advantage rloo` [not in the paper] swaps steps 3-4's critic for RLOO's leave-one-out baseline on
the whole answer's return (Ahmadian et al. 2024, eq. 8), with the same rollout, KL and clipped
update.
`--advantage grpo` [not in the paper] is GRPO (Shao et al. 2024, DeepSeekMath, eq. 3): the score
normalised within the prompt's group (minus the group's mean, over its std), no critic, and the KL
to the SFT model as a loss term (the k3 estimator) instead of a reward term. Where it differs from
RLOO: the group mean includes the answer itself, the std rescales every prompt's advantages to the
same size, and the KL does not enter the advantage. Where it differs from eq. 3: the loss is a mean
over the minibatch's tokens, not a mean per answer (1/|o_i|) then over answers; per-answer means
give a short answer's tokens more weight, the length bias that Dr. GRPO (Liu et al. 2025) and DAPO's
token-level loss (Yu et al. 2025) remove, and every method here shares one token-level loss.
Under torchrun each rank samples its share of the prompts; the ranks' numbers meet only in the
section "Under torchrun" and in the update's distributed.average_gradients, so that every piece of
math here is the single-process math on the global batch.
Comments tagged [N-details] name the implementation details of Huang et al. 2023 ("The N
Implementation Details of RLHF with PPO") each line implements; docs/experiments.md says why each
default is what it is.
"""

import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated

import torch

from config import driver_flag, stage_command_line
from data.gorilla import prepare
from distributed import DIST, all_sum, average_gradients, barrier, is_main, shard
from judge import judge_score, make_judge
from model import (
    GPT,
    FlopMeter,
    answer_states,
    generate,
    left_pad,
    response_logprobs,
    right_pad,
    sample_answers,
    states_logprobs,
)
from reward import load_reward_model, read_reward_model
from runs import (
    atomic_dir,
    log,
    metrics_tag,
    resume,
    run_alone,
    run_file,
    run_stage,
    save_checkpoint,
    tensorboard_text,
    write_metrics,
)
from training import autocast, check_loss, frozen_dtype, make_optimizer, progress, stream_seed


@dataclass
class PPOConfig:
    """PPO's settings (rlaif.py --ppo-* or --set ppo.NAME=VALUE, python ppo.py --*). Each is a
    symbol of the equations below or a batch size under the names of lm-human-preferences and TRL's
    PPOConfig, so all stay settable by name: a porter matches another implementation by setting
    them, not by editing code."""

    iterations: Annotated[
        int, "PPO iterations (one rollout batch + its update each), critic warm-up included", ">= 1"
    ] = 40
    batch_size: Annotated[int, "answers sampled per iteration", ">= 1"] = 64
    rollouts_per_prompt: Annotated[
        int,
        "answers per prompt in a batch; the mean score of the others is each one's "
        "baseline (1 = no per-prompt baseline)",
        ">= 1",
    ] = 8
    minibatch_size: Annotated[int, "answers per gradient step", ">= 1"] = 32
    grad_accum: Annotated[
        int, "minibatches accumulated per optimizer step (big models on one GPU)", ">= 1"
    ] = 1
    epochs: Annotated[int, "passes over each rollout batch", ">= 1"] = 2
    lr: Annotated[float, "AdamW learning rate of the policy", "> 0"] = 2e-5
    vf_lr: Annotated[float, "AdamW learning rate of the value model", "> 0"] = 1e-4
    critic: Annotated[
        str,
        "separate: the value model is the reward model's network (lm-human-preferences); "
        "shared: a value head on the policy's trunk, one pass for log-probs and values (TRL's "
        "AutoModelForCausalLMWithValueHead) (gae only)",
        ("separate", "shared"),
    ] = "separate"
    critic_warmup: Annotated[
        int,
        "first iterations that train only the value model (the policy waits) [not in the paper]",
        ">= 0",
    ] = 2
    advantage: Annotated[
        str,
        "gae: PPO's critic and GAE (the paper); rloo: leave-one-out baseline, no critic; "
        "grpo: group-normalised score, KL as a loss term [not in the paper]",
        ("gae", "rloo", "grpo"),
    ] = "gae"
    gamma: Annotated[float, "discount; 1 as in lm-human-preferences", ">= 0 and <= 1"] = 1.0
    lam: Annotated[
        float, "GAE lambda; 1 carries the final score to every answer token", ">= 0 and <= 1"
    ] = 1.0
    whiten_advantages: Annotated[
        bool,
        "whiten advantages over the batch [N-details]; off by default, since whitening "
        "scales a batch with no reward signal up to full-size steps",
    ] = False
    cliprange: Annotated[float, "PPO ratio clip epsilon", "> 0"] = 0.2
    cliprange_value: Annotated[float, "value-prediction clip around the rollout values", "> 0"] = (
        0.2
    )
    vf_coef: Annotated[float, "weight of the value loss", ">= 0"] = 0.1
    init_kl_coef: Annotated[float, "beta, the KL penalty coefficient at the start", ">= 0"] = 0.05
    adaptive_kl: Annotated[
        bool, "adapt beta toward target_kl (Ziegler et al. 2019); off keeps it fixed"
    ] = False
    target_kl: Annotated[
        float,
        "target KL(policy || SFT) per answer, in nats (adaptive_kl only; older TRL's `target`, "
        "not TRL's early-stopping target_kl)",
        "> 0",
    ] = 3.0
    # Ziegler et al.'s horizon, 10,000 answers, was small beside their millions; at 1,000, 32
    # answers an iteration could move beta by x1.0064 at most (x1.3 over 40 iterations). At 128
    # the default's 64 answers move it up to x1.1 an iteration (reach: ppo.kl_reach, logged).
    kl_horizon: Annotated[int, "KL controller horizon, in answers (adaptive_kl only)", ">= 1"] = 128
    missing_eos_penalty: Annotated[
        float,
        "added to the score of answers cut off before <|endoftext|>, so negative (TRL's option "
        "of this name is positive and subtracted; lm-human-preferences replaces the score with "
        "-1) [N-details: EOS trick]; 0 disables",
    ] = -1.0
    val_every: Annotated[
        int,
        "score greedy answers to the validation questions after the first, every N-th "
        "and the last iteration (0 = never)",
        ">= 0",
    ] = 10


# -----------------------------------------------------------------------------
# The loop: each iteration runs the five steps of the header (the functions below, in order)


def check_config(cfg):
    """Refuse settings train_ppo cannot run, before any work."""
    if cfg.rollouts_per_prompt < 1 or cfg.batch_size % cfg.rollouts_per_prompt:
        raise ValueError(
            f"ppo batch_size {cfg.batch_size} must be a multiple of rollouts_per_prompt "
            f"{cfg.rollouts_per_prompt}"
        )
    if cfg.advantage != "gae" and cfg.rollouts_per_prompt < 2:
        raise ValueError(
            f"ppo advantage {cfg.advantage} needs rollouts_per_prompt >= 2 (a baseline from the "
            "prompt's other answers)"
        )
    if cfg.minibatch_size < 1:
        raise ValueError(f"ppo minibatch_size must be at least 1, not {cfg.minibatch_size}")
    if cfg.batch_size % (DIST.world * cfg.rollouts_per_prompt) or cfg.minibatch_size % DIST.world:
        raise ValueError(
            f"under torchrun with {DIST.world} ranks, ppo batch_size must be a multiple of "
            f"{DIST.world} x rollouts_per_prompt and minibatch_size a multiple of {DIST.world}"
        )


def train_ppo(
    policy, ref_policy, value_model, score_fn, prompts, tok, cfg, run_cfg, out_dir, validate=None
):
    """Run cfg.iterations of PPO, the steps of this file's header; checkpoint after each iteration
    (atomically) and resume from the last checkpoint. prompts: token lists. score_fn(query,
    query_mask, response, response_mask) -> (B,) scores. tok: its eot ends an answer, its decode
    shows a sample every 10 iterations. value_model: the critic with cfg.advantage == 'gae', else
    None. run_cfg: the run's config.Config, for the settings PPO shares with the other stages
    (seed, device, temperature, max_answer_tokens, grad_clip). validate(policy, iteration) -> dict
    of metrics, at validation_due iterations."""
    check_config(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_policy.eval().requires_grad_(False)
    kl_ctl = kl_controller(cfg)  # step 5
    optimizers, modules, start, history = training_state(
        policy, value_model, kl_ctl, cfg, out_dir / "ckpt.pt", run_cfg.device
    )
    t_start = time.time()
    for it in range(start, cfg.iterations):
        meter, kl_coef = FlopMeter(), kl_ctl.value  # the iteration's clock, FLOPs, KL penalty
        # 1. rollout: this rank's share of the prompts, sampled with a seed of its own
        rollout_seed = stream_seed(run_cfg.seed, 104729, it + 7919 * DIST.rank)  # a stream per rank
        generator = torch.Generator().manual_seed(rollout_seed)
        its_prompts = iteration_prompts(prompts, cfg, run_cfg.seed, it)
        batch = rollout(
            policy, ref_policy, value_model, score_fn, its_prompts, run_cfg, tok.eot, generator
        )
        # 2-3. rewards, advantages and returns, on every rank's answers
        global_batch = gather_batch(batch)  # one process: the batch itself
        share, kl, advantages, returns, mc_returns = advantages_and_returns(
            global_batch, cfg, kl_coef
        )
        # 4. update on this rank's rows (one process: all); in the critic warm-up, the critic alone
        t_update = time.time()
        batch.update(advantages=own_rows(advantages, batch), returns=own_rows(returns, batch))
        train_policy = not in_critic_warmup(cfg, it)
        stats = ppo_update(
            policy, value_model, optimizers, batch, cfg, run_cfg, generator, kl_coef, train_policy
        )
        check_ppo_loss(stats, it, train_policy)
        t_update = time.time() - t_update
        # 5. KL controller: beta for the next iteration (fixed beta, the default: no change)
        kl_ctl.update(kl.sum(1).mean().item(), cfg.batch_size)
        # record: metrics, validation, log line, sample, checkpoint
        row = iteration_metrics(it, cfg, global_batch, share, kl, mc_returns, kl_coef, stats)
        row.update(iteration_times(batch, t_update, meter, policy))
        if validate is not None and validation_due(cfg, it):
            row.update(validate(policy, it + 1))
        history.append(row)
        log_iteration(
            row, cfg.iterations, progress(it + 1 - start, cfg.iterations - start, t_start)
        )
        if (it + 1) % 10 == 0:
            log_sample(batch, kl, tok.decode)
        save_state(out_dir, modules, optimizers, kl_ctl, it + 1, history, cfg)
    return history


# Before the loop: step 5's KL controller and the state a run resumes from


def kl_controller(cfg):
    """Step 5's controller: fixed beta (the default; its update does nothing) or adaptive."""
    if not cfg.adaptive_kl:
        return FixedKLController(cfg.init_kl_coef)
    log(
        f"[ppo] adaptive KL: target {cfg.target_kl} nats; beta can move by x{kl_reach(cfg):.3g} "
        f"at most over {cfg.iterations} iterations (kl_horizon {cfg.kl_horizon} answers)"
    )
    return AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)


# what a resumed PPO may change: how long it runs and how often it validates
RESUMABLE_CHANGES = ("iterations", "val_every")


def training_state(policy, value_model, kl_ctl, cfg, ckpt_file, device):
    """(optimizers, modules by checkpoint key, first iteration, history): new, or resumed from
    ckpt_file (kl_ctl's beta too) if it was made with the same settings. AdamW without weight
    decay (training.make_optimizer); the value model has its own optimizer and learning rate
    (vf_lr); with the shared critic that is the head's, and the value loss's share of the trunk's
    gradient steps at the policy's lr."""
    if (value_model is not None) != (cfg.advantage == "gae"):
        raise ValueError(f"ppo advantage {cfg.advantage}: a value model with 'gae' only")
    if value_model is not None and isinstance(value_model, ValueHead) != (cfg.critic == "shared"):
        raise ValueError(f"ppo critic {cfg.critic}: got a {type(value_model).__name__}")
    optimizers = [make_optimizer(policy, cfg.lr, weight_decay=0.0)]
    modules = dict(policy=policy)
    if value_model is not None:
        optimizers.append(make_optimizer(value_model, cfg.vf_lr, weight_decay=0.0))
        modules["value"] = value_model
    iteration, history, ckpt = resume(
        ckpt_file,
        device,
        None,
        "ppo",
        log,
        "iteration",
        settings=asdict(cfg),
        may_change=RESUMABLE_CHANGES,
        **modules,
    )
    for optimizer, state in zip(optimizers, ckpt.get("optimizers", []), strict=False):
        optimizer.load_state_dict(state)
    kl_ctl.value = ckpt.get("kl_coef", kl_ctl.value)
    return optimizers, modules, iteration, history


# -----------------------------------------------------------------------------
# One iteration: rollout, advantages, update (train_ppo calls them in this order)


def iteration_prompts(prompts, cfg, seed, it):
    """The iteration's prompts, each repeated rollouts_per_prompt times in a row: a pure function of
    (seed, iteration), so a resumed run samples exactly what an uninterrupted one would. Under
    torchrun, this rank's share of them."""
    n = cfg.batch_size // cfg.rollouts_per_prompt
    rng = random.Random(stream_seed(seed, 104729, it))
    chosen = rng.sample(prompts, n) if len(prompts) >= n else rng.choices(prompts, k=n)
    return [p for p in shard(chosen) for _ in range(cfg.rollouts_per_prompt)]  # one process: all


@torch.no_grad()
def rollout(policy, ref_policy, value_model, score_fn, prompts, run_cfg, eot, generator):
    """Step 1: answers to `prompts` sampled from the policy, and what the update needs of them: the
    policy's `logprobs`, the reference's `ref_logprobs`, the critic's `values` (zeros without a
    critic) and the reward's `score`. run_cfg: device, temperature, max_answer_tokens. Nothing here
    carries gradients."""
    device, temperature = run_cfg.device, run_cfg.temperature
    query, query_mask = left_pad(prompts, eot, device)
    policy.eval()  # [N-details: dropout off] (our dropout is 0 anyway; eval() makes it explicit)
    t0 = time.time()
    with autocast(device):
        response, response_mask, _ = generate(
            policy,
            query,
            query_mask,
            run_cfg.max_answer_tokens,
            eot,
            temperature,
            generator=generator,
        )
    t_generate = time.time() - t0
    tokens = (query, query_mask, response, response_mask)
    with autocast(device):
        # Recompute log-probs with the training forward rather than reuse the sampler's: the update
        # then starts from a ratio of 1 (up to bf16 rounding on GPU) [N-details: recompute
        # logprobs].
        logprobs, _, values = logprobs_and_values(policy, value_model, tokens, temperature)
        ref_logprobs = response_logprobs(ref_policy, *tokens, temperature)
        if values is None:
            values = torch.zeros(response.shape, device=device)
        score = score_fn(*tokens).float()
    ended = response[torch.arange(len(response)), response_mask.sum(1) - 1] == eot
    return dict(
        query=query,
        query_mask=query_mask,
        response=response,
        response_mask=response_mask,
        mask=response_mask.float(),
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        score=score,
        ended=ended,
        t_generate=t_generate,
        t_forward=time.time() - t0 - t_generate,
    )


def advantages_and_returns(batch, cfg, kl_coef):
    """Steps 2-3: (the score's share of the advantages, per-token KL, advantages, returns,
    Monte-Carlo returns) of a rollout batch. Three scores: batch["score"] (the reward's),
    eos_score (with the end-of-text penalty) and baselined_score (eos_score minus the mean of the
    prompt's other answers).
    returns is None for RLOO and GRPO, which have no critic to train. Each advantage subtracts
    the prompt's baseline once: GAE from the baselined score, RLOO and GRPO from their own group
    statistics."""
    mask, k = batch["mask"], cfg.rollouts_per_prompt
    eos_score = eos_penalised(batch["score"], batch["ended"], cfg.missing_eos_penalty)
    # [not in the paper] minus the mean score of the prompt's other answers: most of a learned
    # reward's variance is between prompts (how hard the task is), which no action changes
    baselined_score = leave_one_out(eos_score, k)
    estimate = ESTIMATORS[cfg.advantage]
    rewards, kl, advantages, returns = estimate(batch, baselined_score, eos_score, cfg, kl_coef)
    # the rewards to go, which explained_variance measures the critic against
    _, mc_returns = gae(rewards, torch.zeros_like(rewards), mask, cfg.gamma, 1.0)
    # before whitening, which rescales the advantages; GRPO's are the normalised score alone
    share = 1.0 if cfg.advantage == "grpo" else score_share(baselined_score, advantages, mask, cfg)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    return share, kl, advantages, returns, mc_returns


def gae_estimator(batch, baselined_score, eos_score, cfg, kl_coef):
    """PPO, the paper's: the KL penalty in the per-token reward, the baseline-corrected score at
    the last token, GAE over the critic's values. -> (rewards, kl, advantages, returns)"""
    mask = batch["mask"]
    rewards, kl = compute_rewards(
        baselined_score, batch["logprobs"], batch["ref_logprobs"], mask, kl_coef
    )
    return (rewards, kl, *gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam))


def rloo_estimator(batch, baselined_score, eos_score, cfg, kl_coef):
    """RLOO: the raw score and the KL penalty in the reward; the baseline is the whole return of the
    prompt's other answers (no critic, no returns)."""
    mask = batch["mask"]
    rewards, kl = compute_rewards(
        eos_score, batch["logprobs"], batch["ref_logprobs"], mask, kl_coef
    )
    return rewards, kl, rloo_advantages(rewards, mask, cfg.rollouts_per_prompt), None


def grpo_estimator(batch, baselined_score, eos_score, cfg, kl_coef):
    """GRPO: the group-normalised score; the KL is a loss term (minibatch_loss), not a reward, so
    the rewards carry none (kl is still measured)."""
    mask = batch["mask"]
    rewards, kl = compute_rewards(eos_score, batch["logprobs"], batch["ref_logprobs"], mask, 0.0)
    return rewards, kl, grpo_advantages(eos_score, mask, cfg.rollouts_per_prompt), None


# the advantage estimators by --advantage: step 3 of the loop takes one, with one signature
ESTIMATORS = dict(gae=gae_estimator, rloo=rloo_estimator, grpo=grpo_estimator)


# the update's statistics, in the order of a metrics row
UPDATE_STATS = (
    "loss/policy_avg",
    "loss/value_avg",
    "policy/clipfrac_avg",
    "policy/approxkl_avg",
    "objective/entropy",
    "loss/grad_norm",
)
# what one gradient step reads of the batch: the answers, their masks and the rollout's numbers
MINIBATCH_KEYS = (
    *("query", "query_mask", "response", "response_mask", "mask"),
    *("logprobs", "ref_logprobs", "values"),
)


def ppo_update(
    policy, value_model, optimizers, batch, cfg, run_cfg, generator, kl_coef, train_policy
):
    """Step 4: cfg.epochs passes over random minibatches of this rank's answers (batch, with their
    `advantages` and `returns`), one optimizer step per grad_accum minibatches; returns the mean
    statistics. train_policy False: the value loss only (the critic warm-up). run_cfg: device,
    temperature, grad_clip."""
    B = batch["response"].size(0)
    minibatch_size = cfg.minibatch_size // DIST.world  # this rank's rows
    stats = {k: [] for k in UPDATE_STATS}
    policy.train()
    params = list(policy.parameters())
    if value_model is not None:
        value_model.train()
        params += list(value_model.parameters())
    starts = range(0, B, minibatch_size)
    for _ in range(cfg.epochs):
        perm = torch.randperm(B, generator=generator)
        for i, start in enumerate(starts):
            idx = perm[start : start + minibatch_size].to(run_cfg.device)
            mb = {k: batch[k][idx] for k in MINIBATCH_KEYS}
            mb["advantages"] = batch["advantages"][idx]
            mb["returns"] = None if batch["returns"] is None else batch["returns"][idx]
            loss, minibatch_stats = minibatch_loss(
                policy, value_model, mb, cfg, run_cfg, kl_coef, train_policy
            )
            for k, v in minibatch_stats.items():
                stats[k].append(v)
            (loss / cfg.grad_accum).backward()
            if (i + 1) % cfg.grad_accum == 0 or i == len(starts) - 1:  # none carried past an epoch
                average_gradients(params)  # torchrun: the global gradient; one process: none
                # one norm over policy and critic, as lm-human-preferences clips their joint loss;
                # logged before clipping, so a reader sees whether grad_clip binds
                norm = torch.nn.utils.clip_grad_norm_(params, run_cfg.grad_clip)
                stats["loss/grad_norm"].append(norm.item())
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


def minibatch_loss(policy, value_model, mb, cfg, run_cfg, kl_coef, train_policy):
    """One minibatch's loss and its statistics (floats): the clipped surrogate, plus GRPO's KL term,
    when train_policy; plus vf_coef x the clipped value loss when there is a critic."""
    tokens = (mb["query"], mb["query_mask"], mb["response"], mb["response_mask"])
    mask = mb["mask"]
    with autocast(run_cfg.device):
        new_logprobs, entropy, new_values = logprobs_and_values(
            policy, value_model, tokens, run_cfg.temperature, train_policy, with_entropy=True
        )
    means = {}  # over this rank's real tokens
    if train_policy:
        means["loss/policy_avg"], means["policy/clipfrac_avg"], means["policy/approxkl_avg"] = (
            policy_loss(new_logprobs, mb["logprobs"], mb["advantages"], mask, cfg.cliprange)
        )
        means["objective/entropy"] = masked_mean(entropy, mask)
        if cfg.advantage == "grpo":
            means["k3_kl"] = masked_mean(k3_kl(new_logprobs, mb["ref_logprobs"]), mask)
    if value_model is not None:
        means["loss/value_avg"] = value_loss(
            new_values, mb["values"], mb["returns"], mask, cfg.cliprange_value
        )
    means = global_means(means, mask.sum())  # one process: the means as they are
    loss = 0.0
    if train_policy:
        loss = loss + means["loss/policy_avg"]
    if "k3_kl" in means:  # Shao et al. 2024, eq. 3: - beta D_KL, as a loss
        loss = loss + kl_coef * means["k3_kl"]
    if value_model is not None:
        loss = loss + cfg.vf_coef * means["loss/value_avg"]
    return loss, {k: means[k].item() for k in UPDATE_STATS if k in means}


# -----------------------------------------------------------------------------
# The math of steps 1-5 (the value head's predictions of steps 1 and 4, then steps 2-5 in order),
# each a few lines of single-process tensor code, each tested in tests/test_ppo.py


def masked_mean(x, mask):
    """Mean of x over the real tokens (mask 1); padding (mask 0) counts for nothing."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of x over the real tokens."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)


def logprobs_and_values(
    policy, value_model, tokens, temperature, with_policy=True, with_entropy=False
):
    """(logprobs, entropy, values) of a batch's answers: the policy's log-probs (B, R), their
    entropy (with_entropy, else None) and the critic's values (None without a critic).
    with_policy False (the critic warm-up): no log-probs, and no gradient into the policy.
    A ValueHead (critic 'shared') reads the policy's own answer_states: one pass of the trunk
    serves both, and the value loss trains the trunk too, as in TRL. A separate value model runs
    its own network."""
    response, response_mask = tokens[2:]
    values = hidden = None
    if isinstance(value_model, ValueHead):
        with torch.set_grad_enabled(torch.is_grad_enabled() and with_policy):  # warm-up: it waits
            hidden = answer_states(policy, *tokens)
        values = value_model(hidden) * response_mask
    elif value_model is not None:
        values = value_predictions(value_model, *tokens)
    if not with_policy:
        return None, None, values
    if hidden is None:
        hidden = answer_states(policy, *tokens)
    if with_entropy:
        logprobs, entropy = states_logprobs(
            policy, hidden, response, response_mask, temperature, True
        )
        return logprobs, entropy, values
    return states_logprobs(policy, hidden, response, response_mask, temperature), None, values


def value_predictions(value_model, query, query_mask, response, response_mask):
    """V(s_t) for each answer token t of a separate value model: its head at the position that
    predicts token t."""
    Q = query.size(1)
    values = value_model(torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1))
    return values[:, Q - 1 : -1].float() * response_mask


def eos_penalised(score, ended, missing_eos_penalty):
    """The score plus missing_eos_penalty for an answer cut off before <|endoftext|> [N-details:
    EOS trick, which replaces the score with -1 instead; adding keeps the reward model's order
    among cut-off answers, as TRL's subtracted missing_eos_penalty does]."""
    return torch.where(ended, score, score + missing_eos_penalty)


def leave_one_out(x, k):
    """x_i minus the mean of the other k-1 entries of its group; groups are k consecutive entries
    (the answers to one prompt). The baseline does not depend on x_i, so the policy gradient stays
    unbiased (Kool et al. 2019, "Buy 4 REINFORCE samples"; Ahmadian et al. 2024, eq. 8).
    k = 1: x unchanged."""
    if k <= 1:
        return x
    groups = x.view(-1, k)
    return (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).view(-1)


def compute_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token reward: -kl_coef * (logprobs - ref_logprobs), with the score added at each answer's
    last real token (Ziegler et al. 2019, eq. 2). The KL term uses the sampled-token estimator
    log pi(a|s) - log pi_ref(a|s) [N-details: KL estimator]."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 11-16) as the plain backwards
    loop: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; V beyond the
    answer is 0. With lam = 1 the returns are the Monte-Carlo returns (the rewards to go), whatever
    the values."""
    values = values * mask
    T = rewards.size(1)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], 1)
    returns = advantages + values
    return advantages, returns


def rloo_advantages(rewards, mask, k):
    """[not in the paper] RLOO (Ahmadian et al. 2024, eq. 8): the whole answer is one action; its
    return (score minus the summed KL penalty) minus the mean return of the prompt's other k-1
    answers, given to every token of the answer. `rewards` carry the raw score: the baseline is
    subtracted here, once."""
    return leave_one_out(rewards.sum(1), k)[:, None] * mask


def grpo_advantages(score, mask, k):
    """[not in the paper] GRPO (Shao et al. 2024, eq. 3 with outcome supervision): each answer's
    score minus its group's mean, over the group's std, given to every token. The group is the k
    answers to one prompt (consecutive entries); a group whose answers all score the same gets
    advantage 0."""
    groups = score.view(-1, k)
    normalised = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    return normalised.view(-1)[:, None] * mask


def whiten(x, mask):
    """Normalise over real tokens only, so padding never shifts the statistics
    [N-details: whitening]."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(new_logprobs, logprobs, advantages, mask, cliprange):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: max(-A r, -A clip(r, 1-e, 1+e)),
    with the fraction of tokens where the clip is active and the approximate KL
    0.5 (log r)^2 of the update (CleanRL's `clipfrac`; TRL's `approxkl`, where CleanRL's
    approx_kl is (r - 1) - log r)."""
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    approx_kl = 0.5 * masked_mean((new_logprobs - logprobs) ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(new_values, values, returns, mask, cliprange_value):
    """Clipped value loss (PPO2's baselines implementation, lm-human-preferences): the larger of
    the squared errors of the new prediction and of the prediction clipped to within
    cliprange_value of the rollout's value, so one update cannot move V far [N-details: value
    clipping]."""
    clipped = values + torch.clamp(new_values - values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((new_values - returns) ** 2, (clipped - returns) ** 2), mask)


def k3_kl(logprobs, ref_logprobs):
    """Per-token KL(policy || reference) estimate, always >= 0 and unbiased (Schulman 2020,
    "Approximating KL divergence", k3): exp(ref - logp) - (ref - logp) - 1. GRPO adds it to the
    loss (Shao et al. 2024, eq. 4)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


class FixedKLController:
    """kl_coef fixed (lm-human-preferences, train_policy.py)."""

    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass


class AdaptiveKLController:
    """beta <- beta * (1 + e * n_steps / horizon), e = clip(KL / target - 1, -0.2, 0.2)
    (Ziegler et al. 2019, section 2.2; their gain K_beta is n_steps / horizon here, as in
    lm-human-preferences' train_policy.py)."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon


def kl_reach(cfg):
    """The most the adaptive controller can multiply beta by over the run: every iteration's
    proportional error at its clip, 0.2 (Ziegler et al. 2019, section 2.2)."""
    return (1 + 0.2 * cfg.batch_size / cfg.kl_horizon) ** cfg.iterations


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns), or None for a batch whose returns have no variance;
    measured against Monte-Carlo returns, since GAE's returns with lam < 1 are built from the values
    themselves and would flatter a bad critic."""
    var = masked_var(returns, mask).item()
    if var < 1e-8:  # every return the same: nothing to explain, and the ratio would be noise / ~0
        return None
    return 1 - masked_var(returns - values, mask).item() / var


def score_share(score, advantages, mask, cfg):
    """The share of the advantages' variance that the score's own contribution would have alone:
    near 1, the update follows the reward; near 0, it follows the critic and the KL term. (GAE's
    lambda without a critic is 1: the score reaches every token.)"""
    rewards = torch.zeros_like(advantages)
    rewards[torch.arange(len(score)), mask.sum(1).long() - 1] = score
    lam = cfg.lam if cfg.advantage == "gae" else 1.0
    from_score, _ = gae(rewards, torch.zeros_like(advantages), mask, cfg.gamma, lam)
    return (masked_var(from_score, mask) / masked_var(advantages, mask).clamp(min=1e-8)).item()


# -----------------------------------------------------------------------------
# Under torchrun: where the ranks' numbers meet (one process: nothing happens here)

GATHERED_KEYS = ("score", "ended", "mask", "logprobs", "ref_logprobs", "values")


def gather_batch(batch):
    """Steps 2-3 and the record see every rank's answers: the per-answer tensors of each rank's
    rollout batch, concatenated in rank order, right-padded (mask 0) to the longest answer. Each
    rank then runs the single-process math on the global batch, so whitening and every statistic
    cover all answers. One process: the batch itself."""
    if DIST.world == 1:
        return batch
    B, T = batch["mask"].shape
    widths = torch.zeros(DIST.world, device=batch["mask"].device)
    widths[DIST.rank] = T
    width = int(all_sum(widths).max())
    gathered = {}
    for key in GATHERED_KEYS:
        x = batch[key].float()
        if x.dim() == 2:
            x = torch.nn.functional.pad(x, (0, width - T))
        slots = torch.zeros(DIST.world, *x.shape, device=x.device)
        slots[DIST.rank] = x  # the other ranks' slots stay 0: the sum is a gather
        gathered[key] = all_sum(slots).flatten(0, 1).to(batch[key].dtype)
    return gathered


def own_rows(x, batch):
    """This rank's rows of a tensor computed on gather_batch's global batch, cut to the width of
    its own batch (one process: x; None stays None)."""
    if DIST.world == 1 or x is None:
        return x
    B, T = batch["mask"].shape
    return x[DIST.rank * B : (DIST.rank + 1) * B, :T]


def global_means(means, n):
    """Step 4's means over this rank's n real tokens -> means over every rank's tokens: each rank's
    mean weighted by its share of the tokens, n / N. distributed.all_sum is differentiable, so a
    loss built from these is the global minibatch's loss; all_sum's backward pass sums the ranks'
    gradients, so each rank holds the world size times its share, and
    distributed.average_gradients divides by the world size. One process: the means as they are."""
    if DIST.world == 1:
        return means
    total = all_sum(n).clamp(min=1)
    weighted = all_sum(torch.stack([m * n for m in means.values()])) / total
    return dict(zip(means, weighted, strict=True))


# -----------------------------------------------------------------------------
# Recording an iteration: metrics, log line, sample, checkpoint


def check_ppo_loss(stats, it, train_policy):
    """The iteration's losses (the mean over its minibatches: a NaN in any shows) are numbers
    (training.check_loss); the settings to look at are those of what was trained, and of the rewards
    they learn from."""
    losses = sum(v for k, v in stats.items() if k.startswith("loss/"))
    step = f"iteration {it + 1}" + ("" if train_policy else " (the critic warm-up)")
    names = (["lr"] if train_policy else []) + ["vf_lr", "vf_coef", "init_kl_coef"]
    check_loss(losses, "ppo", step, ", ".join(driver_flag("ppo", name) for name in names))


def in_critic_warmup(cfg, it):
    return cfg.advantage == "gae" and it < cfg.critic_warmup


def iteration_metrics(it, cfg, batch, share, kl, mc_returns, kl_coef, stats):
    """The iteration's metrics row, over every rank's answers. TRL's names where TRL has the metric
    (objective/, policy/, loss/, val/, lr, episode), its GRPO trainer's for completions/; eval/
    (greedy validation) and time/ are ours (docs/metrics.md)."""
    critic = cfg.advantage == "gae"
    mask, ended = batch["mask"], batch["ended"].float()
    mean_kl = kl.sum(1).mean().item()
    return {
        "iteration": it + 1,
        "episode": (it + 1) * cfg.batch_size,
        "phase": "critic warm-up" if in_critic_warmup(cfg, it) else "ppo",
        "lr": cfg.lr,
        "objective/scores": batch["score"].mean().item(),
        "objective/scores_std": batch["score"].std().item(),
        "objective/kl": mean_kl,
        # the KL penalty's part of the reward; GRPO's KL is a loss term, not a reward
        "objective/non_score_reward": 0.0 if cfg.advantage == "grpo" else -kl_coef * mean_kl,
        "objective/kl_coef": kl_coef,
        **stats,
        "objective/score_share": share,
        "val/explained_variance": (
            explained_variance(batch["values"], mc_returns, mask) if critic else None
        ),
        "val/num_eos_tokens": int(ended.sum()),
        "completions/mean_length": mask.sum(1).mean().item(),
        "completions/clipped_ratio": 1 - ended.mean().item(),
    }


def iteration_times(batch, t_update, meter, policy):
    """The iteration's time/ metrics: its parts' seconds, answer tokens a second, MFU."""
    return {
        "time/generate": batch["t_generate"],
        "time/logprobs_values_score": batch["t_forward"],
        "time/update": t_update,
        "time/answer_tokens_per_s": int(batch["mask"].sum()) / (time.time() - meter.t0),
        "time/mfu": meter.summary(policy)["mfu"],
    }


def validation_due(cfg, it):
    """Greedy validation after the first, every val_every-th and the last iteration."""
    last = it + 1 == cfg.iterations
    return cfg.val_every and (it == 0 or (it + 1) % cfg.val_every == 0 or last)


def log_iteration(row, iterations, eta):
    warmup = " (critic warm-up)" if row["phase"] != "ppo" else ""
    ev = row["val/explained_variance"]  # None: no critic, or a batch with no variance
    ev = "-" if ev is None else f"{ev:.2f}"
    log(
        f"[ppo] it {row['iteration']}/{iterations}{warmup} score {row['objective/scores']:+.3f} "
        f"kl {row['objective/kl']:.2f} pg {row.get('loss/policy_avg', 0):+.3f} "
        f"vf {row.get('loss/value_avg', 0):.3f} clip {row.get('policy/clipfrac_avg', 0):.2f} "
        f"approx_kl {row.get('policy/approxkl_avg', 0):.4f} "
        f"ev {ev} "
        f"share {row['objective/score_share']:.2f} len {row['completions/mean_length']:.0f} "
        f"clipped {row['completions/clipped_ratio']:.2f} "
        f"{row['time/answer_tokens_per_s']:.0f} tok/s MFU {row['time/mfu']:.0%}"
        + "".join(f" {k} {v:.3f}" for k, v in row.items() if k.startswith("eval/"))
        + f" {eta}"
    )


def log_sample(batch, kl, decode):
    """The first answer of the batch with its score and KL, as lm-human-preferences prints them."""
    answer = batch["response"][0][: int(batch["mask"][0].sum())].tolist()
    score, answer_kl = batch["score"][0].item(), kl[0].sum().item()
    log(f"[ppo]   sample (score {score:+.2f}, kl {answer_kl:.2f}): {decode(answer)[:300]!r}")


def save_state(out_dir, modules, optimizers, kl_ctl, iteration, history, cfg):
    """Rank 0: the checkpoint train_ppo resumes from (with the settings it was made with), then
    metrics.jsonl rewritten from the checkpointed history, so no row appears twice after a
    resume."""
    if not is_main():
        return
    save_checkpoint(
        out_dir / "ckpt.pt",
        **{k: m.state_dict() for k, m in modules.items()},
        optimizers=[o.state_dict() for o in optimizers],
        kl_coef=kl_ctl.value,
        settings=asdict(cfg),
        iteration=iteration,
        history=history,
    )
    write_metrics(out_dir / "metrics.jsonl", history)


# -----------------------------------------------------------------------------
# The PPO stage of a run (rlaif.py, or python ppo.py on an existing run)


class ValueHead(torch.nn.Module):
    """The shared critic (critic 'shared'): a linear value head on the policy's final hidden
    states, zero at the start like fresh_value_model's head."""

    def __init__(self, n_embd):
        super().__init__()
        self.head = torch.nn.Linear(n_embd, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, hidden):
        return self.head(hidden).squeeze(-1).float()


def make_value_model(cfg, policy, reward_model_file, device):
    """PPO's critic: None for RLOO and GRPO (their baseline is the prompt's other answers); with
    'gae', a ValueHead for the policy's trunk (critic 'shared') or fresh_value_model."""
    if cfg.advantage != "gae":
        return None
    if cfg.critic == "shared":
        return ValueHead(policy.config.n_embd).to(device)
    return fresh_value_model(reward_model_file, device)


def fresh_value_model(reward_model_file, device):
    """The value model: the reward model's network (as in lm-human-preferences [N-details: value
    init from the reward model]) with a zero head [not in the paper]. The reward model's head was
    trained only at the last token and its raw output is on another scale than the normalised
    score, so reusing it makes the first advantages mostly critic noise; a zero head predicts 0,
    the baseline-corrected score's mean, until the warm-up trains it."""
    value_model, _ = read_reward_model(reward_model_file, device)
    torch.nn.init.zeros_(value_model.head.weight)
    torch.nn.init.zeros_(value_model.head.bias)
    return value_model


def greedy_validation(
    records, tok, run_cfg, judge=None, score_fn=None, samples_file=None, n_shown=3
):
    """validate(policy, iteration) for train_ppo: greedy answers to the validation questions, their
    mean reward-model score (score_fn) and, when a judge is given, their mean judge score. The first
    n_shown questions, their answers and scores are appended to samples_file (markdown), so a
    reader sees what RL changed."""
    prompts = [prepare.prompt_ids(tok, r.instruction) for r in records]

    def validate(policy, iteration):
        with autocast(run_cfg.device):
            answers = sample_answers(
                policy, prompts, tok.eot, run_cfg.max_answer_tokens, 0.0, run_cfg.seed
            )
        texts, out = [tok.decode(a) for a in answers], {}
        rewards = judged = [None] * len(answers)
        if score_fn is not None:
            query, query_mask = left_pad(prompts, tok.eot, run_cfg.device)
            response, response_mask = right_pad(answers, tok.eot, run_cfg.device)
            with torch.no_grad(), autocast(run_cfg.device):
                rewards = score_fn(query, query_mask, response, response_mask).float().tolist()
            out["eval/reward"] = sum(rewards) / len(rewards)
        if judge is not None:
            judged = [judge_score(judge, r, t) for r, t in zip(records, texts, strict=True)]
            out["eval/judge_score"] = sum(judged) / len(judged)
        empty = sum(not prepare.parse_answer(t)["code"] for t in texts)
        out["eval/empty_code_rate"] = empty / len(texts)
        if samples_file is not None:
            table = samples_table(records, texts, rewards, judged, n_shown)
            with open(samples_file, "a") as f:  # append-only, like every log of a run
                f.write(f"\n### iteration {iteration}\n\n{table}")
            tensorboard_text(f"{metrics_tag(samples_file)}/samples", table, iteration)
        return out

    return validate


def samples_table(records, texts, rewards, judged, n_shown):
    """The first n_shown questions, greedy answers and scores as a markdown table."""

    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " <br> ")

    rows = [
        f"| {cell(r.instruction[:120])} | {cell(t[:400])} | {'-' if w is None else f'{w:+.2f}'} "
        f"| {'-' if j is None else f'{j:.2f}'} |"
        for r, t, w, j in list(zip(records, texts, rewards, judged, strict=True))[:n_shown]
    ]
    header = "| question | greedy answer | reward model | judge |\n|---|---|---|---|\n"
    return header + "\n".join(rows) + "\n"


def ppo_stage(run_cfg, run, splits, score_fn=None, out_dir=None, advantage=None, **files):
    """Policy and frozen reference from the SFT model; with advantage 'gae', the critic
    (make_value_model); frozen reward model. run_cfg: the run's
    config.Config. score_fn: the reward (default: the reward model's score); rlaif.py --compare
    passes the judge's score for d-RLAIF, with out_dir elsewhere: the same PPO, only the score
    function swapped. advantage: overrides run_cfg.ppo.advantage (--compare's RLOO and GRPO
    rows). files: sft_model and reward_model in place of the run's (python ppo.py --sft-model)."""
    meter = FlopMeter()
    tok = prepare.tokenizer(run_cfg.compact)
    out_dir = Path(out_dir or run / "ppo")
    sft_model, reward_file = (run_file(run, k, files) for k in ("sft_model", "reward_model"))
    ppo_cfg = run_cfg.ppo if advantage is None else replace(run_cfg.ppo, advantage=advantage)
    torch.manual_seed(run_cfg.seed)
    policy = GPT.from_pretrained(sft_model).to(run_cfg.device)
    ref_policy = GPT.from_pretrained(sft_model)
    ref_policy.to(run_cfg.device, frozen_dtype(run_cfg.device))
    value_model = make_value_model(ppo_cfg, policy, reward_file, run_cfg.device)
    reward_model, rm_score = load_reward_model(reward_file, tok, run_cfg.device)
    reward_model.to(dtype=frozen_dtype(run_cfg.device)).eval().requires_grad_(False)
    # Validation: the reward model's score of greedy answers to the validation questions, whatever
    # the training reward; and the judge's, where judging is free (the rules judge). Under
    # torchrun, rank 0 validates and writes.
    judge = make_judge("rules", None, None, None) if run_cfg.judge == "rules" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    validate = None
    if is_main():
        samples_file = out_dir / "samples.md"
        validate = greedy_validation(splits["val"], tok, run_cfg, judge, rm_score, samples_file)
    prompts = [prepare.prompt_ids(tok, r.instruction) for r in splits["train"]]
    history = train_ppo(
        policy,
        ref_policy,
        value_model,
        score_fn or rm_score,
        prompts,
        tok,
        ppo_cfg,
        run_cfg,
        out_dir,
        validate=validate,
    )
    if is_main():
        atomic_dir(out_dir / "model", lambda d: policy.save_pretrained(d, eot=tok.eot))
    barrier()
    return dict(history[-1] if history else {}, **meter.summary(policy, remeasure=True))


def main(argv=None):
    """python ppo.py: PPO alone, on an existing run (default runs/tiny), or on an SFT model and a
    reward model given as files (--sft-model, --reward-model) into --out."""
    cfg, run, given = stage_command_line(
        "ppo",
        "PPO: tune an SFT policy against a reward model. On a run of rlaif.py (--run-dir: its "
        "sft and reward, into run_dir/ppo, with the run's recorded settings, which the flags "
        "below override and are recorded; later results are set aside) or on files (--sft-model "
        "DIR --reward-model FILE, into --out, no run directory). An interrupted PPO resumes.",
        argv,
        section="ppo",
        section_cls=PPOConfig,
        inputs=("sft_model", "reward_model"),
    )
    splits = prepare.run_splits(cfg)
    if given is not None:
        run_alone(run, lambda: ppo_stage(cfg, None, splits, out_dir=run, **given))
    else:
        run_stage(cfg, run, "ppo", ppo_stage, splits)


if __name__ == "__main__":
    main()
