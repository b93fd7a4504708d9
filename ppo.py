"""
PPO for language models against a learned reward, with a per-token KL penalty to the SFT model.

    python ppo.py                      # runs the PPO stage of the run in --run-dir (tiny on CPU, paper on GPU)

The algorithm, in the order of one iteration (train_ppo):
  1. rollout: sample answers with model.generate; policy `logprobs`, `ref_logprobs` and `values` by one
     teacher-forced pass each; `score` = reward model at the answer's last token.
  2. rewards: r_t = -kl_coef * (logprobs_t - ref_logprobs_t), plus `score` at the last token
     (Ziegler et al. 2019, eq. 2; lm-human-preferences compute_rewards).
  3. advantages: GAE (Schulman et al. 2016, eq. 11-16), gamma = 1, lam = 0.95; returns = advantages + values;
     advantages whitened over the batch's real tokens.
  4. update: `epochs` passes over minibatches of the clipped surrogate (Schulman et al. 2017, eq. 7) plus the
     clipped value loss; the KL coefficient adapts toward target_kl (Ziegler et al. 2019, section 2.2).
Comments tagged [N-details] name the implementation details of Huang et al. 2023 ("The N Implementation
Details of RLHF with PPO") each line implements.
"""
import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch

from data.gorilla import prepare
from model import (GPT, RUN_FILES, ScalarModel, Tokenizer, add_flags, atomic_write, autocast, generate, left_pad,
                   log, make_optimizer, response_logprobs, resume, run_stage_cli, save_checkpoint)


@dataclass
class PPOConfig:
    iterations: Annotated[int, "PPO iterations (one rollout batch + its update each)"] = 25
    batch_size: Annotated[int, "answers sampled per iteration"] = 32
    minibatch_size: Annotated[int, "answers per gradient step"] = 8
    grad_accum: Annotated[int, "minibatches accumulated per optimizer step (big models on one GPU)"] = 1
    epochs: Annotated[int, "passes over each rollout batch"] = 2
    lr: Annotated[float, "AdamW learning rate of the policy and the value model"] = 1e-4
    gamma: Annotated[float, "discount; 1 as in lm-human-preferences"] = 1.0
    lam: Annotated[float, "GAE lambda"] = 0.95
    cliprange: Annotated[float, "PPO ratio clip epsilon"] = 0.2
    cliprange_value: Annotated[float, "value-prediction clip around the rollout values"] = 0.2
    vf_coef: Annotated[float, "weight of the value loss"] = 0.1
    init_kl_coef: Annotated[float, "beta, the KL penalty coefficient at the start"] = 0.5
    adaptive_kl: Annotated[bool, "adapt beta toward target_kl (Ziegler et al. 2019); off keeps it fixed"] = True
    target_kl: Annotated[float, "target KL(policy || SFT) per answer, in nats"] = 3.0
    kl_horizon: Annotated[int, "KL controller horizon, in answers"] = 1000
    missing_eos_penalty: Annotated[float, "added to the score of answers cut off before <|endoftext|> "
                                          "[N-details: EOS trick]; 0 disables"] = -1.0


# -----------------------------------------------------------------------------
# KL controllers (lm-human-preferences, train_policy.py)

class FixedKLController:
    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass


class AdaptiveKLController:
    """beta <- beta * (1 + K * e * n_steps / horizon), e = clip(KL / target - 1, -0.2, 0.2)
    (Ziegler et al. 2019, section 2.2)."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + proportional_error * n_steps / self.horizon


# -----------------------------------------------------------------------------
# The pieces, each a few lines, each tested in tests/test_ppo.py

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    mean = masked_mean(x, mask)
    n = mask.sum()
    return masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)  # unbiased


def whiten(x, mask):
    """Normalise over real tokens only, so padding never shifts the statistics [N-details: whitening]."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


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
    """Generalised advantage estimation (Schulman et al. 2016, eq. 11-16) as the plain backwards loop:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; V beyond the answer is 0."""
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


