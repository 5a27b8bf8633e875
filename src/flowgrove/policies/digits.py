"""The built-in ``digits`` policy: a tiny FLUX transformer in pixel space on 8x8 digits (design.md, section 4).

The latent is the image itself, ``[1, 8, 8]`` in [-1, 1] (ink +1), packed 2x2 into 16 tokens of 4 channels
and driven through the same ``FluxAdapter`` as FLUX.1. The text encoder is a one-layer transformers
``CLIPTextModel`` over a word-level vocabulary built in code: the real FLUX CLIP architecture (token states as
``prompt_embeds``, the EOS state as ``pooled``) with nothing to download. A hand-written tokenizer replaces
a ``tokenizers`` object because the vocabulary is fourteen fixed tokens. The encoder is trained with the
transformer in ``flowgrove pretrain digits`` and frozen afterwards; the ten prompt encodings are cached.

The same code serves every built-in pixel task: a ``TinyFluxTask`` record names its latent shape, vocabulary,
prompt table and weight file (``DIGITS`` here, ``policies/numbers.py`` registers ``numbers`` on 8x16 images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from flowgrove.policies.base import Conditioning, register_policy
from flowgrove.policies.flux import DTYPES, FluxAdapter
from flowgrove.policies.pipelines import save_pipeline_lora
from flowgrove.tasks.digits import DIGIT_WORDS, PRETRAIN_HINT, assets_dir, digit_of_prompt, digit_prompts, load_weights
from flowgrove.tasks.digits import save_weights

__all__ = [
    "DIGITS", "DigitsPolicy", "TinyFluxPolicy", "TinyFluxTask", "build_digits_policy", "digit_of_prompt",
    "digit_prompts", "digits_to_images", "encode_text", "load_tiny_policy", "new_text_encoder", "new_transformer",
    "save_digits_policy", "save_tiny_policy", "text_encoder_config", "tokenize",
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


@dataclass(frozen=True)
class TinyFluxTask:
    """What a built-in tiny FLUX pixel policy takes from its task: shapes, words, prompts and its weight file."""

    name: str  # the registered policy name
    file: str  # shipped weights in ``flowgrove/assets``
    format: str  # the weights file's format tag
    latent_shape: tuple[int, int, int]  # (1, H, W): the image is the latent
    vocab: tuple[str, ...]  # index 0 <bos>, 1 <eos> (= pad)
    max_length: int  # tokens per prompt, <bos> and <eos> included
    table: Callable[[], list[str]]  # every prompt the policy can encode, index = its row in the cached table
    index: Callable[[str], int]  # prompt -> its row in ``table()`` (ValueError for any other prompt)
    train: Callable[[], list[str]]  # the default training prompts
    heldout: Callable[[], list[str]] | None  # the default held-out prompts; None = the training prompts
    hint: str  # how to recreate the weights


DIGITS = TinyFluxTask("digits", POLICY_FILE, FORMAT, LATENT_SHAPE, VOCAB, MAX_LENGTH, digit_prompts, digit_of_prompt,
                      digit_prompts, None, PRETRAIN_HINT)


def text_encoder_config(task: TinyFluxTask = DIGITS) -> dict:
    """``TEXT_ENCODER_CONFIG`` with the vocabulary size and length of ``task``."""
    return {**TEXT_ENCODER_CONFIG, "vocab_size": len(task.vocab), "max_position_embeddings": task.max_length}


def new_transformer(config: dict | None = None) -> nn.Module:
    """A randomly initialised ``FluxTransformer2DModel`` with ``TRANSFORMER_CONFIG`` (or ``config``)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**(config or TRANSFORMER_CONFIG))


def new_text_encoder(config: dict | None = None) -> nn.Module:
    """A randomly initialised one-layer ``CLIPTextModel`` with ``TEXT_ENCODER_CONFIG`` (or ``config``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**(config or TEXT_ENCODER_CONFIG)))


def prompt_words(prompt: str) -> list[str]:
    """Lower-case words of a prompt, a numeral spelled digit by digit (``"the number 47"`` -> the, number, 4, 7)."""
    return [part for word in str(prompt).lower().split() for part in (list(word) if word.isdigit() else [word])]


def tokenize(prompts: Sequence[str], vocab: Sequence[str] = VOCAB, max_length: int = MAX_LENGTH) -> Tensor:
    """Word-level CLIP-style ids: ``<bos> words <eos>`` padded with ``<eos>`` to ``max_length`` (``prompt_words``).

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
        words = prompt_words(prompt)
        unknown = [w for w in words if w not in index]
        if unknown or len(words) + 2 > max_length:
            raise ValueError(f"cannot tokenize {prompt!r}: words must come from {list(vocab[2:])} and fit "
                             f"{max_length - 2} per prompt; use the task's own prompts.")
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


