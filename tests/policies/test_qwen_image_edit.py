"""The qwen_image_edit policy: a tiny diffusers QwenImageEditPipeline (diffusers' own test configs; the processor's
image part built alone, no torchvision) saved, loaded, sampled against the pipeline with each prompt's input image
(with and without CFG), trained through the CLI from a prompt file with an image column and exported back."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402
from flowgrove.training.prompts import Prompt, read_prompts  # noqa: E402
from test_flux_kontext import write_edit_prompts  # noqa: E402
from tiny_models import byte_level_qwen_tokenizer  # noqa: E402

SIDE = 32  # latents (4, 8, 8) with the tiny VAE's scale 4: 16 tokens
IMAGE = 64  # input images 64x64 (image_area 64^2): 64 input-image tokens, 4 vision tokens in the text encoder
TOKENS = 320  # max_sequence_length: the template's byte tokens after the first 64, 4 image tokens, the prompt
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def save_tiny_qwen_image_edit(path) -> None:
    """diffusers ``tests/pipelines/qwenimage/test_qwenimage_edit.py`` components (its transformer, VAE and
    Qwen2.5-VL config) with a byte-level tokenizer holding the template's special tokens, built in code. The
    ``processor/`` folder holds what the real one does for images (``preprocessor_config.json``, the tokenizer)
    and ``model_index.json`` names ``Qwen2VLProcessor`` as the real folder does."""
    from diffusers import QwenImageEditPipeline
    from tiny_models import tiny_qwen_image_parts
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = byte_level_qwen_tokenizer(SPECIALS)
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(SPECIALS[2:]))
    parts = tiny_qwen_image_parts(len(tokenizer), vision_start_token_id=start, vision_end_token_id=end,
                                  image_token_id=image, video_token_id=video)
    QwenImageEditPipeline(tokenizer=tokenizer, processor=None, **parts).save_pretrained(str(path))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64).save_pretrained(str(path / "processor"))
    tokenizer.save_pretrained(str(path / "processor"))
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "processor": ["transformers", "Qwen2VLProcessor"]}))


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen_edit")
    save_tiny_qwen_image_edit(root / "model")
    return root / "model", read_prompts(write_edit_prompts(root, side=IMAGE))


def _policy(folder, **options):
    options = {"height": SIDE, "width": SIDE, "max_sequence_length": TOKENS, "image_area": IMAGE * IMAGE, **options}
    return build_policy("qwen_image_edit", path=str(folder), dtype="float32", **options)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_qwen_image_edit_reproduces_the_pipeline_with_each_prompts_input_image(edit, monkeypatch, guidance_scale):
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
    from PIL import Image

    folder, prompts = edit
    policy = _policy(folder, guidance_scale=guidance_scale, negative_prompt="ugly")
    assert policy.latent_shape == (4, 8, 8) and policy.image_grid == (8, 8)
    # the pipeline sizes the input image for an area of 1024^2 (its own function): the tiny test uses 64^2
    full_size = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                        lambda area, ratio: full_size(IMAGE ** 2, ratio))
    images = [Image.open(p.metadata["image"]).convert("RGB") for p in prompts]  # a different image per prompt
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = policy.pipe(image=images, prompt=[str(p) for p in prompts], height=SIDE, width=SIDE,
                          negative_prompt=["ugly"] * 2 if guidance_scale > 1 else None, true_cfg_scale=guidance_scale,
                          num_inference_steps=3, latents=QwenImageEditPipeline._pack_latents(x1, 2, 4, 8, 8),
                          output_type="pt").images
        cond = policy.encode_prompts(prompts)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, policy.pipe.scheduler.sigmas))
    assert cond.image_latents.shape == (2, 64, 16) and cond.prompt_embeds.shape == (2, TOKENS, 16)
    assert (cond.negative_prompt_embeds is not None) == (guidance_scale > 1)
    assert ours.shape == ref.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_qwen_image_edit_passes_the_shared_adapter_contract(edit):
    from adapter_contract import check_policy_contract

    folder, prompts = edit
    check_policy_contract(_policy(folder, guidance_scale=4.0), prompts)


def test_qwen_image_edit_errors_say_what_to_do(edit, tmp_path):
    folder, prompts = edit
    policy = _policy(folder)
    with pytest.raises(ValueError, match=r"qwen_image_edit edits an input image: prompt 'a cat' has none"):
        policy.encode_prompts([Prompt("a cat")])
    with pytest.raises(ValueError, match=r"max_sequence_length=64 is shorter than the (\d+) text and image tokens"):
        _policy(folder, max_sequence_length=64).encode_prompts(prompts)
    with pytest.raises(FileNotFoundError, match="hf download Qwen/Qwen-Image-Edit"):
        build_policy("qwen_image_edit", path=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kind", ["tree-lora", "window-full"])
def test_qwen_image_edit_tree_and_window_presets_train_and_export(edit, tmp_path, kind):
    from adapter_contract import check_edit_presets
    from diffusers import QwenImageTransformer2DModel

    folder, prompts = edit
    args = ["policy.name=qwen_image_edit", f"policy.path={folder}", f"policy.options={{height: {SIDE}, width: {SIDE}, "
            f"max_sequence_length: {TOKENS}, image_area: {IMAGE * IMAGE}}}"]
    check_edit_presets(kind, tmp_path, args, write_edit_prompts(tmp_path, side=IMAGE), lambda: _policy(folder), prompts,
                       QwenImageTransformer2DModel)
