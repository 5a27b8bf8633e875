"""Step plans and MixGRPO's sliding window: positions, kinds, grids and NFE worked out by hand."""

from __future__ import annotations

import pytest
import torch

from flowgrove.grpo.plans import (
    Nfe,
    StepKind,
    StepPlan,
    WindowSchedule,
    all_sde_plan,
    chain_nfe,
    sde_mask_plan,
    untrained,
    window_plan,
    window_start,
    window_steps,
)
from flowgrove.samplers.schedules import flux_sigmas


def starts(n_iters: int, num_positions: int, **kw) -> list[int]:
    schedule = WindowSchedule(**kw)
    return [window_start(k, num_positions, schedule) for k in range(n_iters)]


# ----------------------------------------------------------------------------------------------- window positions


def test_progressive_rolls_back_after_last_position():
    # T_train=7, w=4 -> last start 7-4=3; tau=2: each start is used for 2 iterations,
    # 0,0,1,1,2,2,3,3, then 3+1=4 > 3 -> roll back to start 0: 0,0,1,1
    assert starts(12, 7, size=4, interval=2, stride=1) == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1]


def test_progressive_without_roll_back_clamps():
    # same as above, but after start 3 the window stays at 3 forever
    assert starts(12, 7, size=4, interval=2, roll_back=False) == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]


def test_progressive_roll_back_returns_to_initial_start_and_stride_2():
    # start=1, tau=1, last=3: 1,2,3, then 4>3 -> back to 1
    assert starts(7, 7, size=4, interval=1, start=1) == [1, 2, 3, 1, 2, 3, 1]
    # stride 2, last=3: 0,2, then 4>3 -> 0
    assert starts(6, 7, size=4, interval=1, stride=2) == [0, 2, 0, 2, 0, 2]
    # stride 2 without roll back: 0,2, then 4>3 is clipped to the last start 3 (so transition 6 is reached)
    assert starts(6, 7, size=4, interval=1, stride=2, roll_back=False) == [0, 2, 3, 3, 3, 3]


def test_progressive_far_iteration_uses_the_cycle():
    # T_train=24, w=4, tau=1: starts 0..20 form a cycle of 21; 10**9 = 21*47619047 + 13 -> start 13
    assert window_start(10**9, 24, WindowSchedule(size=4, interval=1)) == 13


def test_frozen_and_stride_zero_never_move():
    assert starts(50, 24, strategy="frozen", start=2, interval=1) == [2] * 50
    assert starts(50, 24, stride=0, start=2, interval=1) == [2] * 50


def test_last_position_reached_every_transition_trainable():
    # bug M3 fix: every position a window may cover is reached. T=25 with the final sample scored -> the last two
    # steps stay out (method.window_positions = 23), last start 23-4=19, window 19..22 holds 22
    schedule = WindowSchedule(size=4, interval=1)
    assert window_steps(19, 23, schedule) == range(19, 23)
    assert window_start(20, 23, schedule) == 0  # 20 > 19 -> roll back
    covered = set().union(*(window_steps(k, 23, schedule) for k in range(20)))
    assert covered == set(range(23))
    # released MixGRPO: tau=25, 300 iterations -> start 300 // 25 = 12 at the last iteration (299 // 25 = 11)
    assert window_start(299, 23, WindowSchedule()) == 11
    assert window_start(300, 23, WindowSchedule()) == 12


