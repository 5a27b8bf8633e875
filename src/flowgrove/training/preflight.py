"""A run's preflight: everything about it that can be checked without loading a model, checked before any does.

A FLUX.1-dev pipeline takes minutes to load; a typo in a prompt file's name, a reward option the reward does not
take or a reward server that is not running must not cost them. :func:`preflight` checks the policy's folder and
options, every trained reward's and judge's options (and builds the light rewards, which reaches their servers),
and reads the prompt files. The recipes call it before they claim a run folder, so a fixed command starts cleanly.
"""

from __future__ import annotations

from flowgrove.config.schema import Config
from flowgrove.policies.base import check_policy_folder, needs_input_images, takes_several_images
from flowgrove.policies.pipelines import input_image_paths
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
    files = read_prompt_files(cfg)
    if needs_input_images(cfg.policy.name, cfg.policy.path):
        check_input_images(cfg, files)
    return files


def check_input_images(cfg: Config, files: PromptFiles) -> None:
    """An edit or image-to-video folder conditions every prompt on an input image: ``data.train`` must be given and
    every row of it (and of ``data.test``) must name one; one only, unless the folder takes several
    (``QwenImageEditPlusPipeline``), and then every row of a file the same number (``ValueError``: the key, the row
    and the fix)."""
    fix = 'give it as a .jsonl ({"prompt": "...", "image": "input.png"}) or a .csv with an image column'
    policy = f"policy {cfg.policy.name} at {cfg.policy.path}"
    if files.train is None and files.cache is None:
        raise ValueError(f"data.train: {policy} conditions every prompt on an input image, and the default prompts "
                         f"have none; {fix}")
    several = takes_several_images(cfg.policy.name, cfg.policy.path)
    for key, rows in (("data.train", files.train), ("data.test", files.test)):
        counts: list[int] = []
        for i, row in enumerate(rows or []):
            if not getattr(row, "metadata", {}).get("image"):
                raise ValueError(f"{key}: prompt {i + 1} ({str(row)[:80]!r}) has no input image, which {policy} "
                                 f"conditions on; {fix}")
            counts.append(len(input_image_paths(row, cfg.policy.name)))
            if counts[-1] > 1 and not several:
                raise ValueError(f"{key}: prompt {i + 1} ({str(row)[:80]!r}) has {counts[-1]} input images, but "
                                 f"{policy} takes one per prompt; give one image per row")
            if counts[-1] != counts[0]:
                raise ValueError(f"{key}: prompt {i + 1} ({str(row)[:80]!r}) has {counts[-1]} input "
                                 f"image{'s' * (counts[-1] != 1)} and prompt 1 has {counts[0]}; {policy} stacks a "
                                 "batch's input images, so give every row of the file the same number")
