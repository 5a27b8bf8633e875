"""The z_image policy: a tiny diffusers ZImagePipeline (diffusers' own test config) saved, loaded, sampled against the
pipeline (Turbo's 8 steps without CFG; CFG with its normalization and truncation), trained and exported."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402
from flowgrove.samplers.schedules import flux_sigmas  # noqa: E402
from tiny_models import byte_level_qwen_tokenizer  # noqa: E402

PROMPTS = ["a cat", "a big red dog"]  # different lengths: the pipeline passes each prompt's own tokens
SIDE = 16  # latents (16, 8, 8) with the tiny VAE's scale factor 2; 16 tokens after the transformer's 2x2 patches
OPTIONS = f"policy.options={{height: {SIDE}, width: {SIDE}, max_sequence_length: 64}}"

# Qwen3's chat template as ZImagePipeline._encode_prompt applies it to one user message with the generation prompt
# (enable_thinking=True adds nothing; False would add an empty think block).
QWEN3_CHAT = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
              "{%- endif %}{%- endif %}")


def save_tiny_z_image_pipeline(path) -> None:
    """diffusers ``tests/pipelines/z_image/test_z_image.py`` components (its transformer, VAE and Qwen3 config, with a
    300-token vocabulary and a byte-level tokenizer built in code) and Z-Image-Turbo's scheduler settings
    (``use_dynamic_shifting: false, shift: 3.0``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # allocated with torch.empty; diffusers' test fixes them too
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=300,
                                         max_position_embeddings=512)).eval()
    tokenizer = byte_level_qwen_tokenizer(("<|im_start|>", "<|im_end|>"), QWEN3_CHAT)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)
    ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(str(path))


@pytest.fixture(scope="module")
def z_image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_z_image")
    save_tiny_z_image_pipeline(path)
    return path


def _policy(path, **options):
    options = {"height": SIDE, "width": SIDE, "max_sequence_length": 64, **options}
    return build_policy("z_image", path=str(path), dtype="float32", **options)


# Turbo: 8 steps, no CFG. CFG with its norm cap and truncation: on the 3-step grid 1 - sigma is 0, 0.14, 0.4, so
# only the first step is guided.
CASES = {"turbo": (8, {}), "cfg": (3, {"guidance_scale": 3.0, "negative_prompt": "bad quality",
                                       "cfg_normalization": 1.0, "cfg_truncation": 0.1})}


@pytest.mark.parametrize("case", sorted(CASES))
def test_z_image_policy_reproduces_the_pipeline(z_image_dir, case):
    steps, options = CASES[case]
    policy = _policy(z_image_dir, **options)
    assert policy.latent_shape == (16, SIDE // 2, SIDE // 2)
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        negative = [options["negative_prompt"]] * 2 if "negative_prompt" in options else None
        ref = policy.pipe(prompt=list(PROMPTS), negative_prompt=negative, height=SIDE, width=SIDE,  # it edits lists
                          num_inference_steps=steps, guidance_scale=options.get("guidance_scale", 0.0),
                          cfg_normalization=options.get("cfg_normalization", False),
                          cfg_truncation=options.get("cfg_truncation", 1.0), max_sequence_length=64, latents=x1,
                          output_type="pt").images
        sigmas = policy.pipe.scheduler.sigmas  # the pipeline's grid: linspace(1, 1/N, N) shifted by 3, then 0
        cond = policy.encode_prompts(PROMPTS)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas))
    torch.testing.assert_close(sigmas, flux_sigmas(steps, 3.0))  # = sampler.schedule=flux, sampler.shift=3
    assert cond.prompt_embeds.shape == (2, 64, 16)
    assert ours.shape == ref.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_z_image_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download Tongyi-MAI/Z-Image-Turbo"):
        build_policy("z_image", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        build_policy("z_image", path=str(tmp_path), dtype="float8")


@pytest.mark.parametrize("case", sorted(CASES))
def test_z_image_passes_the_shared_adapter_contract(z_image_dir, case):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(z_image_dir, **CASES[case][1]), PROMPTS)


@pytest.mark.parametrize("kind", ["tree-lora", "window-full"])
def test_z_image_tree_and_window_presets_train_and_export(z_image_dir, tmp_path, kind):
    from adapter_contract import TREE, WINDOW, check_full_export, check_pipeline_lora_export, train_and_export
    from diffusers import ZImageTransformer2DModel

    args = ["policy.name=z_image", f"policy.path={z_image_dir}", OPTIONS]
    if kind == "tree-lora":
        run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=4"], "brightness")
        check_pipeline_lora_export(run, out, _policy(z_image_dir), PROMPTS, atol=1e-6)
    else:
        run, out = train_and_export(tmp_path, WINDOW, [*args, "policy.lora_rank=0"], "brightness")
        check_full_export(run, out, ZImageTransformer2DModel)


# flowgrove's tree at Turbo's 8 steps (docs/video-and-qwen.md): splits at steps 0, 1, 2 with the window over 0..1, so
# steps 0-2 are SDE and trained; the 5 Euler steps after them (sigma 0.833 -> 0) become 3 DPM-Solver++ steps.
TURBO_TREE = ("--method", "flowgrove", "sampler.num_steps=8", "tree.split_steps=[0,1,2]", "window.size=2")


def test_z_image_turbo_trains_flowgroves_tree_at_8_steps_and_exports(z_image_dir, tmp_path):
    from adapter_contract import check_pipeline_lora_export, train_and_export

    from flowgrove.config.load import config_from_yaml_text
    from flowgrove.training.method import sampling_plan

    run, out = train_and_export(tmp_path, TURBO_TREE, ["policy.name=z_image", f"policy.path={z_image_dir}", OPTIONS,
                                                       "policy.lora_rank=4", "eval.num_steps=8"], "brightness")
    cfg = config_from_yaml_text((run / "checkpoints" / "step_000002" / "config.yaml").read_text())
    plan = sampling_plan(cfg, 0)
    assert plan.kinds == ("sde",) * 3 + ("dpm",) * 3 and plan.trained_steps == (0, 1, 2)
    torch.testing.assert_close(plan.sigmas[:4], flux_sigmas(8, 3.0)[:4])  # the pipeline's grid up to the tail
    check_pipeline_lora_export(run, out, _policy(z_image_dir), PROMPTS, atol=1e-6)
