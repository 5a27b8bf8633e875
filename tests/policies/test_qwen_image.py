"""The qwen_image policy: a tiny diffusers QwenImagePipeline (diffusers' own test config, rewards.md 8.2) saved,
loaded and sampled."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402
from tiny_models import byte_level_qwen_tokenizer  # noqa: E402

PROMPTS = ["a cat", "a big red dog"]  # different lengths: the shorter one is padded and masked
SIDE = 32  # latents (4, 8, 8) with the tiny VAE's scale factor 4; 16 tokens after the 2x2 packing


def save_tiny_qwen_image_pipeline(path) -> None:
    """diffusers ``tests/pipelines/qwenimage/test_qwenimage.py`` components, with a 300-token text vocabulary."""
    from diffusers import QwenImagePipeline
    from tiny_models import tiny_qwen_image_parts

    parts = tiny_qwen_image_parts(300, vision_end_token_id=297, vision_start_token_id=298, vision_token_id=299)
    QwenImagePipeline(tokenizer=byte_level_qwen_tokenizer(), **parts).save_pretrained(str(path))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen_image")
    save_tiny_qwen_image_pipeline(path)
    return path


def _policy(path, **options):
    options = {"height": SIDE, "width": SIDE, "max_sequence_length": 64, **options}
    return build_policy("qwen_image", path=str(path), dtype="float32", **options)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_qwen_image_policy_reproduces_the_pipeline(qwen_dir, guidance_scale):
    from diffusers import QwenImagePipeline

    policy = _policy(qwen_dir, guidance_scale=guidance_scale, negative_prompt="ugly")
    assert policy.latent_shape == (4, 8, 8)  # in_channels 16 = 4 latent channels x 2x2 patch
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(prompt=PROMPTS, negative_prompt="ugly" if guidance_scale > 1 else None, height=SIDE,
                          width=SIDE, num_inference_steps=3, true_cfg_scale=guidance_scale, max_sequence_length=64,
                          latents=QwenImagePipeline._pack_latents(x1, 2, 4, 8, 8), output_type="pt").images
        sigmas = policy.pipe.scheduler.sigmas  # the pipeline's grid, shifted by mu of its 16 image tokens
        cond = policy.encode_prompts(PROMPTS)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, sigmas))
    assert cond.prompt_embeds.shape == (2, 64, 16)
    assert ours.shape == ref.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_qwen_image_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download Qwen/Qwen-Image"):
        build_policy("qwen_image", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        build_policy("qwen_image", path=str(tmp_path), dtype="float8")


def test_qwen_image_passes_the_shared_adapter_contract(qwen_dir):
    from adapter_contract import check_policy_contract

    check_policy_contract(_policy(qwen_dir), PROMPTS)


def test_qwen_image_train_writes_the_run_folder(qwen_dir, tmp_path):
    from adapter_contract import mean_brightness

    from flowgrove.config.load import load_config
    from flowgrove.recipes import train as runner
    from flowgrove.rewards.base import register_reward

    try:
        register_reward("test_brightness")(lambda device=None: mean_brightness)
    except ValueError:  # registered by an earlier test in this process
        pass
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na big red dog\n")
    cfg = load_config(None, [
        "policy.name=qwen_image", f"policy.path={qwen_dir}", "policy.dtype=float32",
        f"policy.options={{height: {SIDE}, width: {SIDE}, max_sequence_length: 64}}",
        "rollout.prompts_per_step=1", "rollout.group_size=2", "sampler.num_steps=3", "eval.num_steps=3",
        "eval.samples_per_prompt=1", f"data.train={prompts}", "run.progress=false", "run.device=cpu", "train.steps=2",
        "rewards={test_brightness: 1.0}", f"run.out={tmp_path / 'run'}",
    ])
    runner.train(cfg)
    run = tmp_path / "run"
    assert (run / "samples_before.png").is_file() and (run / "samples_after.png").is_file()
    assert not (run / "samples_after.gif").exists()  # images: a grid only
    assert (run / "summary.json").is_file() and (run / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("kind", ["tree-lora", "window-full"])
def test_qwen_image_tree_and_window_presets_train_and_export(qwen_dir, tmp_path, kind):
    from adapter_contract import TREE, WINDOW, check_full_export, check_pipeline_lora_export, train_and_export
    from diffusers import QwenImageTransformer2DModel

    args = ["policy.name=qwen_image", f"policy.path={qwen_dir}",
            f"policy.options={{height: {SIDE}, width: {SIDE}, max_sequence_length: 64}}"]
    if kind == "tree-lora":
        run, out = train_and_export(tmp_path, TREE, [*args, "policy.lora_rank=4"], "brightness")
        check_pipeline_lora_export(run, out, _policy(qwen_dir), PROMPTS, atol=1e-6)
    else:
        run, out = train_and_export(tmp_path, WINDOW, [*args, "policy.lora_rank=0"], "brightness")
        check_full_export(run, out, QwenImageTransformer2DModel)
