"""The sd15 policy: a tiny StableDiffusionPipeline reproduced by the DDIM step family (eps and v prediction, with
and without CFG), the shared adapter contract, and 2-step trains of a chain, a window (Flash tail) and a tree preset."""

from __future__ import annotations

import json

import pytest
import torch

from flowgrove.policies import build_policy
from flowgrove.samplers.family import sample_ode

from conftest import restore_checkpoint

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a cat", "a dog"]
SIZE = 16  # pixels = latent side (the tiny VAE does not downsample)


def _save_tiny_sd_pipeline(path, prediction_type: str = "epsilon") -> None:
    """diffusers' StableDiffusionPipeline test UNet, a tiny CLIP and VAE, and the scheduler SD1.5 ships
    (``PNDMScheduler``, scheduler_config.json of stable-diffusion-v1-5)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from tiny_models import tiny_clip_config, tiny_tokenizers, tiny_vae
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=SIZE, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                              skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=tiny_vae(4),
                                             text_encoder=CLIPTextModel(tiny_clip_config()),
                                             tokenizer=tiny_tokenizers()[0], safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd15")
    _save_tiny_sd_pipeline(path)
    return str(path)


def _policy(path: str, guidance_scale: float):
    return build_policy("sd15", path=path, dtype="float32", guidance_scale=guidance_scale, height=SIZE, width=SIZE)


@pytest.mark.parametrize("prediction_type,guidance_scale", [("epsilon", 1.0), ("epsilon", 5.0), ("v_prediction", 5.0)])
def test_sd15_policy_reproduces_the_pipelines_ddim_sampling(tmp_path, prediction_type, guidance_scale):
    _save_tiny_sd_pipeline(tmp_path, prediction_type)
    policy = _policy(str(tmp_path), guidance_scale)
    assert policy.latent_shape == (4, SIZE, SIZE) and policy.schedule.prediction_type == prediction_type
    # the policy's steps: DDIM on the folder's noise table, the trailing grid linspace(1, 0, N + 1), ending at abar[0],
    # x0 unclipped
    policy.pipe.scheduler = diffusers.DDIMScheduler.from_config(
        policy.pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, negative_prompt=None, height=SIZE, width=SIZE,
                          num_inference_steps=4, guidance_scale=guidance_scale, eta=0.0, latents=x1,
                          output_type="latent").images
        cond = policy.encode_prompts(PROMPTS)
        latents = sample_ode(policy.step_family, lambda x, s: policy.velocity(x, s, cond), x1, torch.linspace(1, 0, 5))
        images = policy.decode(latents)
        ref_images = policy.pipe.image_processor.postprocess(
            policy.pipe.vae.decode(ref / policy.pipe.vae.config.scaling_factor).sample, output_type="pt")
    torch.testing.assert_close(latents, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(images, ref_images, atol=1e-5, rtol=0)
    assert (cond.negative_prompt_embeds is not None) == policy.cfg


def test_sd15_model_output_equals_the_unet_call(tiny_sd):
    policy = _policy(tiny_sd, 1.0)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = policy.encode_prompts(PROMPTS)
        ours = policy.velocity(x, torch.tensor([0.75, 0.5]), cond)
        ref = policy.unet(x, torch.tensor([749, 499]), encoder_hidden_states=cond.prompt_embeds).sample
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_sd15_steps_on_the_shipped_pndm_noise_table_and_says_how_they_differ(tiny_sd):
    from flowgrove.policies.sd15 import ddim_schedule, schedule_note

    pndm = _policy(tiny_sd, 1.0).pipe.scheduler  # SD1.5's scheduler as shipped
    schedule = ddim_schedule(dict(pndm.config))
    assert torch.equal(schedule.alphas_cumprod, pndm.alphas_cumprod)
    assert schedule.final_alpha_cumprod == float(pndm.final_alpha_cumprod) == float(pndm.alphas_cumprod[0])
    pndm_note = "sd15: rollouts take DDIM steps on the noise table of the folder's PNDMScheduler (scaled_linear betas"
    assert schedule_note("sd15", dict(pndm.config)).startswith(pndm_note)
    ddim = diffusers.DDIMScheduler.from_config(pndm.config)
    assert schedule_note("sd15", dict(ddim.config)) is None  # set_alpha_to_one=False: DDIM as the policy steps
    ddim_to_one = dict(diffusers.DDIMScheduler.from_config(pndm.config, set_alpha_to_one=True).config)
    assert "set_alpha_to_one=true; rollouts end at alphas_cumprod[0] instead" in schedule_note("sd15", ddim_to_one)
    # not 1: the last step draws noise
    assert ddim_schedule(ddim_to_one).final_alpha_cumprod == float(pndm.alphas_cumprod[0])


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sd15_passes_the_shared_adapter_contract(tiny_sd, guidance_scale):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(tiny_sd, guidance_scale), PROMPTS)


def test_sd15_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download"):
        build_policy("sd15", path=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("method,extra", [
    ("dancegrpo-sd", []),
    ("mixgrpo-flash", ["window.size=2", "sampler.noise=constant", "sampler.noise_level=1.0", "sampler.shift=1.0"]),
    ("branchgrpo", ["tree.split_steps=[0]", "tree.branching=2", "sampler.noise_level=1.0", "sampler.shift=1.0"]),
])
def test_sd15_trains_two_steps(tiny_sd, tmp_path, method, extra):
    from flowgrove.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--steps", "2", "--out", str(out), "policy.name=sd15",
                 f"policy.path={tiny_sd}", f"data.train={prompts}", "policy.dtype=float32", "policy.lora_rank=2",
                 "policy.lora_alpha=2", "policy.lora_targets=[to_q, to_k, to_v, to_out.0]",
                 f"policy.options={{guidance_scale: 5.0, height: {SIZE}, width: {SIZE}}}", "sampler.num_steps=4",
                 "eval.num_steps=2", "eval.samples_per_prompt=1", "rollout.prompts_per_step=1", "rollout.group_size=2",
                 "train.accumulate_size=2", "rewards={brightness: 1.0}", "run.device=cpu", "run.progress=false",
                 *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["first_ratio_max_dev"] < 1e-4 for r in rows)
    if method == "dancegrpo-sd":
        _check_export_round_trip(tiny_sd, out, tmp_path / "lora")


def _check_export_round_trip(tiny_sd, run, out) -> None:
    """``flowgrove export`` of the LoRA run: ``pipe.load_lora_weights`` reproduces the trained UNet's output."""
    from flowgrove.cli import main
    from flowgrove.config.load import config_from_yaml_text
    from flowgrove.training.setup import build_trainer

    assert main(["export", str(run), "--out", str(out)]) == 0
    ckpt = run / "checkpoints" / "step_000002"
    trainer = build_trainer(config_from_yaml_text((ckpt / "config.yaml").read_text()))
    restore_checkpoint(trainer, ckpt)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd)
    x = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = trainer.policy.encode_prompts(PROMPTS)
        t = torch.tensor([749, 249])
        base = pipe.unet(x, t, encoder_hidden_states=cond.prompt_embeds).sample
        ours = trainer.policy.unet(x, t, encoder_hidden_states=cond.prompt_embeds).sample
        pipe.load_lora_weights(str(out))
        loaded = pipe.unet(x, t, encoder_hidden_states=cond.prompt_embeds).sample
    assert (ours - base).abs().max() > 1e-6  # the LoRA moved
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=0)


