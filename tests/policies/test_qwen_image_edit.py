"""The qwen_image_edit policy: a tiny diffusers QwenImageEditPipeline (diffusers' own test configs; the processor's
image part built alone, no torchvision) saved, loaded, sampled against the pipeline with each prompt's input image
(with and without CFG), trained through the CLI from a prompt file with an image column and exported back; the same
for a tiny QwenImageEditPlusPipeline (Qwen-Image-Edit-2511's ``zero_cond_t`` transformer) with two input images per
prompt."""

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


def save_tiny_qwen_image_edit(path, plus: bool = False) -> None:
    """diffusers ``tests/pipelines/qwenimage/test_qwenimage_edit.py`` components (its transformer, VAE and
    Qwen2.5-VL config) with a byte-level tokenizer holding the template's special tokens, built in code. The
    ``processor/`` folder holds what the real one does for images (``preprocessor_config.json``, the tokenizer)
    and ``model_index.json`` names ``Qwen2VLProcessor`` as the real folder does. ``plus``: a
    ``QwenImageEditPlusPipeline`` folder with 2511's ``zero_cond_t`` transformer."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from tiny_models import tiny_qwen_image_parts
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = byte_level_qwen_tokenizer(SPECIALS)
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(SPECIALS[2:]))
    parts = tiny_qwen_image_parts(len(tokenizer), zero_cond_t=plus, vision_start_token_id=start,
                                  vision_end_token_id=end, image_token_id=image, video_token_id=video)
    pipeline = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipeline(tokenizer=tokenizer, processor=None, **parts).save_pretrained(str(path))
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


# ---- QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 / 2511): several input images per prompt -------------------

CONDITION = 32  # the text encoder's copies: area 32^2 (the pipeline's 384^2), 4 vision tokens each


@pytest.fixture(scope="module")
def edit_plus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen_edit_plus")
    save_tiny_qwen_image_edit(root / "model", plus=True)
    return root / "model", read_prompts(write_edit_prompts(root, side=IMAGE, per_row=2))


def _plus_policy(folder, **options):
    return _policy(folder, condition_area=CONDITION * CONDITION, **options)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_qwen_image_edit_plus_reproduces_the_pipeline_on_each_row_with_its_input_images(edit_plus, monkeypatch,
                                                                                          guidance_scale):
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
    from PIL import Image

    from flowgrove.policies.qwen_image_edit import QwenImageEditPlusPolicy

    folder, prompts = edit_plus
    policy = _plus_policy(folder, guidance_scale=guidance_scale, negative_prompt="ugly")
    assert isinstance(policy, QwenImageEditPlusPolicy) and isinstance(policy.pipe, QwenImageEditPlusPipeline)
    assert policy.pipe.transformer.config.zero_cond_t
    # the pipeline's sizes are 384^2 (text encoder) and 1024^2 (VAE) module constants: the tiny test's are smaller
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", CONDITION ** 2)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", IMAGE ** 2)
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    refs = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):  # the pipeline takes one prompt per call
            images = [Image.open(path).convert("RGB") for path in prompt.metadata["images"]]
            refs.append(policy.pipe(image=images, prompt=str(prompt), height=SIDE, width=SIDE,
                                    negative_prompt="ugly" if guidance_scale > 1 else None,
                                    true_cfg_scale=guidance_scale, num_inference_steps=3, output_type="pt",
                                    latents=QwenImageEditPlusPipeline._pack_latents(x1[i:i + 1], 1, 4, 8, 8)).images)
        cond = policy.encode_prompts(prompts)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, policy.pipe.scheduler.sigmas))
    assert cond.image_latents.shape == (2, 2 * 64, 16)  # two images' 8x8 tokens one after the other
    assert (cond.negative_prompt_embeds is not None) == (guidance_scale > 1)
    torch.testing.assert_close(ours, torch.cat(refs), atol=1e-5, rtol=0)


def test_qwen_image_edit_plus_passes_the_shared_adapter_contract(edit_plus):
    from adapter_contract import check_policy_contract

    folder, prompts = edit_plus
    check_policy_contract(_plus_policy(folder, guidance_scale=4.0), prompts)


def test_qwen_image_edit_plus_errors_say_what_to_do(edit, edit_plus):
    from flowgrove.messages import ConfigError

    folder, prompts = edit_plus
    one = Prompt("a cat", {"image": prompts[0].metadata["image"]})
    with pytest.raises(ValueError, match=r"one number of input images, but prompt 'make it red' has 2 and 'a cat' 1"):
        _plus_policy(folder).encode_prompts([prompts[0], one])
    with pytest.raises(ValueError, match=r"qwen_image_edit takes one input image per prompt, but prompt 'make it red' "
                                         r"has 2; give one image per row"):
        _policy(edit[0]).encode_prompts(prompts)
    with pytest.raises(ConfigError, match=r"policy.options.condition_area .* holds a QwenImageEditPipeline, .* drop"):
        _plus_policy(edit[0])


def test_qwen_image_edit_plus_trains_lora_from_two_images_per_row_and_exports(edit_plus, tmp_path):
    from adapter_contract import check_edit_presets
    from diffusers import QwenImageTransformer2DModel

    folder, prompts = edit_plus
    args = ["policy.name=qwen_image_edit", f"policy.path={folder}", f"policy.options={{height: {SIDE}, width: {SIDE}, "
            f"max_sequence_length: {TOKENS}, image_area: {IMAGE * IMAGE}, condition_area: {CONDITION * CONDITION}}}"]
    prompt_file = write_edit_prompts(tmp_path, side=IMAGE, per_row=2)
    check_edit_presets("tree-lora", tmp_path, args, prompt_file, lambda: _plus_policy(folder), prompts,
                       QwenImageTransformer2DModel)
