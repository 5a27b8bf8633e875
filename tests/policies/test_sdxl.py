"""The sdxl policy: a tiny StableDiffusionXLPipeline (two CLIP encoders, pooled embeddings, size / crop time ids)
reproduced by the DDIM step family with and without CFG, the shared adapter contract, and 2-step trains of a chain
(dancegrpo-sd, LoRA) and a tree preset (full fine-tune), each exported back into diffusers."""

from __future__ import annotations

import pytest
import torch

from flowgrove.policies import build_policy
from flowgrove.samplers.family import sample_ode

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a cat", "a dog"]
SIZE = 16  # pixels = latent side (the tiny VAE does not downsample)
OPTIONS = f"{{guidance_scale: 5.0, height: {SIZE}, width: {SIZE}}}"


def _save(path, prediction_type: str = "epsilon") -> None:
    from tiny_models import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(prediction_type, SIZE).save_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    _save(path)
    return str(path)


def _policy(path: str, guidance_scale: float, **options):
    return build_policy("sdxl", path=path, dtype="float32", guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                        **options)


@pytest.mark.parametrize("prediction_type,guidance_scale,micro", [
    ("epsilon", 1.0, {}),
    ("v_prediction", 5.0, {"original_size": [32, 24], "crops_coords_top_left": [2, 4]}),
])
def test_sdxl_policy_reproduces_the_pipelines_ddim_sampling(tmp_path, prediction_type, guidance_scale, micro):
    _save(tmp_path, prediction_type)
    policy = _policy(str(tmp_path), guidance_scale, **micro)
    assert policy.latent_shape == (4, SIZE, SIZE) and policy.schedule.prediction_type == prediction_type
    # the policy's steps: DDIM on the folder's (Euler) noise table, on the trailing grid linspace(1, 0, N + 1), ending
    # at alphas_cumprod[0] (set_alpha_to_one=False), x0 unclipped (Euler's config has no clip_sample: DDIM's default
    # would clip)
    ddim = diffusers.DDIMScheduler.from_config(policy.pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=False, clip_sample=False)
    policy.pipe.scheduler = ddim
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    pipe_micro = {k: tuple(v) for k, v in micro.items()}
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=guidance_scale,
                          eta=0.0, latents=x1, output_type="latent", **pipe_micro).images
        cond = policy.encode_prompts(PROMPTS)
        latents = sample_ode(policy.step_family, lambda x, s: policy.velocity(x, s, cond), x1, torch.linspace(1, 0, 5))
        images = policy.decode(latents)
        ref_images = policy.pipe.image_processor.postprocess(
            policy.pipe.vae.decode(ref / policy.pipe.vae.config.scaling_factor).sample, output_type="pt")
    torch.testing.assert_close(latents, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(images, ref_images, atol=1e-5, rtol=0)
    if policy.cfg:  # SDXL base zeroes the unconditional branch (force_zeros_for_empty_prompt)
        assert not cond.negative_prompt_embeds.any() and not cond.negative_pooled.any()


def test_sdxl_model_output_equals_the_unet_call_of_the_pipeline(tiny_sdxl):
    policy = _policy(tiny_sdxl, 1.0)
    pipe = policy.pipe
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
                                          text_encoder_projection_dim=32).repeat(2, 1)
        ref = pipe.unet(x, torch.tensor([749, 499]), encoder_hidden_states=embeds,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        ours = policy.velocity(x, torch.tensor([0.75, 0.5]), policy.encode_prompts(PROMPTS))
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)  # both encoders' states, the projected pooled
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_sdxl_steps_on_the_noise_table_of_the_shipped_euler_scheduler(tiny_sdxl, capfd):
    from tiny_models import SDXL_BASE_SCHEDULER

    from flowgrove.policies.sd15 import ddim_schedule

    capfd.readouterr()
    policy = _policy(tiny_sdxl, 1.0)
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("flowgrove:")]
    assert notes == ["flowgrove: sdxl: rollouts take DDIM steps on the noise table of the folder's "
                     "EulerDiscreteScheduler (scaled_linear betas, epsilon), ending at alphas_cumprod[0]; the "
                     "pipeline's own sampler is not used"]
    euler = policy.pipe.scheduler  # the folder's scheduler as diffusers writes it: no set_alpha_to_one
    assert type(euler).__name__ == "EulerDiscreteScheduler" and "set_alpha_to_one" not in euler.config
    assert torch.equal(policy.schedule.alphas_cumprod, euler.alphas_cumprod)
    assert policy.schedule.final_alpha_cumprod == float(euler.alphas_cumprod[0])
    shipped = ddim_schedule(SDXL_BASE_SCHEDULER)  # SDXL base's own file, with its carried-over PNDM keys
    assert torch.equal(shipped.alphas_cumprod, euler.alphas_cumprod)
    assert shipped.final_alpha_cumprod == policy.schedule.final_alpha_cumprod
    # every step draws noise, the last one included: a last step to alphas_cumprod = 1 drew none and had no log-prob
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(2))
    out = policy.step_family.sde(x, torch.zeros_like(x), 0.25, 0.0, 1.0)
    assert bool((out.std > 0).all()) and out.log_prob is not None


def test_sdxl_refuses_a_scheduler_without_a_noise_table_before_any_weights_load(tmp_path):
    from test_sizes import config_only_folder

    folder = config_only_folder(tmp_path, "sdxl")  # configs only: a check after loading would fail on the weights
    diffusers.EDMEulerScheduler().save_pretrained(str(folder / "scheduler"))  # an EDM schedule (sigmas, no betas)
    with pytest.raises(ValueError, match=r"the folder's EDMEulerScheduler has no DDPM noise table \(beta_schedule\)"):
        build_policy("sdxl", path=str(folder), height=16, width=16)


def test_sdxl_passes_the_shared_adapter_contract(tiny_sdxl):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(tiny_sdxl, 5.0, negative_prompt="blurry"), PROMPTS)


def test_sdxl_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download stabilityai/stable-diffusion-xl-base-1.0"):
        build_policy("sdxl", path=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kind", ["chain-lora", "tree-full"])
def test_sdxl_presets_train_and_export(tiny_sdxl, tmp_path, kind):
    from adapter_contract import TREE, check_full_export, check_pipeline_lora_export, train_and_export
    from diffusers import UNet2DConditionModel

    args = ["policy.name=sdxl", f"policy.path={tiny_sdxl}", f"policy.options={OPTIONS}", "sampler.noise=constant",
            "sampler.noise_level=1.0", "sampler.shift=1.0"]
    if kind == "chain-lora":
        chain = ("--method", "dancegrpo-sd", "sampler.num_steps=4")
        run, out = train_and_export(tmp_path, chain, [*args, "policy.lora_rank=2", "policy.lora_alpha=2"], "brightness")
        check_pipeline_lora_export(run, out, _policy(tiny_sdxl, 5.0), PROMPTS, atol=1e-6)
    else:
        run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=0", "tree.branching=2"], "brightness")
        check_full_export(run, out, UNet2DConditionModel, subfolder="unet")
