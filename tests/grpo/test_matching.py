"""The forward-process objectives (DiffusionNFT, AWM) against their references' formulas on random tensors."""

from __future__ import annotations

import pytest
import torch

from flowgrove.grpo.matching import (FORWARD_LOSSES, OBJECTIVES, MatchingSettings, MatchingTerms, awm_loss, nft_loss,
                                     output_kl)
from flowgrove.samplers.steps import add_noise, velocity_target, x0_from_velocity

# The references' losses written out here in their own variables (velocities, x_t = (1 - t) x0 + t noise, t), as
# read in NVlabs/DiffusionNFT scripts/train_nft_sd3.py and scxue/advantage_weighted_matching scripts/train_sd3_awm.py.

def reference_nft_loss(v, v_old, x0, noise, t, adv, beta, adv_clip_max):
    """DiffusionNFT: positive / implicit negative velocities, x0 = x_t - t v, adaptive weights, r from the advantage."""
    dims = tuple(range(1, x0.ndim))
    t_ = t.view(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - t_) * x0 + t_ * noise
    a = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    r = torch.clamp((a / adv_clip_max) / 2.0 + 0.5, 0, 1)
    positive = beta * v + (1 - beta) * v_old.detach()
    negative = (1.0 + beta) * v_old.detach() - beta * v
    x0_pos = xt - t_ * positive
    with torch.no_grad():
        w_pos = torch.abs(x0_pos.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    pos_loss = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    x0_neg = xt - t_ * negative
    with torch.no_grad():
        w_neg = torch.abs(x0_neg.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    neg_loss = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    return ((r * pos_loss / beta + (1.0 - r) * neg_loss / beta) * adv_clip_max).mean()


def reference_awm_loss(v, v_old, x0, noise, t, adv, power, clip_range, adv_clip_max):
    """AWM: the ghuber-weighted flow-matching "log-prob", PPO-clip with advantages clamped and divided by the clamp."""
    def log_prob(out):
        lp = -(out.double() - (noise.double() - x0.double())) ** 2
        lp = lp.mean(dim=tuple(range(1, lp.ndim)))
        return -(torch.pow(-lp + 1e-10, power) - torch.pow(torch.tensor(1e-10, dtype=lp.dtype), power)) * t / power

    a = torch.clamp(adv, -adv_clip_max, adv_clip_max) / adv_clip_max * 1.0  # advantage_max = 1
    ratio = torch.exp(log_prob(v) - log_prob(v_old).detach())
    unclipped, clipped = -a * ratio, -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped))


