"""Prompt data: files (txt, jsonl, csv) with metadata for the rewards, and encoder-output caches.

A :class:`Prompt` is a ``str`` that carries its file's other columns in ``metadata`` (the text an OCR reward must
find, GenEval's object tags, ...), so every reward keeps the ``(images, prompts)`` contract and those that need
metadata read ``getattr(prompt, "metadata", {})``. A row's ``image`` (an edit model's input image, a path relative
to the prompt file; several: a jsonl list or a csv cell of ``;``-separated paths, for Qwen-Image-Edit-2509's
``QwenImageEditPlusPipeline``) is checked when the file is read and kept as absolute paths: ``metadata["images"]``
all of them in order, ``metadata["image"]`` the first (the image being edited). The edit policies encode them with
the prompt (and ``encode-prompts`` caches them), the rewards that compare input and output (``clip_direction``) open
``metadata["image"]``.

``flowgrove encode-prompts`` writes a policy's encoder outputs as sharded safetensors with an ``index.json``;
:class:`CachedPrompts` reads back only the rows a step needs (safetensors slices are memory-mapped), so a large
prompt set never sits in memory or on the GPU.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from flowgrove.messages import note
from flowgrove.parallel import distributed
from flowgrove.policies.base import Conditioning, EncodedPrompts, FlowPolicy, PromptRows  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from flowgrove.config.load import Config

INDEX = "index.json"
CACHE_FORMAT = "flowgrove-prompt-cache-1"
FIELDS = tuple(f.name for f in dataclasses.fields(Conditioning))  # every Conditioning field (negatives included)


class Prompt(str):
    """A prompt string with the metadata of its row (``metadata``: column -> value)."""

    metadata: dict[str, Any]

    def __new__(cls, text: str, metadata: Mapping[str, Any] | None = None) -> Prompt:
        obj = super().__new__(cls, text)
        obj.metadata = dict(metadata or {})
        return obj

    def __reduce__(self):  # keep the metadata through pickling (worker processes, torch.save)
        return (Prompt, (str(self), self.metadata))


def _bad(path: Path, line: int | None, what: str) -> ValueError:
    where = f"{path}:{line}" if line is not None else str(path)
    return ValueError(f"{where}: {what}")


def input_image_path(value: Any, path: Path, line: int) -> str:
    """The absolute path of a row's input image ``value`` (relative to the prompt file ``path``), once the file is
    there and its header reads as an image (PIL; the pixels are read when the image is used).

    Raises:
        ValueError: naming the prompt file, the row and the image.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise _bad(path, line, f'"image" must be a path relative to the prompt file, got {value!r}')
    image = (path.parent / value).absolute()
    if not image.is_file():
        raise _bad(path, line, f"image {value!r} ({image}) does not exist; give a path relative to the prompt file")
    try:
        with Image.open(image) as opened:
            opened.size  # noqa: B018 (the header is parsed here)
    except (UnidentifiedImageError, OSError) as err:
        raise _bad(path, line, f"image {value!r} ({image}) is not a readable image ({type(err).__name__}); give a "
                               "PNG, JPEG or WebP file") from None
    return str(image)


IMAGE_SEPARATOR = ";"  # between the paths of a csv ``image`` cell with several input images


def input_image_values(value: Any, path: Path, line: int) -> list[Any]:
    """The input images a row's ``image`` field names: a jsonl list as it is, a string split at ``;`` (a csv cell, or
    a jsonl string) with blanks around each path dropped; ``[]`` for none (an empty cell, null).

    Raises:
        ValueError: an empty list, or an empty path between separators (naming the prompt file and the row).
    """
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [part.strip() for part in value.split(IMAGE_SEPARATOR)]
    if isinstance(value, list) and (not value or "" in value):
        what = "an empty path" if value else "no path"
        raise _bad(path, line, f'"image" {value!r} holds {what}; give one path or several (a jsonl list, or '
                               f'"{IMAGE_SEPARATOR}"-separated in a csv cell), each relative to the prompt file')
    return value if isinstance(value, list) else [value]


