"""Real reward models on tiny random weights: each reward equals its reference route to 1e-5, pixels match exactly.

Every model is built from a config, saved, and loaded back through the reward's own loading code. The references
are the packages themselves where they install without weights (open_clip for HPS-v2.1 and DFN5B, image-reward's
BLIP code and ``ImageReward.score_gard``), transformers' own processor for PickScore / CLIP score / aesthetic, and
the score lines of Flow-GRPO, MixGRPO, DanceGRPO and DiffusionNFT restated below. The test images are the two
photos that ship with scikit-learn (427x640). Real-weight checks are at the end, skipped without the weights.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import reward_references as refs
from flowgrove.rewards import build_reward
from flowgrove.rewards.base import check_reward_inputs
from flowgrove.rewards.preprocess import ImageTransform, clean_prompt, preprocess

transformers = pytest.importorskip("transformers")
PROMPTS = ["A photo of a Chinese temple &amp; trees", "a flower\u2019s   close-up,   in SUNLIGHT"]
# The references' pixel normalisation, typed from open_clip 3.3.0 constants.py (OPENAI_DATASET_MEAN / _STD; the same
# numbers are ImageReward.py's Normalize and the CLIP processors' image_mean / image_std), not imported from flowgrove:
# a wrong constant there must fail these tests.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """The scikit-learn sample photos (china, flower) as ``[2, 3, 427, 640]`` float in [0, 1] on uint8 levels."""
    from sklearn.datasets import load_sample_images

    pixels = np.stack(load_sample_images().images)  # [2, 427, 640, 3] uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """Flow-GRPO's float -> PIL conversion: ``(x * 255).round().clamp(0, 255).uint8``."""
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def normalize_ref(x: torch.Tensor) -> torch.Tensor:
    """torchvision ``Normalize(CLIP_MEAN, CLIP_STD)``."""
    return (x - torch.tensor(CLIP_MEAN).view(-1, 1, 1)) / torch.tensor(CLIP_STD).view(-1, 1, 1)


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    """A transformers ``CLIPTokenizer`` built from open_clip's BPE file (the real 49408-token vocabulary)."""
    _, tokenizer_module = refs.open_clip_modules()
    bpe = Path(tokenizer_module.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = [tuple(m.split()) for m in gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    byte_chars = list(tokenizer_module.bytes_to_unicode().values())
    words = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = transformers.CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges,
                                           unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)
    path = tmp_path_factory.mktemp("clip_tokenizer")
    tokenizer.save_pretrained(path)
    return path


def tiny_clip_config(image_size: int = 28, act: str = "gelu", projection_dim: int = 16):
    """A 2-layer ``CLIPConfig`` with the real vocabulary; ``projection_dim`` in both sub-configs (rewards.md 0.4)."""
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, hidden_act=act, projection_dim=projection_dim, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=14, hidden_act=act, projection_dim=projection_dim)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def tiny_open_clip(image_size: int, quick_gelu: bool):
    """open_clip's own ``CLIP`` at the tiny sizes of ``tiny_clip_config`` (random weights, logit scale log 100)."""
    model_module, _ = refs.open_clip_modules()
    torch.manual_seed(0)
    model = model_module.CLIP(16, model_module.CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=14,
                                                             image_size=image_size),
                              model_module.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4,
                                                       layers=2), quick_gelu=quick_gelu)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.bias", "ln_final.bias")):
                param.add_(0.1 * torch.randn_like(param))  # LayerNorms away from identity
        model.logit_scale.fill_(math.log(100.0))
    return model.eval()


def open_clip_reference(model, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """DanceGRPO / MixGRPO: ``diag(image_features @ text_features.T)`` of open_clip's normalised features."""
    _, tokenizer_module = refs.open_clip_modules()
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)  # [B, D]
        text = model.encode_text(tokenizer_module.SimpleTokenizer()(prompts), normalize=True)  # [B, D]
    return (image @ text.T).diagonal()


