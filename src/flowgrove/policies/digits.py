"""The built-in ``digits`` policy: a tiny FLUX transformer in pixel space on 8x8 digits (design.md, section 4).

The latent is the image itself, ``[1, 8, 8]`` in [-1, 1] (ink +1), packed 2x2 into 16 tokens of 4 channels
and driven through the same ``FluxAdapter`` as FLUX.1. The text encoder is a one-layer transformers
``CLIPTextModel`` over a word-level vocabulary built in code: the real FLUX CLIP architecture (token states as
``prompt_embeds``, the EOS state as ``pooled``) with nothing to download. A hand-written tokenizer replaces
a ``tokenizers`` object because the vocabulary is fourteen fixed tokens. The encoder is trained with the
transformer in ``flowgrove pretrain digits`` and frozen afterwards; the ten prompt encodings are cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import DTYPES, FluxAdapter
from flowgrove.policies.pipelines import save_pipeline_lora
from flowgrove.tasks.digits import DIGIT_WORDS, PRETRAIN_HINT, assets_dir, digit_of_prompt, digit_prompts, load_weights
from flowgrove.tasks.digits import save_weights

__all__ = [
    "DigitsPolicy", "build_digits_policy", "digit_of_prompt", "digit_prompts", "digits_to_images", "encode_text",
    "new_text_encoder", "new_transformer", "save_digits_policy", "tokenize",
]

POLICY_FILE = "digits_policy.safetensors"
FORMAT = "flowgrove-digits-policy-v1"
LATENT_SHAPE = (1, 8, 8)
VOCAB = ("<|startoftext|>", "<|endoftext|>", "a", "handwritten", *DIGIT_WORDS)
MAX_LENGTH = 5  # <bos> a handwritten <digit> <eos>
# FluxTransformer2DModel at hidden 64 (2 heads of 32): 250k parameters (offline-recipes.md, section 3).
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12], guidance_embeds=False,
)
# CLIP ids: <bos>=0, <eos>=1 = pad (as in CLIP); eos_token_id != 2 selects the first-EOS pooling.
TEXT_ENCODER_CONFIG = dict(
    vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    projection_dim=32,
)


def new_transformer(config: dict | None = None) -> nn.Module:
    """A randomly initialised ``FluxTransformer2DModel`` with ``TRANSFORMER_CONFIG`` (or ``config``)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**(config or TRANSFORMER_CONFIG))