def policy_loss(new_logprobs, logprobs, advantages, mask, cliprange):
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: max(-A r, -A clip(r, 1-e, 1+e))."""
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    approx_kl = 0.5 * masked_mean((new_logprobs - logprobs) ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(new_values, values, returns, mask, cliprange_value):
    """Clipped value loss (PPO2 / lm-human-preferences) [N-details: value clipping]."""
    clipped = values + torch.clamp(new_values - values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((new_values - returns) ** 2, (clipped - returns) ** 2), mask)


def value_predictions(value_model, query, query_mask, response, response_mask):
    """V(s_t) for each answer token t: the value head at the position that predicts token t."""
    Q = query.size(1)
    values = value_model(torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1))
    return values[:, Q - 1:-1].float() * response_mask


# -----------------------------------------------------------------------------
# Rollout and update

@torch.no_grad()
def rollout(policy, ref_policy, value_model, score_fn, prompts, cfg, sampling, eot, device, generator):
    """Sample answers and everything the update needs; nothing here carries gradients."""
    query, query_mask = left_pad(prompts, eot, device)
    policy.eval()  # [N-details: dropout off] (our dropout is 0 anyway; eval() makes it explicit)
    t0 = time.time()
    with autocast(device):
        response, response_mask, _ = generate(policy, query, query_mask, sampling.max_answer_tokens, eot,
                                              sampling.temperature, generator=generator)
    t_gen = time.time() - t0
    with autocast(device):
        # Recompute log-probs with the training forward rather than reuse the sampler's: the update
        # then starts from ratio exactly 1 [N-details: recompute logprobs].
        logprobs = response_logprobs(policy, query, query_mask, response, response_mask, sampling.temperature)
        ref_logprobs = response_logprobs(ref_policy, query, query_mask, response, response_mask,
                                         sampling.temperature)
        values = value_predictions(value_model, query, query_mask, response, response_mask)
        score = score_fn(query, query_mask, response, response_mask).float()
    last = response[torch.arange(len(response)), response_mask.sum(1) - 1]
    ended = last == eot
    if cfg.missing_eos_penalty:
        score = torch.where(ended, score, score + cfg.missing_eos_penalty)
    mask = response_mask.float()
    return dict(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, score=score,
                ended=ended.float(), t_gen=t_gen, t_score=time.time() - t0 - t_gen)


def ppo_update(policy, value_model, optimizer, batch, advantages, returns, cfg, sampling, device, generator):
    """cfg.epochs passes of minibatch gradient steps on the clipped objectives; returns mean stats."""
    B = batch["response"].size(0)
    stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy")}
    policy.train()
    value_model.train()
    starts = range(0, B, cfg.minibatch_size)
    for _ in range(cfg.epochs):
        perm = torch.randperm(B, generator=generator)
        for i, start in enumerate(starts):
            idx = perm[start:start + cfg.minibatch_size].to(device)
            mb = {k: batch[k][idx] for k in ("query", "query_mask", "response", "response_mask", "mask",
                                                "logprobs", "values")}
            with autocast(device):
                new_logprobs, entropy = response_logprobs(policy, mb["query"], mb["query_mask"], mb["response"],
                                                          mb["response_mask"], sampling.temperature,
                                                          with_entropy=True)
                new_values = value_predictions(value_model, mb["query"], mb["query_mask"], mb["response"],
                                               mb["response_mask"])
            pg_loss, clipfrac, approx_kl = policy_loss(new_logprobs, mb["logprobs"], advantages[idx], mb["mask"],
                                                       cfg.cliprange)
            vf_loss = value_loss(new_values, mb["values"], returns[idx], mb["mask"], cfg.cliprange_value)
            ((pg_loss + cfg.vf_coef * vf_loss) / cfg.grad_accum).backward()
            if (i + 1) % cfg.grad_accum == 0 or i == len(starts) - 1:  # no gradient carried past an epoch
                torch.nn.utils.clip_grad_norm_(list(policy.parameters()) + list(value_model.parameters()),
                                               sampling.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clipfrac", clipfrac),
                             ("approx_kl", approx_kl), ("entropy", masked_mean(entropy, mb["mask"]))):
                    stats[k].append(v.item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


def explained_variance(values, returns, mask):
    return 1 - (masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)).item()


def train_ppo(policy, ref_policy, value_model, score_fn, prompts, cfg, sampling, eot, device, out_dir,
              decode=None, log=log):
    """Run cfg.iterations of PPO. prompts: token lists. score_fn(query, query_mask, response,
    response_mask) -> (B,) scores. sampling: the run's seed, temperature, max_answer_tokens and grad_clip
    (shared with the other stages). Checkpoints after each iteration (atomic) and resumes from the last."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_file, metrics_file = out_dir / "ckpt.pt", out_dir / "metrics.jsonl"
    ref_policy.eval().requires_grad_(False)
    optimizer = make_optimizer(torch.nn.ModuleList([policy, value_model]), cfg.lr, weight_decay=0.0)
    kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.init_kl_coef))
    start, history = 0, []
    ckpt = resume(ckpt_file, device, optimizer, policy=policy, value=value_model)
    if ckpt:
        kl_ctl.value, start, history = ckpt["kl_coef"], ckpt["iteration"], ckpt["history"]
        log(f"[ppo] resumed from {ckpt_file} at iteration {start}")
    for it in range(start, cfg.iterations):
        t0 = time.time()
        rng = random.Random(sampling.seed * 104729 + it)  # the iteration's prompts and samples: resumable
        generator = torch.Generator().manual_seed(sampling.seed * 104729 + it)
        chosen = (rng.sample(prompts, cfg.batch_size) if len(prompts) >= cfg.batch_size
                  else rng.choices(prompts, k=cfg.batch_size))
        batch = rollout(policy, ref_policy, value_model, score_fn, chosen, cfg, sampling, eot, device, generator)
        mask = batch["mask"]
        rewards, kl = compute_rewards(batch["score"], batch["logprobs"], batch["ref_logprobs"], mask, kl_ctl.value)
        advantages, returns = gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
        t_update = time.time()
        stats = ppo_update(policy, value_model, optimizer, batch, advantages, returns, cfg, sampling, device,
                           generator)
        t_update = time.time() - t_update
        mean_kl = kl.sum(1).mean().item()
        kl_ctl.update(mean_kl, cfg.batch_size)
        n_tokens = int(mask.sum())
        row = dict(iteration=it + 1, score=batch["score"].mean().item(), kl=mean_kl, kl_coef=kl_ctl.value,
                   **stats, explained_variance=explained_variance(batch["values"], returns, mask),
                   answer_length=mask.sum(1).mean().item(), ended_with_eos=batch["ended"].mean().item(),
                   t_generate=batch["t_gen"], t_score=batch["t_score"], t_update=t_update,
                   tokens_per_s=n_tokens / (time.time() - t0))
        history.append(row)
        log(f"[ppo] it {it + 1}/{cfg.iterations} score {row['score']:+.3f} kl {mean_kl:.2f} "
            f"beta {kl_ctl.value:.4f} pg {stats['policy_loss']:+.3f} vf {stats['value_loss']:.3f} "
            f"clip {stats['clipfrac']:.2f} approx_kl {stats['approx_kl']:.4f} H {stats['entropy']:.2f} "
            f"ev {row['explained_variance']:.2f} len {row['answer_length']:.0f} "
            f"{row['tokens_per_s']:.0f} tok/s")
        if decode is not None and (it + 1) % 10 == 0:
            r = batch["response"][0][:int(mask[0].sum())].tolist()
            log(f"[ppo]   sample (score {batch['score'][0].item():+.2f}, kl {kl[0].sum().item():.2f}): "
                f"{decode(r)[:300]!r}")
        save_checkpoint(ckpt_file, policy=policy.state_dict(), value=value_model.state_dict(),
                        optimizer=optimizer.state_dict(), kl_coef=kl_ctl.value, iteration=it + 1,
                        history=history)
        # rewritten from the checkpointed history, so a crash and resume never duplicates a row
        atomic_write(metrics_file, lambda p: Path(p).write_text("".join(json.dumps(h) + "\n" for h in history)))
    return history


