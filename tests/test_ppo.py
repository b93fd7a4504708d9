"""ppo.py's pieces against plain reference computations, and a short learning run that can fail."""

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from model import GPT, GPTConfig, ScalarModel, answer_states, response_logprobs
from ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    ValueHead,
    advantages_and_returns,
    compute_rewards,
    eos_penalised,
    explained_variance,
    fresh_value_model,
    gae,
    grpo_advantages,
    iteration_prompts,
    k3_kl,
    kl_reach,
    leave_one_out,
    logprobs_and_values,
    make_value_model,
    masked_mean,
    masked_var,
    minibatch_loss,
    policy_loss,
    ppo_update,
    rloo_advantages,
    rollout,
    score_share,
    train_ppo,
    validation_due,
    value_loss,
    value_predictions,
    whiten,
)
from runs import save_checkpoint

# train_ppo's tokenizer: the end-of-text id of the toy vocabularies, and a decode for its samples
TOY_TOK = SimpleNamespace(eot=15, decode=str)


def reference_gae(rewards, values, lengths, gamma, lam):
    """Per row, only the real tokens, V beyond the end = 0: the textbook recursion."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


def test_gae_matches_reference_loop_with_padding():
    torch.manual_seed(0)
    B, T = 5, 9
    lengths = [9, 4, 1, 7, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    rewards = torch.randn(B, T) * mask
    values = torch.randn(B, T)  # garbage on padding must not leak
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        ref = reference_gae(rewards, values, lengths, gamma, lam)
        assert torch.allclose(adv, ref, atol=1e-6)
        assert torch.allclose(ret, (ref + values) * mask, atol=1e-6)
        assert (adv[mask == 0] == 0).all()


def test_rewards_put_score_on_last_real_token():
    logprobs, ref = (
        torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]]),
        torch.tensor([[-1.5, -2.0, -1.0], [-2.0, -1.0, 0.0]]),
    )
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = compute_rewards(torch.tensor([10.0, 20.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -2.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 10.2], [-0.1, 20.0, 0.0]]))


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 1000)  # error clipped to +0.2 -> x(1 + 0.2 * 0.1)
    assert abs(ctl.value - 0.1 * 1.02) < 1e-12
    ctl.update(3.0, 1000)  # error -0.5 clipped to -0.2
    assert abs(ctl.value - 0.1 * 1.02 * 0.98) < 1e-12
    ctl.update(6.0, 1000)
    assert abs(ctl.value - 0.1 * 1.02 * 0.98) < 1e-12


def test_the_default_kl_horizon_lets_the_controller_adapt_within_the_run():
    cfg = PPOConfig()
    ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    for _ in range(cfg.iterations):  # KL far above target every iteration: the error at its clip
        ctl.update(100 * cfg.target_kl, cfg.batch_size)
    assert abs(ctl.value / cfg.init_kl_coef - kl_reach(cfg)) < 1e-9
    assert kl_reach(cfg) >= 2  # beta can at least double (or halve) over the default run


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - real.mean()) / real.std()
    assert torch.allclose(w[mask.bool()], expected, atol=1e-5)
    assert (w[mask == 0] == 0).all()
    x2 = x.clone()
    x2[mask == 0] = 1e6  # changing padding changes nothing
    assert torch.allclose(whiten(x2, mask), w)


def test_masked_mean_and_var_ignore_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == 2.0  # (1 + 2 + 3) / 3
    assert masked_var(x, mask).item() == 1.0  # unbiased: ((-1)^2 + 0^2 + 1^2) / (3 - 1)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # no real token: 0, not nan


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    """Rollout values 0, returns 1, cliprange 0.2 (PPO2's clipped value loss). A prediction of 0.5
    is clipped to 0.2: the clipped error (0.8^2) is the larger and the gradient is 0 (the clip
    holds it); -0.5 clipped to -0.2: the unclipped error (1.5^2) is the larger and keeps its
    gradient. The third token is padding."""
    new_values = torch.tensor([0.5, -0.5, 9.0], requires_grad=True)
    values, returns, mask = torch.zeros(3), torch.ones(3), torch.tensor([1.0, 1.0, 0.0])
    loss = value_loss(new_values, values, returns, mask, cliprange_value=0.2)
    assert abs(loss.item() - 0.5 * (0.8**2 + 1.5**2) / 2) < 1e-6
    loss.backward()
    assert new_values.grad[0] == 0 and new_values.grad[2] == 0
    assert abs(new_values.grad[1].item() - (-1.5 / 2)) < 1e-6  # d/dv 0.5 (v - 1)^2 / 2 at -0.5


def test_value_predictions_read_the_positions_that_predict_each_answer_token():
    """A value model that returns each position's index: with a 3-token query, the values of the 2
    answer tokens are read at positions 2 and 3 (the ones that predict them), 0 on padding."""

    def value_model(ids, mask):
        return torch.arange(ids.size(1)).float().expand(ids.size(0), -1)

    query, query_mask = torch.tensor([[0, 1, 2], [0, 3, 4]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    response, response_mask = torch.tensor([[5, 6], [7, 15]]), torch.tensor([[1, 1], [1, 0]])
    values = value_predictions(value_model, query, query_mask, response, response_mask)
    assert torch.equal(values, torch.tensor([[2.0, 3.0], [2.0, 0.0]]))


def shared_critic_batch(seed=0):
    """A toy policy, a shared value head with nonzero weights, and a padded batch of answers."""
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(block_size=32, vocab_size=16, n_layer=2, n_head=2, n_embd=32))
    head = ValueHead(32)
    torch.nn.init.normal_(head.head.weight)
    query, query_mask = torch.tensor([[0, 1, 2], [0, 3, 4]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    response, response_mask = (
        torch.tensor([[5, 6, 7], [7, 8, 15]]),
        torch.tensor([[1, 1, 1], [1, 1, 0]]),
    )
    return policy, head, (query, query_mask, response, response_mask)


def test_the_shared_value_head_reads_the_policys_states_at_each_answer_tokens_position():
    """critic 'shared': the log-probs are response_logprobs' and the values are the head on the
    policy's hidden state at the position that predicts each answer token, 0 on padding."""
    policy, head, tokens = shared_critic_batch()
    with torch.no_grad():
        logprobs, entropy, values = logprobs_and_values(policy, head, tokens, 0.7)
        hidden = policy.hidden_states(torch.cat(tokens[::2], 1), torch.cat(tokens[1::2], 1))
        expected = head.head(hidden[:, 2:-1]).squeeze(-1) * tokens[3]  # positions 2, 3, 4
    assert entropy is None
    assert torch.equal(logprobs, response_logprobs(policy, *tokens, 0.7))
    assert torch.allclose(values, expected) and values[1, 2] == 0
    assert torch.equal(answer_states(policy, *tokens), hidden[:, 2:-1])


def test_the_critic_is_a_head_on_the_policy_a_network_of_its_own_or_none(tmp_path):
    """make_value_model: 'shared' a zero ValueHead of the policy's width; 'separate' the reward
    model's network with a zero head; RLOO and GRPO none."""
    policy = GPT(GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(tmp_path / "rm.pt", **ScalarModel(copy.deepcopy(policy)).checkpoint())
    shared = make_value_model(PPOConfig(critic="shared"), policy, tmp_path / "rm.pt", "cpu")
    separate = make_value_model(PPOConfig(), policy, tmp_path / "rm.pt", "cpu")
    assert isinstance(shared, ValueHead) and shared.head.in_features == 8
    assert isinstance(separate, ScalarModel) and separate.backbone is not policy
    assert not any(p.any() for p in shared.parameters()) and not separate.head.weight.any()
    for advantage in ("rloo", "grpo"):
        cfg = PPOConfig(advantage=advantage, critic="shared")
        assert make_value_model(cfg, policy, tmp_path / "rm.pt", "cpu") is None


def test_the_rollout_reads_the_shared_heads_values_from_the_policys_pass():
    """rollout with critic 'shared': values = the head on the policy's answer_states, 0 after an
    answer's end; the log-probs are response_logprobs' at the sampling temperature."""
    policy, head, _ = shared_critic_batch()
    sampling = SimpleNamespace(device="cpu", temperature=0.7, max_answer_tokens=6)
    batch = rollout(
        policy,
        copy.deepcopy(policy),
        head,
        lambda q, qm, r, rm: torch.zeros(len(r)),
        [[1, 2, 3], [4, 6]] * 4,
        sampling,
        TOY_TOK.eot,
        torch.Generator().manual_seed(0),
    )
    tokens = [batch[k] for k in ("query", "query_mask", "response", "response_mask")]
    with torch.no_grad():
        expected = head(answer_states(policy, *tokens)) * batch["mask"]
        logprobs = response_logprobs(policy, *tokens, 0.7)
    assert batch["values"].abs().sum() > 0 and torch.allclose(batch["values"], expected)
    assert torch.equal(batch["logprobs"], logprobs)


def test_a_checkpoint_made_with_other_settings_is_refused_before_it_is_loaded(tmp_path):
    """A resumed PPO may run longer (iterations); another critic or learning rate is refused with
    each setting named, not resumed into (the shared head cannot load a value model's weights)."""
    policy, ref, value, sampling = toy(tmp_path)
    score_fn = lambda q, qm, r, rm: torch.zeros(len(r))  # noqa: E731
    run(tmp_path, policy, ref, value, sampling, score_fn, iterations=1, critic_warmup=0)
    with pytest.raises(ValueError, match=r"critic: 'separate' in the checkpoint, 'shared' now"):
        run(tmp_path, policy, ref, ValueHead(32), sampling, score_fn, iterations=2, critic="shared")
    with pytest.raises(ValueError, match=r"lr: 0.003 in the checkpoint, 0.001 now") as refused:
        run(tmp_path, policy, ref, value, sampling, score_fn, iterations=2, lr=1e-3)
    assert "--force" in str(refused.value)
    history = run(tmp_path, policy, ref, value, sampling, score_fn, iterations=2, critic_warmup=0)
    assert [h["iteration"] for h in history] == [1, 2]


def shared_update(policy, head, tokens, vf_coef, train_policy):
    """One ppo_update with zero advantages (no policy gradient) and returns of 1: whatever moves
    the policy is the value loss."""
    with torch.no_grad():
        logprobs, _, values = logprobs_and_values(policy, head, tokens, 1.0)
    mask = tokens[3].float()
    batch = dict(zip(("query", "query_mask", "response", "response_mask"), tokens, strict=True))
    batch.update(mask=mask, logprobs=logprobs, ref_logprobs=logprobs, values=values)
    batch.update(advantages=torch.zeros_like(mask), returns=torch.ones_like(mask))
    cfg = PPOConfig(batch_size=2, rollouts_per_prompt=1, minibatch_size=2, epochs=1)
    cfg = replace(cfg, vf_coef=vf_coef, critic="shared")
    sampling = SimpleNamespace(temperature=1.0, grad_clip=1.0, device="cpu")
    optimizers = [
        torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0) for m in (policy, head)
    ]
    ppo_update(
        policy, head, optimizers, batch, cfg, sampling, torch.Generator(), 0.05, train_policy
    )


@pytest.mark.parametrize(
    "vf_coef, train_policy, policy_moves",
    [(0.1, True, True), (0.0, True, False), (0.1, False, False)],
    ids=["value-loss-trains-the-trunk", "no-value-loss", "warm-up-policy-waits"],
)
def test_the_shared_critics_value_loss_trains_the_trunk_except_in_the_warm_up(
    vf_coef, train_policy, policy_moves
):
    """With zero advantages the policy moves only through the value loss: it reaches the shared
    trunk (TRL's value head), nothing with vf_coef 0, and nothing in the critic warm-up, where
    the head alone trains."""
    policy, head, tokens = shared_critic_batch()
    before, head_before = copy.deepcopy(policy.state_dict()), head.head.weight.clone()
    shared_update(policy, head, tokens, vf_coef, train_policy)
    moved = any(not torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
    assert moved == policy_moves
    assert not torch.equal(head.head.weight, head_before) or vf_coef == 0


def test_score_share_is_the_scores_share_of_the_advantages_variance():
    """With gamma = lam = 1 the score alone gives every token of its answer the score: advantages
    twice that have 4 times its variance, a share of 1/4."""
    score, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3)
    advantages = 2 * score[:, None] * mask
    assert abs(score_share(score, advantages, mask, PPOConfig(gamma=1.0, lam=1.0)) - 0.25) < 1e-6


@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
def test_score_share_reads_the_same_with_whitened_advantages(advantage):
    """Whitening rescales the advantages, not the score's share of them; GRPO's advantages are the
    score alone, whatever its scale."""
    torch.manual_seed(0)
    logprobs, ref_logprobs = torch.randn(8, 5), torch.randn(8, 5)
    batch = rollout_batch([0.3, -1.0, 2.0, 0.5, 0.0, 1.5, -0.7, 0.9], logprobs, ref_logprobs)
    batch["values"] = torch.randn(8, 5)
    shares = [
        advantages_and_returns(
            batch, PPOConfig(advantage=advantage, rollouts_per_prompt=4, whiten_advantages=w), 0.05
        )[0]
        for w in (False, True)
    ]
    assert shares[0] == pytest.approx(shares[1]) and shares[0] > 0
    if advantage == "grpo":
        assert shares[0] == 1.0


def test_validation_is_due_after_the_first_every_nth_and_the_last_iteration():
    cfg = PPOConfig(iterations=12, val_every=5)
    assert [it + 1 for it in range(12) if validation_due(cfg, it)] == [1, 5, 10, 12]
    assert not any(validation_due(PPOConfig(iterations=12, val_every=0), it) for it in range(12))


def test_clipped_objective_gradient_is_zero_where_clipped():
    old = torch.zeros(4)
    # ratio = exp(new): 1.5 (above 1+eps) and 0.5 (below 1-eps), with advantages of both signs
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipfrac, _ = policy_loss(new, old, adv, torch.ones(4), cliprange=0.2)
    loss.backward()
    # positive advantage with ratio above 1+eps, negative with ratio below 1-eps: clipped, zero
    # gradient
    assert new.grad[0] == 0 and new.grad[3] == 0
    # the pessimistic side keeps its gradient
    assert new.grad[1] != 0 and new.grad[2] != 0
    assert clipfrac.item() == 0.5


def toy_ppo(out_dir, init_kl_coef):
    """25 PPO iterations of a tiny random policy; score = fraction of answer tokens that are
    token 5. Returns train_ppo's history."""
    from types import SimpleNamespace

    from model import GPT, GPTConfig, ScalarModel

    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=16, n_layer=2, n_head=2, n_embd=32)
    policy = GPT(config)
    ref = GPT(config)
    ref.load_state_dict(policy.state_dict())
    value = ScalarModel(GPT(config))

    def score_fn(query, query_mask, response, response_mask):
        return ((response == 5).float() * response_mask).sum(1) / response_mask.sum(1)

    prompts = [[1, 2, 3], [4, 6], [7, 8, 9, 10]] * 10
    cfg = PPOConfig(
        iterations=25,
        batch_size=32,
        minibatch_size=8,
        epochs=4,
        lr=3e-3,
        init_kl_coef=init_kl_coef,
        target_kl=3.0,
        kl_horizon=10000,
        missing_eos_penalty=0.0,
    )
    sampling = SimpleNamespace(
        seed=1, temperature=1.0, max_answer_tokens=12, grad_clip=1.0, device="cpu"
    )
    return train_ppo(policy, ref, value, score_fn, prompts, TOY_TOK, cfg, sampling, out_dir)


