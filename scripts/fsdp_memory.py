"""Memory per GPU of a FLUX.1-dev full fine-tune under FSDP2, COMPUTED from measured per-block figures.

  OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/fsdp_memory.py [--gpus 8] [--tokens 288 576 1152] [--verify 4608]

1. Parameters: FLUX.1-dev's real transformer config (flowgrove/assets/flux1_dev_transformer.json: 19 double and
   38 single blocks, hidden 24 x 128 = 3072) built on the meta device; counted exactly, per block and outside.
2. Activations: one real-width double block and one real-width single block (random bf16 weights, trainable, as
   FSDP2's MixedPrecisionPolicy(param_dtype=bf16) computes them) run forward on the CPU at several token counts;
   ``torch.autograd.graph.saved_tensors_hooks`` records every tensor kept for backward (parameters and the shared
   temb/rope excluded, each storage counted once). A polynomial a + b*N + c*N^2 is fitted exactly through three
   counts (a fourth, if given, checks it): c is 0 when SDPA keeps no N x N matrix (flash-style backends).
3. Per GPU: sharded fp32 master weights + fp32 grads + AdamW m, v (16 B/param / GPUs); the bf16 all-gathered
   unsharded blocks (current + FSDP2's prefetched next = 2 of the largest); the fp32 unsharded gradient of one
   block before its reduce-scatter (MixedPrecisionPolicy(reduce_dtype=float32)); activations of a per-GPU batch,
   with and without per-block gradient checkpointing. Not modeled: allocator fragmentation, CUDA context and
   NCCL buffers (about 1-3 GiB together), text encoders and VAE (prompts are encoded once and offloaded).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from flowgrove.bench.models import read_config  # noqa: E402

GIB = 2**30
TEXT_TOKENS = 512  # T5 max_sequence_length of FLUX.1-dev


@dataclass(frozen=True)
class Counts:
    total: int
    double: int  # one double (MM-DiT) block
    single: int  # one single block
    outside: int  # embedders, norm_out, proj_out
    n_double: int
    n_single: int


@dataclass(frozen=True)
class Fit:
    """Saved bytes of one block for N tokens: a + b*N + c*N^2 (exact through three measured counts)."""

    a: float
    b: float
    c: float

    def __call__(self, n: int) -> float:
        return self.a + self.b * n + self.c * n * n


def count_parameters() -> Counts:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**read_config("flux1_dev_transformer"))
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    double, single = model.transformer_blocks, model.single_transformer_blocks
    total = size(model)
    outside = total - size(double) - size(single)
    return Counts(total, size(double[0]), size(single[0]), outside, len(double), len(single))


def _block(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    cls = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
    torch.manual_seed(0)
    block = cls(dim=3072, num_attention_heads=24, attention_head_dim=128).to(dtype)
    return block.requires_grad_(True)


def _inputs(tokens: int, dtype: torch.dtype) -> dict:
    """A block's inputs for ``tokens`` in all, split like 1024^2 (8 image tokens to 1 text token)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    text = max(tokens // 9, 1)
    ids = torch.zeros(tokens, 3)
    ids[text:, 1] = torch.arange(tokens - text).float()
    rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    return {"hidden_states": torch.randn(1, tokens - text, 3072, dtype=dtype, requires_grad=True),
            "encoder_hidden_states": torch.randn(1, text, 3072, dtype=dtype, requires_grad=True),
            "temb": torch.randn(1, 3072, dtype=dtype), "image_rotary_emb": rope}


