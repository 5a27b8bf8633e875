"""The measured cases of ``flowgrove bench-model``: a rollout step, a VAE decode and a training step.

What a row measures (median of ``iters`` calls after a FLOP-counting call and ``warmup`` calls):

- ``rollout``: one denoising step (a batched velocity call and an SDE step with its log-prob) at batch ``B``. One
  sample per call, as the reference repositories roll out, costs the batch-1 time per sample.
- ``decode``: ``vae_decode`` of ``B`` latents at the resolution.
- ``train``: re-score ``B`` stored transitions, PPO-clip loss, backward, gradient clipping and an AdamW step, for
  LoRA and full fine-tuning, with and without gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from flowgrove.bench.models import (
    BenchPolicy, ModelSpec, build_random, cast_parameters, latent_side, random_conditioning, random_latents,
)
from flowgrove.bench.perf import count_flops, free_memory, is_out_of_memory, measure
from flowgrove.config.load import Config, PolicyConfig
from flowgrove.grpo.losses import ppo_clip_loss
from flowgrove.policies.base import Conditioning
from flowgrove.policies.flux import DTYPES, FluxAdapter
from flowgrove.samplers.steps import noise_g, sde_step
from flowgrove.samplers.types import StepOutput
from flowgrove.training.prepare import apply_lora, enable_gradient_checkpointing, float32_masters
from flowgrove.training.rollout import Transitions, rescore

SIGMA, SIGMA_NEXT, ETA = 0.5, 0.45, 0.3  # one mid-trajectory step, DanceGRPO's constant g
NOISE = "constant"  # the noise kind of that g (sampler.noise)
CLIP_RANGE, ADV_CLIP, LR = 1e-4, 5.0, 1e-5


@dataclass(frozen=True)
class BenchSettings:
    """The run's choices (``flowgrove bench-model --help``)."""

    device: torch.device
    dtype: torch.dtype  # compute dtype: bf16 autocast over the weights, or float32
    resolutions: tuple[int, ...]  # square image sides in pixels
    rollout_batches: tuple[int, ...] = (1, 4, 16)
    decode_batches: tuple[int, ...] = (1, 4)
    train_batch: int = 1
    train_modes: tuple[str, ...] = ("lora", "full")
    checkpointing: tuple[bool, ...] = (False, True)
    sections: tuple[str, ...] = ("rollout", "decode", "train")
    warmup: int = 1
    iters: int = 3
    lora_rank: int = 32
    full_masters: str = "auto"  # auto | float32 | bfloat16: trainable weights (and AdamW state) of full fine-tuning
    peak_tflops: float | None = None  # None: from PEAK_BF16_TFLOPS on CUDA, n/a on CPU
    guidance: float = 3.5
    seed: int = 0


@dataclass
class Row:
    """One measured case; ``None`` where a value does not apply or was not measured."""

    section: str  # rollout | decode | train
    case: str  # rollout: sde-step; decode: vae; train: lora, lora+ckpt, full, full+ckpt
    resolution: int
    batch: int
    status: str = "ok"  # ok | oom | skipped
    seconds: float | None = None  # median seconds per call
    seconds_all: list[float] = field(default_factory=list)
    flops: int | None = None  # counted FLOPs of one call, as executed (a checkpointed step's recompute included)
    model_flops: int | None = None  # counted FLOPs without recomputation (the MFU numerator)
    tflops: float | None = None  # achieved model TFLOP/s (n/a on CPU unless --peak-tflops)
    mfu: float | None = None
    hfu: float | None = None
    speedup_vs_one_per_call: float | None = None  # rollout: B * t(1) / t(B)
    peak_memory_gib: float | None = None
    note: str = ""

    @property
    def seconds_per_sample(self) -> float | None:
        return None if self.seconds is None else self.seconds / self.batch


# ---- the measured calls ----------------------------------------------------------------------------------------------
def sde_transition(policy: BenchPolicy, x: Tensor, cond: Conditioning, generator: torch.Generator) -> StepOutput:
    """One denoising step as ``rollout`` takes it: a batched velocity call, then an SDE step with its log-prob."""
    velocity = policy.velocity(x, x.new_full((x.shape[0],), SIGMA), cond).float()  # [B, C, H, W]
    g = noise_g(NOISE, ETA, SIGMA, SIGMA_NEXT)
    return sde_step(x, velocity, SIGMA, SIGMA_NEXT, g, generator=generator)


@torch.no_grad()
def rollout_step(policy: BenchPolicy, x: Tensor, cond: Conditioning, generator: torch.Generator) -> Tensor:
    """The timed rollout call: ``sde_transition`` without grad. Returns ``x_next`` [B, C, H, W]."""
    return sde_transition(policy, x, cond, generator).x_next


