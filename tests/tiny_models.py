"""Tiny random diffusers components shared by the policy families' tests (offline-recipes.md section 1: diffusers'
own test configs, tokenizers built in code, nothing downloaded)."""

from __future__ import annotations

import string


def tiny_vae(latent_channels: int):
    """``AutoencoderKL`` of diffusers' pipeline tests: one block, so the VAE scale factor is 1."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_clip_config():
    """``CLIPTextConfig`` of width 32 (projection 32) whose bos/eos/pad ids match :func:`tiny_tokenizers`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu", projection_dim=32)


def tiny_t5():
    """``T5EncoderModel`` of width 32."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))


def tiny_tokenizers():
    """``(CLIPTokenizer, T5Tokenizer)`` over lowercase letters, digits and punctuation, built from Python objects."""
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    t5_tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
                         + [(c, -5.0) for c in string.ascii_lowercase], extra_ids=0, model_max_length=512)
    return clip_tok, t5_tok
