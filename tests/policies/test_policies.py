"""Policies: FLUX packing and ids against diffusers, the FLUX adapter, the flux1 loader and the digits policy."""

from __future__ import annotations

import pytest
import torch

from flowgrove.policies import Conditioning, build_policy, policy_family, policy_names, register_policy
from flowgrove.policies.digits import (
    DigitsPolicy,
    build_digits_policy,
    digits_to_images,
    new_text_encoder,
    new_transformer,
    save_digits_policy,
    tokenize,
)
from flowgrove.policies.flux import FluxAdapter, latent_image_ids, pack_latents, unpack_latents
from flowgrove.samplers import sample_euler
from flowgrove.tasks.digits import digit_of_prompt, digit_prompts

FluxPipeline = pytest.importorskip("diffusers").FluxPipeline


def _random_digits_policy(seed: int = 0) -> DigitsPolicy:
    torch.manual_seed(seed)
    return DigitsPolicy(new_transformer().eval(), new_text_encoder())


# ---- packing and ids ---------------------------------------------------------------------------------


def test_pack_by_hand():
    # x[0, 0] = [[0, 1, 2, 3], [4, 5, 6, 7], ...]: the first 2x2 patch holds 0, 1, 4, 5 in row-major order.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    tokens = pack_latents(x)
    assert tokens.shape == (1, 4, 4)
    assert tokens[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert tokens[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]


def test_pack_unpack_round_trip_and_diffusers_equality():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    tokens = pack_latents(x)  # [2, 12, 12]
    assert torch.equal(unpack_latents(tokens, 6, 8), x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 3, 6, 8))
    # diffusers unpacks from pixel sizes: height = 2 * (48 // 16) = 6 with a VAE scale factor of 8.
    assert torch.equal(unpack_latents(tokens, 6, 8), FluxPipeline._unpack_latents(tokens, 48, 64, 8))


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 1, 5, 4))


def test_image_ids_match_diffusers():
    ids = latent_image_ids(6, 8)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # token 5 = row 5 // 4 = 1, column 5 % 4 = 1


# ---- the adapter -----------------------------------------------------------------------------------


def _tiny_flux(guidance_embeds: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                  guidance_embeds=guidance_embeds).eval()


@pytest.mark.parametrize("guidance", [None, 3.5])
def test_adapter_matches_pipeline_call(guidance):
    model = _tiny_flux(guidance is not None)
    x = torch.randn(3, 1, 4, 6)
    cond = Conditioning(torch.randn(3, 5, 32), torch.randn(3, 32))
    sigma = torch.tensor([1.0, 0.5, 0.25])  # exact in binary, so (sigma * 1000) / 1000 == sigma
    g = None if guidance is None else torch.full((3,), guidance)
    with torch.no_grad():
        ours = FluxAdapter(model, guidance).velocity(x, sigma, cond)
        # FluxPipeline: timestep t = sigma * 1000, the transformer receives t / 1000.
        ref = model(hidden_states=FluxPipeline._pack_latents(x, 3, 1, 4, 6), encoder_hidden_states=cond.prompt_embeds,
                    pooled_projections=cond.pooled, timestep=(sigma * 1000) / 1000, guidance=g,
                    img_ids=FluxPipeline._prepare_latent_image_ids(3, 2, 3, "cpu", torch.float32),
                    txt_ids=torch.zeros(5, 3), return_dict=False)[0]
    assert torch.equal(ours, FluxPipeline._unpack_latents(ref, 4, 6, 1))


def test_adapter_guidance_must_match_model():
    with pytest.raises(ValueError, match="guidance"):
        FluxAdapter(_tiny_flux(True), None)
    with pytest.raises(ValueError, match="guidance=None"):
        FluxAdapter(_tiny_flux(False), 3.5)


