"""PPO-clip loss and transition KL, worked by hand and against torch.distributions; GRPO-Guard, TempFlow-GRPO's
weights and Flow-DPPO's trust region against their references."""

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


# ---- GRPO-Guard, TempFlow-GRPO weights, Flow-DPPO's trust region ------------------------------------------------
from flowgrove.grpo.losses import (  # noqa: E402
    STEP_WEIGHTS, TrustRegion, guard_log_ratio, policy_loss, step_weights,
)
from flowgrove.samplers import schedules  # noqa: E402
from flowgrove.samplers.steps import flow_grpo_g, gaussian_transition  # noqa: E402

F64 = torch.float64


def _flow_grpo_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std_dev_t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """flow_grpo ``sde_step_with_logprob``'s log-prob, written out: a batch of one step, ``dt = sigma_next - sigma``."""
    s = (std_dev_t * torch.sqrt(-dt)).view(-1, 1, 1, 1)
    lp = -((x_next - mean) ** 2) / (2 * s**2) - torch.log(s) - torch.log(torch.sqrt(torch.tensor(2 * math.pi, dtype=F64)))
    return lp.mean(dim=(1, 2, 3))  # [B]


def _reference_guard_step(mean, old_mean, x_next, old_log_prob, std_dev_t, sqrt_dt, adv, clip_range):
    """flow_grpo ``scripts/train_sd3_GRPO_Guard.py`` (``config.rationorm``), one training batch of one step j, written
    out: sigma_t and sqrt_dt are the batch's means, the ratio is re-centred and rescaled, the loss divided by dt."""
    sigma_t = std_dev_t.mean()
    log_prob = _flow_grpo_log_prob(x_next, mean, std_dev_t, -(sqrt_dt**2))
    bias = (mean - old_mean).pow(2).mean(dim=(1, 2, 3)) / (2 * (sqrt_dt.mean() * sigma_t) ** 2)
    ratio = torch.exp((log_prob - old_log_prob + bias) * (sqrt_dt.mean() * sigma_t))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped)) / (sqrt_dt.mean() ** 2), ratio


def _sd3_steps(per_step: int, steps: range):
    """Flow-GRPO's grid (SD3, 10 steps, shift 3, a = 0.7): sigma, sigma_next, g [E] with ``per_step`` rows per step."""
    sigmas = schedules.sd3_sigmas(10, 3.0).to(F64)
    idx = torch.tensor(list(steps)).repeat_interleave(per_step)  # [E] step of each row
    sigma, sigma_next = sigmas[idx], sigmas[idx + 1]
    return idx, sigma, sigma_next, flow_grpo_g(0.7, sigma, sigma_next)


def test_guard_log_ratio_is_the_noise_times_the_mean_drift():
    # x' = mu_old + s z, dmu = mu - mu_old: log p(x'|mu) - log p(x'|mu_old) = mean(z dmu) / s - mean(dmu^2) / (2 s^2),
    # so s * (log-ratio + drift KL) = mean(z dmu): no bias, no 1/s
    gen = torch.Generator().manual_seed(0)
    old_mean = torch.randn(5, 2, 4, 4, generator=gen, dtype=F64)
    mean = old_mean + 0.05 * torch.randn(5, 2, 4, 4, generator=gen, dtype=F64)
    std = torch.tensor([0.7, 0.5, 0.3, 0.2, 0.05], dtype=F64)
    z = torch.randn(5, 2, 4, 4, generator=gen, dtype=F64)
    x_next = old_mean + std.view(-1, 1, 1, 1) * z
    lp, old_lp = gaussian_transition(mean, std, x_next=x_next).log_prob, gaussian_transition(old_mean, std, x_next=x_next).log_prob
    drift = transition_kl(mean, old_mean, std)
    torch.testing.assert_close(lp - old_lp, (z * (mean - old_mean)).mean(dim=(1, 2, 3)) / std - drift, rtol=0, atol=1e-12)
    torch.testing.assert_close(guard_log_ratio(lp, old_lp, drift, std), (z * (mean - old_mean)).mean(dim=(1, 2, 3)),
                               rtol=0, atol=1e-12)