@torch.no_grad()
def stored_transitions(policy: BenchPolicy, x: Tensor, cond: Conditioning, generator: torch.Generator) -> Transitions:
    """Transitions of one SDE step from ``x`` [E, C, H, W], as the rollout stores them (cond rows 0..E-1)."""
    e = x.shape[0]
    out = sde_transition(policy, x, cond, generator)
    full = lambda value: x.new_full((e,), float(value))  # noqa: E731
    index = torch.arange(e, device=x.device)  # [E]
    g = noise_g(NOISE, ETA, SIGMA, SIGMA_NEXT)
    return Transitions(x, out.x_next, full(SIGMA), full(SIGMA_NEXT), full(g), full(1.0), out.log_prob, index,
                       torch.ones_like(index), index)


def train_step(policy: BenchPolicy, batch: Transitions, cond: Conditioning, advantages: Tensor,
               optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> Tensor:
    """The trainer's micro-step and update: ``rescore``, PPO-clip loss, backward, clip to norm 1, AdamW step."""
    log_prob, _ = rescore(policy, batch, cond, NOISE)  # [E]
    loss = ppo_clip_loss(log_prob, batch.old_log_prob, advantages, CLIP_RANGE, ADV_CLIP).loss  # []
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_case(row: Row, fn: Callable[[], object], settings: BenchSettings) -> Row:
    """``row`` filled in from ``measure(fn)``; an out-of-memory error marks it ``oom`` instead of stopping the run."""
    try:
        m = measure(fn, settings.device, settings.warmup, settings.iters)
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError, or cuBLAS / cuDNN failing to allocate a workspace
        if not is_out_of_memory(err):
            raise
        message = str(err).splitlines()[0][:160]
        m = None
    if m is None:
        free_memory(settings.device, collect=True)
        return dataclasses.replace(row, status="oom", note=f"out of memory: {message}")
    return dataclasses.replace(row, seconds=statistics.median(m.seconds), seconds_all=m.seconds, flops=m.flops,
                               model_flops=m.flops, peak_memory_gib=m.peak_memory_gib)


# ---- the sections ----------------------------------------------------------------------------------------------------
def bench_rollout(policy: BenchPolicy, spec: ModelSpec, settings: BenchSettings, res: int,
                  generator: torch.Generator) -> Iterator[Row]:
    """Rows of one denoising step at every rollout batch size."""
    side = latent_side(res, spec.vae)
    for b in settings.rollout_batches:
        x = random_latents(b, side, spec, settings.device, generator)
        cond = random_conditioning(b, spec, settings.device, generator)
        yield run_case(Row("rollout", "sde-step", res, b), lambda: rollout_step(policy, x, cond, generator), settings)
        del x, cond
        free_memory(settings.device)


def bench_decode(policy: BenchPolicy, spec: ModelSpec, settings: BenchSettings, res: int,
                 generator: torch.Generator) -> Iterator[Row]:
    """Rows of ``vae_decode`` at every decode batch size."""
    side = latent_side(res, spec.vae)
    for b in settings.decode_batches:
        x = random_latents(b, side, spec, settings.device, generator)
        yield run_case(Row("decode", "vae", res, b), torch.no_grad()(lambda: policy.decode(x)), settings)
        del x
        free_memory(settings.device)


def trainable_parameters(policy: BenchPolicy, mode: str, settings: BenchSettings, masters: torch.dtype) -> list[nn.Parameter]:
    """Make the transformer trainable as ``prepare_policy`` does: LoRA (``apply_lora``, float32 LoRA weights) or
    full (every weight; float32 masters unless ``masters`` is bf16, when float32 ones do not fit)."""
    module = policy.module
    if mode == "lora":
        apply_lora(policy, Config(policy=PolicyConfig(lora_rank=settings.lora_rank)))
        float32_masters(module)
    else:
        module.requires_grad_(True)
        if masters == torch.float32:
            float32_masters(module)
    return [p for p in module.parameters() if p.requires_grad]


def untrain(policy: BenchPolicy, mode: str, dtype: torch.dtype) -> None:
    """Undo ``trainable_parameters``: drop LoRA layers, freeze, back to the rollout dtype, no checkpointing."""
    module = policy.module
    if mode == "lora":
        module.unload_lora()
    module.requires_grad_(False)
    cast_parameters(module, dtype)
    module.disable_gradient_checkpointing()


def full_masters_dtype(n_params: int, settings: BenchSettings) -> tuple[torch.dtype | None, str]:
    """(dtype of full fine-tuning's trainable weights and AdamW state, why); None when none fits the GPU.

    ``auto`` takes float32 masters (the trainer's) when they fit and bf16 ones otherwise (FLUX.1-dev on one GPU).
    Bytes per parameter: weight, gradient and two AdamW moments in the master dtype (float32: 16, bf16: 8), less
    the copy already resident. A CPU is not checked.
    """
    wanted = ("float32", "bfloat16") if settings.full_masters == "auto" else (settings.full_masters,)
    if settings.device.type != "cuda":
        return DTYPES[wanted[0]], f"{wanted[0]} masters"
    free = torch.cuda.mem_get_info(settings.device)[0]
    need = {name: n_params * (4 * DTYPES[name].itemsize - settings.dtype.itemsize) for name in wanted}  # bytes
    for name in wanted:
        if need[name] < 0.92 * free:
            why = f"{name} masters"
            if name != wanted[0]:
                why += f" (float32 masters + AdamW need {need[wanted[0]] / 2**30:.0f} GiB more, {free / 2**30:.0f} GiB free)"
            return DTYPES[name], why
    needs = " or ".join(f"{name} masters need {need[name] / 2**30:.0f} GiB more" for name in wanted)
    return None, f"skipped: {needs}, {free / 2**30:.0f} GiB free"


def bench_train(policy: BenchPolicy, spec: ModelSpec, settings: BenchSettings, generator: torch.Generator) -> Iterator[Row]:
    """Rows of the training step for every mode, checkpointing setting and resolution."""
    n_params = sum(p.numel() for p in policy.module.parameters())
    for mode in settings.train_modes:
        masters, why = (torch.float32, "") if mode == "lora" else full_masters_dtype(n_params, settings)
        if masters is None:
            for res in settings.resolutions:
                for ckpt in settings.checkpointing:
                    yield Row("train", _case(mode, ckpt), res, settings.train_batch, status="skipped", note=why)
            continue
        params = trainable_parameters(policy, mode, settings, masters)
        note = f"{sum(p.numel() for p in params):,} trainable, {why or f'rank-{settings.lora_rank} LoRA, float32'}"
        for res in settings.resolutions:
            yield from _train_rows(policy, spec, settings, res, mode, params, note, generator)
        del params
        untrain(policy, mode, settings.dtype)
        free_memory(settings.device, collect=True)


def _case(mode: str, ckpt: bool) -> str:
    return f"{mode}+ckpt" if ckpt else mode


def _train_rows(policy: BenchPolicy, spec: ModelSpec, settings: BenchSettings, res: int, mode: str,
                params: list[nn.Parameter], note: str, generator: torch.Generator) -> Iterator[Row]:
    b = settings.train_batch
    x = random_latents(b, latent_side(res, spec.vae), spec, settings.device, generator)
    cond = random_conditioning(b, spec, settings.device, generator)
    batch = stored_transitions(policy, x, cond, generator)
    advantages = torch.randn(b, generator=generator).to(settings.device)  # [E]
    plain_flops = None  # counted FLOPs of the step without checkpointing: the model FLOPs of the checkpointed one
    for ckpt in settings.checkpointing:
        if ckpt:
            enable_gradient_checkpointing(policy.module)
        else:
            policy.module.disable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)  # as the trainer's
        step = lambda: train_step(policy, batch, cond, advantages, optimizer, params)  # noqa: E731
        row = run_case(Row("train", _case(mode, ckpt), res, b, note=note), step, settings)
        if row.status == "ok" and not ckpt:
            plain_flops = row.flops
        elif row.status == "ok":
            row = _without_recompute(row, plain_flops, policy, batch, cond)
        yield row
        for p in params:
            p.grad = None
        del optimizer, step
        free_memory(settings.device)
    policy.module.disable_gradient_checkpointing()


