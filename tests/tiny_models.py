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


def byte_level_qwen_tokenizer(special_tokens=(), chat_template=None):
    """A Qwen2 byte-level BPE tokenizer without merges (one token per byte), built in code: nothing to download;
    ``special_tokens`` are added whole (e.g. Qwen3's ``<|im_start|>``), ``chat_template`` is its Jinja template."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json as shipped (with the PNDM settings it
# carries over: set_alpha_to_one, skip_prk_steps; EulerDiscreteScheduler itself takes neither).
SDXL_BASE_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}


def sdxl_scheduler(prediction_type: str = "epsilon"):
    """SDXL base's ``EulerDiscreteScheduler`` (:data:`SDXL_BASE_SCHEDULER`'s settings) as diffusers builds and saves
    it today: without the carried-over PNDM keys (a folder from ``from_single_file`` has none)."""
    from diffusers import EulerDiscreteScheduler

    keys = ("beta_start", "beta_end", "beta_schedule", "interpolation_type", "num_train_timesteps", "steps_offset",
            "timestep_spacing", "use_karras_sigmas")
    return EulerDiscreteScheduler(**{k: SDXL_BASE_SCHEDULER[k] for k in keys}, prediction_type=prediction_type)


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", size: int = 16):
    """``StableDiffusionXLPipeline`` of diffusers' SDXL pipeline tests (UNet with ``text_time`` added conditioning,
    two width-32 CLIP encoders, the second with a projection), the one-block VAE and SDXL's shipped scheduler
    (:func:`sdxl_scheduler`)."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=size, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=2)
    tokenizer = tiny_tokenizers()[0]
    return StableDiffusionXLPipeline(vae=tiny_vae(4), text_encoder=CLIPTextModel(tiny_clip_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config()),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=sdxl_scheduler(prediction_type),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def tiny_hunyuan_video_pipeline():
    """``HunyuanVideoPipeline`` of diffusers' HunyuanVideo pipeline tests: a 1+1-block transformer with the guidance
    embedding, the 4-block video VAE (8x spatial, 4x temporal), a 2-layer Llama with a character tokenizer (right
    padding, as HunyuanVideo's) and the width-32 CLIP; the flow scheduler with DanceGRPO's shift 5."""
    import torch
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel, LlamaTokenizer

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=32, rope_axes_dim=(2, 4, 4))
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True)
    llama = LlamaModel(LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_size=16, intermediate_size=37,
                                   num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=64))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.ascii_lowercase + string.digits + ".,!?'- {}":
        vocab.setdefault(c, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], pad_token="</s>", padding_side="right")
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                text_encoder_2=CLIPTextModel(tiny_clip_config()), tokenizer_2=tiny_tokenizers()[0])


def tiny_qwen_image_parts(vocab_size: int, zero_cond_t: bool = False, **token_ids: int) -> dict:
    """diffusers ``tests/pipelines/qwenimage`` components of Qwen-Image and Qwen-Image-Edit: the transformer
    (``zero_cond_t``: Qwen-Image-Edit-2511's setting), the VAE (scale 4), a Qwen2.5-VL text encoder of
    ``vocab_size`` tokens (``token_ids``: its vision token ids) and the shipped scheduler settings (dynamic
    shifting)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4), zero_cond_t=zero_cond_t)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": vocab_size,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab_size, **token_ids,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=1.0)
    return dict(transformer=transformer, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
                scheduler=scheduler)