def test_guard_log_ratio_has_mean_zero_at_every_step_where_the_plain_one_is_shifted():
    # many noise draws per step, steps of very different std in one batch: per step, the re-centred log-ratio
    # averages 0 (the ratio is centred on 1) and has one spread; the plain one averages -drift KL (< 0) with a spread
    # ~ 1/std that differs from step to step (GRPO-Guard's observation)
    gen = torch.Generator().manual_seed(1)
    n, steps = 4000, range(9)
    idx, sigma, sigma_next, g = _sd3_steps(n, steps)
    std = g * torch.sqrt(sigma - sigma_next)  # [E] transition std
    dmu = 0.02 * torch.randn(len(steps), 1, 4, 4, generator=gen, dtype=F64)[idx]  # one drift per step
    old_mean = torch.zeros(len(idx), 1, 4, 4, dtype=F64)
    x_next = old_mean + std.view(-1, 1, 1, 1) * torch.randn(old_mean.shape, generator=gen, dtype=F64)
    lp = gaussian_transition(old_mean + dmu, std, x_next=x_next).log_prob
    old_lp = gaussian_transition(old_mean, std, x_next=x_next).log_prob
    drift = transition_kl(old_mean + dmu, old_mean, std)
    guarded, plain = guard_log_ratio(lp, old_lp, drift, std), lp - old_lp
    for j in steps:
        rows = idx == j
        spread = (dmu[rows][0] ** 2).mean().sqrt().item() / 4  # sd of mean(z dmu) over 16 dims
        assert abs(guarded[rows].mean().item()) < 5 * spread / math.sqrt(n)
        assert guarded[rows].std().item() == pytest.approx(spread, rel=0.05)
        torch.testing.assert_close(plain[rows].mean(), -drift[rows][0], rtol=0, atol=5 * spread / std[rows][0].item() / math.sqrt(n))
    assert (drift > 0).all()


def test_grpo_guard_matches_flow_grpo_per_step_on_a_mixed_batch():
    # the reference trains one step per batch (sigma_t, dt = batch means); flowgrove mixes steps in a micro-batch and
    # uses each transition's own: the mean of the per-step reference losses (equal rows per step) and its gradient
    # must equal flowgrove's loss on the shuffled batch
    gen = torch.Generator().manual_seed(2)
    per_step, steps, eps = 6, range(9), 2e-3
    idx, sigma, sigma_next, g = _sd3_steps(per_step, steps)
    std = g * torch.sqrt(sigma - sigma_next)
    old_mean = torch.randn(len(idx), 2, 4, 4, generator=gen, dtype=F64)
    delta = 0.02 * torch.randn(old_mean.shape, generator=gen, dtype=F64)
    x_next = old_mean + std.view(-1, 1, 1, 1) * torch.randn(old_mean.shape, generator=gen, dtype=F64)
    adv = torch.randn(len(idx), generator=gen, dtype=F64)
    old_lp = _flow_grpo_log_prob(x_next, old_mean, g, sigma_next - sigma)

    ref_mean = (old_mean + delta).requires_grad_()
    ref_losses, ref_ratio = [], torch.empty(len(idx), dtype=F64)
    for j in steps:
        rows = idx == j
        loss_j, ratio_j = _reference_guard_step(ref_mean[rows], old_mean[rows], x_next[rows], old_lp[rows], g[rows],
                                                torch.sqrt(sigma - sigma_next)[rows], adv[rows], eps)
        ref_losses.append(loss_j)
        ref_ratio[rows] = ratio_j.detach()
    torch.stack(ref_losses).mean().backward()

    perm = torch.randperm(len(idx), generator=gen)  # one micro-batch mixing every step
    mean = (old_mean + delta)[perm].requires_grad_()
    lp = gaussian_transition(mean, std[perm], x_next=x_next[perm]).log_prob
    out = policy_loss(lp, old_lp[perm], adv[perm], 5.0, TrustRegion("clip", eps), ratio_norm="grpo_guard",
                      drift_kl=transition_kl(mean, old_mean[perm], std[perm]), std=std[perm],
                      weights=step_weights("grpo_guard", sigma[perm], sigma_next[perm], std[perm], 1.0))
    out.loss.backward()
    assert 0 < out.clip_fraction < 1  # both the clipped and the free case occur
    torch.testing.assert_close(out.loss, torch.stack(ref_losses).mean().detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.ratio, ref_ratio[perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean.grad, ref_mean.grad[perm], rtol=1e-9, atol=1e-12)


def test_step_weights_by_hand():
    sigma, sigma_next = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.25, 0.0])
    std = torch.tensor([0.6, 0.3, 0.15])
    torch.testing.assert_close(step_weights("none", sigma, sigma_next, std, 0.4), torch.ones(3))
    # GRPO-Guard: 1 / dt = 1 / 0.1, 1 / 0.25, 1 / 0.2
    torch.testing.assert_close(step_weights("grpo_guard", sigma, sigma_next, std, 0.4), torch.tensor([10.0, 4.0, 5.0]))
    # TempFlow: std / mean std = 0.6 / 0.4, 0.3 / 0.4, 0.15 / 0.4: larger where the noise is larger
    torch.testing.assert_close(step_weights("tempflow", sigma, sigma_next, std, 0.4), torch.tensor([1.5, 0.75, 0.375]))
    assert set(STEP_WEIGHTS) == {"none", "grpo_guard", "tempflow"}
    with pytest.raises(ValueError, match="tempfow"):
        step_weights("tempfow", sigma, sigma_next, std, 0.4)