def hps_reference_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2 ``preprocess_val`` on the PIL images: ``ToTensor``, ``ResizeMaxSize(size)``, ``Normalize``."""
    resize = refs.ResizeMaxSize(size)
    tensors = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pil_images(images)]
    return torch.stack([normalize_ref(resize(t)) for t in tensors])


def test_open_clip_text_cleaning_gives_open_clip_ids(clip_tokenizer_dir):
    _, tokenizer_module = refs.open_clip_modules()
    hf = transformers.AutoTokenizer.from_pretrained(clip_tokenizer_dir)
    prompts = PROMPTS + ["<b>Bold</b> &quot;quoted&quot; \u201csmart\u201d", "x " * 100]
    ours = hf([clean_prompt(p) for p in prompts], padding="max_length", max_length=77, truncation=True)["input_ids"]
    theirs = tokenizer_module.SimpleTokenizer()(prompts)  # [4, 77], padded with 0
    for row, ref in zip(ours, theirs.tolist()):
        length = ref.index(49407) + 1
        assert row[:length] == ref[:length]
    raw = hf(prompts[:1], padding="max_length", max_length=77)["input_ids"][0]
    assert raw[:12] != theirs[0].tolist()[:12]  # without the clean, "&amp;" is tokenized literally


def test_letterbox_matches_hpsv2_resize_max_size(photos):
    transform = ImageTransform("letterbox", 224, "torch")
    ours = preprocess(photos, transform)
    torch.testing.assert_close(ours, hps_reference_pixels(photos, 224), rtol=0, atol=1e-6)
    # 427x640 -> scale 224/640: 149.45 rounds to 149 rows, 75 rows of padding: 37 above, 38 below.
    black = normalize_ref(torch.zeros(3, 1, 1)).view(3)
    assert torch.equal(ours[0, :, :37, :], black.view(3, 1, 1).expand(3, 37, 224))
    assert torch.equal(ours[0, :, 186:, :], black.view(3, 1, 1).expand(3, 38, 224))
    assert not torch.equal(ours[0, :, 37, :], black.view(3, 1).expand(3, 224))


def test_hpsv2_equals_open_clip(tmp_path, photos, clip_tokenizer_dir):
    reference = tiny_open_clip(56, quick_gelu=False)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = build_reward("hpsv2", weights=tmp_path, config=tiny_clip_config(56), tokenizer=clip_tokenizer_dir,
                          device="cpu", batch_size=1)
    expected = open_clip_reference(reference, hps_reference_pixels(photos, 56), PROMPTS)
    scores = reward(photos, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    # A converted folder loads without the checkpoint and scores the same.
    from flowgrove.rewards.clip_family import convert_open_clip

    folder = convert_open_clip(tmp_path / "HPS_v2.1_compressed.pt", tmp_path / "converted", tiny_clip_config(56))
    again = build_reward("hpsv2", weights=folder, tokenizer=clip_tokenizer_dir, device="cpu")(photos, PROMPTS)
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-5)


def test_clipscore_open_clip_route_equals_open_clip_quick_gelu(tmp_path, photos, clip_tokenizer_dir):
    reference = tiny_open_clip(42, quick_gelu=True)
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    reward = build_reward("clipscore", weights=tmp_path / "open_clip_pytorch_model.bin", open_clip=tiny_clip_config(42, act="quick_gelu"), processor=clip_tokenizer_dir, device="cpu")
    # open_clip's squash transform on PIL: Resize((42, 42), BICUBIC), ToTensor, Normalize.
    pixels = torch.stack([normalize_ref(torch.from_numpy(np.array(p.resize((42, 42), Image.BICUBIC)))
                                        .permute(2, 0, 1).float() / 255) for p in pil_images(photos)])
    torch.testing.assert_close(reward(photos, PROMPTS), open_clip_reference(reference, pixels, PROMPTS),
                               rtol=0, atol=1e-5)


def save_tiny_clip(path: Path, tokenizer_dir: Path, crop: int = 28, projection_dim: int = 16) -> Path:
    """A random ``CLIPModel`` and a ``CLIPProcessor`` (shortest edge = crop, bicubic, OpenAI mean/std) in one folder."""
    torch.manual_seed(1)
    model = transformers.CLIPModel(tiny_clip_config(crop, projection_dim=projection_dim))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore's exp(logit_scale) is about 100
    model.save_pretrained(path)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": crop},
                                                      crop_size={"height": crop, "width": crop}, resample=3,
                                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def features(model, processor, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO ``pickscore_scorer.py``: the processor's pixels and tokens, L2-normalised embeddings."""
    image_inputs = processor(images=pil_images(images), return_tensors="pt")
    text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(**image_inputs)
        text = model.get_text_features(**text_inputs)
    image, text = (x if torch.is_tensor(x) else x.pooler_output for x in (image, text))
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def test_crop_matches_the_transformers_processor_pixel_for_pixel(photos):
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                                resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    expected = processor(images=pil_images(photos), return_tensors="pt")["pixel_values"]
    ours = preprocess(photos, ImageTransform("crop", 224, "pil"))
    assert ours.shape == expected.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # The batched torch resize is the fast path on GPUs; it is close, not equal, to PIL's.
    fast = preprocess(photos, ImageTransform("crop", 224, "torch"))
    assert 0 < (fast - expected).abs().mean() < 0.02