@pytest.mark.parametrize("preset", ["mixgrpo", "mixgrpo-flash", "mixgrpo-flash-star", "branchgrpo-mix", "flowgrove"])
@pytest.mark.parametrize("strategy", ["progressive", "random", "linear_decay", "exp_decay"])
def test_windows_never_cover_the_scored_images_last_steps(preset, strategy):
    # With reward_image=final an SDE step on the last transition (sigma 0.111 -> 0 at T=25) would leave noise in
    # the scored image; the reference keeps the last two steps out of every window (max_timesteps = T - 2).
    from flowgrove.config.load import load_config
    from flowgrove.grpo import plans
    from flowgrove.training import method

    for image in ("final", "x0_pred"):
        cfg = load_config(method=preset, overrides=[f"window.strategy={strategy}", "window.interval=1",
                                                    f"sampler.reward_image={image}", "window.exp_threshold=0"])
        if cfg.tree.enabled and image == "final":
            continue  # trees score the x0 prediction (a final split step would need a sampled last edge)
        T, out = cfg.sampler.num_steps, (2 if image == "final" else 1)
        seen = set()
        for it in range(300):
            plan = method.step_plan(cfg, it)
            window = set(plans.window_steps(it, method.window_positions(cfg), method.window_schedule(cfg)))
            assert max(window) < T - out, (it, window)
            if not cfg.tree.enabled:
                assert set(plan.trained_steps) == window and all(plan.kinds[i] != "sde" for i in range(plan.num_steps) if i not in window)
                last_kind = plan.kinds[-1]
                assert last_kind != "sde"
            seen |= window
        assert cfg.window.stride == 0 or T - out - 1 in seen  # a moving window reaches the last allowed position


def test_linear_decay_intervals():
    # T_train=8, w=4 -> last=4, p = c/4; interval = max(1, int(10*(1-p) + 1*p)):
    # c=0: 10; c=1: 7.5+0.25=7.75->7; c=2: 5+0.5=5.5->5; c=3: 2.5+0.75=3.25->3; c=4: 0+1=1
    got = starts(37, 8, size=4, strategy="linear_decay", min_interval=1, max_interval=10)
    expected = [0] * 10 + [1] * 7 + [2] * 5 + [3] * 3 + [4] * 1 + [0] * 10 + [1]  # 26 iterations, then roll back
    assert got == expected


def test_exp_decay_intervals_small():
    # interval(c) = ceil(4 * exp(-0.5 * max(0, c - 1))): c=0,1: 4; c=2: 4*e^-0.5=2.43->3;
    # c=3: 4*e^-1=1.47->2; c=4: 4*e^-1.5=0.89->1; then roll back to 0
    got = starts(15, 8, size=4, strategy="exp_decay", interval=4, exp_k=0.5, exp_threshold=1)
    assert got == [0] * 4 + [1] * 4 + [2] * 3 + [3] * 2 + [4] + [0]


def test_exp_decay_defaults():
    # tau=25, k=0.1, threshold 13, T_train=24 (last 20): starts 0..13 take 25 iterations each -> c=14 at 14*25=350;
    # c=14: ceil(25*e^-0.1)=ceil(22.62)=23 -> c=15 at 350+23=373; c=15: ceil(25*e^-0.2)=ceil(20.47)=21 -> 394
    schedule = WindowSchedule(strategy="exp_decay")
    assert [window_start(k, 24, schedule) for k in (349, 350, 372, 373, 393, 394)] == [13, 14, 14, 15, 15, 16]


def test_window_start_is_pure_in_any_order():
    schedule = WindowSchedule(size=4, interval=3, strategy="linear_decay")
    forward = [window_start(k, 10, schedule) for k in range(60)]
    backward = [window_start(k, 10, schedule) for k in reversed(range(60))][::-1]
    assert forward == backward


def test_random_is_seeded_in_range_and_reaches_every_start():
    schedule = WindowSchedule(size=4, strategy="random", seed=7)
    got = [window_start(k, 7, schedule) for k in range(200)]
    assert all(0 <= c <= 3 for c in got)  # last start 7-4=3: window never empty, never past T_train
    assert set(got) == {0, 1, 2, 3}
    assert len(set(got[:20])) > 1  # changes across iterations
    # same (seed, iteration) -> same start on every rank and after resume (bug M4 fix)
    again = WindowSchedule(size=4, strategy="random", seed=7)
    assert [window_start(k, 7, again) for k in range(200)] == got
    other = [window_start(k, 7, WindowSchedule(size=4, strategy="random", seed=8)) for k in range(200)]
    assert other != got
    assert all(len(window_steps(k, 7, schedule)) == 4 for k in range(20))