def test_tempflow_weights_scale_the_clipped_loss_of_each_transition():
    # UniRL's TempFlowGRPO: loss_per_elem (the clipped PPO loss) * weight_scale * transition std, then the mean
    gen = torch.Generator().manual_seed(3)
    idx, sigma, sigma_next, g = _sd3_steps(4, range(9))
    std = g * torch.sqrt(sigma - sigma_next)
    old = torch.randn(len(idx), generator=gen, dtype=F64)
    lp = (old + 2e-3 * torch.randn(len(idx), generator=gen, dtype=F64)).requires_grad_()
    adv = torch.randn(len(idx), generator=gen, dtype=F64)
    ratio = torch.exp(lp - old)
    per = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - 1e-3, 1 + 1e-3))
    reference = (per * 2.25 * std).mean()
    out = policy_loss(lp, old, adv, 5.0, TrustRegion("clip", 1e-3),
                      weights=step_weights("tempflow", sigma, sigma_next, std, 1 / 2.25))
    torch.testing.assert_close(out.loss, reference, rtol=1e-12, atol=1e-15)


def _reference_flowdppo(new_logp, old_logp, new_means, old_means, advantages, sigma_t, kl_mask_threshold):
    """UniRL ``_flowdppo_kl_adv_loss`` written out (rows of [B, S'] flattened to [E])."""
    ratio = torch.exp(new_logp - old_logp)
    adv = advantages.detach()
    unclipped = -adv * ratio
    kl = ((new_means - old_means) ** 2 / (2 * sigma_t**2)).mean(dim=(1, 2, 3))
    keep_kl = kl < kl_mask_threshold
    removed = ((~keep_kl) & (ratio > 1.0) & (adv > 0)) | ((~keep_kl) & (ratio < 1.0) & (adv < 0))
    return torch.where(~removed, unclipped, torch.zeros((), dtype=unclipped.dtype)).mean(), removed, kl


