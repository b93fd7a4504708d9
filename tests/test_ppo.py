"""ppo.py's pieces against plain reference computations, and a short learning run that can fail."""
import torch

from ppo import (AdaptiveKLController, FixedKLController, PPOConfig, compute_rewards, gae, policy_loss,
                 train_ppo, whiten)


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
    logprobs, ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]]), torch.tensor([[-1.5, -2.0, -1.0], [-2.0, -1.0, 0.0]])
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


def test_clipped_objective_gradient_is_zero_where_clipped():
    old = torch.zeros(4)
    # ratio = exp(new): 1.5 (above 1+eps) and 0.5 (below 1-eps), with advantages of both signs
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipfrac, _ = policy_loss(new, old, adv, torch.ones(4), cliprange=0.2)
    loss.backward()
    # positive advantage with ratio above 1+eps, negative with ratio below 1-eps: clipped, zero gradient
    assert new.grad[0] == 0 and new.grad[3] == 0
    # the pessimistic side keeps its gradient
    assert new.grad[1] != 0 and new.grad[2] != 0
    assert clipfrac.item() == 0.5


def test_ppo_learns_a_programmatic_reward(tmp_path):
    """Tiny random policy; score = fraction of answer tokens that are token 5. A short PPO run must raise
    the mean score well above its start while the KL to the reference stays bounded."""
    from model import GPT, GPTConfig
    from model import ScalarModel
    from types import SimpleNamespace
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=16, n_layer=2, n_head=2, n_embd=32)
    policy = GPT(config)
    ref = GPT(config)
    ref.load_state_dict(policy.state_dict())
    value = ScalarModel(GPT(config))

    def score_fn(query, query_mask, response, response_mask):
        return ((response == 5).float() * response_mask).sum(1) / response_mask.sum(1)

    prompts = [[1, 2, 3], [4, 6], [7, 8, 9, 10]] * 10
    cfg = PPOConfig(iterations=25, batch_size=32, minibatch_size=8, epochs=4, lr=3e-3, init_kl_coef=0.02,
                    target_kl=3.0, kl_horizon=10000, missing_eos_penalty=0.0)
    sampling = SimpleNamespace(seed=1, temperature=1.0, max_answer_tokens=12, grad_clip=1.0)
    history = train_ppo(policy, ref, value, score_fn, prompts, cfg, sampling, eot=15, device="cpu", out_dir=tmp_path,
                        log=lambda *a: None)
    start = sum(h["score"] for h in history[:3]) / 3
    end = sum(h["score"] for h in history[-3:]) / 3
    print(f"\nscore {start:.3f} -> {end:.3f}, final KL {history[-1]['kl']:.2f}")
    assert end > start + 0.25
    assert history[-1]["kl"] < 15.0
