"""``report.html``: one self-contained page per run (images inline as base64, curves drawn with matplotlib):
reward curves (training and held-out, per reward and judge; hybrid inference's beside them when evaluated),
diversity, MMD^2 and KL curves, the evaluation grids over time (with the hybrid-inference grids), the guard's
alarms, the best checkpoint, the summary (the held-out reward before and after training side by side) and the
config. A run without periodic evaluation (``eval.every=0``) has none of the evaluation sections: its report says
so, and shows the held-out samples before and after training instead. Rebuilt at every evaluation and at the end
of a run; ``write_report(run_dir)`` rebuilds it from the files alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from flowgrove.runs.metrics import read_metrics
from flowgrove.runs.rundir import BEST_FILE, EVAL_FILE, GRIDS, REPORT, atomic_write_text

_PHASES = ("eval_start", "eval_best", "eval_end")  # summary.json's evaluations, shown side by side
HYBRID = "eval/hybrid/"  # as flowgrove.evaluation.evaluate.HYBRID (not imported: the report needs no torch)
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
          "img{image-rendering:pixelated;max-width:100%}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}.alarm{color:#b00}"
          ".row{display:flex;gap:24px;align-items:flex-start}img.half{width:49%}"
          "figure{display:inline-block;margin:4px;max-width:48%;vertical-align:top}pre{background:#f4f4f4;padding:8px;overflow:auto}")


# marks the body with how many images decoded (read by the headless-browser test; harmless to a reader)
_LOADED = ("<script>addEventListener('load',()=>{const i=[...document.images];"
           "document.body.dataset.images=i.length+'/'+i.filter(x=>x.naturalWidth>0).length})</script>")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot(curves: dict[str, tuple[list[float], list[float]]], title: str, css: str = "") -> str:
    """Curves {label: (steps, values)} -> an <img> tag (class ``css``) with the PNG inline; empty when there is
    nothing to draw."""
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f'<img class="{css}" alt="{html.escape(title)}" src="{_png_uri(buf.getvalue())}">'


def _label(key: str) -> str:
    """``eval/reward/x`` -> ``held-out reward/x``, ``eval/judge/x`` -> ``judge x``; ``eval/hybrid/...`` gets "hybrid"."""
    hybrid, key = key.startswith(HYBRID), "eval/" + key[len(HYBRID):] if key.startswith(HYBRID) else key
    text = "held-out " + key[len("eval/"):] if key.startswith("eval/reward") else "judge " + key.split("/")[-1]
    return f"hybrid {text}" if hybrid else text


def _reward_curves(train: list[dict], evals: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    curves = {"train reward (SDE rollouts)": _series(train, "reward_mean")}
    starts = ("eval/reward", "eval/judge/", HYBRID + "reward", HYBRID + "judge/")
    keys = sorted({k for r in evals for k in r if k.startswith(starts)})
    curves.update({_label(k): _series(evals, k) for k in keys})
    return curves


def _drift_curves(evals: list[dict], name: str, label: str) -> dict[str, tuple[list[float], list[float]]]:
    """The policy's ``eval/<name>`` and, when evaluated, hybrid inference's ``eval/hybrid/<name>``."""
    return {label: _series(evals, "eval/" + name), f"hybrid: {label}": _series(evals, HYBRID + name)}


def _figure(path: Path, caption: str) -> str:
    return f'<figure><img alt="{caption}" src="{_png_uri(path.read_bytes())}"><figcaption>{caption}</figcaption></figure>'


def _before_after_grids(run_dir: Path) -> str:
    """``samples_before.png`` and ``samples_after.png`` side by side (empty when neither exists yet)."""
    pairs = [(run_dir / f"samples_{when}.png", f"{when} training") for when in ("before", "after")]
    return "".join(_figure(path, caption) for path, caption in pairs if path.is_file())


def _grids(run_dir: Path) -> str:
    """Each evaluation's grid, with the hybrid-inference grid of the same step beside it when there is one."""
    grids = run_dir / GRIDS
    files = sorted(grids.glob("step_*.png")) if grids.is_dir() else []
    rows = []
    for p in files:
        hybrid = grids / "hybrid" / p.name
        pair = _figure(p, p.stem) + (_figure(hybrid, f"{p.stem} hybrid") if hybrid.is_file() else "")
        rows.append(f"<div>{pair}</div>")
    return "".join(rows) or "<p>No evaluation grids (set eval.every &gt; 0).</p>"


def _held_out(summary: dict) -> dict[str, dict]:
    """summary.json's ``heldout_<name>_before`` / ``_after`` -> {"before": {name: value}, "after": {name: value}}."""
    split = {"before": {}, "after": {}}
    for key, value in summary.items():
        for when, names in split.items():
            if key.startswith("heldout_") and key.endswith("_" + when):
                names[key[len("heldout_"):-len(when) - 1]] = value
    return {when: names for when, names in split.items() if names}


