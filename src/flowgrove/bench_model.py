"""`flowgrove bench-model`: FLUX-shaped rollout, training and decode timings with random weights (no download).

A ``FluxTransformer2DModel`` and an ``AutoencoderKL`` are built from the configs under ``flowgrove/assets``
(FLUX.1-dev's shapes, or a tiny model of the same architecture with ``--tiny``) and driven through flowgrove's own
pieces: ``FluxAdapter`` (bf16 autocast), ``sde_step``, ``rescore`` + ``ppo_clip_loss`` + AdamW, and ``vae_decode``.
Prompt embeddings are random tensors of FLUX's shapes (T5 ``[B, 512, 4096]``, CLIP pooled ``[B, 768]``).

What a row measures (median of ``iters`` calls after a FLOP-counting call and ``warmup`` calls):

- ``rollout``: one denoising step (a batched velocity call and an SDE step with its log-prob) at batch ``B``. One
  sample per call, as the reference repositories roll out, costs the batch-1 time per sample; the speed-up column
  is ``B * t(1) / t(B)``.
- ``decode``: ``vae_decode`` of ``B`` latents at the resolution.
- ``train``: re-score ``B`` stored transitions, PPO-clip loss, backward, gradient clipping and an AdamW step, for
  LoRA and full fine-tuning, with and without gradient checkpointing.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on a call at the measured shapes (matmuls,
convolutions and attention; elementwise work is not counted). MFU uses model FLOPs (a checkpointed step's
recomputed forward is left out; HFU keeps it) over the device's dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils import flop_counter

from flowgrove.config import Config, PolicyConfig
from flowgrove.data import assets_dir
from flowgrove.losses import ppo_clip_loss
from flowgrove.policies.base import Conditioning
from flowgrove.policies.flux import DTYPES, FluxAdapter, vae_decode
from flowgrove.policies.prepare import apply_lora, enable_gradient_checkpointing, float32_masters
from flowgrove.rollout import Transitions, rescore
from flowgrove.samplers.steps import noise_g, sde_step
from flowgrove.types import StepOutput

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first name contained in
# torch.cuda.get_device_name() wins, so longer names come before their prefixes (H100 PCIe before H100).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("H20", 148.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
)
TARGETS = {"rollout_mfu": 0.50, "train_mfu": 0.40, "batched_speedup": 5.0}  # issue 8, judged on a GPU run
SIGMA, SIGMA_NEXT, ETA = 0.5, 0.45, 0.3  # one mid-trajectory step, DanceGRPO's constant g
CLIP_RANGE, ADV_CLIP, LR = 1e-4, 5.0, 1e-5


@dataclass(frozen=True)
class ModelSpec:
    """What bench-model builds: diffusers configs of the transformer and the VAE, and the prompt shapes."""

    name: str
    transformer: dict  # FluxTransformer2DModel keyword arguments
    vae: dict  # AutoencoderKL keyword arguments
    text_tokens: int  # T5 tokens per prompt (FLUX.1-dev: max_sequence_length 512)


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


class TargetCheck(NamedTuple):
    """One issue-8 target judged on the rows of one resolution."""

    name: str
    resolution: int
    value: float | None
    target: float
    met: bool | None  # None: not measurable here (CPU without a peak, or no matching row)
    detail: str


class Measured(NamedTuple):
    flops: int
    seconds: list[float]
    peak_memory_gib: float | None


# ---- models and inputs ---------------------------------------------------------------------------------------------
def read_config(name: str) -> dict:
    """A shipped diffusers config (``flowgrove/assets/<name>.json``) without its ``_``-prefixed keys."""
    data = json.loads((assets_dir() / f"{name}.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def model_spec(tiny: bool) -> ModelSpec:
    """FLUX.1-dev's transformer and VAE configs, or the tiny ones of the same architecture (``--tiny``)."""
    if tiny:
        return ModelSpec("flux-tiny", read_config("flux_tiny_transformer"), read_config("flux_tiny_vae"), text_tokens=8)
    return ModelSpec("flux1-dev", read_config("flux1_dev_transformer"), read_config("flux1_dev_vae"), text_tokens=512)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_random(cls: type, config: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``cls(**config)`` with random weights created directly on ``device`` in ``dtype`` (no float32 host copy)."""
    with torch.device(device), _default_dtype(dtype):
        module = cls(**config)
    cast_parameters(module, dtype)  # a module that fixes its own dtype still ends up in dtype
    return module.requires_grad_(False).eval()


def latent_side(resolution: int, vae_config: dict) -> int:
    """Latent side of a square image, as ``FluxPipeline.prepare_latents``: ``2 * (pixels // (vae_scale * 2))``."""
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    side = 2 * (resolution // (vae_scale * 2))
    if side < 2:
        raise ValueError(f"resolution {resolution} is below one 2x2 latent patch ({vae_scale * 2} pixels)")
    return side


def random_conditioning(batch: int, spec: ModelSpec, device: torch.device, generator: torch.Generator) -> Conditioning:
    """Random prompt embeddings of FLUX's shapes: T5 ``[B, L, joint_attention_dim]``, pooled CLIP ``[B, P]``."""
    t = spec.transformer
    embeds = torch.randn(batch, spec.text_tokens, t["joint_attention_dim"], generator=generator)  # [B, L, D]
    pooled = torch.randn(batch, t["pooled_projection_dim"], generator=generator)  # [B, P]
    return Conditioning(embeds, pooled).to(device)


def random_latents(batch: int, side: int, spec: ModelSpec, device: torch.device, generator: torch.Generator) -> Tensor:
    """Float32 latents ``[B, C, H, W]`` (rollouts keep latents in float32), C = in_channels / 4 (2x2 packing)."""
    channels = spec.transformer["in_channels"] // 4
    return torch.randn(batch, channels, side, side, generator=generator).to(device)  # [B, C, H, W]


class BenchPolicy:
    """What ``rescore`` and ``apply_lora`` use of a ``FlowPolicy`` (``module``, ``velocity``, ``decode``) over a
    random FLUX transformer (through ``FluxAdapter``) and VAE; prompts are random, latent sizes vary by row."""

    def __init__(self, adapter: FluxAdapter, vae: nn.Module | None) -> None:
        self.adapter = adapter
        self.vae = vae

    @property
    def module(self) -> nn.Module:
        return self.adapter.transformer

    @module.setter
    def module(self, value: nn.Module) -> None:
        self.adapter.transformer = value

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError("bench-model uses random prompt embeddings (random_conditioning)")

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.adapter.velocity(x, sigma, cond)  # [B, C, H, W]

    def decode(self, x: Tensor) -> Tensor:
        return vae_decode(self.vae, x)  # [B, 3, H', W']


# ---- the measured calls ----------------------------------------------------------------------------------------------
def sde_transition(policy: BenchPolicy, x: Tensor, cond: Conditioning, generator: torch.Generator) -> StepOutput:
    """One denoising step as ``rollout`` takes it: a batched velocity call, then an SDE step with its log-prob."""
    velocity = policy.velocity(x, x.new_full((x.shape[0],), SIGMA), cond).float()  # [B, C, H, W]
    g = noise_g("constant", ETA, SIGMA, SIGMA_NEXT)
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
    g = noise_g("constant", ETA, SIGMA, SIGMA_NEXT)
    return Transitions(x, out.x_next, full(SIGMA), full(SIGMA_NEXT), full(g), full(1.0), out.log_prob, index,
                       torch.ones_like(index), index)


def train_step(policy: BenchPolicy, batch: Transitions, cond: Conditioning, advantages: Tensor,
               optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> Tensor:
    """The trainer's micro-step and update: ``rescore``, PPO-clip loss, backward, clip to norm 1, AdamW step."""
    log_prob, _ = rescore(policy, batch, cond)  # [E]
    loss = ppo_clip_loss(log_prob, batch.old_log_prob, advantages, CLIP_RANGE, ADV_CLIP).loss  # []
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---- counting, timing, memory ----------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels (flash, efficient, cuDNN) but not the CPU flash kernel.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as executed (matmuls, convolutions, attention), by ``FlopCounterMode``."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of ``iters`` calls after ``warmup`` calls: CUDA events on a GPU, ``time.perf_counter`` on a CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        seconds = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return seconds
    torch.cuda.synchronize(device)
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset; CPU: the process's peak RSS since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak memory = torch.cuda.max_memory_allocated per case (GiB; resident weights included)"
    return "peak memory = the process's peak RSS since it started (GiB; resource.getrusage, not per case)"


def measure(fn: Callable[[], object], settings: BenchSettings) -> Measured:
    """Count the FLOPs of one call (it also warms up), then time ``iters`` calls after ``warmup`` more."""
    reset_peak_memory(settings.device)
    flops = count_flops(fn)
    seconds = time_calls(fn, settings.device, settings.warmup, settings.iters)
    return Measured(flops, seconds, peak_memory_gib(settings.device))


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Hand cached CUDA blocks back; ``collect`` also runs the garbage collector (after an OOM or a mode: its
    traceback and the optimizer hold tensors in cycles). gc takes ~0.5 s with diffusers loaded, so not per row."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(row: Row, fn: Callable[[], object], settings: BenchSettings) -> Row:
    """``row`` filled in from ``measure(fn)``; an out-of-memory error marks it ``oom`` instead of stopping the run."""
    try:
        m = measure(fn, settings)
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


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


# ---- throughput ----------------------------------------------------------------------------------------------------
def device_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from): ``--peak-tflops``, the table by device name, or none."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops must be > 0, got {override}")
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on a CPU: pass --peak-tflops to get TFLOP/s and MFU"
    name = torch.cuda.get_device_name(device)
    match = peak_for_name(name)
    if match is None:
        return None, f"{name!r} is not in the peak table: pass --peak-tflops"
    return match[1], f"table: {match[0]} dense bf16"


def peak_for_name(name: str) -> tuple[str, float] | None:
    """(table key, dense bf16 TFLOP/s) of the first ``PEAK_BF16_TFLOPS`` key contained in a device name."""
    return next(((key, tflops) for key, tflops in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def with_throughput(row: Row, peak_tflops: float | None) -> Row:
    """Achieved TFLOP/s, MFU (model FLOPs) and HFU (executed FLOPs) of a measured row; n/a without a peak."""
    if row.status != "ok" or peak_tflops is None or not row.seconds:
        return row
    tflops = row.model_flops / row.seconds / 1e12
    hfu = row.flops / row.seconds / 1e12 / peak_tflops
    return dataclasses.replace(row, tflops=tflops, mfu=tflops / peak_tflops, hfu=hfu)


def with_speedups(rows: list[Row]) -> list[Row]:
    """Rollout rows with ``B * t(1) / t(B)``: batched against one sample per call (the batch-1 row)."""
    single = {r.resolution: r.seconds for r in rows if r.section == "rollout" and r.batch == 1 and r.status == "ok"}
    out = []
    for r in rows:
        if r.section == "rollout" and r.status == "ok" and r.resolution in single:
            r = dataclasses.replace(r, speedup_vs_one_per_call=r.batch * single[r.resolution] / r.seconds)
        out.append(r)
    return out


def target_checks(rows: list[Row]) -> list[TargetCheck]:
    """Issue 8's targets per resolution: rollout MFU at batch >= 16, training-step MFU, batched speed-up."""
    checks = []
    for res in sorted({r.resolution for r in rows}):
        ok = [r for r in rows if r.resolution == res and r.status == "ok"]
        big = [r for r in ok if r.section == "rollout" and r.batch >= 16]
        best = max(big, key=lambda r: r.mfu or 0.0, default=None)
        checks.append(_check("rollout MFU at batch >= 16", res, best and best.mfu, TARGETS["rollout_mfu"],
                             f"batch {best.batch}" if best else "no rollout row at batch >= 16"))
        for r in (r for r in ok if r.section == "train"):
            checks.append(_check(f"training step MFU ({r.case})", res, r.mfu, TARGETS["train_mfu"], f"batch {r.batch}"))
        batched = [r for r in ok if r.section == "rollout" and r.batch > 1 and r.speedup_vs_one_per_call]
        top = max(batched, key=lambda r: r.batch, default=None)
        checks.append(_check("batched vs one sample per call, per sample", res, top and top.speedup_vs_one_per_call,
                             TARGETS["batched_speedup"], f"batch {top.batch} vs batch 1" if top else "no batched row"))
    return checks


def _check(name: str, res: int, value: float | None, target: float, detail: str) -> TargetCheck:
    return TargetCheck(name, res, value, target, None if value is None else value >= target, detail)


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


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter in ``dtype``, in place (as ``float32_masters``; ``ModelMixin.to`` warns about dtypes)."""
    with torch.no_grad():
        for param in module.parameters():
            if param.dtype != dtype:
                param.data = param.data.to(dtype)


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
    forward = count_flops(torch.no_grad()(lambda: rescore(policy, batch, cond)))
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


# ---- report, table and command line ----------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict:
    """The device named as ``flowgrove bench`` does: absolute times only with the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda}
    return {"type": device.type, "name": f"{device.type}, {torch.get_num_threads()} threads"}


def build_report(settings: BenchSettings, spec: ModelSpec, rows: list[Row], params: dict[str, int]) -> dict:
    """The JSON document: device, peak, model, settings, rows (with throughput and speed-ups) and targets."""
    import diffusers

    peak, peak_source = device_peak_tflops(settings.device, settings.peak_tflops)
    if peak is not None and settings.dtype == torch.float32:
        peak_source += "; float32 compute cannot reach a bf16 peak"
    rows = with_speedups([with_throughput(r, peak) for r in rows])
    plain = {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v)
             for k, v in dataclasses.asdict(settings).items()}
    return {
        "device": device_info(settings.device),
        "peak_tflops": peak, "peak_source": peak_source,
        "memory": memory_label(settings.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "model": {"name": spec.name, "parameters": params, "text_tokens": spec.text_tokens,
                  "transformer_config": spec.transformer, "vae_config": spec.vae},
        "settings": plain,
        "rows": [{**dataclasses.asdict(r), "seconds_per_sample": r.seconds_per_sample} for r in rows],
        "targets": [c._asdict() for c in target_checks(rows)],
    }


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def format_table(report: dict) -> str:
    """A markdown table of the rows, then the targets, for a terminal or a README."""
    dev = report["device"]
    lines = [
        f"flowgrove bench-model: {report['model']['name']} "
        f"({report['model']['parameters']['transformer'] / 1e6:.1f}M transformer parameters) on {dev['name']}, "
        f"{report['settings']['dtype']}; peak {_fmt(report['peak_tflops'], '.0f')} TFLOP/s ({report['peak_source']})",
        f"{report['memory']}",
        "",
        "| res | section | case | batch | ms/call | ms/sample | speed-up vs 1/call | GFLOP/call | TFLOP/s | MFU | HFU "
        "| peak GiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['resolution']} | {r['section']} | {r['case']} | {r['batch']} | {r['status']} "
                         f"| | | | | | | | {r['note']} |")
            continue
        lines.append(
            f"| {r['resolution']} | {r['section']} | {r['case']} | {r['batch']} | {_fmt(r['seconds'], '.2f', 1e3)} "
            f"| {_fmt(r['seconds_per_sample'], '.2f', 1e3)} | {_fmt(r['speedup_vs_one_per_call'], '.2f')} "
            f"| {_fmt(r['model_flops'], '.3g', 1e-9)} | {_fmt(r['tflops'], '.3g')} | {_fmt(r['mfu'], '.1%')} "
            f"| {_fmt(r['hfu'], '.1%')} | {_fmt(r['peak_memory_gib'], '.2f')} | {r['note']} |")
    lines += ["", "Targets (issue 8):"]
    for c in report["targets"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[c["met"]]
        value = _fmt(c["value"], ".2f") + ("x" if "per sample" in c["name"] else "")
        if c["value"] is not None and "MFU" in c["name"]:
            value = _fmt(c["value"], ".1%")
        target = f"{c['target']:.0%}" if "MFU" in c["name"] else f"{c['target']:g}x"
        lines.append(f"- {c['resolution']}px {c['name']}: {value} (target >= {target}, {c['detail']}): {verdict}")
    return "\n".join(lines)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} takes comma-separated integers, e.g. 1,4,16; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} needs positive integers, got {text!r}")
    return values


def _names(text: str, what: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(v.strip() for v in str(text).split(",") if v.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{what} takes a comma-separated subset of {', '.join(allowed)}; got {text!r}")
    return names


def settings_from_args(args) -> tuple[BenchSettings, ModelSpec]:
    """``BenchSettings`` from the ``bench-model`` arguments; bad values are errors that name the flag."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu --tiny")
    if device.type != "cuda" and not args.tiny:
        raise ValueError("the FLUX.1-dev shape (12B parameters) needs a GPU; on a CPU run `flowgrove bench-model --tiny`")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    default_res = "32,64" if args.tiny else "720,1024"
    checkpointing = {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]
    settings = BenchSettings(
        device=device, dtype=DTYPES[dtype], resolutions=_ints(args.resolutions or default_res, "--resolutions"),
        rollout_batches=_ints(args.rollout_batches, "--rollout-batches"),
        decode_batches=_ints(args.decode_batches, "--decode-batches"), train_batch=args.train_batch,
        train_modes=_names(args.train_modes, "--train-modes", ("lora", "full")), checkpointing=checkpointing,
        sections=_names(args.sections, "--sections", ("rollout", "decode", "train")), warmup=args.warmup,
        iters=args.iters, lora_rank=args.lora_rank, full_masters=args.full_masters, peak_tflops=args.peak_tflops,
        seed=args.seed,
    )
    if settings.iters < 1 or settings.warmup < 0 or settings.train_batch < 1 or settings.lora_rank < 1:
        raise ValueError("--iters, --train-batch and --lora-rank must be >= 1 and --warmup >= 0")
    device_peak_tflops(device, settings.peak_tflops)  # a bad --peak-tflops fails before the models are built
    return settings, model_spec(args.tiny)


def add_arguments(p) -> None:
    """The ``bench-model`` flags (``cli.build_parser`` adds the subparser)."""
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture at 32/64 px (a CPU runs it in seconds)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and autocast compute dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--resolutions", help="square image sides in pixels (default 720,1024; --tiny: 32,64)")
    p.add_argument("--rollout-batches", default="1,4,16", help="batch sizes of the rollout step (1 = one sample per call)")
    p.add_argument("--decode-batches", default="1,4", help="batch sizes of the VAE decode")
    p.add_argument("--train-batch", type=int, default=1, help="transitions per training step (micro-batch)")
    p.add_argument("--train-modes", default="lora,full", help="lora, full or both")
    p.add_argument("--checkpointing", default="both", choices=("off", "on", "both"), help="gradient checkpointing of the training step")
    p.add_argument("--sections", default="rollout,decode,train", help="what to measure")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the FLOP-counting call")
    p.add_argument("--iters", type=int, default=3, help="timed calls per row (the median is reported)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--full-masters", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="trainable weights and AdamW state of full fine-tuning (auto: float32 if it fits, else bfloat16)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: a table of GPUs; none on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-model", help="folder for bench_model.json and bench_model.md")


def main(args) -> int:
    """Run the benchmark; write ``bench_model.json`` after every row (a cut-off run keeps what it measured) and
    ``bench_model.md`` (the table) at the end, and print the table."""
    from pathlib import Path

    settings, spec = settings_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    params: dict[str, int] = {}

    def write(row: Row | None = None) -> dict:
        if row is not None:
            rows.append(row)
            print(f"bench-model: {row.resolution}px {row.section} {row.case} batch {row.batch}: "
                  f"{_fmt(row.seconds, '.2f', 1e3)} ms ({row.status})", flush=True)
        report = build_report(settings, spec, rows, params)
        (out / "bench_model.json").write_text(json.dumps(report, indent=2))
        return report

    params.update(model_parameters(spec))
    run_bench(settings, spec, on_row=write)
    table = format_table(write())
    (out / "bench_model.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'bench_model.json'} and {out / 'bench_model.md'}")
    return 0


def model_parameters(spec: ModelSpec) -> dict[str, int]:
    """Parameter counts of the transformer and the VAE, from models built on the meta device (no memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in cls(**cfg).parameters())
                  for name, cls, cfg in (("transformer", FluxTransformer2DModel, spec.transformer),
                                         ("vae", AutoencoderKL, spec.vae))}
    return counts
