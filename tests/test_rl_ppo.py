"""PPO's pieces on hand-made tensors: per-token rewards, GAE, whitening (TRL 0.13 semantics)."""

from __future__ import annotations

import torch

from medsft.rl.ppo import gae, masked_mean, masked_whiten, token_rewards


def _reference_gae(rewards, values, gamma, lam):
    """TRL 0.13 PPOTrainer's loop, for one row without padding."""
    last, out = 0.0, []
    T = len(rewards)
    for t in reversed(range(T)):
        nxt = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * nxt - values[t]
        last = delta + gamma * lam * last
        out.append(last)
    return out[::-1]


def test_token_rewards_put_the_score_on_the_last_real_token_and_kl_everywhere():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float)
    kl = torch.full((3, 4), 0.5)
    r = token_rewards(torch.tensor([1.0, 0.1, 1.0]), kl, mask, kl_coef=0.2)
    assert torch.allclose(r[0], torch.tensor([-0.1, -0.1, 0.9, 0.0]))
    assert torch.allclose(r[1], torch.tensor([-0.1, -0.1, -0.1, 0.0]))
    assert torch.equal(r[2], torch.zeros(4))  # an empty completion gets nothing


def test_gae_matches_trl_013_loop_and_ignores_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    for row, n in ((0, 5), (1, 3)):
        expected = _reference_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), 1.0, 0.95)
        assert torch.allclose(adv[row, :n], torch.tensor(expected), atol=1e-6)
        assert torch.allclose(ret[row, :n], adv[row, :n] + values[row, :n])
    assert torch.equal(adv[1, 3:], torch.zeros(2)) and torch.equal(ret[1, 3:], torch.zeros(2))


def test_gae_with_lambda_one_and_no_critic_is_the_monte_carlo_return():
    mask = torch.ones(1, 4)
    rewards = token_rewards(torch.tensor([1.0]), torch.zeros(1, 4), mask, kl_coef=0.03)
    adv, ret = gae(rewards, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.ones(1, 4)) and torch.allclose(ret, torch.ones(1, 4))


def test_masked_whiten_normalises_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-6
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)  # unbiased variance of 1,2,3 = 1
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-4)
