"""CLIP-family rewards: ``hpsv2``, ``pickscore``, ``clipscore`` and ``aesthetic`` (rewards.md sections 1, 2, 4, 5).

Each is ``score(normalize(f_img), normalize(f_txt))`` or a head on ``normalize(f_img)``, with the reference's
preprocessing (``flowgrove.rewards.preprocess``) and its score scale (``ScoreScale``). Models load through
transformers (open_clip checkpoints through ``clip_convert``); transformers is imported inside the factories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowgrove.rewards.base import register_reward, reward_device, score_in_batches
from flowgrove.rewards.clip_convert import load_open_clip_model, vit_h14_config
from flowgrove.rewards.preprocess import ImageTransform, clean_prompt, preprocess, transform_from_processor
from flowgrove.rewards.weights import Published, from_pretrained, load_state_dict, weight_file

LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # tokenizer and processor of HPS-v2.1, PickScore, DFN5B
OPENAI_L14 = "openai/clip-vit-large-patch14"
HPS_WEIGHTS = Published("xswu/HPSv2", "HPS_v2.1_compressed.pt", "weights")
HPS_TOKENIZER = Published(LAION_H14, None, "tokenizer")
PICKSCORE_MODEL = Published("yuvalkirstain/PickScore_v1", None, "weights")
PICKSCORE_PROCESSOR = Published(LAION_H14, None, "processor")
OPENAI_CLIP = Published(OPENAI_L14, None, "weights")
DFN5B_WEIGHTS = Published("apple/DFN5B-CLIP-ViT-H-14-378", "open_clip_pytorch_model.bin", "weights")
AESTHETIC_HEAD = Published("https://github.com/christophschuhmann/improved-aesthetic-predictor/blob/main/"
                           "sac%2Blogos%2Bava1-l14-linearMSE.pth (also flow_grpo/assets)",
                           "sac+logos+ava1-l14-linearMSE.pth", "head")


class ScoreScale(NamedTuple):
    """``((exp(logit_scale) if use_logit_scale else 1) * cos - shift) / divide``."""

    use_logit_scale: bool
    shift: float = 0.0
    divide: float = 1.0


COSINE = ScoreScale(False)
PICKSCORE_VARIANTS = {
    "flowgrpo": ScoreScale(True, 0.0, 26.0),  # flow_grpo pickscore_scorer.py (also DiffusionNFT): s / 26
    "mixgrpo": ScoreScale(True, 18.0, 8.0),  # MixGRPO pick_score.py: (s - 18) / 8
    "dancegrpo": COSINE,  # DanceGRPO --use_pickscore: text_embs @ image_embs.T, no logit scale
    "raw": ScoreScale(True),  # s = exp(logit_scale) * cos = logits_per_image.diag()
}
CLIPSCORE_VARIANTS = {
    "cosine": COSINE,  # MixGRPO clip_score.py (DFN5B)
    "nft": ScoreScale(True, 0.0, 100.0),  # DiffusionNFT clip_scorer.py: logits_per_image.diagonal() / 100
}


def scaled_cosine(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, scale: ScoreScale) -> Tensor:
    """Row-wise ``scale`` of the cosine between ``image_emb [B, D]`` and ``text_emb [B, D]``; returns ``[B]``."""
    cos = (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)  # [B]
    factor = logit_scale.float().exp() if scale.use_logit_scale else 1.0
    return (factor * cos - scale.shift) / scale.divide


def pooled(output: Any) -> Tensor:
    """The projected embedding of ``get_*_features``: a tensor before transformers v5, ``.pooler_output`` after."""
    return output if torch.is_tensor(output) else output.pooler_output


def linear_head(state_dict: dict[str, Tensor]) -> nn.Sequential:
    """The aesthetic / ImageReward MLP from its weights: ``Linear`` at the stored indices, identity between.

    The LAION ``sac+logos+ava1-l14-linearMSE`` head and ImageReward's ``MLP`` store ``layers.{0,2,4,6,7}``
    (their ReLUs are commented out; the gaps are dropouts), so in eval mode the head is one affine map.
    """
    indices = sorted(int(k.split(".")[1]) for k in state_dict if k.endswith(".weight"))
    modules: list[nn.Module] = [nn.Identity() for _ in range(indices[-1] + 1)]
    for i in indices:
        out_features, in_features = state_dict[f"layers.{i}.weight"].shape
        modules[i] = nn.Linear(in_features, out_features)
    head = nn.Sequential(*modules)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state_dict.items()}, strict=True)
    return head.eval().requires_grad_(False)


class Run(NamedTuple):
    """Where and how a reward model runs."""

    device: torch.device
    batch_size: int  # images per forward pass
    autocast: bool = False  # fp16 autocast on CUDA


class TextImageScorer:
    """``scaled_cosine`` of a ``CLIPModel``'s image and text embeddings, one micro-batch at a time."""

    def __init__(self, model: Any, tokenizer: Any, transform: ImageTransform, scale: ScoreScale, *,
                 clean_text: bool, run: Run) -> None:
        self.model, self.tokenizer, self.transform, self.scale = model.to(run.device), tokenizer, transform, scale
        self.clean_text, self.run, self.device = clean_text, run, run.device
        self.max_length = model.config.text_config.max_position_embeddings

    def image_features(self, images: Tensor) -> Tensor:
        """Projected embeddings ``[b, D]`` of images ``[b, 3, H, W]`` in [0, 1] (the reward's preprocessing)."""
        pixels = preprocess(images.to(self.device), self.transform)  # [b, 3, S, S]
        return pooled(self.model.get_image_features(pixel_values=pixels))  # [b, D]

    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Projected embeddings ``[b, D]`` of ``texts`` (cleaned first when ``clean_text``)."""
        texts = [clean_prompt(t) for t in texts] if self.clean_text else [str(t) for t in texts]
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        return pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                   attention_mask=tokens["attention_mask"]))  # [b, D]

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[b]`` scores of images ``[b, 3, H, W]`` on the model's device."""
        image_emb, text_emb = self.image_features(images), self.text_features(prompts)  # [b, D], [b, D]
        return scaled_cosine(image_emb, text_emb, self.model.logit_scale, self.scale)  # [b]

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return score_in_batches(self.score, images, prompts, batch_size=self.run.batch_size, device=self.device,
                                autocast=self.run.autocast)


