"""The flux_kontext policy: a tiny diffusers FluxKontextPipeline (diffusers' own test configs) saved, loaded and
sampled against the pipeline with each prompt's input image, trained through the CLI from a prompt file with an
image column, cached by ``encode-prompts`` and exported back into diffusers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("diffusers")

from flowgrove.policies import build_policy  # noqa: E402
from flowgrove.samplers import sample_euler  # noqa: E402
from flowgrove.training.prompts import Prompt, read_prompts  # noqa: E402

SIDE = 16  # latents (1, 16, 16) with the one-block VAE (scale 1): 64 latent tokens and 64 input-image tokens
TOKENS = 16  # max_sequence_length


def save_tiny_kontext(path) -> None:
    """diffusers ``tests/pipelines/flux/test_pipeline_flux_kontext.py`` components: its FLUX transformer (guidance
    embedded, as FLUX.1 Kontext [dev]), the one-block VAE, tiny CLIP and T5 with tokenizers built in code."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    from test_policies import _tiny_flux
    from tiny_models import tiny_clip_config, tiny_t5, tiny_tokenizers, tiny_vae
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    vae, clip, t5 = tiny_vae(1), CLIPTextModel(tiny_clip_config()), tiny_t5()
    clip_tok, t5_tok = tiny_tokenizers()
    FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=_tiny_flux(True)).save_pretrained(str(path))


def write_edit_prompts(folder, count: int = 2, side: int = SIDE, per_row: int = 1):
    """``count`` rows of ``per_row`` random square RGB input images each (the ``j``-th ``side + 32 j`` pixels wide)
    and a jsonl prompt file naming them relative to itself (several: a list)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        names = [f"inputs/{i}.png"] + [f"inputs/{i}_{j}.png" for j in range(1, per_row)]
        for j, name in enumerate(names):
            width = side + 32 * j
            Image.fromarray(rng.integers(0, 256, (width, width, 3), dtype=np.uint8)).save(folder / name)
        rows.append(json.dumps({"prompt": ["make it red", "a big dog instead"][i % 2],
                                "image": names[0] if per_row == 1 else names}))
    (folder / "edits.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "edits.jsonl"


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_kontext")
    save_tiny_kontext(root / "model")
    return root / "model", read_prompts(write_edit_prompts(root))


def _policy(folder, **options):
    return build_policy("flux_kontext", path=str(folder), dtype="float32",
                        **{"height": SIDE, "width": SIDE, "max_sequence_length": TOKENS, **options})


def test_flux_kontext_reproduces_the_pipeline_with_each_prompts_input_image(kontext):
    import numpy as np
    from PIL import Image

    folder, prompts = kontext
    policy = _policy(folder)
    assert policy.latent_shape == (1, SIDE, SIDE) and policy.adapter.guidance == 2.5
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p.metadata["image"]))).permute(2, 0, 1) / 255.0
                          for p in prompts])  # [2, 3, S, S] in [0, 1]: a different input image per prompt
    x1 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # max_area and _auto_resize=False keep the pipeline at SIDE x SIDE (else 1024^2 and Kontext's resolutions)
        ref = policy.pipe(prompt=[str(p) for p in prompts], image=pixels, height=SIDE, width=SIDE, max_area=SIDE * SIDE,
                          _auto_resize=False, num_inference_steps=3, guidance_scale=2.5, max_sequence_length=TOKENS,
                          latents=policy.pipe._pack_latents(x1, 2, 1, SIDE, SIDE), output_type="pt").images
        cond = policy.encode_prompts(prompts)
        ours = policy.decode(sample_euler(lambda x, s: policy.velocity(x, s, cond), x1, policy.pipe.scheduler.sigmas))
    assert cond.image_latents.shape == (2, (SIDE // 2) ** 2, 4)  # [B, HW/4, 4C]
    assert ours.shape == ref.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    swapped = dataclasses.replace(cond, image_latents=cond.image_latents.flip(0))  # each text, the other's image
    with torch.no_grad():
        v, v_swapped = (policy.velocity(x1, torch.tensor([0.7, 0.7]), c) for c in (cond, swapped))
    assert (v - v_swapped).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every row's velocity depends on its image


def test_flux_kontext_passes_the_shared_adapter_contract(kontext):
    from adapter_contract import check_policy_contract

    folder, prompts = kontext
    check_policy_contract(_policy(folder), prompts)


def test_a_prompt_without_an_input_image_and_a_missing_folder_say_what_to_do(kontext, tmp_path):
    folder, _ = kontext
    with pytest.raises(ValueError, match=r"flux_kontext edits an input image: prompt 'a cat' has none; .*\"image\""):
        _policy(folder).encode_prompts([Prompt("a cat")])
    with pytest.raises(FileNotFoundError, match="hf download black-forest-labs/FLUX.1-Kontext-dev"):
        build_policy("flux_kontext", path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dtype"):
        build_policy("flux_kontext", path=str(folder), dtype="float8")


def test_encode_prompts_caches_the_input_images(kontext, tmp_path):
    from flowgrove import cli
    from flowgrove.training.prompts import CachedPrompts

    folder, prompts = kontext
    source = write_edit_prompts(tmp_path)
    assert cli.main(["encode-prompts", str(source), "--policy", "flux_kontext", f"policy.path={folder}",
                     "policy.dtype=float32", f"policy.options={{height: {SIDE}, width: {SIDE}, max_sequence_length: "
                     f"{TOKENS}}}", "--out", str(tmp_path / "cache")]) == 0
    cache = CachedPrompts(tmp_path / "cache")
    assert "image_latents" in cache.index["fields"]
    rows = cache.rows(torch.tensor([1, 0]))
    direct = _policy(folder).encode_prompts(prompts).select(torch.tensor([1, 0]))
    torch.testing.assert_close(rows.image_latents, direct.image_latents, atol=0, rtol=0)
    assert [p.metadata["image"] for p in cache.prompts()] == [p.metadata["image"] for p in read_prompts(source)]


@pytest.mark.parametrize("kind", ["tree-lora", "window-full"])
def test_flux_kontext_tree_and_window_presets_train_and_export(kontext, tmp_path, kind):
    from adapter_contract import check_edit_presets
    from diffusers import FluxTransformer2DModel

    folder, prompts = kontext
    args = ["policy.name=flux_kontext", f"policy.path={folder}",
            f"policy.options={{height: {SIDE}, width: {SIDE}, max_sequence_length: {TOKENS}}}"]
    check_edit_presets(kind, tmp_path, args, write_edit_prompts(tmp_path), lambda: _policy(folder), prompts,
                       FluxTransformer2DModel)
