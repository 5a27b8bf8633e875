"""Command line: ``flowgrove train | memory | methods | tasks | sample | eval | export | report | bench | bench-model | rewards |
serve-reward | encode-prompts | pretrain`` (also ``python -m flowgrove``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from flowgrove.config.load import ConfigError, load_config, preset_names, preset_summary
from flowgrove.config.resume import RESUME_KEYS
from flowgrove.messages import error_message, one_line, program, user_fixable  # noqa: F401 (error_message: tests)

# Exit code of every error the user can fix (argparse uses it for usage errors too).
USAGE_EXIT = 2


def _train(args: argparse.Namespace) -> int:
    from flowgrove.recipes import train as runner

    if args.checkpoint and not args.resume:
        raise ConfigError(f"--checkpoint {args.checkpoint} picks the checkpoint of a resume; add --resume RUN_DIR")
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite starts a run afresh and --resume continues one; drop one of the two")
    if args.resume:
        if args.config or args.method:
            raise ConfigError("--resume continues a run with its saved config; drop CONFIG and --method (key=value "
                              "may change only the keys `flowgrove train --help` lists under --resume)")
        result = runner.resume(Path(args.resume), steps=args.steps, checkpoint=args.checkpoint, overrides=args.overrides)
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


def _tasks(args: argparse.Namespace) -> int:
    from flowgrove.tasks.catalog import DEFAULT_TASK, TASKS

    for name, summary in TASKS.items():
        print(f"{name:22s} {summary}{' [default]' if name == DEFAULT_TASK else ''}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from flowgrove.recipes import sample

    path = sample.sample_to_png(args.run, args.out, args.prompt, args.n, args.steps, args.seed, ema=args.ema,
                                hybrid_steps=args.hybrid_steps)
    print(f"wrote {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from flowgrove.recipes import sample

    print(json.dumps(sample.evaluate_run(args.run), indent=2))
    return 0


def _report_cmd(args: argparse.Namespace) -> int:
    from flowgrove.runs.report import write_report

    if not (Path(args.run) / "config.yaml").is_file():
        raise FileNotFoundError(f"{args.run} is not a run directory (no config.yaml); pass the folder of a `flowgrove train`")
    print(f"wrote {write_report(Path(args.run))}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from flowgrove.runs import export

    result = export.export_run(args.run, args.out, args.checkpoint, args.ema, args.overwrite)
    info = result.info
    print(f"wrote {result.out} ({info.kind}, {info.checkpoint}, {'EMA' if info.ema else 'raw'} weights); "
          f"{export.load_hint(result)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from flowgrove.recipes import bench

    bench.main(args)
    return 0


def _encode_prompts(args: argparse.Namespace) -> int:
    from flowgrove.training import prompts

    out = prompts.encode_prompt_file(args.prompts, args.policy, list(args.overrides), args.out, args.batch, args.shard_rows)
    print(f"wrote {out} ({prompts.read_index(out)['num_prompts']} prompts); train with data.cache={out}")
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from flowgrove.bench import model as bench_model

    return bench_model.main(args)


def _memory(args: argparse.Namespace) -> int:
    from flowgrove.recipes import memory

    if args.table:
        if args.config or args.overrides or args.json:
            raise ConfigError("--table predicts every shipped family at fixed settings; drop CONFIG, key=value and --json")
        print("\n".join(memory.table_lines()))
        return 0
    cfg = load_config(args.config, list(args.overrides), method=args.method)
    prediction = memory.predict_config(cfg, args.gpus, args.model)
    print(memory.report_json(prediction) if args.json else "\n".join(memory.report_lines(prediction)))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from flowgrove.recipes import pretrain

    return pretrain.main(args.rest) or 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit code 2), like every other flowgrove error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give 1 or more")
    return value


def _rewards(args: argparse.Namespace) -> int:
    from flowgrove.rewards.catalog import reward_summaries

    for name, summary in reward_summaries().items():
        print(f"{name:18s} {summary}")
    return 0


def _option_values(options: list[str]) -> dict[str, object]:
    """``["key=value", ...]`` -> ``{key: YAML value}`` (``ink=bright``, ``margin=0.2``, ``targets={a: b}``)."""
    import yaml

    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"reward option {item!r} is not key=value; e.g. `flowgrove serve-reward ocr ink=bright --port 18085`")
        parsed[key] = yaml.safe_load(value)
    return parsed


def _serve_reward(args: argparse.Namespace) -> int:
    from flowgrove.rewards import server as reward_server

    settings = reward_server.ServeSettings(args.host, args.port, args.token, args.max_concurrent, args.device, args.verbose)
    reward_server.serve(args.name, _option_values(args.options), settings)
    return 0


def _add_bench_model(sub: argparse._SubParsersAction) -> None:
    """The ``bench-model`` subparser (``flowgrove.bench.model.settings_from_args`` reads and checks its values)."""
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


def _add_memory(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The ``memory`` subparser."""
    p = sub.add_parser("memory", parents=[common], help="predict the peak GiB per GPU of a config before anything loads "
                       "(--table: what fits each shipped family on 24/48/80/141 GiB)")
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    p.add_argument("--method", help="method preset (see `flowgrove methods`)")
    p.add_argument("--gpus", type=positive_int, default=1, help="GPUs of the run (FSDP2 shards a full fine-tune over them)")
    p.add_argument("--model", help="shipped family to predict (default: policy.name's; `--table` lists them)")
    p.add_argument("--json", action="store_true", help="print the plan and GiB by line item as JSON")
    p.add_argument("--table", action="store_true", help="which settings fit each shipped family, LoRA and full, 1 and 8 GPUs")
    p.set_defaults(fn=_memory)


