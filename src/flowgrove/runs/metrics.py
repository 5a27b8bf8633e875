"""Run-directory outputs: metrics.jsonl, TensorBoard events, sample grids and the reward curves (with bands)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowgrove.runs.rundir import atomic_write_text


class MetricsLogger:
    """Appends one JSON line per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume from ``resume_step``, lines and TensorBoard events of later steps (done by a killed run after its
    last checkpoint) are dropped, so every step appears once.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1  # TensorBoard hides older events from this step on
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (steps a killed run did past its last checkpoint), and a last line
    that a kill cut short. Atomic: a kill meanwhile leaves the old file."""
    if not Path(path).is_file():
        return
    lines = Path(path).read_text().splitlines()
    rows = [json.loads(line) for line in lines[:-1] if line.strip()]
    try:
        rows += [json.loads(lines[-1])] if lines and lines[-1].strip() else []
    except json.JSONDecodeError:
        pass
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= last_step))


GRID_MAX_SIDE = 4096  # pixels: a larger grid is shrunk to fit
TINY_SIDE = 64  # images smaller than this are enlarged (nearest) towards it, by at most ``scale``


@dataclass(frozen=True)
class GridLayout:
    """Shape of a sample grid: ``rows`` x ``columns`` images with 1-px gaps, enlarged ``scale`` times, then
    shrunk if needed so that the PNG (``width`` x ``height`` pixels) fits ``GRID_MAX_SIDE``."""

    rows: int
    columns: int
    scale: int
    width: int
    height: int


def grid_layout(n: int, height: int, width: int, columns: int, scale: int = 8, max_side: int = GRID_MAX_SIDE) -> GridLayout:
    """Layout of ``n`` images of ``height`` x ``width`` pixels: only tiny images are enlarged (8x8 digits 8x, 512-px
    images not at all), and the grid never exceeds ``max_side`` pixels a side."""
    if n < 1:
        raise ValueError("save_grid needs at least one image")
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    scale = max(1, min(scale, TINY_SIDE // max(height, width)))
    grid_h, grid_w = (rows * (height + 1) + 1) * scale, (columns * (width + 1) + 1) * scale
    shrink = min(1.0, max_side / max(grid_h, grid_w))
    return GridLayout(rows, columns, scale, max(1, round(grid_w * shrink)), max(1, round(grid_h * shrink)))


def _grid_image(images: Tensor, columns: int, scale: int):
    """Images [N, 3, H, W] in [0, 1] -> one PIL grid image (layout: :func:`grid_layout`)."""
    from PIL import Image

    n, _, h, w = images.shape
    layout = grid_layout(n, h, w, columns, scale)
    grid = torch.ones(3, layout.rows * (h + 1) + 1, layout.columns * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, layout.columns)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = images[i].float().cpu()
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    size = (layout.width, layout.height)
    if size != image.size:
        image = image.resize(size, Image.NEAREST if layout.width >= image.width else Image.LANCZOS)
    return image


STRIP_FRAMES = 8  # frames per video in the frame strip PNG (evenly spaced, first and last included)


def save_grid(images: Tensor, path: Path, columns: int, scale: int = 8, fps: float = 16.0) -> None:
    """Images [N, 3, H, W] in [0, 1] -> one PNG grid (layout: :func:`grid_layout`).

    Videos [N, F, 3, H, W] -> a frame strip PNG at ``path`` (one video per row, up to ``STRIP_FRAMES`` evenly
    spaced frames) and an animated GIF beside it (``path`` with suffix ``.gif``, ``fps`` frames per second, looping),
    whose frame ``f`` is the grid of every video's frame ``f``.
    """
    if images.ndim == 4:
        _grid_image(images, columns, scale).save(path)
        return
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"save_grid takes images [N, 3, H, W] or videos [N, F, 3, H, W], got {tuple(images.shape)}")
    from flowgrove.rewards.video import frame_indices

    index = frame_indices(images.shape[1], STRIP_FRAMES).to(images.device)
    strip = images.index_select(1, index)  # [N, n, 3, H, W]
    _grid_image(strip.flatten(0, 1), strip.shape[1], scale).save(path)
    frames = [_grid_image(images[:, f], columns, scale) for f in range(images.shape[1])]
    frames[0].save(Path(path).with_suffix(".gif"), save_all=True, append_images=frames[1:],
                   duration=round(1000 / fps), loop=0)


def plot_reward_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, xlabel: str, ylabel: str) -> None:
    """One line per label: {label: (x values, y values)} -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 12 else None)
    _finish(fig, ax, path, xlabel, ylabel)


@dataclass
class Band:
    """One curve with a band: x values, the mean at each and the band's half-width (NaN: no band there)."""

    xs: list[float]
    mean: list[float]
    half_width: list[float]


def plot_reward_bands(curves: dict[str, Band], path: Path, xlabel: str, ylabel: str) -> None:
    """One line per label with a shaded band ``mean +- half_width`` -> PNG (``bench --seeds N``: 95 % CI over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, band in curves.items():
        line, = ax.plot(band.xs, band.mean, label=label, marker="o" if len(band.xs) < 12 else None)
        low = [m - h for m, h in zip(band.mean, band.half_width)]
        high = [m + h for m, h in zip(band.mean, band.half_width)]
        ax.fill_between(band.xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    _finish(fig, ax, path, xlabel, ylabel)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str) -> None:
    """Label, grid and legend a reward plot, write it to ``path`` (PNG) and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
