"""``clip_direction``: CLIP directional similarity of an edit on a tiny random CLIP (built from config, saved, loaded
through the reward's own loader), against the formula restated on transformers' own processor; the input image
comes from the prompt row, through the trainer."""

from __future__ import annotations

import json

import pytest
import torch

from flowgrove.config.load import load_config
from flowgrove.rewards import build_reward
from flowgrove.training.prompts import Prompt, read_prompts
from flowgrove.training.trainer import GRPOTrainer

from conftest import TinyPolicy
from test_rewards_models import CLIP_MEAN, CLIP_STD, features, photos  # noqa: F401 (a fixture)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random 2-layer ``CLIPModel`` (text: tiny_models' config and letter tokenizer) and its ``CLIPProcessor``
    (shortest edge 28, bicubic, OpenAI mean/std) in one folder."""
    from tiny_models import tiny_clip_config, tiny_tokenizers

    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(1)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=28,
                  patch_size=14, projection_dim=32)
    config = transformers.CLIPConfig(text_config=tiny_clip_config().to_dict(), vision_config=vision, projection_dim=32)
    transformers.CLIPModel(config).save_pretrained(path)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                      resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizers()[0]).save_pretrained(path)
    return path


def _edit_rows(tmp_path, photos, captions=None):  # noqa: F811
    """The two photos as input images on disk (PNG, uint8 levels) and a jsonl file naming them."""
    from test_rewards_models import pil_images

    for i, image in enumerate(pil_images(photos)):
        image.save(tmp_path / f"in{i}.png")
    rows = [{"prompt": p, "image": f"in{i}.png", **(captions[i] if captions else {})}
            for i, p in enumerate(["make it a snowy temple", "turn the flower blue"])]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_prompts(tmp_path / "edits.jsonl")


def test_clip_direction_equals_the_formula_on_the_processor(tmp_path, photos, tiny_clip):  # noqa: F811
    folder = tiny_clip
    captions = [{"input_caption": "a temple", "output_caption": "a snowy temple"}, {}]
    photos = photos[..., 100:196, 200:296]  # [2, 3, 96, 96] crops: small and fast
    prompts = _edit_rows(tmp_path, photos, captions)
    outputs = photos.flip(-1) * 0.8  # [2, 3, H, W] "edits": mirrored and darker
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    out_img, after = features(model, processor, outputs, ["a snowy temple", "turn the flower blue"])
    in_img, before = features(model, processor, photos, ["a temple", ""])
    image_dir, text_dir = out_img - in_img, after - before
    image_dir, text_dir = (d / d.norm(dim=-1, keepdim=True) for d in (image_dir, text_dir))
    expected = (image_dir * text_dir).sum(-1)
    reward = build_reward("clip_direction", weights=folder, device="cpu", batch_size=1)
    torch.testing.assert_close(reward(outputs, prompts), expected, rtol=0, atol=1e-5)
    assert sorted(reward.inputs) == sorted(p.metadata["image"] for p in prompts)  # each input embedded once
    # an unchanged image has no direction; swapping the input images changes the scores
    torch.testing.assert_close(reward(photos, prompts), torch.zeros(2), rtol=0, atol=1e-6)
    swapped = [Prompt(str(p), {**p.metadata, "image": q.metadata["image"]}) for p, q in zip(prompts, prompts[::-1])]
    assert (reward(outputs, swapped) - reward(outputs, prompts)).abs().min() > 1e-4
    with pytest.raises(ValueError, match=r"clip_direction compares an edit with its input image: prompt 'a cat'"):
        reward(outputs[:1], [Prompt("a cat")])


def test_clip_direction_receives_each_rows_input_image_through_the_trainer(tmp_path, photos, tiny_clip):  # noqa: F811
    folder = tiny_clip
    prompts = _edit_rows(tmp_path, photos[..., :64, :64])
    reward = build_reward("clip_direction", weights=folder, device="cpu")
    seen: list = []

    def recording(images, rows):
        seen.append([(r.metadata["image"], float(s)) for r, s in zip(rows, reward(images, rows))])
        return reward(images, rows)

    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=2", "train.micro_batch=1000",
                             "rewards={clip_direction: 1.0}"])
    GRPOTrainer(cfg, TinyPolicy(), {"clip_direction": recording}, prompts).step()
    assert {path for path, _ in seen[-1]} == {p.metadata["image"] for p in prompts}
    assert set(reward.inputs) == {p.metadata["image"] for p in prompts}
    assert all(-1 <= s <= 1 for _, s in seen[-1]) and len({round(s, 6) for _, s in seen[-1]}) > 1
