"""Command line: ``flowgrove train | methods | sample | eval | bench | bench-model | pretrain`` (also ``python -m flowgrove``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowgrove.config import ConfigError, load_config, preset_names, preset_summary


def _train(args: argparse.Namespace) -> int:
    from flowgrove import runner

    if args.resume:
        if args.config or args.overrides or args.method:
            raise ConfigError("--resume continues a run with its saved config; drop CONFIG, --method and key=value overrides")
        result = runner.resume(Path(args.resume), steps=args.steps, checkpoint=args.checkpoint)
    else:
        overrides = list(args.overrides)
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        if args.out:
            overrides.append(f"run.out={args.out}")
        cfg = load_config(args.config, overrides, method=args.method)
        result = runner.train(cfg, overwrite=args.overwrite)
    s = result.summary
    if not s:  # ranks other than 0 of a torchrun job
        return 0
    print(f"flowgrove: {s['method']} {s['steps']} steps in {s['wall_seconds']:.0f} s, held-out reward "
          f"{s['heldout_reward_before']:.4f} -> {s['heldout_reward_after']:.4f}, NFE {s['nfe_old']:.1f}/{s['nfe_new']:.1f}; "
          f"run directory {result.run_dir}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(f"{name:22s} {preset_summary(name)}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from flowgrove import sample

    path = sample.sample_to_png(args.run, args.out, args.prompt, args.n, args.steps, args.seed, ema=args.ema)
    print(f"wrote {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from flowgrove import sample

    print(json.dumps(sample.evaluate_run(args.run), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from flowgrove import bench

    bench.main(args)
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from flowgrove import bench_model

    return bench_model.main(args)


def _pretrain(args: argparse.Namespace) -> int:
    from flowgrove import pretrain

    return pretrain.main(args.rest) or 0


def _add_bench_model(sub: argparse._SubParsersAction) -> None:
    """The ``bench-model`` subparser (``flowgrove.bench_model.settings_from_args`` reads and checks its values)."""
    p = sub.add_parser("bench-model", help="time FLUX-shaped rollout, training and VAE decode with random weights "
                       "(counted FLOPs, MFU, peak memory); --tiny on a CPU")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture at 32/64 px (a CPU runs it in seconds)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and autocast compute dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--resolutions", help="square image sides in pixels (default 720,1024; --tiny: 32,64)")
    p.add_argument("--rollout-batches", default="1,4,16", help="batch sizes of the rollout step (1 = one sample per call)")
    p.add_argument("--decode-batches", default="1,4", help="batch sizes of the VAE decode")
    p.add_argument("--train-batch", type=int, default=1, help="transitions per training step (micro-batch)")
    p.add_argument("--train-modes", default="lora,full", help="lora, full, or lora,full")
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
    p.set_defaults(fn=_bench_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowgrove", description="GRPO alignment of flow-matching generators.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (for developers)")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="train a policy (default: the embedded digits task)")
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 rollout.group_size=12")
    p.add_argument("--method", help="method preset (see `flowgrove methods`)")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--out", help="run directory (run.out)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--checkpoint", metavar="step_N", help="with --resume: continue from this checkpoint instead of the latest")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder that holds a partial run without a checkpoint")
    p.set_defaults(fn=_train)
    p = sub.add_parser("methods", help="list the method presets")
    p.set_defaults(fn=_methods)
    p = sub.add_parser("sample", help="sample images from a run's latest checkpoint (or the base policy) to a PNG grid")
    p.add_argument("--run", help="run directory (omit for the base policy of the default config)")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); default: the policy's built-in prompts")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--steps", type=int, default=16, help="Euler ODE steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="sample with the run's EMA weights (default: EMA when the run has it)")
    p.set_defaults(fn=_sample)
    p = sub.add_parser("eval", help="held-out reward of a run's latest checkpoint")
    p.add_argument("run")
    p.set_defaults(fn=_eval)
    p = sub.add_parser("bench", help="run several presets side by side and compare time and reward")
    p.add_argument("--methods", default="dancegrpo,mixgrpo,mixgrpo-flash,mixgrpo-flash-star")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--baseline", default="dancegrpo", help="method whose time is the ratio's denominator")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every method")
    p.set_defaults(fn=_bench)
    _add_bench_model(sub)
    p = sub.add_parser("pretrain", help="pretrain the built-in task's policy and reward (flowgrove pretrain digits)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    overrides: list[str] = []
    if argv and argv[0] in ("train", "bench"):  # key=value overrides may stand anywhere, also after options
        overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
        argv = [argv[0]] + [a for a in argv[1:] if a not in overrides]
    args = parser.parse_args(argv)
    if overrides:
        args.overrides = [*getattr(args, "overrides", []), *overrides]
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"flowgrove: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"flowgrove: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