def test_window_schedule_errors():
    with pytest.raises(ValueError, match="progressive"):
        WindowSchedule(strategy="progresive")
    with pytest.raises(ValueError, match="size"):
        WindowSchedule(size=0)
    with pytest.raises(ValueError, match="max_interval"):
        WindowSchedule(min_interval=5, max_interval=2)
    with pytest.raises(ValueError, match="stride"):
        WindowSchedule(stride=-1)
    with pytest.raises(ValueError, match="exceeds num_positions"):
        window_start(0, 3, WindowSchedule(size=4))
    with pytest.raises(ValueError, match="last window start"):
        window_start(0, 7, WindowSchedule(size=4, start=4))
    with pytest.raises(ValueError, match="iteration"):
        window_start(-1, 7, WindowSchedule())


# ------------------------------------------------------------------------------------------------- window plans


def test_window_plan_euler_tail():
    plan = window_plan(25, 3.0, start=0, size=4)
    assert plan.kinds == ("sde",) * 4 + ("ode",) * 21
    assert plan.trained_steps == (0, 1, 2, 3) == plan.sde_steps
    assert torch.equal(plan.sigmas, flux_sigmas(25, 3.0))
    assert chain_nfe(plan) == Nfe(old=25.0, new=4.0)  # no compression: every step is a model call


def test_window_plan_steps_before_window_stay_euler():
    plan = window_plan(25, 3.0, start=6, size=4, tail="dpm", ratio=0.4)
    # L=9, (25-9)*0.4=6.4 -> 6 tail points -> 5 dpm steps; NFE = 10 + 5 = 15
    assert plan.kinds == ("ode",) * 6 + ("sde",) * 4 + ("dpm",) * 5
    assert plan.trained == (False,) * 6 + (True,) * 4 + (False,) * 5
    assert plan.nfe_old == 15


def test_window_plan_dpm_tail_flash_star():
    # Flash*: window 0..3, L=3, n_post = max(int((25-3)*0.2), 2) = int(4.4) = 4 points -> 3 dpm steps, NFE 4+3=7
    plan = window_plan(25, 3.0, start=0, size=4, tail="dpm", ratio=0.2)
    assert plan.kinds == ("sde",) * 4 + ("dpm",) * 3
    assert chain_nfe(plan) == Nfe(7.0, 4.0)
    # tail = shift_3(linspace(t_4, 0, 4)), t_4 = 1 - 4/25 = 0.84 -> t = 0.84, 0.56, 0.28, 0;
    # 3t/(1+2t): 2.52/2.68 = 0.940299, 1.68/2.12 = 0.792453, 0.84/1.56 = 0.538462, 0
    expected_tail = torch.tensor([2.52 / 2.68, 1.68 / 2.12, 0.84 / 1.56, 0.0])
    torch.testing.assert_close(plan.sigmas[4:], expected_tail)
    assert torch.equal(plan.sigmas[:5], flux_sigmas(25, 3.0)[:5])  # first tail point = sigma_{L+1}


def test_window_plan_dpm_tail_nfe_for_several_positions():
    # (start, ratio) -> L + n_post, n_post = max(int((25 - L) * ratio), 2)
    cases = {
        (0, 0.4): 11,  # L=3: int(22*0.4)=int(8.8)=8 -> 3+8
        (14, 0.4): 20,  # L=17: int(8*0.4)=int(3.2)=3 -> 17+3 (spec: "With c = 14: 20")
        (19, 0.4): 24,  # L=22: int(3*0.4)=1 -> guard 2 -> 22+2, one dpm step from sigma_23 to 0 (bug M6 fix)
        (20, 0.4): 25,  # L=23: int(2*0.4)=0 -> 2 -> grid unchanged, last step is dpm
        (21, 0.4): 25,  # L=24=T-1: nothing after the window
        (0, 1.0): 25,  # L=3: int(22*1.0)=22 points -> 21 steps, same count as uncompressed
    }
    for (start, ratio), nfe in cases.items():
        plan = window_plan(25, 3.0, start=start, size=4, tail="dpm", ratio=ratio)
        last = start + 3
        assert plan.nfe_old == nfe, (start, ratio)
        assert plan.nfe_new == 4
        assert float(plan.sigmas[-1]) == 0.0 and float(plan.sigmas[-2]) > 0.0
        assert plan.kinds[last + 1:] == ("dpm",) * (nfe - last - 1)
        assert torch.equal(plan.sigmas[: last + 2], flux_sigmas(25, 3.0)[: last + 2])
    # ratio 1 keeps the spacing 0.84/21 = 0.04 = 1/25, so the grid is the uncompressed one
    plan = window_plan(25, 3.0, start=0, size=4, tail="dpm", ratio=1.0)
    torch.testing.assert_close(plan.sigmas, flux_sigmas(25, 3.0))