def test_adapter_rejects_mismatched_batch():
    adapter = FluxAdapter(_tiny_flux(False))
    cond = Conditioning(torch.randn(2, 5, 32), torch.randn(2, 32))
    with pytest.raises(ValueError, match="select"):
        adapter.velocity(torch.randn(3, 1, 4, 4), torch.rand(3), cond)


# ---- flux1 from a tiny local pipeline ---------------------------------------------------------------


def _save_tiny_flux_pipeline(path) -> None:
    """offline-recipes.md section 1: diffusers' test configs and tokenizers built in code."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tiny_models import tiny_clip_config, tiny_t5, tiny_tokenizers, tiny_vae
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    vae, clip, t5 = tiny_vae(1), CLIPTextModel(tiny_clip_config()), tiny_t5()
    clip_tok, t5_tok = tiny_tokenizers()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=_tiny_flux(False))
    pipe.save_pretrained(str(path))


def test_flux1_policy_reproduces_the_pipeline(tmp_path):
    _save_tiny_flux_pipeline(tmp_path)
    policy = build_policy("flux1", path=str(tmp_path), dtype="float32", height=32, width=32, max_sequence_length=16)
    assert policy.latent_shape == (1, 32, 32)  # 1 latent channel, VAE scale factor 2 ** 0 = 1
    assert policy.adapter.guidance is None  # the tiny transformer has no guidance embedding
    prompts = ["a cat", "a dog"]
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(prompt=prompts, height=32, width=32, num_inference_steps=4, max_sequence_length=16,
                          latents=FluxPipeline._pack_latents(x1, 2, 1, 32, 32), output_type="pt").images
        sigmas = policy.pipe.scheduler.sigmas  # the pipeline's shifted grid, ending at 0
        cond = policy.encode_prompts(prompts)
        x0 = sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas)
        ours = policy.decode(x0)
    assert cond.prompt_embeds.shape == (2, 16, 32) and cond.pooled.shape == (2, 32)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    # Only float noise of timestep = (sigma * 1000) / 1000 vs sigma separates the two paths.
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_flux1_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download black-forest-labs/FLUX.1-dev"):
        build_policy("flux1", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        build_policy("flux1", path=str(tmp_path), dtype="float8")


# ---- registry and conditioning ------------------------------------------------------------------------


def test_policy_registry():
    assert {"digits", "flux1"} <= set(policy_names())
    with pytest.raises(ValueError, match=r"known policies: .*digits.*Did you mean 'flux[12]'"):
        build_policy("flux")  # flux1 and flux2 are equally close
    with pytest.raises(ValueError, match="already registered"):
        register_policy("digits")(lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        register_policy("sd15", family="flow")(lambda: None)
    # the step family each policy declares, known before it loads (the config checks read it)
    assert {name: policy_family(name) for name in policy_names() if policy_family(name) != "flow"} == {
        "sd15": "diffusion", "sdxl": "diffusion"}
    assert not hasattr(build_policy("digits"), "step_family")  # flows step with FLOW_STEPS
    with pytest.raises(ValueError, match="family='ddim' is not one of"):
        register_policy("other", family="ddim")


def test_conditioning_select():
    cond = Conditioning(torch.arange(6.0).view(3, 2, 1), torch.arange(3.0).view(3, 1))
    picked = cond.select(torch.tensor([2, 2, 0]))
    assert picked.prompt_embeds[:, 0, 0].tolist() == [4.0, 4.0, 0.0] and picked.pooled[:, 0].tolist() == [2.0, 2.0, 0.0]
    assert len(picked) == 3
    assert Conditioning(torch.zeros(2, 1, 1)).select(torch.tensor([1])).pooled is None
    with pytest.raises(ValueError, match="batch size"):
        Conditioning(torch.zeros(2, 1, 1), torch.zeros(3, 1))


# ---- the digits policy --------------------------------------------------------------------------------


def test_digit_prompts():
    assert digit_prompts()[7] == "a handwritten seven" and len(digit_prompts()) == 10
    assert digit_of_prompt("a handwritten seven") == 7
    with pytest.raises(ValueError, match="a handwritten zero"):
        digit_of_prompt("a handwritten ten")


def test_tokenize_by_hand():
    # vocab: <bos> 0, <eos> 1, a 2, handwritten 3, zero 4, ..., seven 4 + 7 = 11.
    assert tokenize(["a handwritten seven"]).tolist() == [[0, 2, 3, 11, 1]]
    assert tokenize(["a seven"]).tolist() == [[0, 2, 11, 1, 1]]  # padded with <eos>
    with pytest.raises(ValueError, match="cannot tokenize"):
        tokenize(["a handwritten cat"])


def test_digits_shapes_and_decode():
    policy = _random_digits_policy()
    cond = policy.encode_prompts(["a handwritten one", "a handwritten two"])
    assert cond.prompt_embeds.shape == (2, 5, 32) and cond.pooled.shape == (2, 32)
    with torch.no_grad():
        v = policy.velocity(torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.9]), cond)
    assert v.shape == (2, 1, 8, 8) and v.dtype == torch.float32
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).repeat(16).view(1, 1, 8, 8)
    images = digits_to_images(x)
    assert images.shape == (1, 3, 8, 8)
    assert images[0, 2, 0, :4].tolist() == [0.0, 0.5, 1.0, 1.0]  # (x + 1) / 2, clamped at 1
    assert policy.default_prompts() == digit_prompts()


def test_digits_velocity_is_batch_invariant():
    policy = _random_digits_policy()
    prompts = [digit_prompts()[i % 10] for i in range(12)]
    cond = policy.encode_prompts(prompts)
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.rand(12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = policy.velocity(x, sigma, cond)
        rows = torch.cat([policy.velocity(x[i : i + 1], sigma[i : i + 1], cond.select(torch.tensor([i])))
                          for i in range(12)])
    # CPU GEMM kernels depend on the row count, so equality holds to float32 rounding (measured: bit-exact for
    # chunks that are multiples of 4 rows, up to 6e-6 apart for |v| <= 6.2 otherwise).
    torch.testing.assert_close(batched, rows, atol=1e-5, rtol=1e-5)


def test_digits_weights_round_trip(tmp_path):
    policy = _random_digits_policy(seed=3)
    path = save_digits_policy(tmp_path / "p.safetensors", policy.module, policy.text_encoder)
    loaded = build_policy("digits", weights=str(path))
    cond = loaded.encode_prompts(["a handwritten four"])
    assert torch.equal(cond.prompt_embeds, policy.encode_prompts(["a handwritten four"]).prompt_embeds)
    x, sigma = torch.randn(1, 1, 8, 8), torch.tensor([0.4])
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, sigma, cond), policy.velocity(x, sigma, cond))
    with pytest.raises(ValueError, match="once"):
        build_digits_policy(weights=str(path), path=str(path))


def test_missing_or_corrupt_weights_say_how_to_recreate(tmp_path):
    with pytest.raises(FileNotFoundError, match="flowgrove pretrain digits"):
        build_digits_policy(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="flowgrove pretrain digits"):
        build_digits_policy(bad)


def test_shipped_weights_draw_the_prompted_digit():
    from flowgrove.recipes.pretrain import judge_policy
    from flowgrove.rewards.digits import load_digit_classifier

    policy = build_policy("digits")
    judged = judge_policy(policy, load_digit_classifier(), per_digit=10, num_steps=16, shift=3.0, seed=123)
    assert judged.accuracy >= 0.8, judged


def test_flux1_and_digits_pass_the_shared_adapter_contract(tmp_path):
    from adapter_contract import check_policy_contract

    _save_tiny_flux_pipeline(tmp_path)
    check_policy_contract(build_policy("flux1", path=str(tmp_path), dtype="float32", height=16, width=16,
                                       max_sequence_length=8), ["a cat", "a dog"])
    check_policy_contract(build_digits_policy(), ["a handwritten one", "a handwritten two"])