def new_text_encoder(config: dict | None = None) -> nn.Module:
    """A randomly initialised one-layer ``CLIPTextModel`` with ``TEXT_ENCODER_CONFIG`` (or ``config``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**(config or TEXT_ENCODER_CONFIG)))


def tokenize(prompts: Sequence[str], vocab: Sequence[str] = VOCAB, max_length: int = MAX_LENGTH) -> Tensor:
    """Word-level CLIP-style ids: ``<bos> words <eos>`` padded with ``<eos>`` to ``max_length``.

    Args:
        prompts: ``B`` prompts made of vocabulary words.
        vocab: Tokens; index 0 is ``<bos>``, index 1 ``<eos>`` (also the pad token).
        max_length: Sequence length ``L``.

    Returns:
        Ids ``[B, L]`` long.
    """
    index = {token: i for i, token in enumerate(vocab)}
    rows = []
    for prompt in prompts:
        words = str(prompt).lower().split()
        unknown = [w for w in words if w not in index]
        if unknown or len(words) + 2 > max_length:
            raise ValueError(f"cannot tokenize {prompt!r}: words must come from {list(vocab[2:])} and fit "
                             f"{max_length - 2} per prompt; the digits prompts are {digit_prompts()}.")
        ids = [0, *(index[w] for w in words), 1]
        rows.append(ids + [1] * (max_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)  # [B, L]


def encode_text(text_encoder: nn.Module, input_ids: Tensor) -> Conditioning:
    """Token states as ``prompt_embeds`` and the pooled EOS state as ``pooled`` (CLIP, Radford et al. 2021).

    Args:
        text_encoder: A ``CLIPTextModel``.
        input_ids: ``[B, L]`` from ``tokenize``.

    Returns:
        ``Conditioning(prompt_embeds [B, L, D], pooled [B, D])``; differentiable when grad is enabled.
    """
    out = text_encoder(input_ids=input_ids)
    return Conditioning(out.last_hidden_state, out.pooler_output)  # [B, L, D], [B, D]


def digits_to_images(x: Tensor) -> Tensor:
    """Images ``[B, 3, 8, 8]`` in [0, 1] from pixel latents ``[B, 1, 8, 8]`` in [-1, 1]: ``(x + 1) / 2``, clamped."""
    return ((x + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)  # [B, 3, 8, 8]


class DigitsPolicy:
    """The tiny FLUX digits generator as a ``FlowPolicy``; ``module`` is the trainable transformer."""

    latent_shape: tuple[int, int, int] = LATENT_SHAPE

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, max_length: int = MAX_LENGTH,
                 vocab: Sequence[str] = VOCAB, compute_dtype: torch.dtype = torch.float32) -> None:
        self.adapter = FluxAdapter(transformer, guidance=None, compute_dtype=compute_dtype)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        device = next(transformer.parameters()).device
        with torch.no_grad():
            ids = tokenize(digit_prompts(), vocab, max_length).to(device)  # [10, L]
            self._prompt_table = encode_text(self.text_encoder, ids)  # [10, L, D], [10, D]

    @property
    def module(self) -> nn.Module:
        """The transformer the adapter calls (and the trainer trains; FSDP2 shards it in place)."""
        return self.adapter.transformer

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.adapter.transformer = value

    def default_prompts(self) -> list[str]:
        """The ten training prompts, ``digit_prompts()``."""
        return digit_prompts()

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Cached encodings of the digits prompts (``ValueError`` for any other prompt)."""
        digits = torch.tensor([digit_of_prompt(p) for p in prompts], dtype=torch.long)  # [B]
        return self._prompt_table.select(digits)  # [B, L, D], [B, D]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Velocity ``[B, 1, 8, 8]`` through ``FluxAdapter.velocity`` (sigma ``[B]`` or a scalar)."""
        return self.adapter.velocity(x, sigma, cond)  # [B, 1, 8, 8]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, 8, 8]`` in [0, 1], ``digits_to_images``."""
        return digits_to_images(x)  # [B, 3, 8, 8]

    def export_lora(self, state: dict[str, Tensor], lora_config: dict, out: Path) -> None:
        """diffusers' FLUX LoRA file in ``out`` (``save_pipeline_lora``; ``transformer.load_lora_adapter`` loads it)."""
        from diffusers import FluxPipeline

        save_pipeline_lora(FluxPipeline, state, lora_config, out)

    def export_full(self, out: Path) -> None:
        """The trained transformer with its ``config.json`` (``FluxTransformer2DModel.from_pretrained(out)``)."""
        self.module.save_pretrained(str(out))


def save_digits_policy(path: str | Path, transformer: nn.Module, text_encoder: nn.Module) -> Path:
    """Write both modules into one safetensors file whose metadata holds the architecture."""
    tensors = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    config = {
        "format": FORMAT,
        "transformer": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "text_encoder": {k: getattr(text_encoder.config, k) for k in TEXT_ENCODER_CONFIG},
        "vocab": list(VOCAB),
        "max_length": MAX_LENGTH,
    }
    return save_weights(path, tensors, config)


@register_policy("digits")
def build_digits_policy(weights: str | Path | None = None, device: str | torch.device = "cpu", *,
                        path: str | Path | None = None, dtype: str = "float32") -> DigitsPolicy:
    """Load the digits policy (default: the weights shipped in ``flowgrove/assets``).

    Args:
        weights: A ``digits_policy.safetensors`` written by ``flowgrove pretrain digits``; None = shipped.
        device: Device of both modules.
        path: Alias of ``weights`` under the config's name (``policy.path``); give at most one of the two.
        dtype: Compute dtype of the transformer's forward (``float32``, or ``bfloat16``/``float16`` autocast over
            the float32 weights).

    Returns:
        The policy in float32, transformer in eval mode (the trainer switches modes).

    Raises:
        FileNotFoundError, ValueError: missing, corrupt or foreign weights; the message says to re-run
            ``flowgrove pretrain digits``.
    """
    if weights and path:
        raise ValueError(f"give the digits weights once: weights={weights!r} and path={path!r} were both set.")
    weights = weights or path
    path = Path(weights) if weights else assets_dir() / POLICY_FILE
    tensors, config = load_weights(path, "digits policy")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a digits policy file (format {config.get('format')!r}); {PRETRAIN_HINT}.")
    transformer = new_transformer(config["transformer"])
    text_encoder = new_text_encoder(config["text_encoder"])
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path} does not match the digits architecture ({error}); {PRETRAIN_HINT}.") from error
    transformer.to(device).eval()
    text_encoder.to(device)
    return DigitsPolicy(transformer, text_encoder, config["max_length"], config["vocab"], compute_dtype=DTYPES[dtype])
