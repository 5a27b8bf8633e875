"""train.tail_anchor: the steps a window or tree leaves untrained (an ODE or DPM-Solver++ tail) still shape every
image, and the network computing them drifts under updates that only the window's log-probs account for. The anchor
holds its output there to the initial policy's (docs/collapse.md, section 4). These tests check which rows it
draws, what it holds them to, that it holds them, and that it costs nothing when off."""

from __future__ import annotations

import copy

import pytest
import torch

from flowgrove.config.load import load_config
from flowgrove.grpo.matching import output_kl
from flowgrove.messages import ConfigError
from flowgrove.training import method
from flowgrove.training.trainer import GRPOTrainer

from conftest import TinyPolicy, brightness

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rewards={brightness: 1.0}", "sampler.num_steps=10",
         "window.size=2", "train.accumulate_size=4", "train.lr=1e-2", "train.clip_range=0.2"]
PROMPTS = ["zero", "one", "two"]


def make(anchor: float, *extra: str, method_name: str = "mixgrpo-flash-star") -> GRPOTrainer:
    cfg = load_config(None, [*SMALL, f"train.tail_anchor={anchor}", *extra], method=method_name)
    cfg.rewards = {"brightness": 1.0}
    return GRPOTrainer(cfg, TinyPolicy(), {"brightness": brightness}, PROMPTS)


def spy_anchor(trainer: GRPOTrainer) -> list:
    """The anchor rows each step hands to ``update``."""
    seen, update = [], trainer.update

    def spy(*args, anchor=None, **kwargs):
        seen.append(anchor)
        return update(*args, anchor=anchor, **kwargs)

    trainer.update = spy
    return seen


def test_the_mask_draws_one_untrained_step_per_sample_and_every_one_of_them():
    cfg = make(1.0).cfg
    plan = method.step_plan(cfg, 0)
    mask = method.anchor_mask(cfg, plan, 200, torch.Generator().manual_seed(0))  # [N, S]
    untrained = torch.tensor([not t for t in plan.trained])
    assert (mask.sum(dim=1) == 1).all()  # one row per sample
    assert not (mask & ~untrained).any()  # never a step whose log-prob is trained
    assert (mask.any(dim=0) == untrained).all()  # every untrained step is drawn
    assert untrained.sum() >= 3 and not untrained[0]  # the frozen window trains the first steps, the tail is free
    assert method.anchor_mask(make(0.0).cfg, plan, 5, torch.Generator()) is None


def test_the_rows_are_the_final_samples_at_the_tails_noise_levels_held_to_the_initial_policy():
    trainer = make(1.0)
    initial = copy.deepcopy(trainer.policy.module)
    seen = spy_anchor(trainer)
    for _ in range(2):
        trainer.step()
    rows, plan = seen[1], method.step_plan(trainer.cfg, 1)
    tail = {round(float(s), 6) for s, t in zip(plan.sigmas[:-1], plan.trained) if not t}
    assert {round(float(s), 6) for s in rows.sigma} <= tail
    assert len(rows) == 8  # one row per final sample
    x = (1 - rows.sigma.view(-1, 1, 1, 1)) * rows.x0 + rows.sigma.view(-1, 1, 1, 1) * rows.noise
    cond = trainer.step_cond.select(rows.cond_index)
    with torch.no_grad():
        want = initial(x, rows.sigma, cond.pooled)  # the initial policy's output, not the rollout policy's
        now = trainer.policy.velocity(x, rows.sigma, cond)
    assert torch.allclose(rows.old_output, want, atol=1e-6)
    assert not torch.allclose(now, want, atol=1e-4)  # the weights moved after the first step


def tail_drift(trainer: GRPOTrainer, initial: torch.nn.Module) -> float:
    """Mean squared output difference to ``initial`` on fixed latents at the tail's noise levels."""
    plan = method.step_plan(trainer.cfg, 0)
    sigma = plan.sigmas[:-1][torch.tensor([not t for t in plan.trained])]  # [F]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(len(sigma) * 8, 1, 4, 4, generator=gen)
    s = sigma.repeat_interleave(8)
    pooled = trainer.policy.encode_prompts(PROMPTS * 20).pooled[:len(s)]
    with torch.no_grad():
        return output_kl(trainer.policy.module(x, s, pooled), initial(x, s, pooled)).mean().item()


def test_the_anchor_holds_the_tail_where_the_window_alone_lets_it_drift():
    drift = {}
    for anchor in (0.0, 100.0):
        trainer = make(anchor)
        initial = copy.deepcopy(trainer.policy.module)
        metrics = [trainer.step() for _ in range(4)]
        drift[anchor] = tail_drift(trainer, initial)
        assert all(m["tail_anchor"] >= 0 for m in metrics)
        if anchor:
            assert metrics[-1]["tail_anchor"] > 0
    assert drift[0.0] > 0
    assert drift[100.0] < 0.3 * drift[0.0], drift  # a flipped sign would push the tail away instead


def test_off_or_negligible_the_anchor_changes_no_draw_of_the_run():
    plain = [make(0.0).step() for _ in range(1)][0]
    trainer_off, trainer_tiny = make(0.0), make(1e-12)
    off = [trainer_off.step() for _ in range(2)]
    tiny = [trainer_tiny.step() for _ in range(2)]
    assert plain["reward_mean"] == off[0]["reward_mean"]
    for a, b in zip(off, tiny):  # its rows come from their own random stream: the rollouts are the same
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["tail_anchor"] == 0.0


def test_a_method_that_trains_every_step_refuses_it():
    with pytest.raises(ConfigError, match="train.tail_anchor"):
        load_config(None, [*SMALL, "train.tail_anchor=1.0"], method="dancegrpo")
