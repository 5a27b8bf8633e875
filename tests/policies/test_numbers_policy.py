"""The numbers policy: the digits architecture on 8x16 images, numerals spelled digit by digit, shipped weights."""

from __future__ import annotations

import pytest
import torch

from flowgrove.policies import build_policy, policy_names
from flowgrove.policies.digits import DIGITS, TinyFluxPolicy, new_text_encoder, new_transformer, prompt_words
from flowgrove.policies.digits import save_tiny_policy, text_encoder_config, tokenize
from flowgrove.policies.numbers import MAX_LENGTH, NUMBERS, VOCAB, build_numbers_policy
from flowgrove.tasks.numbers import TEST_NUMBERS, heldout_prompts, train_prompts


def _random_numbers_policy(seed: int = 0) -> TinyFluxPolicy:
    torch.manual_seed(seed)
    return TinyFluxPolicy(new_transformer().eval(), new_text_encoder(text_encoder_config(NUMBERS)), task=NUMBERS)


def test_numerals_are_spelled_digit_by_digit():
    # vocab: <bos> 0, <eos> 1, the 2, number 3, "0" 4, ..., "9" 13.
    assert prompt_words("The number 47") == ["the", "number", "4", "7"]
    assert prompt_words("a handwritten seven") == ["a", "handwritten", "seven"]  # the digits prompts are unchanged
    assert tokenize(["the number 47"], VOCAB, MAX_LENGTH).tolist() == [[0, 2, 3, 8, 11, 1]]
    assert tokenize(["the number 05"], VOCAB, MAX_LENGTH).tolist() == [[0, 2, 3, 4, 9, 1]]
    with pytest.raises(ValueError, match="cannot tokenize"):
        tokenize(["the number 470"], VOCAB, MAX_LENGTH)  # too long


def test_numbers_shapes_prompts_and_unseen_numbers():
    assert "numbers" in policy_names() and NUMBERS.latent_shape == (1, 8, 16)
    policy = _random_numbers_policy()
    assert policy.latent_shape == (1, 8, 16) and DIGITS.latent_shape == (1, 8, 8)
    assert policy.default_prompts() == train_prompts() and policy.heldout_prompts() == heldout_prompts()
    unseen = [f"the number {TEST_NUMBERS[0]:02d}", "the number 47"]
    cond = policy.encode_prompts(unseen)  # test numbers encode: compositions of seen tokens
    assert cond.prompt_embeds.shape == (2, MAX_LENGTH, 32) and cond.pooled.shape == (2, 32)
    with torch.no_grad():
        v = policy.velocity(torch.randn(2, 1, 8, 16), torch.tensor([0.3, 0.9]), cond)
    assert v.shape == (2, 1, 8, 16)
    assert policy.decode(v).shape == (2, 3, 8, 16)
    with pytest.raises(ValueError, match="the number NN"):
        policy.encode_prompts(["a handwritten seven"])


def test_numbers_weights_round_trip_and_errors(tmp_path):
    policy = _random_numbers_policy(seed=2)
    path = save_tiny_policy(tmp_path / "n.safetensors", policy.module, policy.text_encoder, NUMBERS)
    loaded = build_policy("numbers", path=str(path))
    x, sigma, cond = torch.randn(1, 1, 8, 16), torch.tensor([0.4]), loaded.encode_prompts(["the number 12"])
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, sigma, cond), policy.velocity(x, sigma, cond))
    with pytest.raises(ValueError, match="not a numbers policy"):
        build_numbers_policy(_digits_file(tmp_path))
    with pytest.raises(FileNotFoundError, match="flowgrove pretrain numbers"):
        build_numbers_policy(tmp_path / "missing.safetensors")


def _digits_file(tmp_path):
    from flowgrove.policies.digits import save_digits_policy

    torch.manual_seed(0)
    return save_digits_policy(tmp_path / "d.safetensors", new_transformer(), new_text_encoder())


def test_shipped_numbers_weights_load_and_are_small():
    from flowgrove.tasks.digits import assets_dir

    assert (assets_dir() / NUMBERS.file).stat().st_size < 2_000_000
    policy = build_policy("numbers")
    assert policy.latent_shape == (1, 8, 16) and policy.heldout_prompts() == heldout_prompts()