def _add_reward_and_data_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``encode-prompts``, ``rewards`` and ``serve-reward``."""
    p = sub.add_parser("encode-prompts", parents=[common], help="encode a prompt file once into a cache that training reads by rows")
    p.add_argument("prompts", help="prompt file: .txt, .jsonl or .csv")
    p.add_argument("--policy", default="digits", help="policy whose text encoders to run (policy.name)")
    p.add_argument("--out", required=True, help="cache folder (sharded safetensors + index.json)")
    p.add_argument("--batch", type=int, default=16, help="prompts per encoder call")
    p.add_argument("--shard-rows", type=int, default=1024, help="prompts per shard file")
    p.add_argument("overrides", nargs="*", help="policy settings, e.g. policy.path=/models/FLUX.1-dev policy.dtype=bfloat16")
    p.set_defaults(fn=_encode_prompts)
    p = sub.add_parser("rewards", parents=[common], help="list the registered rewards, one line each")
    p.set_defaults(fn=_rewards)
    p = sub.add_parser("serve-reward", parents=[common], help="serve a registered reward over HTTP for the `remote` reward")
    p.add_argument("name", help="reward name (see `flowgrove rewards`)")
    p.add_argument("options", nargs="*", help="factory options key=value before the flags, e.g. ink=bright")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves other machines; needs a token)")
    p.add_argument("--port", type=int, default=0, help="port 0..65535 (0 picks a free one and prints it)")
    p.add_argument("--token", help="shared secret the remote reward must send (default $FLOWGROVE_REWARD_TOKEN, "
                   "which other users cannot read in the process list); required beyond the loopback")
    p.add_argument("--max-concurrent", type=int, default=4, metavar="N",
                   help="requests read and scored at once; more are answered HTTP 503 (retry later)")
    p.add_argument("--device", help="torch device of the reward model and the received images")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    p.set_defaults(fn=_serve_reward)


def _add_export_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="write a run's checkpoint as files diffusers loads (LoRA or full model)")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="folder to write (new or empty)")
    p.add_argument("--checkpoint", metavar="step_N", help="export this checkpoint instead of the newest intact one")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="export the run's EMA weights (default: EMA when the run has it)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(fn=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flowgrove", description="GRPO alignment of flow-matching generators.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (for developers)")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks (for developers)")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    p = sub.add_parser("train", parents=[common], help="train a policy (default: the embedded digits task)")
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 rollout.group_size=12")
    p.add_argument("--method", help="method preset (see `flowgrove methods`)")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--out", help="run directory (run.out)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint; "
                   f"key=value may change only {', '.join(RESUME_KEYS)} (where and how it runs, not what it trains)")
    p.add_argument("--checkpoint", metavar="step_N", help="with --resume: continue from this checkpoint instead of the latest")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder that holds an earlier run: "
                   "every file that run wrote is removed (checkpoints included), other files stay")
    p.set_defaults(fn=_train)
    _add_memory(sub, common)
    sub.add_parser("methods", parents=[common], help="list the method presets").set_defaults(fn=_methods)
    sub.add_parser("tasks", parents=[common], help="list the embedded tasks (train task=NAME)").set_defaults(fn=_tasks)
    p = sub.add_parser("sample", parents=[common], help="sample images from a run's latest checkpoint (or the base policy) to a PNG grid")
    p.add_argument("--run", help="run directory (omit for the base policy of the default config)")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); default: the policy's built-in prompts")
    p.add_argument("--n", type=positive_int, default=8, help="images per prompt (>= 1)")
    p.add_argument("--steps", type=positive_int, default=16, help="Euler ODE steps (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="sample with the run's EMA weights (default: EMA when the run has it)")
    p.add_argument("--hybrid-steps", type=int, default=0, metavar="K",
                   help="MixGRPO hybrid inference: the run's weights for the first K steps, the base model's after")
    p.set_defaults(fn=_sample)
    p = sub.add_parser("eval", parents=[common], help="held-out reward of a run's latest checkpoint")
    p.add_argument("run")
    p.set_defaults(fn=_eval)
    _add_export_parser(sub, common)
    p = sub.add_parser("report", parents=[common], help="rebuild a run's report.html (curves, grids, alarms, summary)")
    p.add_argument("run")
    p.set_defaults(fn=_report_cmd)
    p = sub.add_parser("bench", parents=[common], help="run several presets side by side and compare time and reward")
    p.add_argument("--methods", default="dancegrpo,mixgrpo,mixgrpo-flash,mixgrpo-flash-star")
    p.add_argument("--steps", type=positive_int, default=20, help="training steps of every method and seed")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="seeds per method (train.seed = BASE + s, paired across methods); mean and 95%% CI over them")
    p.add_argument("--evals", type=positive_int, default=4, help="held-out evaluations along the run (<= --steps)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--reference", "--baseline", dest="reference", default="dancegrpo",
                   help="method the others are compared with: time ratio, gain and the reward to reach")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every method (METHOD:key=value: one)")
    p.set_defaults(fn=_bench)
    _add_reward_and_data_commands(sub, common)
    _add_bench_model(sub)
    p = sub.add_parser("pretrain", help="pretrain a built-in task's weights (flowgrove pretrain digits | numbers)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_pretrain)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``key=value`` items of ``train``, ``memory`` and ``bench`` may stand anywhere, also after options: pull them out."""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None or argv[command] not in ("train", "memory", "bench", "encode-prompts"):
        return argv, []
    tail = argv[command + 1:]
    overrides = [a for a in tail if "=" in a and not a.startswith("-")]
    return argv[: command + 1] + [a for a in tail if a not in overrides], overrides


