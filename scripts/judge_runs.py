"""Held-out judges of saved runs: every run's policy scored by ocr, digit_classifier and boldness on the same
held-out prompts and seeds. Usage: python judge.py RUN [RUN ...]"""
import sys, torch
from flowgrove.rewards import build_reward
from flowgrove.sample import load_run
from flowgrove.trainer import evaluate_policy
names = ["ocr", "digit_classifier", "boldness"]
rewards = {n: build_reward(n) for n in names}
w = torch.ones(3)
for run in sys.argv[1:]:
    t = load_run(run)
    for label, ctx in (("after", t.weights_swapped(t.ema) if t.ema is not None else None),):
        res = evaluate_policy(t.policy, t.test_cond, t.test_prompts, rewards, w, t.cfg)
    base = load_run(None)
    print(run, {k: round(v, 4) for k, v in res.items() if k != "reward"})
base = load_run(None)
res = evaluate_policy(base.policy, base.test_cond, base.test_prompts, rewards, w, base.cfg)
print("base", {k: round(v, 4) for k, v in res.items() if k != "reward"})