def test_the_kl_on_sd15_is_the_exact_kl_of_the_ddim_transitions(tiny_sd, tmp_path, monkeypatch):
    """``train.kl_beta > 0`` on a diffusion policy: each stored transition's KL divides by its own DDIM std
    ``sigma_t`` (Flow-GRPO's ``kl_scale=reference`` would divide by eta^2 and is refused for these policies)."""
    from flowgrove.config.load import load_config
    from flowgrove.samplers.diffusion import ddim_std
    from flowgrove.training import trainer as trainer_mod
    from flowgrove.training.setup import build_trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = load_config(None, [f"policy.path={tiny_sd}", f"data.train={prompts}", "policy.dtype=float32",
                             "policy.lora_rank=2", "policy.lora_alpha=2", "sampler.num_steps=4", "train.kl_beta=0.1",
                             f"policy.options={{guidance_scale: 5.0, height: {SIZE}, width: {SIZE}}}", "eval.num_steps=2",
                             "rollout.prompts_per_step=1", "rollout.group_size=2", "rewards={brightness: 1.0}",
                             "run.device=cpu"], method="dancegrpo-sd")
    trainer = build_trainer(cfg)
    seen, stored, real_kl, real_update = {}, {}, trainer_mod.transition_kl, trainer.update
    monkeypatch.setattr(trainer_mod, "transition_kl", lambda mean, ref, std: seen.setdefault("std", []).append(std.detach())
                        or real_kl(mean, ref, std))
    trainer.update = lambda tr, *args, **kwargs: stored.update(tr=tr) or real_update(tr, *args, **kwargs)
    assert trainer.step()["kl"] >= 0
    tr, ab = stored["tr"], trainer.policy.schedule.alpha_bar
    want = ddim_std(ab(tr.sigma), ab(tr.sigma_next), tr.g, tr.x).float()  # [E]: eta 1.0, no split scale
    got = torch.cat(seen["std"])
    assert got.shape == want.shape == (2 * 3,) and not torch.allclose(got, tr.g)
    torch.testing.assert_close(torch.sort(got).values, torch.sort(want).values)
