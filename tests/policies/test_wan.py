"""The wan policy: a tiny diffusers WanPipeline (diffusers' own test config, rewards.md 8.1) saved, loaded, sampled
and trained; videos in the run folder as a frame strip PNG and an animated GIF."""

from __future__ import annotations

import string

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402

PROMPTS = ["a cat", "a dog"]
FRAMES, SIDE = 9, 16  # latents (16, 1 + 8 // 4, 2, 2); 4 tokens per latent frame after the 1x2x2 patches


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def save_tiny_wan_pipeline(path, **wan22) -> None:
    """diffusers ``tests/pipelines/wan/test_wan.py`` components; a tiny UMT5 and a T5 tokenizer built in code.

    ``wan22``: ``boundary_ratio`` (adds a second expert, Wan 2.2 A14B) or ``expand_timesteps`` (Wan 2.2 TI2V).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = _tiny_transformer()
    transformer_2 = _tiny_transformer() if "boundary_ratio" in wan22 else None
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
                            + [(c, -5.0) for c in string.ascii_lowercase], extra_ids=0, model_max_length=512)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, transformer=transformer,
                       transformer_2=transformer_2, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **wan22)
    pipe.save_pretrained(str(path))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_wan")
    save_tiny_wan_pipeline(path)
    return path


def _policy(path, **options):
    options = {"num_frames": FRAMES, "height": SIDE, "width": SIDE, "max_sequence_length": 8, "guidance_scale": 1.0,
               **options}
    return build_policy("wan", path=str(path), dtype="float32", **options)


def _assert_reproduces_the_pipeline(policy, guidance_scale: float) -> None:
    assert policy.latent_shape == (16, 3, 2, 2)  # 1 + (9 - 1) // 4 latent frames, 16 px / 8
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, num_frames=FRAMES, height=SIDE, width=SIDE, num_inference_steps=3,
                          guidance_scale=guidance_scale, max_sequence_length=8, latents=x1.clone(),
                          output_type="pt").frames
        sigmas = policy.pipe.scheduler.sigmas  # the pipeline's shifted grid (shift 7), ending at 0
        cond = policy.encode_prompts(PROMPTS)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas))
    assert ours.shape == ref.shape == (2, FRAMES, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_wan_policy_reproduces_the_pipeline(wan_dir, guidance_scale):
    _assert_reproduces_the_pipeline(_policy(wan_dir, guidance_scale=guidance_scale), guidance_scale)


def test_wan22_two_experts_and_per_token_timesteps_reproduce_the_pipeline(tmp_path):
    save_tiny_wan_pipeline(tmp_path / "a14b", boundary_ratio=0.9)  # shifted sigmas 1, 0.93 high-noise; 0.78 low-noise
    policy = _policy(tmp_path / "a14b", expert="low")
    assert policy.module is policy.pipe.transformer_2 and all(p.requires_grad for p in policy.module.parameters())
    assert not any(p.requires_grad for p in policy.pipe.transformer.parameters())  # the other expert is frozen
    _assert_reproduces_the_pipeline(policy, 1.0)
    save_tiny_wan_pipeline(tmp_path / "ti2v", expand_timesteps=True)
    _assert_reproduces_the_pipeline(_policy(tmp_path / "ti2v"), 1.0)


def test_save_grid_writes_a_frame_strip_and_a_gif(tmp_path):
    from PIL import Image

    from flowgrove.runs.metrics import save_grid

    videos = torch.rand(3, 10, 3, 8, 8)  # [N, F, 3, H, W]
    save_grid(videos, tmp_path / "grid.png", columns=3)
    with Image.open(tmp_path / "grid.png") as strip:  # 3 rows of 8 of the 10 frames; 8x8 px enlarged 8x
        assert strip.size == ((8 * 9 + 1) * 8, (3 * 9 + 1) * 8)
    with Image.open(tmp_path / "grid.gif") as gif:  # frame f: the 3 videos' frame f side by side
        assert gif.n_frames == 10 and gif.size == ((3 * 9 + 1) * 8, (1 * 9 + 1) * 8)


def test_wan_refuses_sizes_the_pipeline_would_round(wan_dir):
    from flowgrove.messages import ConfigError

    assert _policy(wan_dir, num_frames=9, height=32, width=16).latent_shape == (16, 3, 4, 2)
    assert _policy(wan_dir, num_frames=1).latent_shape == (16, 1, 2, 2)  # a single frame: an image as a video
    with pytest.raises(ConfigError, match=r"^policy.options.num_frames=11 is not 1 \+ 4 \* k .*num_frames=9 or 13$"):
        _policy(wan_dir, num_frames=11)
    with pytest.raises(ConfigError, match=r"^policy.options.height=40 is not a multiple of 16 .*height=32 or 48$"):
        _policy(wan_dir, height=40)


def test_wan_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        build_policy("wan", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        build_policy("wan", path=str(tmp_path), dtype="float8")


def test_wan_passes_the_shared_adapter_contract(wan_dir):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(wan_dir, num_frames=5), PROMPTS)


def test_wan_train_writes_the_run_folder_with_gif_and_frame_strip(wan_dir, tmp_path):
    from adapter_contract import mean_brightness

    from flowgrove.config.load import load_config
    from flowgrove.recipes import train as runner
    from flowgrove.rewards.base import register_reward

    try:
        register_reward("test_video_brightness")(lambda device=None: mean_brightness)
    except ValueError:  # registered by an earlier test in this process
        pass
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = load_config(None, [
        "policy.name=wan", f"policy.path={wan_dir}", "policy.dtype=float32",
        "policy.options={num_frames: 5, height: 16, width: 16, max_sequence_length: 8, guidance_scale: 1.0}",
        "rollout.prompts_per_step=1", "rollout.group_size=2", "sampler.num_steps=3", "eval.num_steps=3",
        "eval.samples_per_prompt=1", f"data.train={prompts}", "run.progress=false", "run.device=cpu", "train.steps=2",
        "rewards={test_video_brightness: 1.0}", f"run.out={tmp_path / 'run'}",
    ])
    runner.train(cfg)
    run = tmp_path / "run"
    for name in ("samples_before", "samples_after"):
        assert (run / f"{name}.png").is_file() and (run / f"{name}.gif").is_file()
    from PIL import Image

    with Image.open(run / "samples_after.gif") as gif:
        assert gif.n_frames == 5
    assert (run / "summary.json").is_file() and (run / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("kind", ["tree-lora", "window-full"])
def test_wan_tree_and_window_presets_train_and_export(wan_dir, tmp_path, kind):
    from adapter_contract import (TREE, WINDOW, check_full_export, check_pipeline_lora_export, mean_brightness,
                                  read_card, train_and_export)
    from diffusers import WanTransformer3DModel

    from flowgrove.rewards.base import register_reward

    try:
        register_reward("test_video_brightness")(lambda device=None: mean_brightness)
    except ValueError:  # registered by an earlier test in this process
        pass
    args = ["policy.name=wan", f"policy.path={wan_dir}",
            "policy.options={num_frames: 5, height: 16, width: 16, max_sequence_length: 8, guidance_scale: 1.0}"]
    if kind == "tree-lora":
        run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=4"], "test_video_brightness")
        assert read_card(out)[0]["pipeline_tag"] == "text-to-video"
        check_pipeline_lora_export(run, out, _policy(wan_dir, num_frames=5), PROMPTS, atol=1e-6)
    else:
        run, out = train_and_export(tmp_path, WINDOW, [*args, "policy.lora_rank=0"], "test_video_brightness")
        check_full_export(run, out, WanTransformer3DModel)