def _forward_rows(seed: int, scale: float = 0.3):
    """Random float64 rows: clean samples, noise, times, current (leaf) and old velocities, advantages."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = (torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1.0, 0.93, 0.7, 0.45, 0.2, 0.04], dtype=torch.float64)
    v_old = noise - x0 + 0.5 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = (v_old + scale * torch.randn(x0.shape, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([2.0, -1.5, 7.0, -9.0, 0.0, 0.4], dtype=torch.float64)  # two beyond the clamp 5
    return x0, noise, t, v, v_old, adv


def _terms(x0, noise, t, v, v_old, adv) -> MatchingTerms:
    x = add_noise(x0, noise, t)
    return MatchingTerms(output=v, old_output=v_old, x0_pred=x0_from_velocity(x, v, t),
                         old_x0_pred=x0_from_velocity(x, v_old, t), x0=x0, target=velocity_target(x0, noise, t),
                         sigma=t, advantages=adv)


@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_nft_loss_matches_the_reference(beta: float, scale: float) -> None:
    x0, noise, t, v, v_old, adv = _forward_rows(0, scale)
    settings = MatchingSettings(adv_clip_max=5.0, nft_beta=beta, awm_power=0.25, clip_range=1.0)
    ours = nft_loss(_terms(x0, noise, t, v, v_old, adv), settings)
    (grad,) = torch.autograd.grad(ours.loss, v)
    reference = reference_nft_loss(v, v_old, x0, noise, t, adv, beta, 5.0)
    (ref_grad,) = torch.autograd.grad(reference, v)
    torch.testing.assert_close(ours.loss, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    assert ours.clip_fraction == 0 and torch.equal(ours.ratio, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(ours.approx_kl, 0.5 * ((v - v_old) ** 2).mean().detach())


@pytest.mark.parametrize("power", [0.25, 1.0])
@pytest.mark.parametrize("clip_range", [1.0, 0.05])
def test_awm_loss_matches_the_reference(power: float, clip_range: float) -> None:
    x0, noise, t, v, v_old, adv = _forward_rows(1, scale=0.8)  # off-policy: some ratios leave [0.95, 1.05]
    settings = MatchingSettings(adv_clip_max=5.0, nft_beta=1.0, awm_power=power, clip_range=clip_range)
    ours = awm_loss(_terms(x0, noise, t, v, v_old, adv), settings)
    (grad,) = torch.autograd.grad(ours.loss, v)
    reference = reference_awm_loss(v, v_old, x0, noise, t, adv, power, clip_range, 5.0)
    (ref_grad,) = torch.autograd.grad(reference, v)
    torch.testing.assert_close(ours.loss, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    if clip_range < 1:
        assert 0 < ours.clip_fraction < 1


def test_on_policy_awm_is_the_advantage_weighted_matching_loss() -> None:
    # Ratio 1: the gradient is that of mean(A/5 * t * mse) for p = 1, the sigma-weighted flow-matching loss of each
    # sample scaled by its clamped advantage (a positive advantage pulls v towards noise - x0, a negative one pushes).
    x0, noise, t, v, _, adv = _forward_rows(2)
    settings = MatchingSettings(adv_clip_max=5.0, nft_beta=1.0, awm_power=1.0, clip_range=1.0)
    out = awm_loss(_terms(x0, noise, t, v, v.detach(), adv), settings)
    (grad,) = torch.autograd.grad(out.loss, v)
    mse = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    (expected,) = torch.autograd.grad((adv.clamp(-5, 5) / 5 * t * mse).mean(), v)
    torch.testing.assert_close(grad, expected)
    assert torch.equal(out.ratio, torch.ones(6, dtype=torch.float64)) and out.clip_fraction == 0


def test_on_policy_nft_gradient_follows_the_sign_of_the_advantage() -> None:
    # v = v_old: a zero advantage (r = 1/2) balances the positive and the negative policy exactly; a positive advantage
    # moves the data prediction towards the clean sample, a negative one away from it.
    x0, noise, t, v, _, _ = _forward_rows(3)
    settings = MatchingSettings(adv_clip_max=5.0, nft_beta=1.0, awm_power=0.25, clip_range=1.0)
    for sign in (0.0, 1.0, -1.0):
        adv = torch.full((6,), 2.0 * sign, dtype=torch.float64)
        (grad,) = torch.autograd.grad(nft_loss(_terms(x0, noise, t, v, v.detach(), adv), settings).loss, v)
        x = add_noise(x0, noise, t)
        moved = x0_from_velocity(x, v.detach() - 0.01 * grad, t)  # a small gradient step on the velocity
        before = (x0_from_velocity(x, v.detach(), t) - x0).pow(2).sum(dim=(1, 2, 3))
        after = (moved - x0).pow(2).sum(dim=(1, 2, 3))
        if sign == 0:
            assert grad.abs().max() < 1e-12
        else:
            assert bool((torch.sign(before - after) == sign).all())


def test_forward_losses_validate_their_settings() -> None:
    x0, noise, t, v, v_old, adv = _forward_rows(4)
    terms = _terms(x0, noise, t, v, v_old, adv)
    with pytest.raises(ValueError, match="nft_beta"):
        nft_loss(terms, MatchingSettings(5.0, 0.0, 0.25, 1.0))
    with pytest.raises(ValueError, match="power"):
        awm_loss(terms, MatchingSettings(5.0, 1.0, 0.0, 1.0))
    assert set(FORWARD_LOSSES) == {"nft", "awm"} and OBJECTIVES == ("grpo", "nft", "awm")


def test_output_kl_is_the_mean_squared_difference() -> None:
    # rows [0.3, -0.1] and [1, 1] against zeros: (0.09 + 0.01) / 2 = 0.05 and 1
    out = output_kl(torch.tensor([[0.3, -0.1], [1.0, 1.0]]), torch.zeros(2, 2))
    torch.testing.assert_close(out, torch.tensor([0.05, 1.0]))
