"""The wan policy: a tiny diffusers WanPipeline (diffusers' own test config, rewards.md 8.1) saved, loaded, sampled
and trained; videos in the run folder as a frame strip PNG and an animated GIF."""

from __future__ import annotations

import shutil
import string

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402

PROMPTS = ["a cat", "a dog"]
FRAMES, SIDE = 9, 16  # latents (16, 1 + 8 // 4, 2, 2); 4 tokens per latent frame after the 1x2x2 patches


# Wan 2.2 TI2V-5B's VAE (diffusers tests/pipelines/wan/test_wan_22.py, the 5B case): 48 channels, patch 2, scale 16
TI2V_5B_VAE = dict(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                   scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True])
# Wan 2.2 A14B as Wan-AI ships it: UniPC with flow sigmas (the scheduler_config.json keys) and T2V-A14B's
# sample_shift 12 and boundary 0.875 (Wan2.2 wan/configs/wan_t2v_A14B.py)
A14B_UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0, solver_order=2,
                  final_sigmas_type="zero")


def _tiny_transformer(channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=channels, out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def save_tiny_wan_pipeline(path, *, vae: dict | None = None, unipc: dict | None = None, **wan22) -> None:
    """diffusers ``tests/pipelines/wan/test_wan.py`` components; a tiny UMT5 and a T5 tokenizer built in code.

    ``vae``: another ``AutoencoderKLWan`` config (:data:`TI2V_5B_VAE`); ``unipc``: a ``UniPCMultistepScheduler``
    config instead of ``FlowMatchEulerDiscreteScheduler(shift=7)``; ``wan22``: ``boundary_ratio`` (adds a second
    expert, Wan 2.2 A14B) or ``expand_timesteps`` (Wan 2.2 TI2V).
    """
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                           WanPipeline)
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**(vae or dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                          temperal_downsample=[False, True, True])))
    transformer = _tiny_transformer(vae.config.z_dim)
    transformer_2 = _tiny_transformer(vae.config.z_dim) if "boundary_ratio" in wan22 else None
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
                            + [(c, -5.0) for c in string.ascii_lowercase], extra_ids=0, model_max_length=512)
    scheduler = UniPCMultistepScheduler(**unipc) if unipc else FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, transformer=transformer,
                       transformer_2=transformer_2, scheduler=scheduler, **wan22)
    pipe.save_pretrained(str(path))


def save_tiny_wan_i2v_pipeline(path, *, clip: bool, skyreels: bool = False, **wan22) -> None:
    """diffusers ``tests/pipelines/wan/test_wan_image_to_video.py`` components: a 36-channel transformer (latents,
    first-frame mask and condition) with a tiny CLIP vision tower (``clip``, Wan 2.1 I2V) or two experts without one
    (``boundary_ratio``, Wan 2.2 A14B I2V); text encoder, tokenizer and VAE as :func:`save_tiny_wan_pipeline`.
    ``skyreels``: ``SkyReelsV2ImageToVideoPipeline`` with a ``SkyReelsV2Transformer3DModel`` (its tests' config)."""
    import diffusers
    from diffusers import WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    save_tiny_wan_pipeline(path, **({"unipc": A14B_UNIPC} if wan22 else {}))
    t2v = WanPipeline.from_pretrained(str(path))
    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
                  text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=4 if clip else None)
    encoder = processor = None
    if clip:
        encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                                                 num_attention_heads=2, image_size=32,
                                                                 intermediate_size=16, patch_size=1))
        processor = CLIPImageProcessor(crop_size=32, size=32)
    family = "SkyReelsV2" if skyreels else "Wan"
    experts = [getattr(diffusers, f"{family}Transformer3DModel")(**config) for _ in range(2 if wan22 else 1)]
    components = dict(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae, scheduler=t2v.scheduler,
                      image_processor=processor, image_encoder=encoder, transformer=experts[0])
    if not skyreels:
        components.update(transformer_2=experts[1] if wan22 else None, **wan22)
    pipe = getattr(diffusers, f"{family}ImageToVideoPipeline")(**components)
    shutil.rmtree(path)
    pipe.save_pretrained(str(path))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_wan")
    save_tiny_wan_pipeline(path)
    return path


