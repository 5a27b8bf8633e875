"""The built-in ``numbers`` policy: the digits policy's tiny FLUX transformer on 8x16 images of two-digit numbers.

The latent is the image, ``[1, 8, 16]`` in [-1, 1] (ink +1), packed 2x2 into 32 tokens; the transformer and text
encoder have the digits policy's architecture (``policies/digits.py``). The vocabulary holds "the", "number" and the
ten numerals "0".."9", and a prompt's number is spelled digit by digit (``"the number 47"`` -> the, number, 4, 7), so
a test number the policy never trained on is a new order of tokens it has seen. Weights:
``assets/numbers_policy.safetensors``, written by ``flowgrove pretrain numbers``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowgrove.policies.base import register_policy
from flowgrove.policies.digits import TinyFluxPolicy, TinyFluxTask, load_tiny_policy
from flowgrove.tasks.numbers import PRETRAIN_HINT, PROMPT_WORDS, heldout_prompts, number_of_prompt, number_prompts
from flowgrove.tasks.numbers import train_prompts

POLICY_FILE = "numbers_policy.safetensors"
FORMAT = "flowgrove-numbers-policy-v1"
LATENT_SHAPE = (1, 8, 16)
VOCAB = ("<|startoftext|>", "<|endoftext|>", *PROMPT_WORDS, *(str(d) for d in range(10)))
MAX_LENGTH = 6  # <bos> the number <tens> <units> <eos>

NUMBERS = TinyFluxTask("numbers", POLICY_FILE, FORMAT, LATENT_SHAPE, VOCAB, MAX_LENGTH, number_prompts,
                       number_of_prompt, train_prompts, heldout_prompts, PRETRAIN_HINT)


@register_policy("numbers")
def build_numbers_policy(weights: str | Path | None = None, device: str | torch.device = "cpu", *,
                         path: str | Path | None = None, dtype: str = "float32") -> TinyFluxPolicy:
    """Load the numbers policy (default: the weights shipped in ``flowgrove/assets``); arguments as the digits policy's.

    Raises:
        FileNotFoundError, ValueError: missing, corrupt or foreign weights; the message says to re-run
            ``flowgrove pretrain numbers``.
    """
    return load_tiny_policy(NUMBERS, weights, device, path=path, dtype=dtype)