def test_window_plan_errors():
    with pytest.raises(ValueError, match="'dpm'"):
        window_plan(25, 3.0, start=0, size=4, tail="dpmpp")
    with pytest.raises(ValueError, match="window"):
        window_plan(25, 3.0, start=22, size=4)
    with pytest.raises(ValueError, match="window"):
        window_plan(25, 3.0, start=0, size=0)


# -------------------------------------------------------------------------------------------- generic builders


def test_all_sde_plan():
    sigmas = flux_sigmas(10, 3.0)
    plan = all_sde_plan(sigmas)
    assert plan.kinds == ("sde",) * 10 and plan.trained_steps == tuple(range(10))
    flow = all_sde_plan(sigmas, trained_steps=range(9))  # Flow-GRPO trains the first 9 of 10
    assert flow.trained_steps == tuple(range(9)) and chain_nfe(flow) == Nfe(10.0, 9.0)


def test_sde_mask_plan_branch_mix():
    # BranchGRPO-Mix, T=20, stride 30, window 4, splits at 0,3,6,9: SDE = {0,1,2,3} | {0,3,6,9}
    plan = sde_mask_plan(flux_sigmas(20, 3.0), {0, 1, 2, 3} | {0, 3, 6, 9})
    assert plan.sde_steps == (0, 1, 2, 3, 6, 9) == plan.trained_steps
    assert plan.kinds[4] == StepKind.ODE and plan.kinds[6] == StepKind.SDE
    assert chain_nfe(plan) == Nfe(20.0, 6.0)
    only = sde_mask_plan(flux_sigmas(20, 3.0), {0, 1}, trained={1})
    assert only.trained_steps == (1,)
    with pytest.raises(ValueError, match="out of range"):
        sde_mask_plan(flux_sigmas(20, 3.0), {20})


# ------------------------------------------------------------------------------------------------ validation


def test_step_plan_validation():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    plan = StepPlan(sigmas, ["sde", "ode"], [True, False])  # lists become tuples
    assert plan.kinds == ("sde", "ode") and plan.trained == (True, False) and plan.num_steps == 2
    with pytest.raises(ValueError, match="one entry per step"):
        StepPlan(sigmas, ("sde",), (True,))
    with pytest.raises(ValueError, match="not SDE steps"):
        StepPlan(sigmas, ("sde", "ode"), (True, True))
    with pytest.raises(ValueError, match="'sde'"):
        StepPlan(sigmas, ("sdee", "ode"), (False, False))
    with pytest.raises(ValueError, match="strictly decreasing"):
        StepPlan(torch.tensor([1.0, 1.0, 0.0]), ("ode", "ode"), (False, False))
    with pytest.raises(ValueError, match="end at 0"):
        StepPlan(torch.tensor([1.0, 0.5, 0.1]), ("ode", "ode"), (False, False))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        StepPlan(torch.tensor([1.5, 0.5, 0.0]), ("ode", "ode"), (False, False))
    with pytest.raises(ValueError, match="1-D"):
        StepPlan(torch.tensor([0.0]), (), ())


def test_untrained_plan_keeps_the_rollout_and_trains_no_step():
    # forward-process objectives: the same grid and kinds (window 2..4, DPM tail), nothing stored for training
    plan = window_plan(10, 3.0, start=2, size=3, tail="dpm", ratio=0.5)
    out = untrained(plan)
    assert torch.equal(out.sigmas, plan.sigmas) and out.kinds == plan.kinds
    assert plan.trained_steps == (2, 3, 4) and out.trained_steps == () and out.nfe_new == 0
    assert out.nfe_old == plan.nfe_old
