"""Finding reward weights: a local path or the Hugging Face cache (``HF_HUB_OFFLINE`` respected), one-line errors.

Nothing here downloads on its own account: ``hf_hub_download`` and ``from_pretrained`` read the cache first and
go to the hub only when the user's environment allows it (``HF_HUB_OFFLINE=1`` makes them cache-only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


class Published(NamedTuple):
    """Where a reward's weights are published, for lookups in the HF cache and for error messages."""

    repo: str  # Hugging Face repo id (or a URL for files not on the hub)
    filename: str | None  # the file in ``repo``; None for a ``from_pretrained`` folder
    option: str  # the factory keyword that points at a local copy

    def where(self) -> str:
        """The download location shown in errors."""
        if self.repo.startswith("http"):
            return self.repo
        name = f"/blob/main/{self.filename}" if self.filename else ""
        return f"https://huggingface.co/{self.repo}{name}"


def missing(reward: str, published: Published, expected: str) -> FileNotFoundError:
    """The one-line error for absent weights: which file, where it was expected, where it is published."""
    what = published.filename or "model folder"
    return FileNotFoundError(
        f"{reward}: {what} not found at {expected}; it is published at {published.where()}: download it "
        f"(e.g. `hf download {published.repo}` into the Hugging Face cache) or pass {published.option}=PATH.")


def weight_file(path: str | Path | None, published: Published, reward: str) -> Path:
    """A local weight file: ``path`` itself, ``path / filename`` for a folder, or the HF cache when ``path`` is None.

    Raises:
        FileNotFoundError: One line naming the file, the expected path and where the weights are published.
    """
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_dir() and published.filename:
            candidate = candidate / published.filename
        if not candidate.is_file():
            raise missing(reward, published, str(candidate))
        return candidate
    if published.repo.startswith("http") or published.filename is None:
        raise missing(reward, published, f"{published.option}=None (no default location)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(published.repo, published.filename))
    except Exception as error:  # offline cache miss, no network, gated repo: all mean "not available here"
        expected = f"the Hugging Face cache ({published.repo}, {type(error).__name__})"
        raise missing(reward, published, expected) from None


def from_pretrained(load: Callable[[str], T], path: str | Path | None, published: Published, reward: str) -> T:
    """``load(path or published.repo)`` for a transformers folder, turning "not found" into the one-line error."""
    name = str(Path(path).expanduser()) if path is not None else published.repo
    if path is not None and not Path(name).is_dir() and Path(name).is_absolute():
        raise missing(reward, published, name)
    try:
        return load(name)
    except OSError as error:
        local = Path(name).is_dir()
        expected = name if local else f"{name!r} (neither a local folder nor in the Hugging Face cache)"
        if local:
            raise FileNotFoundError(f"{reward}: {name} is not a loadable model folder ({error}).") from None
        raise missing(reward, published, expected) from None


def load_state_dict(path: Path, reward: str) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or a torch ``.pt``/``.pth``/``.bin`` file (``weights_only``: no arbitrary unpickling)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{reward}: cannot read {path} as tensors ({type(error).__name__}: {error}).") from None
    for key in ("state_dict", "model"):  # HPS checkpoints wrap the weights in {"state_dict": ...}
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ValueError(f"{reward}: {path} holds a {type(data).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in data.items()}