class AestheticScorer:
    """LAION aesthetic v2: ``head(normalize(image_embeds))`` on CLIP ViT-L/14 (Flow-GRPO ``aesthetic_scorer.py``)."""

    def __init__(self, vision: Any, head: nn.Module, transform: ImageTransform, *, device: torch.device,
                 batch_size: int) -> None:
        self.vision, self.head, self.transform = vision.to(device), head.to(device), transform
        self.device, self.batch_size = device, batch_size

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[b]`` raw aesthetic scores (about 1-10) of images ``[b, 3, H, W]``; prompts unused."""
        embeds = self.vision(pixel_values=preprocess(images, self.transform)).image_embeds  # [b, 768]
        return self.head(F.normalize(embeds.float(), dim=-1)).squeeze(-1)  # [b]

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return score_in_batches(self.score, images, prompts, batch_size=self.batch_size, device=self.device)


def _clip_tokenizer(path: str | Path | None, published: Published, reward: str) -> Any:
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer.from_pretrained, path, published, reward)


def _processor(path: str | Path | None, published: Published, reward: str) -> Any:
    from transformers import AutoProcessor

    return from_pretrained(AutoProcessor.from_pretrained, path, published, reward)


@register_reward("hpsv2")
def hpsv2(weights: str | Path | None = None, config: Any = None, tokenizer: str | Path | None = None,
          device: str | torch.device | None = None, batch_size: int = 16, autocast: bool = True,
          backend: str = "torch") -> TextImageScorer:
    """HPS-v2.1: cosine of open_clip ViT-H-14 embeddings, letterboxed images, open_clip text cleaning.

    Args:
        weights: ``HPS_v2.1_compressed.pt`` (or its folder), a folder from ``convert_open_clip``, or None
            for the HF cache (``xswu/HPSv2``).
        config: A ``CLIPConfig`` or a path to one for the checkpoint; None: ViT-H-14 (``vit_h14_config``).
        tokenizer: A CLIP tokenizer folder; None: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` from the HF cache.
        device: Where the model runs (default CUDA when available).
        batch_size: Images per forward pass.
        autocast: fp16 autocast on CUDA, as DanceGRPO and MixGRPO run it.
        backend: Letterbox resize: ``"torch"`` (the references' tensor resize) or ``"pil"``.
    """
    model = load_open_clip_model(weights, vit_h14_config() if config is None else config, HPS_WEIGHTS, "hpsv2")
    transform = ImageTransform("letterbox", model.config.vision_config.image_size, backend)  # type: ignore[arg-type]
    return TextImageScorer(model, _clip_tokenizer(tokenizer, HPS_TOKENIZER, "hpsv2"), transform, COSINE,
                           clean_text=True, run=Run(reward_device(device), batch_size, autocast))


@register_reward("pickscore")
def pickscore(weights: str | Path | None = None, processor: str | Path | None = None, variant: str = "flowgrpo",
              device: str | torch.device | None = None, batch_size: int = 16, autocast: bool = False,
              backend: str = "pil") -> TextImageScorer:
    """PickScore v1: ``s = exp(logit_scale) * cos`` scaled as ``variant`` (``PICKSCORE_VARIANTS``).

    Args:
        weights: A ``CLIPModel`` folder; None: ``yuvalkirstain/PickScore_v1`` from the HF cache.
        processor: A ``CLIPProcessor`` folder (tokenizer + image processor); None: the laion H/14 one.
        variant: ``flowgrpo`` (s / 26), ``mixgrpo`` ((s - 18) / 8), ``dancegrpo`` (cos) or ``raw`` (s).
        device: Where the model runs (default CUDA when available).
        batch_size: Images per forward pass.
        autocast: fp16 autocast on CUDA (the references run PickScore in float32).
        backend: ``"pil"`` (the processor's pixels) or ``"torch"`` (batched on the device, about 1e-3 off).
    """
    from transformers import CLIPModel

    scale = _variant(PICKSCORE_VARIANTS, variant, "pickscore")
    model = from_pretrained(CLIPModel.from_pretrained, weights, PICKSCORE_MODEL, "pickscore").eval().requires_grad_(False)
    proc = _processor(processor, PICKSCORE_PROCESSOR, "pickscore")
    return TextImageScorer(model, proc.tokenizer, transform_from_processor(proc.image_processor, backend), scale,
                           clean_text=False, run=Run(reward_device(device), batch_size, autocast))


@register_reward("clipscore")
def clipscore(weights: str | Path | None = None, processor: str | Path | None = None, variant: str = "cosine",
              open_clip: Any = False, device: str | torch.device | None = None,
              batch_size: int = 16, autocast: bool = False, backend: str = "pil") -> TextImageScorer:
    """CLIP score: cosine (MixGRPO) or ``logits_per_image / 100`` (DiffusionNFT) of a CLIP model.

    Args:
        weights: A ``CLIPModel`` folder (None: ``openai/clip-vit-large-patch14``), or with ``open_clip`` an
            open_clip checkpoint (None: ``apple/DFN5B-CLIP-ViT-H-14-378``, MixGRPO's model).
        processor: A ``CLIPProcessor`` folder (None: the one beside ``weights``; laion H/14 with ``open_clip``).
        variant: ``cosine`` or ``nft`` (``CLIPSCORE_VARIANTS``).
        open_clip: Load an open_clip checkpoint (squash resize, open_clip text cleaning): True for DFN5B's
            ViT-H-14-378-quickgelu, or the checkpoint's ``CLIPConfig`` (or a path to one).
        device: Where the model runs (default CUDA when available).
        batch_size: Images per forward pass.
        autocast: fp16 autocast on CUDA.
        backend: ``"pil"`` or ``"torch"`` resize (see ``pickscore``).
    """
    scale, run = _variant(CLIPSCORE_VARIANTS, variant, "clipscore"), Run(reward_device(device), batch_size, autocast)
    if open_clip is not False:
        config = vit_h14_config("quick_gelu", 378) if open_clip is True else open_clip
        model = load_open_clip_model(weights, config, DFN5B_WEIGHTS, "clipscore")
        transform = ImageTransform("squash", model.config.vision_config.image_size, backend)  # type: ignore[arg-type]
        tokenizer = _clip_tokenizer(processor, Published(LAION_H14, None, "processor"), "clipscore")
        return TextImageScorer(model, tokenizer, transform, scale, clean_text=True, run=run)
    return TextImageScorer(*openai_clip(weights, processor, backend, "clipscore"), scale, clean_text=False, run=run)


def openai_clip(weights: str | Path | None, processor: str | Path | None, backend: str,
                reward: str) -> tuple[Any, Any, ImageTransform]:
    """``(CLIPModel, tokenizer, transform)`` of a transformers CLIP folder (None: ``openai/clip-vit-large-patch14``
    from the HF cache) and its processor (None: the one beside ``weights``), frozen; errors name ``reward``."""
    from transformers import CLIPModel

    model = from_pretrained(CLIPModel.from_pretrained, weights, OPENAI_CLIP, reward).eval().requires_grad_(False)
    proc = _processor(weights if processor is None else processor, Published(OPENAI_L14, None, "processor"), reward)
    return model, proc.tokenizer, transform_from_processor(proc.image_processor, backend)  # type: ignore[arg-type]


@register_reward("aesthetic")
def aesthetic(weights: str | Path | None = None, head: str | Path | None = None, processor: str | Path | None = None,
              device: str | torch.device | None = None, batch_size: int = 16, backend: str = "pil") -> AestheticScorer:
    """LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``): raw score, about 1-10.

    Args:
        weights: A CLIP folder (``CLIPVisionModelWithProjection`` loads a full ``CLIPModel`` folder too);
            None: ``openai/clip-vit-large-patch14`` from the HF cache.
        head: The head file ``sac+logos+ava1-l14-linearMSE.pth`` (or a folder holding it); required.
        processor: The image processor folder; None: the one beside ``weights``.
        device: Where the model runs (default CUDA when available).
        batch_size: Images per forward pass.
        backend: ``"pil"`` or ``"torch"`` resize (see ``pickscore``).
    """
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    vision = from_pretrained(CLIPVisionModelWithProjection.from_pretrained, weights, OPENAI_CLIP, "aesthetic")
    image_processor = from_pretrained(AutoImageProcessor.from_pretrained, weights if processor is None else processor,
                                      Published(OPENAI_L14, None, "processor"), "aesthetic")
    mlp = linear_head(load_state_dict(weight_file(head, AESTHETIC_HEAD, "aesthetic"), "aesthetic"))
    return AestheticScorer(vision.eval().requires_grad_(False), mlp, transform_from_processor(image_processor, backend),
                           device=reward_device(device), batch_size=batch_size)


def _variant(table: dict[str, ScoreScale], name: str, reward: str) -> ScoreScale:
    if name not in table:
        raise ValueError(f"{reward}: unknown variant {name!r}; choose one of {', '.join(table)}.")
    return table[name]


def convert_open_clip(weights: str | Path, out_dir: str | Path, config: Any = None) -> Path:
    """Convert an open_clip checkpoint (e.g. ``HPS_v2.1_compressed.pt``) once to a ``CLIPModel`` folder.

    Pass the folder as ``weights`` afterwards; loading it skips the conversion.
    """
    model = load_open_clip_model(weights, vit_h14_config() if config is None else config, HPS_WEIGHTS, "convert")
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