def _without_recompute(row: Row, plain_flops: int | None, policy: BenchPolicy, batch: Transitions,
                       cond: Conditioning) -> Row:
    """A checkpointed row's model FLOPs: the plain step's count, or (not measured) the executed count less one
    counted forward, which is the recompute up to the embedders and the output layer outside the blocks."""
    if plain_flops is not None:
        return dataclasses.replace(row, model_flops=plain_flops)
    forward = count_flops(torch.no_grad()(lambda: rescore(policy, batch, cond, NOISE)))
    return dataclasses.replace(row, model_flops=row.flops - forward,
                               note=row.note + "; model FLOPs = executed - one counted forward")


# ---- the run ---------------------------------------------------------------------------------------------------------
def run_bench(settings: BenchSettings, spec: ModelSpec, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Build the random models once and measure every section; ``on_row`` sees each row as it is measured."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        transformer = build_random(FluxTransformer2DModel, spec.transformer, settings.device, settings.dtype)
        vae = build_random(AutoencoderKL, spec.vae, settings.device, settings.dtype) if "decode" in settings.sections else None
    guidance = settings.guidance if spec.transformer.get("guidance_embeds") else None
    policy = BenchPolicy(FluxAdapter(transformer, guidance, settings.dtype), vae)
    rows: list[Row] = []
    for section in ("rollout", "decode", "train"):
        if section not in settings.sections:
            continue
        for row in _section_rows(section, policy, spec, settings, generator):
            rows.append(row)
            on_row(row)
        if section == "decode":
            policy.vae = None
            del vae
            free_memory(settings.device)
    return rows


def _section_rows(section: str, policy: BenchPolicy, spec: ModelSpec, settings: BenchSettings,
                  generator: torch.Generator) -> Iterator[Row]:
    if section == "train":
        yield from bench_train(policy, spec, settings, generator)
        return
    bench = bench_rollout if section == "rollout" else bench_decode
    for res in settings.resolutions:
        yield from bench(policy, spec, settings, res, generator)