def _from_record(record: Any, path: Path, line: int) -> Prompt:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise _bad(path, line, 'each row needs a non-empty "prompt" field (other fields become metadata for the rewards)')
    if "images" in record:  # the resolved paths' key: a field of that name would be overwritten or taken for them
        raise _bad(path, line, '"images" is the name flowgrove gives the resolved input images; name them in "image" '
                               f'(one path, a jsonl list, or "{IMAGE_SEPARATOR}"-separated in a csv cell)')
    metadata = {k: v for k, v in record.items() if k not in ("prompt", "image")}
    images = [input_image_path(value, path, line) for value in input_image_values(record.get("image"), path, line)]
    if images:  # a csv row without an input image has no "image" key
        metadata.update(image=images[0], images=images)
    return Prompt(record["prompt"].strip(), metadata)


def read_prompts(path: str | Path, key: str = "prompt file") -> list[Prompt]:
    """Prompts of a ``.txt`` (one per line), ``.jsonl`` (one object per line with ``"prompt"``) or ``.csv`` (a
    ``prompt`` column) file; every other field or column is kept as the prompt's metadata, an ``image`` (one path or
    several, :func:`input_image_values`) as absolute paths in ``images`` and the first in ``image``
    (:func:`input_image_path`). Errors name ``key``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{key}={str(path)!r} is a folder; give a .txt, .jsonl or .csv file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist; give a .txt, .jsonl or .csv file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise _bad(path, line, f"{key} is not UTF-8 text (byte {err.object[err.start]:#04x}); save the file as "
                               "UTF-8") from None
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _bad(path, number, f"not a JSON object ({err.msg}); write one object per line") from None
                prompts.append(_from_record(record, path, number))
    elif suffix == ".csv":
        rows = csv.DictReader(text.splitlines())
        if "prompt" not in (rows.fieldnames or []):
            raise _bad(path, 1, f"the header needs a 'prompt' column, got {rows.fieldnames}")
        prompts = [_from_record(row, path, number) for number, row in enumerate(rows, start=2)]
    elif suffix in (".txt", ""):
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        raise _bad(path, None, f"unknown prompt file type {suffix!r}; use .txt, .jsonl or .csv")
    if not prompts:
        raise _bad(path, None, "holds no prompts; write one prompt per line (txt), object (jsonl) or row (csv)")
    return prompts


class CachedPrompts:
    """Rows of an ``encode-prompts`` cache, read per request from memory-mapped safetensors shards."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self._starts = [shard["start"] for shard in self.index["shards"]]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self.index["num_prompts"])

    def prompts(self) -> list[Prompt]:
        return [Prompt(r["prompt"], r.get("metadata")) for r in self.index["prompts"]]

    def _shard(self, row: int) -> tuple[Any, int]:
        from bisect import bisect_right

        from safetensors import safe_open

        shard = self.index["shards"][bisect_right(self._starts, row) - 1]
        if shard["file"] not in self._handles:
            self._handles[shard["file"]] = safe_open(str(self.folder / shard["file"]), framework="pt")
        return self._handles[shard["file"]], row - shard["start"]

    def rows(self, ids: Tensor) -> Conditioning:
        n = len(self)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise IndexError(f"prompt rows {ids.tolist()} outside the cache's {n} prompts ({self.folder})")
        parts: dict[str, list[Tensor]] = {f: [] for f in self.index["fields"]}
        for row in ids.tolist():
            handle, local = self._shard(row)
            for f in parts:
                parts[f].append(handle.get_slice(f)[local:local + 1])  # [1, ...]: only this row is read
        return Conditioning(**{f: torch.cat(v) for f, v in parts.items()})


# ---- writing a cache ---------------------------------------------------------------------------------------------
def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"data.cache={str(folder)!r} has no {INDEX}; write one with `flowgrove encode-prompts`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}); rewrite the cache with `flowgrove encode-prompts`") from None
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a flowgrove prompt cache (format {index.get('format')!r}); "
                         "rewrite it with `flowgrove encode-prompts`")
    return index