@pytest.fixture(scope="module")
def i2v_dirs(tmp_path_factory):
    """Tiny image-to-video folders ``wan21`` (CLIP), ``wan22`` (A14B, boundary 0.9, UniPC) and ``skyreels``
    (SkyReels-V2 I2V, CLIP), an input image
    ``first_frame.png`` (24 x 20: the pipeline resizes it) and ``prompts.jsonl`` whose rows carry it."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_wan_i2v")
    save_tiny_wan_i2v_pipeline(root / "wan21", clip=True)
    save_tiny_wan_i2v_pipeline(root / "wan22", clip=False, boundary_ratio=0.9)
    save_tiny_wan_i2v_pipeline(root / "skyreels", clip=True, skyreels=True)
    pixels = (np.random.default_rng(0).random((24, 20, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(root / "first_frame.png")
    (root / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p}", "image": "first_frame.png"}}\n' for p in PROMPTS))
    return root


def _rows(i2v_dirs):
    from flowgrove.training.prompts import read_prompts

    return read_prompts(i2v_dirs / "prompts.jsonl")  # the two prompts, each with the input image


@pytest.fixture(scope="module")
def a14b_dir(tmp_path_factory):
    """A tiny Wan 2.2 A14B folder as Wan-AI ships it: two experts, boundary 0.875, UniPC."""
    path = tmp_path_factory.mktemp("tiny_wan22_a14b")
    save_tiny_wan_pipeline(path, unipc=A14B_UNIPC, boundary_ratio=0.875)
    return path


def _policy(path, **options):
    options = {"num_frames": FRAMES, "height": SIDE, "width": SIDE, "max_sequence_length": 8, "guidance_scale": 1.0,
               **options}
    return build_policy("wan", path=str(path), dtype="float32", **options)


def _assert_reproduces_the_pipeline(policy, guidance_scale: float, side: int = SIDE, image=None) -> None:
    """``image``: image-to-video's input image (a path), the first frame of both rows."""
    assert policy.latent_shape[1:] == (3, 2, 2)  # 1 + (9 - 1) // 4 latent frames, side / VAE scale
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    rows, first_frame = PROMPTS, {}
    if image is not None:
        from PIL import Image

        from flowgrove.training.prompts import Prompt

        rows = [Prompt(p, {"image": str(image)}) for p in PROMPTS]
        with Image.open(image) as opened:
            first_frame = {"image": opened.convert("RGB")}
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, num_frames=FRAMES, height=side, width=side, num_inference_steps=3,
                          guidance_scale=guidance_scale, max_sequence_length=8, latents=x1.clone(),
                          output_type="pt", **first_frame).frames
        sigmas = policy.pipe.scheduler.sigmas  # the pipeline's shifted grid, ending at 0
        cond = policy.encode_prompts(rows)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas))
    assert ours.shape == ref.shape == (2, FRAMES, 3, side, side)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_wan_policy_reproduces_the_pipeline(wan_dir, guidance_scale):
    _assert_reproduces_the_pipeline(_policy(wan_dir, guidance_scale=guidance_scale), guidance_scale)