# -----------------------------------------------------------------------------
# The PPO stage of a run (rlaif.py, or python ppo.py on an existing run)

def ppo_stage(cfg, run, splits, score_fn=None, out_dir=None):
    """Policy and frozen reference from the SFT model; value model and frozen reward model from the
    reward model [N-details: value init from the reward model]. cfg: rlaif.Config or its config.json.
    score_fn: the reward (default: the reward model's score); rlaif.py --compare passes the judge's
    score for d-RLAIF, with out_dir elsewhere: the same PPO, only the score function swapped."""
    tok = Tokenizer(prepare.VOCAB_FILE if cfg.compact else None)
    out_dir = Path(out_dir or run / "ppo")
    torch.manual_seed(cfg.seed)
    frozen_dtype = torch.bfloat16 if str(cfg.device).startswith("cuda") else torch.float32  # no gradients, half the memory
    policy = GPT.from_pretrained(run / RUN_FILES["sft_model"]).to(cfg.device)
    ref_policy = GPT.from_pretrained(run / RUN_FILES["sft_model"]).to(cfg.device, frozen_dtype)
    value_model, _ = ScalarModel.load(run / RUN_FILES["reward_model"], cfg.device)
    if score_fn is None:
        reward_model, _ = ScalarModel.load(run / RUN_FILES["reward_model"], cfg.device)
        score_fn = reward_model.to(dtype=frozen_dtype).eval().requires_grad_(False).score
    prompts = [prepare.prompt_ids(tok, r.instruction) for r in splits["train"]]
    history = train_ppo(policy, ref_policy, value_model, score_fn, prompts, cfg.ppo, cfg, tok.eot,
                        cfg.device, out_dir, decode=tok.decode, log=log)
    policy.save_pretrained(out_dir / "model", eot=tok.eot)
    return history[-1] if history else {}


def main():
    p = argparse.ArgumentParser(description="PPO stage of a run of rlaif.py: tune the run's SFT policy against its "
                                "reward model (run_dir/sft, run_dir/reward) and save it to run_dir/ppo. Uses the "
                                "run's recorded settings (config.json); the flags below override them and are "
                                "recorded. An interrupted PPO resumes; later results (evaluate) are set aside.")
    p.add_argument("--run-dir", required=True, help="a run directory whose reward stage is done")
    p.add_argument("--force", action="store_true", help="redo a finished PPO stage")
    add_flags(p, PPOConfig, "", lambda f: "the run's")
    args = vars(p.parse_args())
    run_dir, force = args.pop("run_dir"), args.pop("force")
    run_stage_cli(run_dir, "ppo", ppo_stage, "ppo", {k: v for k, v in args.items() if v is not None}, force,
                  prepare.load_splits)


if __name__ == "__main__":
    main()