@pytest.mark.parametrize("variant", ["flowgrpo", "mixgrpo", "dancegrpo", "raw"])
def test_pickscore_variants_equal_the_references(tmp_path, photos, clip_tokenizer_dir, variant):
    folder = save_tiny_clip(tmp_path / "pickscore", clip_tokenizer_dir)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    image, text = features(model, processor, photos, PROMPTS)
    s = (model.logit_scale.exp() * text @ image.T).diag().detach()  # [2]
    expected = {"flowgrpo": s / 26, "mixgrpo": (s - 18.0) / 8.0, "dancegrpo": (text @ image.T).diag(), "raw": s}
    reward = build_reward("pickscore", weights=folder, processor=folder, variant=variant, device="cpu", batch_size=1)
    torch.testing.assert_close(reward(photos, PROMPTS), expected[variant], rtol=0, atol=1e-5)
    if variant == "raw":  # s is CLIPModel's logits_per_image diagonal
        inputs = processor(text=PROMPTS, images=pil_images(photos), padding=True, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits_per_image.diagonal(), s, rtol=0, atol=1e-4)


def test_clipscore_nft_and_cosine_equal_the_references(tmp_path, photos, clip_tokenizer_dir):
    folder = save_tiny_clip(tmp_path / "clip", clip_tokenizer_dir)
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=PROMPTS, images=pil_images(photos), padding="max_length", truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        nft = model(**inputs).logits_per_image.diagonal() / 100  # DiffusionNFT clip_scorer.py
    image, text = features(model, processor, photos, PROMPTS)
    for variant, expected in (("nft", nft), ("cosine", (image * text).sum(-1))):
        reward = build_reward("clipscore", weights=folder, variant=variant, device="cpu")
        torch.testing.assert_close(reward(photos, PROMPTS), expected, rtol=0, atol=1e-5)