def test_dppo_matches_flow_dppo_and_masked_transitions_get_no_gradient():
    gen = torch.Generator().manual_seed(4)
    idx, sigma, sigma_next, g = _sd3_steps(8, range(9))
    std = g * torch.sqrt(sigma - sigma_next)
    old_mean = torch.randn(len(idx), 2, 4, 4, generator=gen, dtype=F64)
    delta = 0.01 * torch.randn(old_mean.shape, generator=gen, dtype=F64) * std.view(-1, 1, 1, 1)
    x_next = old_mean + std.view(-1, 1, 1, 1) * torch.randn(old_mean.shape, generator=gen, dtype=F64)
    adv = torch.randn(len(idx), generator=gen, dtype=F64)
    old_lp = gaussian_transition(old_mean, std, x_next=x_next).log_prob
    bound = 4e-5

    ref_mean = (old_mean + delta).requires_grad_()
    ref_lp = gaussian_transition(ref_mean, std, x_next=x_next).log_prob
    ref_loss, removed, ref_kl = _reference_flowdppo(ref_lp, old_lp, ref_mean, old_mean, adv, std.view(-1, 1, 1, 1), bound)
    ref_loss.backward()

    mean = (old_mean + delta).requires_grad_()
    lp = gaussian_transition(mean, std, x_next=x_next).log_prob
    lp.retain_grad()
    drift = transition_kl(mean, old_mean, std)
    out = policy_loss(lp, old_lp, adv, 5.0, TrustRegion("dppo", kl_bound=bound), drift_kl=drift)
    out.loss.backward()
    torch.testing.assert_close(drift, ref_kl.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(mean.grad, ref_mean.grad, rtol=1e-10, atol=1e-15)
    # the mask drops exactly the outward transitions whose KL reaches the bound; they contribute no gradient,
    # every other one the unclipped -A r / E (corrective ones above the bound included)
    r = out.ratio
    outward = ((r > 1) & (adv > 0)) | ((r < 1) & (adv < 0))
    assert torch.equal(removed, (drift >= bound) & outward)
    assert removed.any() and (~removed & (drift >= bound)).any() and (drift < bound).any()
    assert out.clip_fraction == pytest.approx(removed.double().mean().item())
    assert (lp.grad[removed] == 0).all()
    torch.testing.assert_close(lp.grad[~removed], (-adv * r / len(idx))[~removed], rtol=1e-12, atol=1e-15)


def test_the_three_compose_and_need_the_drift_kl():
    gen = torch.Generator().manual_seed(5)
    idx, sigma, sigma_next, g = _sd3_steps(3, range(9))
    std = g * torch.sqrt(sigma - sigma_next)
    old_mean = torch.randn(len(idx), 1, 4, 4, generator=gen, dtype=F64)
    mean = (old_mean + 0.03 * torch.randn(old_mean.shape, generator=gen, dtype=F64)).requires_grad_()
    x_next = old_mean + std.view(-1, 1, 1, 1) * torch.randn(old_mean.shape, generator=gen, dtype=F64)
    lp, old_lp = gaussian_transition(mean, std, x_next=x_next).log_prob, gaussian_transition(old_mean, std, x_next=x_next).log_prob
    adv = torch.randn(len(idx), generator=gen, dtype=F64)
    drift, bound = transition_kl(mean, old_mean, std), 1e-4
    w = step_weights("tempflow", sigma, sigma_next, std, std.mean().item())
    out = policy_loss(lp, old_lp, adv, 5.0, TrustRegion("dppo", kl_bound=bound), ratio_norm="grpo_guard",
                      drift_kl=drift, std=std, weights=w)
    # by hand: the re-centred ratio, Flow-DPPO's mask on it, the TempFlow weights
    r = torch.exp(std * (lp - old_lp + drift))
    masked = (drift >= bound) & (((r > 1) & (adv > 0)) | ((r < 1) & (adv < 0)))
    torch.testing.assert_close(out.loss, (w * torch.where(masked, 0.0, -adv * r)).mean(), rtol=1e-12, atol=1e-15)
    assert masked.any() and not masked.all()
    out.loss.backward()
    assert torch.isfinite(mean.grad).all()
    for kwargs in ({"ratio_norm": "grpo_guard"}, {}):
        region = TrustRegion("dppo") if not kwargs else TrustRegion()
        with pytest.raises(ValueError, match="drift_kl"):
            policy_loss(lp, old_lp, adv, 5.0, region, std=std, **kwargs)
    with pytest.raises(ValueError, match="kl_bound"):
        TrustRegion("dppo", kl_bound=0.0)
    with pytest.raises(ValueError, match="trust region"):
        TrustRegion("trpo")
