"""Sigma schedules against the spec's derived tables and diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import pytest
import torch

from flowgrove.samplers.schedules import compressed_tail_sigmas, flux_sigmas, sd3_sigmas, time_shift


def test_time_shift_by_hand() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    # s = 3, t = 0.5: 1.5 / (1 + 2 * 0.5) = 0.75; endpoints are fixed; s = 1 is the identity
    torch.testing.assert_close(time_shift(t, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    torch.testing.assert_close(time_shift(t, 1.0), t)


def test_flux_sigmas_match_spec_tables() -> None:
    # spec 1.1 (DanceGRPO FLUX, T=16, s=3)
    dance = [1.0, .9783, .9545, .9286, .9, .8684, .8333, .7941, .75, .7, .6429, .5769, .5, .4091, .3, .1667, 0]
    torch.testing.assert_close(flux_sigmas(16, 3.0), torch.tensor(dance), rtol=0, atol=5e-5)
    # spec 3.1 (MixGRPO, T=25, s=3)
    mix = [1, .9863, .9718, .9565, .9403, .9231, .9048, .8852, .8644, .8421, .8182, .7925, .7647, .7347, .7021,
           .6667, .6279, .5854, .5385, .4865, .4286, .3636, .2903, .2069, .1111, 0]
    torch.testing.assert_close(flux_sigmas(25, 3.0), torch.tensor(mix), rtol=0, atol=5e-5)
    sigmas = flux_sigmas(16, 3.0, dtype=torch.float64)
    assert sigmas.dtype == torch.float64 and sigmas[0] == 1 and sigmas[-1] == 0


def test_sd3_sigmas_match_spec_and_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # spec 2.1 (Flow-GRPO, SD3.5-M, T=10, s=3): sigma_min shifted twice -> last nonzero 0.0089
    spec = [1.0, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0]
    torch.testing.assert_close(sd3_sigmas(10, 3.0), torch.tensor(spec), rtol=0, atol=5e-5)
    for steps in (10, 40):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        torch.testing.assert_close(sd3_sigmas(steps, 3.0), scheduler.sigmas, rtol=0, atol=1e-6)


def test_compressed_tail_mixgrpo_flash() -> None:
    full = flux_sigmas(25, 3.0)
    for ratio, num_rollout_steps in ((0.2, 7), (0.4, 11)):
        # L = 3: n_post = max(int(22 * ratio), 2) = 4 (Flash*) or 8 (Flash); steps = L + n_post
        grid = compressed_tail_sigmas(25, 3.0, last_kept_step=3, ratio=ratio)
        assert len(grid) == num_rollout_steps + 1
        assert torch.equal(grid[:4], full[:4])
        torch.testing.assert_close(grid[4], full[4], rtol=0, atol=1e-7)  # first tail point = sigma_{L+1}
        assert grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    # ratio 0.2 tail: shift_3(linspace(21/25, 0, 4)) = shift_3([0.84, 0.56, 0.28, 0])
    #   = [2.52 / 2.68, 1.68 / 2.12, 0.84 / 1.56, 0] = [0.9403, 0.7925, 0.5385, 0]
    tail = compressed_tail_sigmas(25, 3.0, 3, 0.2)[4:]
    torch.testing.assert_close(tail, torch.tensor([0.9403, 0.7925, 0.5385, 0.0]), rtol=0, atol=5e-5)


def test_compressed_tail_edge_cases() -> None:
    full = flux_sigmas(25, 3.0)
    # late window, L = 21: int(4 * 0.4) = 1 would stop at sigma_22 > 0 (MixGRPO bug M6); n_post = 2 ends at 0
    late = compressed_tail_sigmas(25, 3.0, last_kept_step=21, ratio=0.4)
    torch.testing.assert_close(late, torch.cat([full[:23], torch.zeros(1)]), rtol=0, atol=1e-7)
    # L + 1 >= T: nothing to compress
    assert torch.equal(compressed_tail_sigmas(25, 3.0, last_kept_step=24, ratio=0.4), full)
    with pytest.raises(ValueError, match="last_kept_step"):
        compressed_tail_sigmas(25, 3.0, last_kept_step=25, ratio=0.4)
    with pytest.raises(ValueError, match="ratio"):
        compressed_tail_sigmas(25, 3.0, last_kept_step=3, ratio=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(0, 3.0)


def test_logsnr_tail_is_uniform_in_log_snr_down_to_the_grids_last_nonzero_sigma():
    full = flux_sigmas(25, 3.0, dtype=torch.float64)
    grid = compressed_tail_sigmas(25, 3.0, last_kept_step=3, ratio=0.4, dtype=torch.float64, spacing="logsnr")
    tail = grid[4:]  # n_post = int(22 * 0.4) = 8 points: 7 DPM steps
    assert tail.numel() == 8 and tail[-1] == 0 and torch.equal(grid[:5], full[:5])
    torch.testing.assert_close(tail[-2], full[-2])  # the last model call where the uncompressed sampler makes it
    lam = torch.log((1 - tail[:-1]) / tail[:-1])  # [7] log-SNR of the nonzero points
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(6))
    with pytest.raises(ValueError, match="spacing"):
        compressed_tail_sigmas(25, 3.0, 3, 0.2, spacing="uniform")


def test_a_short_logsnr_tail_gets_the_points_its_steps_need():
    """A window late in the schedule leaves a short span to compress: ratio 0.4 of 4 steps would be one step from
    sigma 0.364 straight to 0 (the image a prediction at a mid noise level); the log-SNR tail keeps its steps within
    MAX_LOGSNR_STEP and its last model call at the grid's last nonzero sigma, never with more points than uncompressed."""
    from flowgrove.samplers.schedules import MAX_LOGSNR_STEP

    full = flux_sigmas(25, 3.0, dtype=torch.float64)
    for last in range(0, 24):
        grid = compressed_tail_sigmas(25, 3.0, last, 0.4, dtype=torch.float64, spacing="logsnr")
        tail = grid[last + 1:]
        assert tail.numel() <= 25 - last and tail[-1] == 0
        torch.testing.assert_close(tail[-2], full[-2])
        lam = torch.log((1 - tail[:-1]) / tail[:-1])
        assert (lam.diff() <= MAX_LOGSNR_STEP + 1e-9).all(), (last, tail)
    assert compressed_tail_sigmas(25, 3.0, 20, 0.4, spacing="shifted").numel() == 23  # the reference: [0.364, 0]
