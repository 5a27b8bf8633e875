"""The hunyuan_video policy: a tiny HunyuanVideoPipeline (diffusers' own test config) reproduced call for call and
sample for sample, the shared adapter contract, and 2-step trains of the DanceGRPO HunyuanVideo preset (chain, full
fine-tune) and a tree preset (LoRA), each exported back into diffusers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402

PROMPTS = ["a cat", "a dog"]
FRAMES, SIDE = 9, 16  # latents (4, 1 + 8 // 4, 2, 2): the tiny VAE compresses 8x in space and 4x in time
TEMPLATE = {"template": "v {}", "crop_start": 1}  # one template token ("v") cropped, as the real template's 95
OPTIONS = ("{num_frames: 5, height: 16, width: 16, max_sequence_length: 8, "
           "prompt_template: {template: 'v {}', crop_start: 1}}")


@pytest.fixture(scope="module")
def hv_dir(tmp_path_factory):
    from tiny_models import tiny_hunyuan_video_pipeline

    path = tmp_path_factory.mktemp("tiny_hunyuan_video")
    tiny_hunyuan_video_pipeline().save_pretrained(str(path))
    return path


def _policy(path, **options):
    options = {"num_frames": FRAMES, "height": SIDE, "width": SIDE, "max_sequence_length": 8,
               "prompt_template": TEMPLATE, **options}
    return build_policy("hunyuan_video", path=str(path), dtype="float32", **options)


def test_hunyuan_video_velocity_equals_the_transformer_call_of_the_pipeline(hv_dir):
    policy = _policy(hv_dir, guidance=6.018)
    pipe = policy.pipe
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(prompt=PROMPTS, prompt_template=TEMPLATE, max_sequence_length=8)
        assert not bool(mask.all())  # "a cat" is shorter than 8 tokens: the padding and its mask matter
        ref = pipe.transformer(hidden_states=x, timestep=torch.tensor([750.0, 500.0]), encoder_hidden_states=embeds,
                               encoder_attention_mask=mask.float(), pooled_projections=pooled,
                               guidance=torch.tensor([6.018, 6.018]) * 1000.0, return_dict=False)[0]
        ours = policy.velocity(x, torch.tensor([0.75, 0.5]), policy.encode_prompts(PROMPTS))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_hunyuan_video_reproduces_the_pipelines_sample(hv_dir):
    policy = _policy(hv_dir)
    assert policy.latent_shape == (4, 3, 2, 2)
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, num_frames=FRAMES, height=SIDE, width=SIDE, num_inference_steps=3,
                          guidance_scale=6.0, max_sequence_length=8, prompt_template=TEMPLATE, latents=x1.clone(),
                          output_type="pt").frames
        sigmas = policy.pipe.scheduler.sigmas  # the pipeline's shifted grid (shift 5), ending at 0
        cond = policy.encode_prompts(PROMPTS)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas))
    assert ours.shape == ref.shape == (2, FRAMES, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_hunyuan_video_passes_the_shared_adapter_contract(hv_dir):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(hv_dir, num_frames=5), PROMPTS)


def test_hunyuan_video_errors_say_what_to_fix(hv_dir, tmp_path):
    from flowgrove.messages import ConfigError

    with pytest.raises(FileNotFoundError, match="hf download hunyuanvideo-community/HunyuanVideo"):
        build_policy("hunyuan_video", path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^policy.options.height=24 is not a multiple of 16 .*height=16 or 32$"):
        _policy(hv_dir, height=24)
    with pytest.raises(ConfigError, match=r"^policy.options.num_frames=4 is not 1 \+ 4 \* k .*num_frames=1 or 5$"):
        _policy(hv_dir, num_frames=4)
    with pytest.raises(ValueError, match="guidance"):
        _policy(hv_dir, guidance=None)


@pytest.mark.parametrize("kind", ["chain-full", "tree-lora"])
def test_hunyuan_video_presets_train_and_export(hv_dir, tmp_path, kind):
    from adapter_contract import TREE, check_full_export, check_pipeline_lora_export, read_card, train_and_export
    from diffusers import HunyuanVideoTransformer3DModel

    # the preset's video reward, scoring frames by brightness instead of HPS-v2.1 (nothing downloaded)
    args = ["policy.name=hunyuan_video", f"policy.path={hv_dir}", f"policy.options={OPTIONS}",
            "reward_options.video.reward=brightness"]
    if kind == "chain-full":
        chain = ("--method", "dancegrpo-hunyuan", "sampler.num_steps=3")  # its checkpointing and offload kept
        run, out = train_and_export(tmp_path, chain, [*args, "policy.lora_rank=0"], "video")
        assert read_card(out)[0]["pipeline_tag"] == "text-to-video"
        check_full_export(run, out, HunyuanVideoTransformer3DModel)
    else:
        run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=4"], "video")
        check_pipeline_lora_export(run, out, _policy(hv_dir, num_frames=5), PROMPTS, atol=1e-6)
