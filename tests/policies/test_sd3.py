"""The sd3 policy: a tiny StableDiffusion3Pipeline reproduced with and without CFG, the shared adapter contract,
gradients through both CFG branches, and the flowgrpo-sd3 preset end to end."""

from __future__ import annotations

import json

import pytest
import torch

from flowgrove.policies import Conditioning, build_policy
from flowgrove.samplers import sample_euler
from flowgrove.samplers.schedules import sd3_sigmas

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a cat", "a dog"]
SIZE = 16  # pixels = latent side (the tiny VAE does not downsample)


def _save_tiny_sd3_pipeline(path) -> None:
    """offline-recipes.md section 1: diffusers' SD3 test configs, tokenizers built in code, SD3.5's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from tiny_models import tiny_clip_config, tiny_t5, tiny_tokenizers, tiny_vae
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4)
    clip_l, clip_g = CLIPTextModelWithProjection(tiny_clip_config()), CLIPTextModelWithProjection(tiny_clip_config())
    clip_tok, t5_tok = tiny_tokenizers()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(4),
        text_encoder=clip_l, tokenizer=clip_tok, text_encoder_2=clip_g, tokenizer_2=clip_tok,
        text_encoder_3=tiny_t5(), tokenizer_3=t5_tok)
    pipe.save_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    _save_tiny_sd3_pipeline(path)
    return str(path)


def _policy(path: str, guidance_scale: float, **kwargs):
    return build_policy("sd3", path=path, dtype="float32", guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                        max_sequence_length=8, **kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_sd3_policy_reproduces_the_pipeline(tiny_sd3, guidance_scale):
    policy = _policy(tiny_sd3, guidance_scale)
    assert policy.latent_shape == (4, SIZE, SIZE) and policy.cfg == (guidance_scale > 1)
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, negative_prompt="" if policy.cfg else None, height=SIZE, width=SIZE,
                          num_inference_steps=4, guidance_scale=guidance_scale, max_sequence_length=8, latents=x1,
                          output_type="pt").images
        sigmas = policy.pipe.scheduler.sigmas  # the pipeline's grid, ending at 0
        cond = policy.encode_prompts(PROMPTS)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas))
    torch.testing.assert_close(sigmas, sd3_sigmas(4, 3.0), atol=1e-6, rtol=0)  # sampler.schedule=sd3 is this grid
    assert cond.prompt_embeds.shape == (2, 77 + 8, 32) and cond.pooled.shape == (2, 64)
    assert (cond.negative_prompt_embeds is not None) == policy.cfg
    assert ours.shape == ref.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_sd3_negative_fields_select_move_and_fall_back(tiny_sd3):
    policy = _policy(tiny_sd3, 4.5)
    cond = policy.encode_prompts(PROMPTS)
    picked = cond.select(torch.tensor([1, 1, 0])).to(dtype=torch.float64)
    assert len(picked) == 3 and picked.negative_pooled.dtype == torch.float64
    torch.testing.assert_close(picked.negative_prompt_embeds[0].float(), cond.negative_prompt_embeds[1])
    with pytest.raises(ValueError, match="negative_pooled has 1"):
        Conditioning(cond.prompt_embeds, cond.pooled, cond.negative_prompt_embeds, cond.negative_pooled[:1])
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():  # a prompt cache keeps prompt_embeds and pooled only: the policy's own negative prompt
        torch.testing.assert_close(policy.velocity(x, sigma, Conditioning(cond.prompt_embeds, cond.pooled)),
                                   policy.velocity(x, sigma, cond))


def test_sd3_missing_folder_says_what_to_download(tiny_sd3, tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download stabilityai/stable-diffusion-3.5-medium"):
        build_policy("sd3", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        build_policy("sd3", path=tiny_sd3, dtype="float8")


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_sd3_passes_the_shared_adapter_contract(tiny_sd3, guidance_scale):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(tiny_sd3, guidance_scale), PROMPTS)


def _branch_grads(policy) -> tuple[torch.Tensor, torch.Tensor]:
    """d(sum v)/d(transformer output), unconditional rows and conditional rows."""
    outputs = []
    handle = policy.module.register_forward_hook(lambda m, args, out: outputs.append(out[0]) or out[0].retain_grad())
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(2))
    policy.velocity(x, torch.tensor([0.8, 0.5]), policy.encode_prompts(PROMPTS)).sum().backward()
    handle.remove()
    (out,) = outputs  # one transformer call on the [uncond; cond] batch
    return out.grad[:2], out.grad[2:]


def test_sd3_training_gradients_reach_both_cfg_branches(tiny_sd3):
    s = 4.5
    uncond, cond = _branch_grads(_policy(tiny_sd3, s))
    torch.testing.assert_close(uncond, torch.full_like(uncond, 1 - s))  # v = v_u + s (v_c - v_u)
    torch.testing.assert_close(cond, torch.full_like(cond, s))
    uncond, cond = _branch_grads(_policy(tiny_sd3, s, detach_uncond=True))  # Flow-GRPO's training forward
    assert torch.equal(uncond, torch.zeros_like(uncond)) and torch.equal(cond, torch.full_like(cond, s))

    # the weights' gradient: (1 - s) dv_u + s dv_c, which detaching the unconditional branch changes
    def weight_grad(detach: bool) -> torch.Tensor:
        policy = _policy(tiny_sd3, s, detach_uncond=detach)
        x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
        policy.velocity(x, torch.tensor([0.8, 0.5]), policy.encode_prompts(PROMPTS)).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in policy.module.parameters() if p.grad is not None])

    both, cond_only = weight_grad(False), weight_grad(True)
    assert both.abs().sum() > 0 and not torch.allclose(both, cond_only)


def test_flowgrpo_sd3_preset_trains_two_steps(tiny_sd3, tmp_path):
    from flowgrove.cli import main
    from flowgrove.config.load import load_config

    cfg = load_config(method="flowgrpo-sd3")
    assert (cfg.policy.name, cfg.sampler.num_steps, cfg.eval.num_steps, cfg.sampler.schedule) == ("sd3", 10, 40, "sd3")
    assert cfg.policy.options["guidance_scale"] == 4.5 and (cfg.policy.lora_rank, cfg.policy.lora_alpha) == (32, 64)
    assert (cfg.train.kl_beta, cfg.train.kl_scale, cfg.sampler.noise_level) == (0.04, "reference", 0.7)
    assert cfg.train.drop_zero_advantage and not load_config(method="flowgrpo").train.drop_zero_advantage
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "run"
    assert main(["train", "--method", "flowgrpo-sd3", "--steps", "2", "--out", str(out), f"policy.path={tiny_sd3}",
                 f"data.train={prompts}", "policy.dtype=float32", "policy.lora_rank=4", "policy.lora_alpha=8",
                 f"policy.options={{guidance_scale: 4.5, height: {SIZE}, width: {SIZE}, max_sequence_length: 8}}",
                 "sampler.num_steps=3", "train.first_k=2", "eval.num_steps=2", "eval.samples_per_prompt=1",
                 "rollout.prompts_per_step=1", "rollout.group_size=2", "train.accumulate_size=2",
                 "rewards={brightness: 1.0}", "run.device=cpu", "run.progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "flowgrpo-sd3" and summary["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["kl"] >= 0 for r in rows)


@pytest.mark.parametrize("kind", ["tree-lora", "window-full"])
def test_sd3_tree_and_window_presets_train_and_export(tiny_sd3, tmp_path, kind):
    from adapter_contract import TREE, WINDOW, check_full_export, check_pipeline_lora_export, train_and_export

    options = f"policy.options={{guidance_scale: 4.5, height: {SIZE}, width: {SIZE}, max_sequence_length: 8}}"
    args = ["policy.name=sd3", f"policy.path={tiny_sd3}", options]
    if kind == "tree-lora":
        run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=4"], "brightness")
        check_pipeline_lora_export(run, out, _policy(tiny_sd3, 4.5), PROMPTS, atol=1e-6)
    else:
        run, out = train_and_export(tmp_path, WINDOW, [*args, "policy.lora_rank=0"], "brightness")
        check_full_export(run, out, diffusers.SD3Transformer2DModel)
