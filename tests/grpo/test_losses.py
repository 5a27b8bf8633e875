"""PPO-clip loss and transition KL, worked by hand and against torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowgrove.grpo.losses import PolicyLoss, ppo_clip_loss, transition_kl


def test_ppo_clip_three_cases_by_hand() -> None:
    # clip_range 0.1, so r is clipped to [0.9, 1.1]
    # case 1: r = 1.05 (inside), A = 2:   max(-2 * 1.05, -2 * 1.05) = -2.1   (gradient flows)
    # case 2: r = 1.2 (above),  A = 1:    max(-1.2, -1 * 1.1) = -1.1          (clipped, no gradient)
    # case 3: r = 0.8 (below),  A = -1:   max(0.8, 1 * 0.9) = 0.9             (clipped, no gradient)
    # loss = (-2.1 - 1.1 + 0.9) / 3 = -0.766667
    old = torch.tensor([0.3, -1.0, 2.0])
    log_prob = (old + torch.log(torch.tensor([1.05, 1.2, 0.8]))).requires_grad_()
    advantages = torch.tensor([2.0, 1.0, -1.0])
    out = ppo_clip_loss(log_prob, old, advantages, clip_range=0.1, adv_clip_max=5.0)
    assert isinstance(out, PolicyLoss)
    torch.testing.assert_close(out.loss, torch.tensor(-2.3 / 3))
    # |r - 1| > 0.1 for cases 2 and 3
    torch.testing.assert_close(out.clip_fraction, torch.tensor(2 / 3))
    # 0.5 * mean(log(1.05)^2, log(1.2)^2, log(0.8)^2) = 0.5 * (0.0023805 + 0.0332412 + 0.0497930) / 3 = 0.0142358
    torch.testing.assert_close(out.approx_kl, torch.tensor(0.0142358), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.ratio, torch.tensor([1.05, 1.2, 0.8]))
    assert not out.ratio.requires_grad
    # d loss / d log_prob = d(-A r)/d log r / 3 = -A r / 3 = -2.1 / 3 = -0.7 for case 1, 0 for the clipped ones
    out.loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.7, 0.0, 0.0]))


def test_ppo_clip_clamps_advantages_and_validates() -> None:
    # on-policy (r = 1) with A = 10 clamped to 5: loss = -5
    zeros = torch.zeros(2)
    out = ppo_clip_loss(zeros, zeros, torch.tensor([10.0, -10.0]), clip_range=1e-4, adv_clip_max=5.0)
    # mean(-5 * 1, 5 * 1) = 0; first element alone:
    torch.testing.assert_close(out.loss, torch.tensor(0.0))
    single = ppo_clip_loss(zeros[:1], zeros[:1], torch.tensor([10.0]), clip_range=1e-4, adv_clip_max=5.0)
    torch.testing.assert_close(single.loss, torch.tensor(-5.0))
    assert single.clip_fraction == 0 and single.approx_kl == 0
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(zeros, zeros, zeros, clip_range=0.0, adv_clip_max=5.0)
    with pytest.raises(ValueError, match="shape"):
        ppo_clip_loss(zeros, zeros[:1], zeros, clip_range=0.1, adv_clip_max=5.0)


@pytest.mark.parametrize("per_sample_std", [False, True])
def test_transition_kl_matches_torch(per_sample_std: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    ref_mean = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    # transition std g * sqrt(sigma - sigma_next), e.g. 0.7 * sqrt(0.05)
    std = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64) if per_sample_std else 0.7 * math.sqrt(0.05)
    scale = std.view(-1, 1, 1, 1) if per_sample_std else torch.tensor(std, dtype=torch.float64)
    reference = kl_divergence(Normal(mean, scale), Normal(ref_mean, scale))  # [3, 2, 4, 4]
    torch.testing.assert_close(transition_kl(mean, ref_mean, std), reference.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(transition_kl(mean, ref_mean, std, reduce="sum"), reference.sum(dim=(1, 2, 3)))


def test_transition_kl_by_hand() -> None:
    # |0.3|^2 / (2 * 0.1^2) = 0.09 / 0.02 = 4.5
    torch.testing.assert_close(transition_kl(torch.tensor([[0.3]]), torch.tensor([[0.0]]), 0.1), torch.tensor([4.5]))