def _columns(columns: list[tuple[str, dict]]) -> str:
    """A table with one column per (name, {row: value}), rows in first-seen order."""
    keys = list(dict.fromkeys(key for _, column in columns for key in column))
    head = "<tr><th></th>" + "".join(f"<th>{name}</th>" for name, _ in columns) + "</tr>"
    rows = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{_fmt(c.get(k, ''))}</td>" for _, c in columns)
                   + "</tr>" for k in keys)
    return f"<table>{head}{rows}</table>"


def _summary(summary: dict) -> str:
    """The run's figures; beside them the held-out reward before and after training, and the evaluations at the
    start, at the best checkpoint and at the end (one column each) when the run evaluated periodically."""
    if not summary:
        return "<p>Running.</p>"
    held_out = _held_out(summary)
    plain = {k: v for k, v in summary.items() if k not in _PHASES and not (k.startswith("heldout_") and k.endswith(
        ("_before", "_after")))}
    phases = [(k[len("eval_"):], summary[k]) for k in _PHASES if isinstance(summary.get(k), dict)]
    tables = [_table(plain)] + [_columns(list(cols)) for cols in (held_out.items(), phases) if cols]
    return f'<div class="row">{"".join(tables)}</div>'


def _table(data: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in data.items())
    return f"<table>{rows}</table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return _table(value)
    return html.escape(str(value))


def _alarms(evals: list[dict]) -> str:
    items = [f'<li class="alarm">step {r["step"]}: {html.escape(m)}</li>' for r in evals for m in r.get("alarms", [])]
    return f"<ul>{''.join(items)}</ul>" if items else "<p>No alarms.</p>"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _eval_every(config: str) -> int | None:
    """``eval.every`` of the run's config.yaml text (None when the text does not say)."""
    try:
        data = yaml.safe_load(config)
    except yaml.YAMLError:
        return None
    every = data.get("eval", {}).get("every") if isinstance(data, dict) and isinstance(data.get("eval"), dict) else None
    return every if isinstance(every, int) else None


_NO_PERIODIC = ("<p>Periodic evaluation was off (eval.every=0): the held-out prompts were sampled only before and after "
                "training, so there is no best checkpoint, no guard and no diversity, MMD&sup2; or KL curve. Set "
                "eval.every=N to evaluate every N steps.</p>")


def _evaluations(evals: list[dict]) -> list[str]:
    """The sections of the periodic evaluations: the guard's alarms and the diversity and drift curves (each only
    when there is something to draw)."""
    drift = [_plot(_drift_curves(evals, "diversity_ratio", "diversity / base"), "within-prompt diversity over the base's",
                   "half"),
             _plot(_drift_curves(evals, "mmd2", "MMD^2 to base"), "MMD^2 (unbiased, RBF, median bandwidth)", "half"),
             _plot({"KL to base": _series(evals, "eval/kl")}, "KL of the transitions to the base model", "half")]
    return ["<h2>Guard alarms</h2>", _alarms(evals)] + (["<h2>Diversity and drift</h2>", *drift] if any(drift) else [])


def render_report(run_dir: Path) -> str:
    """The HTML text of the report of ``run_dir``."""
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir / "metrics.jsonl"), read_metrics(run_dir / EVAL_FILE)
    best = _read_json(run_dir / BEST_FILE)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    periodic = bool(evals) or _eval_every(config) != 0
    best_line = (f"<p>checkpoints/best: step {best['step']} ({best['criterion']} score {best['score']:.4f})</p>"
                 if best else "<p>No best checkpoint yet.</p>" if periodic else _NO_PERIODIC)
    grids = (["<h2>Evaluation grids (same prompts and seeds; one row per prompt; hybrid inference beside)</h2>",
              _grids(run_dir)] if periodic else
             ["<h2>Held-out samples before and after training (same prompts and seeds; one row per prompt)</h2>",
              _before_after_grids(run_dir) or "<p>Not written yet.</p>"])
    sections = [
        f"<h1>flowgrove run {html.escape(run_dir.name)}</h1>",
        "<h2>Summary</h2>", _summary(_read_json(run_dir / "summary.json")), best_line,
        *(_evaluations(evals) if periodic else []),
        "<h2>Rewards</h2>", _plot(_reward_curves(train, evals), "reward (train and held-out) and judges"),
        *grids,
        "<h2>Config</h2>", f"<pre>{html.escape(config)}</pre>",
    ]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>flowgrove {html.escape(run_dir.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}{_LOADED}</body></html>")


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path."""
    path = Path(run_dir) / REPORT
    atomic_write_text(path, render_report(Path(run_dir)))
    return path