class AestheticMLP(nn.Module):
    """Copied from flow_grpo ``aesthetic_scorer.py`` (``MLP``; the LAION v2 head, ReLU-free)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embed):
        return self.layers(embed)


def test_aesthetic_equals_flow_grpo_scorer(tmp_path, photos, clip_tokenizer_dir):
    folder = save_tiny_clip(tmp_path / "clip", clip_tokenizer_dir, projection_dim=768)
    torch.manual_seed(2)
    head = AestheticMLP().eval()
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        embed = model.get_image_features(**processor(images=pil_images(photos), return_tensors="pt"))
        embed = embed if torch.is_tensor(embed) else embed.pooler_output
        expected = head(embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)).squeeze(1)
    reward = build_reward("aesthetic", weights=folder, head=tmp_path, device="cpu", batch_size=1)
    torch.testing.assert_close(reward(photos, PROMPTS), expected, rtol=0, atol=1e-5)


TINY_VIT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=16)


def tiny_bert_tokenizer(path: Path):
    words = ["a", "photo", "of", "chinese", "temple", "trees", "flower", "close", "-", "up", ",", "in", "sunlight",
             "&", "amp", ";", "'", "s"]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    return path


def test_imagereward_equals_the_image_reward_package(tmp_path, photos):
    vit, med, image_reward = refs.image_reward_modules()
    tokenizer_dir = tiny_bert_tokenizer(tmp_path / "bert")
    med_json = dict(architectures=["BertModel"], vocab_size=122 + 2, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=37, max_position_embeddings=40, hidden_act="gelu",
                    layer_norm_eps=1e-12, pad_token_id=0, add_cross_attention=True, type_vocab_size=2)
    (tmp_path / "med_config.json").write_text(json.dumps(med_json))

    def tiny_blip(**kwargs):  # BLIP_Pretrain's modules at tiny sizes (create_vit("large") with these widths)
        blip = nn.Module()
        blip.visual_encoder = vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                                                    use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0)
        config = med.BertConfig.from_json_file(str(tmp_path / "med_config.json"))
        config.encoder_width = 64
        blip.text_encoder = med.BertModel(config=config, add_pooling_layer=False)
        blip.vision_proj, blip.text_proj = nn.Linear(64, 16), nn.Linear(32, 16)
        return blip

    torch.manual_seed(3)
    image_reward.BLIP_Pretrain = tiny_blip
    reference = image_reward.ImageReward(med_config=str(tmp_path / "med_config.json"), device="cpu")
    reference.mlp = image_reward.MLP(32)  # MLP(768) for BERT-base; the tiny text width is 32
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "ImageReward.pt")

    reward = build_reward("imagereward", weights=tmp_path / "ImageReward.pt", tokenizer=tokenizer_dir,
                          vision_config=TINY_VIT, device="cpu", batch_size=1)
    # ImageReward._transform(32) on PIL: Resize(32, BICUBIC) -> 32x47, CenterCrop(32) (offset round(7.5) = 8).
    crops = [p.resize((47, 32), Image.BICUBIC).crop((8, 0, 40, 32)) for p in pil_images(photos)]
    pixels = torch.stack([normalize_ref(torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 255) for c in crops])
    torch.testing.assert_close(preprocess(photos, reward.transform), pixels, rtol=0, atol=1e-6)
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"][:, 0].tolist() == [reward.tokenizer.cls_token_id] * 2
    with torch.no_grad():
        expected = reference.score_gard(tokens["input_ids"], tokens["attention_mask"], pixels).squeeze(1)
    scores = reward(photos, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


def test_reward_inputs_must_be_images_in_unit_range():
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values in \[-1, 1\]"):
        check_reward_inputs(torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2), ["a"])
    with pytest.raises(ValueError, match=r"got values in \[nan"):
        check_reward_inputs(torch.full((1, 3, 2, 2), float("nan")), ["a"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        check_reward_inputs(torch.rand(3, 8, 8), ["a"])


def test_missing_weights_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_reward("hpsv2", weights=tmp_path)
    message = str(error.value)
    assert "\n" not in message and "HPS_v2.1_compressed.pt" in message and str(tmp_path) in message
    assert "https://huggingface.co/xswu/HPSv2" in message
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth not found at .*improved-aesth"):
        from flowgrove.rewards.clip_family import AESTHETIC_HEAD
        from flowgrove.rewards.weights import weight_file

        weight_file(tmp_path, AESTHETIC_HEAD, "aesthetic")
    # Offline with an empty cache: the hub defaults are looked up in the cache only, and the error names them.
    script = ("from flowgrove.rewards import build_reward\n"
              "for name in ('pickscore', 'imagereward', 'hpsv2'):\n"
              "    try: build_reward(name, device='cpu')\n"
              "    except FileNotFoundError as e: print(str(e).replace(chr(10), ' NEWLINE '))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and not any("NEWLINE" in line for line in lines), out.stdout + out.stderr
    assert "yuvalkirstain/PickScore_v1" in lines[0] and "ImageReward.pt" in lines[1] and "xswu/HPSv2" in lines[2]


REAL = os.environ.get("FLOWGROVE_REAL_REWARDS") == "1"
real_weights = pytest.mark.skipif(not REAL, reason="needs the real reward weights in the HF cache (no downloads in "
                                                   "tests); set FLOWGROVE_REAL_REWARDS=1 where they are cached")


@real_weights
@pytest.mark.slow
@pytest.mark.parametrize("name, low, high", [("hpsv2", 0.1, 0.4), ("pickscore", 0.5, 1.0), ("imagereward", -2.5, 2.5),
                                             ("clipscore", 0.1, 0.45)])
def test_real_weights_score_in_the_published_ranges(photos, name, low, high):
    # DanceGRPO README: HPS-v2.1 about 0.25-0.33 on FLUX images; PickScore s about 18-23, so s / 26 about 0.7-0.9.
    scores = build_reward(name)(photos, ["a photo of a chinese temple", "a photo of a flower"])
    assert bool(((scores > low) & (scores < high)).all()), scores


@real_weights
@pytest.mark.slow
def test_real_aesthetic_head(photos):
    head = os.environ.get("FLOWGROVE_AESTHETIC_HEAD")
    if not head:
        pytest.skip("set FLOWGROVE_AESTHETIC_HEAD to sac+logos+ava1-l14-linearMSE.pth")
    scores = build_reward("aesthetic", head=head)(photos, ["", ""])
    assert bool(((scores > 2) & (scores < 9)).all()), scores