def saved_bytes(block: torch.nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for backward in one forward of ``block`` (each storage once; weights and the
    shared temb/rope excluded)."""
    kwargs = _inputs(tokens, dtype)
    shared = [kwargs["temb"], *kwargs["image_rotary_emb"]]
    skip = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *shared]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(**kwargs)
    del out
    return sum(seen.values())


def fit(points: dict[int, int]) -> Fit:
    ns = sorted(points)[:3]
    x = torch.tensor([[1.0, n, n * n] for n in ns], dtype=torch.float64)
    y = torch.tensor([float(points[n]) for n in ns], dtype=torch.float64)
    a, b, c = torch.linalg.solve(x, y).tolist()
    return Fit(a, b, c if abs(c) > 1e-6 * abs(b) else 0.0)


def measure(tokens: list[int], verify: int | None, dtype: torch.dtype) -> dict[str, Fit]:
    fits = {}
    for kind in ("double", "single"):
        block = _block(kind, dtype)
        points = {}
        for n in tokens + ([verify] if verify else []):
            start = time.perf_counter()
            points[n] = saved_bytes(block, n, dtype)
            print(f"  {kind} block, {n:5d} tokens: {points[n] / 2**20:9.1f} MiB saved for backward "
                  f"({time.perf_counter() - start:.1f} s)")
        fits[kind] = fit({n: points[n] for n in tokens})
        f = fits[kind]
        print(f"  {kind}: bytes = {f.a:.0f} + {f.b:.1f} * N + {f.c:.3g} * N^2 "
              f"(= {f.b / 3072:.2f} x 3072 per token)")
        if verify:
            print(f"  {kind}: fit at {verify} tokens {f(verify) / 2**20:.1f} MiB, "
                  f"measured {points[verify] / 2**20:.1f} MiB")
        del block
    return fits


def image_tokens(resolution: int) -> int:
    """FLUX latents: 8x VAE, then 2x2 patches (``FluxPipeline``: latent side 2 * (px // 16))."""
    side = 2 * (resolution // 16)
    return (side // 2) ** 2


def per_gpu(counts: Counts, fits: dict[str, Fit], gpus: int, resolution: int, batch: int) -> dict[str, float]:
    """GiB per GPU, by line item."""
    n = image_tokens(resolution) + TEXT_TOKENS
    block_inputs = 2 * n * 3072 * 2  # hidden + encoder hidden states, bf16: what a checkpointed block keeps
    acts_full = batch * (counts.n_double * fits["double"](n) + counts.n_single * fits["single"](n))
    acts_ckpt = batch * ((counts.n_double + counts.n_single) * block_inputs
                         + max(fits["double"](n), fits["single"](n)))
    largest = max(counts.double, counts.single)
    return {"tokens": n,
            "sharded fp32 weights + grads + AdamW (16 B/param / GPUs)": 16 * counts.total / gpus / GIB,
            "bf16 unsharded blocks (current + prefetched)": 2 * largest * 2 / GIB,
            "fp32 unsharded grads of one block (reduce-scatter)": largest * 4 / GIB,
            "activations, no checkpointing": acts_full / GIB,
            "activations, per-block checkpointing": acts_ckpt / GIB}


def _table(counts: Counts, fits: dict[str, Fit], gpus: int) -> None:
    settings = [(1024, 1, "1024^2, batch 1"), (720, 1, "720^2, batch 1 (MixGRPO)"),
                (720, 2, "720^2, batch 2 (DanceGRPO 8-GPU, BranchGRPO)")]
    print(f"\n| per GPU, {gpus} GPUs (GiB) | " + " | ".join(s[2] for s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    rows = [per_gpu(counts, fits, gpus, r, b) for r, b, _ in settings]
    for key in rows[0]:
        cells = [f"{r[key]:.0f}" if key == "tokens" else f"{r[key]:.1f}" for r in rows]
        print(f"| {key} | " + " | ".join(cells) + " |")
    fixed = ["sharded fp32 weights + grads + AdamW (16 B/param / GPUs)", "bf16 unsharded blocks (current + prefetched)",
             "fp32 unsharded grads of one block (reduce-scatter)"]
    for label, act in (("total, no checkpointing", "activations, no checkpointing"),
                       ("total, per-block checkpointing", "activations, per-block checkpointing")):
        print(f"| **{label}** | " + " | ".join(f"**{sum(r[k] for k in fixed) + r[act]:.1f}**" for r in rows) + " |")
    ema = 4 * counts.total / gpus / GIB
    print(f"\nOptional: an EMA copy (fp32 shard) adds {ema:.1f} GiB, a KL reference (bf16 shard) {ema / 2:.1f} GiB "
          "per GPU.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs=3, default=[288, 576, 1152], help="three token counts to fit")
    ap.add_argument("--verify", type=int, default=None, help="a fourth token count, measured to check the fit")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    counts = count_parameters()
    print(f"FLUX.1-dev transformer: {counts.total:,} parameters = {counts.n_double} x {counts.double:,} (double) "
          f"+ {counts.n_single} x {counts.single:,} (single) + {counts.outside:,} outside the blocks")
    dtype = torch.bfloat16
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError:
        sys.exit("this CPU has no bfloat16 matmul; the figures would need an fp32 run scaled by 1/2")
    backend = torch.backends.cpu.get_cpu_capability()
    print(f"activations measured on the CPU ({backend}) in bfloat16, torch {torch.__version__}:")
    fits = measure(args.tokens, args.verify, dtype)
    _table(counts, fits, args.gpus)


if __name__ == "__main__":
    main()