class TinyFluxPolicy:
    """A built-in tiny FLUX pixel generator as a ``FlowPolicy`` (``task``: digits or numbers); ``module`` is the
    trainable transformer. Every prompt of ``task.table()`` is encoded once and cached."""

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, max_length: int | None = None,
                 vocab: Sequence[str] | None = None, compute_dtype: torch.dtype = torch.float32,
                 task: TinyFluxTask = DIGITS) -> None:
        self.task = task
        self.latent_shape: tuple[int, int, int] = task.latent_shape
        self.adapter = FluxAdapter(transformer, guidance=None, compute_dtype=compute_dtype)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        device = next(transformer.parameters()).device
        with torch.no_grad():
            ids = tokenize(task.table(), vocab or task.vocab, max_length or task.max_length).to(device)  # [P, L]
            self._prompt_table = encode_text(self.text_encoder, ids)  # [P, L, D], [P, D]

    @property
    def module(self) -> nn.Module:
        """The transformer the adapter calls (and the trainer trains; FSDP2 shards it in place)."""
        return self.adapter.transformer

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.adapter.transformer = value

    def default_prompts(self) -> list[str]:
        """The task's training prompts (digits: the ten ``digit_prompts()``)."""
        return self.task.train()

    def heldout_prompts(self) -> list[str] | None:
        """The task's held-out prompts (numbers: the test numbers), or None: evaluate the training prompts."""
        return self.task.heldout() if self.task.heldout else None

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Cached encodings of the task's prompts (``ValueError`` for any other prompt)."""
        rows = torch.tensor([self.task.index(p) for p in prompts], dtype=torch.long)  # [B]
        return self._prompt_table.select(rows)  # [B, L, D], [B, D]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """Velocity ``[B, 1, H, W]`` through ``FluxAdapter.velocity`` (sigma ``[B]`` or a scalar)."""
        return self.adapter.velocity(x, sigma, cond)  # [B, 1, H, W]

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1], ``digits_to_images``."""
        return digits_to_images(x)  # [B, 3, H, W]

    def export_lora(self, state: dict[str, Tensor], lora_config: dict, out: Path) -> None:
        """diffusers' FLUX LoRA file in ``out`` (``save_pipeline_lora``; ``transformer.load_lora_adapter`` loads it)."""
        from diffusers import FluxPipeline

        save_pipeline_lora(FluxPipeline, state, lora_config, out)

    def export_full(self, out: Path) -> None:
        """The trained transformer with its ``config.json`` (``FluxTransformer2DModel.from_pretrained(out)``)."""
        self.module.save_pretrained(str(out))


DigitsPolicy = TinyFluxPolicy  # the name the digits code and tests use


def save_tiny_policy(path: str | Path, transformer: nn.Module, text_encoder: nn.Module,
                     task: TinyFluxTask = DIGITS) -> Path:
    """Write both modules into one safetensors file whose metadata holds the architecture and ``task``'s words."""
    tensors = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    config = {
        "format": task.format,
        "transformer": {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")},
        "text_encoder": {k: getattr(text_encoder.config, k) for k in TEXT_ENCODER_CONFIG},
        "vocab": list(task.vocab),
        "max_length": task.max_length,
    }
    return save_weights(path, tensors, config)


def save_digits_policy(path: str | Path, transformer: nn.Module, text_encoder: nn.Module) -> Path:
    """``save_tiny_policy`` for the digits task."""
    return save_tiny_policy(path, transformer, text_encoder, DIGITS)


def load_tiny_policy(task: TinyFluxTask, weights: str | Path | None = None, device: str | torch.device = "cpu", *,
                     path: str | Path | None = None, dtype: str = "float32") -> TinyFluxPolicy:
    """Load ``task``'s policy from ``weights`` (alias ``path``; None = the shipped ``task.file``).

    Raises:
        FileNotFoundError, ValueError: missing, corrupt or foreign weights; the message says how to recreate them.
    """
    if weights and path:
        raise ValueError(f"give the {task.name} weights once: weights={weights!r} and path={path!r} were both set.")
    weights = weights or path
    path = Path(weights) if weights else assets_dir() / task.file
    tensors, config = load_weights(path, f"{task.name} policy", task.hint)
    if config.get("format") != task.format:
        raise ValueError(f"{path} is not a {task.name} policy file (format {config.get('format')!r}); {task.hint}.")
    transformer = new_transformer(config["transformer"])
    text_encoder = new_text_encoder(config["text_encoder"])
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path} does not match the {task.name} architecture ({error}); {task.hint}.") from error
    transformer.to(device).eval()
    text_encoder.to(device)
    return TinyFluxPolicy(transformer, text_encoder, config["max_length"], config["vocab"],
                          compute_dtype=DTYPES[dtype], task=task)


@register_policy("digits")
def build_digits_policy(weights: str | Path | None = None, device: str | torch.device = "cpu", *,
                        path: str | Path | None = None, dtype: str = "float32") -> TinyFluxPolicy:
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
    return load_tiny_policy(DIGITS, weights, device, path=path, dtype=dtype)