@pytest.mark.slow
def test_ppo_learns_a_programmatic_reward(tmp_path):
    """A short PPO run must raise the toy's mean score well above its start, and its KL penalty
    must hold the policy nearer the reference than the same run without one (which ends at about
    twice the KL, the score saturated)."""
    history = toy_ppo(tmp_path / "beta", init_kl_coef=0.02)
    free = toy_ppo(tmp_path / "no_penalty", init_kl_coef=0.0)
    start = sum(h["objective/scores"] for h in history[:3]) / 3
    end = sum(h["objective/scores"] for h in history[-3:]) / 3
    kl, kl_free = (sum(h["objective/kl"] for h in run[-3:]) / 3 for run in (history, free))
    print(f"\nscore {start:.3f} -> {end:.3f}, KL {kl:.2f} (without the penalty {kl_free:.2f})")
    assert end > start + 0.25
    assert kl < 0.8 * kl_free


def test_leave_one_out_baseline_and_rloo_advantages():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    assert torch.allclose(leave_one_out(x, 3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    assert torch.equal(leave_one_out(x, 1), x)
    # the EOS penalty first, then the prompt's baseline
    s = leave_one_out(eos_penalised(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), -1.0), 2)
    assert torch.allclose(s, torch.tensor([1.0, -1.0]))
    # RLOO: the answer's summed reward minus the other answers' mean, on every real token
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(
        rloo_advantages(rewards, mask, 2), torch.tensor([[0.5, 0.5, 0.5], [-0.5, 0.0, 0.0]])
    )


def rollout_batch(score, logprobs, ref_logprobs):
    """A rollout batch as train_ppo's rollout returns it: every answer ended, every token real."""
    mask = torch.ones_like(logprobs)
    return dict(
        score=torch.tensor(score),
        ended=torch.ones(len(score), dtype=torch.bool),
        mask=mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=torch.zeros_like(logprobs),
    )


def test_rloo_subtracts_the_baseline_once_on_the_combined_path():
    """Scores [1, 0, 0, 0] with no KL: advantages [1, -1/3, -1/3, -1/3] (Ahmadian et al. 2024,
    eq. 8), not the twice-subtracted [4/3, -4/9, ...]; the KL term keeps its kl_coef against the
    score."""
    cfg = PPOConfig(advantage="rloo", rollouts_per_prompt=4, missing_eos_penalty=0.0)
    zeros = torch.zeros(4, 2)
    _, _, advantages, returns, _ = advantages_and_returns(
        rollout_batch([1.0, 0, 0, 0], zeros, zeros), cfg, 0.05
    )
    assert returns is None
    assert torch.allclose(advantages[:, 0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    # answer 0: KL 2 nats more than the others
    logprobs = torch.tensor([[1.0, 1.0], [0, 0], [0, 0], [0, 0]])
    _, _, advantages, _, _ = advantages_and_returns(
        rollout_batch([0.0] * 4, logprobs, zeros), cfg, 0.5
    )
    assert torch.allclose(advantages[:, 0], torch.tensor([-1.0, 1 / 3, 1 / 3, 1 / 3]))


def test_grpo_normalises_within_the_group_and_keeps_the_kl_out_of_the_advantage():
    score = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv = grpo_advantages(score, torch.ones(8, 3), 4)[:, 0]
    std = torch.tensor([1.0, 0, 0, 0]).std()
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group without differences teaches nothing
    cfg = PPOConfig(advantage="grpo", rollouts_per_prompt=4, missing_eos_penalty=0.0)
    logprobs = torch.tensor([[1.0, 1.0]] + [[0.0, 0.0]] * 3)
    _, kl, advantages, _, _ = advantages_and_returns(
        rollout_batch([1.0, 0, 0, 0], logprobs, torch.zeros(4, 2)), cfg, 0.5
    )
    # the KL of answer 0 does not lower its advantage
    assert torch.allclose(advantages[:, 0], adv[:4])
    assert kl[0].sum() == 2.0  # but it is measured
    # k3: >= 0, 0 only where the two models agree
    k3 = k3_kl(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -0.5, -2.0]))
    assert k3[0] == 0 and (k3[1:] > 0).all()


def test_explained_variance_of_a_batch_without_variance_is_none():
    mask = torch.ones(2, 3)
    assert explained_variance(torch.randn(2, 3), torch.full((2, 3), 0.7), mask) is None
    returns = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    assert abs(explained_variance(returns, returns, mask) - 1.0) < 1e-6


def test_iteration_prompts_come_in_groups():
    prompts = [[i] for i in range(20)]
    cfg = PPOConfig(batch_size=12, rollouts_per_prompt=4)
    chosen = iteration_prompts(prompts, cfg, seed=3, it=5)
    assert len(chosen) == 12 and all(
        chosen[g * 4 : (g + 1) * 4] == [chosen[g * 4]] * 4 for g in range(3)
    )
    assert len({tuple(p) for p in chosen}) == 3
    assert chosen == iteration_prompts(prompts, cfg, seed=3, it=5)  # resumable: a pure function


# -----------------------------------------------------------------------------
# Learning behaviour on toy policies (slow): the default settings, with a learning rate for a toy
# model

TOY_LR = (
    3e-3  # a 2-layer, 32-wide random model needs larger steps than a trained one (default 2e-5)
)
EOT, TARGET = TOY_TOK.eot, 5


def toy(tmp_path, long_answers=False, seed=0):
    """(policy, reference, value model from a reward-model file, sampling): a random tiny GPT. With
    long_answers, end-of-text gets a logit bias of -30, so every answer runs to 60 tokens."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=80, vocab_size=16, n_layer=2, n_head=2, n_embd=32)
    policy, ref = GPT(config), GPT(config)
    if long_answers:
        for m in (policy, ref):
            m.lm_head = torch.nn.Linear(32, 16, bias=True)
            m.lm_head.bias.data[EOT] = -30.0
    ref.load_state_dict(policy.state_dict())
    rm = ScalarModel(GPT(config))
    # a trained head's raw scale, far from the score's
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    save_checkpoint(tmp_path / "rm.pt", **rm.checkpoint())
    value = fresh_value_model(tmp_path / "rm.pt", "cpu")
    max_answer_tokens = 60 if long_answers else 12
    sampling = SimpleNamespace(
        seed=1, temperature=1.0, max_answer_tokens=max_answer_tokens, grad_clip=1.0, device="cpu"
    )
    return policy, ref, value, sampling


TOY_PROMPTS = [[1, 2, 3], [4, 6], [7, 8, 9, 10], [11, 12]] * 10


def run(tmp_path, policy, ref, value, sampling, score_fn, **overrides):
    """train_ppo on the toy, in a fixed batch layout (32 answers, 4 a prompt, minibatches of 16):
    the toy's step counts do not follow the default's."""
    toy_layout = dict(batch_size=32, rollouts_per_prompt=4, minibatch_size=16)
    cfg = replace(PPOConfig(lr=TOY_LR, missing_eos_penalty=0.0, **toy_layout), **overrides)
    return train_ppo(
        policy, ref, value, score_fn, TOY_PROMPTS, TOY_TOK, cfg, sampling, tmp_path / "ppo"
    )


@torch.no_grad()
def p_first_token(policy, token):
    """Exact P(first answer token = token), averaged over the toy prompts."""
    ps = [policy(torch.tensor([p]))[0, -1].softmax(-1)[token].item() for p in TOY_PROMPTS[:4]]
    return sum(ps) / len(ps)


@pytest.mark.slow
def test_ppo_without_reward_stays_at_the_reference(tmp_path):
    """Score fixed at 0: nothing to learn, so the policy must not drift (whitening the critic's
    noise to full-size steps would move it)."""
    policy, ref, value, sampling = toy(tmp_path)
    history = run(
        tmp_path,
        policy,
        ref,
        value,
        sampling,
        lambda q, qm, r, rm: torch.zeros(len(r)),
        iterations=10,
    )
    assert max(h["objective/kl"] for h in history) < 0.5, [
        round(h["objective/kl"], 3) for h in history
    ]


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_credits_an_early_token_of_a_long_answer(tmp_path, critic):
    """Only the first of 60 answer tokens decides the score; the score must reach it
    (GAE with lam = 1), with either critic."""
    policy, ref, value, sampling = toy(tmp_path, long_answers=True)
    value = value if critic == "separate" else ValueHead(32)
    before = p_first_token(policy, TARGET)
    history = run(
        tmp_path,
        policy,
        ref,
        value,
        sampling,
        lambda q, qm, r, rm: (r[:, 0] == TARGET).float(),
        critic=critic,
    )
    assert min(h["completions/mean_length"] for h in history) >= 50
    after = p_first_token(policy, TARGET)
    print(f"\nP(first token rewarded) {before:.3f} -> {after:.3f} in {len(history)} iterations")
    assert before < 0.1 and after > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_critic_warmup_trains_the_value_model_alone_on_the_score_scale(tmp_path, critic):
    """The value model starts at 0 (not the reward model's raw head) and, after the warm-up batches
    in which the policy waits, predicts the Monte-Carlo returns better than their mean (explained
    variance > 0). The shared head too, and a resumed run reads it back from the checkpoint."""
    policy, ref, value, sampling = toy(tmp_path, long_answers=True)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        assert value(torch.tensor([[1, 2, 3]]), torch.ones(1, 3)).abs().max() == 0
    value = value if critic == "separate" else ValueHead(32)
    settings = dict(critic_warmup=4, vf_lr=1e-2, critic=critic)

    def score_fn(query, query_mask, response, response_mask):
        return (response[:, 0] == TARGET).float() * 2.0

    history = run(tmp_path, policy, ref, value, sampling, score_fn, iterations=4, **settings)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in start.items())  # it waited
    assert [h["phase"] for h in history] == ["critic warm-up"] * 4
    # resumed into a zeroed critic, the run reads the warm-up's critic back from its checkpoint
    trained, value = value.state_dict(), copy.deepcopy(value)
    with torch.no_grad():
        for p in value.parameters():
            p.zero_()
    run(tmp_path, policy, ref, value, sampling, score_fn, iterations=4, **settings)
    assert all(torch.equal(v, value.state_dict()[k]) for k, v in trained.items())
    if critic == "shared":  # a linear probe of a random toy's states: no explained variance asked
        return
    # one more iteration: its explained variance is measured on its fresh rollout, i.e. the critic
    # as the warm-up left it
    history = run(tmp_path, policy, ref, value, sampling, score_fn, iterations=5, **settings)
    assert [h["phase"] for h in history][-1] == "ppo"
    assert history[-1]["val/explained_variance"] > 0, [h["val/explained_variance"] for h in history]


# -----------------------------------------------------------------------------
# Exact values of the statistics and KL terms, each computed here in plain math: every test below
# fails for one mutation of the code it covers (issue 45, item 6).


def test_clipfrac_and_approx_kl_on_hand_computed_ratios():
    """Ratios 1.5, 1.5, 0.5, 0.5 (outside the clip range 0.2), 1.1 and 1.0 (inside), one padding
    token. The clip binds (the clipped term is the larger loss) only for A > 0 with r > 1.2 and
    A < 0 with r < 0.8: tokens 0 and 3, so clipfrac = 2 / 6. Inside the range the two terms are
    equal, so counting `>=` would give 4 / 6. approx_kl = 0.5 (log r)^2 over the real tokens."""
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 1.0, 7.0]
    new = torch.log(torch.tensor(ratios))
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([1.0] * 6 + [0.0])
    _, clipfrac, approx_kl = policy_loss(new, torch.zeros(7), adv, mask, cliprange=0.2)
    assert clipfrac.item() == pytest.approx(2 / 6, abs=1e-7)
    want = 0.5 * sum(math.log(r) ** 2 for r in ratios[:6]) / 6
    assert approx_kl.item() == pytest.approx(want, rel=1e-6)


def test_per_token_kl_is_policy_minus_reference():
    """The sampled-token estimate of KL(policy || SFT) is log pi - log pi_ref: a policy that puts
    more probability on its own sample than SFT does has positive KL, and pays for it."""
    logprobs, ref = torch.tensor([[-0.5, -3.0]]), torch.tensor([[-2.0, -1.0]])
    rewards, kl = compute_rewards(torch.tensor([0.0]), logprobs, ref, torch.ones(1, 2), 0.1)
    assert kl[0].tolist() == pytest.approx([1.5, -2.0])
    assert rewards[0].tolist() == pytest.approx([-0.15, 0.2])


def test_k3_estimates_kl_policy_to_reference():
    """k3 (Schulman 2020) with x = log pi_ref - log pi: exp(x) - x - 1. log pi = -1, log pi_ref = -2
    gives x = -1: exp(-1) = 0.3679; the reverse direction would give exp(1) - 2 = 0.7183."""
    k3 = k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]))
    assert k3.tolist() == pytest.approx([math.exp(-1), math.exp(1) - 2], rel=1e-6)


class ConstantLM(torch.nn.Module):
    """A language model whose next-token logits are the same learnable vector at every position,
    so each token's log-prob and its gradient are known in closed form."""

    def __init__(self, logits):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, len(logits))
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.bias.copy_(torch.tensor(logits))

    def hidden_states(self, ids, mask):
        return torch.zeros(*ids.shape, 1)

    def head(self, hidden):
        return self.lm_head(hidden)


def test_grpo_kl_term_adds_beta_k3_to_the_loss_and_pulls_toward_the_reference():
    """GRPO's loss is the surrogate + beta k3 (Shao et al. 2024, eq. 3-4). With advantages 0 the
    surrogate is 0, so the loss is beta x the mean k3 and its gradient, through log pi, is
    d k3 / d log pi = 1 - exp(log pi_ref - log pi), times d log pi_k / d b_j = 1[j = k] - p_j."""
    logits, tokens, ref = [0.0, 1.0, 2.0], [2, 0], [-1.0, -0.5]
    policy = ConstantLM(logits)
    logp = [x - math.log(sum(math.exp(v) for v in logits)) for x in logits]
    p = [math.exp(v) for v in logp]
    x = [logp[t] for t in tokens]
    beta = 0.3
    k3 = [math.exp(ref[i] - x[i]) - (ref[i] - x[i]) - 1 for i in range(2)]
    dk3 = [1 - math.exp(ref[i] - x[i]) for i in range(2)]  # d k3 / d log pi
    want_loss = beta * sum(k3) / 2
    want_grad = [
        beta / 2 * sum(dk3[i] * ((j == tokens[i]) - p[j]) for i in range(2)) for j in range(3)
    ]
    mb = dict(
        query=torch.tensor([[1]]),
        query_mask=torch.ones(1, 1),
        response=torch.tensor([tokens]),
        response_mask=torch.ones(1, 2),
        mask=torch.ones(1, 2),
        logprobs=torch.tensor([x]),
        ref_logprobs=torch.tensor([ref]),
        advantages=torch.zeros(1, 2),
    )
    cfg = PPOConfig(advantage="grpo")
    run_cfg = SimpleNamespace(device="cpu", temperature=1.0)
    loss, _ = minibatch_loss(policy, None, mb, cfg, run_cfg, beta, train_policy=True)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    loss.backward()
    assert policy.lm_head.bias.grad.tolist() == pytest.approx(want_grad, rel=1e-5, abs=1e-7)


def test_the_logged_gradient_norm_is_the_joint_norm_before_clipping(tmp_path):
    """loss/grad_norm: the norm over policy and critic of one minibatch's gradient, before
    grad_clip scales it (the clipped norm would read grad_clip)."""
    policy, _, value, sampling = toy(tmp_path)
    sampling.grad_clip = 1e-4
    torch.manual_seed(1)
    B, Q, R = 8, 3, 5
    tokens = (
        torch.randint(0, EOT, (B, Q)),
        torch.ones(B, Q, dtype=torch.long),
        torch.randint(0, EOT, (B, R)),
        torch.ones(B, R, dtype=torch.long),
    )
    with torch.no_grad():
        logprobs = response_logprobs(policy, *tokens)
        values = value_predictions(value, *tokens)
    batch = dict(zip(("query", "query_mask", "response", "response_mask"), tokens, strict=True))
    batch.update(mask=tokens[3].float(), logprobs=logprobs, ref_logprobs=logprobs, values=values)
    batch.update(advantages=torch.randn(B, R), returns=torch.randn(B, R))
    cfg = PPOConfig(batch_size=B, rollouts_per_prompt=1, minibatch_size=B, epochs=1)
    # the expected norm: the same loss's gradient, on copies
    p2, v2 = copy.deepcopy(policy), copy.deepcopy(value)
    loss, _ = minibatch_loss(p2, v2, batch, cfg, sampling, 0.05, True)
    loss.backward()
    params = [*p2.parameters(), *v2.parameters()]
    expected = torch.sqrt(sum((p.grad**2).sum() for p in params if p.grad is not None)).item()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (policy, value)]
    generator = torch.Generator().manual_seed(0)
    stats = ppo_update(policy, value, optimizers, batch, cfg, sampling, generator, 0.05, True)
    assert expected > 100 * sampling.grad_clip
    assert stats["loss/grad_norm"] == pytest.approx(expected, rel=1e-4)
