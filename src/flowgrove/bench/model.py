"""`flowgrove bench-model`: FLUX-shaped rollout, training and decode timings with random weights (no download).

A ``FluxTransformer2DModel`` and an ``AutoencoderKL`` are built from the configs under ``flowgrove/assets``
(FLUX.1-dev's shapes, or a tiny model of the same architecture with ``--tiny``; ``bench_models``) and driven through
flowgrove's own pieces: ``FluxAdapter`` (bf16 autocast), ``sde_step``, ``rescore`` + ``ppo_clip_loss`` + AdamW and
``vae_decode`` (``bench_cases``). FLOPs are counted at the measured shapes, calls timed with CUDA events or
``perf_counter`` (``perf``). This module turns the rows into the report: achieved TFLOP/s, MFU (model FLOPs: a
checkpointed step's recomputed forward is left out; HFU keeps it) over the device's dense bf16 peak, the speed-up of
batched rollouts over one sample per call, issue 8's targets, the JSON and the table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch

from flowgrove.bench.cases import BenchSettings, Row, run_bench
from flowgrove.bench.models import ModelSpec, model_parameters, model_spec
from flowgrove.bench.perf import device_info, device_peak_tflops, memory_label
from flowgrove.policies.flux import DTYPES

TARGETS = {"rollout_mfu": 0.50, "train_mfu": 0.40, "batched_speedup": 5.0}  # issue 8, judged on a GPU run


class TargetCheck(NamedTuple):
    """One issue-8 target judged on the rows of one resolution."""

    name: str
    resolution: int
    value: float | None
    target: float
    met: bool | None  # None: not measurable here (CPU without a peak, or no matching row)
    detail: str


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
    """``BenchSettings`` from the ``bench-model`` arguments (``cli.build_parser``); bad values are errors that name
    the flag."""
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


def main(args) -> int:
    """Run the benchmark; write ``bench_model.json`` after every row (a cut-off run keeps what it measured) and
    ``bench_model.md`` (the table) at the end, and print the table."""
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