def _check_args(args: argparse.Namespace) -> None:
    """Argument checks that need no model: a PNG path whose folder exists."""
    if args.command == "sample" and not Path(args.out).absolute().parent.is_dir():
        raise ConfigError(f"--out {args.out}: the folder {Path(args.out).absolute().parent} does not exist; create it or "
                          "pick another path")


def interrupt_message(args: argparse.Namespace | None) -> str:
    """One line after Ctrl-C: what stays valid and how to continue."""
    command = getattr(args, "command", None)
    if command in ("bench", "pretrain"):
        return f"flowgrove: interrupted (Ctrl-C); {command} stopped, the files it wrote so far stay"
    if command != "train":
        return "flowgrove: interrupted (Ctrl-C); nothing was written"
    run = args.resume or args.out
    if run is None:
        return (f"flowgrove: interrupted (Ctrl-C); checkpoints already written stay valid; continue with "
                f"`{program()} train --resume RUN_DIR` (RUN_DIR as listed under runs/)")
    if (Path(run) / "checkpoints" / "latest").is_file():
        return (f"flowgrove: interrupted (Ctrl-C); the last checkpoint in {run} stays valid; continue with "
                f"`{program()} train --resume {run}`")
    if Path(run).exists():
        return (f"flowgrove: interrupted (Ctrl-C) before the first checkpoint; {run} holds no checkpoint to resume "
                "(start again with --overwrite)")
    return "flowgrove: interrupted (Ctrl-C) during start-up; nothing was written"


INTERNAL_EXIT = 1  # a bug of flowgrove (or of a library under it), not something the user can fix


def _report(line: str, code: int = USAGE_EXIT) -> int:
    print(line, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user-fixable error is one line on stderr and exit code 2 (``--debug``: the traceback)."""
    argv, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    debug, args = "--debug" in argv, None
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if overrides:
            args.overrides = [*getattr(args, "overrides", []), *overrides]
        if args.command is None:
            parser.print_help()
            return USAGE_EXIT
        _check_args(args)
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        return _report(interrupt_message(args))
    except Exception as err:  # noqa: BLE001  (every error ends as one line; --debug shows the traceback)
        if debug:
            raise
        return _report(error_message(err), USAGE_EXIT if user_fixable(err) else INTERNAL_EXIT)


if __name__ == "__main__":
    sys.exit(main())