def test_wan22_a14b_as_it_ships_reads_its_unipc_grid_and_routes_two_experts(a14b_dir, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowgrove.policies.wan import WanSchedule
    from flowgrove.samplers.schedules import flux_sigmas

    policy = _policy(a14b_dir, expert="low")
    assert f"{a14b_dir} ships UniPCMultistepScheduler (flow shift 12)" in capsys.readouterr().err
    assert policy.schedule == WanSchedule("UniPCMultistepScheduler", 12.0)
    policy.pipe.scheduler.set_timesteps(6)  # UniPC's flow sigmas: flowgrove's flux grid at shift 12, to 12 / 1000
    torch.testing.assert_close(policy.pipe.scheduler.sigmas, flux_sigmas(6, 12.0), atol=12e-3, rtol=0)
    assert policy.module is policy.pipe.transformer_2 and all(p.requires_grad for p in policy.module.parameters())
    assert not any(p.requires_grad for p in policy.pipe.transformer.parameters())  # the other expert is frozen
    policy.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Euler steps 1, 0.86, 0.6: both experts
    _assert_reproduces_the_pipeline(policy, 1.0)


def test_wan22_ti2v_5b_single_expert_reproduces_the_pipeline(tmp_path):
    save_tiny_wan_pipeline(tmp_path / "ti2v", vae=TI2V_5B_VAE, expand_timesteps=True)
    policy = _policy(tmp_path / "ti2v", height=32, width=32)  # VAE scale 16 x patch 2
    assert policy.latent_shape == (48, 3, 2, 2) and policy.boundary is None
    _assert_reproduces_the_pipeline(policy, 1.0, side=32)


def test_wan_refuses_an_expert_the_folder_lacks_and_a_scheduler_without_flow_sigmas(wan_dir):
    from flowgrove.messages import ConfigError
    from flowgrove.policies.wan import wan_schedule

    with pytest.raises(ConfigError, match=r"^policy.options.expert=low needs a two-expert folder .*drop the option$"):
        _policy(wan_dir, expert="low")
    with pytest.raises(ConfigError, match=r"^policy.options.expert='middle' is not allowed; set high .* or both$"):
        _policy(wan_dir, expert="middle")
    with pytest.raises(ConfigError, match=r"^policy.path: s.json is UniPCMultistepScheduler without flow-matching"):
        wan_schedule({"_class_name": "UniPCMultistepScheduler", "prediction_type": "epsilon"}, "s.json")


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


def test_wan22_experts_pass_the_shared_adapter_contract(a14b_dir, tmp_path):
    from adapter_contract import check_export_round_trip, check_policy_contract

    from diffusers import WanPipeline

    # the contract's sigmas 0.9 and 0.3 go to one expert each, and any step it trains trains one; the two LoRA files
    # of "both" are checked through diffusers below
    both = _policy(a14b_dir, num_frames=5, expert="both")
    check_policy_contract(both, PROMPTS, exports=False)
    both.export_full(tmp_path / "both")  # both trained experts in one pipeline folder
    loaded = WanPipeline.from_pretrained(str(tmp_path / "both"))
    for expert, reloaded in zip(both.experts, (loaded.transformer, loaded.transformer_2)):
        assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in expert.state_dict().items())
    low = _policy(a14b_dir, num_frames=5, expert="low")  # its LoRA and folder round trips (sigmas 0.8, 0.4: low)
    check_export_round_trip(low, low.encode_prompts(PROMPTS), tmp_path, component="transformer_2")


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


def _register_brightness() -> None:
    from adapter_contract import mean_brightness

    from flowgrove.rewards.base import register_reward

    try:
        register_reward("test_video_brightness")(lambda device=None: mean_brightness)
    except ValueError:  # registered by an earlier test in this process
        pass


def test_wan22_both_experts_train_lora_and_export_each_into_its_expert(a14b_dir, tmp_path):
    from adapter_contract import TREE, read_card, run_trainer, train_and_export

    from flowgrove.policies.wan import LOW_NOISE_LORA

    _register_brightness()
    args = ["policy.name=wan", f"policy.path={a14b_dir}", "sampler.shift=3",  # steps on both sides of 0.875
            "policy.options={num_frames: 5, height: 16, width: 16, max_sequence_length: 8, guidance_scale: 1.0, "
            "expert: both}"]
    run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=4"], "test_video_brightness")
    assert "load_into_transformer_2=True" in read_card(out)[1]
    policy, base = run_trainer(run).policy, _policy(a14b_dir, num_frames=5)
    cond = base.encode_prompts(PROMPTS)
    x = torch.randn((2, *base.latent_shape), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.95, 0.5])  # one row per expert
    with torch.no_grad():
        trained, before = policy.velocity(x, sigma, cond), base.velocity(x, sigma, cond)
        assert ((trained - before).flatten(1).abs().amax(1) > 1e-4).all()  # each expert learned from its own steps
        base.pipe.load_lora_weights(str(out))  # the high-noise file, into transformer only
        high = base.velocity(x, sigma, cond)
        torch.testing.assert_close(high[0], trained[0], atol=1e-6, rtol=0)
        assert torch.equal(high[1], before[1])  # transformer_2 untouched
        base.pipe.load_lora_weights(str(out), weight_name=LOW_NOISE_LORA, load_into_transformer_2=True)
        torch.testing.assert_close(base.velocity(x, sigma, cond), trained, atol=1e-6, rtol=0)


def test_wan22_ti2v_5b_trains_lora_through_the_cli_and_exports(tmp_path):
    from adapter_contract import TREE, check_pipeline_lora_export, train_and_export

    _register_brightness()
    save_tiny_wan_pipeline(tmp_path / "ti2v", vae=TI2V_5B_VAE, expand_timesteps=True)
    args = ["policy.name=wan", f"policy.path={tmp_path / 'ti2v'}", "policy.lora_rank=4",
            "policy.options={num_frames: 5, height: 32, width: 32, max_sequence_length: 8, guidance_scale: 1.0}"]
    run, out = train_and_export(tmp_path, TREE, args, "test_video_brightness")
    check_pipeline_lora_export(run, out, _policy(tmp_path / "ti2v", num_frames=5, height=32, width=32), PROMPTS,
                               atol=1e-6)