def write_cache(policy: FlowPolicy, prompts: Sequence[Prompt], folder: str | Path, policy_name: str,
                batch: int = 16, shard_rows: int = 1024, fingerprint: Mapping[str, Any] | None = None) -> Path:
    """Encode ``prompts`` in batches of ``batch`` and write shards of ``shard_rows`` rows plus ``index.json``
    (written last, atomically: a cache without its index is not a cache)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, fields = [], None
    for start in range(0, len(prompts), shard_rows):
        chunk = list(prompts[start:start + shard_rows])
        with torch.no_grad():
            parts = [policy.encode_prompts(chunk[i:i + batch]) for i in range(0, len(chunk), batch)]
        fields = [f for f in FIELDS if getattr(parts[0], f) is not None]
        tensors = {f: torch.cat([getattr(p, f) for p in parts]).cpu().contiguous() for f in fields}
        name = f"shard_{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        shards.append({"file": name, "start": start, "count": len(chunk)})
    index = {
        "format": CACHE_FORMAT, "policy": policy_name, "fingerprint": dict(fingerprint or {}), "fields": fields,
        "num_prompts": len(prompts), "shards": shards,
        "prompts": [{"prompt": str(p), "metadata": getattr(p, "metadata", {})} for p in prompts],
    }
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, folder / INDEX)
    return folder


@dataclasses.dataclass
class PromptFiles:
    """The prompt files a config names, read before any model loads (None where it names none)."""

    train: list[Prompt] | None  # data.train
    test: list[Prompt] | None  # data.test
    cache: CachedPrompts | None  # data.cache (its index only; rows are read per step)


def read_prompt_files(cfg: Config) -> PromptFiles:
    """``data.train``, ``data.test`` and ``data.cache``'s index, each checked (errors name the key and the file)."""
    d = cfg.data
    files = PromptFiles(read_prompts(d.train, "data.train") if d.train else None,
                        read_prompts(d.test, "data.test") if d.test else None,
                        CachedPrompts(d.cache) if d.cache else None)
    rows = files.cache
    if rows is not None and rows.index.get("policy") != cfg.policy.name:
        raise ValueError(f"data.cache={d.cache!r} was encoded by policy {rows.index.get('policy')!r}, not "
                         f"{cfg.policy.name!r}; encode the prompts again with `flowgrove encode-prompts --policy {cfg.policy.name}`")
    if rows is not None and files.train is not None and [str(p) for p in files.train] != [str(p) for p in rows.prompts()]:
        raise ValueError(f"data.cache={d.cache!r} holds other prompts than data.train={d.train!r}; encode data.train "
                         "again with `flowgrove encode-prompts` or drop one of the two keys")
    return files


class PromptSets(NamedTuple):
    """The prompts of a run: training, held-out (None: the training prompts) and where training rows come from."""

    train: list[Prompt]
    test: list[Prompt] | None
    rows: PromptRows | None  # None: the trainer encodes the training prompts once


def load_prompt_sets(cfg: Config, policy: FlowPolicy, files: PromptFiles | None = None) -> PromptSets:
    """The prompt files (read here unless ``files`` are given), else the policy's built-in training and held-out
    prompts. More prompts per step than the set holds is said in one line: each step then repeats some."""
    files = files or read_prompt_files(cfg)
    train = files.train or (files.cache.prompts() if files.cache is not None else None)
    if train is None:
        default = getattr(policy, "default_prompts", None)
        if default is None:
            raise ValueError(f"policy {cfg.policy.name!r} has no built-in prompts; set data.train=PROMPTS.txt|jsonl|csv")
        train = [Prompt(p) for p in default()]
    if cfg.rollout.prompts_per_step > len(train) and distributed.is_main():
        note(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is more than the {len(train)} training prompts: "
             "every step repeats some of them (each repeat is its own group)")
    heldout = getattr(policy, "heldout_prompts", None)  # the numbers task's unseen numbers
    own = heldout() if heldout is not None else None
    test = files.test or ([Prompt(p) for p in own] if own else None)
    return PromptSets(train, test, files.cache)


def encode_prompt_file(prompt_file: str, policy_name: str, overrides: list[str], out: str, batch: int = 16,
                       shard_rows: int = 1024) -> Path:
    """``flowgrove encode-prompts``: build ``policy_name`` (with ``policy.*`` overrides) and cache its encodings."""
    from flowgrove.config.load import load_config
    from flowgrove.parallel import distributed
    from flowgrove.policies.base import build_policy
    from flowgrove.training.prepare import policy_kwargs

    if batch < 1 or shard_rows < 1:
        raise ValueError(f"--batch {batch} and --shard-rows {shard_rows} must be >= 1")
    cfg = load_config(None, [f"policy.name={policy_name}", *overrides])
    prompts = read_prompts(prompt_file, "PROMPTS")
    policy = build_policy(cfg.policy.name, **policy_kwargs(cfg, distributed.resolve_device(cfg.run.device)))
    fingerprint = {"path": cfg.policy.path, "dtype": cfg.policy.dtype, "options": dict(cfg.policy.options)}
    return write_cache(policy, prompts, out, cfg.policy.name, batch, shard_rows, fingerprint)
