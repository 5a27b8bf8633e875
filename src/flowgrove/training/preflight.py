"""A run's preflight: everything about it that can be checked without loading a model, checked before any does.

A FLUX.1-dev pipeline takes minutes to load; a typo in a prompt file's name, a reward option the reward does not
take or a reward server that is not running must not cost them. :func:`preflight` checks the policy's folder and
options, every trained reward's and judge's options (and builds the light rewards, which reaches their servers),
and reads the prompt files. The recipes call it before they claim a run folder, so a fixed command starts cleanly.
"""

from __future__ import annotations

from flowgrove.config.schema import Config
from flowgrove.policies.base import check_policy_folder
from flowgrove.rewards.base import check_reward_options
from flowgrove.training.prepare import check_policy_options
from flowgrove.training.prompts import PromptFiles, read_prompt_files


def preflight(cfg: Config) -> PromptFiles:
    """Check ``cfg`` against the files, factories and servers it names, loading no model; returns the prompt files.

    Raises:
        ValueError / FileNotFoundError: one line naming the key or file and the fix.
        RewardServerError: a reward server named by ``reward_options`` does not answer.
    """
    check_policy_options(cfg)
    check_policy_folder(cfg.policy.name, cfg.policy.path)
    used = [n for n, w in cfg.rewards.items() if float(w) != 0] + [str(n) for n in cfg.eval.judges]
    for name in used:
        check_reward_options(name, cfg.reward_options.get(name, {}))
    return read_prompt_files(cfg)