@pytest.mark.parametrize("version, guidance_scale", [("wan21", 3.0), ("wan22", 3.0),
                                                     ("skyreels", 3.0)])
def test_wan_image_to_video_reproduces_the_pipeline(i2v_dirs, version, guidance_scale):
    from diffusers import FlowMatchEulerDiscreteScheduler

    policy = _policy(i2v_dirs / version, guidance_scale=guidance_scale,
                     **({"expert": "both"} if version == "wan22" else {}))
    assert policy.image_to_video and policy.latent_shape == (16, 3, 2, 2)  # the transformer reads 16 + 4 + 16
    policy.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Euler steps 1, 0.75, 0.01: both experts
    _assert_reproduces_the_pipeline(policy, guidance_scale, image=i2v_dirs / "first_frame.png")


def test_skyreels_v2_image_to_video_passes_the_contract(i2v_dirs):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(i2v_dirs / "skyreels", num_frames=5), _rows(i2v_dirs))


def test_wan_image_to_video_passes_the_contract_and_needs_input_images(i2v_dirs):
    from adapter_contract import check_policy_contract

    policy = _policy(i2v_dirs / "wan21", num_frames=5)
    cond = policy.encode_prompts(_rows(i2v_dirs))
    assert cond.image_latents.shape == (2, 20, 2, 2, 2) and cond.image_embeds.shape[0] == 2  # mask + latents; CLIP
    check_policy_contract(policy, _rows(i2v_dirs))
    with pytest.raises(ValueError, match=r"prompt 'a cat' has none; give data.train as a .jsonl"):
        policy.encode_prompts(["a cat"])


def test_wan_image_to_video_trains_the_dancegrpo_i2v_preset_and_exports(i2v_dirs, tmp_path):
    from adapter_contract import check_pipeline_lora_export, train_and_export

    from flowgrove.config.load import load_config

    cfg = load_config(method="dancegrpo-i2v")  # CFG in rollouts and training; one optimizer step per rollout
    assert cfg.policy.options["guidance_scale"] == 5.0 and cfg.train.accumulate == "samples"
    assert cfg.train.accumulate_size == cfg.rollout.prompts_per_step * cfg.rollout.group_size
    options = "{num_frames: 5, height: 16, width: 16, max_sequence_length: 8, guidance_scale: 3.0}"
    args = ["policy.name=wan", f"policy.path={i2v_dirs / 'wan21'}", f"policy.options={options}", "policy.lora_rank=4",
            "reward_options.video.reward=brightness", "train.gradient_checkpointing=false"]
    run, out = train_and_export(tmp_path, ("--method", "dancegrpo-i2v", "sampler.num_steps=3"), args, "video",
                                prompt_file=i2v_dirs / "prompts.jsonl")
    base = _policy(i2v_dirs / "wan21", num_frames=5, guidance_scale=3.0)
    check_pipeline_lora_export(run, out, base, _rows(i2v_dirs), atol=1e-6)


def test_wan22_policy_quantize_quantises_the_idle_expert_too(a14b_dir):
    pytest.importorskip("torchao")
    from flowgrove.config.load import load_config
    from flowgrove.policies.quantize import transformer_blocks
    from flowgrove.training.prepare import prepare_policy

    args = ["policy.name=wan", f"policy.path={a14b_dir}", "policy.lora_rank=4", "run.device=cpu",
            "policy.options={num_frames: 5, height: 16, width: 16, max_sequence_length: 8, guidance_scale: 1.0}"]
    plain = prepare_policy(load_config(None, args), torch.device("cpu"))
    policy = prepare_policy(load_config(None, [*args, "policy.quantize=int8"]), torch.device("cpu"))
    trained, idle = policy.experts
    assert policy.frozen_modules == [idle] and policy.module is trained

    def base_weights(module):
        return [m.weight for block in transformer_blocks(module) for name, m in block.named_modules()
                if "lora_" not in name and isinstance(m, torch.nn.Linear)]

    assert all(type(w) is not torch.nn.Parameter for w in base_weights(trained) + base_weights(idle))
    assert not any(p.requires_grad for p in idle.parameters())  # the adapters reach the trained expert only
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for sigma in (0.95, 0.5):  # the trained expert's side of the boundary 0.875, then the idle one's
            s = torch.full((2,), sigma)
            got, want = policy.velocity(x, s, cond), plain.velocity(x, s, cond)
            assert 0 < float((got - want).norm() / want.norm()) < 0.05  # int8's rounding, on both sides
