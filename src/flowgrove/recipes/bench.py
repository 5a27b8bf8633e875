"""`flowgrove bench`: several presets side by side in one process, on the same task, seeds and budget, over seeds.

Seed ``s`` of every method trains with ``train.seed = BASE + s`` (BASE: the methods' common ``train.seed``), so the
methods are paired per seed. Within a seed the methods take turns step by step (the order rotates every step), so
machine noise hits all of them alike; the seeds run one after another. Times are medians of per-step wall seconds
(rollout + reward + update); held-out evaluations (before training and at ``--evals`` points) are not counted.
Every method's held-out samples are drawn as the reference's evaluation draws them (its ``eval`` settings: the same
prompts and noise for every seed, so the spread over seeds is that of training) and scored with the reference's
trained rewards and weights, the method's own, and the judges. ``bench_report`` turns the records into
``bench.json``, ``bench.md`` and ``reward_vs_seconds.png``; they are rewritten after every seed.
Overrides apply to every method (``key=value``) or to one (``method:key=value``).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from flowgrove.config.load import Config, load_config
from flowgrove.parallel import distributed
from flowgrove.recipes.bench_report import PHASES, EvalPoint, SeedRun, bands, format_markdown, summarize_bench
from flowgrove.rewards import build_reward
from flowgrove.rewards.base import RewardFn
from flowgrove.runs.metrics import plot_reward_bands
from flowgrove.runs.rundir import atomic_write_text
from flowgrove.training.heldout import evaluate_policy
from flowgrove.training.setup import build_trainer
from flowgrove.training.trainer import GRPOTrainer

DEFAULT_JUDGE = "ocr"  # the digits task's independent judge: a real OCR model no digits preset trains on


def split_overrides(methods: list[str], overrides: list[str]) -> dict[str, list[str]]:
    """``method:key=value`` goes to that method only; plain ``key=value`` to all."""
    per = {m: [] for m in methods}
    for item in overrides:
        head, _, rest = item.partition(":")
        if rest and "=" not in head:
            if head not in per:
                raise ValueError(f"override {item!r} names method {head!r}, which is not benchmarked ({', '.join(methods)})")
            per[head].append(rest)
        else:
            for m in methods:
                per[m].append(item)
    return per


def eval_steps(steps: int, evals: int) -> list[int]:
    """The ``evals`` steps after which the methods are evaluated, evenly spread, the last one ``steps``."""
    if evals > steps:
        raise ValueError(f"--evals {evals} is more than --steps {steps}; evaluate at most once a step: --evals {steps}")
    return sorted({max(1, round(steps * (i + 1) / evals)) for i in range(evals)})


def check_methods(methods: list[str], reference: str, configs: dict[str, Config]) -> int:
    """The base seed (the methods' common train.seed); one-line errors for a bad reference or differing seeds."""
    if len(set(methods)) != len(methods) or not methods:
        raise ValueError(f"--methods {','.join(methods)!r} must name each method once; e.g. --methods dancegrpo,flowgrove")
    if reference not in methods:
        raise ValueError(f"--reference {reference!r} must be one of --methods ({', '.join(methods)})")
    seeds = {m: c.train.seed for m, c in configs.items()}
    if len(set(seeds.values())) > 1:
        raise ValueError(f"train.seed differs between methods ({seeds}); bench pairs seed s of every method as "
                         "train.seed=BASE+s: give one train.seed=BASE for all (not METHOD:train.seed=...)")
    return seeds[reference]


def judge_names(configs: dict[str, Config], reference: str) -> list[str]:
    """The reference's ``eval.judges`` (a judge no method trains on); with none configured, ``ocr`` on the digits
    task when no method trains on it."""
    ref = configs[reference]
    for m, cfg in configs.items():
        for name in ref.eval.judges:
            if float(cfg.rewards.get(name, 0)) != 0:
                raise ValueError(f"eval.judges lists {name!r}, which {m} trains on (rewards.{name}={cfg.rewards[name]}); "
                                 "a judge must be a reward no method trains on: remove it from eval.judges")
    if ref.eval.judges:
        return [str(j) for j in ref.eval.judges]
    trained = {n for c in configs.values() for n, w in c.rewards.items() if float(w) != 0}
    return [DEFAULT_JUDGE] if ref.policy.name == "digits" and DEFAULT_JUDGE not in trained else []


def build_judges(names: list[str], cfg: Config) -> dict[str, RewardFn]:
    """The judge rewards; the default ocr judge is dropped (with a note) where onnxruntime is missing."""
    judges = {}
    for name in names:
        try:
            judges[name] = build_reward(name, device=distributed.resolve_device(cfg.run.device),
                                        **cfg.reward_options.get(name, {}))
        except ImportError as err:
            if cfg.eval.judges:
                raise
            print(f"flowgrove bench: no judge ({name} needs {err.name}: pip install 'flowgrove[ocr]')")
    return judges


def held_out_scores(trainer: GRPOTrainer, scorers: dict[str, RewardFn], eval_cfg: Config) -> dict[str, float]:
    """Mean score of every scorer on the trainer's held-out samples (EMA weights when it keeps them), sampled with
    ``eval_cfg``'s evaluation settings."""
    held = trainer.held_out()
    with held.swapped(held.ema) if held.ema is not None else nullcontext():
        result = evaluate_policy(held.policy, held.cond, held.prompts, scorers, torch.ones(len(scorers)), eval_cfg)
    return {name: result[f"reward/{name}"] for name in scorers}


def _weighted(scores: dict[str, float], weights: dict[str, float]) -> float:
    return sum(float(w) * scores[name] for name, w in weights.items() if float(w) != 0)


class SeedBench:
    """One seed: every method's trainer (``configs``, all with the seed's ``train.seed``), stepped in turns and
    evaluated. A name both the reference and the method train on is scored once, with the reference's reward."""

    def __init__(self, configs: dict[str, Config], reference: str, judges: dict[str, RewardFn]):
        seed = configs[reference].train.seed
        self.ref_cfg, self.judges = configs[reference], judges
        self.trainers = {m: build_trainer(c) for m, c in configs.items()}
        ref_rewards = self.trainers[reference].rewards
        self.scorers = {m: {**ref_rewards, **{n: f for n, f in t.rewards.items() if n not in ref_rewards}, **judges}
                        for m, t in self.trainers.items()}
        self.runs = {m: SeedRun(m, seed) for m in configs}

    def evaluate(self, method: str) -> None:
        run, trainer = self.runs[method], self.trainers[method]
        scores = held_out_scores(trainer, self.scorers[method], self.ref_cfg)
        run.curve.append(EvalPoint(trainer.iteration, float(sum(run.step_seconds)), _weighted(scores, self.ref_cfg.rewards),
                                   _weighted(scores, trainer.cfg.rewards), {j: scores[j] for j in self.judges}))

    def run(self, steps: int, at: list[int]) -> dict[str, SeedRun]:
        methods = list(self.trainers)
        for m in methods:
            self.evaluate(m)
        for step in range(steps):
            for m in methods[step % len(methods):] + methods[: step % len(methods)]:
                metrics = self.trainers[m].step()
                self.runs[m].step_seconds.append(metrics["seconds_step"])
                self.runs[m].nfe_old.append(metrics["nfe_old"])
                self.runs[m].nfe_new.append(metrics["nfe_new"])
                for phase in PHASES:
                    self.runs[m].phase_seconds.setdefault(phase, []).append(metrics[f"seconds_{phase}"])
            if step + 1 in at:
                for m in methods:
                    self.evaluate(m)
        return self.runs


def run_bench(methods: list[str], steps: int, out: Path, reference: str, overrides: list[str], evals: int = 4,
              seeds: int = 1) -> dict:
    """Train every method ``seeds`` times for ``steps`` interleaved steps; write and return the summary (bench.json)."""
    per = split_overrides(methods, overrides)

    def configs_of(*seed: str) -> dict[str, Config]:
        return {m: load_config(None, [*per[m], f"train.steps={steps}", *seed], method=m) for m in methods}

    configs = configs_of()  # every config is checked before any model loads
    base = check_methods(methods, reference, configs)
    at, names = eval_steps(steps, evals), judge_names(configs, reference)
    judges = build_judges(names, configs[reference])
    runs: dict[str, list[SeedRun]] = {m: [] for m in methods}
    summary = {}
    for s in range(seeds):
        for m, run in SeedBench(configs_of(f"train.seed={base + s}"), reference, judges).run(steps, at).items():
            runs[m].append(run)
        summary = {"reference": reference, "seeds": s + 1, "steps": steps, "evals": at,
                   "train_seeds": [base + i for i in range(s + 1)], "judges": list(judges),
                   "reward_weights": {n: float(w) for n, w in configs[reference].rewards.items() if float(w) != 0},
                   "overrides": overrides,
                   "device": f"{distributed.resolve_device(configs[reference].run.device)}, {torch.get_num_threads()} threads",
                   "methods": summarize_bench(runs, reference)}
        write_outputs(summary, runs, out)
    return summary


def write_outputs(summary: dict, runs: dict[str, list[SeedRun]], out: Path) -> None:
    """``bench.json``, ``bench.md`` and ``reward_vs_seconds.png`` (bands: 95 % CI over seeds) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "bench.md", format_markdown(summary))
    plot_reward_bands(bands(runs), out / "reward_vs_seconds.png",
                      "training wall-clock seconds (rollout + reward + update), mean over seeds",
                      f"held-out reward ({summary['reference']}'s rewards), 95 % CI")


def main(args) -> None:  # noqa: ANN001
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summary = run_bench(methods, args.steps, Path(args.out), args.reference, list(args.overrides), args.evals, args.seeds)
    print(format_markdown(summary))
    print(f"wrote {Path(args.out) / 'bench.json'}, bench.md and reward_vs_seconds.png")
